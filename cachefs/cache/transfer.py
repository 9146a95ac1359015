"""The blocking transfer jobs between the remote and the cache's content files, run in
worker threads or worker processes.

Owns: the jobs (``fetch_into`` a byte range, ``fetch_small_into``/``fetch_many_into``
small files whole, ``list_folder``/``list_folders``, ``upload_file`` read through its
checksum check ``_Checked``, ``upload_unless_changed``, ``hash_content``), ``FetchPool``,
a small pool of processes that run them with SSH connections of their own, and
``Transfers``, the jobs bound for the cache and the sync manager. paramiko handles its
packets in Python under the GIL, so threads of one process do not add up (one process:
280-350 MiB/s with AES-GCM here); several processes read a large file at the speed of the
link.
Must not touch: the index (the caller records what was fetched), trio, FUSE.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, BinaryIO, TypeVar, cast

from ..errors import ContentDamaged, RemoteError, RemoteUnreachable
from ..remote.base import NotExpected, Remote, RemoteStat, Upload

log = logging.getLogger(__name__)
T = TypeVar("T")


class RemoteChanged(Exception):
    """The remote file's version changed while its content was being fetched."""


class LocalGone(Exception):
    """The node's content file was removed (the node deleted here) before its upload."""


class _Checked:
    """An upload's content, checked as it is read against the checksum recorded when it was
    committed: the read that reaches its end (or finds it early) raises ``ContentDamaged``
    instead of handing over the last bytes, so that every backend stops before it renames
    its temporary file over the target. A content file the cache cannot read (a sealed
    block that does not decrypt) is damage too, not a failure of the connection."""

    def __init__(self, stream: Any, size: int, digest: bytes, what: str) -> None:
        self._stream, self._size, self._digest, self._what = stream, size, digest, what
        #: the whole size, read from the start (an HTTP upload sends it as Content-Length)
        self.length = size
        self._hash = hashlib.sha256()
        self._done = 0
        self._checked = False

    def read(self, n: int = -1) -> bytes:
        if self._checked:
            return b""
        try:
            data: bytes = self._stream.read(n)
        except OSError as exc:
            raise ContentDamaged(f"{self._what}: {exc.strerror or exc}") from exc
        if data:
            self._hash.update(data)
            self._done += len(data)
        if not data or self._done >= self._size:
            self._checked = True
            if self._done != self._size:
                raise ContentDamaged(f"{self._what}: {self._done} of its {self._size} bytes left")
            if self._hash.digest() != self._digest:
                raise ContentDamaged(f"{self._what}: its bytes are not the ones written "
                                     "(checksum mismatch)")
        return data

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> "_Checked":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def upload_file(remote: Remote, content: Any, size: int, path: bytes, content_path: str, mode: int,
                temp: bytes, atime_ns: int, mtime_ns: int, digest: bytes,
                owner: tuple[int, int] | None = None) -> RemoteStat:
    """Atomic upload of a content file with its mode and times; the new remote version.

    ``digest``: the SHA-256 recorded when the content was committed; content that does not
    match it is never renamed over ``path`` (``ContentDamaged``). The content file is opened
    here and the upload reads that descriptor, so a deletion of the node during the upload
    cannot pull the file away half way. A content file gone while the node lives on is
    damage, which the caller tells from a deletion (``LocalGone``)."""
    try:
        fd = os.open(content_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LocalGone(content_path) from None
    what = f"cache content file {content_path}"
    try:
        source = partial(_checked_reader, content, fd, size, digest, what)
        if owner is None:  # (as before: a Remote's upload may not take an owner)
            return remote.upload(path, cast(Any, source), mode, temp, (atime_ns, mtime_ns))
        return remote.upload(path, cast(Any, source), mode, temp, (atime_ns, mtime_ns), owner)
    finally:
        os.close(fd)


def hash_content(content: Any, content_path: str, size: int) -> bytes | None:
    """The SHA-256 of a content file's first ``size`` bytes (plain, as the cache reads
    them), or None when it holds fewer than that or cannot be read."""
    try:
        fd = os.open(content_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return hashlib.sha256().digest() if size == 0 else None
    try:
        digest = hashlib.sha256()
        done = 0
        while done < size:  # (pread, not a reader object: 12 -> 7 us for 4 KiB)
            piece = content.pread(fd, min(size - done, 1 << 20), done)
            if not piece:
                return None
            digest.update(piece)
            done += len(piece)
        return digest.digest()
    except OSError:
        return None
    finally:
        os.close(fd)


def _store(content: Any, content_path: str, data: bytes, offset: int) -> int:
    """Write fetched bytes into a content file (sealed when the cache is encrypted)."""
    fd = os.open(content_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if data:
            content.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    return len(data)


def fetch_into(remote: Remote, content: Any, expected: tuple[int, int, int] | None, path: bytes,
               content_path: str, offset: int, length: int) -> int:
    """Read a range from the remote into the content file; the bytes written.

    Each reply is written as it arrives (assembling the range first cost a fifth of the
    cold read speed: a fresh 4 MiB buffer per chunk, copied, then freed). The remote
    version is checked after the read, so bytes of a file rewritten meanwhile are never
    counted as part of the version the cache believes it has: they are in the content
    file but outside the ranges the caller records, and RemoteChanged makes it drop them.
    (The version is that of the file as the reads ended, asked with them where the
    backend can: ``Remote.read_version_into``.)"""
    failed: list[OSError] = []

    def write(pos: int, piece: bytes) -> None:
        if not failed:  # after a failed write the rest is read and dropped (at most a chunk)
            try:
                content.pwrite(fd, piece, pos)
            except OSError as exc:  # a local error (disk full): not the connection's
                failed.append(exc)

    fd = os.open(content_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if expected is None:
            got, found = remote.read_into(path, offset, length, write), None
        else:
            got, found = remote.read_version_into(path, offset, length, write)
    finally:
        os.close(fd)
    if failed:
        raise failed[0]
    if found is not None and found.version() != expected:
        raise RemoteChanged(path)
    return got


def fetch_small_into(remote: Remote, content: Any, expected: tuple[int, int, int] | None,
                     path: bytes, content_path: str, size: int) -> int:
    """A small file whole in two round trips (``read_many`` of one); the bytes written."""
    answer = remote.read_many([(path, size)])[0]
    if isinstance(answer, Exception):
        raise answer
    data, rstat = answer
    if expected is not None and rstat.version() != expected:
        raise RemoteChanged(path)
    return _store(content, content_path, data, 0)


def fetch_many_into(remote: Remote, content: Any, items: list[tuple[Any, bytes, str, int]]) -> list[int | None]:
    """Small whole files at once (prefetching a folder): for each (expected version,
    path, content path, size) the bytes written, or None when it could not be had as
    that version (changed, gone, refused): the reader then fetches it the ordinary way."""
    answers = remote.read_many([(path, size) for _exp, path, _cp, size in items])
    out: list[int | None] = []
    for (expected, _path, content_path, size), answer in zip(items, answers):
        if isinstance(answer, Exception) or (expected is not None and answer[1].version() != expected):
            out.append(None)
            continue
        out.append(_store(content, content_path, answer[0], 0))
    return out


# -- worker processes ---------------------------------------------------------------------------
_worker: tuple[Remote, Any] | None = None


def _die_with_parent() -> None:
    """Linux: end this process when the mount process ends, even by kill -9 (a worker
    forked with the pipe's both ends would otherwise wait for work forever)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent is already gone
            os._exit(0)
    except (OSError, AttributeError):
        pass


def _init_worker(address: Any, options: Any, key: bytes | None, pacer: Any = None) -> None:
    from ..store import crypto
    from ..remote import open_remote

    global _worker
    _die_with_parent()
    remote = open_remote(address, options, pacer)
    _worker = (remote, crypto.SealedContent(key) if key else crypto.PlainContent())


def upload_unless_changed(remote: Remote, content: Any, created: bool, base: tuple[int, int, int] | None,
                          *args: Any) -> tuple[str, Any]:
    """Replay of a content change in one job: look at the remote, and upload only when it
    is as expected (absent for a file created here, at ``base`` for a changed one).
    ("uploaded", new version), or ("changed", what is there) / ("gone", None) for the
    caller to settle (a conflict, a re-created file)."""
    try:
        current = remote.stat(args[1])
    except RemoteError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise
        current = None
    if current is not None and (created or current.version() != base):
        return ("changed", current)
    if current is None and not created and base is not None:
        return ("gone", None)
    if len(args) > 9:  # (owner, keep_owner: as ``Upload``'s)
        owner = args[8]
        if args[9] and owner is not None and current is not None:
            owner = (current.uid, current.gid)  # (the owner there wins: a chown there is no new version)
        args = (*args[:8], owner)
    return ("uploaded", upload_file(remote, content, *args))


def upload_many_unless_changed(remote: Remote, content: Any, items: list[tuple[Any, ...]]) -> list[Any]:
    """``upload_unless_changed`` of several files at once (``Remote.upload_many``: one
    connection, a few round trips for the lot of small ones). Each item: (created,
    base, size, path, content_path, mode, temp, atime_ns, mtime_ns, digest[, owner[, keep_owner]]). Per item:
    ("uploaded", new version), ("changed", what is there), ("gone", None), or the
    exception of that item alone (``RemoteError``, ``ContentDamaged``, ``LocalGone``);
    a broken connection raises for all."""
    outcomes: list[Any] = [None] * len(items)
    uploads: list[Upload] = []
    at: list[int] = []
    fds: list[int] = []
    try:
        for i, item in enumerate(items):
            created, base, size, path, content_path, mode, temp, atime_ns, mtime_ns, digest = item[:10]
            owner = item[10] if len(item) > 10 else None
            keep_owner = bool(item[11]) if len(item) > 11 else False
            try:
                fd = os.open(content_path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                outcomes[i] = LocalGone(content_path)
                continue
            fds.append(fd)
            what = f"cache content file {content_path}"
            source = partial(_checked_reader, content, fd, size, digest, what)
            uploads.append(Upload(path, cast(Any, source), mode, temp, (atime_ns, mtime_ns),
                                  partial(_as_expected, created, base), owner, keep_owner))
            at.append(i)
        for i, outcome in zip(at, remote.upload_many(uploads) if uploads else []):
            created, base = items[i][0], items[i][1]
            if isinstance(outcome, Exception):
                outcomes[i] = outcome
            elif isinstance(outcome, NotExpected):
                outcomes[i] = ("gone", None) if outcome.found is None and not created and base is not None \
                    else ("changed", outcome.found)
            else:
                outcomes[i] = ("uploaded", outcome)
    finally:
        for fd in fds:
            os.close(fd)
    return outcomes


def _checked_reader(content: Any, fd: int, size: int, digest: bytes, what: str) -> BinaryIO:
    return cast(BinaryIO, _Checked(content.reader(fd, size), size, digest, what))


def _as_expected(created: bool, base: tuple[int, int, int] | None, current: RemoteStat | None) -> bool:
    """What ``upload_unless_changed`` uploads over: nothing for a file created here, its
    base version for a changed one (a file gone there is not re-created here)."""
    if current is None:
        return created or base is None
    return not created and current.version() == base


def list_folder(remote: Remote, content: Any, path: bytes) -> list[Any]:
    """A folder's listing, parsed where it is read (a worker process's own connection)."""
    return remote.listdir(path)


def list_folders(remote: Remote, content: Any, paths: list[bytes]) -> list[Any]:
    """Several folders' listings in one call (``Remote.listdir_many``), parsed where they
    are read."""
    return remote.listdir_many(paths)


def _call_in_worker(job: Callable[..., T], *args: Any) -> T:
    assert _worker is not None
    remote, content = _worker
    return job(remote, content, *args)


def _noop() -> None:
    pass


def _ping() -> None:
    assert _worker is not None
    _worker[0].ping()


class FetchPool:
    """Processes that fetch content, each with one SSH connection (opened on first use)."""

    def __init__(self, address: Any, options: Any, key: bytes | None, processes: int) -> None:
        from ..remote.pacing import Pacer

        # (one upload cap for all the processes: ``--upload-limit`` is the mount's)
        pacer = Pacer(options.upload_limit) if options.upload_limit else None
        self._args = (address, replace(options, connections=1), key, pacer)
        self.processes = max(1, processes)
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Fork the processes now. Call it while the caller has one thread and no open
        index or connection (before trio starts): the children inherit nothing shared."""
        pool = self._pool("fork")
        futures = [pool.submit(_noop) for _ in range(self.processes)]
        concurrent.futures.wait(futures, timeout=30)

    def _pool(self, method: str = "spawn") -> concurrent.futures.ProcessPoolExecutor:
        if self._executor is None:
            # Started later (after a broken pool): spawn, a fresh interpreter, since the
            # caller has threads by then.
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context(method),
                initializer=_init_worker, initargs=self._args)
        return self._executor

    def warm(self) -> None:
        """Blocking: start the processes and their SSH connections ahead of the first read
        (a cold read should not wait for interpreters to start)."""
        try:
            pool = self._pool()
            for future in [pool.submit(_ping) for _ in range(self.processes)]:
                future.result()
        except Exception as exc:  # offline now: they connect on first use instead
            log.debug("fetch processes not warmed: %s", exc)

    def run(self, job: Callable[..., T], *args: Any) -> T:
        """Blocking (call it from a worker thread): ``job(remote, content, *args)`` in a
        worker process, with that process's own connection and content codec. ``job`` is
        one of this module's functions."""
        try:
            return self._pool().submit(_call_in_worker, job, *args).result()
        except BrokenProcessPool as exc:
            log.warning("a transfer process died (%s): starting new ones", exc)
            self.close()
            raise RemoteUnreachable("transfer process died") from exc

    def bind(self, job: Callable[..., T]) -> Callable[..., T]:
        """``job`` run in the pool, called as the in-thread ``partial(job, remote, content)``."""
        return partial(self.run, job)

    def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            # Stop the workers first (a fetch under way is abandoned: its chunk is simply
            # not recorded), then let the executor's own thread see them gone and end, so
            # that nothing of it is left for the interpreter's exit.
            for process in list(getattr(executor, "_processes", {}).values()):
                process.terminate()
            executor.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class Transfers:
    """The blocking transfer jobs as the cache and the sync manager call them (in a worker
    thread, through ``Connectivity.call``): each is ``job(remote, content, ...)`` with the
    first two bound, run in this process (``in_process``) or handed to a ``FetchPool``'s
    worker processes (``in_pool``). The daemon builds one and passes it to both."""

    fetch: Callable[..., int]  # fetch_into
    fetch_many: Callable[..., list[int | None]]  # fetch_many_into
    list_folder: Callable[..., list[Any]]  # a folder's listing for the listers ahead
    list_folders: Callable[..., list[Any]]  # several folders' (list_folders)
    upload: Callable[..., Any]  # upload_file
    upload_unless_changed: Callable[..., Any]  # upload_unless_changed
    upload_many_unless_changed: Callable[..., list[Any]]  # upload_many_unless_changed

    @classmethod
    def in_process(cls, remote: Remote, content: Any) -> "Transfers":
        return cls(fetch=partial(fetch_into, remote, content),
                   fetch_many=partial(fetch_many_into, remote, content),
                   list_folder=remote.listdir, list_folders=remote.listdir_many,
                   upload=partial(upload_file, remote, content),
                   upload_unless_changed=partial(upload_unless_changed, remote, content),
                   upload_many_unless_changed=partial(upload_many_unless_changed, remote, content))

    @classmethod
    def in_pool(cls, pool: FetchPool) -> "Transfers":
        return cls(fetch=pool.bind(fetch_into), fetch_many=pool.bind(fetch_many_into),
                   list_folder=pool.bind(list_folder), list_folders=pool.bind(list_folders),
                   upload=pool.bind(upload_file),
                   upload_unless_changed=pool.bind(upload_unless_changed),
                   upload_many_unless_changed=pool.bind(upload_many_unless_changed))
