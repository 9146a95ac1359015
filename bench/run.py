#!/usr/bin/env python3
"""cachefs benchmark: cachefs against sshfs, rclone mount, the share directory itself, and
a pyfuse3 filesystem that passes every request through to the share (bench/passthrough.py).

    .venv/bin/python bench/run.py [--quick] [--only NAMES] [--size-mb N]    (or: scripts/run bench ...)

Starts a private OpenSSH server on 127.0.0.1 (``devtools.devserver.SshServer``, fresh keys,
a share in a temporary folder), fills the share, then for every workload, repetition and
peer mounts the peer afresh (empty cache), measures, and takes the mount down again
(``fusermount3 -u -z`` and the process ended by its PID). Prints a table of medians with
the ratio cachefs/peer and writes it to ``docs/performance.md``.

Every wait is capped: each measurement runs under a watchdog that kills the mount it uses
(which turns a hung FUSE call into an error), every subprocess has a timeout, and
``--max-minutes`` skips what is left when the run takes too long. A workload that fails for
a peer is reported and the run goes on.

Workloads (names for --only): paramiko seqread seqwrite tree smallread create git statloop
offline rss.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cachefs.cli import read_status  # noqa: E402
from devtools.devserver import SshServer, descendants  # noqa: E402
from bench.harness import (Endpoint, Mount, Skip, Watchdog, drop_caches, log,  # noqa: E402
                           machine_line, poll_until, read_whole, versions, walk, write_rclone_conf)

MiB = 1 << 20
BLOCK = MiB
PEERS = ("cachefs", "sshfs", "rclone", "share", "cachefs-enc", "pyfuse3")
# cachefs-enc: cachefs with --encrypt-cache, to show what encryption at rest costs.
# pyfuse3: bench/passthrough.py, a pyfuse3 filesystem that passes each request to the share
# folder (no network, no cache): what the FUSE requests alone cost a Python filesystem.
WORKLOADS = ("paramiko", "seqread", "seqwrite", "tree", "smallread", "create", "git",
             "statloop", "offline", "rss")


# -- small helpers ------------------------------------------------------------------------
def proc_status(pid: int, key: str) -> int | None:
    """A kB figure (VmHWM, VmRSS) from /proc/PID/status, in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def compact_memory() -> None:
    """Compact free memory (``/proc/sys/vm/compact_memory``): a diagnostic for the first
    read from a local disk after the drop that follows a cold read, which this machine
    serves at a third of the disk's rate whatever the file (docs/performance-targets.md)."""
    try:
        with open("/proc/sys/vm/compact_memory", "w") as f:
            f.write("1\n")
    except OSError as exc:
        log(f"WARNING: cannot compact memory ({exc})")


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return int(out.split()[0])


def write_control(mnt: Path, command: str) -> None:
    fd = os.open(mnt / ".cachefs" / "control", os.O_WRONLY)
    try:
        os.write(fd, command.encode())
    finally:
        os.close(fd)


# -- sizes --------------------------------------------------------------------------------
@dataclass
class Sizes:
    big_mb: int
    write_mb: int
    small_files: int
    src_files: int
    create_files: int
    offline_files: int
    many_files: int
    stat_calls: int


def sizes_for(args: argparse.Namespace) -> Sizes:
    if args.quick:
        s = Sizes(64, 32, 1000, 200, 500, 200, 10_000, 5000)
    else:
        s = Sizes(512, 256, 10_000, 1000, 2000, 1000, 100_000, 20_000)
    if args.size_mb:
        s.big_mb = args.size_mb
    if args.write_mb:
        s.write_mb = args.write_mb
    return s


# -- the metrics --------------------------------------------------------------------------
@dataclass
class Metric:
    key: str
    workload: str
    label: str
    unit: str
    higher_better: bool | None  # None: a count, no "better"
    fmt: str = "{:.3g}"


