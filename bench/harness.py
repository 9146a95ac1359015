"""What the benchmarks share: mounting a peer (cachefs, sshfs, rclone, the pyfuse3
pass-through) afresh and taking it down whatever happens, the watchdog that kills a mount
whose calls hang, and small measuring helpers. bench/run.py (loopback) and bench/wan.py
(through devtools/wanrelay.py) both use it.

Owns: the mount processes it starts (ended by their PID) and their mount points and cache
folders under the benchmark's work folder. Must not touch: the server (the benchmarks own
it), any mount or process it did not start.

A benchmark hands ``Mount`` a ``MountHost``: its work folder, the list of live mounts
(taken down at exit), the rclone config and the ``Endpoint`` to mount, which is the sshd
itself on loopback or the relay in front of it.
"""

from __future__ import annotations

import os
import stat
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import quote_from_bytes

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cachefs.mounts import is_mounted  # noqa: E402
from devtools.devserver import SshServer, descendants  # noqa: E402

MOUNT_TIMEOUT = 30.0
STOP_TIMEOUT = 40.0  # cachefs replays pending changes for up to 30 s on unmount


@dataclass(frozen=True)
class Endpoint:
    """Where the peers connect: host and port (sshd's, or a relay's in front of it), with
    the user, the share and the key files that go with it."""

    host: str
    port: int
    user: str
    share: Path
    identity: Path
    known_hosts: Path

    @classmethod
    def of(cls, server: SshServer) -> Endpoint:
        return cls(server.host, server.port, server.user, server.share, server.identity,
                   server.known_hosts)

    @classmethod
    def through(cls, server: SshServer, port: int, folder: Path) -> Endpoint:
        """The server as seen through a relay on 127.0.0.1:``port``: a known_hosts file of
        its own in ``folder`` names the server's host key at that port."""
        key_type, key_b64 = server.host_key_pub.read_text().split()[:2]
        known_hosts = folder / f"known_hosts_{port}"
        known_hosts.write_text(f"[127.0.0.1]:{port} {key_type} {key_b64}\n")
        os.chmod(known_hosts, 0o600)
        return cls("127.0.0.1", port, server.user, server.share, server.identity, known_hosts)

    def address(self) -> str:
        path = quote_from_bytes(os.fsencode(self.share), safe="/~!$&'()*+,;=:@-._")
        return f"sftp://{self.user}@{self.host}:{self.port}{path}"


def write_rclone_conf(path: Path, endpoint: Endpoint, remote: str = "bench") -> Path:
    """An rclone config with one sftp remote named ``remote`` for ``endpoint``."""
    path.write_text(
        f"[{remote}]\ntype = sftp\n"
        f"host = {endpoint.host}\nport = {endpoint.port}\nuser = {endpoint.user}\n"
        f"key_file = {endpoint.identity}\nknown_hosts_file = {endpoint.known_hosts}\n"
        "shell_type = unix\nmd5sum_command = none\nsha1sum_command = none\n")
    return path


class MountHost(Protocol):
    """What a benchmark gives its mounts."""

    workdir: Path
    server: SshServer
    endpoint: Endpoint
    rclone_conf: Path | None
    cachefs_options: list[str]
    live_mounts: list[Mount]


# -- small helpers ------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


_drop_warned = False


def walk(root: Path) -> int:
    """find + lstat: entries under ``root``."""
    count = 0
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                st = os.lstat(entry.path)
                count += 1
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return count


def drop_caches() -> None:
    global _drop_warned
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        if not _drop_warned:
            log(f"WARNING: cannot drop the page cache ({exc}); 'cold' figures are not cold")
            _drop_warned = True


def read_whole(path: Path, buf: bytearray) -> int:
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return total
            total += n


class Skip(Exception):
    """Not applicable to this peer (no figure, no error)."""


# -- mounts -------------------------------------------------------------------------------
class MountFailed(Exception):
    pass


