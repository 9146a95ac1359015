"""Changes of the namespace made here: create, mkdir, symlink, mknod, link, unlink, rmdir,
rename. Each checks its names against the folder's listing (fetched first when stale), then
changes the index and appends its journal entry in one transaction (``Writes.journal``).
A local-only object (``LOCAL_ONLY``: a FIFO, socket or device node, ``mknod``) is changed
in the index alone: nothing about it is journaled, but what it replaces is.

Owns no state of its own. Must not touch: content beyond forgetting a removed file's
(``Content.forget``), open handles beyond marking an unlinked open file an orphan
(``Opens.orphans``), the remote, FUSE.

Concurrency: on the trio thread. Each change awaits only the listings it needs
(``Listings.folder_for_change``), before its one synchronous transaction; the tests it
makes after its awaits are made again inside the transaction where a concurrent change
could have made them false (a folder filled meanwhile: ``NotEmpty``).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import stat as stat_mod
import time
from collections.abc import Callable
from typing import Any

from ..errors import Exists, InvalidArgument, IsADirectory, NameTooLong, NotADirectory, NotCarried, NotEmpty, \
    NotFound, PermissionDenied
from ..paths import join
from ..remote.base import Capabilities
from ..store.index import DIRTY, FULL, LISTED, LOCAL_ONLY, ORPHAN, OWNER_DIRTY, ROOT_INO, TARGET, WRITING, Node, Store, Txn
from ..store.journal import Op
from ..store.records import Version
from .common import CONTROL_NAME, valid_name
from .content import Content
from .handles import Opens
from .listing import Listings, hold_unlinked
from .writes import Writes

log = logging.getLogger(__name__)


class Names:
    def __init__(self, store: Store, listings: Listings, content: Content, opens: Opens,
                 writes: Writes, capabilities: Capabilities = Capabilities(),
                 name_error: Callable[[bytes], int | None] = lambda name: None) -> None:
        """``capabilities``: what the remote carries (a symlink or hard link it cannot
        carry is refused at once, not at replay); ``name_error``: the remote's rule for
        names it cannot carry (``Remote.name_error``, pure: no network)."""
        self.store = store
        self._listings = listings
        self._content = content
        self._opens = opens
        self._writes = writes
        self._capabilities = capabilities
        self._name_error = name_error

    def check_name(self, name: bytes) -> None:
        if len(name) > 255:
            raise NameTooLong()
        if not valid_name(name):
            raise InvalidArgument("bad name")
        if name == CONTROL_NAME:
            raise PermissionDenied("the name .cachefs is reserved")
        code = self._name_error(name)
        if code is not None:
            raise NotCarried(code, "the remote cannot carry this name")

    def _touch_dir(self, t: Txn, parent: int, now: int, links: int = 0) -> None:
        """A folder's entries changed: its times, and its link count when subfolders
        came (``links`` > 0) or went."""
        pnode = t.node(parent)
        if pnode is not None:
            pnode.mtime_ns = pnode.ctime_ns = now
            pnode.nlink = max(2, pnode.nlink + links)
            t.put(pnode)

    def _new_node(self, t: Txn, parent: int, name: bytes, mode: int, now: int,
                  owner: tuple[int, int] | None = None, **kw: Any) -> Node:
        ino = t.new_ino()
        node = Node(ino=ino, parent=parent, name=name, mode=mode, size=0, mtime_ns=now,
                    atime_ns=now, ctime_ns=now, **kw)
        if owner is not None:  # (--owners remote: the creator's, sent with its creation)
            node.uid, node.gid = owner
            node.flags |= OWNER_DIRTY
        t.put(node)
        t.set_entry(parent, name, ino)
        self._touch_dir(t, parent, now)
        return node

    def _new_child(self, parent: int, name: bytes, build: Callable[[Txn], Node]) -> Node:
        self.check_name(name)
        if self.store.child(parent, name) is not None:
            raise Exists()
        node = self.store.transact(build)
        self._writes.changed()
        return node

    async def create(self, parent: int, name: bytes, mode: int,
                     owner: tuple[int, int] | None = None) -> tuple[Node, int]:
        """A new empty file, open for writing: its node and content file descriptor
        (the caller makes the handle)."""
        await self._listings.folder_for_change(parent)
        now = time.time_ns()

        def build(t: Txn) -> Node:
            node = self._new_node(t, parent, name, stat_mod.S_IFREG | (mode & 0o7777), now, owner,
                                  flags=FULL | DIRTY | WRITING, gen=1)
            self._writes.journal(t, Op("create", node.ino, t.path_of(node.ino), parent=parent,
                                       mode=node.mode))
            return node

        node = self._new_child(parent, name, build)
        fd = self.store.new_content_file(node.ino)
        self._writes.created(node)
        return node, fd

    async def mkdir(self, parent: int, name: bytes, mode: int,
                    owner: tuple[int, int] | None = None) -> Node:
        await self._listings.folder_for_change(parent)
        now = time.time_ns()

        def build(t: Txn) -> Node:
            node = self._new_node(t, parent, name, stat_mod.S_IFDIR | (mode & 0o7777), now, owner,
                                  flags=LISTED, nlink=2)
            self._touch_dir(t, parent, now, links=1)
            self._writes.journal(t, Op("mkdir", node.ino, t.path_of(node.ino), parent=parent,
                                       mode=node.mode))
            return node

        node = self._new_child(parent, name, build)
        self._listings.listed_now(node.ino)
        return node

    async def symlink(self, parent: int, name: bytes, target: bytes,
                      owner: tuple[int, int] | None = None) -> Node:
        if not self._capabilities.symlinks:
            raise NotCarried(errno.EPERM, "the remote keeps no symlinks")
        await self._listings.folder_for_change(parent)
        now = time.time_ns()

        def build(t: Txn) -> Node:
            node = self._new_node(t, parent, name, stat_mod.S_IFLNK | 0o777, now, owner,
                                  flags=TARGET, target=target)
            node.size = len(target)
            t.put(node)
            self._writes.journal(t, Op("symlink", node.ino, t.path_of(node.ino), parent=parent,
                                       target=target))
            return node

        return self._new_child(parent, name, build)

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int,
                    owner: tuple[int, int] | None = None) -> Node:
        """A FIFO, socket or device node (``mode`` says which): a local-only object, in the
        index only (SFTP cannot make one; the kernel serves its I/O itself). Nothing is
        journaled, so nothing of it is ever replayed."""
        await self._listings.folder_for_change(parent)
        now = time.time_ns()
        kind = stat_mod.S_IFMT(mode)
        target = Node.rdev_target(rdev) if kind in (stat_mod.S_IFCHR, stat_mod.S_IFBLK) else b""

        def build(t: Txn) -> Node:
            return self._new_node(t, parent, name, kind | (mode & 0o7777), now, owner,
                                  flags=LOCAL_ONLY, target=target)

        self.check_name(name)
        if self.store.child(parent, name) is not None:
            raise Exists()
        return self.store.transact(build)

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Node:
        if not self._capabilities.hard_links:
            raise NotCarried(errno.EPERM, "the remote keeps no hard links")
        await self._listings.folder_for_change(new_parent)
        node = self._listings.node(ino)
        if node.is_dir:
            raise PermissionDenied("hard links to folders are not allowed")
        now = time.time_ns()

        def build(t: Txn) -> Node:
            n = t.node(ino)
            assert n is not None, f"link of inode {ino}, which is not in the index"
            n.nlink += 1
            n.ctime_ns = now
            t.put(n)
            t.set_entry(new_parent, new_name, ino)
            t.add_link_name(ino, n.parent, n.name)
            t.add_link_name(ino, new_parent, new_name)
            self._touch_dir(t, new_parent, now)
            if not n.has(LOCAL_ONLY):
                self._writes.journal(t, Op("link", ino, t.path_of(ino), base=n.base,
                                           dst=join(t.path_of(new_parent), new_name), dst_parent=new_parent))
            return n

        return self._new_child(new_parent, new_name, build)

    async def unlink(self, parent: int, name: bytes) -> None:
        await self._listings.folder_for_change(parent)
        node = self.store.child(parent, name)
        if node is None:
            raise NotFound()
        if node.is_dir:
            raise IsADirectory()
        now = time.time_ns()

        def change(t: Txn) -> None:
            self._journal_removal(t, node, parent, name)
            t.delete_entry(parent, name)
            self._drop_link(t, node, parent, name, now)
            self._touch_dir(t, parent, now)

        self.store.transact(change)
        self._writes.changed()

    def unlink_server_object(self, parent: int, name: bytes, ino: int, base: Version | None) -> None:
        """The server's object under ``name`` goes while the local-only object that holds
        the name here stays (resolve ``local`` of a deletion made here, a FIFO made under
        the name since): the unlink journaled as the deleted node's (``ino``), expecting
        ``base``, the server's version the conflict saw (None: whatever is there)."""
        def change(t: Txn) -> None:
            self._writes.journal(t, Op("unlink", ino, join(t.path_of(parent), name), base=base, parent=parent))

        self.store.transact(change)
        self._writes.changed()

    def _journal_removal(self, t: Txn, node: Node, parent: int, name: bytes) -> None:
        """The unlink of ``name`` (``node``), for the server: none for a local-only object."""
        if not node.flags & LOCAL_ONLY:
            self._writes.journal(t, Op("unlink", node.ino, join(t.path_of(parent), name), base=node.base,
                                       parent=parent))

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
        if self._opens.count.get(node.ino):
            node.flags |= ORPHAN
            node.parent = 0
            t.put(node)
            self._opens.orphans.add(node.ino)
        else:
            t.delete_node(node.ino)
            self.store.remove_after_commit(node.ino)
            if node.flags & LOCAL_ONLY:  # (a FIFO may still be open: its attributes stay at hand)
                gone = dataclasses.replace(node, nlink=0, parent=0)
                self.store.after_commit(lambda: hold_unlinked(self._listings.unlinked_local, gone))
        self._content.forget(node.ino)

    async def rmdir(self, parent: int, name: bytes) -> None:
        await self._listings.folder_for_change(parent)
        node = self.store.child(parent, name)
        if node is None:
            raise NotFound()
        if not node.is_dir:
            raise NotADirectory()
        await self._listings.ensure_listing(node)
        now = time.time_ns()

        def change(t: Txn) -> None:
            if t.has_children(node.ino):
                raise NotEmpty()
            self._writes.journal(t, Op("rmdir", node.ino, join(t.path_of(parent), name), base=node.base,
                                       parent=parent))
            t.delete_entry(parent, name)
            t.delete_node(node.ino)
            self._touch_dir(t, parent, now, links=-1)

        self.store.transact(change)
        self._listings.forget_listed(node.ino)
        self._writes.changed()

    async def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
                     noreplace: bool = False) -> None:
        self.check_name(new_name)
        await self._listings.folder_for_change(parent)
        await self._listings.folder_for_change(new_parent)
        src = self.store.child(parent, name)
        if src is None:
            raise NotFound()
        dst = self.store.child(new_parent, new_name)
        if dst is not None and dst.ino == src.ino:
            return  # same object: rename(2) does nothing
        self._check_move(src, new_parent)
        if dst is not None:
            await self._check_replace(src, dst, noreplace)
        now = time.time_ns()

        def change(t: Txn) -> None:
            if dst is not None and dst.is_dir and t.has_children(dst.ino):
                raise NotEmpty()
            self._journal_rename(t, src, dst, parent, name, new_parent, new_name)
            t.delete_entry(parent, name)
            if dst is not None:
                t.delete_entry(new_parent, new_name)
                self._drop_link(t, dst, new_parent, new_name, now)
            self._move(t, src, parent, name, new_parent, new_name, now)
            moved_dir = 1 if src.is_dir else 0
            replaced_dir = 1 if dst is not None and dst.is_dir else 0
            self._touch_dir(t, parent, now, links=-moved_dir)
            self._touch_dir(t, new_parent, now, links=moved_dir - replaced_dir)

        self.store.transact(change)
        self._writes.changed()

    def _journal_rename(self, t: Txn, src: Node, dst: Node | None, parent: int, name: bytes,
                        new_parent: int, new_name: bytes) -> None:
        """A rename, for the server. A local-only object moved: only the removal of what
        it replaces there; one replaced: on no server, so the rename replaces nothing."""
        if dst is not None and dst.flags & LOCAL_ONLY:
            dst = None
        if src.flags & LOCAL_ONLY:
            if dst is not None:
                self._journal_removal(t, dst, new_parent, new_name)
            return
        self._writes.journal(t, Op("rename", src.ino, join(t.path_of(parent), name), base=src.base,
                                   parent=parent, dst=join(t.path_of(new_parent), new_name),
                                   dst_parent=new_parent, replaced=dst.ino if dst else 0,
                                   replaced_base=dst.base if dst else None))

    def _check_move(self, src: Node, new_parent: int) -> None:
        if src.is_dir:
            ancestor = new_parent
            while ancestor != ROOT_INO:
                if ancestor == src.ino:
                    raise InvalidArgument("cannot move a folder into itself")
                ancestor = self._listings.node(ancestor).parent

    async def _check_replace(self, src: Node, dst: Node, noreplace: bool) -> None:
        if noreplace:
            raise Exists()
        if dst.is_dir and not src.is_dir:
            raise IsADirectory()
        if src.is_dir and not dst.is_dir:
            raise NotADirectory()
        if dst.is_dir:
            await self._listings.ensure_listing(dst)

    @staticmethod
    def _move(t: Txn, src: Node, parent: int, name: bytes, new_parent: int, new_name: bytes, now: int) -> None:
        node = t.node(src.ino)
        assert node is not None, f"rename of inode {src.ino}, which is not in the index"
        if (node.parent, node.name) == (parent, name):
            node.parent, node.name = new_parent, new_name
        node.ctime_ns = now
        t.put(node)
        t.set_entry(new_parent, new_name, src.ino)
        if node.nlink > 1 and not node.is_dir:
            t.add_link_name(src.ino, new_parent, new_name)
