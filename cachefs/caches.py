"""The cache directories on this machine: where they go, what each holds, removing one.

Owns: the folder that holds the default caches ($XDG_CACHE_HOME/cachefs, or
~/.cache/cachefs), what ``cachefs caches`` tells of a cache (size on disk, remote, last
use, the process that holds it, changes not yet on the server, conflicts), removing a
cache that no mount uses, and removing what a mount that failed before it served made
(``discard_new``).
Must not touch: a cache a mount holds (its ``lock`` is flock()ed: ``index.Store``),
beyond reading its index read-only; the network; FUSE. An encrypted cache's remote is
never read (it is sealed with the cache key); its counts are.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class CacheError(Exception):
    """A cache cannot be removed; the message says why and what to do."""


def cache_base() -> Path:
    """The folder of the default caches: one folder per remote in it."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cachefs"


def looks_like_cache(path: Path) -> bool:
    """Whether ``path`` is a cachefs cache directory (a lock, an index or its mark):
    nothing else is ever removed."""
    return path.is_dir() and any((path / name).exists() for name in ("lock", "index", "index-made"))


def find(extra: Iterable[Path] = ()) -> list[Path]:
    """The caches in ``cache_base()``, and ``extra`` (those mounts use elsewhere)."""
    found: dict[Path, None] = {}
    base = cache_base()
    with contextlib.suppress(OSError):
        for entry in sorted(os.scandir(base), key=lambda e: e.name):
            path = base / entry.name
            if entry.is_dir(follow_symlinks=False) and looks_like_cache(path):
                found[path] = None
    for path in extra:
        if looks_like_cache(path):
            found[path] = None
    return list(found)


@dataclass
class CacheInfo:
    path: Path
    size: int  # bytes on disk (allocated blocks)
    remote: str | None  # None: encrypted, or not recorded (no index yet)
    encrypted: bool
    last_use: float | None  # the index's or the log's last change (epoch seconds)
    holder: int | None  # the process that holds the cache's lock (a mount), if any
    pending: int | None  # journal entries: changes not on the server yet
    conflicts: int | None
    problem: str | None = None  # why the index could not be read

    def as_json(self) -> dict[str, object]:
        return {"cache_dir": str(self.path), "size": self.size, "remote": self.remote,
                "encrypted": self.encrypted,
                "last_use": (time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.last_use))
                             if self.last_use else None),
                "pid": self.holder, "pending": self.pending, "conflicts": self.conflicts,
                "problem": self.problem}


def inspect(path: Path) -> CacheInfo:
    """What ``cachefs caches`` tells of the cache in ``path`` (read only)."""
    encrypted = (path / "crypt.json").exists()
    remote = pending = conflicts = None
    problem = None
    try:
        remote, pending, conflicts = _index_facts_apart(path, encrypted)
    except Exception as exc:  # noqa: BLE001 - a damaged index is told, never a traceback
        problem = f"its index does not open ({exc}); see 'cachefs recover'"
    times = []
    for name in ("index/data.mdb", "mount.log"):
        with contextlib.suppress(OSError):
            times.append((path / name).stat().st_mtime)
    return CacheInfo(path, disk_use(path), remote, encrypted, max(times, default=None),
                     holder(path), pending, conflicts, problem)


def disk_use(path: Path) -> int:
    """Bytes of disk the folder's files take (their allocated blocks, as ``du``)."""
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


