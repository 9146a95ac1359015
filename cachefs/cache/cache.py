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

import collections
import ctypes
import dataclasses
import errno
import logging
import os
import stat as stat_mod
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import lmdb
import trio

from ..errors import (Busy, CacheError, Exists, InvalidArgument, IsADirectory, NameTooLong, NotADirectory, NotEmpty,
                      NotFound, PermissionDenied, RemoteError, Unavailable)
from ..paths import join as _join
from .transfer import RemoteChanged, fetch_into, fetch_many_into, fetch_small_into, hash_content
from ..store.journal import Op
from ..remote import Remote, SpaceInfo
from ..link.connectivity import Connectivity
from ..store import ranges as rangeset
from ..store.index import (ATTR_DIRTY, CONFLICT, DAMAGED, DIRTY, FULL, KEPT, KERNEL_WRITES, LOCAL_TRUTH, LISTED, ORPHAN, PINNED, ROOT_INO, TARGET, WRITING, Held, Node,
                    Store, Txn, node_from_remote, rebuilt_as_is)

log = logging.getLogger(__name__)
T = TypeVar("T")

SUBFOLDER_PREFETCH = 256  # subfolders listed ahead when a folder is read
WALK_AHEAD = 4  # next sibling folders listed ahead of a walk, folder after folder
SMALL_FILE = 64 << 10  # files at most this big are prefetched with their folder
PREFETCH_FILES = 2000  # at most this many files ...
PREFETCH_BYTES = 32 << 20  # ... or bytes per folder
MEMO_NODES = 20_000  # folder listings kept, in nodes (~600 bytes each; see _children)
THREAD_READ = 256 << 10  # reads at least this large copy in a worker thread
READ_BUFFER = 1 << 20  # the largest read FUSE sends (max_pages 256)
#: fully cached files at least this big are read by the kernel itself (FUSE passthrough,
#: ``Cache._pass_through``); smaller ones are served once and then from the FUSE page cache,
#: which passthrough would bypass for two more system calls per open
PASSTHROUGH_MIN = 1 << 20
#: a checkpoint of at least this many content files syncs the cache's filesystem once
#: (syncfs) rather than each file (``_fdatasync_all``)
SYNCFS_MIN = 32
#: content sums of at most this many bytes in all are computed on the trio thread (a
#: SHA-256 of 4 KiB takes ~3 us here, 64 KiB ~40, a thread hop ~50-100); more go to a thread
SUM_INLINE_MAX = 64 << 10
#: a clean file made whole larger than this gets no base sum (its hash would hold up the
#: checkpoint: ~1.7 GB/s here); a change of it on the server that keeps its size and mtime
#: second is then not seen, as before base sums
BASE_SUM_MAX = 64 << 20
CONTROL_NAME = b".cachefs"  # hidden at the root: never listed from nor sent to the remote


@dataclass(frozen=True)
class CacheConfig:
    attr_timeout: float = 3.0  # seconds before open() revalidates attributes
    dir_timeout: float = 3.0  # seconds before a listing is fetched again
    chunk_size: int = 4 << 20  # unit of content fetches
    readahead: int = 8  # chunks fetched ahead of a sequential reader
    checkpoint_interval: float = 1.0
    passthrough: bool = True  # let the kernel read fully cached files itself, where it can


