"""The cache's listings: lookups, folder listings read through to the remote and checked
again after ``dir_timeout``, attributes revalidated after ``attr_timeout``, the folders
listed ahead of a reader, and the folders whose listing is local truth while journaled
changes in them wait to be replayed.

Owns: how a listing is applied to the index (``apply_listing``: which records it
builds, keeps, replaces and drops, through the store's named ``Txn`` operations), when each folder was listed and each node checked (``Freshness``), the kept
listings (``_children_memo``: a folder's children as last read, while no write could
have changed them), the walk order and the queue of folders listed ahead, and the
local-truth folders (``local_dirs``, ``_dir_gen``).
Must not touch: content (what of a file is cached: the fetch part, told through the
``stale``/``forget_content``/``listed`` callbacks), open files, the journal (the write path appends;
this part only counts the folders its entries hold), FUSE.

Concurrency: everything runs on the trio thread. ``ensure_listing`` awaits the remote
under one trio lock per folder (while it is held, only a parent's may be taken: a folder
found gone lists its parent, never the reverse); what it found
is applied only if no change of the folder was journaled while it was on its way
(``_dir_gen``), with no await between that test and the index write. A program's request
for a folder whose listing we have waits for the new one only while the link is not
suspect (``Connectivity.unless_suspect``); then the fetch goes on in the nursery, holding
the folder's lock, and is applied when it comes (so does a file's check at open,
``revalidate``, whose answer is applied only to the node as it was when asked: not
changed here since, not local truth, no writer open; a listing leaves local truth and
files open for writing as they are). The listers ahead
(``_list_ahead``) are tasks of the cache's nursery; listing calls run in worker threads
(or worker processes) through ``Connectivity.call``.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import math
import stat as stat_mod
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import trio

from ..errors import CacheError, NotADirectory, NameTooLong, NotFound, RemoteError, Unavailable, InvalidArgument
from ..link.connectivity import Connectivity
from ..remote import RemoteStat
from ..store.index import (DAMAGED, DIRTY, FULL, KEPT, LISTED, LOCAL_TRUTH, ROOT_INO, TARGET, Node, Store,
                           Txn)
from ..store.index import LOCAL_ONLY
from ..store.journal import Op
from .common import CONTROL_NAME, CacheConfig, Freshness, Kernel, LocalCopyName, decrement, local_copy_name, valid_name

log = logging.getLogger(__name__)
T = TypeVar("T")

SUBFOLDER_PREFETCH = 256  # subfolders listed ahead when a folder is read
WALK_AHEAD = 4  # next sibling folders listed ahead of a walk, folder after folder
MEMO_NODES = 20_000  # folder listings kept, in nodes (~600 bytes each; see children)
WALKS = 4096  # folders whose walk through their subfolders is followed (``_walk_on``)
AHEAD_BATCH = 32  # folders listed ahead in one call on a slow link
#: folders listed before, checked again ahead in one call on a fast link, and the entries
#: they had, at most (``_next_batch``)
RECHECK_BATCH = 8
RECHECK_ENTRIES = 256
#: folders listed ahead that no program has looked into yet, at most (the second on a
#: slow link): more would go stale before the program came, and be listed twice
#: (``_room_ahead``)
AHEAD_UNUSED = 32
AHEAD_UNUSED_SLOW = 512
LIVE_RELIST = 256  # folders listed just before the callbacks went live, listed again at most
LIST_AGAIN_ROUNDS = 3  # listings of a folder a change asks for, at most (see list_again)
RELIST = 4096  # folders released by the replay, listed again after it, at most
WORKING_SET = 256  # folders looked into lately, listed again together on a slow link (_sweep)
AROUND_DEPTH = 3  # levels below a looked-into folder listed ahead on a slow link
CHECK_BY_LISTING = 1000  # folders up to this many entries: an open checks the whole folder

#: a folder's kept listing: (its listing generation, children, what callers derived from them)
Kept = tuple[int, list[Node], dict[str, Any]]
#: a blocking call that lists a folder: [(name, remote stat)]
Lister = Callable[[bytes], list[Any]]
#: unlinked local-only objects held for the kernel at most (``Listings.unlinked_local``):
#: one unlinked through the control file (a resolve) may be held by no kernel, which then
#: never forgets it; past this many the oldest go (an fstat of one still open: ENOENT)
UNLINKED_LOCAL_MOST = 1000
#: what a listing keeps of names it does not show: local changes not yet replayed, a damaged
#: copy or a refused version (on no server), a local-only object (``LOCAL_ONLY``)
KEPT_UNLISTED = DIRTY | DAMAGED | KEPT | LOCAL_ONLY


def hold_unlinked(held: dict[int, Node], node: Node, most: int = UNLINKED_LOCAL_MOST) -> None:
    """Hold ``node`` in ``held`` (``Listings.unlinked_local``), the latest last, at most
    ``most`` of them: the oldest go first."""
    held.pop(node.ino, None)
    held[node.ino] = node
    while len(held) > most:
        del held[next(iter(held))]


class Listings:
    def __init__(self, store: Store, conn: Connectivity, config: CacheConfig, kernel: Kernel,
                 list_folder: Lister, *, list_folders: Callable[[list[bytes]], list[Any]] | None = None,
                 stale: Callable[[int], None],
                 forget_content: Callable[[int], None], listed: Callable[[int], None],
                 writing: Callable[[int], bool] = lambda ino: False,
                 copy_name: LocalCopyName = local_copy_name) -> None:
        self.store = store
        #: the name a local-only object moves to when the server lists one of its name
        self._copy_name = copy_name
        self.conn = conn
        self.config = config
        self.kernel = kernel
        #: blocking path -> listing, for folders listed ahead of a reader: handed on to the
        #: worker processes when there are some (parsing a listing is GIL-bound work)
        self._list_folder = list_folder
        #: several folders' listings in one call, for the listers' batches (``_next_batch``)
        #: likewise: the remote's ``listdir_many`` by default
        self._list_folders = list_folders or conn.remote.listdir_many
        self._stale = stale  # the remote content of a node changed
        self._forget_content = forget_content  # a node is gone: its content with it
        self._folder_listed = listed  # a folder was listed again (its small-file reads count anew)
        #: whether a file is open for writing here (what the remote says does not replace
        #: it: a writer that has not written yet is about to)
        self._writing = writing
        self._listed = Freshness(config.dir_timeout)  # folder -> when listed
        self._checked = Freshness(config.attr_timeout)  # node -> when found current
        #: files a listing left as they were for a writer (``apply_listing``'s ``keep``)
        #: though the remote's differ or are gone: not checked by that listing nor by
        #: their folder's (``checked``), until a look at the remote finds them current
        self._passed_over: set[int] = set()
        self._locks: dict[int, trio.Lock] = {}  # folder -> held while it is being listed
        #: folder -> (its listing generation, children, what callers derived from them)
        #: (see children and derived)
        self._children_memo: dict[int, Kept] = {}
        self._children_gen = -1
        self._children_kept = 0  # nodes held in _children_memo
        self._nursery: trio.Nursery | None = None
        self._walk_from = ROOT_INO  # the folder of the last lookup or listing (_walk_on)
        self._walks: dict[int, _Walk] = {}  # folder -> the walk through its subfolders
        #: folders to list ahead of a reader, the next one first: consumed by as many
        #: listers as there are connections but one (short calls find one free)
        self._queue: collections.deque[int] = collections.deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._listers = max(1, int(conn.limiter.total_tokens) - 1)
        self._prefetching: set[int] = set()  # folders being listed ahead of a reader
        #: folders listed ahead of a reader that it has not looked into yet -> when listed
        self._unused: dict[int, float] = {}
        self._unused_lot = trio.lowlevel.ParkingLot()
        #: folders queued to be listed ahead on a slow link -> their depth below the
        #: folder a lookup listed (``_around``)
        self._deeper: dict[int, int] = {}
        #: folders queued by ``list_again`` -> set when the listers are done with them
        self._relisted: dict[int, trio.Event] = {}
        #: folders with journaled changes: their listing is local truth until replayed
        self.local_dirs: dict[int, int] = {}
        #: bumped at each change of a folder's pending work; kept only while the folder has
        #: some or a listing of it is on its way (``_release_folders``)
        self._dir_gen: dict[int, int] = {}
        self._listing: dict[int, int] = {}  # folder -> listings of it on their way
        #: folders the replay released while others still had changes pending: listed
        #: again once none has (``release_folders``)
        self._relist: set[int] = set()
        #: on a slow link, the folders looked into lately, the latest last (``_sweep``)
        self._used: dict[int, None] = {}
        self._swept_at = -math.inf
        self._swept: set[int] = set()  # folders queued by the last sweep, not listed yet
        #: local-only objects whose last name went while the kernel may still hold them
        #: (a FIFO open in a process: its fstat asks for its attributes), until the kernel
        #: forgets them (``Cache.forgotten``); in memory only, never in the index
        self.unlinked_local: dict[int, Node] = {}
        self._root_read = False  # the root's attributes read from the server (``root_attributes``)

    def start(self, nursery: trio.Nursery) -> None:
        """List the root, and start the listers ahead of readers, in ``nursery``."""
        self._nursery = nursery
        nursery.start_soon(self._list_root)
        for _ in range(self._listers):
            nursery.start_soon(self._list_ahead)

    async def _list_root(self) -> None:
        """List the root at start, so that a user who goes offline at once can still
        create files in it."""
        try:
            if self.conn.online:
                await self.conn.measure_rtt()
            if not self._root_read:  # (else ``Cache.run`` read them: no round trip more)
                await self.root_attributes()
            await self.listdir(ROOT_INO)
        except (Unavailable, RemoteError, NotFound) as exc:
            log.debug("root listing at start: %s", exc)

    async def root_attributes(self) -> None:
        """The root's mode, owner and times as the server has them (unless a local change of
        them is pending, or one the server refused is kept: ``LOCAL_TRUTH``). ``Cache.run`` asks before the mount answers its first request:
        until then the root shows the times of the cache's making (or of the last mount),
        and a program that read it across the change saw it change under it (``tar cf -
        -C MNT .`` right after the mount: "file changed as we read it", exit 1)."""
        rstat = await self.conn.call(self.conn.remote.stat, b"")
        self._root_read = True
        root = self.node(ROOT_INO)
        if root.flags & LOCAL_TRUTH:
            return  # a local change of the root is pending or kept: its listing says the rest
        known = (root.mode, root.mtime_ns, root.atime_ns, root.ctime_ns, root.base, root.uid, root.gid)
        root.mode, root.mtime_ns, root.atime_ns = rstat.mode, rstat.mtime_ns, rstat.atime_ns
        root.ctime_ns, root.base = rstat.mtime_ns, rstat.version()
        root.uid, root.gid = rstat.uid, rstat.gid  # (shown with --owners remote only)
        if (root.mode, root.mtime_ns, root.atime_ns, root.ctime_ns, root.base, root.uid, root.gid) != known:
            self.store.put(root)

    # -- lookups -----------------------------------------------------------------------
    def node(self, ino: int) -> Node:
        node = self.store.get(ino)
        if node is None:
            node = self.unlinked_local.get(ino)  # (only on a miss: no cost to the hot path)
            if node is None:
                raise NotFound(f"inode {ino}")
        return node

    async def lookup(self, parent: int, name: bytes, *, shared: bool = False) -> Node:
        """The entry ``name`` of folder ``parent``. ``shared``: the caller only reads the
        node, which may then be the one in the folder's kept listing (no index read)."""
        if len(name) > 255:
            raise NameTooLong()
        if shared and parent == self._walk_from and self._listed.fresh(parent):
            names = self.kept_names(parent)
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
            if self._unused:
                self._looked_into(parent)
        around = self.conn.slow and not self._listed.fresh(parent)
        if self.conn.slow:
            self._used_now(parent, around and pnode.has(LISTED))
        await self.ensure_listing(pnode)
        if around:
            self._around(pnode)
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
        if self._unused:
            self._looked_into(ino)
        if refresh and self.conn.online:
            self._listed.drop(ino)
        if self.conn.slow:
            self._used_now(ino, node.has(LISTED) and not self._listed.fresh(ino))
        await self.ensure_listing(node)
        children = self.children(ino)
        if prefetch_subfolders and self.conn.online and self._nursery is not None:
            # A program reading a folder (ls -R, find, du, a build) usually goes on into
            # its subfolders, in order, and deep first: list the stale ones now, side by
            # side, in the background, ahead of the folders queued before.
            self._list_ahead_of_reader([c.ino for c in children if c.is_dir], SUBFOLDER_PREFETCH)
        return children

    async def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        if not node.is_symlink:
            raise InvalidArgument()
        if node.has(TARGET):
            return node.target
        target = await self.conn.call(self.conn.remote.readlink, self.store.path_of(ino), looks_only=True)
        node = self.node(ino)
        node.target = target
        node.flags |= TARGET
        self.store.put(node)
        return target

    async def folder_for_change(self, parent: int) -> Node:
        """A folder whose listing is known (so names can be checked), for a change in it."""
        pnode = self.node(parent)
        if not pnode.is_dir:
            raise NotADirectory()
        await self.ensure_listing(pnode)
        return pnode

    # -- freshness ---------------------------------------------------------------------
    def checked(self, node: Node) -> bool:
        """Whether the node was found current on the remote less than ``attr_timeout`` ago,
        or, while callbacks are live, its folder's listing since then is current; not one
        that a listing left as it was for a writer (``_passed_over``)."""
        return (self._checked.fresh(node.ino) or (self._listed.trusted_since is not None
                                                  and self._listed.fresh(node.parent))) \
            and not (self._passed_over and node.ino in self._passed_over)

    # -- callbacks -----------------------------------------------------------------------
    def trust(self, since: float | None) -> None:
        """The server's callbacks are live from ``since`` on (None: they are not): until a
        change is told, what was listed since then stays current, and so do the nodes in
        it (``checked``). (Checks of single nodes stay timed: trusted, they were one entry
        per node listed, ~70 MiB per million.)"""
        self._listed.trust(since)

    def changed_remotely(self, paths: list[bytes]) -> dict[int, set[bytes]]:
        """The server told that ``paths`` (share-relative) changed: the listings and checks
        they touch are void (a listing on its way now will not count as current). Returns
        the cached folders to list again, with the names in them that changed."""
        now = time.monotonic()
        folders: dict[int, set[bytes]] = {}
        for path in paths:
            parts = path.split(b"/") if path else []
            folder = self._cached_folder(parts[:-1])
            if folder is None:
                continue
            if not parts:  # the root itself, or anything (the watcher lost events)
                if self._listed.trusted_since is not None:
                    self.trust(now)
                self._listed.void(ROOT_INO, now)
                folders.setdefault(ROOT_INO, set())
                continue
            name = parts[-1]
            if not self.local_dirs.get(folder):
                # (a folder with changes pending here is local truth, listed again when
                # they are replayed: the replay's own changes come back as these)
                self._listed.void(folder, now)
                if self.node(folder).has(LISTED):  # (one never listed is listed at its first use)
                    folders.setdefault(folder, set()).add(name)
            child = self.store.child(folder, name)
            if child is not None:
                self._checked.void(child.ino, now)
                if child.is_dir:
                    self._listed.void(child.ino, now)
                elif child.nlink > 1:
                    self._listed.void(child.parent, now)  # (checked through its folder)
        return folders

    def listed_before(self, since: float) -> list[int]:
        """The folders to list again as the callbacks go live (at ``since``): those whose
        listing is current by time but was made before, and those whose listing is on
        its way (begun before, it counts only by time once made); the latest
        ``LIVE_RELIST``. On a fast link only those whose listing is still kept (compared
        with it, the index is neither read nor written), and the root: listing again one
        that is not took ~11 ms for 1,000 entries (a cold find over 300 folders of 1,000
        files had 115 listed twice; listing none, warm reads of 10,000 small files just
        after the cold ones were 20 % slower: each folder checked again)."""
        before = list(dict.fromkeys([*self._listed.current_before(since), *self._listing]))
        if not self.conn.slow:
            before = [f for f in before if f == ROOT_INO or self._kept(f) is not None]
        again = before[-LIVE_RELIST:]
        if ROOT_INO in before and ROOT_INO not in again:
            again.append(ROOT_INO)
        return again

    def _cached_folder(self, parts: list[bytes]) -> int | None:
        ino = ROOT_INO
        for name in parts:
            child = self.store.child(ino, name)
            if child is None or not child.is_dir:
                return None
            ino = child.ino
        return ino

    def forget_checked(self, ino: int) -> None:
        self._checked.drop(ino)

    def writer_closed(self, ino: int) -> None:
        """The last writer of ``ino`` closed: if a listing left the file to it (``_passed_over``),
        its folder is listed again at its next use (with callbacks live, that listing would
        stay current: a name gone there would stay listed here)."""
        if self._passed_over and ino in self._passed_over:
            node = self.store.get(ino)
            if node is not None:
                self._listed.drop(node.parent)

    def forget_listed(self, folder: int) -> None:
        """List the folder again at its next use."""
        self._listed.drop(folder)

    def listed_now(self, folder: int) -> None:
        """The folder's listing is the truth as of now (a folder made here)."""
        self._listed.mark(folder, time.monotonic())

    # -- listing ahead -----------------------------------------------------------------
    def _list_ahead_of_reader(self, folders: list[int], most: int) -> None:
        """Queue the first ``most`` of ``folders`` whose listings are stale, to be listed
        in the background before the folders queued earlier, in this order."""
        stale = [f for f in folders if f not in self._prefetching and not self._listed.fresh(f)][:most]
        for folder in reversed(stale):
            self._prefetching.add(folder)
            self._queue.appendleft(folder)
        self._lot.unpark(count=len(stale))

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
            if len(self._walks) >= WALKS:
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

    def sibling_folders(self, folder: int, most: int) -> list[int]:
        """The listed folders beside ``folder`` in its parent's listing order (the order a
        walk goes through them, ``_walk_on``): those after it first, then those before it
        (nearest first), ``most`` at most."""
        node = self.store.get(folder)
        if node is None or node.ino == ROOT_INO:
            return []
        children = self.children(node.parent)
        subfolders, position = self.derived(node.parent, children, "subfolders", _subfolder_order)
        at = position.get(folder)
        if at is None:
            return []
        nearby = (subfolders[at + 1:] + subfolders[at - 1::-1] if at else subfolders[1:])[:most]
        listed = [self.store.get(ino) for ino in nearby]
        return [n.ino for n in listed if n is not None and n.has(LISTED)]

    def _used_now(self, folder: int, stale: bool) -> None:
        """A slow link: ``folder`` is looked into (``stale``: the listing it has went
        stale: the program came back after a pause)."""
        used = self._used
        used.pop(folder, None)
        used[folder] = None
        if len(used) > WORKING_SET:
            del used[next(iter(used))]
        if stale:
            self._sweep(folder)

    def _sweep(self, folder: int) -> None:
        """On a slow link, the first look into a folder whose listing went stale lists
        again, side by side and many to a call, every folder looked into lately whose
        listing went stale too (``WORKING_SET`` at most, the latest first; once per
        ``dir_timeout``): a program that comes back after a pause (git status, make, an
        editor's file tree) goes through the folders it used before, and each would cost
        a round trip of its own in turn (without callbacks; with them, listings stay
        current). Whole-tree validation in a few round trips, as Coda's volume stamps."""
        now = time.monotonic()
        if now - self._swept_at < self._listed.ttl or self._nursery is None or not self.conn.online:
            return
        self._swept_at = now
        stale = [ino for ino in reversed(self._used)
                 if ino != folder and ino not in self._prefetching and not self._listed.fresh(ino)]
        self._swept = set(stale)  # (not ahead of a reader: see _room)
        self._list_ahead_of_reader(stale, WORKING_SET)

    def _around(self, folder: Node) -> None:
        """On a slow link, a folder listed for a lookup has its subfolders and its sibling
        folders listed too, in the background, many to a call, and theirs in turn down to
        ``AROUND_DEPTH`` levels: a program that looks into one folder usually looks into
        those next (git's .git/refs, hooks and objects/xx/, a build's source folders), and
        each would otherwise cost a wait of its own."""
        if self._nursery is None or not self.conn.online:
            return
        siblings = [] if folder.ino == ROOT_INO else \
            [c.ino for c in self.children(folder.parent) if c.is_dir and c.ino != folder.ino]
        self._deeper_ahead(folder.ino, 0, tuple(siblings))

    def _deeper_ahead(self, folder: int, depth: int, more: tuple[int, ...] = ()) -> None:
        """Queue the subfolders of ``folder`` (listed ``depth`` levels below a lookup's)
        and ``more``; those above ``AROUND_DEPTH`` have theirs queued once listed."""
        queued = [c.ino for c in self.children(folder) if c.is_dir] + list(more)
        if depth + 1 < AROUND_DEPTH:
            if len(self._deeper) > 4 * SUBFOLDER_PREFETCH * AROUND_DEPTH:
                self._deeper.clear()
            for ino in queued:
                self._deeper[ino] = depth + 1
        self._list_ahead_of_reader(queued, SUBFOLDER_PREFETCH)

    async def _list_ahead(self) -> None:
        """One of the listers of ``_queue``; runs until cancelled. (Tasks started one per
        folder would run in any order: trio may reverse a batch.) A lister takes several
        folders at once, listed together in a few round trips (``Remote.listdir_many``):
        see ``_next_batch``."""
        while True:
            while not self._queue:
                await self._lot.park()
            if self._queue[0] not in self._relisted:  # (a change's listing waits for nothing)
                await self._room_ahead()
                if not self._queue:
                    continue
            batch = self._next_batch()
            try:
                if len(batch) > 1:
                    await self._list_together(batch)
                else:
                    node = self.store.get(batch[0])  # as it is now: queued a while ago
                    if node is not None and node.is_dir:
                        await self.ensure_listing(node, self._list_folder)
                now = time.monotonic()
                for ino in batch:
                    if ino not in self._relisted and ino not in self._swept and self._listed.fresh(ino):
                        self._unused.pop(ino, None)  # (the oldest first: see _room)
                        self._unused[ino] = now
            except (Unavailable, RemoteError, NotFound, CacheError, KeyError):
                pass  # only a head start (KeyError: removed under a lister's path walk)
            finally:
                self._prefetching.difference_update(batch)
                self._swept.difference_update(batch)
                for ino in batch:
                    waiter = self._relisted.pop(ino, None)
                    if waiter is not None:
                        waiter.set()

    def _next_batch(self) -> list[int]:
        """The folders a lister takes from the queue's head: on a slow link up to
        ``AHEAD_BATCH``; on a fast one up to ``RECHECK_BATCH`` of those listed before
        with ``RECHECK_ENTRIES`` entries between them (a check again, after
        ``dir_timeout`` or a remount: the answer is mostly that nothing changed), and a
        folder never listed, or a larger one, alone (a reader waits for its listing, of
        any length, and should not wait for others' with it).

        Checked one to a call, the listings ahead of a walk after a remount cost a worker
        thread's start and end each: 1,000 files of 4 KiB in 100 folders over WebDAV, read
        again after a remount, 3,138-3,372 files/s, against 5,006-5,233 with no check at
        all; 8 to a call (pipelined), 3,598-3,842, and fewer of the walker's opens waited
        past 1 ms behind the listers' threads (7-9 of 1,000, not 29-39)."""
        queue = self._queue
        if self.conn.slow:
            return [queue.popleft() for _ in range(min(AHEAD_BATCH, len(queue)))]
        batch = [queue.popleft()]
        entries = self._entries_known(batch[0], RECHECK_ENTRIES)
        while queue and len(batch) < RECHECK_BATCH and entries < RECHECK_ENTRIES:
            more = self._entries_known(queue[0], RECHECK_ENTRIES - entries)
            if entries + more >= RECHECK_ENTRIES:
                break
            entries += more
            batch.append(queue.popleft())
        return batch

    def _entries_known(self, ino: int, most: int) -> int:
        """The entries of a folder listed before, counted up to ``most``; ``most`` for
        one never listed (or gone)."""
        node = self.store.get(ino)
        if node is None or not node.is_dir or not node.has(LISTED):
            return most
        return self.store.entry_count(ino, most)

    async def _room_ahead(self) -> None:
        """Wait while ``AHEAD_UNUSED`` folders listed ahead wait for their reader (a
        listing's ``dir_timeout`` runs from when it was made: one made too far ahead of a
        walk goes stale before the walk comes, and is made again; a cold find over 300
        folders of 1,000 files listed half of them twice). One left alone for half of
        ``dir_timeout`` no longer counts: the reader went elsewhere. (See ``_room``.)"""
        while not self._room():
            if self._queue and self._queue[0] in self._relisted:
                return  # (a change's listing came to the front meanwhile)
            cutoff = time.monotonic() - self._listed.ttl / 2
            for ino in [ino for ino, at in self._unused.items() if at < cutoff]:
                del self._unused[ino]
            if self._room():
                return
            with trio.move_on_after(self._listed.ttl / 4):
                await self._unused_lot.park()

    def _room(self) -> bool:
        """Room for one more folder listed ahead: fewer than ``AHEAD_UNUSED`` (on a slow
        link ``AHEAD_UNUSED_SLOW``) wait for their reader, or the one waiting longest was
        listed less than a quarter of ``dir_timeout`` ago (a reader that keeps up; and
        what a program reads later, offline perhaps, is listed all the same). (Measured
        on a cold find over 300 folders of 1,000 files on loopback: 16 ahead 6.0 s, 32
        5.2 s, 64 5.3 s; with no bound, 6.3-7.5 s, half the folders listed twice.)"""
        unused = self._unused
        if len(unused) < (AHEAD_UNUSED_SLOW if self.conn.slow else AHEAD_UNUSED):
            return True
        return time.monotonic() - next(iter(unused.values())) < self._listed.ttl / 4

    def _looked_into(self, folder: int) -> None:
        """A program looks into ``folder``: if it was listed ahead, there is room for one
        more (``_room_ahead``)."""
        if self._unused.pop(folder, None) is not None:
            self._unused_lot.unpark()

    async def list_again(self, folder: Node) -> None:
        """List ``folder`` again through the listers ahead (many folders to a call, one
        connection left to the programs' own requests); return once they are done with it
        (listed, or left to its next use: see ``_list_together``).

        A listing of it already on its way may have begun before the change (or the
        callbacks) that call for this one, and then does not count (``Freshness.mark``):
        it is waited for, and the folder queued again (a replay's own changes come back
        from the server's watcher just after the replay listed the folders it released;
        the folders listed as the callbacks go live are often on their way already)."""
        self.forget_listed(folder.ino)
        if self._nursery is None:
            await self.ensure_listing(folder)
            return
        for _round in range(LIST_AGAIN_ROUNDS):
            waiter = self._relisted.setdefault(folder.ino, trio.Event())
            if folder.ino not in self._prefetching:
                self._list_ahead_of_reader([folder.ino], 1)
            elif folder.ino in self._queue and self._queue[0] != folder.ino:
                self._queue.remove(folder.ino)  # (queued further back: to the front)
                self._queue.appendleft(folder.ino)
            self._unused_lot.unpark_all()  # (a lister pacing itself takes it at once)
            if folder.ino not in self._prefetching:  # (not queued: current, or offline)
                self._relisted.pop(folder.ino, None)
                return
            await waiter.wait()
            node = self.store.get(folder.ino)
            if node is None or not self.conn.online or self._listed.trusted(node.ino) \
                    or self.local_dirs.get(node.ino) or (node.has(LISTED) and self.path_pending(node)):
                return
            self._listed.drop(node.ino)  # (fresh by time only: listed again)

    async def _list_together(self, folders: list[int]) -> None:
        """``ensure_listing`` of several folders in one call. A folder whose lock is taken
        is being listed already, and left out: no lock is waited for while others are
        held. A folder the remote says is gone (or no longer a folder) has its parent
        listed again, as alone (``vanished``), once the locks are let go (its parent may
        be one of them). The call is a look (``looks_only``): when the mount goes
        offline it is given up at once, and its folders' locks with it (reviewed: a
        batch on a link gone silent held them until the call's own deadline, and a
        program's ``ls`` of one waited that long once the link was back)."""
        gone: list[Node] = []
        nodes: list[Node] = []
        locks: list[trio.Lock] = []
        for ino in folders:
            node = self.store.get(ino)  # as it is now: queued a while ago
            if node is None or not node.is_dir or self._needs_no_listing(node):
                continue
            lock = self._locks.setdefault(ino, trio.Lock())
            try:
                lock.acquire_nowait()
            except trio.WouldBlock:
                continue
            nodes.append(node)
            locks.append(lock)
        try:
            paths = [self.store.path_of(node.ino) for node in nodes]
            generations = [self._dir_gen.get(node.ino, 0) for node in nodes]
            for node in nodes:
                self._listing[node.ino] = self._listing.get(node.ino, 0) + 1
            started = time.monotonic()
            try:
                listings = await self.conn.call(self._list_folders, paths, looks_only=True) if nodes else []
            finally:
                for node in nodes:
                    decrement(self._listing, node.ino)
            for node, generation, listing in zip(nodes, generations, listings):
                if isinstance(listing, RemoteError):
                    if _says_gone(listing, node):
                        gone.append(node)
                    continue
                if self.store.get(node.ino) is None or self._changed_here(node.ino, generation):
                    continue
                self._apply_listing(node.ino, listing, started)
                depth = self._deeper.pop(node.ino, None)
                if depth is not None:
                    self._deeper_ahead(node.ino, depth)
        finally:
            for node, lock in zip(nodes, locks):
                self._locks.pop(node.ino, None)
                lock.release()
        for node in {node.parent: node for node in gone}.values():  # (a parent listed once)
            await self.vanished(node)

    # -- kept listings -----------------------------------------------------------------
    def children(self, ino: int) -> list[Node]:
        """``store.children``, kept while nothing that could change it was written since:
        no write transaction but the refresh of other folders' listings (a program that
        walks a tree again, find or make, lists the same folders: reading and unpacking
        every entry was most of an opendir). Callers must not change the nodes."""
        kept = self._kept(ino)
        if kept is not None:
            return kept[1]
        return self._keep_children(ino, self.store.children(ino))

    def _kept(self, ino: int) -> Kept | None:
        """The folder's kept listing (generation, children, derived), if no write since."""
        self._memo_current()
        kept = self._children_memo.get(ino)
        return kept if kept is not None and kept[0] == self.store.folder_generation.get(ino, 0) else None

    def kept_names(self, ino: int) -> dict[bytes, Node] | None:
        """The folder's kept listing by name, if it is kept."""
        kept = self._kept(ino)
        return None if kept is None else _by_name(kept)

    def kept_made_full(self, nodes: list[Node]) -> None:
        """The checkpoint has just marked ``nodes`` whole (``FULL``) in the index
        (``save_ranges``): mark their copies in the kept listings, which then stay kept.
        (A cold read of a folder's files dropped its kept listing, and the next listing of
        the folder read and compared every record again.) A kept listing is kept only if
        it was current just before: one generation behind its folder's now."""
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
                    assert copy is not None
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
        write), within the memo's cap, the listings kept longest going first (a walk of a
        large tree keeps the folders it is in, not the first ones it saw). ``same``: they
        equal the kept ones, if any: those stay (and so does what was ``derived`` from
        them)."""
        if same and (current := self._kept(ino)) is not None:
            return current[1]
        memo = self._children_memo
        kept = memo.pop(ino, None)  # (current or not: the count drops it)
        if kept is not None:
            self._children_kept -= len(kept[1])
        if len(children) > MEMO_NODES:
            return children
        while self._children_kept + len(children) > MEMO_NODES:
            oldest = next(iter(memo))
            self._children_kept -= len(memo.pop(oldest)[1])
        self._children_kept += len(children)
        memo[ino] = (self.store.folder_generation.get(ino, 0), children, {})
        return children

    # -- listing and validation ----------------------------------------------------------
    async def ensure_listing(self, node: Node, lister: Lister | None = None, *, bounded: bool = True) -> None:
        """Fetch the folder's listing when ours is missing or older than dir_timeout.
        ``lister``: the blocking call that lists it (the remote's own by default).
        A listing we have is not waited for on a suspect link (``bounded``, for a program's
        request: ``Connectivity.unless_suspect``): it is used as it is, and the one on its
        way applied when it comes."""
        if self._needs_no_listing(node):
            return
        if not self.conn.online:
            if node.has(LISTED):
                return
            raise Unavailable("folder listing not cached")
        if bounded and lister is None and self._nursery is not None and node.has(LISTED):
            await self.conn.unless_suspect(partial(self._fetch_listing, node, None), self._nursery)
            return
        await self._fetch_listing(node, lister)

    async def _fetch_listing(self, node: Node, lister: Lister | None) -> bool:
        """``ensure_listing``'s fetch, under the folder's lock; True once done."""
        lock = self._locks.setdefault(node.ino, trio.Lock())
        async with lock:
            if self._listed.fresh(node.ino):
                return True
            listing = await self._list(node, lister)
            if listing is None:
                return True
            generation, started, entries = listing
            if not self._changed_here(node.ino, generation):
                self._apply_listing(node.ino, entries, started)
        return True

    def _needs_no_listing(self, node: Node) -> bool:
        """Its listing is current, or local truth (changes of it, or of a folder above it,
        wait to be replayed: its path may not be the server's yet)."""
        return self._listed.fresh(node.ino) or bool(self.local_dirs.get(node.ino)) \
            or (node.has(LISTED) and self.path_pending(node))

    def _changed_here(self, folder: int, generation: int) -> bool:
        """Whether the folder changed here since a listing of it began (at ``generation``):
        the listing may predate that change, and the local entries are the truth for now."""
        return self._dir_gen.get(folder, 0) != generation or bool(self.local_dirs.get(folder))

    async def _list(self, node: Node, lister: Lister | None) -> tuple[int, float, list[Any]] | None:
        """The folder's generation before its listing, when the listing began, and the
        listing; None when the remote went away and a listing is cached."""
        path = self.store.path_of(node.ino)
        generation = self._dir_gen.get(node.ino, 0)
        self._listing[node.ino] = self._listing.get(node.ino, 0) + 1
        started = time.monotonic()
        try:
            return generation, started, await self.conn.call(lister or self.conn.remote.listdir, path,
                                                              looks_only=True)
        except Unavailable:
            if node.has(LISTED):
                return None
            raise
        except RemoteError as exc:
            if _says_gone(exc, node):
                await self.vanished(node)
                raise NotFound() from None
            raise
        finally:
            self._locks.pop(node.ino, None)
            decrement(self._listing, node.ino)

    def _apply_listing(self, ino: int, listing: list[Any], started: float) -> None:
        kept = []
        for name, rstat in listing:
            if ino == ROOT_INO and name == CONTROL_NAME:
                continue
            if not valid_name(name):
                log.warning("skipping remote name %r in %r: not usable as a file name",
                            name, self.store.path_of(ino))
                continue
            if rstat.kind not in (stat_mod.S_IFREG, stat_mod.S_IFDIR, stat_mod.S_IFLNK):
                continue  # sockets, fifos and devices mean nothing across the network
            kept.append((name, rstat))
        children = self._unchanged_listing(ino, kept)
        changed: list[Node] = []
        removed: list[Node] = []
        names_gone: list[bytes] = []
        passed_over: set[int] = set()
        if children is None:
            delta = apply_listing(self.store, ino, kept, keep=self._writing, copy_name=self._copy_name)
            # The opendir that asked reads them next. A listing that found nothing new
            # keeps the kept list, and with it what opendir derived from it.
            children = self._keep_children(ino, delta.children, same=delta.same)
            changed, removed, passed_over = delta.changed, delta.removed, delta.passed_over
            names_gone = delta.names_gone
        self._listed.mark(ino, started)
        if self._passed_over:  # (those the listing found current are checked now)
            self._passed_over.difference_update(child.ino for child in children)
        if passed_over:  # (left as they were for a writer: not checked by this listing)
            self._passed_over.update(passed_over)
            self._checked.mark_all([child.ino for child in children if child.ino not in passed_over], started)
        else:
            self._checked.mark_all([child.ino for child in children], started)
        self._folder_listed(ino)
        for node in changed:
            self._stale(node.ino)
        for node in removed:
            self._forget_content(node.ino)
        for name in names_gone:
            self.kernel.invalidate_entry(ino, name)

    def _unchanged_listing(self, ino: int, listing: list[Any]) -> list[Node] | None:
        """The folder's kept children, when the remote's listing says nothing they do not
        say already: no name came or went, and ``node_from_remote`` would rebuild each
        node as it is. Then the index is neither read nor written (``apply_listing`` took
        ~650 us for 100 unchanged entries, run again for every folder opened after
        ``--attr-timeout``). None: let ``apply_listing`` decide."""
        kept = self._kept(ino)
        folder = self.store.get(ino) if kept is not None else None
        if kept is None or folder is None or not folder.has(LISTED):
            return None
        names = _by_name(kept)
        subdirs = _subdirs_if_as_is(names, listing)
        if subdirs is None or folder.nlink != 2 + subdirs:
            return None
        if len(names) != len(listing):  # kept but not listed: only local names may be
            listed = {name for name, _rstat in listing}
            if any(not node.flags & KEPT_UNLISTED or self._writing(node.ino) for name, node in names.items()
                   if name not in listed):  # (apply_listing keeps local changes as they are; a
                #  writer's file too, left out of the checks: passed_over)
                return None
        return kept[1]

    async def vanished(self, node: Node) -> None:
        """The remote says this object is gone: list its parent again."""
        self._listed.drop(node.parent)
        parent = self.store.get(node.parent)
        if parent is not None:
            try:
                await self.ensure_listing(parent)
            except (Unavailable, RemoteError, NotFound):
                pass

    async def revalidate(self, node: Node) -> Node:
        """The node as the remote has it now (close-to-open); its cached content dropped
        when the remote's version changed. Checked with its folder's listing when that
        is kept and small (``CHECK_BY_LISTING``): one look at the remote then checks every
        file of the folder, which a program reading them opens one after another.
        On a suspect link the node as cached, while the check goes on
        (``Connectivity.unless_suspect``)."""
        if self._nursery is None:
            return await self._revalidate(node)
        current = await self.conn.unless_suspect(partial(self._revalidate, node), self._nursery, short=True)
        return node if current is None else current

    async def _revalidate(self, node: Node) -> Node:
        kept = self._kept(node.parent)
        if kept is not None and len(kept[1]) <= CHECK_BY_LISTING and node.nlink <= 1 \
                and not self._listed.fresh(node.parent):
            parent = self.store.get(node.parent)
            if parent is not None:
                await self.ensure_listing(parent, bounded=False)
                if self._checked.fresh(node.ino):
                    current = self.store.get(node.ino)
                    if current is None:
                        raise NotFound()
                    return node if current == node else current
        path = self.store.path_of(node.ino)
        started = time.monotonic()
        try:
            rstat = await self.conn.call(self.conn.remote.stat, path, looks_only=True)
        except Unavailable:
            return node
        except RemoteError as exc:
            if exc.errno == errno.ENOENT:
                await self.vanished(node)
                raise NotFound() from None
            raise
        # What the remote said is applied only to the node it was asked about: the call
        # may have waited long (a suspect link, whose check goes on in the background),
        # and meanwhile the file may have been written, renamed or checked here.
        current = self.store.get(node.ino)
        if current is None:
            return node  # (removed here meanwhile)
        if current != node or current.flags & LOCAL_TRUTH or self._writing(node.ino):
            if current.flags & LOCAL_TRUTH or rstat.version() == current.base:
                self._found_current(node.ino, started)
            return current  # (else unchecked: the next open asks again)
        self._found_current(node.ino, started)
        if rstat.version() == node.base:
            return node
        if rstat.kind != stat_mod.S_IFMT(node.mode):
            await self.vanished(node)
            raise NotFound()
        log.debug("remote changed: %r", path)
        fresh = node_from_remote(node.ino, node.parent, node.name, rstat, node)
        self.store.put(fresh)
        self._stale(node.ino)
        return fresh

    def _found_current(self, ino: int, started: float) -> None:
        """A look at the remote that began at ``started`` found the node current (or
        applied what it found)."""
        self._checked.mark(ino, started)
        self._passed_over.discard(ino)

    def path_pending(self, node: Node) -> bool:
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

    # -- local-truth folders -------------------------------------------------------------
    def hold_folders(self, folders: set[int]) -> None:
        """A journal entry now holds these folders' listings as local truth."""
        for folder in folders:
            self.local_dirs[folder] = self.local_dirs.get(folder, 0) + 1
            self._dir_gen[folder] = self._dir_gen.get(folder, 0) + 1

    def release_folders(self, folders: set[int]) -> None:
        for folder in folders:
            decrement(self.local_dirs, folder)
            if folder in self.local_dirs or folder in self._listing:
                self._dir_gen[folder] = self._dir_gen.get(folder, 0) + 1
            else:
                # No change is pending and no listing on its way (whose start compares
                # with this number): the number may go, and starts again from none.
                self._dir_gen.pop(folder, None)
            self._listed.drop(folder)
        if self._listed.trusted_since is not None and self._nursery is not None and self.conn.online:
            # With callbacks, a listing taken now stays current: one round trip in the
            # background spares the next program that looks here a wait. (Not while a
            # folder above has changes pending: its path may not be the server's yet.)
            self._relist.update(folders)
            if len(self._relist) > RELIST:
                self._relist.clear()  # (listed at their next use instead)
            if not self.local_dirs:
                relist, self._relist = list(self._relist), set()
                self._list_ahead_of_reader(relist, SUBFOLDER_PREFETCH)

    def op_done(self, op: Op) -> None:
        """The sync manager replayed or dropped ``op``: its folders may be listed again.
        A folder moved here: what the server told of it under its old path meanwhile
        found no folder here, so no listing trusted before is trusted any more."""
        if op.kind == "rename" and self._listed.trusted_since is not None:
            node = self.store.get(op.ino)
            if node is not None and node.is_dir:  # (a folder gone since took its listings along)
                self.trust(time.monotonic())
        self.release_folders(op.folders())

    def op_replaced(self, old: Op, new: Op) -> None:
        """The sync manager rewrote journal entry ``old`` as ``new`` (see ``optimise``)."""
        before, after = old.folders(), new.folders()
        self.release_folders(before - after)
        self.hold_folders(after - before)

    def rebuild_local_dirs(self) -> None:
        self.local_dirs.clear()
        for op in self.store.journal_ops():
            self.hold_folders(op.folders())

    def sizes(self) -> dict[str, int]:
        """How many entries each per-node table holds (for the memory test)."""
        return {"listed": len(self._listed), "checked": len(self._checked), "dir_gen": len(self._dir_gen),
                "local_dirs": len(self.local_dirs), "walks": len(self._walks),
                "kept_nodes": self._children_kept}


def _subdirs_if_as_is(names: dict[bytes, Node], listing: list[Any]) -> int | None:
    """How many of ``listing`` are folders, when each of its names is kept and would be
    rebuilt as it is (local truth is kept as it is); None when one would not."""
    subdirs = 0
    for name, rstat in listing:
        node = names.get(name)
        if node is None:
            return None
        if stat_mod.S_ISDIR(rstat.mode):
            subdirs += 1
        if not node.flags & LOCAL_TRUTH and not rebuilt_as_is(node, rstat):
            return None  # (local changes win until they are replayed)
    return subdirs


@dataclass
class _Walk:
    """Lookups and listings going through the subfolders of one folder (``Listings._walk_on``)."""

    last: int | None = None  # the subfolder they were in last
    #: its subfolders in its listing order, and their positions (``_subfolder_order``),
    #: as its kept listing had them last
    order: tuple[list[int], dict[int, int]] = field(default_factory=lambda: ([], {}))


def _subfolder_order(children: list[Node]) -> tuple[list[int], dict[int, int]]:
    subfolders = [c.ino for c in children if c.is_dir]
    return subfolders, {ino: i for i, ino in enumerate(subfolders)}


def _by_name(kept: Kept) -> dict[bytes, Node]:
    return _derived(kept, "names", lambda nodes: {n.name: n for n in nodes})


def _derived(kept: Kept, key: str, make: Callable[[list[Node]], T]) -> T:
    """What ``make`` derives from a kept listing's children, made once per kept listing."""
    value: T | None = kept[2].get(key)
    if value is None:
        value = kept[2][key] = make(kept[1])
    return value


# -- applying a listing to the index --------------------------------------------------------
@dataclass
class ListingDelta:
    changed: list[Node] = field(default_factory=list)  # base version differs from before
    removed: list[Node] = field(default_factory=list)
    #: names of the folder that went or now lead to another object: the kernel forgets
    #: its entries of them (a hard-linked node's ``name`` may be another folder's)
    names_gone: list[bytes] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)  # the folder's entries afterwards
    same: bool = True  # nothing written: the listing matched the cached entries
    #: files left as they were for a writer (``keep``) though the listing differs from
    #: them or no longer has them: not checked by it
    passed_over: set[int] = field(default_factory=set)


def _says_gone(error: RemoteError, folder: Node) -> bool:
    """Whether the remote's answer to a listing says the folder is gone (or no longer a
    folder): its parent is listed again (``Listings.vanished``); the root never goes."""
    return error.errno in (errno.ENOENT, errno.ENOTDIR) and folder.ino != ROOT_INO


def apply_listing(store: Store, parent: int, listing: list[Any],
                  keep: Callable[[int], bool] = lambda ino: False,
                  copy_name: LocalCopyName = local_copy_name) -> ListingDelta:
    """Make the cached entries of ``parent`` equal ``listing`` [(name, remote stat)] in one
    transaction, each node as ``node_from_remote`` builds it. Entries gone from the remote
    are removed unless local truth, a local-only object or ``keep(ino)`` (a file open for
    writing) keeps them; a listed node that is local truth, or that ``keep(ino)`` keeps, is
    left as it is (those kept though the remote's differ: ``passed_over``). A local-only
    object under a listed name gives the name up to the server's object and moves to
    ``copy_name(name, n)``, the first of n = 1, 2 ... free in the folder. Returns what
    changed, so that the caller can drop content and invalidate the kernel's caches."""
    applied = _Applied(parent, listing, keep, copy_name)
    store.run_write(lambda txn: applied.run(Txn(store, txn)),
                    folders=lambda: set() if applied.delta.same else applied.folders)
    return applied.delta


class _Applied:
    """One application of a listing (``apply_listing``); run again when the map had to grow.

    ``folders``: the listings it changes: the folder's, its parent's (the folder's own
    node), and any folder dropped with its subtree; a hard-linked node, listed elsewhere
    too, makes it "all" (None); none when the listing found nothing new (``delta.same``)."""

    def __init__(self, parent: int, listing: list[Any], keep: Callable[[int], bool],
                 copy_name: LocalCopyName = local_copy_name) -> None:
        self.parent = parent
        self.listing = listing
        self.keep = keep
        self.copy_name = copy_name
        self.delta = ListingDelta()
        self.folders: set[int] | None = {parent}

    def run(self, t: Txn) -> None:
        self.delta = delta = ListingDelta()
        self.folders = {self.parent}
        entries = t.entries(self.parent)
        if not entries and self.listing:
            self._take_new(t)
            return
        existing = dict(entries)
        built = self._take_listed(t, existing)
        self._drop_unlisted(t, existing)
        if self.folders is not None:
            self.folders.update(n.ino for n in delta.removed if n.is_dir)
        self._count_subfolders(t)
        # The folder's entries as ``children`` reads them, without unpacking again the
        # nodes just built (the opendir that asked for the listing reads them next).
        delta.children = t.children(self.parent, built, entries if delta.same else None)

    def _take_new(self, t: Txn) -> None:
        """A folder listed with no cached entry (its first listing): every node is new,
        built and written in one batch (``Txn.add_children``), and the folder's children
        are those nodes, not read back (the common case of a cold walk: it took half of
        the walk's time)."""
        self.delta.same = False
        first = t.next_ino()
        parent = self.parent
        nodes = [_new_node(ino, parent, name, rstat) for ino, (name, rstat) in enumerate(self.listing, first)]
        t.set_next_ino(first + len(nodes))
        self.delta.children = t.add_children(parent, nodes)
        self._count_subfolders(t)

    def _take_listed(self, t: Txn, existing: dict[bytes, int]) -> dict[int, Node]:
        """Each listed name's node, built from the remote's stat (new numbers for new
        names, read and written once); ``existing`` is left with the names not listed."""
        built: dict[int, Node] = {}
        next_ino = first_ino = None
        for name, rstat in self.listing:
            ino, old = self._cached(t, existing, name)
            if old is not None:
                if old.flags & LOCAL_TRUTH:
                    continue  # local changes win until they are replayed
                if self.keep(old.ino):  # (a writer about to change it: as it is until it closes)
                    if not ((old.parent, old.name) == (self.parent, name) and rebuilt_as_is(old, rstat)):
                        self.delta.passed_over.add(old.ino)
                    continue
                if stat_mod.S_IFMT(old.mode) != rstat.kind:
                    # A different kind of object under the same name: a new node.
                    self.delta.removed.append(old)
                    self.delta.names_gone.append(name)
                    if t.drop_tree(old):
                        self.folders = None  # (a hard-linked node under it, kept in another folder)
                    ino, old = None, None
                elif (old.parent, old.name) == (self.parent, name) and rebuilt_as_is(old, rstat):
                    built[old.ino] = old  # (the common case, tested without building a node)
                    continue
            if ino is None:
                if next_ino is None:
                    next_ino = first_ino = t.next_ino()
                ino, next_ino = next_ino, next_ino + 1
                t.set_entry(self.parent, name, ino)
            built[ino] = self._put(t, node_from_remote(ino, self.parent, name, rstat, old), old)
        if next_ino != first_ino and next_ino is not None:
            t.set_next_ino(next_ino)
        return built

    def _cached(self, t: Txn, existing: dict[bytes, int], name: bytes) -> tuple[int | None, Node | None]:
        """The number and node cached under a listed name (taken out of ``existing``);
        none when nothing is, or when a local-only object was and gave the name up."""
        ino = existing.pop(name, None)
        old = t.node(ino) if ino is not None else None
        if old is not None and old.flags & LOCAL_ONLY:
            self._move_local_only(t, old, name)
            return None, None
        return ino, old

    def _move_local_only(self, t: Txn, node: Node, name: bytes) -> None:
        """The server lists an object under the name of a local-only one: the server's
        object takes the name, the local one moves to a free conflict-style name in the
        folder (kept by this listing as any local-only object it does not show)."""
        taken = {n for n, _rstat in self.listing}
        for n in range(1, 101):
            new_name = self.copy_name(name, n)
            if new_name not in taken and t.child_ino(self.parent, new_name) is None:
                break
        else:
            log.error("%r: no free name to keep the local-only object under: it is removed",
                      name)
            t.delete_entry(self.parent, name)
            t.drop_tree(node)
            self.delta.removed.append(node)
            self.delta.names_gone.append(name)
            self.delta.same = False
            return
        log.warning("the server has an object named %r in folder inode %d: it takes the name; the "
                    "local-only %s there is kept as %r", name, self.parent, _kind_word(node.mode), new_name)
        self.delta.same = False
        self.delta.names_gone.append(name)  # (the kernel forgets the name's entry; the node stays)
        t.delete_entry(self.parent, name)
        t.set_entry(self.parent, new_name, node.ino)
        if node.nlink > 1:
            self.folders = None
            t.add_link_name(node.ino, self.parent, new_name)
        if (node.parent, node.name) == (self.parent, name):
            t.put(dataclasses.replace(node, name=new_name))

    def _put(self, t: Txn, node: Node, old: Node | None) -> Node:
        if node == old:
            return node  # a folder listed again is mostly unchanged: no write
        self.delta.same = False
        if old is not None and old.nlink > 1 and not old.is_dir:
            self.folders = None
        if old is not None and old.base is not None and node.base != old.base:
            self.delta.changed.append(node)
        t.put(node)
        return node

    def _drop_unlisted(self, t: Txn, unlisted: dict[bytes, int]) -> None:
        for name, ino in unlisted.items():
            node = t.node(ino)
            if node is not None and node.flags & KEPT_UNLISTED:
                continue  # (a damaged copy, a refused version, a FIFO or socket: on no server, kept here)
            if node is not None and self.keep(ino):
                self.delta.passed_over.add(ino)  # (a writer's: its changes replayed as those of a file deleted there)
                continue
            self.delta.same = False
            t.delete_entry(self.parent, name)
            self.delta.names_gone.append(name)
            if node is not None and node.nlink > 1 and not node.is_dir:
                # One name of a hard-linked file went away; the node lives on.
                self.folders = None
                node.nlink -= 1
                if (node.parent, node.name) == (self.parent, name):
                    others = t.names_of(ino)
                    if others:
                        node.parent, node.name = others[0]
                t.put(node)
            elif node is not None:
                self.delta.removed.append(node)
                if t.drop_tree(node):
                    self.folders = None  # (a hard-linked node under it, kept in another folder)

    def _count_subfolders(self, t: Txn) -> None:
        """The folder is LISTED, its link count that of a local filesystem's folder."""
        pnode = t.node(self.parent)
        if pnode is None:
            return
        if self.folders is not None:
            self.folders.add(pnode.parent)
        subdirs = sum(1 for _name, rstat in self.listing if stat_mod.S_ISDIR(rstat.mode))
        if not pnode.has(LISTED) or pnode.nlink != 2 + subdirs:
            self.delta.same = False
            pnode.flags |= LISTED
            pnode.nlink = 2 + subdirs  # as a local filesystem counts them
            t.put(pnode)


def _kind_word(mode: int) -> str:
    kind = stat_mod.S_IFMT(mode)
    return {stat_mod.S_IFIFO: "FIFO", stat_mod.S_IFSOCK: "socket", stat_mod.S_IFCHR: "character device",
            stat_mod.S_IFBLK: "block device"}.get(kind, "object")


def node_from_remote(ino: int, parent: int, name: bytes, rstat: RemoteStat, old: Node | None) -> Node:
    """The record for a remote object; keeps local flags and content when unchanged."""
    base = rstat.version()
    flags = 0
    target = b""
    if old is not None:
        flags = old.flags
        target = old.target
        if old.base != base and not stat_mod.S_ISDIR(rstat.mode):
            # The remote content changed: what we cached of it is stale.
            flags &= ~(FULL | TARGET)
            target = b""
    mtime, atime, ctime = rstat.mtime_ns, rstat.atime_ns, rstat.mtime_ns
    if old is not None and old.base == base and _same_second(old.mtime_ns, mtime):
        # Unchanged, and SFTP gives whole seconds: keep the finer times we know locally,
        # so build tools and git do not see files change under them.
        mtime, atime, ctime = old.mtime_ns, old.atime_ns, old.ctime_ns
    return Node(
        ino=ino, parent=parent, name=name, mode=rstat.mode, size=rstat.size,
        mtime_ns=mtime, atime_ns=atime, ctime_ns=ctime,
        uid=rstat.uid, gid=rstat.gid, nlink=_link_count(rstat, old), flags=flags, base=base,
        last_use=old.last_use if old else 0.0, target=target, gen=old.gen if old else 0,
        synced_gen=old.synced_gen if old else 0,
    )


def _new_node(ino: int, parent: int, name: bytes, rstat: RemoteStat) -> Node:
    """``node_from_remote`` for a name not cached before (positional: made a thousand at a
    time)."""
    mode = rstat.mode
    nlink = rstat.nlink or 1
    if mode & 0o170000 == stat_mod.S_IFDIR and nlink < 2:
        nlink = 2
    mtime = rstat.mtime_ns
    return Node(ino, parent, name, mode, rstat.size, mtime, rstat.atime_ns, mtime, rstat.uid, rstat.gid,
                nlink, 0, (rstat.size, rstat.tag or mtime, mode & 0o170000), 0.0, b"", 0, 0)


def _link_count(rstat: RemoteStat, old: Node | None) -> int:
    nlink = rstat.nlink if rstat.nlink else 1
    if old is not None and not old.is_dir and nlink <= 1:
        nlink = old.nlink  # SFTP does not report link counts: keep the one we know
    if stat_mod.S_ISDIR(rstat.mode):
        # A folder's count is kept by its own listing (SFTP does not report it).
        nlink = old.nlink if old is not None and old.is_dir else max(nlink, 2)
    return nlink


def rebuilt_as_is(node: Node, rstat: RemoteStat) -> bool:
    """Whether ``node_from_remote`` would give ``node`` back unchanged from ``rstat``, for a
    node not hard-linked (whose record names one of its folders): same version, mode and
    owner. A cheap test for the common case of a folder listed again."""
    return node.base == rstat.version() and node.mode == rstat.mode and node.uid == rstat.uid \
        and node.gid == rstat.gid and (node.is_dir or (node.nlink <= 1 and rstat.nlink <= 1))


def _same_second(a_ns: int, b_ns: int) -> bool:
    return a_ns // 1_000_000_000 == b_ns // 1_000_000_000