def _index_facts_apart(path: Path, encrypted: bool) -> tuple[str | None, int | None, int | None]:
    """``_index_facts`` read in a child process: some damage makes LMDB abort the process
    that reads it (an assertion in its C code), which must not end the command."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: read, answer, never return
        try:
            os.close(read_fd)
            try:
                answer: object = list(_index_facts(path, encrypted))
            except Exception as exc:  # noqa: BLE001 - the answer
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write_fd, json.dumps(answer).encode()[:60000])
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            text = pipe.read().decode(errors="replace")
    finally:
        _pid, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        raise RuntimeError(f"LMDB stopped with signal {os.WTERMSIG(status)} while reading it")
    answer = json.loads(text) if text else {"error": "reading it failed"}
    if isinstance(answer, dict):
        raise RuntimeError(answer["error"])
    remote, pending, conflicts = answer
    return remote, pending, conflicts


def _index_facts(path: Path, encrypted: bool) -> tuple[str | None, int | None, int | None]:
    """(remote, journal entries, conflicts) from the index, opened read-only; Nones
    when the cache has no index yet."""
    if not (path / "index" / "data.mdb").exists():
        return None, None, None
    import lmdb

    from .store.crypto import PlainCodec, RecordError

    env = lmdb.open(str(path / "index"), readonly=True, max_dbs=12, subdir=True, create=False)
    try:
        with env.begin() as txn:
            names = {bytes(name) for name, _value in txn.cursor()}

            def count(name: bytes) -> int:
                if name not in names:
                    return 0
                return int(txn.stat(env.open_db(name, txn=txn, create=False))["entries"])

            remote = None
            if b"meta" in names and not encrypted:
                meta = env.open_db(b"meta", txn=txn, create=False)
                value = txn.get(b"remote", db=meta)
                if value is not None:
                    try:
                        raw = PlainCodec().open(value, b"remote")
                    except RecordError:
                        raw = bytes(value)  # schema 1: no check
                    remote = raw.decode(errors="replace")
            return remote, count(b"journal"), count(b"conflicts")
    finally:
        env.close()


def holder(path: Path) -> int | None:
    """The process that holds the cache's lock (its mount), from /proc/locks: looked up,
    never taken, so that a mount starting meanwhile is not refused."""
    try:
        st = os.stat(path / "lock")
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->" or fields[1] != "FLOCK":
            continue
        try:
            major, minor, inode = fields[5].split(":")
            if (int(inode) == st.st_ino and int(major, 16) == os.major(st.st_dev)
                    and int(minor, 16) == os.minor(st.st_dev)):
                return int(fields[4])
        except ValueError:
            continue
    return None


def _take_lock(path: Path) -> int | None:
    """The cache's lock, held (an fd to close), or None when a mount holds it."""
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _remove_locked(path: Path) -> None:
    """Take ``path`` away at once (renamed, so that a mount starting meanwhile makes a new
    cache rather than using one half removed), then delete it."""
    gone = path.with_name(f".{path.name}.removing-{os.getpid()}")
    os.rename(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def discard_new(path: Path) -> None:
    """Remove the cache a mount made and never served from (it failed first: unknown host
    key, no key, a refused FUSE mount...): 33 MiB of index allocated for nothing. Kept when
    a mount holds it, or it holds changes or conflicts (none can come before serving; the
    check makes sure)."""
    if not path.is_dir():
        return
    try:
        fd = _take_lock(path)
    except OSError as exc:
        log.warning("the new cache %s is left: %s", path, exc.strerror)
        return
    if fd is None:
        return
    try:
        try:
            _remote, pending, conflicts = _index_facts_apart(path, (path / "crypt.json").exists())
        except Exception as exc:  # noqa: BLE001 - keep what cannot be read
            log.warning("the new cache %s is left: its index does not open (%s)", path, exc)
            return
        if pending or conflicts:
            log.warning("the new cache %s is left: it holds changes", path)
            return
        _remove_locked(path)
        log.info("removed the new cache %s (the mount failed before it served)", path)
    except OSError as exc:
        log.warning("the new cache %s is left: %s", path, exc.strerror)
    finally:
        os.close(fd)


def remove(path: Path, force: bool = False) -> CacheInfo:
    """Remove the cache in ``path``; refused (``CacheError``) when a mount holds it (even
    with ``force``: unmount first), and without ``force`` when it holds changes not yet on
    the server or conflicts, or its index cannot be read (what would be lost is said)."""
    if not looks_like_cache(path):
        raise CacheError(f"{path} is not a cachefs cache directory")
    fd = _take_lock(path)
    if fd is None:
        raise CacheError(f"{path} is in use by the mount of process {holder(path) or '?'}: "
                         "unmount it first")
    try:
        info = inspect(path)  # again, now that no mount can start on it
        if not force:
            lost = what_would_be_lost(info)
            if lost:
                raise CacheError(f"{path} {lost}: removing it loses them; mount it and run "
                                 f"'cachefs sync', or save them with 'cachefs recover {path}'; "
                                 "--force removes it anyway")
            if info.problem:
                raise CacheError(f"{path}: {info.problem}; --force removes it anyway")
        _remove_locked(path)
    finally:
        os.close(fd)
    return info


def what_would_be_lost(info: CacheInfo) -> str:
    """'holds 3 changes not yet on the server and 1 conflict', or '' when nothing is."""
    parts = []
    if info.pending:
        parts.append(f"{info.pending} change{'s' if info.pending != 1 else ''} not yet on the server")
    if info.conflicts:
        parts.append(f"{info.conflicts} conflict{'s' if info.conflicts != 1 else ''}")
    return ("holds " + " and ".join(parts)) if parts else ""