class Kernel:
    """What the cache asks of the kernel; ``cachefs.fs`` supplies the real one."""

    def invalidate_inode(self, ino: int) -> None:  # drop cached data and attributes
        pass

    def invalidate_entry(self, parent: int, name: bytes) -> None:  # drop a name lookup
        pass

    async def settled(self) -> None:
        """Return once every invalidation asked for so far has reached the kernel."""

    def backing_open(self, fd: int) -> int:
        """Register ``fd`` as a file the kernel reads and writes itself (FUSE passthrough):
        its backing id, or 0 when the kernel or pyfuse3 cannot."""
        return 0

    def backing_close(self, backing_id: int) -> None:
        pass

    @property
    def passthrough(self) -> bool:  # whether backing_open may succeed
        return False

    #: why backing_open cannot succeed, while it cannot (``cachefs status``)
    passthrough_off = "no FUSE mount"


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
        self._orphans: set[int] = set()  # made ORPHAN (unlinked while open) by this process
        self._read_buffers: list[bytearray] = []  # free buffers of large reads
        #: folder -> (its listing generation, children, what callers derived from them)
        #: (see _children and derived)
        self._children_memo: dict[int, tuple[int, list[Node], dict]] = {}
        self._children_gen = -1
        self._children_kept = 0  # nodes held in _children_memo
        self._space: SpaceInfo | None = None
        self._space_at = 0.0
        self._nursery: trio.Nursery | None = None
        self.writers: dict[int, int] = {}  # ino -> handles open for writing
        #: ino -> the content file the kernel reads itself for its open handles
        self._backings: dict[int, _Backing] = {}
        #: folders with journaled changes: their listing is local truth until replayed
        self.local_dirs: dict[int, int] = {}
        self._dir_gen: dict[int, int] = {}  # bumped at each change of a folder's pending work
        #: called after every journal append (the sync manager's write-back trigger)
        self.changed: Callable[[], None] = lambda: None
        #: called after each checkpoint (the hoard's cache-size limit)
        self.after_checkpoint: Callable[[], None] = lambda: None
        self._usage = store.usage()  # content bytes in the cache, kept as a running count
        #: blocking (expected version, path, content path, offset, length) -> bytes fetched;
        #: in a worker thread, or handed on to a worker process (see ``remote.fetch``)
        self.fetcher: Callable[..., int] = partial(fetch_into, self.remote, store.content)
        #: blocking [(expected, path, content path, size)] -> [bytes fetched or None]
        self.batch_fetcher: Callable[..., list] = partial(fetch_many_into, self.remote, store.content)
        #: blocking path -> listing, for folders listed ahead of a reader: handed on to the
        #: worker processes when there are some (parsing a listing is GIL-bound work)
        self.background_lister: Callable[[bytes], list] = self.remote.listdir
        self._small_reads: dict[int, int] = {}  # folder -> small files fetched whole in it
        self._prefetching: set[int] = set()  # folders being listed ahead of a reader
        self._walk_from = ROOT_INO  # the folder of the last lookup or listing (_walk_on)
        self._walks: dict[int, _Walk] = {}  # folder -> the walk through its subfolders
        #: folders to list ahead of a reader, the next one first: consumed by as many
        #: listers as there are connections but one (short calls find one free)
        self._listing_queue: collections.deque[int] = collections.deque()
        self._listing_lot = trio.lowlevel.ParkingLot()
        self._listers = max(1, int(conn.limiter.total_tokens) - 1)
        self._prefetched: set[int] = set()  # folders whose small files were prefetched
        self._last_use: dict[int, float] = {}
        #: files whose content changed with no checksum of it recorded yet: summed when no
        #: writer has them open, at the next commit (``commit_changes``)
        self._unsummed: set[int] = set(store.unsummed)
        #: one commit at a time: the replays of a batch that each meet an uncommitted
        #: change wait for one commit instead of hashing the same files side by side
        self._committing = trio.Lock()

    # -- life cycle --------------------------------------------------------------------
    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background work (read-ahead fetches, checkpoints). Runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            nursery.start_soon(self._list_root)
            for _ in range(self._listers):
                nursery.start_soon(self._list_ahead)
            try:
                while True:
                    await trio.sleep(self.config.checkpoint_interval)
                    try:
                        await self.checkpoint()
                        self.after_checkpoint()
                        self.store.reserve()
                    except (OSError, lmdb.Error) as exc:  # a full disk: retried next time
                        log.error("checkpoint failed (retrying): %s", exc)
            finally:
                with trio.CancelScope(shield=True):
                    await self.checkpoint()

    async def _list_root(self) -> None:
        """List the root at start, so that a user who goes offline at once can still
        create files in it."""
        try:
            rstat = await self.conn.call(self.remote.stat, b"")
            root = self.node(ROOT_INO)
            if root.flags & (DIRTY | ATTR_DIRTY):
                return await self.listdir(ROOT_INO)  # a local change of the root is pending
            root.mode, root.mtime_ns, root.atime_ns = rstat.mode, rstat.mtime_ns, rstat.atime_ns
            root.ctime_ns, root.base = rstat.mtime_ns, rstat.version()
            self.store.put(root)
            await self.listdir(ROOT_INO)
        except (Unavailable, RemoteError, NotFound) as exc:
            log.debug("root listing at start: %s", exc)

    async def checkpoint(self) -> None:
        """Make fetched content durable, then record it in the index (in that order,
        so the index never claims bytes that a power loss could take back)."""
        await self.commit_changes()
        if not self._unsaved:
            return
        todo = {ino: list(self._ranges.get(ino, [])) for ino in self._unsaved}
        self._unsaved.clear()
        try:
            paths = [self.store.content_path(ino) for ino in todo]
            await trio.to_thread.run_sync(_fdatasync_all, paths, str(self.store.data_dir))
            full = {ino for ino, rs in todo.items() if self._covers_all(ino, rs)}
            self._kept_made_full(self.store.save_ranges(todo, full))
            await trio.to_thread.run_sync(self.store.sync)
        except BaseException:
            # The next checkpoint tries them again (content dropped meanwhile excepted).
            self._unsaved.update(ino for ino in todo if ino in self._ranges)
            raise
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

    async def lookup(self, parent: int, name: bytes, *, shared: bool = False) -> Node:
        """The entry ``name`` of folder ``parent``. ``shared``: the caller only reads the
        node, which may then be the one in the folder's kept listing (no index read)."""
        if len(name) > 255:
            raise NameTooLong()
        if shared and parent == self._walk_from \
                and self._fresh(self._listed_at, parent, self.config.dir_timeout):
            names = self._kept_names(parent)
            if names is not None:
                child = names.get(name)
                if child is None:
                    raise NotFound()
                return child
        pnode = self.node(parent)
        if not pnode.is_dir:
            raise NotADirectory()
        if parent != self._walk_from:
            self._walk_on(pnode)
        await self._ensure_listing(pnode)
        child = self.store.child(parent, name)
        if child is None:
            raise NotFound()
        return child

    async def listdir(self, ino: int, refresh: bool = False,
                      prefetch_subfolders: bool = False) -> list[Node]:
        node = self.node(ino)
        if not node.is_dir:
            raise NotADirectory()
        if ino != self._walk_from:
            self._walk_on(node)
        if refresh and self.conn.online:
            self._listed_at.pop(ino, None)
        await self._ensure_listing(node)
        children = self._children(ino)
        if prefetch_subfolders and self.conn.online and self._nursery is not None:
            # A program reading a folder (ls -R, find, du, a build) usually goes on into
            # its subfolders, in order, and deep first: list the stale ones now, side by
            # side, in the background, ahead of the folders queued before.
            self._list_ahead_of_reader([c.ino for c in children if c.is_dir], SUBFOLDER_PREFETCH)
        return children

    def _list_ahead_of_reader(self, folders: list[int], most: int) -> None:
        """Queue the first ``most`` of ``folders`` whose listings are stale, to be listed
        in the background before the folders queued earlier, in this order."""
        stale = [f for f in folders if f not in self._prefetching
                 and not self._fresh(self._listed_at, f, self.config.dir_timeout)][:most]
        for folder in reversed(stale):
            self._prefetching.add(folder)
            self._listing_queue.appendleft(folder)
        self._listing_lot.unpark(count=len(stale))

    def _walk_on(self, folder: Node) -> None:
        """Lookups or listings moved on to ``folder``. When the folder of its parent's
        that they were in last is its previous sibling (in the order the parent lists
        them: by name, or by the names' keyed hashes in an encrypted cache), a program is
        walking a tree folder after folder (a reader of every file, make, tar): the
        siblings that come next are listed in the background now, so that a walk again
        after ``dir_timeout`` does not wait for each folder's listing in turn. (Between
        two siblings, lookups also go to the parent, for the next sibling's own name.)
        Listing a folder queues its stale subfolders at once, but those listed in the
        last ``dir_timeout`` go stale one after the other while the walk goes on.

        The order of the parent's subfolders is taken from its kept listing (no store
        read), and kept here after that listing is dropped (any write drops them all): it
        only says which folders to list early."""
        self._walk_from = folder.ino
        if folder.ino == ROOT_INO or self._nursery is None or not self.conn.online:
            return
        walk = self._walks.get(folder.parent)
        if walk is None:
            if len(self._walks) >= 4096:
                self._walks.clear()
            walk = self._walks[folder.parent] = _Walk()
        last, walk.last = walk.last, folder.ino
        kept = self._kept(folder.parent)
        if kept is not None:
            walk.order = _derived(kept, "subfolders", _subfolder_order)
        subfolders, position = walk.order
        at = position.get(folder.ino)
        if at and subfolders[at - 1] == last:
            self._list_ahead_of_reader(subfolders[at + 1:at + 1 + WALK_AHEAD], WALK_AHEAD)

    def _children(self, ino: int) -> list[Node]:
        """``store.children``, kept while nothing that could change it was written since:
        no write transaction but the refresh of other folders' listings (a program that
        walks a tree again, find or make, lists the same folders: reading and unpacking
        every entry was most of an opendir). Callers must not change the nodes."""
        kept = self._kept(ino)
        if kept is not None:
            return kept[1]
        return self._keep_children(ino, self.store.children(ino))

    def _kept(self, ino: int) -> tuple[int, list[Node], dict] | None:
        """The folder's kept listing (generation, children, derived), if no write since."""
        self._memo_current()
        kept = self._children_memo.get(ino)
        return kept if kept is not None and kept[0] == self.store.folder_generation.get(ino, 0) else None

    def _kept_names(self, ino: int) -> dict[bytes, Node] | None:
        """The folder's kept listing by name, if it is kept."""
        kept = self._kept(ino)
        return None if kept is None else _by_name(kept)

    def _kept_made_full(self, nodes: list[Node]) -> None:
        """The checkpoint has just marked ``nodes`` whole in the index (``save_ranges``):
        mark their copies in the kept listings, which then stay kept. (A cold read of a
        folder's files dropped its kept listing, and the next listing of the folder read
        and compared every record again.) A kept listing is kept only if it was current
        just before: one generation behind its folder's now."""
        self._memo_current()
        by_folder: dict[int, list[Node]] = collections.defaultdict(list)
        for node in nodes:
            by_folder[node.parent].append(node)
        for folder, made_full in by_folder.items():
            kept = self._children_memo.get(folder)
            generation = self.store.folder_generation.get(folder, 0)
            if kept is None or kept[0] != generation - 1:
                continue
            names = _by_name(kept)
            # (by inode too: an orphan, unlinked while open, keeps a name that a new file
            # may have taken since)
            copies = [names.get(node.name) for node in made_full]
            if all(copy is not None and copy.ino == node.ino for copy, node in zip(copies, made_full)):
                for copy in copies:
                    copy.flags |= FULL
                self._children_memo[folder] = (generation, kept[1], kept[2])

    def derived(self, ino: int, children: list[Node], key: str, make: Callable[[list[Node]], T]) -> T:
        """``make(children)``, made once and kept with the folder's kept listing while that
        is ``children`` (from ``listdir``); made every time when they are not kept."""
        self._memo_current()
        kept = self._children_memo.get(ino)
        return _derived(kept, key, make) if kept is not None and kept[1] is children else make(children)

    def _memo_current(self) -> None:
        if self._children_gen != self.store.generation:  # a write that may touch any folder
            self._children_memo.clear()
            self._children_kept = 0
            self._children_gen = self.store.generation

    def _keep_children(self, ino: int, children: list[Node], same: bool = False) -> list[Node]:
        """Remember ``children`` as the folder's entries as of now (read after the last
        write), within the memo's cap. ``same``: they equal the kept ones, if any: those
        stay (and so does what was ``derived`` from them)."""
        if same and (current := self._kept(ino)) is not None:
            return current[1]
        kept = self._children_memo.get(ino)  # (current or not: the count drops it)
        grows = len(children) - (len(kept[1]) if kept else 0)
        if self._children_kept + grows <= MEMO_NODES:
            self._children_kept += grows
            self._children_memo[ino] = (self.store.folder_generation.get(ino, 0), children, {})
        return children

    async def _list_ahead(self) -> None:
        """One of the listers of ``_listing_queue``; runs until cancelled. (Tasks started
        one per folder would run in any order: trio may reverse a batch.)"""
        while True:
            while not self._listing_queue:
                await self._listing_lot.park()
            queued = self._listing_queue.popleft()
            try:
                node = self.store.get(queued)  # as it is now: queued a while ago
                if node is not None and node.is_dir:
                    await self._ensure_listing(node, self.background_lister)
            except (Unavailable, RemoteError, NotFound, CacheError, KeyError):
                pass  # only a head start (KeyError: removed under a lister's path walk)
            finally:
                self._prefetching.discard(queued)

    async def _ensure_listing(self, node: Node, lister: Callable[[bytes], list] | None = None) -> None:
        """Fetch the folder's listing when ours is missing or older than dir_timeout.
        ``lister``: the blocking call that lists it (the remote's own by default)."""
        if self._fresh(self._listed_at, node.ino, self.config.dir_timeout) \
                or self.local_dirs.get(node.ino) or (node.has(LISTED) and self._path_pending(node)):
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
            generation = self._dir_gen.get(node.ino, 0)
            try:
                listing = await self.conn.call(lister or self.remote.listdir, path)
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
            if self._dir_gen.get(node.ino, 0) != generation or self.local_dirs.get(node.ino):
                # The folder changed here while the listing was on its way: the listing
                # may predate that change, and the local entries are the truth for now.
                return
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
        children = self._unchanged_listing(ino, kept)
        changed: list[Node] = []
        removed: list[Node] = []
        if children is None:
            delta = self.store.apply_listing(ino, kept, node_from_remote)
            # The opendir that asked reads them next. A listing that found nothing new
            # keeps the kept list, and with it what opendir derived from it.
            children = self._keep_children(ino, delta.children, same=delta.same)
            changed, removed = delta.changed, delta.removed
        now = time.monotonic()
        self._listed_at[ino] = now
        for child in children:
            self._checked_at[child.ino] = now
        self._prefetched.discard(ino)
        self._small_reads.pop(ino, None)
        for node in changed:
            self._stale(node.ino)
        for node in removed:
            self._forget_content(node.ino)
            self.kernel.invalidate_entry(ino, node.name)

    def _unchanged_listing(self, ino: int, listing: list) -> list[Node] | None:
        """The folder's kept children, when the remote's listing says nothing they do not
        say already: no name came or went, and ``node_from_remote`` would rebuild each
        node as it is. Then the index is neither read nor written (``apply_listing`` took
        ~650 us for 100 unchanged entries, run again for every folder opened after
        ``--attr-timeout``). None: let ``apply_listing`` decide."""
        kept = self._kept(ino)
        folder = self.store.get(ino) if kept is not None else None
        if folder is None or not folder.has(LISTED):
            return None
        names = _by_name(kept)
        subdirs = 0
        for name, rstat in listing:
            node = names.get(name)
            if node is None:
                return None
            if stat_mod.S_ISDIR(rstat.mode):
                subdirs += 1
            if node.flags & LOCAL_TRUTH:
                continue  # (local changes win until they are replayed)
            if not rebuilt_as_is(node, rstat):
                return None
        if len(names) != len(listing):  # kept but not listed: only local names may be
            listed = {name for name, _rstat in listing}
            if any(not node.flags & (DIRTY | DAMAGED | KEPT) for name, node in names.items()
                   if name not in listed):  # (what apply_listing keeps of names gone there)
                return None
        if folder.nlink != 2 + subdirs:
            return None
        return kept[1]

    async def _vanished(self, node: Node) -> None:
        """The remote says this object is gone: list its parent again."""
        self._listed_at.pop(node.parent, None)
        parent = self.store.get(node.parent)
        if parent is not None:
            try:
                await self._ensure_listing(parent)
            except (Unavailable, RemoteError, NotFound):
                pass

    def _path_pending(self, node: Node) -> bool:
        """Whether a folder on the node's path has journaled changes: the remote may not
        have the node under this path yet (a rename not yet replayed), so asking the
        remote about it now would wrongly say it is gone."""
        if not self.local_dirs:
            return False  # nothing journaled: the common case, no walk
        ino = node.parent if node.ino != ROOT_INO else ROOT_INO
        for _ in range(4096):
            if self.local_dirs.get(ino):
                return True
            if ino == ROOT_INO:
                return False
            parent = self.store.get(ino)
            if parent is None:
                return False
            ino = parent.parent
        return False

    def _stale(self, ino: int) -> None:
        """The remote content changed: drop what we cached of it and tell the kernel."""
        log.debug("stale content dropped: inode %d", ino)
        backing = self._backings.get(ino)
        if backing is not None and not backing.detached:
            # The kernel reads this content file itself for the handles open now: they
            # keep it, whole, as the old version, and the cache starts a new one.
            backing.detached = True
            self.store.remove_content_file(ino)
        node = self.store.get(ino)
        if node is not None:
            self._usage -= rangeset.total(self.store.get_ranges(ino))
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
    async def open(self, ino: int, flags: int = os.O_RDONLY) -> "OpenFile":
        """Close-to-open: revalidate attributes older than attr_timeout.

        A file opened for writing is made whole in the cache first (its upload will be
        the whole file), unless it is being truncated to nothing.
        """
        node = self.node(ino)
        if node.is_dir:
            raise IsADirectory()
        known = node
        if not node.flags & LOCAL_TRUTH and self.conn.online \
                and not self._fresh(self._checked_at, ino, self.config.attr_timeout) \
                and not self._path_pending(node):
            node = await self._revalidate(node)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable and not flags & os.O_TRUNC and not node.has(FULL) and node.size:
            await self._ensure_present(node, 0, node.size)
        if writable and flags & os.O_TRUNC:
            await self._settle_fetches(ino)  # no fetch may land after the truncation
        if writable and (not flags & os.O_TRUNC or node.has(FULL)
                         or rangeset.covers(self._ranges.get(ino, []), 0, node.size)):
            await self._record_base_sum(node)  # (whole now, even if not yet checkpointed)
        fd = os.open(self.store.content_path(ino), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # (changed: the kernel drops its pages of the old version at this open itself,
        # rather than when the invalidation asked for by _stale reaches it)
        handle = OpenFile(ino, fd, writable, size_at_open=node.size, changed=node is not known)
        try:
            self._pass_through(handle, node)
        except BaseException:
            os.close(fd)
            raise
        self._open_count[ino] = self._open_count.get(ino, 0) + 1
        self._last_use[ino] = time.time()
        if writable:
            self.writers[ino] = self.writers.get(ino, 0) + 1
            if flags & os.O_TRUNC and node.size:
                self.truncate(handle, 0)
            elif not node.has(FULL):
                self._mark_full(ino)
        return handle

    def _pass_through(self, handle: "OpenFile", node: Node) -> None:
        """Let the kernel read (and write) this open's content file itself: FUSE passthrough.

        The kernel takes passthrough for an inode only while no open of it uses the page
        cache, and then takes only passthrough opens of it, all on one backing file, until
        the last closes. So: a read-only open of a whole, clean, large file that nothing
        has open starts it; while it lasts every open joins it. A writer that joins writes
        past the cache: its change is journaled now (the file is DIRTY from this open on,
        so a kill loses nothing), and its size and times are read from the content file
        while it is open and at its release. When the remote changes meanwhile the open
        handles keep the old content file, whole (``_stale``); a writer cannot join them
        then (EBUSY), since what it wrote would go to that old version.
        """
        ino = handle.ino
        backing = self._backings.get(ino)
        if backing is None:
            if handle.writable or node.size < PASSTHROUGH_MIN or self._open_count.get(ino) \
                    or node.flags & (DIRTY | CONFLICT) or not self.passthrough_on:
                return
            if not node.has(FULL) and not rangeset.covers(self._ranges.get(ino, []), 0, node.size):
                return  # (whole but not yet checkpointed is whole enough to read)
            backing_id = self.kernel.backing_open(handle.fd)
            if not backing_id:
                return
            backing = self._backings[ino] = _Backing(backing_id)
        elif handle.writable:
            if backing.detached:
                raise Busy("the file is open and its old version in use: close it first")
            def join(t: Txn) -> None:
                node = t.node(ino)
                node.flags |= KERNEL_WRITES
                self._content_changed(t, node)
            self.store.transact(join)
            backing.writers += 1
            handle.wrote = True
            handle.stamp = _stamp(os.fstat(handle.fd))
        backing.opens += 1
        handle.backing = backing.id

    def _release_backing(self, handle: "OpenFile") -> None:
        ino = handle.ino
        backing = self._backings[ino]
        backing.opens -= 1
        if handle.writable:
            backing.writers -= 1
        if not backing.opens:
            del self._backings[ino]
            self.kernel.backing_close(backing.id)
        if handle.writable:  # (last: an index write that fails leaves the counts right)
            self._take_written(handle, last=not backing.writers)

    def _take_written(self, handle: "OpenFile", last: bool) -> None:
        """What the kernel wrote through a passthrough writer, into the index: the content
        file's size, and its mtime if it changed; ``last``: no other such writer is open."""
        st = os.fstat(handle.fd)
        changed = _stamp(st) != handle.stamp

        def take(t: Txn) -> None:
            node = t.node(handle.ino)
            if node is None:
                return
            node.size = st.st_size
            if changed:
                node.mtime_ns = st.st_mtime_ns
                node.ctime_ns = time.time_ns()
            node.flags |= FULL
            if last:
                node.flags &= ~KERNEL_WRITES
            self._content_changed(t, node)
        self.store.transact(take)
        # The page cache of this inode, from opens before the passthrough, is out of date.
        self.kernel.invalidate_inode(handle.ino)

    def written_through(self, node: Node) -> Node:
        """The node with the size and mtime of its content file while the kernel may be
        writing that file itself (a passthrough writer is open); else the node as is."""
        backing = self._backings.get(node.ino)
        if backing is None or not backing.writers:
            return node
        try:
            st = os.stat(self.store.content_path(node.ino))
        except OSError:
            return node
        return dataclasses.replace(node, size=st.st_size, mtime_ns=max(node.mtime_ns, st.st_mtime_ns))

    def release(self, handle: "OpenFile") -> None:
        ino = handle.ino
        try:
            if handle.backing:
                self._release_backing(handle)
        finally:
            os.close(handle.fd)
            _decrement(self._open_count, ino)
            if handle.writable:
                _decrement(self.writers, ino)
        held = self.store.held.get(ino) if handle.writable else None
        if held is not None and ino not in self.writers:
            held.open = False  # (the checkpoint commits it: _commit_held)
        if handle.wrote:
            node = held or self.store.get(ino)
            if node is not None:
                self._usage += node.size - handle.size_at_open
            self.changed()
        if ino not in self._open_count and ino in self._orphans:  # (no index read per close)
            self._orphans.discard(ino)
            node = self.store.get(ino)
            if node is not None and node.has(ORPHAN):
                self.store.transact(lambda t: t.delete_node(ino))
                self.store.remove_content_file(ino)

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

        A small read runs on the trio thread when the page cache holds its bytes (a
        thread hop would cost more than the read); others go to a thread. The content
        file is read ahead by the kernel's own readahead: a POSIX_FADV_WILLNEED ahead
        of the reader, tried before, halved the disk's rate with threads reading.
        """
        node = self.node(handle.ino)
        end = min(offset + size, node.size)
        if offset >= end:
            return b""
        if not node.has(FULL):
            await self._ensure_present(node, offset, end)
        content = self.store.content
        size = end - offset
        if size < THREAD_READ:
            data = content.pread_cached(handle.fd, size, offset)
            if data is None:
                data = await trio.to_thread.run_sync(content.pread, handle.fd, size, offset)
            return data  # (maybe a view into a reused buffer: no await before the reply)
        # A large read copies a megabyte out of the page cache: in a thread, so that the
        # kernel's parallel readahead requests are copied on both cores while this one
        # sends replies. Each buffer is reused once its reply is out, which pyfuse3 sends
        # before trio runs anything else (callbacks included).
        buf = self._read_buffers.pop() if self._read_buffers else bytearray(0)
        if len(buf) < size:
            buf = bytearray(max(size, READ_BUFFER))
        view = memoryview(buf)[:size]
        try:
            got = await trio.to_thread.run_sync(content.pread_into, handle.fd, view, offset)
        finally:
            trio.lowlevel.current_trio_token().run_sync_soon(self._read_buffers.append, buf)
        return view[:got]

    def cached_bytes(self) -> int:
        """Content bytes in the cache (a running count; exact after a restart)."""
        return max(0, self._usage)

    @property
    def passthrough_on(self) -> bool:
        """Whether the kernel may read whole cached files itself (``_pass_through``)."""
        return self.config.passthrough and self.kernel.passthrough and not self.store.content.encrypted

    def passthrough_status(self) -> dict:
        """Whether the kernel reads whole cached files itself, how many are open so, and
        why not ("off") when it does not."""
        status: dict[str, object] = {"on": self.passthrough_on, "open_files": len(self._backings)}
        if not status["on"]:
            status["off"] = ("--no-passthrough" if not self.config.passthrough else
                             "the cache is encrypted" if self.store.content.encrypted else
                             self.kernel.passthrough_off)
        return status

    def is_open(self, ino: int) -> bool:
        return bool(self._open_count.get(ino))

    def last_use(self, node: Node) -> float:
        return self._last_use.get(node.ino, node.last_use)

    def evict_content(self, node: Node) -> int:
        """Drop the cached content of a clean, unpinned, closed file; bytes freed."""
        node = self.store.get(node.ino)
        if node is None or not node.is_file or node.flags & (DIRTY | PINNED | CONFLICT | DAMAGED | KEPT) \
                or self.is_open(node.ino):
            return 0
        freed = node.size if node.has(FULL) else rangeset.total(self._known_ranges(node.ino))
        if freed or node.has(FULL):
            self._forget_content(node.ino)
            self.store.drop_content(node.ino)
            self._usage -= freed
        return freed

    async def fetch_whole(self, node: Node) -> None:
        """All of a file's content into the cache (pinning), a window of chunks at a time."""
        node = self.node(node.ino)
        if not node.is_file or node.has(FULL):
            return
        window = self.config.chunk_size * 16
        for start in range(0, node.size, window):
            await self._ensure_present(node, start, min(node.size, start + window), readahead=False)
        if node.size == 0:
            self._mark_full(node.ino)

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

    async def _ensure_present(self, node: Node, start: int, end: int, readahead: bool = True,
                              retry: bool = True) -> None:
        ino = node.ino
        known = self._known_ranges(ino)
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
        if rangeset.covers(self._known_ranges(ino), start, end):
            return
        for idx in wanted:
            exc = self._fetch_errors.pop((ino, idx), None)
            if exc is not None:
                raise exc
        if not self.conn.online:
            raise Unavailable("content not cached")
        if retry:  # a prefetch that could not bring it: fetch it the ordinary way
            return await self._ensure_present(node, start, end, readahead, retry=False)
        # The remote file is shorter than we were told: it changed under us.
        self._checked_at.pop(ino, None)
        raise RemoteError(errno.EIO, "remote file changed while being read")

    async def _settle_fetches(self, ino: int) -> None:
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
                if gap_start == 0 and gap_end == node.size <= SMALL_FILE:
                    # A small file whole: two round trips in this process beat a hop to a
                    # fetch process.
                    got = await self.conn.call(fetch_small_into, self.remote, self.store.content,
                                               node.base, path, self.store.content_path(ino), node.size)
                else:
                    got = await self.conn.call(self.fetcher, node.base, path, self.store.content_path(ino),
                                               gap_start, gap_end - gap_start, bulk=True)
                if self.store.get(ino) is None:
                    self.store.remove_content_file(ino)
                    return  # the node went away meanwhile
                if got:
                    self._ranges[ino] = rangeset.add(self._known_ranges(ino), gap_start, gap_start + got)
                    self._unsaved.add(ino)
                    self._usage += got
                if got < gap_end - gap_start:
                    break
            if cstart == 0 and node.size <= SMALL_FILE:
                self._note_small_read(node.parent)
        except RemoteChanged:
            # The remote file changed under the fetch: what we have of it may mix two
            # versions. Drop it all; the next open sees the new version.
            log.info("remote %r changed while being read: cached content dropped", path)
            self._stale(ino)
            self._checked_at.pop(ino, None)
            self._fetch_errors[key] = RemoteError(errno.EIO, "remote file changed while being read")
        except (Unavailable, RemoteError, OSError) as exc:
            self._fetch_errors[key] = exc
        except Exception as exc:  # a background task must never end the mount
            log.exception("fetch of %r failed", path)
            self._fetch_errors[key] = RemoteError(errno.EIO, f"fetch failed: {exc}")
        finally:
            self._inflight.pop(key, None)
            ev.set()

    # -- prefetching a folder's small files ------------------------------------------------
    def _note_small_read(self, folder: int) -> None:
        """A second small file read whole in a folder looks like a program going through
        its files (a build, grep -r, tar): fetch the rest of its small files at once."""
        count = self._small_reads[folder] = self._small_reads.get(folder, 0) + 1
        if count == 2 and folder not in self._prefetched and self._nursery is not None:
            self._prefetched.add(folder)
            self._nursery.start_soon(self._prefetch_folder, folder)

    async def _prefetch_folder(self, folder: int) -> None:
        try:
            folder_path = self.store.path_of(folder)
        except KeyError:
            return
        chosen: list[Node] = []
        total = 0
        for child in self._children(folder):
            if not child.is_file or not 0 < child.size <= SMALL_FILE or child.flags & (FULL | DIRTY):
                continue
            if (child.ino, 0) in self._inflight or child.ino in self._ranges or self.store.get_ranges(child.ino):
                continue
            chosen.append(child)
            total += child.size
            if len(chosen) >= PREFETCH_FILES or total >= PREFETCH_BYTES:
                break
        if not chosen:
            return
        log.debug("prefetching %d small files in %r: %r", len(chosen), folder_path,
                  [c.name for c in chosen[:8]])
        lanes = max(1, int(self.conn.bulk_limiter.total_tokens))
        size = max(1, min(200, -(-len(chosen) // lanes)))
        for i in range(0, len(chosen), size):
            batch = chosen[i:i + size]
            events = []
            for child in batch:
                ev = self._inflight[(child.ino, 0)] = trio.Event()
                events.append(ev)
            self._nursery.start_soon(self._fetch_batch, folder_path, batch, events)

    async def _fetch_batch(self, folder_path: bytes, batch: list[Node], events: list[trio.Event]) -> None:
        items = [(n.base, _join(folder_path, n.name), self.store.content_path(n.ino), n.size) for n in batch]
        try:
            results = await self.conn.call(self.batch_fetcher, items, bulk=True)
        except Exception as exc:  # noqa: BLE001 - a prefetch only helps; readers fetch themselves
            log.debug("prefetch in %r failed: %s", folder_path, exc)
            results = [None] * len(batch)
        finally:
            for node, ev in zip(batch, events):
                self._inflight.pop((node.ino, 0), None)
        for node, got in zip(batch, results):
            if got and self.store.get(node.ino) is not None:
                self._ranges[node.ino] = rangeset.add(self._known_ranges(node.ino), 0, got)
                self._unsaved.add(node.ino)
                self._usage += got
        for ev in events:
            ev.set()

    # -- changes: each updates the cache and appends to the journal in one transaction --
    def _journal(self, t: Txn, op: Op) -> None:
        t.append(op)
        self._hold_folders(op.folders())

    def op_done(self, op: Op) -> None:
        """The sync manager replayed or dropped ``op``: its folders may be listed again."""
        self._release_folders(op.folders())

    def op_replaced(self, old: Op, new: Op) -> None:
        """The sync manager rewrote journal entry ``old`` as ``new`` (see ``optimise``)."""
        before, after = old.folders(), new.folders()
        self._release_folders(before - after)
        self._hold_folders(after - before)

    def _hold_folders(self, folders: set[int]) -> None:
        for folder in folders:
            self.local_dirs[folder] = self.local_dirs.get(folder, 0) + 1
            self._dir_gen[folder] = self._dir_gen.get(folder, 0) + 1

    def _release_folders(self, folders: set[int]) -> None:
        for folder in folders:
            _decrement(self.local_dirs, folder)
            self._dir_gen[folder] = self._dir_gen.get(folder, 0) + 1
            self._listed_at.pop(folder, None)

    def rebuild_local_dirs(self) -> None:
        self.local_dirs.clear()
        for op in self.store.journal_ops():
            for folder in op.folders():
                self.local_dirs[folder] = self.local_dirs.get(folder, 0) + 1

    async def _folder_for_change(self, parent: int) -> Node:
        """A folder whose listing is known (so names can be checked), for a change in it."""
        pnode = self.node(parent)
        if not pnode.is_dir:
            raise NotADirectory()
        await self._ensure_listing(pnode)
        return pnode

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > 255:
            raise NameTooLong()
        if not _valid_name(name):
            raise InvalidArgument("bad name")
        if name == CONTROL_NAME:
            raise PermissionDenied("the name .cachefs is reserved")

    def _touch_dir(self, t: Txn, parent: int, now: int, links: int = 0) -> None:
        """A folder's entries changed: its times, and its link count when subfolders
        came (``links`` > 0) or went."""
        pnode = t.node(parent)
        if pnode is not None:
            pnode.mtime_ns = pnode.ctime_ns = now
            pnode.nlink = max(2, pnode.nlink + links)
            t.put(pnode)

    def _new_node(self, t: Txn, parent: int, name: bytes, mode: int, now: int, **kw) -> Node:
        ino = t.new_ino()
        node = Node(ino=ino, parent=parent, name=name, mode=mode, size=0, mtime_ns=now,
                    atime_ns=now, ctime_ns=now, **kw)
        t.put(node)
        t.set_entry(parent, name, ino)
        self._touch_dir(t, parent, now)
        return node

    def _new_child(self, parent: int, name: bytes, build) -> Node:
        self._check_name(name)
        if self.store.child(parent, name) is not None:
            raise Exists()
        node = self.store.transact(build)
        self.changed()
        return node

    async def create(self, parent: int, name: bytes, mode: int, flags: int) -> tuple[Node, "OpenFile"]:
        await self._folder_for_change(parent)
        now = time.time_ns()

        def build(t: Txn) -> Node:
            node = self._new_node(t, parent, name, stat_mod.S_IFREG | (mode & 0o7777), now,
                                  flags=FULL | DIRTY | WRITING, gen=1)
            self._journal(t, Op("create", node.ino, t.path_of(node.ino), parent=parent,
                                mode=node.mode))
            return node

        node = self._new_child(parent, name, build)
        fd = self.store.new_content_file(node.ino)
        self.store.held[node.ino] = Held(node.size, node.mtime_ns, node.ctime_ns)
        self._unsummed.add(node.ino)
        self._open_count[node.ino] = self._open_count.get(node.ino, 0) + 1
        self.writers[node.ino] = self.writers.get(node.ino, 0) + 1
        return node, OpenFile(node.ino, fd, writable=True, wrote=True)

    async def mkdir(self, parent: int, name: bytes, mode: int) -> Node:
        await self._folder_for_change(parent)
        now = time.time_ns()

        def build(t: Txn) -> Node:
            node = self._new_node(t, parent, name, stat_mod.S_IFDIR | (mode & 0o7777), now,
                                  flags=LISTED, nlink=2)
            self._touch_dir(t, parent, now, links=1)
            self._journal(t, Op("mkdir", node.ino, t.path_of(node.ino), parent=parent,
                                mode=node.mode))
            return node

        node = self._new_child(parent, name, build)
        self._listed_at[node.ino] = time.monotonic()
        return node

    async def symlink(self, parent: int, name: bytes, target: bytes) -> Node:
        await self._folder_for_change(parent)
        now = time.time_ns()

        def build(t: Txn) -> Node:
            node = self._new_node(t, parent, name, stat_mod.S_IFLNK | 0o777, now,
                                  flags=TARGET, target=target)
            node.size = len(target)
            t.put(node)
            self._journal(t, Op("symlink", node.ino, t.path_of(node.ino), parent=parent,
                                target=target))
            return node

        return self._new_child(parent, name, build)

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Node:
        await self._folder_for_change(new_parent)
        node = self.node(ino)
        if node.is_dir:
            raise PermissionDenied("hard links to folders are not allowed")
        now = time.time_ns()

        def build(t: Txn) -> Node:
            n = t.node(ino)
            n.nlink += 1
            n.ctime_ns = now
            t.put(n)
            t.set_entry(new_parent, new_name, ino)
            t.add_link_name(ino, n.parent, n.name)
            t.add_link_name(ino, new_parent, new_name)
            self._touch_dir(t, new_parent, now)
            self._journal(t, Op("link", ino, t.path_of(ino), base=n.base,
                                dst=_join(t.path_of(new_parent), new_name), dst_parent=new_parent))
            return n

        return self._new_child(new_parent, new_name, build)

    def write(self, handle: "OpenFile", offset: int, data: bytes) -> int:
        """Bytes into the content file; the new size and times into memory (``Held``).

        The index is written before the first write of an open lands: the file is
        changed (DIRTY, journaled) and ``WRITING``, so that after a kill its record takes
        the content file's length. The size and times reach the index with its next
        write of the record, at the latest at the checkpoint after the last release.
        A commit per write cost a create of a small file ~40 us of its ~390.
        """
        ino = handle.ino
        held = self.store.held.get(ino)
        if held is None or not held.open:
            def start(t: Txn) -> Node | None:
                node = t.node(ino)
                if node is not None:
                    node.flags |= WRITING
                    self._content_changed(t, node)
                return node
            node = self.store.transact(start)
            if node is not None:
                held = self.store.held[ino] = Held(node.size, node.mtime_ns, node.ctime_ns)
        written = self.store.content.pwrite(handle.fd, data, offset)
        if held is not None:
            held.size = max(held.size, offset + written)
            held.mtime_ns = held.ctime_ns = time.time_ns()
            # (setuid/setgid are cleared by the kernel, which knows who writes)
            self.store.generation += 1  # kept listings (and their attributes) are older
        handle.wrote = True
        return written

    async def commit_changes(self) -> None:
        """Commit the files whose writers have all closed: their held sizes and times into
        their records (``_commit_held``), then a checksum of each changed file's content
        as it is now, which every upload of that content is checked against. Run by the
        checkpoint, and by a replay that meets a change not yet committed (so that its
        write-back waits for no checkpoint)."""
        async with self._committing:
            self._commit_held()
            if self._unsummed:
                await self._record_sums()

    async def _record_sums(self) -> None:
        """A SHA-256 of each changed file no writer has open, recorded with its generation:
        a write after this one moves the generation first (``_content_changed``), so a sum
        is only ever taken as the content of the generation it names."""
        todo = []
        for ino in list(self._unsummed):
            if self.writers.get(ino) or ino in self.store.held:
                continue  # still being written: summed after its last writer's release
            node = self.store.get(ino)
            if node is None or not node.is_file or node.has(ORPHAN) or not node.has(DIRTY):
                self._unsummed.discard(ino)
                continue
            todo.append((ino, node.gen, node.size, self.store.content_path(ino)))
        if not todo:
            return
        content = self.store.content
        if sum(size for _i, _g, size, _p in todo) <= SUM_INLINE_MAX:
            digests = [hash_content(content, path, size) for _i, _g, size, path in todo]
        else:
            digests = await trio.to_thread.run_sync(
                lambda: [hash_content(content, path, size) for _i, _g, size, path in todo])
        done: list[int] = []

        def record(t: Txn) -> None:
            done.clear()
            for (ino, gen, size, _path), digest in zip(todo, digests):
                node = t.node(ino)
                if node is None:
                    done.append(ino)
                elif node.gen == gen and node.size == size:
                    done.append(ino)
                    if digest is not None:
                        t.set_content_sum(ino, gen, size, digest)
                # (else written again meanwhile: summed at the next commit)
        self.store.run_write(lambda txn: record(Txn(self.store, txn)), folders=set)
        for (ino, _gen, size, _path), digest in zip(todo, digests):
            if digest is None and ino in done:
                log.error("the content of inode %d is shorter than its size (%d bytes) when it "
                          "is committed: it gets no checksum, and will not be uploaded", ino, size)
        self._unsummed.difference_update(done)

    async def _record_base_sum(self, node: Node) -> None:
        """The SHA-256 of a clean file whole in the cache, as a writer opens it: the content
        of its base version, which the replay of the change to come compares with a hash
        the server computes before it replaces the file (a change there that kept the size
        and mtime second). Taken here, not when the file was fetched: only files changed
        here need it (at the checkpoint that makes files whole it cost a cold read of small
        files ~32 us a file), and an upload that lands records the next one for free."""
        if node.base is None or node.size > BASE_SUM_MAX or self.remote.can_hash is False \
                or node.flags & (DIRTY | WRITING | KERNEL_WRITES):
            return
        found = self.store.base_sum(node.ino)
        if found is not None and found.version == node.base:
            return
        path = self.store.content_path(node.ino)
        if node.size <= SUM_INLINE_MAX:
            digest = hash_content(self.store.content, path, node.size)
        else:
            digest = await trio.to_thread.run_sync(hash_content, self.store.content, path, node.size)
        if digest is not None:
            self.store.save_base_sums([(node.ino, node.base, digest)])

    def _commit_held(self) -> None:
        """The size and times of files no longer open for writing into their records,
        ``WRITING`` off, in one transaction."""
        closed = [ino for ino, held in self.store.held.items() if not held.open]
        if not closed:
            return

        def commit(t: Txn) -> None:
            for ino in closed:
                node = t.node(ino)  # (shows the held size and times)
                if node is not None:
                    node.flags &= ~WRITING
                    t.put(node)
        self.store.transact(commit)
        for ino in closed:
            if not self.store.held[ino].open:  # (not opened again meanwhile)
                del self.store.held[ino]

    def _content_changed(self, t: Txn, node: Node) -> None:
        node.gen += 1
        node.flags &= ~DAMAGED  # (edited: the user's own version now, uploaded as any)
        self._unsummed.add(node.ino)
        if not node.has(DIRTY) and not node.has(ORPHAN):
            node.flags |= DIRTY
            self._journal(t, Op("store", node.ino, t.path_of(node.ino), base=node.base,
                                parent=node.parent))
        t.put(node)

    def truncate(self, handle: "OpenFile | None", size: int, ino: int = 0) -> None:
        """The new size is committed first, then the content file cut or grown: a kill in
        between leaves a file whose length differs from the recorded size, which the next
        start fits to it (``Store.fit_dirty_content``). The other order lost data: a file
        cut while the index still had the old size read as empty, or as zeros once written
        past its end, under a size that claimed the old bytes."""
        ino = handle.ino if handle else ino
        log.debug("truncate inode %d to %d", ino, size)
        now = time.time_ns()

        def change(t: Txn) -> None:
            node = t.node(ino)
            node.size = size
            node.mtime_ns = node.ctime_ns = now
            node.flags |= FULL
            node.flags &= ~WRITING  # (a kill before the cut must not take the file's length)
            self._content_changed(t, node)

        self.store.transact(change)
        self.store.held.pop(ino, None)  # the next write holds again, after a commit
        if handle:
            self.store.content.truncate(handle.fd, size)
        else:
            fd = os.open(self.store.content_path(ino), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                self.store.content.truncate(fd, size)
            finally:
                os.close(fd)
        self._ranges.pop(ino, None)
        if handle:
            handle.wrote = True
        self.changed()

    def _mark_full(self, ino: int) -> None:
        def change(t: Txn) -> None:
            node = t.node(ino)
            node.flags |= FULL
            t.put(node)
        self.store.transact(change)

    async def setattr(self, ino: int, *, mode: int | None = None, size: int | None = None,
                      atime_ns: int | None = None, mtime_ns: int | None = None,
                      handle: "OpenFile | None" = None) -> Node:
        node = self.node(ino)
        if size is not None:
            if node.is_dir:
                raise IsADirectory()
            if not node.has(FULL) and size and node.size:
                await self._ensure_present(node, 0, min(size, node.size))
            await self._settle_fetches(ino)
            self.truncate(handle, size, ino)
        if mode is None and atime_ns is None and mtime_ns is None:
            return self.node(ino)
        now = time.time_ns()

        def change(t: Txn) -> Node:
            n = t.node(ino)
            if mode is not None:
                n.mode = stat_mod.S_IFMT(n.mode) | (mode & 0o7777)
            if atime_ns is not None:
                n.atime_ns = atime_ns
            if mtime_ns is not None:
                n.mtime_ns = mtime_ns
            n.ctime_ns = now
            if n.is_symlink or n.has(ORPHAN):
                t.put(n)  # symlink times stay local (SFTP cannot set them); orphans never go
                return n
            if n.has(DIRTY):
                # The pending upload sends the mode and times (a file's upload is a new file
                # with them, renamed over the old): it takes them when it begins, so one
                # under way now must be followed by another (``_agree`` sees the new gen).
                n.gen += 1
                # The content is as it was: its checksum holds for the new generation.
                found = t.content_sum(ino)
                if found is not None and found.gen == n.gen - 1:
                    t.set_content_sum(ino, n.gen, found.size, found.digest)
                else:
                    self._unsummed.add(ino)
            elif not n.has(ATTR_DIRTY):
                n.flags |= ATTR_DIRTY
                self._journal(t, Op("setattr", ino, t.path_of(ino), base=n.base, parent=n.parent))
            t.put(n)
            return n

        node = self.store.transact(change)
        self.changed()
        return node

    async def unlink(self, parent: int, name: bytes) -> None:
        await self._folder_for_change(parent)
        node = self.store.child(parent, name)
        if node is None:
            raise NotFound()
        if node.is_dir:
            raise IsADirectory()
        now = time.time_ns()

        def change(t: Txn) -> None:
            self._journal(t, Op("unlink", node.ino, _join(t.path_of(parent), name), base=node.base,
                                parent=parent))
            t.delete_entry(parent, name)
            self._drop_link(t, node, parent, name, now)
            self._touch_dir(t, parent, now)

        self.store.transact(change)
        self.changed()

    def _drop_link(self, t: Txn, node: Node, parent: int, name: bytes, now: int) -> None:
        """One name of ``node`` is gone (its entry already deleted)."""
        node = t.node(node.ino) or node
        node.nlink = max(0, node.nlink - 1) if not node.is_dir else 0
        node.ctime_ns = now
        if node.nlink > 0 and not node.is_dir:
            if (node.parent, node.name) == (parent, name):
                others = t.names_of(node.ino)
                if others:
                    node.parent, node.name = others[0]
            t.put(node)
            return
        if self._open_count.get(node.ino):
            node.flags |= ORPHAN
            node.parent = 0
            t.put(node)
            self._orphans.add(node.ino)
        else:
            t.delete_node(node.ino)
            self.store.remove_after_commit(node.ino)
        self._forget_content(node.ino)

    async def rmdir(self, parent: int, name: bytes) -> None:
        await self._folder_for_change(parent)
        node = self.store.child(parent, name)
        if node is None:
            raise NotFound()
        if not node.is_dir:
            raise NotADirectory()
        await self._ensure_listing(node)
        now = time.time_ns()

        def change(t: Txn) -> None:
            if t.has_children(node.ino):
                raise NotEmpty()
            self._journal(t, Op("rmdir", node.ino, _join(t.path_of(parent), name), base=node.base,
                                parent=parent))
            t.delete_entry(parent, name)
            t.delete_node(node.ino)
            self._touch_dir(t, parent, now, links=-1)

        self.store.transact(change)
        self._listed_at.pop(node.ino, None)
        self.changed()

    async def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
                     noreplace: bool = False) -> None:
        self._check_name(new_name)
        await self._folder_for_change(parent)
        await self._folder_for_change(new_parent)
        src = self.store.child(parent, name)
        if src is None:
            raise NotFound()
        dst = self.store.child(new_parent, new_name)
        if dst is not None and dst.ino == src.ino:
            return  # same object: rename(2) does nothing
        if src.is_dir:
            ancestor = new_parent
            while ancestor != ROOT_INO:
                if ancestor == src.ino:
                    raise InvalidArgument("cannot move a folder into itself")
                ancestor = self.node(ancestor).parent
        if dst is not None:
            if noreplace:
                raise Exists()
            if dst.is_dir and not src.is_dir:
                raise IsADirectory()
            if src.is_dir and not dst.is_dir:
                raise NotADirectory()
            if dst.is_dir:
                await self._ensure_listing(dst)
        now = time.time_ns()

        def change(t: Txn) -> None:
            if dst is not None and dst.is_dir and t.has_children(dst.ino):
                raise NotEmpty()
            self._journal(t, Op("rename", src.ino, _join(t.path_of(parent), name), base=src.base,
                                parent=parent, dst=_join(t.path_of(new_parent), new_name),
                                dst_parent=new_parent, replaced=dst.ino if dst else 0,
                                replaced_base=dst.base if dst else None))
            t.delete_entry(parent, name)
            if dst is not None:
                t.delete_entry(new_parent, new_name)
                self._drop_link(t, dst, new_parent, new_name, now)
            node = t.node(src.ino)
            if (node.parent, node.name) == (parent, name):
                node.parent, node.name = new_parent, new_name
            node.ctime_ns = now
            t.put(node)
            t.set_entry(new_parent, new_name, src.ino)
            if node.nlink > 1 and not node.is_dir:
                t.add_link_name(src.ino, new_parent, new_name)
            moved_dir = 1 if src.is_dir else 0
            replaced_dir = 1 if dst is not None and dst.is_dir else 0
            self._touch_dir(t, parent, now, links=-moved_dir)
            self._touch_dir(t, new_parent, now, links=moved_dir - replaced_dir)

        self.store.transact(change)
        self.changed()

    def remote_changed(self, ino: int, parent_ino: int, moved_aside: bool = False) -> None:
        """The sync manager changed the remote under this node in a way the cache cannot
        follow by itself (a conflict): list the folder again, drop stale content; a node
        moved aside on the remote is forgotten here so the listing brings both back."""
        self._listed_at.pop(parent_ino, None)
        self._checked_at.pop(ino, None)
        if moved_aside:
            node = self.store.get(ino)
            if node is not None:
                def change(t: Txn) -> None:
                    if t.child_ino(node.parent, node.name) == ino:
                        t.delete_entry(node.parent, node.name)
                    t.delete_node(ino)
                self.store.transact(change)
                self.store.remove_content_file(ino)
                self._forget_content(ino)
                self.kernel.invalidate_entry(node.parent, node.name)
            return
        self._forget_content(ino)
        self.store.drop_content(ino)
        self.kernel.invalidate_inode(ino)

    # -- paths (the control file speaks in paths relative to the mount root) ----------------
    async def resolve_path(self, path: bytes) -> Node:
        node = self.node(ROOT_INO)
        for name in [p for p in path.split(b"/") if p]:
            node = await self.lookup(node.ino, name)
        return node

    async def _parent_and_name(self, path: bytes) -> tuple[int, bytes]:
        head, _, name = path.rstrip(b"/").rpartition(b"/")
        parent = await self.resolve_path(head)
        return parent.ino, name

    async def rename_path(self, src: bytes, dst: bytes) -> None:
        """A rename asked for by the control file (not by the kernel, so tell it)."""
        sp, sn = await self._parent_and_name(src)
        dp, dn = await self._parent_and_name(dst)
        await self.rename(sp, sn, dp, dn)
        self.kernel.invalidate_entry(sp, sn)
        self.kernel.invalidate_entry(dp, dn)

    async def unlink_path(self, path: bytes) -> None:
        parent, name = await self._parent_and_name(path)
        node = await self.lookup(parent, name)
        if node.is_dir:
            await self.rmdir(parent, name)
        else:
            await self.unlink(parent, name)
        self.kernel.invalidate_entry(parent, name)

    def _cached_at(self, path: bytes) -> Node | None:
        """The cached node at a share-relative path, from the index alone."""
        head, _, name = path.rpartition(b"/")
        ino = ROOT_INO
        for part in [p for p in head.split(b"/") if p]:
            ino = self.store.child_ino(ino, part) or 0
        return self.store.child(ino, name) if ino else None

    def settle_kept(self, path: bytes, refused: str, send_again: bool, drop: bool) -> None:
        """The local version the remote refused (``KEPT``) at the replay of a ``refused``
        journal entry, at a resolve: journaled again as that change (``send_again``: new
        content, or mode and times), dropped for the server's version (``drop``), or left
        as it is, kept here (neither; also for a refused change of another kind, which
        cannot be sent again as one: the user makes it again)."""
        node = self._cached_at(path)
        resend_content = refused in ("create", "store") and node is not None and node.is_file
        if node is None or not node.has(KEPT) \
                or not (drop or send_again and (resend_content or refused == "setattr")):
            return

        def change(t: Txn) -> None:
            n = t.node(node.ino)
            if n is None:
                return
            n.flags &= ~KEPT
            if drop:
                n.base = None  # (the next listing takes the server's version whole)
            elif resend_content:
                self._content_changed(t, n)
                return
            elif not n.has(ATTR_DIRTY):
                n.flags |= ATTR_DIRTY
                self._journal(t, Op("setattr", n.ino, t.path_of(n.ino), base=n.base, parent=n.parent))
            t.put(n)
        self.store.transact(change)
        if drop:  # (its content goes too, and the kernel's pages of it)
            self.remote_changed(node.ino, parent_ino=node.parent)

    def clear_conflict(self, path: bytes) -> None:
        node = self._cached_at(path)
        if node is not None and node.has(CONFLICT):
            node.flags &= ~CONFLICT
            self.store.put(node)

    async def fsync(self, handle: "OpenFile | None") -> None:
        """Make written data and the index durable on local disk. A file no writer has
        open any more is committed first, checksum included (``commit_changes``); one still
        open for writing is summed after its last release: a sum at every fsync would hash
        the whole file each time (a database fsyncs at every transaction)."""
        if handle is not None:
            if not self.writers.get(handle.ino):
                await self.commit_changes()
            await trio.to_thread.run_sync(os.fsync, handle.fd)
        await trio.to_thread.run_sync(self.store.sync)

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
    """One open() of a file: its node and the content file."""

    ino: int
    fd: int
    writable: bool = False
    wrote: bool = False
    size_at_open: int = 0
    backing: int = 0  # the kernel reads the content file itself (``Cache._pass_through``)
    stamp: tuple[int, int, int] = (0, 0, 0)  # a passthrough writer's content file at open
    changed: bool = False  # the open found the remote changed: the kernel's pages are old


@dataclass
class _Backing:
    """A content file the kernel reads itself (FUSE passthrough) for an inode's handles."""

    id: int  # its backing id on the FUSE device
    opens: int = 0
    writers: int = 0
    detached: bool = False  # the remote changed: this file, unlinked, is the old version


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


@dataclass
class _Walk:
    """Lookups and listings going through the subfolders of one folder (``Cache._walk_on``)."""

    last: int | None = None  # the subfolder they were in last
    #: its subfolders in its listing order, and their positions (``_subfolder_order``),
    #: as its kept listing had them last
    order: tuple[list[int], dict[int, int]] = field(default_factory=lambda: ([], {}))


def _subfolder_order(children: list[Node]) -> tuple[list[int], dict[int, int]]:
    subfolders = [c.ino for c in children if c.is_dir]
    return subfolders, {ino: i for i, ino in enumerate(subfolders)}


def _by_name(kept: tuple[int, list[Node], dict]) -> dict[bytes, Node]:
    return _derived(kept, "names", lambda nodes: {n.name: n for n in nodes})


def _derived(kept: tuple[int, list[Node], dict], key: str, make: Callable[[list[Node]], T]) -> T:
    """What ``make`` derives from a kept listing's children, made once per kept listing."""
    value = kept[2].get(key)
    if value is None:
        value = kept[2][key] = make(kept[1])
    return value


def _decrement(table: dict[int, int], key: int) -> None:
    count = table.get(key, 0) - 1
    if count > 0:
        table[key] = count
    else:
        table.pop(key, None)


_syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)


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

