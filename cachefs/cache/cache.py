"""The cache: answers the FUSE layer from the store, reading through to the remote.

``Cache`` is a façade: it builds the cache's parts from its constructor arguments, offers
what ``fs``, ``control``, ``sync`` and the hoard call, and coordinates what spans parts (a
remote change that drops content, checkpoints, the path API of the control file). Each
part owns its state; see their modules:

- ``listing.Listings``: lookups, listings and their validation, kept listings, listing
  ahead, local-truth folders;
- ``content.Content``: what of each file is cached, fetches, read-ahead, small-file
  prefetch, the cached-bytes count;
- ``files.Files``: open files, reads, release, orphans, passthrough backings (with
  ``handles.Opens``, the open counts);
- ``writes.Writes``: the write path, held sizes, truncation, attributes, commits and
  checksums; ``names.Names``: create, mkdir, symlink, link, unlink, rmdir, rename;
- ``ahead.ContentsAhead``: the contents of a folder's small files read into the page
  cache in the background at its first opendir.

Parts are built listings, content, writes, names, files (with ``Opens`` first); a part
calls only parts built before it, and reaches
those after it only through callbacks the façade gives it (``_stale``, ``_forget_content``,
``_folder_listed``).
Must not touch: FUSE request details (``cachefs.fs``), the remote other than through
``Connectivity.call``, and the remote's write side (only the sync manager changes it).

Concurrency: every method runs on the trio thread; LMDB transactions are short and
synchronous; blocking work (remote calls, writes of fetched chunks, fsync, large hashes)
runs in worker threads. The trio locks are per part (a folder's listing lock in
``Listings``, the commit lock in ``Writes``). A folder's listing lock may be held while its
parent's is taken (a folder found gone lists its parent), never the reverse; no other lock
is taken while one is held.
In-memory state (freshness times, ranges being fetched) is lost on restart by design:
after a restart everything is revalidated once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import lmdb
import trio

from ..errors import NotFound, RemoteError, Unavailable
from ..link.connectivity import Connectivity
from ..remote import SpaceInfo
from ..store.crypto import RecordError
from ..store.index import (CONFLICT, DAMAGED, DIRTY, FULL, KEPT, LISTED, PINNED, ROOT_INO, Node, Store, Txn,
                           index_damaged)
from ..store.index import LOCAL_ONLY
from ..store.records import Version
from .common import CONTROL_NAME, CacheConfig, Kernel, LocalCopyName, local_copy_name
from .ahead import ContentsAhead
from .callbacks import Callbacks
from .reconcile import Reconcile
from .content import Content
from .files import Files
from .handles import OpenFile, Opens
from .listing import Listings
from .names import Names
from .transfer import Transfers
from .writes import Writes
from .xattrs import Xattrs

__all__ = ["CONTROL_NAME", "ROOT_INO", "Cache", "CacheConfig", "Kernel", "Node", "OpenFile",
           "is_index_error"]
__all__ += ["LOCAL_ONLY"]

log = logging.getLogger(__name__)
T = TypeVar("T")
#: the longest the mount's first requests wait for the root's attributes (``run``)
ROOT_STAT_WAIT = 2.0
DAMAGE_TOLD = 100  # damaged records or pages told in the log once each, at most


class Cache:
    def __init__(self, store: Store, conn: Connectivity, config: CacheConfig | None = None,
                 kernel: Kernel | None = None, *, transfers: Transfers | None = None,
                 changed: Callable[[], None] | None = None,
                 local_copy_name: LocalCopyName = local_copy_name) -> None:
        """``transfers``: the blocking fetch jobs (by default run in this process);
        ``changed``: called after every journal append and each writer's release (the
        sync manager's write-back trigger); ``local_copy_name``: the names a local-only
        object moves to when the server lists an object under its name."""
        self.config = config or CacheConfig()
        self._store = store
        self._conn = conn
        self._kernel = kernel or Kernel()
        jobs = transfers or Transfers.in_process(conn.remote, store.content)
        self._opens = Opens()
        self._listings = Listings(store, conn, self.config, self._kernel, jobs.list_folder,
                                  list_folders=jobs.list_folders, stale=self._stale,
                                  forget_content=self._forget_content, listed=self._folder_listed,
                                  writing=self._opens.writers.__contains__, copy_name=local_copy_name)
        self._content = Content(store, conn, self.config, self._listings, self._opens,
                                fetch=jobs.fetch, fetch_many=jobs.fetch_many, stale=self._stale)
        self._writes = Writes(store, conn, self._listings, self._content, self._opens,
                              changed=changed or _nothing)
        self._names = Names(store, self._listings, self._content, self._opens, self._writes,
                            conn.remote.capabilities, conn.remote.name_error)
        self._files = Files(store, conn, self.config, self._kernel, self._listings, self._content,
                            self._writes, self._names, self._opens)
        self._callbacks = Callbacks(store, conn, self._listings, self._kernel, self.config.callbacks)
        self._xattrs = Xattrs(store, conn, self._listings, self._writes.journal, changed or _nothing)
        self._content.fetched = self._xattrs.read_ahead
        self._ahead = ContentsAhead(store, self._opens, self._listings.children,
                                    self._listings.sibling_folders)
        self._space: SpaceInfo | None = None
        self._nursery: trio.Nursery | None = None  # (the background work of ``run``)
        self._space_at = 0.0
        self._checkpointed = trio.Event()  # set (and replaced) after each checkpoint
        self._damage_told: set[str] = set()
        #: (Store.conflict_generation, the paths conflict records name, records by kind) last read
        self._conflicts_at: tuple[int, frozenset[bytes], dict[str, int]] = (-1, frozenset(), {})
        # The requests of the hot paths go straight to the part that serves them.
        self.node = self._listings.node
        self.lookup = self._listings.lookup
        self.listdir = self._listings.listdir
        self.derived = self._listings.derived
        self.readlink = self._listings.readlink
        self.folder_opened = self._ahead.opened
        self.open = self._files.open
        self.create = self._files.create
        self.read = self._files.read
        self.release = self._files.release
        self.written_through = self._files.written_through
        self.write = self._writes.write
        self.commit_changes = self._writes.commit_changes
        self.fsync = self._writes.fsync
        self.mkdir = self._names.mkdir
        self.symlink = self._names.symlink
        self.mknod = self._names.mknod
        self.link = self._names.link
        self.unlink = self._names.unlink
        self.rmdir = self._names.rmdir
        self.rename = self._names.rename
        self.getxattr = self._xattrs.get
        self.listxattr = self._xattrs.names
        self.setxattr = self._xattrs.set
        self.removexattr = self._xattrs.remove
        self.op_done = self._listings.op_done
        self.op_replaced = self._listings.op_replaced
        #: the replay's named store changes (``reconcile``): a node and its content
        self.reconcile = Reconcile(store, lambda ino: bool(self._opens.writers.get(ino)))
        # Folders with journaled changes are local truth: found again from the journal.
        self._listings.rebuild_local_dirs()

    @property
    def store(self) -> Store:
        """The store, for the hoard (of this package) and tests; ``fs`` and ``control``
        ask the façade instead (tests/test_layers.py)."""
        return self._store


    # -- life cycle --------------------------------------------------------------------
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work (listing ahead, fetches, checkpoints). Runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._content.start(nursery)
            if self.online:
                # (the kernel's first requests wait for this: at most a round trip or two)
                with trio.move_on_after(ROOT_STAT_WAIT):
                    with contextlib.suppress(Unavailable, RemoteError, NotFound):
                        await self._listings.root_attributes()
            self._listings.start(nursery)
            self._xattrs.start(nursery)
            nursery.start_soon(self._callbacks.run)
            nursery.start_soon(self._ahead.run)
            task_status.started()
            try:
                while True:
                    await trio.sleep(self.config.checkpoint_interval)
                    try:
                        await self.checkpoint()
                        done, self._checkpointed = self._checkpointed, trio.Event()
                        done.set()
                        self._store.reserve()
                    except (OSError, lmdb.Error) as exc:  # a full disk: retried next time
                        log.error("checkpoint failed (retrying): %s", exc)
            finally:
                with trio.CancelScope(shield=True):
                    await self.checkpoint()

    def start_fetching(self, nursery: trio.Nursery) -> None:
        """Fetch in ``nursery`` (for a test that drives the cache without ``run``)."""
        self._content.start(nursery)

    async def checkpointed(self) -> None:
        """Return after the next checkpoint of ``run`` (the hoard's cue to evict)."""
        await self._checkpointed.wait()

    async def checkpoint(self) -> None:
        """Commit changed files, make fetched content durable, then record it in the index
        (in that order, so the index never claims bytes that a power loss could take back)."""
        await self._writes.commit_changes()
        await self._content.save()

    # -- what spans parts ------------------------------------------------------------------
    def _stale(self, ino: int) -> None:
        """The remote content changed: drop what we cached of it and tell the kernel."""
        log.debug("stale content dropped: inode %d", ino)
        self._files.detach(ino)
        self._content.drop(ino)
        self._kernel.invalidate_inode(ino)

    def forgotten(self, inodes: list[int]) -> None:
        """The kernel let go of these inodes: unlinked local-only objects among them go."""
        for ino in inodes:
            self._listings.unlinked_local.pop(ino, None)

    @property
    def unlinked_local(self) -> bool:
        """Whether an unlinked local-only object waits for the kernel to let go of it."""
        return bool(self._listings.unlinked_local)

    def _forget_content(self, ino: int) -> None:
        self._content.forget(ino)

    def _folder_listed(self, folder: int) -> None:
        self._content.folder_listed(folder)
        self._xattrs.listed(folder)

    def read_xattrs_ahead(self, ino: int) -> None:
        """The node's extended attributes read in the background, where the remote keeps
        them and they never were (a pin walk: they are there offline)."""
        self._xattrs.read_ahead(ino)

    async def setattr(self, ino: int, *, mode: int | None = None, size: int | None = None,
                      atime_ns: int | None = None, mtime_ns: int | None = None,
                      handle: OpenFile | None = None, uid: int | None = None,
                      gid: int | None = None) -> Node:
        gone = self._listings.unlinked_local.get(ino)
        if gone is not None and self._store.get(ino) is None:  # (an unlinked FIFO still open)
            return _set_in_memory(gone, mode, atime_ns, mtime_ns)
        node = await self._writes.setattr(self.node(ino), mode=mode, size=size, atime_ns=atime_ns,
                                          mtime_ns=mtime_ns, handle=handle, uid=uid, gid=gid)
        return node if node is not None else self.node(ino)

    def remote_changed(self, ino: int, parent_ino: int, moved_aside: bool = False,
                       rehomed_from: bytes | None = None) -> None:
        """The sync manager changed the remote under this node in a way the cache cannot
        follow by itself (a conflict): list the folder again, drop stale content; a node
        moved aside on the remote is forgotten here so the listing brings both back,
        unless it was re-homed under its new name (``Reconcile.rehome``, from the name
        ``rehomed_from``): then it keeps its content, and the kernel forgets the old name."""
        self._listings.forget_listed(parent_ino)
        self._listings.forget_checked(ino)
        if rehomed_from is not None:
            self._kernel.invalidate_entry(parent_ino, rehomed_from)
            return
        if moved_aside:
            node = self._store.get(ino)
            if node is not None:
                def change(t: Txn) -> None:
                    if t.child_ino(node.parent, node.name) == ino:
                        t.delete_entry(node.parent, node.name)
                    t.delete_node(ino)
                self._store.transact(change)
                self._store.remove_content_file(ino)
                self._content.forget(ino)
                self._kernel.invalidate_entry(node.parent, node.name)
            return
        # As any remote change: a file the kernel reads itself keeps its version whole for
        # the handles open on it (``Files.detach``; dropping the content in place cut it to
        # nothing under them: a reader found it empty, reviewed), those this process reads
        # for get EIO rather than the new version's bytes after the old ones.
        self._stale(ino)

    # -- content, for the hoard and the status ------------------------------------------------
    def cached_bytes(self) -> int:
        """Content bytes in the cache (a running count; exact after a restart)."""
        return max(0, self._content.usage)

    def passthrough_status(self) -> dict[str, object]:
        """Whether the kernel reads whole cached files itself, and how many are open so."""
        return self._files.passthrough_status()

    @property
    def writers(self) -> dict[int, int]:
        """ino -> handles open for writing (read only)."""
        return self._opens.writers

    def is_open(self, ino: int) -> bool:
        return bool(self._opens.count.get(ino))

    def last_use(self, node: Node) -> float:
        return self._opens.last_use.get(node.ino, node.last_use)

    def evict_content(self, node: Node) -> int:
        """Drop the cached content of a clean, unpinned, closed file; bytes freed."""
        found = self._store.get(node.ino)
        if found is None or not found.is_file or found.flags & (DIRTY | PINNED | CONFLICT | DAMAGED | KEPT) \
                or self.is_open(found.ino):
            return 0
        return self._content.evict(found)

    async def fetch_whole(self, node: Node) -> None:
        """All of a file's content into the cache (pinning), a window of chunks at a time."""
        node = self.node(node.ino)
        if not node.is_file or node.has(FULL):
            return
        window = self.config.chunk_size * 16
        for start in range(0, node.size, window):
            await self._content.ensure_present(node, start, min(node.size, start + window), readahead=False)
        if node.size == 0:
            self._writes.mark_full(node.ino)

    def content_state(self, node: Node) -> str:
        """'cached', 'partial' or 'remote' for a file (what of it is here)."""
        return self._content.state(node)

    def state(self, ino: int) -> str:
        """What ``user.cachefs.state`` says of a node: its ``_state``, followed by
        ``, xattrs local`` when it has extended attributes that only this cache keeps
        (the remote carries none)."""
        state = self._state(ino)
        return f"{state}, xattrs local" if self._xattrs.has_local_only(ino) else state

    def _state(self, ino: int) -> str:
        """Local, damaged, conflict, dirty, pinned,
        or what of it is cached (cached, partial, remote). ``conflict``: the node is
        flagged so (``CONFLICT``), or one of its paths is named by a conflict record (its
        ``path``, ``conflict_path`` or ``target``), whatever the kind: a name that came
        back from the server after a deletion here has no flag of ours."""
        node = self.node(ino)
        if node.has(LOCAL_ONLY):
            return "local"  # (a FIFO, socket or device node: in this cache only)
        if node.has(DAMAGED):
            return "damaged"
        if node.has(CONFLICT) or self._named_in_conflict(node):
            return "conflict"
        for flag, word in ((DIRTY, "dirty"), (PINNED, "pinned")):
            if node.has(flag):
                return word
        if node.is_dir:
            return "cached" if node.has(LISTED) else "remote"
        if node.is_symlink:
            return "cached"
        return self._content.state(node)

    def _named_in_conflict(self, node: Node) -> bool:
        names = self._conflicts_seen()[0]
        if not names:
            return False
        paths = self._store.paths_of(node.ino) if node.nlink > 1 else [self._store.path_of(node.ino)]
        return any(path in names for path in paths)

    def _conflicts_seen(self) -> tuple[frozenset[bytes], dict[str, int]]:
        """Every path the conflict records name, and how many records of each kind;
        read again only after a record was added or deleted (``Store.conflict_generation``),
        not at each ``getxattr`` or status read."""
        generation = self._store.conflict_generation
        if self._conflicts_at[0] != generation:
            names: set[bytes] = set()
            kinds: dict[str, int] = {}
            for found in self._store.conflict_records():
                kind = str(found.get("kind"))
                kinds[kind] = kinds.get(kind, 0) + 1
                for key in ("path", "conflict_path", "target"):
                    if isinstance(text := found.get(key), str) and text:
                        names.add(text.encode("utf-8", "surrogateescape"))
            self._conflicts_at = (generation, frozenset(names), dict(sorted(kinds.items())))
        return self._conflicts_at[1], self._conflicts_at[2]

    def conflict_kinds(self) -> dict[str, int]:
        """How many unresolved conflict records of each kind."""
        return dict(self._conflicts_seen()[1])

    # -- the link, the index and the kernel, for fs and control ------------------------------
    @property
    def online(self) -> bool:
        return self._conn.online

    def link_status(self) -> dict[str, Any]:
        """The connectivity's state, the remote's description, when it last answered, and
        the last error met reaching it."""
        conn = self._conn
        callbacks = self._callbacks
        return {"connectivity": conn.state.value, "remote": conn.remote.description,
                "last_online": conn.last_online, "last_error": conn.last_error,
                "callbacks": {"live": callbacks.live, "off": callbacks.why_not, "changes": callbacks.changes,
                              "partial": callbacks.live and callbacks.partial}}

    def work_offline(self) -> None:
        self._conn.work_offline()

    def work_online(self) -> None:
        self._conn.work_online()

    def conflict_count(self) -> int:
        return self._store.count(self._store.conflicts)

    def conflict_records(self) -> list[dict[str, Any]]:
        return self._store.conflict_records()

    async def kernel_settled(self) -> None:
        """Return once every invalidation asked of the kernel so far has reached it."""
        await self._kernel.settled()

    @property
    def data_dir(self) -> str:
        """The folder of the content files."""
        return str(self._store.data_dir)

    def damage(self, exc: BaseException) -> str | None:
        """What to log of a damaged index record or page a request met: the message that
        says how to save the changes, once per damage (None when told already)."""
        text = str(exc)
        if text in self._damage_told:
            return None
        if len(self._damage_told) < DAMAGE_TOLD:
            self._damage_told.add(text)
        return index_damaged(self._store.dir, text)

    # -- the share ---------------------------------------------------------------------
    async def statfs(self) -> SpaceInfo:
        if self._conn.online and (self._space is None or time.monotonic() - self._space_at > 30):
            if self._space is not None and self._nursery is not None:
                # (the figures we have, rather than a wait on a suspect link)
                await self._conn.unless_suspect(self._ask_space, self._nursery)
            else:
                await self._ask_space()
        if self._space is None:
            return SpaceInfo(4096, 1 << 28, 1 << 27, 1 << 27, 1 << 20, 1 << 19)
        return self._space

    async def _ask_space(self) -> bool:
        try:
            self._space = await self._conn.call(self._conn.remote.statvfs)
            self._space_at = time.monotonic()
        except (Unavailable, RemoteError):
            pass
        return True

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
        self._kernel.invalidate_entry(sp, sn)
        self._kernel.invalidate_entry(dp, dn)

    async def unlink_path(self, path: bytes, *, server: tuple[int, Version | None] | None = None) -> None:
        """An unlink (or rmdir) asked for by the control file. ``server``: the number and
        version of the server's object at ``path`` (a resolve keeping a deletion made here):
        where a local-only object holds the name here (a FIFO made after the deletion),
        only the server's object goes (journaled); the local-only one stays."""
        parent, name = await self._parent_and_name(path)
        node = await self.lookup(parent, name)
        if server is not None and node.has(LOCAL_ONLY):
            self._names.unlink_server_object(parent, name, *server)
            return
        if node.is_dir:
            await self.rmdir(parent, name)
        else:
            await self.unlink(parent, name)
        self._kernel.invalidate_entry(parent, name)

    def _cached_at(self, path: bytes) -> Node | None:
        """The cached node at a share-relative path, from the index alone."""
        head, _, name = path.rpartition(b"/")
        ino = ROOT_INO
        for part in [p for p in head.split(b"/") if p]:
            ino = self._store.child_ino(ino, part) or 0
        return self._store.child(ino, name) if ino else None

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
        self._writes.settle_kept(node.ino, drop, resend_content)
        if drop:  # (its content goes too, and the kernel's pages of it)
            self.remote_changed(node.ino, parent_ino=node.parent)

    def settle_xattr(self, path: bytes, name: bytes, send_again: bool, drop: bool) -> None:
        """The extended attribute ``name`` the remote refused, at a resolve: journaled
        again (``send_again``), or ours dropped for the server's (``drop``), or left here."""
        node = self._cached_at(path)
        if node is not None and name:
            self._xattrs.settle(node.ino, name, send_again=send_again, drop=drop)

    def clear_conflict(self, path: bytes) -> None:
        node = self._cached_at(path)
        if node is not None and node.has(CONFLICT):
            node.flags &= ~CONFLICT
            self._store.put(node)


def is_index_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the index's: a damaged record or page, or LMDB's own error."""
    return isinstance(exc, (RecordError, lmdb.Error))


def index_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the index could not grow: the cache's disk is full."""
    return isinstance(exc, lmdb.Error) and "No space left" in str(exc)


def _set_in_memory(node: Node, mode: int | None, atime_ns: int | None, mtime_ns: int | None) -> Node:
    """chmod or utimensat of an unlinked local-only object still open (in memory only)."""
    if mode is not None:
        node.mode = node.mode & ~0o7777 | mode & 0o7777
    if atime_ns is not None:
        node.atime_ns = atime_ns
    if mtime_ns is not None:
        node.mtime_ns = mtime_ns
    node.ctime_ns = time.time_ns()
    return node


def _nothing() -> None:
    pass