class Mount:
    """One fresh mount of one peer; ``path`` is where to work. Always taken down by stop()."""

    def __init__(self, bench: MountHost, peer: str, tag: str, again: Mount | None = None) -> None:
        """``again``: a mount of the same peer, stopped, whose mount point and cache this
        one takes over (a remount: what the peer's cache kept; davfs2 finds its cache by
        the mount point's name)."""
        self.bench = bench
        self.peer = peer
        self.tag = tag
        self.proc: subprocess.Popen[bytes] | None = None
        self.cache_dir: Path | None = again.cache_dir if again else None
        self.mnt: Path | None = again.mnt if again else None
        self.log_path = bench.workdir / "logs" / f"{tag}.log"
        self.killed = False

    @property
    def path(self) -> Path:
        return self.mnt if self.mnt is not None else self.bench.server.share

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        b = self.bench
        srv = b.endpoint
        if self.peer in ("cachefs", "cachefs-enc"):
            extra = ["--encrypt-cache"] if self.peer == "cachefs-enc" else []
            extra += b.cachefs_options
            return [sys.executable, str(REPO / "mount.py"), srv.address(), str(self.mnt),
                    "--cache-dir", str(self.cache_dir), "--identity", str(srv.identity),
                    "--known-hosts", str(srv.known_hosts), "--foreground", *extra]
        if self.peer == "sshfs":
            return ["sshfs", "-f", f"{srv.user}@{srv.host}:{srv.share}", str(self.mnt),
                    "-p", str(srv.port), "-o",
                    f"IdentityFile={srv.identity},UserKnownHostsFile={srv.known_hosts},"
                    "StrictHostKeyChecking=yes,BatchMode=yes"]
        if self.peer == "pyfuse3":
            return [sys.executable, str(REPO / "bench" / "passthrough.py"), str(srv.share), str(self.mnt)]
        if self.peer == "rclone":
            return ["rclone", "mount", f"bench:{srv.share}", str(self.mnt),
                    "--config", str(b.rclone_conf), "--vfs-cache-mode", "full",
                    "--cache-dir", str(self.cache_dir)]
        raise ValueError(self.peer)

    def start(self) -> "Mount":
        if self.peer == "share":
            return self
        b = self.bench
        if self.mnt is None:
            self.mnt = b.workdir / "mnt" / self.tag
            self.mnt.mkdir(parents=True)
            self.cache_dir = b.workdir / "caches" / self.tag
        self.cache_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as logf:
            env = dict(os.environ, CACHEFS_CACHE_PASSPHRASE="benchmark passphrase")
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
        b.live_mounts.append(self)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None:
                raise MountFailed(f"{self.peer} exited with status {self.proc.returncode} before "
                                  f"mounting: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise MountFailed(f"{self.peer} not mounted after {MOUNT_TIMEOUT:.0f} s: {self.log_tail()}")
            time.sleep(0.05)
        return self

    def log_tail(self, n: int = 600) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return "(no log)"
        return (text[-n:] if text else "(empty log)").replace("\n", " | ")

    def abort(self) -> None:
        """Watchdog: kill the daemon so that calls blocked on the mount fail, then unmount."""
        self.killed = True
        if self.proc is not None and self.proc.poll() is None:
            for pid in [self.proc.pid, *descendants(self.proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.mnt is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True, timeout=15)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.mnt is not None and is_mounted(self.mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=15)
        except subprocess.TimeoutExpired:
            log(f"  fusermount3 -u -z {self.mnt} timed out")
        kids = descendants(self.proc.pid) if self.proc.poll() is None else []
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for pid in kids:  # e.g. the ssh client sshfs started
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self in self.bench.live_mounts:
            self.bench.live_mounts.remove(self)
        self.proc = None

    def __enter__(self) -> "Mount":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Watchdog:
    """Kills ``mount`` after ``seconds`` unless cancelled; ``fired`` tells afterwards."""

    def __init__(self, mount: Mount | None, seconds: float, what: str) -> None:
        self.mount, self.seconds, self.what = mount, seconds, what
        self.fired = False
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        log(f"  WATCHDOG: {self.what} still running after {self.seconds:.0f} s: killing the mount")
        if self.mount is not None:
            try:
                self.mount.abort()
            except Exception as exc:  # noqa: BLE001
                log(f"  watchdog abort failed: {exc}")

    def __enter__(self) -> "Watchdog":
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()


def poll_until(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> float | None:
    """Seconds until ``check()`` is true (from now), or None after ``timeout``."""
    t0 = time.perf_counter()
    while True:
        t = time.perf_counter()
        try:
            if check():
                return t - t0
        except OSError:
            pass
        if t - t0 > timeout:
            return None
        time.sleep(interval)


def machine_line() -> str:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem / 1024:.1f} GiB RAM, {platform.platform()}, "
            f"Python {platform.python_version()}")


def versions() -> str:
    out = []
    for cmd in (["sshfs", "--version"], ["rclone", "version"], ["/usr/sbin/sshd", "-V"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            text = (r.stdout + r.stderr).strip().splitlines()
            text = [t for t in text if t.lower().startswith(("sshfs", "rclone", "openssh"))] or text
            out.append(text[0] if text else "?")
        except Exception:  # noqa: BLE001
            pass
    try:
        import paramiko
        out.append(f"paramiko {paramiko.__version__}")
    except ImportError:
        pass
    return "; ".join(out)
