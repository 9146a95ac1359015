"""The cache: answers the FUSE layer from the store, reading through to the remote.

Owns: read-through of listings, attributes, symlink targets and content; revalidation
(close-to-open); fetching content by chunks with read-ahead and several requests in
flight; the checkpoint that makes fetched content durable before the index says it is
there; telling the kernel when cached data went stale.
Must not touch: FUSE request details (``cachefs.fs``), the remote other than through
``Connectivity.call``, and the remote's write side (only the sync manager changes it).

Concurrency: every method runs on the trio thread; LMDB transactions are short and
synchronous; blocking work (remote calls, writes of fetched chunks, fsync) runs in worker
threads. In-memory state (freshness times, ranges being fetched) is lost on restart by
design: after a restart everything is revalidated once.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
import time
from dataclasses import dataclass

import trio

from ..errors import InvalidArgument, IsADirectory, NotADirectory, NotFound, RemoteError, Unavailable
from ..remote import Remote, SpaceInfo
from ..sync.connectivity import Connectivity
from . import ranges as rangeset
from .store import FULL, LISTED, ROOT_INO, TARGET, Node, Store, node_from_remote

log = logging.getLogger(__name__)

CONTROL_NAME = b".cachefs"  # hidden at the root: never listed from nor sent to the remote


@dataclass(frozen=True)
class CacheConfig:
    attr_timeout: float = 3.0  # seconds before open() revalidates attributes
    dir_timeout: float = 3.0  # seconds before a listing is fetched again
    chunk_size: int = 1 << 20  # unit of content fetches
    readahead: int = 8  # chunks fetched ahead of a sequential reader
    checkpoint_interval: float = 1.0


class Kernel:
    """What the cache asks of the kernel; ``cachefs.fs`` supplies the real one."""

    def invalidate_inode(self, ino: int) -> None:  # drop cached data and attributes
        pass

    def invalidate_entry(self, parent: int, name: bytes) -> None:  # drop a name lookup
        pass


def _valid_name(name: bytes) -> bool:
    return bool(name) and name not in (b".", b"..") and b"/" not in name and b"\0" not in name \
        and len(name) <= 255


class Cache:
    def __init__(self, store: Store, conn: Connectivity, config: CacheConfig | None = None,
                 kernel: Kernel | None = None) -> None:
        self.store = store
        self.conn = conn
        self.remote: Remote = conn.remote
        self.config = config or CacheConfig()
        self.kernel = kernel or Kernel()
        self._listed_at: dict[int, float] = {}
        self._checked_at: dict[int, float] = {}
        self._listing_locks: dict[int, trio.Lock] = {}
        self._ranges: dict[int, rangeset.Ranges] = {}  # content known present (may be ahead of the store)
        self._unsaved: set[int] = set()  # inos whose ranges the checkpoint must persist
        self._inflight: dict[tuple[int, int], trio.Event] = {}
        self._fetch_errors: dict[tuple[int, int], BaseException] = {}
        self._open_count: dict[int, int] = {}
        self._last_read_end: dict[int, int] = {}
        self._space: SpaceInfo | None = None
        self._space_at = 0.0
        self._nursery: trio.Nursery | None = None

    # -- life cycle --------------------------------------------------------------------
    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background work (read-ahead fetches, checkpoints). Runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await trio.sleep(self.config.checkpoint_interval)
                    await self.checkpoint()
            finally:
                with trio.CancelScope(shield=True):
                    await self.checkpoint()

    async def checkpoint(self) -> None:
        """Make fetched content durable, then record it in the index (in that order,
        so the index never claims bytes that a power loss could take back)."""
        if not self._unsaved:
            return
        todo = {ino: list(self._ranges.get(ino, [])) for ino in self._unsaved}
        self._unsaved.clear()
        paths = [self.store.content_path(ino) for ino in todo]
        await trio.to_thread.run_sync(_fdatasync_all, paths)
        full = {ino for ino, rs in todo.items() if self._covers_all(ino, rs)}
        self.store.save_ranges(todo, full)
        await trio.to_thread.run_sync(self.store.sync)
        for ino in todo:
            if not self._open_count.get(ino) and ino not in self._unsaved:
                self._ranges.pop(ino, None)

    def _covers_all(self, ino: int, rs: rangeset.Ranges) -> bool:
        node = self.store.get(ino)
        return node is not None and rangeset.covers(rs, 0, node.size)

    # -- namespace ---------------------------------------------------------------------
    def node(self, ino: int) -> Node:
        node = self.store.get(ino)
        if node is None:
            raise NotFound(f"inode {ino}")
        return node

    async def lookup(self, parent: int, name: bytes) -> Node:
        pnode = self.node(parent)
        if not pnode.is_dir:
            raise NotADirectory()
        await self._ensure_listing(pnode)
        child = self.store.child(parent, name)
        if child is None:
            raise NotFound()
        return child

    async def listdir(self, ino: int) -> list[Node]:
        node = self.node(ino)
        if not node.is_dir:
            raise NotADirectory()
        await self._ensure_listing(node)
        return self.store.children(ino)

    async def _ensure_listing(self, node: Node) -> None:
        """Fetch the folder's listing when ours is missing or older than dir_timeout."""
        if self._fresh(self._listed_at, node.ino, self.config.dir_timeout):
            return
        if not self.conn.online:
            if node.has(LISTED):
                return
            raise Unavailable("folder listing not cached")
        lock = self._listing_locks.setdefault(node.ino, trio.Lock())
        async with lock:
            if self._fresh(self._listed_at, node.ino, self.config.dir_timeout):
                return
            path = self.store.path_of(node.ino)
            try:
                listing = await self.conn.call(self.remote.listdir, path)
            except Unavailable:
                if node.has(LISTED):
                    return
                raise
            except RemoteError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR) and node.ino != ROOT_INO:
                    await self._vanished(node)
                    raise NotFound() from None
                raise
            finally:
                self._listing_locks.pop(node.ino, None)
            self._apply_listing(node.ino, listing)

    def _apply_listing(self, ino: int, listing: list) -> None:
        kept = []
        for name, rstat in listing:
            if ino == ROOT_INO and name == CONTROL_NAME:
                continue
            if not _valid_name(name):
                log.warning("skipping remote name %r in %r: not usable as a file name",
                            name, self.store.path_of(ino))
                continue
            if rstat.kind not in (stat_mod.S_IFREG, stat_mod.S_IFDIR, stat_mod.S_IFLNK):
                continue  # sockets, fifos and devices mean nothing across the network
            kept.append((name, rstat))
        delta = self.store.apply_listing(ino, kept, node_from_remote)
        now = time.monotonic()
        self._listed_at[ino] = now
        for child in self.store.children(ino):
            self._checked_at[child.ino] = now
        for node in delta.changed:
            self._stale(node.ino)
        for node in delta.removed:
            self._forget_content(node.ino)
            self.kernel.invalidate_entry(ino, node.name)

    async def _vanished(self, node: Node) -> None:
        """The remote says this object is gone: list its parent again."""
        self._listed_at.pop(node.parent, None)
        parent = self.store.get(node.parent)
        if parent is not None:
            try:
                await self._ensure_listing(parent)
            except (Unavailable, RemoteError, NotFound):
                pass

    def _stale(self, ino: int) -> None:
        """The remote content changed: drop what we cached of it and tell the kernel."""
        self._forget_content(ino)
        self.store.drop_content(ino)
        self.kernel.invalidate_inode(ino)

    def _forget_content(self, ino: int) -> None:
        self._ranges.pop(ino, None)
        self._unsaved.discard(ino)

    @staticmethod
    def _fresh(table: dict[int, float], ino: int, ttl: float) -> bool:
        at = table.get(ino)
        return at is not None and time.monotonic() - at < ttl

    # -- files -------------------------------------------------------------------------
    async def open(self, ino: int) -> "OpenFile":
        """Close-to-open: revalidate attributes older than attr_timeout."""
        node = self.node(ino)
        if node.is_dir:
            raise IsADirectory()
        if self.conn.online and not self._fresh(self._checked_at, ino, self.config.attr_timeout):
            node = await self._revalidate(node)
        fd = os.open(self.store.content_path(ino), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._open_count[ino] = self._open_count.get(ino, 0) + 1
        return OpenFile(node, fd)

    def release(self, handle: "OpenFile") -> None:
        os.close(handle.fd)
        ino = handle.node.ino
        count = self._open_count.get(ino, 0) - 1
        if count > 0:
            self._open_count[ino] = count
        else:
            self._open_count.pop(ino, None)
            self._last_read_end.pop(ino, None)

    async def _revalidate(self, node: Node) -> Node:
        path = self.store.path_of(node.ino)
        try:
            rstat = await self.conn.call(self.remote.stat, path)
        except Unavailable:
            return node
        except RemoteError as exc:
            if exc.errno == errno.ENOENT:
                await self._vanished(node)
                raise NotFound() from None
            raise
        self._checked_at[node.ino] = time.monotonic()
        if rstat.version() == node.base:
            return node
        if rstat.kind != stat_mod.S_IFMT(node.mode):
            await self._vanished(node)
            raise NotFound()
        log.debug("remote changed: %r", path)
        fresh = node_from_remote(node.ino, node.parent, node.name, rstat, node)
        self.store.put(fresh)
        self._stale(node.ino)
        return fresh

    async def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        if not node.is_symlink:
            raise InvalidArgument()
        if node.has(TARGET):
            return node.target
        target = await self.conn.call(self.remote.readlink, self.store.path_of(ino))
        node = self.node(ino)
        node.target = target
        node.flags |= TARGET
        self.store.put(node)
        return target

    async def read(self, handle: "OpenFile", offset: int, size: int) -> bytes:
        """Bytes at ``offset``, fetching what is missing.

        The pread runs on the trio thread: it is served from the page cache or a local
        disk, and a thread hop would cost more than the read itself.
        """
        node = handle.node
        end = min(offset + size, node.size)
        if offset >= end:
            return b""
        if not node.has(FULL):
            await self._ensure_present(node, offset, end)
        return os.pread(handle.fd, end - offset, offset)

    def content_state(self, node: Node) -> str:
        """'cached', 'partial' or 'remote' for a file (what of it is here)."""
        if node.has(FULL):
            return "cached"
        rs = self._ranges.get(node.ino)
        if rs is None:
            rs = self.store.get_ranges(node.ino)
        if node.size == 0 or rangeset.covers(rs, 0, node.size):
            return "cached" if rs or node.size == 0 else "remote"
        return "partial" if rs else "remote"

    def _known_ranges(self, ino: int) -> rangeset.Ranges:
        rs = self._ranges.get(ino)
        if rs is None:
            rs = self._ranges[ino] = self.store.get_ranges(ino)
        return rs

    async def _ensure_present(self, node: Node, start: int, end: int) -> None:
        ino = node.ino
        if rangeset.covers(self._known_ranges(ino), start, end):
            return
        chunk = self.config.chunk_size
        first, last = start // chunk, (end - 1) // chunk
        sequential = self._last_read_end.get(ino) == start or start == 0
        self._last_read_end[ino] = end
        path = self.store.path_of(ino)
        wanted = list(range(first, last + 1))
        events = [self._start_fetch(node, path, idx) for idx in wanted]
        if sequential and self._nursery is not None:
            limit = (node.size - 1) // chunk
            for idx in range(last + 1, min(last + 1 + self.config.readahead, limit + 1)):
                self._start_fetch(node, path, idx)
        for ev in events:
            if ev is not None:
                await ev.wait()
        if rangeset.covers(self._known_ranges(ino), start, end):
            return
        for idx in wanted:
            exc = self._fetch_errors.pop((ino, idx), None)
            if exc is not None:
                raise exc
        if not self.conn.online:
            raise Unavailable("content not cached")
        # The remote file is shorter than we were told: it changed under us.
        self._checked_at.pop(ino, None)
        raise RemoteError(errno.EIO, "remote file changed while being read")

    def _start_fetch(self, node: Node, path: bytes, idx: int) -> trio.Event | None:
        """Fetch chunk ``idx`` unless present or already on its way; its done-event."""
        chunk = self.config.chunk_size
        cstart = idx * chunk
        cend = min(node.size, cstart + chunk)
        key = (node.ino, idx)
        ev = self._inflight.get(key)
        if ev is not None:
            return ev
        if rangeset.covers(self._known_ranges(node.ino), cstart, cend):
            return None
        if not self.conn.online:
            raise Unavailable("content not cached")
        ev = self._inflight[key] = trio.Event()
        if self._nursery is not None:
            self._nursery.start_soon(self._fetch, node, path, idx, cstart, cend, ev)
        else:  # no background nursery (tests driving the cache directly): fetch inline
            raise RuntimeError("Cache.run() is not running")
        return ev

    async def _fetch(self, node: Node, path: bytes, idx: int, cstart: int, cend: int,
                     ev: trio.Event) -> None:
        ino = node.ino
        key = (ino, idx)
        try:
            for gap_start, gap_end in rangeset.missing(self._known_ranges(ino), cstart, cend):
                got = await self.conn.call(_fetch_into, self.remote, path,
                                           self.store.content_path(ino), gap_start, gap_end - gap_start)
                if self.store.get(ino) is None:
                    self.store.remove_content_file(ino)
                    return  # the node went away meanwhile
                if got:
                    self._ranges[ino] = rangeset.add(self._known_ranges(ino), gap_start, gap_start + got)
                    self._unsaved.add(ino)
                if got < gap_end - gap_start:
                    break
        except (Unavailable, RemoteError, OSError) as exc:
            self._fetch_errors[key] = exc
        finally:
            self._inflight.pop(key, None)
            ev.set()

    # -- the share ---------------------------------------------------------------------
    async def statfs(self) -> SpaceInfo:
        if self.conn.online and (self._space is None or time.monotonic() - self._space_at > 30):
            try:
                self._space = await self.conn.call(self.remote.statvfs)
                self._space_at = time.monotonic()
            except (Unavailable, RemoteError):
                pass
        if self._space is None:
            return SpaceInfo(4096, 1 << 28, 1 << 27, 1 << 27, 1 << 20, 1 << 19)
        return self._space


@dataclass
class OpenFile:
    """One open() of a file: the node as revalidated then, and the content file."""

    node: Node
    fd: int


def _fetch_into(remote: Remote, path: bytes, content_path: str, offset: int, length: int) -> int:
    """Worker thread: read a range from the remote into the content file; bytes written."""
    data = remote.read(path, offset, length)
    if not data:
        return 0
    fd = os.open(content_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            pos += os.pwrite(fd, view[pos:], offset + pos)
    finally:
        os.close(fd)
    return len(data)


def _fdatasync_all(paths: list[str]) -> None:
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

