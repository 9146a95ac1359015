"""What of each file's content is in the cache, and fetching the rest: the trio side of
fetches (chunks on demand, several in flight, read-ahead of a sequential reader, a
folder's small files fetched together); the blocking jobs are ``cache.transfer``'s.

Owns: the byte ranges known present (``_ranges``, ahead of the index until the
checkpoint saves them: ``_unsaved``), the fetches in flight and their errors, the
small-file reads per folder, and the running count of cached bytes (``usage``).
Must not touch: listings (it asks ``Listings`` for a folder's children and to forget a
node's check), open files and backings (a change of the remote goes through the
``stale`` callback, which the façade owns), the journal, FUSE.

Concurrency: on the trio thread. A fetch is a task of the cache's nursery, one per chunk
(``_inflight`` holds its event while it runs; readers of the chunk wait on it); the
blocking job runs in a worker thread or process through ``Connectivity.call(bulk=True)``.
What a fetch brings is recorded after its await, and only if the node still exists.
The checkpoint makes content files durable (in a thread) before the index records them.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import os
from collections.abc import Callable
from typing import Any

import trio

from ..errors import RemoteError, Unavailable
from ..link.connectivity import Connectivity
from ..paths import join
from ..store import ranges as rangeset
from ..store.index import DIRTY, FULL, Node, Store
from .common import CacheConfig
from .handles import Opens
from .listing import Listings
from .transfer import RemoteChanged, fetch_small_into

log = logging.getLogger(__name__)

SMALL_FILE = 64 << 10  # files at most this big are prefetched with their folder
PREFETCH_FILES = 2000  # at most this many files ...
PREFETCH_BYTES = 32 << 20  # ... or bytes per folder
#: on a slow link, sibling folders whose small files come with a folder's first read, and
#: the most bytes in them
CHAIN_FOLDERS = 256
CHAIN_BYTES = 4 << 20
BATCH_FILES = 100  # small files prefetched in one call at most ...
BATCH_BYTES = 256 << 10  # ... and bytes (a reader of one waits for its whole call)
#: a checkpoint of at least this many content files syncs the cache's filesystem once
#: (syncfs) rather than each file (``_fdatasync_all``)
SYNCFS_MIN = 32
FETCH_ERRORS = 4096  # errors of fetches no reader waited for, kept at most


class Content:
    def __init__(self, store: Store, conn: Connectivity, config: CacheConfig, listings: Listings,
                 opens: Opens, *, fetch: Callable[..., int], fetch_many: Callable[..., list[int | None]],
                 stale: Callable[[int], None]) -> None:
        self.store = store
        self.conn = conn
        self.config = config
        self._listings = listings
        self._opens = opens
        #: blocking (expected version, path, content path, offset, length) -> bytes fetched;
        #: in a worker thread, or handed on to a worker process (``transfer.Transfers``)
        self._fetch_job = fetch
        #: blocking [(expected, path, content path, size)] -> [bytes fetched or None]
        self._fetch_many_job = fetch_many
        self._stale = stale
        self._ranges: dict[int, rangeset.Ranges] = {}  # content known present (may be ahead of the store)
        self._unsaved: set[int] = set()  # inos whose ranges the checkpoint must persist
        self._inflight: dict[tuple[int, int], trio.Event] = {}
        self._fetch_errors: dict[tuple[int, int], BaseException] = {}
        self._small_reads: dict[int, int] = {}  # folder -> small files fetched whole in it
        self._prefetched: set[int] = set()  # folders whose small files were prefetched
        #: folders whose small files are to be prefetched (with the rest still wanted of
        #: one begun), for the prefetchers
        self._wanted: collections.deque[tuple[int, list[Node] | None]] = collections.deque()
        self._wanted_lot = trio.lowlevel.ParkingLot()
        self.usage = store.usage()  # content bytes in the cache, kept as a running count
        self._nursery: trio.Nursery | None = None
        #: told of each node some content of which was fetched (``Xattrs.read_ahead``: its
        #: extended attributes are read after it)
        self.fetched: Callable[[int], None] = _nothing

    def start(self, nursery: trio.Nursery) -> None:
        """Fetches run in ``nursery`` from now on."""
        self._nursery = nursery
        for _ in range(max(1, int(self.conn.bulk_limiter.total_tokens))):
            nursery.start_soon(self._prefetcher)

    # -- what is here --------------------------------------------------------------------
    def known_ranges(self, ino: int) -> rangeset.Ranges:
        rs = self._ranges.get(ino)
        if rs is None:
            rs = self._ranges[ino] = self.store.get_ranges(ino)
        return rs

    def present(self, ino: int, size: int) -> bool:
        """Whether the file's first ``size`` bytes are known here (checkpointed or not)."""
        return rangeset.covers(self._ranges.get(ino, []), 0, size)

    def whole(self, node: Node) -> bool:
        """Whether all of the file is here: checkpointed (``FULL``) or not yet."""
        return node.has(FULL) or self.present(node.ino, node.size)

    def state(self, node: Node) -> str:
        """'cached', 'partial' or 'remote' for a file (what of it is here)."""
        if node.has(FULL):
            return "cached"
        rs = self._ranges.get(node.ino)
        if rs is None:
            rs = self.store.get_ranges(node.ino)
        if node.size == 0 or rangeset.covers(rs, 0, node.size):
            return "cached" if rs or node.size == 0 else "remote"
        return "partial" if rs else "remote"

    def forget(self, ino: int, *, stale: bool = False) -> None:
        """The node's content is gone (removed, or dropped with the index's ranges).
        ``stale``: only because the remote's version changed; the node stays, and so does
        its last use (content read again on a handle already open renews no open)."""
        self._ranges.pop(ino, None)
        self._unsaved.discard(ino)
        if not stale:
            self._opens.forget(ino)

    def cut(self, ino: int) -> None:
        """The content file was truncated: its ranges are read again from the index."""
        self._ranges.pop(ino, None)

    def drop(self, ino: int) -> None:
        """Drop the node's cached content: the remote's changed. (The count of cached
        bytes loses what was fetched, checkpointed or not, as at an eviction.)"""
        if self.store.get(ino) is not None:
            self.usage -= rangeset.total(self.known_ranges(ino))
        self.forget(ino, stale=True)
        self.store.drop_content(ino)

    def evict(self, node: Node) -> int:
        """Drop the cached content of a file the caller found evictable; bytes freed."""
        freed = node.size if node.has(FULL) else rangeset.total(self.known_ranges(node.ino))
        if freed or node.has(FULL):
            self.forget(node.ino)
            self.store.drop_content(node.ino)
            self.usage -= freed
        return freed

    # -- the checkpoint ------------------------------------------------------------------
    async def save(self) -> None:
        """Make fetched content durable, then record it in the index (in that order,
        so the index never claims bytes that a power loss could take back)."""
        if not self._unsaved:
            return
        todo = {ino: list(self._ranges.get(ino, [])) for ino in self._unsaved}
        self._unsaved.clear()
        try:
            paths = [self.store.content_path(ino) for ino in todo]
            await trio.to_thread.run_sync(_fdatasync_all, paths, str(self.store.data_dir))
            full = {ino for ino, rs in todo.items() if self._covers_all(ino, rs)}
            self._listings.kept_made_full(self.store.save_ranges(todo, full))
            await trio.to_thread.run_sync(self.store.sync)
        except BaseException:
            # The next checkpoint tries them again (content dropped meanwhile excepted).
            self._unsaved.update(ino for ino in todo if ino in self._ranges)
            raise
        for ino in todo:
            if not self._opens.count.get(ino) and ino not in self._unsaved:
                self._ranges.pop(ino, None)

    def _covers_all(self, ino: int, rs: rangeset.Ranges) -> bool:
        node = self.store.get(ino)
        return node is not None and rangeset.covers(rs, 0, node.size)

    # -- fetching ------------------------------------------------------------------------
    async def ensure_present(self, node: Node, start: int, end: int, readahead: bool = True,
                             retry: bool = True) -> None:
        ino = node.ino
        known = self.known_ranges(ino)
        chunk = self.config.chunk_size
        if readahead and self._nursery is not None and self.conn.online:
            self._read_ahead(node, known, start, end)
        if rangeset.covers(known, start, end):
            return
        first, last = start // chunk, (end - 1) // chunk
        path = self.store.path_of(ino)
        wanted = list(range(first, last + 1))
        events = [self._start_fetch(node, path, idx) for idx in wanted]
        for ev in events:
            if ev is not None:
                await ev.wait()
        if rangeset.covers(self.known_ranges(ino), start, end):
            return
        for idx in wanted:
            exc = self._fetch_errors.pop((ino, idx), None)
            if exc is not None:
                raise exc
        if not self.conn.online:
            raise Unavailable("content not cached")
        if retry:  # a prefetch that could not bring it: fetch it the ordinary way
            return await self.ensure_present(node, start, end, readahead, retry=False)
        # The remote file is shorter than we were told: it changed under us.
        self._listings.forget_checked(ino)
        raise RemoteError(errno.EIO, "remote file changed while being read")

    async def settle(self, ino: int) -> None:
        """Wait for fetches of ``ino`` under way (read-ahead, a folder's prefetch): they
        write into the content file, and a local change must come after them."""
        while True:
            pending = [ev for (i, _idx), ev in self._inflight.items() if i == ino]
            if not pending:
                return
            for ev in pending:
                await ev.wait()

    def _read_ahead(self, node: Node, known: rangeset.Ranges, start: int, end: int) -> None:
        """A reader that starts at 0 or goes on where cached bytes end reads sequentially:
        keep chunks in flight ahead of it, a window that grows with the run it has read
        (so a program that reads one kilobyte of a huge file fetches one chunk or two)."""
        chunk = self.config.chunk_size
        if start == 0:
            run = 0
        else:
            before = next(((s, e) for s, e in known if s < start <= e), None)
            if before is None:
                return
            run = start - before[0]
        window = min(self.config.readahead, 1 + run // chunk)
        first = (end - 1) // chunk + 1
        last = min((node.size - 1) // chunk, first + window - 1)
        path = b""
        for idx in range(first, last + 1):
            if (node.ino, idx) in self._inflight:
                continue
            if rangeset.covers(known, idx * chunk, min(node.size, (idx + 1) * chunk)):
                continue
            path = path or self.store.path_of(node.ino)
            self._start_fetch(node, path, idx)

    def _start_fetch(self, node: Node, path: bytes, idx: int) -> trio.Event | None:
        """Fetch chunk ``idx`` unless present or already on its way; its done-event."""
        chunk = self.config.chunk_size
        cstart = idx * chunk
        cend = min(node.size, cstart + chunk)
        key = (node.ino, idx)
        ev = self._inflight.get(key)
        if ev is not None:
            return ev
        if rangeset.covers(self.known_ranges(node.ino), cstart, cend):
            return None
        if not self.conn.online:
            raise Unavailable("content not cached")
        if self._nursery is None:  # no background nursery (tests driving the cache directly)
            raise RuntimeError("Cache.run() is not running")
        if len(self._fetch_errors) >= FETCH_ERRORS:
            self._fetch_errors.clear()  # (read-ahead errors that no reader came for)
        self._fetch_errors.pop(key, None)
        ev = self._inflight[key] = trio.Event()
        self._nursery.start_soon(self._fetch, node, path, idx, cstart, cend, ev)
        return ev

    async def _fetch(self, node: Node, path: bytes, idx: int, cstart: int, cend: int,
                     ev: trio.Event) -> None:
        ino = node.ino
        key = (ino, idx)
        try:
            await self._fetch_gaps(node, path, cstart, cend)
        except RemoteChanged:
            # The remote file changed under the fetch: what we have of it may mix two
            # versions. Drop it all; the next open sees the new version.
            log.info("remote %r changed while being read: cached content dropped", path)
            self._stale(ino)
            self._listings.forget_checked(ino)
            self._fetch_errors[key] = RemoteError(errno.EIO, "remote file changed while being read")
        except (Unavailable, RemoteError, OSError) as exc:
            self._fetch_errors[key] = exc
        except Exception as exc:  # a background task must never end the mount
            log.exception("fetch of %r failed", path)
            self._fetch_errors[key] = RemoteError(errno.EIO, f"fetch failed: {exc}")
        finally:
            self._inflight.pop(key, None)
            ev.set()

    async def _fetch_gaps(self, node: Node, path: bytes, cstart: int, cend: int) -> None:
        """What is missing of ``cstart..cend`` into the content file, and recorded."""
        ino = node.ino
        small = cstart == 0 and node.size <= SMALL_FILE
        if small and self.conn.slow:
            self._note_small_read(node.parent, at_once=True)  # (alongside this fetch)
        for gap_start, gap_end in rangeset.missing(self.known_ranges(ino), cstart, cend):
            if gap_start == 0 and gap_end == node.size <= SMALL_FILE:
                # A small file whole: two round trips in this process beat a hop to a
                # fetch process.
                got = await self.conn.call(fetch_small_into, self.conn.remote, self.store.content,
                                           node.base, path, self.store.content_path(ino), node.size)
            else:
                got = await self.conn.call(self._fetch_job, node.base, path, self.store.content_path(ino),
                                           gap_start, gap_end - gap_start, bulk=True)
            if self.store.get(ino) is None:
                self.store.remove_content_file(ino)
                return  # the node went away meanwhile
            if got:
                self._ranges[ino] = rangeset.add(self.known_ranges(ino), gap_start, gap_start + got)
                self._unsaved.add(ino)
                self.usage += got
                self.fetched(ino)
            if got < gap_end - gap_start:
                break
        if small and not self.conn.slow:
            self._note_small_read(node.parent)

    # -- prefetching a folder's small files ------------------------------------------------
    def folder_listed(self, folder: int) -> None:
        """The folder was listed again: its small-file reads count anew."""
        self._prefetched.discard(folder)
        self._small_reads.pop(folder, None)

    def _note_small_read(self, folder: int, at_once: bool = False) -> None:
        """A second small file read whole in a folder looks like a program going through
        its files (a build, grep -r, tar): fetch the rest of its small files at once, and
        those of its sibling folders (those listed already, the next ones in listing order
        first, then those before, up to ``CHAIN_FOLDERS`` folders and ``CHAIN_BYTES``): a
        program going through a tree's files reads those next (a build; git's
        objects/xx/, read in hash order), and each folder would otherwise begin with a
        wait (on loopback WebDAV, 1,000 files of 4 KiB in 100 folders read cold:
        1,112-1,168 files/s with the folder alone, 1,693-1,968 with its siblings).

        ``at_once`` (a slow link, where a round trip costs more than the bytes): the
        first read does."""
        count = self._small_reads[folder] = self._small_reads.get(folder, 0) + 1
        if count == (1 if at_once else 2) and self._nursery is not None:
            self._prefetch(folder, first=True)
            self._nursery.start_soon(self._prefetch_siblings, folder)

    async def _prefetch_siblings(self, folder: int) -> None:
        """Queue the small files of ``folder``'s listed sibling folders, up to
        ``CHAIN_FOLDERS`` folders and ``CHAIN_BYTES`` (see ``_note_small_read``)."""
        budget = CHAIN_BYTES
        try:
            for sibling in self._listings.sibling_folders(folder, CHAIN_FOLDERS):
                if sibling in self._prefetched:
                    continue
                chosen = self._small_files(sibling)
                budget -= sum(n.size for n in chosen)
                if budget < 0:
                    break
                self._prefetch(sibling, chosen=chosen)
        except Exception:  # a background task must never end the mount (a prefetch only helps)
            log.exception("prefetch of the folders beside %d failed", folder)

    def _prefetch(self, folder: int, first: bool = False, chosen: list[Node] | None = None) -> None:
        """Queue the folder's small files for the prefetchers (``first``: ahead of those
        queued: a program reads in it now; ``chosen``: its files picked already, each
        looked at again when its turn comes)."""
        if folder in self._prefetched or self._nursery is None:
            return
        self._prefetched.add(folder)
        if first:
            self._wanted.appendleft((folder, chosen))
        else:
            self._wanted.append((folder, chosen))
        self._wanted_lot.unpark()

    async def _prefetcher(self) -> None:
        """One of the prefetchers of ``_wanted``; runs until cancelled. Files are chosen
        only once a transfer slot is held (and marked in flight then): until then a
        reader of one fetches it itself, on a short-call connection, rather than wait
        behind the queue. A call takes several folders' files, up to ``BATCH_FILES`` and
        ``BATCH_BYTES``: a few round trips for them all."""
        while True:
            while not self._wanted:
                await self._wanted_lot.park()
            async with self.conn.bulk_limiter:
                if not self.conn.online:
                    self._wanted.clear()  # (their folders come again when listed again)
                    continue
                batch = self._next_batch()
                if batch:
                    await self._fetch_batch(batch)

    def _next_batch(self) -> list[tuple[Node, bytes]]:
        """Files of the queued folders for one call: (node, path), marked in flight."""
        batch: list[tuple[Node, bytes]] = []
        total = 0
        while self._wanted and len(batch) < BATCH_FILES and total < BATCH_BYTES:
            folder, chosen = self._wanted.popleft()
            try:
                folder_path = self.store.path_of(folder)
            except KeyError:
                continue
            if chosen is None:
                chosen = self._small_files(folder)
            taken = 0
            for node in chosen:
                if len(batch) >= BATCH_FILES or total >= BATCH_BYTES:
                    break
                taken += 1
                # As the index has it now (chosen when its folder was queued, or in an
                # earlier call, a while ago perhaps): a file opened for writing or
                # changed here since must never get the server's bytes over its own.
                current = self.store.get(node.ino)
                if current is None or current.base != node.base or current.name != node.name \
                        or current.parent != folder or not self._wants(current):
                    continue
                batch.append((current, join(folder_path, current.name)))
                total += current.size
            if taken < len(chosen):
                self._wanted.appendleft((folder, chosen[taken:]))
        if batch:
            log.debug("prefetching %d small files (%d bytes): %r", len(batch), total,
                      [path for _node, path in batch[:4]])
        for node, _path in batch:
            self._inflight[(node.ino, 0)] = trio.Event()
        return batch

    def _small_files(self, folder: int) -> list[Node]:
        """The folder's small files with nothing of them here, up to the prefetch's caps."""
        chosen: list[Node] = []
        total = 0
        for child in self._listings.children(folder):
            if not self._wants(child):
                continue
            chosen.append(child)
            total += child.size
            if len(chosen) >= PREFETCH_FILES or total >= PREFETCH_BYTES:
                break
        return chosen

    def _wants(self, node: Node) -> bool:
        """A small file of which nothing is here nor on its way."""
        return node.is_file and 0 < node.size <= SMALL_FILE and not node.flags & (FULL | DIRTY) \
            and (node.ino, 0) not in self._inflight and node.ino not in self._ranges \
            and not self.store.get_ranges(node.ino)

    async def _fetch_batch(self, batch: list[tuple[Node, bytes]]) -> None:
        """Fetch ``batch`` (chosen and marked by ``_next_batch``) in one call, on the
        transfer slot the caller holds."""
        items = [(n.base, path, self.store.content_path(n.ino), n.size) for n, path in batch]
        results: list[int | None]
        try:
            try:
                results = await self.conn.call(self._fetch_many_job, items, lane_held=True)
            except Exception as exc:  # noqa: BLE001 - a prefetch only helps; readers fetch themselves
                log.debug("prefetch of %d files failed: %s", len(batch), exc)
                results = [None] * len(batch)
            for (node, _path), got in zip(batch, results):
                if got and self.store.get(node.ino) is not None:
                    self._ranges[node.ino] = rangeset.add(self.known_ranges(node.ino), 0, got)
                    self._unsaved.add(node.ino)
                    self.usage += got
                    self.fetched(node.ino)
        finally:  # (cancelled too: a reader or writer waiting on one must never wait on)
            for node, _path in batch:
                ev = self._inflight.pop((node.ino, 0), None)
                if ev is not None:
                    ev.set()


def _load_syncfs() -> Callable[[int], int] | None:
    fn: Any = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    return fn  # type: ignore[no-any-return]  # (a ctypes foreign function: int -> int)


_syncfs = _load_syncfs()


def _fdatasync_all(paths: list[str], data_dir: str) -> None:
    """Make the content files at ``paths`` durable. Many at once (a cold read of a folder
    of small files) take one syncfs of the cache's filesystem: one flush and journal
    commit for all, where a fdatasync each waits for its own (10,000 files of 4 KiB
    here: 0.07-0.09 s against 1.7-1.8 s)."""
    if len(paths) >= SYNCFS_MIN and _syncfs is not None:
        fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _syncfs(fd) == 0:
                return
            err = ctypes.get_errno()
            if err != errno.ENOSYS:
                raise OSError(err, f"syncfs of the cache: {os.strerror(err)}")
        finally:
            os.close(fd)
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)


def _nothing(ino: int) -> None:
    pass