def metric_list(s: Sizes) -> list[Metric]:
    return [
        Metric("paramiko", "paramiko", f"paramiko alone (one connection, TCP_NODELAY): SFTPFile+prefetch read {s.big_mb} MiB", "MiB/s", True),
        Metric("read_cold", "seqread", f"seq read {s.big_mb} MiB, cold (fresh mount, empty cache)", "MiB/s", True),
        Metric("read_dropped", "seqread", "seq read, again after drop_caches", "MiB/s", True),
        Metric("read_warm", "seqread", "seq read, warm (2nd read)", "MiB/s", True),
        Metric("read_compacted", "seqread", "  again after drop_caches + compact_memory (diagnostic)", "MiB/s", True),
        Metric("write", "seqwrite", f"seq write {s.write_mb} MiB + fsync", "MiB/s", True),
        Metric("write_lag", "seqwrite", "  until server has full content (after close)", "s", False),
        Metric("tree_cold", "tree", f"find+stat {s.small_files} files, cold", "s", False),
        Metric("tree_warm", "tree", f"find+stat {s.small_files} files, warm", "s", False),
        Metric("small_cold", "smallread", f"read {s.small_files} x 4 KiB files, cold", "files/s", True),
        Metric("small_warm", "smallread", f"read {s.small_files} x 4 KiB files, warm", "files/s", True),
        Metric("create", "create", f"create {s.create_files} x 4 KiB files", "files/s", True),
        Metric("create_lag", "create", "  until server has them all (after last close)", "s", False),
        Metric("git", "git", f"git init+copy {s.src_files} files+add+commit+status", "s", False),
        Metric("git_lag", "git", "  until server has the same repo files (after status)", "s", False),
        Metric("stat", "statloop", "os.stat one file, warm", "µs/call", False),
        Metric("offline_create", "offline", f"offline: create {s.offline_files} x 4 KiB files", "files/s", True),
        Metric("offline_pending", "offline", "offline: journal 'pending' before sync", "ops", None, "{:.0f}"),
        Metric("offline_sync", "offline", "offline: 'sync' write after 'online' (replay)", "s", False),
        Metric("offline_total", "offline", "offline: 'online' .. sync done", "s", False),
        Metric("offline_ops", "offline", "offline: replay rate (pending / online..done)", "ops/s", True),
        Metric("rss_list", "rss", f"list+lstat {s.many_files}-file tree, cold", "s", False),
        Metric("rss_peak", "rss", "  peak RSS of the mount process (VmHWM)", "MiB", False),
        Metric("cache_per_file", "rss", "  cache dir size (du) / files listed", "bytes", False, "{:.0f}"),
    ]


