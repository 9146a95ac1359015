"""The floor under every cachefs figure that is counted in FUSE requests.

A filesystem that does nothing but answer, written with the same pyfuse3 + trio and mounted
with the same options as cachefs (default_permissions, keep_cache, the state xattr's
getxattr, flush answered ENOSYS), runs the request-bound workloads of bench/run.py:

- one getattr round trip (``os.stat`` with attributes never cached), in microseconds;
- creating 2,000 files of 4 KiB (lookup, create, getxattr, write, release, and the
  parent's getattr that default_permissions needs after each change);
- opening, reading and closing 10,000 small files whose pages the kernel keeps
  (open and release each cross into the daemon).

No cache, no index, no network: nothing cachefs could do in its handlers goes faster.
Below that is the machine itself: a 64-byte ping-pong over a socket pair between two
processes, with no FUSE at all, printed first; a FUSE request from a program that waits
for each reply wakes two processes in the same way.

The same filesystem runs a second way, "bare": without default_permissions and with
getxattr answered ENOSYS (the kernel then never asks again). That is what two
requirements of cachefs cost (the issues ask for default_permissions on, and for the
``user.cachefs.state`` xattr): two of the six requests of a create. The two ways take
turns, ``--rounds`` times each, and the medians are printed. Both read on for the next
request as cachefs does (``--request-spin``, 50 us by default; 0 sleeps at once).

    .venv/bin/python bench/fuse_floor.py [--files N] [--rounds N] [--request-spin US]
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import time

import pyfuse3
import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cachefs.mounts import DEFAULT_REQUEST_SPIN  # noqa: E402  (cachefs's --request-spin)

ROOT = pyfuse3.ROOT_INODE
DATA = os.urandom(4096)


class NullFs(pyfuse3.Operations):
    """Names live in a dict; content is never kept (reads return a fixed page)."""

    def __init__(self, small_files: int, bare: bool) -> None:
        super().__init__()
        self.bare = bare
        self.names: dict[bytes, int] = {b"f%05d" % i: 100 + i for i in range(small_files)}
        self.next_ino = 100 + small_files
        self.fh = 0

    def _attrs(self, ino: int, timeout: float) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = (stat.S_IFDIR | 0o755) if ino == ROOT else (stat.S_IFREG | 0o644)
        a.st_nlink = 2 if ino == ROOT else 1
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.st_size = 0 if ino in (ROOT, 2) else len(DATA)
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = 1_700_000_000 * 10**9
        a.attr_timeout = 0 if ino == 2 else timeout  # inode 2: the stat loop's file
        a.entry_timeout = timeout
        return a

    async def getattr(self, inode, ctx=None):
        return self._attrs(inode, 60)

    async def lookup(self, parent, name, ctx=None):
        if name == b"stat":
            return self._attrs(2, 60)
        ino = self.names.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(ino, 60)

    async def create(self, parent, name, mode, flags, ctx):
        self.names[name] = self.next_ino
        self.next_ino += 1
        self.fh += 1
        return pyfuse3.FileInfo(fh=self.fh, keep_cache=True), self._attrs(self.names[name], 60)

    async def open(self, inode, flags, ctx):
        self.fh += 1
        return pyfuse3.FileInfo(fh=self.fh, keep_cache=True)

    async def read(self, fh, off, size):
        return DATA[off:off + size]

    async def write(self, fh, off, buf):
        return len(buf)

    async def flush(self, fh):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh):
        pass

    async def getxattr(self, inode, name, ctx):
        # cachefs answers its state xattr, so the kernel keeps asking (security.capability
        # before each write); ENOSYS would make it stop for good.
        raise pyfuse3.FUSEError(errno.ENOSYS if self.bare else pyfuse3.ENOATTR)


def run_fs(operations: pyfuse3.Operations, mnt: str, options: set[str],
           spin: float = DEFAULT_REQUEST_SPIN) -> None:
    """Mount ``operations`` on ``mnt`` and answer until unmounted, reading on for the next
    request ``spin`` microseconds as cachefs does (the bench filesystems all run so)."""
    pyfuse3.init(operations, mnt, options)
    if hasattr(pyfuse3, "set_request_spin"):  # (scripts/build-passthrough's pyfuse3)
        pyfuse3.set_request_spin(spin)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


def serve(mnt: str, small_files: int, bare: bool, spin: float) -> None:
    options = {"fsname=nullfs"} | (set() if bare else set(pyfuse3.default_options))
    run_fs(NullFs(small_files, bare), mnt, options, spin)


def measure(mnt: str, files: int) -> dict[str, float]:
    out = {}
    n = 20000
    t = time.perf_counter()
    for _ in range(n):
        os.stat(os.path.join(mnt, "stat"))
    out["getattr round trip (os.stat, attributes not cached), us"] = (time.perf_counter() - t) / n * 1e6

    t = time.perf_counter()
    for i in range(2000):
        with open(os.path.join(mnt, "new%05d" % i), "wb") as f:
            f.write(DATA)
    out["create 2000 x 4 KiB files, files/s"] = 2000 / (time.perf_counter() - t)

    names = [os.path.join(mnt, "f%05d" % i) for i in range(files)]
    for rep in ("first", "warm"):
        t = time.perf_counter()
        for path in names:
            with open(path, "rb") as f:
                f.read()
        out[f"read {files} x 4 KiB files, {rep}, files/s"] = files / (time.perf_counter() - t)
    return out


def pingpong_us(n: int = 20000) -> float:
    """Microseconds per round trip of 64 bytes between this process and a child that
    answers each message (``select``, ``recv``, ``send``): two wake-ups, as a request."""
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            mine.close()
            for _ in range(n):
                select.select([theirs], [], [])
                theirs.send(theirs.recv(64))
        finally:
            os._exit(0)
    theirs.close()
    try:
        message = b"x" * 64
        t = time.perf_counter()
        for _ in range(n):
            mine.send(message)
            mine.recv(64)
        return (time.perf_counter() - t) / n * 1e6
    finally:
        mine.close()
        os.waitpid(pid, 0)


def one_mount(files: int, bare: bool, spin: float) -> dict[str, float]:
    mnt = tempfile.mkdtemp(prefix="fuse-floor-")
    pid = os.fork()
    if pid == 0:
        try:
            serve(mnt, files, bare, spin)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(mnt):
            if time.monotonic() > deadline:
                raise SystemExit("the null filesystem did not mount")
            time.sleep(0.05)
        return measure(mnt, files)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)
        os.waitpid(pid, 0)
        os.rmdir(mnt)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=10000, help="small files to read (default 10000)")
    p.add_argument("--rounds", type=int, default=3, help="mounts of each kind, taking turns (default 3)")
    p.add_argument("--request-spin", type=float, default=DEFAULT_REQUEST_SPIN, metavar="US",
                   help="microseconds the filesystem reads on for the next request before it "
                        "sleeps, as cachefs's --request-spin (default %(default)g; 0: sleep at once)")
    args = p.parse_args()
    print(f"pyfuse3 {getattr(pyfuse3, '__version__', '')}, {os.cpu_count()} CPUs; a filesystem "
          f"that does nothing, medians of {args.rounds} mounts of each kind; request spin "
          f"{args.request_spin:g} us" + ("" if hasattr(pyfuse3, "set_request_spin") else
                                         " asked, but this pyfuse3 cannot spin") + ":", flush=True)
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    pings = []
    for _ in range(args.rounds):
        pings.append(pingpong_us())
        for bare in (False, True):
            runs[bare].append(one_mount(args.files, bare, args.request_spin))
    print(f"process to process round trip (socket ping-pong, no FUSE): {statistics.median(pings):.1f} us "
          f"(median; {min(pings):.1f}-{max(pings):.1f})")
    print(f"{'':56s} {'as cachefs':>11s} {'bare':>11s} {'bare/as cachefs':>16s}")
    for key in runs[False][0]:
        mine = statistics.median(r[key] for r in runs[False])
        bare = statistics.median(r[key] for r in runs[True])
        print(f"{key:56s} {mine:11,.0f} {bare:11,.0f} {bare / mine:16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
