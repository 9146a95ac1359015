#!/usr/bin/env python3
"""cachefs over SMB and WebDAV beside the other ways to mount the same share: rclone mount
(its ``smb`` and ``webdav`` backends, ``--vfs-cache-mode full``), davfs2 (WebDAV) and the
share folder itself (the floor), all on the same private servers.

    .venv/bin/python bench/protocols.py [--protocol smb,webdav] [--quick | --repeats N]
                                        [--only NAMES] [--peers NAMES] [--no-docs]

Starts a private Samba ``smbd`` (``devtools.smbserver.SmbServer``) and a private Apache
``mod_dav`` (``devtools.davserver.DavServer``) on 127.0.0.1, each serving a share of its own
in a temporary folder; fills the share; then for every workload, repetition and peer mounts
the peer afresh (empty cache), measures, and takes the mount down. The measuring, mounting
and table code is bench/run.py's and bench/harness.py's; this file adds the peers of these
protocols, the reads from a cache kept across a remount, and the report,
``docs/performance-protocols.md``.

Owns: the servers it starts, the mounts it makes (taken down by their PID), its work folder
(removed at the end unless ``--keep``), and docs/performance-protocols.md. Must not touch:
any other mount, process or server; the system's davfs2, Samba and Apache configuration
(davfs2 gets a configuration file, secrets file and cache folder of its own; only its pid
file lands in the system's /run/mount.davfs, and goes with its daemon).

Workloads (names for --only): backend (a reference: cachefs's handler reading the big file
on its own) seqread smallread create git.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import (MOUNT_TIMEOUT, STOP_TIMEOUT, Mount, MountFailed, Watchdog,  # noqa: E402
                           drop_caches, log, machine_line, poll_until, read_whole)
from bench.run import Bench, Metric, Sizes, build_tables, fmt, raw_samples, write_control  # noqa: E402
from cachefs.mounts import is_mounted  # noqa: E402

MiB = 1 << 20
BLOCK = MiB
PROTOCOLS = ("smb", "webdav")
PEERS = ("cachefs", "rclone", "davfs2", "share")
PEERS_OF = {"smb": ("cachefs", "rclone", "share"),
            "webdav": ("cachefs", "rclone", "davfs2", "share")}
WORKLOADS = ("backend", "seqread", "smallread", "create", "git")
# judged as the issue asks: cachefs ahead of each peer where it works from its cache, no
# slower than the best peer cold (the share folder, the floor, is never a peer to beat)
CACHED = ("read_cached", "small_warm", "small_cached", "create", "git")
COLD = ("read_cold", "small_cold")

# davfs2 as root drops to this user; its cache folder must be root:davfs2 0775 as
# /var/cache/davfs2 is ("can't access directory" otherwise, even when davfs2 owns it)
DAVFS2_GROUP = "davfs2"
DAVFS2_RUN = Path("/var/run/mount.davfs")


def sizes_for(args: argparse.Namespace) -> Sizes:
    # the sizes: a 64 MiB file, 1,000 files of 4 KiB, 1,000 creates; git as
    # bench/run.py --quick (a 200-file tree)
    return Sizes(args.size_mb, 0, 1000, 200, 1000, 0, 0, 0)


def metric_list(s: Sizes) -> list[Metric]:
    return [
        Metric("backend", "backend", f"the handler alone (SmbRemote / DavRemote read_into {s.big_mb} MiB, page cache dropped)", "MiB/s", True),
        Metric("read_cold", "seqread", f"seq read {s.big_mb} MiB, cold (fresh mount, empty cache, page cache dropped)", "MiB/s", True),
        Metric("read_cached", "seqread", "  again from the cache (remount, same cache, page cache dropped)", "MiB/s", True),
        Metric("small_cold", "smallread", f"read {s.small_files} x 4 KiB files, cold", "files/s", True),
        Metric("small_warm", "smallread", "  again (same mount)", "files/s", True),
        Metric("small_cached", "smallread", "  again from the cache (remount, page cache dropped)", "files/s", True),
        Metric("create", "create", f"create {s.create_files} x 4 KiB files in 20 folders", "files/s", True),
        Metric("create_lag", "create", "  then until the server has them all", "s", False),
        Metric("create_done", "create", "  files / (create + until on the server)", "files/s", True),
        Metric("git", "git", f"git init+copy {s.src_files} files+add+commit+status", "s", False),
        Metric("git_lag", "git", "  then until the server has the same repo files", "s", False),
    ]


def hidden_password(password: str) -> str:
    """rclone's obscured form of ``password`` (``rclone obscure``, given on stdin so that
    the password is in no argv)."""
    r = subprocess.run(["rclone", "obscure", "-"], input=password, capture_output=True,
                       text=True, timeout=30, check=True)
    return r.stdout.strip()


def write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


# -- mounts -------------------------------------------------------------------------------
class ProtocolMount(Mount):
    """A peer of one protocol: cachefs and rclone as processes in the foreground (run by
    Mount), davfs2 as the daemon ``mount.davfs`` leaves behind (found by its pid file and
    ended by that PID)."""

    bench: ProtocolBench

    def __init__(self, bench: ProtocolBench, peer: str, tag: str, again: Mount | None = None) -> None:
        super().__init__(bench, peer, tag, again)
        self.daemon_pid: int | None = None

    @property
    def pid(self) -> int | None:
        return self.daemon_pid if self.peer == "davfs2" else super().pid

    def command(self) -> list[str]:
        b = self.bench
        if self.peer == "cachefs":
            return [sys.executable, str(REPO / "mount.py"), b.server.address(), str(self.mnt),
                    "--cache-dir", str(self.cache_dir), "--foreground", *b.server.mount_args(),
                    *b.cachefs_options]
        if self.peer == "rclone":
            return ["rclone", "mount", b.rclone_remote, str(self.mnt), "--config", str(b.rclone_conf),
                    "--vfs-cache-mode", "full", "--cache-dir", str(self.cache_dir)]
        raise ValueError(self.peer)

    # -- davfs2 ---------------------------------------------------------------------
    def start(self) -> Mount:
        if self.peer != "davfs2":
            return super().start()
        b = self.bench
        if self.mnt is None:
            self.mnt = b.workdir / "mnt" / self.tag
            self.mnt.mkdir(parents=True)
            self.cache_dir = b.workdir / "caches" / self.tag
            self.cache_dir.mkdir(parents=True)
            os.chown(self.cache_dir, 0, _group_id(DAVFS2_GROUP))
            os.chmod(self.cache_dir, 0o775)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        conf = b.davfs2_conf(self.cache_dir)
        b.live_mounts.append(self)
        with open(self.log_path, "wb") as logf:
            r = subprocess.run(["mount.davfs", b.server.url(), str(self.mnt), "-o", f"conf={conf}"],
                               stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                               timeout=MOUNT_TIMEOUT)
        # (the daemon writes its pid file a moment after mount.davfs has returned)
        poll_until(lambda: self._find_daemon() is not None, timeout=10, interval=0.05)
        if r.returncode != 0 or not is_mounted(self.mnt):
            raise MountFailed(f"mount.davfs exited with status {r.returncode}: {self.log_tail()}")
        if self.daemon_pid is None:
            raise MountFailed(f"davfs2 mounted {self.mnt} but its daemon was not found by "
                              f"{self._pid_file()} within 10 s")
        return self

    def _pid_file(self) -> Path:
        return DAVFS2_RUN / (str(self.mnt).strip("/").replace("/", "-") + ".pid")

    def _find_daemon(self) -> int | None:
        """The PID in davfs2's pid file for our mount point, if that process serves it."""
        try:
            pid = int(self._pid_file().read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if str(self.mnt) not in _cmdline(pid):
            return None
        self.daemon_pid = pid
        return pid

    def abort(self) -> None:
        if self.peer != "davfs2":
            return super().abort()
        self.killed = True
        self._kill(signal.SIGKILL)
        if self.mnt is not None:
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, timeout=15)

    def stop(self) -> None:
        if self.peer != "davfs2":
            return super().stop()
        if self.daemon_pid is None and self.mnt is not None:
            self._find_daemon()  # (a start that failed after mounting)
        try:
            # umount.davfs waits for the daemon to upload what is dirty and end
            if self.mnt is not None and is_mounted(self.mnt):
                subprocess.run(["umount", str(self.mnt)], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log(f"  umount {self.mnt} (davfs2) timed out")
        if not self._gone(10):
            self._kill(signal.SIGTERM)
            if not self._gone(5):
                self._kill(signal.SIGKILL)
                self._gone(5)
        if self.mnt is not None and is_mounted(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, timeout=15)
        if self in self.bench.live_mounts:
            self.bench.live_mounts.remove(self)
        self.daemon_pid = None

    def _kill(self, sig: int) -> None:
        pid = self.daemon_pid
        if pid is not None and self.mnt is not None and str(self.mnt) in _cmdline(pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _gone(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.daemon_pid is not None and self.mnt is not None and str(self.mnt) in _cmdline(self.daemon_pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True


def _cmdline(pid: int) -> str:
    """The command line of ``pid`` ("" when it is gone: a reused PID shows another one)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _group_id(name: str) -> int:
    import grp

    return grp.getgrnam(name).gr_gid


# -- the benchmark ------------------------------------------------------------------------
@dataclass
class ProtocolBench(Bench):
    protocol: str = "smb"
    rclone_remote: str = ""
    davfs2_secrets: Path | None = None

    def new_mount(self, peer: str, tag: str, again: Mount | None = None) -> Mount:
        return ProtocolMount(self, peer, tag, again)

    def table_peers(self) -> list[str]:
        return [p for p in PEERS if p in self.peers]

    def push(self, m: Mount) -> float:
        """cachefs: ``sync`` through .cachefs/control, which returns when the journal is
        replayed (the lag poll then only confirms the server has it all). The others upload
        on their own: the poll of the server's folder is the whole lag."""
        if m.peer != "cachefs":
            return 0.0
        t0 = time.perf_counter()
        write_control(m.path, "sync")
        return time.perf_counter() - t0

    def write_rclone_conf(self) -> None:
        srv = self.server
        secret = hidden_password(srv.password)
        conf = self.workdir / "rclone.conf"
        if self.protocol == "smb":
            share = urlsplit(srv.address()).path.strip("/")
            write_private(conf, f"[bench]\ntype = smb\nhost = {srv.host}\nport = {srv.port}\n"
                                f"user = {srv.user}\npass = {secret}\n")
            self.rclone_remote = f"bench:{unquote(share)}"
        else:
            write_private(conf, f"[bench]\ntype = webdav\nurl = {srv.url()}\nvendor = other\n"
                                f"user = {srv.user}\npass = {secret}\n")
            self.rclone_remote = "bench:"
        self.rclone_conf = conf

    def davfs2_conf(self, cache_dir: Path) -> Path:
        """A davfs2 configuration of this mount's own (mount.davfs -o conf=FILE)."""
        folder = self.workdir / "davfs2"
        folder.mkdir(exist_ok=True)
        if self.davfs2_secrets is None:
            srv = self.server
            self.davfs2_secrets = write_private(folder / "secrets",
                                                f"{srv.url()} {srv.user} {srv.password}\n")
        conf = folder / f"{cache_dir.name}.conf"
        conf.write_text(
            f"cache_dir {cache_dir}\n"
            f"secrets {self.davfs2_secrets}\n"
            # davfs2 up to 1.7.1 on Linux 6.16 and later: readdir fails with EINVAL unless
            # its buffer is at least 64 KiB (alisarctl/davfs2 issue 22); this kernel is 6.18
            "buf_size 64\n")
        return conf

    def run_workload(self, name: str) -> None:
        s = self.sizes
        fn, guard, keys = {
            "seqread": (self.w_read, 180 + 2 * s.big_mb, ["read_cold", "read_cached"]),
            "smallread": (self.w_small, 300 + 0.2 * s.small_files, ["small_cold", "small_warm", "small_cached"]),
            "create": (self.w_creates, 180 + 0.2 * s.create_files, ["create", "create_lag", "create_done"]),
            "git": (self.w_git, 600, ["git", "git_lag"]),
        }[name]
        log(f"{self.protocol}: workload {name} (watchdog {guard:.0f} s per mount)")
        for rep in range(self.args.repeats):
            for peer in self.peers:
                self.measure(name, peer, rep, fn, guard, keys)

    def w_backend(self) -> None:
        """Reference: cachefs's handler for this scheme reading big.bin on its own (no cache,
        no FUSE), what a cold read through the mount is bounded by."""
        from cachefs.address import parse_remote
        from cachefs.remote import handler_for
        from cachefs.remote.options import ConnectOptions
        from cachefs.remote.ssh_secrets import Secrets

        log(f"{self.protocol}: workload backend (reference)")
        address = parse_remote(self.server.address())
        size = self.sizes.big_mb * MiB
        for rep in range(self.args.repeats):
            remote = handler_for(address.scheme).from_address(
                address, ConnectOptions(secrets=Secrets(self.server.password)), None)
            try:
                remote.connect()
                drop_caches()
                t0 = time.perf_counter()
                got = remote.read_into(b"big.bin", 0, size, lambda at, data: None)
                dt = time.perf_counter() - t0
                if got != size:
                    raise RuntimeError(f"read {got} bytes of {size}")
                self.add("backend", "cachefs", size / MiB / dt)
                log(f"  backend rep {rep + 1}: {size / MiB / dt:.1f} MiB/s")
            except Exception as exc:  # noqa: BLE001
                log(f"  backend rep {rep + 1}: ERROR {type(exc).__name__}: {exc}")
                self.error("backend", "cachefs", f"{type(exc).__name__}: {exc}")
            finally:
                remote.close()

    def remount(self, m: Mount) -> Mount:
        """``m`` taken down and mounted again on the same mount point with the same cache
        (the share folder: itself)."""
        if m.peer == "share":
            return m
        m.stop()
        again = self.new_mount(m.peer, f"{m.tag}-again", again=m)
        try:
            again.start()
        except BaseException:
            again.stop()
            raise
        return again

    def done_with(self, again: Mount, first: Mount) -> None:
        """Take down a remount and note errors in its log (Bench.measure reads the first
        mount's only)."""
        if again is first:
            return
        again.stop()
        if again.log_path.exists():
            text = again.log_path.read_text(errors="replace")
            bad = next((ln for ln in text.splitlines() if "Traceback" in ln or " ERROR " in ln), None)
            if bad is not None:
                self.notes.append(f"{again.tag}: the {again.peer} log has errors, e.g. "
                                  f"`{bad.strip()[:200]}` (see {again.log_path})")

    def guarded(self, m: Mount, seconds: float, what: str) -> Watchdog:
        return Watchdog(m if m.peer != "share" else None, seconds, f"{what}/{m.peer}")

    def w_read(self, m: Mount) -> dict[str, float]:
        size = self.sizes.big_mb * MiB
        buf = bytearray(BLOCK)
        out = {}
        drop_caches()
        t0 = time.perf_counter()
        n = read_whole(m.path / "big.bin", buf)
        out["read_cold"] = n / MiB / (time.perf_counter() - t0)
        if n != size:
            raise RuntimeError(f"cold read: {n} bytes, expected {size}")
        again = self.remount(m)
        try:
            with self.guarded(again, 120 + 2 * self.sizes.big_mb, "seqread again"):
                drop_caches()
                t0 = time.perf_counter()
                n = read_whole(again.path / "big.bin", buf)
                out["read_cached"] = n / MiB / (time.perf_counter() - t0)
                if n != size:
                    raise RuntimeError(f"read from the cache: {n} bytes, expected {size}")
                self.verify_big(again)
        finally:
            self.done_with(again, m)
        return out

    def verify_big(self, m: Mount) -> None:
        """Once per peer, untimed: the bytes read through the mount are the share's."""
        if getattr(self, f"_verified_big_{m.peer}", False):
            return
        import hashlib

        h = hashlib.sha256()
        with open(m.path / "big.bin", "rb") as f:
            while chunk := f.read(8 * MiB):
                h.update(chunk)
        if h.hexdigest() != self.big_sha:
            raise RuntimeError("content of big.bin read through the mount differs from the share")
        setattr(self, f"_verified_big_{m.peer}", True)

    def w_small(self, m: Mount) -> dict[str, float]:
        out = self.w_smallread(m)  # cold, then warm on the same mount
        again = self.remount(m)
        try:
            with self.guarded(again, 120 + 0.1 * self.sizes.small_files, "smallread again"):
                drop_caches()
                buf = bytearray(65536)
                root = again.path / "small"
                t0 = time.perf_counter()
                count = 0
                for d in sorted(os.listdir(root)):
                    for name in os.listdir(root / d):
                        if read_whole(root / d / name, buf) != 4096:
                            raise RuntimeError(f"from the cache: {d}/{name} is not 4096 bytes")
                        count += 1
                out["small_cached"] = count / (time.perf_counter() - t0)
                if count != len(self.small_files):
                    raise RuntimeError(f"from the cache: read {count} files, expected {len(self.small_files)}")
        finally:
            self.done_with(again, m)
        return out

    def w_creates(self, m: Mount) -> dict[str, float]:
        out = self.w_create(m)
        if "create_lag" in out:
            n = self.sizes.create_files
            out["create_done"] = n / (n / out["create"] + out["create_lag"])
        return out


# -- reporting ----------------------------------------------------------------------------
def verdict(b: ProtocolBench, metrics: list[Metric]) -> list[str]:
    """Where cachefs stands against each peer (the share folder is the floor, no peer)."""
    by_key = {mt.key: mt for mt in metrics}
    lines = []
    for key in CACHED + COLD:
        per = b.samples.get(key, {})
        mt = by_key[key]
        if "cachefs" not in per:
            continue
        c = statistics.median(per["cachefs"])
        rivals = {p: statistics.median(v) for p, v in per.items() if p not in ("cachefs", "share") and v}
        if not rivals:
            continue
        if key in COLD:  # no slower than the best peer
            best_p = max(rivals, key=rivals.get) if mt.higher_better else min(rivals, key=rivals.get)
            rivals = {best_p: rivals[best_p]}
        parts = []
        for p, o in rivals.items():
            speed = (c / o) if mt.higher_better else (o / c)  # >1: cachefs faster
            word = "ahead of" if speed >= 1 else "BEHIND"
            parts.append(f"{word} {p} ({fmt(mt, o)} {mt.unit}): x{speed:.2f}")
        kind = "cached" if key in CACHED else "cold, against the best peer"
        lines.append(f"- `{key}` ({kind}): cachefs {fmt(mt, c)} {mt.unit}, " + "; ".join(parts))
    return lines


def load_average() -> str:
    """The 1-minute load average (other work on the machine slows every peer, the Python
    ones most)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except (OSError, IndexError):
        return "?"


def tool_versions() -> str:
    out = []
    for cmd in (["rclone", "version"], ["mount.davfs", "-V"], ["/usr/sbin/smbd", "-V"],
                ["/usr/sbin/apache2", "-v"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            first = (r.stdout + r.stderr).strip().splitlines()
            text = first[0].replace("Server version: ", "").split(" <")[0].strip() if first else "?"
            out.append(f"Samba {text.removeprefix('Version ')}" if "smbd" in cmd[0] else text)
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        from importlib.metadata import version

        out += [f"smbprotocol {version('smbprotocol')}", f"httpx {version('httpx')}"]
    except Exception:  # noqa: BLE001
        pass
    return "; ".join(out)


def write_report(benches: list[ProtocolBench], metrics: list[Metric], args: argparse.Namespace,
                 started: float) -> str:
    exe = sys.executable
    try:
        exe = os.path.relpath(exe, REPO) if Path(exe).is_relative_to(REPO) else exe
    except ValueError:
        pass
    command = shlex.join([exe, "bench/protocols.py", *sys.argv[1:]])
    s = benches[0].sizes if benches else sizes_for(args)
    sections = []
    for b in benches:
        table, _ref, errs = build_tables(b, metrics)
        notes = "\n".join(f"- {n}" for n in dict.fromkeys(b.notes))
        title = {"smb": "SMB (Samba smbd)", "webdav": "WebDAV (Apache mod_dav)"}[b.protocol]
        sections.append(f"""## {title}

{table}

Where cachefs stands (×: how many times faster cachefs is; the share folder is the floor,
not a peer):
{chr(10).join(verdict(b, metrics)) or '- (not measured)'}

Errors:
{errs or '- none'}

Notes from the run:
{notes or '- none'}

<details><summary>raw samples ({b.protocol})</summary>

```
{raw_samples(b)}
```
</details>
""")
    text = f"""# cachefs over SMB and WebDAV: performance beside rclone and davfs2

Produced by `{command}` on {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} in
{(time.monotonic() - started) / 60:.1f} min.
Machine: {machine_line()}. A shared, noisy machine: treat differences under ~20 % as noise
(load average at the start {args.load_at_start}, at the end {load_average()}).
Tools: {tool_versions()}.
The SFTP figures (sshfs, rclone sftp) are in [performance.md](performance.md).

## Method
- The servers: a private Samba `smbd` (`devtools.smbserver.SmbServer`, SMB 2/3, NTLM) and a
  private Apache `mod_dav` (`devtools.davserver.DavServer`, basic authentication) on
  127.0.0.1, each serving a share in a temporary folder holding `big.bin` ({s.big_mb} MiB
  random), {s.small_files} files of 4 KiB in 100 folders and a {s.src_files}-file source tree.
- The peers, each on the same server: cachefs (`mount.py smb://… / dav://… --foreground`
  with the server's `--password-file` and an empty `--cache-dir`); `rclone mount` with an
  `smb` resp. `webdav` (vendor other) remote in a config file of its own,
  `--vfs-cache-mode full`, an empty `--cache-dir`, its defaults otherwise (write-back
  after 5 s); davfs2 (WebDAV only; `mount.davfs URL MNT -o conf=FILE` as root: a config of
  its own naming a cache folder of its own (root:davfs2 0775, as davfs2 requires) and a
  secrets file (0600), `buf_size 64` (davfs2 up to 1.7.1 on Linux 6.16 and later fails
  every readdir with EINVAL otherwise: alisarctl/davfs2 issue 22), its defaults otherwise:
  locks on, upload 10 s after close (`delay_upload`)); `share` is the share folder
  itself, the floor. The kernel's cifs client is not a peer: this kernel has no `cifs`
  filesystem (`mount -t cifs`: "unknown filesystem type", no module to load, no
  `mount.cifs`).
- Every measurement mounts its peer afresh and unmounts it (cachefs, rclone:
  `fusermount3 -u -z` and the process ended by its PID; davfs2: `umount`, which waits for
  its uploads, then its daemon's PID from its pid file, ended if still there). "Cold"
  drops the kernel page cache first (`sync; echo 3 > /proc/sys/vm/drop_caches`).
- Reads from the cache: the peer is unmounted and mounted again on the same mount point
  with the same cache folder (davfs2 finds its cache by the mount point), the page cache
  is dropped, and the file (the {s.small_files} files) read again. The share folder: the
  same read after the drop.
- create: {s.create_files} files in 20 new folders, timed to the last `close`; then
  until the server has them all: cachefs writes `sync` to `.cachefs/control`, which
  returns when the journal is replayed, and the server's folder is then read to confirm;
  for rclone and davfs2 the server's folder is polled every 0.1 s until every file is
  there at its full size. `create_done` counts both. git: `git init`, copy the tree in,
  `add -A`, `commit`, `status`, then the same "until the server has it" (cachefs:
  `sync`, then a poll of the server's copy for the same files at the same sizes).
- "The handler alone": cachefs's handler for the scheme (`SmbRemote`, `DavRemote`) reading
  `big.bin` with `read_into` in this process, no cache and no FUSE, after dropping the page
  cache: what a cold read through the mount is bounded by.
- Each figure is the median of {args.repeats} run(s) (peers interleaved per run).
  Ratios are cachefs/peer of the medians: for ↑ figures >1 means cachefs is faster, for ↓
  figures (times) <1 means cachefs is faster.

{chr(10).join(sections)}"""
    if not args.no_docs:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return text


# -- main ---------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", default=",".join(PROTOCOLS), help="smb, webdav or both (default)")
    p.add_argument("--quick", action="store_true", help="one run per figure (--repeats 1)")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure (default 3)")
    p.add_argument("--only", nargs="+", metavar="NAMES",
                   help=f"workloads to run (comma or space separated): {' '.join(WORKLOADS)}")
    p.add_argument("--peers", default=",".join(PEERS), help="comma separated (default: all)")
    p.add_argument("--size-mb", type=int, default=64, help="size of the big file (default 64)")
    p.add_argument("--cachefs-options", default="", metavar="OPTIONS",
                   help="more options for every cachefs mount, e.g. '--connections 8'")
    p.add_argument("--max-minutes", type=float, default=50.0,
                   help="skip what is left after this long (default 50)")
    p.add_argument("--output", type=Path, default=REPO / "docs" / "performance-protocols.md")
    p.add_argument("--no-docs", action="store_true", help="print only; write no docs file")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, caches)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.repeats = 1
    names = [n for item in (args.only or []) for n in item.split(",") if n]
    bad = [n for n in names if n not in WORKLOADS]
    if bad:
        p.error(f"unknown workload(s): {', '.join(bad)}; known: {', '.join(WORKLOADS)}")
    args.workloads = [w for w in WORKLOADS if not names or w in names]
    args.protocols = [x for x in args.protocol.split(",") if x]
    if not args.protocols or any(x not in PROTOCOLS for x in args.protocols):
        p.error(f"protocols are {', '.join(PROTOCOLS)}")
    args.peer_list = [x for x in args.peers.split(",") if x]
    if any(x not in PEERS for x in args.peer_list):
        p.error(f"peers are {', '.join(PEERS)}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    args.output = args.output.resolve()
    return args


def make_server(protocol: str, folder: Path) -> Any:
    if protocol == "smb":
        from devtools.smbserver import SmbServer

        return SmbServer(folder / "server", folder / "share")
    from devtools.davserver import DavServer

    return DavServer(folder / "server", folder / "share")


def run_protocol(b: ProtocolBench) -> None:
    args = b.args
    b.server.start()
    log(f"{b.protocol}: server on {b.server.host}:{b.server.port}, share {b.server.share}")
    if "rclone" in b.peers:
        b.write_rclone_conf()
    b.fill_share(args.workloads + (["seqread"] if "backend" in args.workloads else []))
    for w in args.workloads:
        try:
            if w == "backend":
                if "cachefs" in b.peers:
                    b.w_backend()
                continue
            b.run_workload(w)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - never abort the whole run
            log(f"{b.protocol}: workload {w} failed: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            b.notes.append(f"workload {w} failed as a whole: {type(exc).__name__}: {exc}")


def main() -> int:
    args = parse_args()
    started = time.monotonic()
    args.load_at_start = load_average()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    sizes = sizes_for(args)
    metrics = metric_list(sizes)
    workdir = Path(tempfile.mkdtemp(prefix="cachefs-bench-proto-"))
    os.chmod(workdir, 0o755)  # davfs2's daemon (user davfs2) reaches its cache through it
    log(f"work folder {workdir}")
    deadline = started + args.max_minutes * 60
    benches: list[ProtocolBench] = []
    rc = 0
    try:
        for protocol in args.protocols:
            folder = workdir / protocol
            folder.mkdir()
            server = make_server(protocol, folder)
            peers = []
            for p in args.peer_list:
                if p not in PEERS_OF[protocol]:
                    continue
                tool = {"rclone": "rclone", "davfs2": "mount.davfs"}.get(p)
                if tool and shutil.which(tool) is None:
                    log(f"{tool} is not installed: {p} skipped")
                    continue
                peers.append(p)
            # (endpoint: the SSH peers' address in bench/run.py; none here)
            b = ProtocolBench(args, sizes, folder, server, peers, None,
                              deadline=deadline, protocol=protocol,
                              cachefs_options=shlex.split(args.cachefs_options))
            benches.append(b)
            try:
                run_protocol(b)
            finally:
                for m in list(b.live_mounts):
                    try:
                        m.stop()
                    except Exception as exc:  # noqa: BLE001
                        log(f"stopping {m.tag} failed: {exc}")
                server.stop()
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}): reporting what was measured")
        for b in benches:
            b.notes.append("the run was interrupted; figures are partial")
        rc = 130
    write_report(benches, metrics, args, started)
    for b in benches:
        table, _ref, errs = build_tables(b, metrics)
        print(f"\n{b.protocol}:\n{table}\n" + "\n".join(verdict(b, metrics)))
        if errs:
            print("Errors:\n" + errs)
        if b.notes:
            print("Notes:\n" + "\n".join(f"- {n}" for n in dict.fromkeys(b.notes)))
    if not args.no_docs:
        print(f"\nwritten to {args.output}")
    if args.keep:
        log(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