# -- the benchmark ------------------------------------------------------------------------
@dataclass
class Bench:
    args: argparse.Namespace
    sizes: Sizes
    workdir: Path
    server: SshServer
    peers: list[str]
    endpoint: Endpoint
    rclone_conf: Path | None = None
    cachefs_options: list[str] = field(default_factory=list)
    live_mounts: list[Mount] = field(default_factory=list)
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    deadline: float = 0.0
    counter: int = 0
    big_sha: str = ""
    small_files: list[str] = field(default_factory=list)
    write_data: bytes = b""

    # -- bookkeeping ------------------------------------------------------------------
    def add(self, key: str, peer: str, value: float) -> None:
        self.samples.setdefault(key, {}).setdefault(peer, []).append(value)

    def error(self, key: str, peer: str, msg: str) -> None:
        self.errors.setdefault(key, {}).setdefault(peer, []).append(msg)

    def tag(self, peer: str, workload: str) -> str:
        self.counter += 1
        return f"{self.counter:03d}-{peer}-{workload}"

    def new_mount(self, peer: str, tag: str, again: Mount | None = None) -> Mount:
        """A mount of ``peer`` (bench/protocols.py mounts its peers its own way)."""
        return Mount(self, peer, tag, again)

    def table_peers(self) -> list[str]:
        """The table's columns, in order."""
        return [p for p in PEERS if p in self.peers]

    def push(self, m: Mount) -> float:
        """Called after a write workload's last change, before waiting for the server to
        have it; returns the seconds it took (counted in the lag). Nothing here, where
        write-back is measured as it comes (bench/protocols.py asks cachefs to sync)."""
        return 0.0

    def scratch(self, tag: str) -> str:
        """A per-measurement folder name under w/ in the share (relative)."""
        return f"w/{tag}"

    # -- the share --------------------------------------------------------------------
    def fill_share(self, workloads: list[str]) -> None:
        s = self.sizes
        share = self.server.share
        t0 = time.perf_counter()
        rnd = random.Random(1234)
        if {"paramiko", "seqread"} & set(workloads):
            h = hashlib.sha256()
            with open(share / "big.bin", "wb") as f:
                for _ in range(s.big_mb):
                    chunk = os.urandom(BLOCK)
                    h.update(chunk)
                    f.write(chunk)
            self.big_sha = h.hexdigest()
        if {"tree", "smallread", "statloop"} & set(workloads):
            per_dir = max(1, s.small_files // 100)
            for d in range(100):
                dd = share / "small" / f"d{d:02d}"
                dd.mkdir(parents=True)
                for i in range(per_dir):
                    (dd / f"f{i:04d}").write_bytes(os.urandom(4096))
                    self.small_files.append(f"small/d{d:02d}/f{i:04d}")
        if "git" in workloads:
            words = ("alpha beta gamma delta cache journal remote node replay conflict pin "
                     "offline online sync fetch range inode lookup readdir").split()
            src = self.workdir / "src"
            n = 0
            top = max(1, round(s.src_files ** (1 / 3)))
            while n < s.src_files:
                a, b_, c = n // (top * top), (n // top) % top, n % top
                p = src / f"pkg{a}" / f"mod{b_}" / f"file{c}.py"
                p.parent.mkdir(parents=True, exist_ok=True)
                lines = [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12)))
                         for _ in range(rnd.randint(5, 80))]
                p.write_text("# " + "\n# ".join(lines) + "\n")
                n += 1
            shutil.copytree(src, share / "src")
        if "rss" in workloads:
            per_dir = max(1, s.many_files // 100)
            for d in range(100):
                dd = share / "many" / f"d{d:02d}"
                dd.mkdir(parents=True)
                for i in range(per_dir):
                    with open(dd / f"f{i:05d}", "wb") as f:
                        f.write(b"x")
        (share / "w").mkdir(exist_ok=True)
        os.sync()
        log(f"share filled in {time.perf_counter() - t0:.1f} s ({du_bytes(share) / MiB:.0f} MiB)")

    # -- running ----------------------------------------------------------------------
    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def measure(self, workload: str, peer: str, rep: int, fn: Callable[[Mount], dict[str, float]],
                guard: float, keys: list[str]) -> None:
        if self.time_left() <= 0:
            for k in keys:
                self.error(k, peer, "skipped: --max-minutes budget used up")
            return
        tag = self.tag(peer, workload)
        mount = self.new_mount(peer, tag)
        t0 = time.perf_counter()
        dog = Watchdog(mount if peer != "share" else None, guard, f"{workload}/{peer}")
        try:
            with mount:
                with dog:
                    result = fn(mount)
            for k, v in result.items():
                self.add(k, peer, v)
            shown = ", ".join(f"{k}={v:.4g}" for k, v in result.items())
            log(f"  {workload:9s} {peer:8s} rep {rep + 1}: {shown}  ({time.perf_counter() - t0:.1f} s)")
        except Skip:
            pass
        except Exception as exc:  # noqa: BLE001
            msg = f"{type(exc).__name__}: {exc}"
            if dog.fired:
                msg = f"timed out after {guard:.0f} s (watchdog killed the mount): {msg}"
            if mount.proc is not None and mount.proc.poll() is not None and peer != "share":
                msg += f" [mount process exited {mount.proc.returncode}; log: {mount.log_tail()}]"
            msg = msg[:1500]
            log(f"  {workload:9s} {peer:8s} rep {rep + 1}: ERROR {msg}")
            if self.args.verbose:
                traceback.print_exc()
            for k in keys:
                self.error(k, peer, msg)
        finally:
            # Scratch folders stay until the work folder goes at the end: on an ext4 without
            # a journal (this project's VM) the allocator skips inodes freed in the last
            # minutes, so deleting one measurement's files made the next one's creates pay.
            if peer != "share" and mount.log_path.exists():
                text = mount.log_path.read_text(errors="replace")
                if "Traceback" in text or " ERROR " in text:
                    first = next((ln for ln in text.splitlines() if "Traceback" in ln or " ERROR " in ln), "")
                    self.notes.append(f"{tag}: the {peer} log has errors, e.g. `{first.strip()[:200]}` "
                                      f"(see {mount.log_path})")

    def run_workload(self, name: str) -> None:
        s = self.sizes
        fn, guard, keys, peers = {
            "seqread": (self.w_seqread, 120 + s.big_mb, ["read_cold", "read_dropped", "read_warm", "read_compacted"], self.peers),
            "seqwrite": (self.w_seqwrite, 300 + 2 * s.write_mb, ["write", "write_lag"], self.peers),
            "tree": (self.w_tree, 120 + 0.1 * s.small_files, ["tree_cold", "tree_warm"], self.peers),
            "smallread": (self.w_smallread, 120 + 0.1 * s.small_files, ["small_cold", "small_warm"], self.peers),
            "create": (self.w_create, 180 + 0.2 * s.create_files, ["create", "create_lag"], self.peers),
            "git": (self.w_git, 600, ["git", "git_lag"], self.peers),
            "statloop": (self.w_statloop, 120, ["stat"], self.peers),
            "offline": (self.w_offline, 300 + 0.3 * s.offline_files,
                        ["offline_create", "offline_pending", "offline_sync", "offline_total", "offline_ops"],
                        [p for p in self.peers if p == "cachefs"]),
            "rss": (self.w_rss, 120 + 0.01 * s.many_files, ["rss_list", "rss_peak", "cache_per_file"],
                    [p for p in self.peers if p != "share"]),
        }[name]
        log(f"workload {name} (watchdog {guard:.0f} s per measurement)")
        for rep in range(self.args.repeats):
            for peer in peers:
                self.measure(name, peer, rep, fn, guard, keys)

    # -- workloads --------------------------------------------------------------------
    def w_paramiko(self) -> None:
        import paramiko
        log("workload paramiko (reference)")
        srv = self.server
        for rep in range(self.args.repeats):
            if self.time_left() <= 0:
                self.error("paramiko", "cachefs", "skipped: --max-minutes budget used up")
                return
            client = paramiko.SSHClient()
            try:
                client.load_host_keys(str(srv.known_hosts))
                client.set_missing_host_key_policy(paramiko.RejectPolicy())
                client.connect(srv.host, port=srv.port, username=srv.user, key_filename=str(srv.identity),
                               look_for_keys=False, allow_agent=False, timeout=10)
                # as cachefs does: without it Nagle holds back the pipelined READ requests
                client.get_transport().sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sftp = client.open_sftp()
                sftp.get_channel().settimeout(60)
                drop_caches()
                size = sftp.stat(str(srv.share / "big.bin")).st_size
                t0 = time.perf_counter()
                total = 0
                with sftp.open(str(srv.share / "big.bin"), "rb") as f:
                    f.prefetch(size)
                    while True:
                        data = f.read(BLOCK)
                        if not data:
                            break
                        total += len(data)
                dt = time.perf_counter() - t0
                if total != size:
                    raise RuntimeError(f"read {total} bytes of {size}")
                v = total / MiB / dt
                self.add("paramiko", "cachefs", v)
                log(f"  paramiko rep {rep + 1}: {v:.1f} MB/s")
            except Exception as exc:  # noqa: BLE001
                log(f"  paramiko rep {rep + 1}: ERROR {type(exc).__name__}: {exc}")
                self.error("paramiko", "cachefs", f"{type(exc).__name__}: {exc}")
            finally:
                client.close()

    def w_seqread(self, m: Mount) -> dict[str, float]:
        path = m.path / "big.bin"
        buf = bytearray(BLOCK)
        size = self.sizes.big_mb * MiB
        out = {}
        drop_caches()
        for key in ("read_cold", "read_dropped", "read_warm", "read_compacted"):
            if key in ("read_dropped", "read_compacted"):
                drop_caches()
            if key == "read_compacted":
                compact_memory()
            t0 = time.perf_counter()
            n = read_whole(path, buf)
            dt = time.perf_counter() - t0
            if n != size:
                raise RuntimeError(f"{key}: read {n} bytes, expected {size}")
            out[key] = n / MiB / dt
        if not getattr(self, f"_verified_big_{m.peer}", False):  # once per peer, untimed
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(8 * MiB):
                    h.update(chunk)
            if h.hexdigest() != self.big_sha:
                raise RuntimeError("content of big.bin read through the mount differs from the share")
            setattr(self, f"_verified_big_{m.peer}", True)
        return out

    def w_seqwrite(self, m: Mount) -> dict[str, float]:
        rel = self.scratch(m.tag)
        (m.path / rel).mkdir(parents=True)
        n = self.sizes.write_mb
        data = self.write_data
        target = m.path / rel / "out.bin"
        t0 = time.perf_counter()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            mv = memoryview(data)
            for i in range(n):
                off = i * BLOCK
                done = 0
                while done < BLOCK:
                    done += os.write(fd, mv[off + done: off + BLOCK])
            os.fsync(fd)
        finally:
            os.close(fd)
        dt = time.perf_counter() - t0
        server_file = self.server.share / rel / "out.bin"

        def complete() -> bool:
            if server_file.stat().st_size != len(data):
                return False
            with open(server_file, "rb") as f:
                off = 0
                while chunk := f.read(8 * MiB):
                    if chunk != data[off: off + len(chunk)]:
                        return False
                    off += len(chunk)
            return off == len(data)

        lag = poll_until(complete, timeout=120, interval=0.1)
        out = {"write": n / dt}
        if lag is None:
            sz = server_file.stat().st_size if server_file.exists() else "missing"
            self.error("write_lag", m.peer, f"server copy incomplete 120 s after close (size {sz})")
        else:
            out["write_lag"] = lag
        return out

    def w_tree(self, m: Mount) -> dict[str, float]:
        drop_caches()
        out = {}
        expected = len(self.small_files) + 100
        for key in ("tree_cold", "tree_warm"):
            t0 = time.perf_counter()
            n = walk(m.path / "small")
            out[key] = time.perf_counter() - t0
            if n != expected:
                raise RuntimeError(f"{key}: found {n} entries, expected {expected}")
        return out

    def w_smallread(self, m: Mount) -> dict[str, float]:
        drop_caches()
        buf = bytearray(65536)
        out = {}
        for key in ("small_cold", "small_warm"):
            t0 = time.perf_counter()
            count = 0
            root = m.path / "small"
            for d in sorted(os.listdir(root)):
                for name in os.listdir(root / d):
                    if read_whole(root / d / name, buf) != 4096:
                        raise RuntimeError(f"{key}: {d}/{name} is not 4096 bytes")
                    count += 1
            out[key] = count / (time.perf_counter() - t0)
            if count != len(self.small_files):
                raise RuntimeError(f"{key}: read {count} files, expected {len(self.small_files)}")
        if not getattr(self, f"_verified_small_{m.peer}", False):
            share = self.server.share
            for rel in self.small_files[:: max(1, len(self.small_files) // 500)]:
                if (m.path / rel).read_bytes() != (share / rel).read_bytes():
                    raise RuntimeError(f"content of {rel} through the mount differs from the share")
            setattr(self, f"_verified_small_{m.peer}", True)
        return out

    def w_create(self, m: Mount) -> dict[str, float]:
        rel = self.scratch(m.tag)
        n = self.sizes.create_files
        ndirs = 20
        payload = os.urandom(4096)
        base = m.path / rel
        base.mkdir(parents=True)
        t0 = time.perf_counter()
        for d in range(ndirs):
            (base / f"d{d:02d}").mkdir()
        for i in range(n):
            with open(base / f"d{i % ndirs:02d}" / f"f{i:05d}", "wb") as f:
                f.write(payload)
        dt = time.perf_counter() - t0
        pushed = self.push(m)
        server = self.server.share / rel
        seen: set[str] = set()

        def complete() -> bool:
            for d in range(ndirs):
                with os.scandir(server / f"d{d:02d}") as it:
                    for e in it:
                        if e.name.startswith("f") and e.name not in seen and e.stat().st_size == 4096:
                            seen.add(e.name)
            return len(seen) >= n

        lag = poll_until(complete, timeout=120, interval=0.1)
        out = {"create": n / dt}
        if lag is None:
            self.error("create_lag", m.peer, f"server had {len(seen)}/{n} files 120 s after the last close")
        else:
            out["create_lag"] = pushed + lag
        return out

    def w_git(self, m: Mount) -> dict[str, float]:
        rel = self.scratch(m.tag)
        repo = m.path / rel / "repo"
        repo.mkdir(parents=True)
        env = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.invalid",
                   GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.invalid",
                   GIT_CONFIG_NOSYSTEM="1", HOME=str(self.workdir), GIT_TERMINAL_PROMPT="0")

        def git(*a: str) -> str:
            r = subprocess.run(["git", *a], cwd=repo, env=env, capture_output=True, text=True,
                               timeout=300, stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                raise RuntimeError(f"git {' '.join(a)} failed ({r.returncode}): {r.stderr.strip()[:400]}")
            return r.stdout

        t0 = time.perf_counter()
        git("init", "-q")
        shutil.copytree(self.workdir / "src", repo / "src")
        git("add", "-A")
        git("commit", "-q", "-m", "x")
        status = git("status", "--porcelain")
        dt = time.perf_counter() - t0
        if status.strip():
            raise RuntimeError(f"git status not clean after commit: {status[:300]}")
        out = {"git": dt}
        # Write-back peers report success before the server has the repository: measure
        # how long until the share holds the same files with the same sizes.
        manifest = self._manifest(repo)
        if m.peer == "cachefs":
            pending = read_status(m.path).get("pending")
            log(f"    cachefs 'pending' right after git status: {pending}")
        pushed = self.push(m)
        server = self.server.share / rel / "repo"
        lag = poll_until(lambda: self._manifest(server) == manifest, timeout=180, interval=0.2)
        if lag is None:
            have = self._manifest(server)
            missing = sum(1 for k, v in manifest.items() if have.get(k) != v)
            self.error("git_lag", m.peer, f"server copy still differs 180 s after git: "
                                          f"{missing}/{len(manifest)} files missing or different")
        else:
            out["git_lag"] = pushed + lag
        return out

    @staticmethod
    def _manifest(root: Path) -> dict[str, int]:
        found: dict[str, int] = {}
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                p = os.path.join(dirpath, name)
                try:
                    found[os.path.relpath(p, root)] = os.lstat(p).st_size
                except OSError:
                    pass
        return found

    def w_statloop(self, m: Mount) -> dict[str, float]:
        path = str(m.path / self.small_files[0])
        os.stat(path)
        os.stat(path)
        n = self.sizes.stat_calls
        st = os.stat
        t0 = time.perf_counter()
        for _ in range(n):
            st(path)
        return {"stat": (time.perf_counter() - t0) / n * 1e6}

    def w_offline(self, m: Mount) -> dict[str, float]:
        rel = self.scratch(m.tag)
        base = m.path / rel / "off"
        base.mkdir(parents=True)
        write_control(m.path, "sync")  # the folder reaches the server first
        write_control(m.path, "offline")
        n = self.sizes.offline_files
        payload = os.urandom(4096)
        t0 = time.perf_counter()
        for i in range(n):
            with open(base / f"f{i:05d}", "wb") as f:
                f.write(payload)
        dt_create = time.perf_counter() - t0
        status = read_status(m.path)
        pending = float(status.get("pending") or 0)
        if status.get("state") not in ("offline",):
            self.notes.append(f"{m.tag}: status state after 'offline' was {status.get('state')!r}")
        t1 = time.perf_counter()
        write_control(m.path, "online")
        t2 = time.perf_counter()
        write_control(m.path, "sync")
        t3 = time.perf_counter()
        after = read_status(m.path)
        server = self.server.share / rel / "off"
        names = {e.name for e in os.scandir(server) if e.stat().st_size == 4096} if server.exists() else set()
        if len(names) != n:
            late = poll_until(lambda: len([e for e in os.scandir(server) if e.stat().st_size == 4096]) >= n, 60)
            raise RuntimeError(f"after 'sync' returned the server had {len(names)}/{n} files "
                               f"(pending now {after.get('pending')}, last_error {after.get('last_error')!r}); "
                               + (f"complete {late:.1f} s later" if late is not None else "still incomplete 60 s later"))
        if after.get("pending"):
            self.notes.append(f"{m.tag}: 'pending' was {after.get('pending')} right after 'sync' returned")
        total = t3 - t1
        return {"offline_create": n / dt_create, "offline_pending": pending, "offline_sync": t3 - t2,
                "offline_total": total, "offline_ops": (pending or n) / total}

    def w_rss(self, m: Mount) -> dict[str, float]:
        drop_caches()
        t0 = time.perf_counter()
        n = walk(m.path / "many")
        dt = time.perf_counter() - t0
        expected = (self.sizes.many_files // 100) * 100 + 100
        if n != expected:
            raise RuntimeError(f"listed {n} entries, expected {expected}")
        time.sleep(0.5)
        out = {"rss_list": dt}
        pids = [m.pid] + descendants(m.pid) if m.pid else []
        hwm = proc_status(pids[0], "VmHWM") if pids else None
        if hwm:
            out["rss_peak"] = hwm / MiB
        if m.peer.startswith("cachefs") and m.cache_dir is not None:
            out["cache_per_file"] = du_bytes(m.cache_dir) / n
        return out


# -- reporting ----------------------------------------------------------------------------
def fmt(metric: Metric, v: float | None) -> str:
    if v is None:
        return "—"
    if metric.unit in ("MiB/s", "files/s", "ops/s") and v >= 100:
        return f"{v:,.0f}"
    if metric.unit == "µs/call":
        return f"{v:.1f}"
    if metric.unit == "s" and v < 0.001:
        return "<0.001"
    return metric.fmt.format(v)


def build_tables(b: Bench, metrics: list[Metric]) -> tuple[str, str, str]:
    peers = b.table_peers()
    others = [p for p in peers if p != "cachefs"]
    head = ["workload", "unit"] + peers + [f"cachefs/{p}" for p in others]
    rows = [head, ["---"] * 2 + ["---:"] * (len(head) - 2)]
    ref = []
    errs = []
    for mt in metrics:
        per = b.samples.get(mt.key, {})
        if not per and not b.errors.get(mt.key):
            continue
        if mt.key == "paramiko":
            if "cachefs" in per:
                vals = per["cachefs"]
                ref.append(f"- {mt.label}: **{fmt(mt, statistics.median(vals))} MiB/s** "
                           f"(median of {len(vals)}; {', '.join(fmt(mt, v) for v in vals)})")
                cold = b.samples.get("read_cold", {}).get("cachefs")
                if cold:
                    ref.append(f"- cachefs cold seq read / paramiko alone: "
                               f"{statistics.median(cold) / statistics.median(vals):.2f}")
            continue
        unit = mt.unit + (" ↑" if mt.higher_better else " ↓" if mt.higher_better is False else "")
        med = {p: statistics.median(per[p]) for p in peers if per.get(p)}
        cells = [mt.label, unit]
        for p in peers:
            cell = fmt(mt, med.get(p))
            if p not in med and b.errors.get(mt.key, {}).get(p):
                cell = "error"
            elif p in med and len(per[p]) < b.args.repeats:
                cell += f" ({len(per[p])}/{b.args.repeats})"
            cells.append(cell)
        for p in others:
            c, o = med.get("cachefs"), med.get(p)
            ok = c is not None and o is not None and o > 1e-3 and mt.higher_better is not None
            cells.append(f"{c / o:.2f}" if ok else "")
        rows.append(cells)
    table = "\n".join("| " + " | ".join(r) + " |" for r in rows)
    for key, per in b.errors.items():
        for p, msgs in per.items():
            uniq = list(dict.fromkeys(msgs))
            errs.append(f"- `{key}` / {p} ({len(msgs)}×): " + " ‖ ".join(u.replace("|", "\\|") for u in uniq[:2]))
    return table, "\n".join(ref), "\n".join(errs)


def raw_samples(b: Bench) -> str:
    out = []
    for key, per in b.samples.items():
        for p, vals in per.items():
            out.append(f"{key:16s} {p:8s} " + " ".join(f"{v:.4g}" for v in vals))
    return "\n".join(out)


def chart(b: Bench, metrics: list[Metric], path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable in this environment: no chart was drawn."
    try:
        peers = [p for p in ("sshfs", "rclone", "share", "pyfuse3") if p in b.peers]
        chosen = [mt for mt in metrics if mt.higher_better is not None and mt.key in b.samples
                  and "cachefs" in b.samples[mt.key] and mt.key != "paramiko"
                  and not mt.key.startswith("offline") and mt.key != "cache_per_file"]
        labels = [mt.key for mt in chosen]
        fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.9), 4.5))
        width = 0.8 / max(1, len(peers))
        for j, p in enumerate(peers):
            vals = []
            for mt in chosen:
                c = statistics.median(b.samples[mt.key]["cachefs"])
                o = b.samples[mt.key].get(p)
                if not o or statistics.median(o) <= 1e-3:  # as the table: no ratio to ~0
                    vals.append(0)
                    continue
                o = statistics.median(o)
                vals.append((c / o if mt.higher_better else o / c) if c and o else 0)
            ax.bar([i + j * width for i in range(len(labels))], vals, width, label=f"vs {p}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks([i + width * (len(peers) - 1) / 2 for i in range(len(labels))])
        ax.set_xticklabels(labels, rotation=35, ha="right")
        ax.set_ylabel("cachefs speed relative to peer (>1: cachefs faster)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return f"Chart: `{path.relative_to(REPO)}` (log scale; >1 means cachefs is faster)."
    except Exception as exc:  # noqa: BLE001
        return f"chart failed: {type(exc).__name__}: {exc}"


def write_report(b: Bench, metrics: list[Metric], started: float, path: Path) -> str:
    table, ref, errs = build_tables(b, metrics)
    exe = sys.executable
    try:
        exe = os.path.relpath(exe, REPO) if Path(exe).is_relative_to(REPO) else exe
    except ValueError:
        pass
    command = shlex.join([exe, "bench/run.py", *sys.argv[1:]])
    s = b.sizes
    chart_note = chart(b, metrics, path.with_suffix(".png")) if not b.args.no_docs else ""
    notes = "\n".join(f"- {n}" for n in dict.fromkeys(b.notes))
    text = f"""# cachefs performance

Produced by `{command}` (README: `scripts/run bench`) on {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}
in {(time.monotonic() - started) / 60:.1f} min.
Machine: {machine_line()}. A shared, noisy machine: treat differences under ~20 % as noise.
Peers: {versions()}.
The targets of issue 6, where each stands and what bounds it: [performance-targets.md](performance-targets.md)
(`bench/fuse_floor.py` measures a do-nothing pyfuse3 filesystem, the floor under the
figures counted in FUSE requests).

## Method
- One private OpenSSH `sshd` on 127.0.0.1 (`devtools.devserver.SshServer`) serves a share in a
  temporary folder: `big.bin` ({s.big_mb} MiB random), {s.small_files} files of 4 KiB in 100
  folders, a {s.src_files}-file source tree and a {s.many_files}-file tree of 1-byte files.
- Every measurement mounts its peer afresh (cachefs: `mount.py sftp://… --foreground` with an
  empty `--cache-dir`; sshfs `-f`; `rclone mount --vfs-cache-mode full` with an empty cache;
  `share` is the directory itself, the physical limit; `pyfuse3` is
  `bench/passthrough.py`, a filesystem on the same pyfuse3 + trio as cachefs, mounted with
  the same options, timeouts and request spin, that passes each request to the share folder: no network,
  no cache, what the FUSE requests alone cost a Python filesystem here) and unmounts it
  (`fusermount3 -u -z`).
  "Cold" also drops the kernel page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`).
  Each measurement writes in a folder of its own, removed only with the whole work folder at
  the end: on an ext4 without a journal (this project's VM) the inode allocator skips inodes
  freed in the last minutes, so a clean-up made the next measurement's file creates slower.
- Each figure is the median of {b.args.repeats} runs (peers interleaved per run); a figure
  with fewer good runs shows `(good/total)`. Ratios are cachefs/peer of the medians: for ↑
  figures >1 means cachefs is faster, for ↓ figures (times) <1 means cachefs is faster.
- seq read: 1 MiB `read()`s; cold = fresh mount and empty cache; "after drop_caches" = the
  same mount after dropping the page cache (cachefs serves it from its own cache, rclone from
  its VFS cache, sshfs fetches again); warm = the next read (page cache). The diagnostic
  row drops the page cache again and compacts free memory first: the first read from a
  local disk after the drop that follows a cold read is slow here whatever the file, the
  share's own included, and after compaction it is not (docs/performance-targets.md).
- seq write: 1 MiB `write()`s + `fsync` + `close`; the lag is polled on the share (full size
  and identical bytes), from `close()`. create: {s.create_files} files in 20 new folders,
  then the same lag poll. git: `git init`, copy the tree in, `add -A`, `commit`, `status`,
  then how long until the share holds the same files with the same sizes.
- offline (cachefs only): `offline` to `.cachefs/control`, create the files, read `pending`
  from `.cachefs/status`, then time `online` + `sync` (the `sync` write returns when replay is over).
- rss: list+lstat the big tree on a fresh mount, then VmHWM of the mount process and `du` of
  the cache directory divided by the entries listed.

## Results

{table}

Reference (cold reads through cachefs are bounded by it):
{ref or '- (not measured)'}

{chart_note}

## Errors
{errs or '- none'}

## Notes from the run
{notes or '- none'}

<details><summary>raw samples</summary>

```
{raw_samples(b)}
```
</details>
"""
    if not b.args.no_docs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


# -- main ---------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (64 MiB file, 1,000 files)")
    p.add_argument("--only", nargs="+", metavar="NAMES",
                   help=f"workloads to run (comma or space separated): {' '.join(WORKLOADS)}")
    p.add_argument("--peers", default=",".join(PEERS), help="comma separated (default: all)")
    p.add_argument("--size-mb", type=int, help="size of the big file (default 512, quick 64)")
    p.add_argument("--write-mb", type=int, help="size of the sequential write (default 256, quick 32)")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure (default 3)")
    p.add_argument("--max-minutes", type=float, default=50.0,
                   help="skip what is left after this long (default 50)")
    p.add_argument("--output", type=Path, default=REPO / "docs" / "performance.md")
    p.add_argument("--no-docs", action="store_true", help="print only; write no docs/performance.*")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, caches)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    names = [n for item in (args.only or []) for n in item.split(",") if n]
    bad = [n for n in names if n not in WORKLOADS]
    if bad:
        p.error(f"unknown workload(s): {', '.join(bad)}; known: {', '.join(WORKLOADS)}")
    args.workloads = [w for w in WORKLOADS if not names or w in names]
    args.peer_list = [x for x in args.peers.split(",") if x]
    if any(x not in PEERS for x in args.peer_list):
        p.error(f"peers are {', '.join(PEERS)}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    started = time.monotonic()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    sizes = sizes_for(args)
    metrics = metric_list(sizes)
    workdir = Path(tempfile.mkdtemp(prefix="cachefs-bench-"))
    os.chmod(workdir, 0o755)
    log(f"work folder {workdir}")
    server = SshServer(workdir / "sshd")
    bench = Bench(args, sizes, workdir, server, [], Endpoint.of(server),
                  deadline=started + args.max_minutes * 60)
    peers = []
    for p in args.peer_list:
        if p in ("sshfs", "rclone") and shutil.which(p) is None:
            bench.notes.append(f"{p} is not installed: skipped")
            log(f"{p} not installed: skipped")
            continue
        peers.append(p)
    bench.peers = peers
    if "cachefs" not in peers:
        log("note: cachefs is not among the peers; ratios will be empty")
    rc = 0
    try:
        server.start()
        log(f"sshd on {server.host}:{server.port}, share {server.share}")
        if "rclone" in peers:
            bench.rclone_conf = write_rclone_conf(workdir / "rclone.conf", bench.endpoint)
        bench.fill_share(args.workloads)
        if "seqwrite" in args.workloads:
            bench.write_data = os.urandom(sizes.write_mb * MiB)
        for w in args.workloads:
            try:
                if w == "paramiko":
                    bench.w_paramiko()
                else:
                    bench.run_workload(w)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - never abort the whole run
                log(f"workload {w} failed: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                bench.notes.append(f"workload {w} failed as a whole: {type(exc).__name__}: {exc}")
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}): reporting what was measured")
        bench.notes.append("the run was interrupted; figures are partial")
        rc = 130
    finally:
        for m in list(bench.live_mounts):
            try:
                m.stop()
            except Exception as exc:  # noqa: BLE001
                log(f"stopping {m.tag} failed: {exc}")
        server.stop()
    args.output = args.output.resolve()
    text = write_report(bench, metrics, started, args.output)
    table, ref, errs = build_tables(bench, metrics)
    print()
    print(table)
    print()
    print("Reference:\n" + (ref or "- (not measured)"))
    if errs:
        print("\nErrors:\n" + errs)
    if bench.notes:
        print("\nNotes:\n" + "\n".join(f"- {n}" for n in dict.fromkeys(bench.notes)))
    if not args.no_docs:
        print(f"\nwritten to {args.output}")
    if args.keep:
        log(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    del text
    return rc


if __name__ == "__main__":
    sys.exit(main())
