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
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

log = logging.getLogger(__name__)


class CacheError(Exception):
    """A cache cannot be removed; the message says why and what to do."""


def cache_base() -> Path:
    """The folder of the default caches: one folder per remote in it."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cachefs"


def is_cache(path: Path) -> bool:
    """Whether ``path`` is a cachefs cache directory, told by what only a cache holds: its
    ``index-made`` mark (``store.opening.mark_indexed``: a file that begins with the
    mark's own words), or an index (``index/data.mdb``) whose ``meta`` records a schema
    and a remote (a cache older than the mark, or one whose first open stopped before
    writing it; read in a child process). A folder that merely holds a ``lock`` or an
    ``index`` (a git repository's ``.git``) is none, nor is a symbolic link. Nothing in
    ``path`` is made or changed: the only caches ``cachefs caches`` lists or removes."""
    if path.is_symlink() or not path.is_dir():
        return False
    if _has_index_mark(path):
        return True
    mdb = path / "index" / "data.mdb"
    if mdb.is_symlink() or not mdb.is_file():
        return False
    from .store.opening import index_of_a_cache, run_apart

    try:
        return run_apart(lambda: index_of_a_cache(path / "index"), "reading it") is True
    except Exception:  # noqa: BLE001 - an index that does not read is no cache's mark
        return False


def _has_index_mark(path: Path) -> bool:
    from .store.records import INDEX_MARK, INDEX_MARK_TEXT

    words = INDEX_MARK_TEXT.partition(b":")[0]  # "this cache has an index (index/data.mdb)"
    try:
        if not stat.S_ISREG(os.lstat(path / INDEX_MARK).st_mode):
            return False
        fd = os.open(path / INDEX_MARK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.read(fd, len(words)) == words
    except OSError:
        return False
    finally:
        os.close(fd)


def find(extra: Iterable[Path] = ()) -> list[Path]:
    """The caches in ``cache_base()``, and ``extra`` (those mounts use elsewhere)."""
    found: dict[Path, None] = {}
    base = cache_base()
    with contextlib.suppress(OSError):
        for entry in sorted(os.scandir(base), key=lambda e: e.name):
            path = base / entry.name
            if entry.is_dir(follow_symlinks=False) and is_cache(path):
                found[path] = None
    for path in extra:
        if is_cache(path):
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
    """``_index_facts`` read in a child process (``store.opening.run_apart``): some damage
    makes LMDB abort the process that reads it, which must not end the command."""
    from .store.opening import run_apart

    facts = run_apart(lambda: list(_index_facts(path, encrypted)), "reading it")
    if not isinstance(facts, list) or len(facts) != 3:
        raise RuntimeError(f"reading it gave {facts!r}")
    return cast(tuple[str | None, int | None, int | None], tuple(facts))


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


def _take_lock(path: Path) -> tuple[bool, int | None]:
    """(free, fd): the cache's lock taken (``fd`` to close), or ``(False, None)`` when a
    mount holds it. The lock file is opened, never made: a folder without one has never
    been used by a mount (``index.Store`` makes it as it opens a cache): ``(True, None)``."""
    try:
        fd = os.open(path / "lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return True, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False, None
    return True, fd


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
        free, fd = _take_lock(path)
    except OSError as exc:
        log.warning("the new cache %s is left: %s", path, exc.strerror)
        return
    if not free:
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
        if fd is not None:
            os.close(fd)


def remove(path: Path, force: bool = False) -> CacheInfo:
    """Remove the cache in ``path``; refused (``CacheError``) when a mount holds it (even
    with ``force``: unmount first), and without ``force`` when it holds changes not yet on
    the server or conflicts, or its index cannot be read (what would be lost is said)."""
    if not is_cache(path):
        raise CacheError(f"{path} is not a cachefs cache directory (it has neither the "
                         "index-made mark nor a cachefs index): nothing removed")
    try:
        free, fd = _take_lock(path)
    except OSError as exc:
        raise CacheError(f"{path}: its lock cannot be taken ({exc.strerror}): nothing removed") from None
    if not free:
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
        if fd is not None:
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
