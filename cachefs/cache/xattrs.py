"""Extended attributes: the ``user.`` namespace, kept in the cache with each node.

Owns: what getxattr, listxattr, setxattr and removexattr do to a node's record
(``store.xattrs.XattrSet``), ext4's limits and errno for them, reading the remote's
attributes of a node once (where the remote carries them: ``Capabilities.xattrs``), and the
``xattr`` journal entry of each change (only where the remote carries them; elsewhere
they stay in the cache, local-only, and ``user.cachefs.state`` says so).
Must not touch: the remote's write side (the replay sends them), content, names, FUSE.

Namespaces other than ``user.`` (``trusted.``, ``security.``, ``system.``: POSIX ACLs,
capabilities, SELinux labels) are ENOTSUP: nothing carries them to a server, and the
kernel takes ENOTSUP as "this file system has none". ``user.`` attributes are for regular
files and folders only (the kernel's VFS refuses them on the others before the request
reaches a file system, as ext4 does: EPERM to set, ENODATA to read).

A change of the server's attributes is not noticed: they are read once per node (at its
first attribute request while online, or in the background after a fetch of its content,
a listing of a folder (and its empty files), a pin walk) and kept. Offline, where they were never read, a request whose answer depends on them is
EHOSTDOWN (not "none": ``cp -a`` would silently copy a file without them).

Concurrency: on the trio thread; the only await is the remote read, after which the
record is read again inside the transaction that writes it.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import trio

from ..errors import RemoteError, Unavailable, XattrRefused
from ..link.connectivity import Connectivity
from ..store.index import ORPHAN, Node, Store, Txn
from ..store.journal import Op
from ..store.xattrs import USER, XattrSet, check_request
from .listing import Listings

log = logging.getLogger(__name__)

#: background reads of a remote's attributes running at once (``Xattrs.start``)
READ_AHEAD_AT_ONCE = 2


class Xattrs:
    def __init__(self, store: Store, conn: Connectivity, listings: Listings,
                 journal: Callable[[Txn, Op], None], changed: Callable[[], None]) -> None:
        self.store = store
        self._conn = conn
        self._listings = listings
        self._journal = journal
        self._changed = changed
        self._nursery: trio.Nursery | None = None
        #: nodes whose attributes were read (or found known) after a fetch of their content
        self._read_ahead: set[int] = set()
        self._reading = trio.CapacityLimiter(READ_AHEAD_AT_ONCE)  # (made again in ``start``)

    @property
    def carried(self) -> bool:
        """Whether the remote keeps them (else they are this cache's only)."""
        return self._conn.remote.capabilities.xattrs

    # -- reading ----------------------------------------------------------------------
    async def get(self, ino: int, name: bytes) -> bytes:
        _user_only(name)
        check_request(name)
        node = self._listings.node(ino)
        if not (node.is_file or node.is_dir):
            raise XattrRefused(errno.ENODATA)
        found = await self._loaded(node)
        value = found.get(name)
        if value is None:
            self._unknown_offline(found, name)
            raise XattrRefused(errno.ENODATA)
        return value

    async def names(self, ino: int) -> list[bytes]:
        node = self._listings.node(ino)
        if not (node.is_file or node.is_dir):
            return []
        found = await self._loaded(node)
        self._unknown_offline(found)
        return found.names()

    def _unknown_offline(self, found: XattrSet, name: bytes | None = None) -> None:
        """EHOSTDOWN (the mount's offline errno) where the answer depends on the server's
        attributes, never read and unreadable now: "none" would be a guess (``cp -a`` and
        ``rsync -X`` would copy the file silently without them). Online (a rename still
        to replay, a read that failed), what is known here is the answer meanwhile."""
        if not found.complete and (name is None or name not in found.items) and not self._conn.online:
            raise XattrRefused(errno.EHOSTDOWN, "the server's extended attributes were not read "
                                                "before going offline")

    # -- reading them ahead --------------------------------------------------------------
    def start(self, nursery: trio.Nursery) -> None:
        """Reads ahead (``fetched``) run in ``nursery`` from now on, two at a time (a
        folder of 10,000 empty files must not queue 10,000 calls before a user's stat)."""
        self._nursery = nursery
        self._reading = trio.CapacityLimiter(READ_AHEAD_AT_ONCE)

    def read_ahead(self, ino: int) -> None:
        """Content of the node was fetched (or it is pinned, or a folder listed): its
        attributes are read too, after it in the background (once per node and mount), so
        that what was read online has them offline. Nothing where the remote keeps none."""
        if not self.carried or self._nursery is None or ino in self._read_ahead:
            return
        if len(self._read_ahead) > 100_000:  # (a bound: at worst read again, once)
            self._read_ahead.clear()
        self._read_ahead.add(ino)
        found = self.store.get_xattrs(ino)
        if found is None or not found.complete:
            self._nursery.start_soon(self._read_quietly, ino)

    def listed(self, folder: int) -> None:
        """A folder was listed: its attributes, and those of its empty files (which have
        no content to fetch), are read ahead."""
        if not self.carried or self._nursery is None or folder in self._read_ahead:
            return  # (once per folder and mount: a listing again reads no index range)
        self.read_ahead(folder)
        for child in self.store.children(folder):
            if child.is_file and child.size == 0:
                self.read_ahead(child.ino)

    async def _read_quietly(self, ino: int) -> None:
        async with self._reading:
            node = self.store.get(ino)
            if node is None:
                return
            await self._read_logged(node)

    async def _read_logged(self, node: Node) -> None:
        ino = node.ino
        try:
            await self._loaded(node)
        except Exception as exc:  # (a background task must never end the mount)
            log.debug("extended attributes of inode %d not read ahead: %s", ino, exc)

    def has_local_only(self, ino: int) -> bool:
        """Whether the node has attributes that only this cache keeps (the remote cannot)."""
        if self.carried:
            return False
        found = self.store.get_xattrs(ino)
        return found is not None and bool(found)

    async def _loaded(self, node: Node) -> XattrSet:
        """The node's attributes, the remote's read first if they never were (online)."""
        found = self.store.get_xattrs(node.ino)
        if found is not None and found.complete:
            return found
        if not self.carried or node.base is None or node.has(ORPHAN):
            return found or XattrSet()  # (made here: none but ours)
        if self._listings.path_pending(node):
            # (a rename still to replay: the node's path may name another file there)
            return found or XattrSet(complete=False)
        remote = await self._remote_of(node)
        if remote is None:
            return found or XattrSet(complete=False)

        def take(t: Txn) -> XattrSet:
            now = t.xattrs(node.ino) or XattrSet(complete=False)
            if not now.complete and t.node(node.ino) is not None:
                now.take_remote(remote)
                t.set_xattrs(node.ino, now)
            return now
        return self.store.run_write(lambda txn: take(Txn(self.store, txn)), folders=set)

    async def _remote_of(self, node: Node) -> list[tuple[bytes, bytes]] | None:
        """The remote's attributes of the node; None when they cannot be read now."""
        try:
            path = self.store.path_of(node.ino)
            found: list[tuple[bytes, bytes]] = await self._conn.call(
                self._conn.remote.list_xattrs, path, looks_only=True)
            return found
        except (Unavailable, KeyError):  # (offline; or its folder went meanwhile)
            return None
        except RemoteError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return []  # (a share on a file system without them: none to read)
            log.debug("extended attributes of inode %d not read: %s", node.ino, exc)
            return None

    # -- changes ----------------------------------------------------------------------
    async def set(self, ino: int, name: bytes, value: bytes) -> None:
        """Set ``name``; ERANGE, E2BIG, ENOSPC as ext4 gives them. (``XATTR_CREATE`` and
        ``XATTR_REPLACE`` are pyfuse3's to check, through ``get`` first: a set of the
        same name by another process between the two is not seen, as on any FUSE file
        system pyfuse3 serves.)"""
        _user_only(name)
        check_request(name, value)
        node = self._changeable(ino)
        # (not read from the remote: offline, the remote's are still to be read)
        complete = (await self._loaded(node)).complete

        def change(t: Txn) -> None:
            found = t.xattrs(ino) or XattrSet(complete=complete)
            found.set(name, value)
            self._record(t, ino, name, found)
        self._commit(change)

    async def remove(self, ino: int, name: bytes) -> None:
        _user_only(name)
        check_request(name)
        node = self._changeable(ino)
        # (not read from the remote: offline, the remote's are still to be read)
        complete = (await self._loaded(node)).complete

        def change(t: Txn) -> None:
            found = t.xattrs(ino) or XattrSet(complete=complete)
            if found.get(name) is None:
                self._unknown_offline(found, name)
                raise XattrRefused(errno.ENODATA)
            found.remove(name)
            self._record(t, ino, name, found)
        self._commit(change)

    def settle(self, ino: int, name: bytes, *, send_again: bool, drop: bool) -> None:
        """A change of ``name`` the remote refused, settled: sent again as it is here
        (a new entry), or ours forgotten (``drop``): the record is marked incomplete
        without it, so the server's value (or its absence) is read again; names set here
        since stay."""
        if not self.carried or not (send_again or drop):
            return

        def change(t: Txn) -> None:
            found = t.xattrs(ino)
            node = t.node(ino)
            if found is None or node is None or node.has(ORPHAN):
                return
            if drop:
                found.items.pop(name, None)
                found.complete = False
                t.set_xattrs(ino, found)
            else:
                self._journal(t, Op("xattr", ino, t.path_of(ino), xattr=name))
        self._commit(change)

    def _commit(self, change: Callable[[Txn], None]) -> None:
        # (no listing shows extended attributes: kept listings stay valid)
        self.store.run_write(lambda txn: change(Txn(self.store, txn)), folders=set)
        if self.carried:
            self._changed()  # (a journal entry for the sync manager)

    def _changeable(self, ino: int) -> Node:
        node = self._listings.node(ino)
        if not (node.is_file or node.is_dir):
            raise XattrRefused(errno.EPERM, "user extended attributes are for files and folders")
        return node

    def _record(self, t: Txn, ino: int, name: bytes, found: XattrSet) -> None:
        """The new record and, where the remote keeps them, its journal entry (one
        transaction: the change and its entry commit together)."""
        t.set_xattrs(ino, found)
        node = t.node(ino)
        if self.carried and node is not None and not node.has(ORPHAN):
            self._journal(t, Op("xattr", ino, t.path_of(ino), xattr=name))


def _user_only(name: bytes) -> None:
    if not name.startswith(USER):
        raise XattrRefused(errno.ENOTSUP, "only user. extended attributes are kept")
