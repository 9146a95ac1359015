"""The write path: writes into content files, sizes and times held in memory between
commits, truncation, attribute changes, and the commit that records each changed file's
size, times and checksum. Every change updates the index and appends its journal entry
in one transaction (``journal``).

Owns: the files whose content changed with no checksum of it recorded yet
(``_unsummed``), the one-commit-at-a-time lock, and the store's ``held`` table (the
sizes and times of files being written: ``Held``), which only this part changes.
Must not touch: listings (it asks ``Listings`` to hold the folders a journal entry names),
what of a file's content is cached (``Content``), open handles beyond reading who writes
(``Opens``), the remote, FUSE.

Concurrency: on the trio thread; each change is one synchronous transaction. Awaits:
``commit_changes`` holds ``_committing`` (a trio lock, the only one here) while it hashes
changed files, in a worker thread when they are large; it takes no other lock. A size
change waits for the file's fetches under way first (``Content.settle``), so that no
fetched chunk lands after it.
"""

from __future__ import annotations

import logging
import os
import stat as stat_mod
import time
from collections.abc import Callable

import trio

from ..link.connectivity import Connectivity
from ..store.index import ATTR_DIRTY, DAMAGED, DIRTY, FULL, KERNEL_WRITES, KEPT, ORPHAN, OWNER_DIRTY, WRITING, Held, Node, Store, Txn
from ..store.index import LOCAL_ONLY
from ..store.journal import Op
from ..errors import IsADirectory
from .content import Content
from .handles import OpenFile, Opens
from .listing import Listings
from .transfer import hash_content

log = logging.getLogger(__name__)

#: content sums of at most this many bytes in all are computed on the trio thread (a
#: SHA-256 of 4 KiB takes ~3 us here, 64 KiB ~40, a thread hop ~50-100); more go to a thread
SUM_INLINE_MAX = 64 << 10
#: a clean file made whole larger than this gets no base sum (its hash would hold up the
#: checkpoint: ~1.7 GB/s here); a change of it on the server that keeps its size and mtime
#: second is then not seen, as before base sums
BASE_SUM_MAX = 64 << 20

#: (ino, generation, size, content path) of a file to sum
_ToSum = tuple[int, int, int, str]


class Writes:
    def __init__(self, store: Store, conn: Connectivity, listings: Listings, content: Content,
                 opens: Opens, *, changed: Callable[[], None]) -> None:
        self.store = store
        self.conn = conn
        self._listings = listings
        self._content = content
        self._opens = opens
        #: called after every journal append (the sync manager's write-back trigger)
        self.changed = changed
        #: files whose content changed with no checksum of it recorded yet: summed when no
        #: writer has them open, at the next commit (``commit_changes``)
        self._unsummed: set[int] = set(store.unsummed)
        #: one commit at a time: the replays of a batch that each meet an uncommitted
        #: change wait for one commit instead of hashing the same files side by side
        self._committing = trio.Lock()

    def journal(self, t: Txn, op: Op) -> None:
        """Append ``op`` in the change's transaction; its folders are local truth from its
        commit on (a transaction run again after the map grew holds them once)."""
        t.append(op)
        folders = op.folders()
        self.store.after_commit(lambda: self._listings.hold_folders(folders))

    def created(self, node: Node) -> None:
        """A file was just created, open for writing: its size and times are held."""
        self.store.held[node.ino] = Held(node.size, node.mtime_ns, node.ctime_ns)
        self._unsummed.add(node.ino)

    def write(self, handle: OpenFile, offset: int, data: bytes) -> int:
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
            held = self._start_writing(ino)
        written = self.store.content.pwrite(handle.fd, data, offset)
        if held is not None:
            held.size = max(held.size, offset + written)
            held.mtime_ns = held.ctime_ns = time.time_ns()
            # (setuid/setgid are cleared by the kernel, which knows who writes)
            self.store.generation += 1  # kept listings (and their attributes) are older
        handle.wrote = True
        return written

    def _start_writing(self, ino: int) -> Held | None:
        def start(t: Txn) -> Node | None:
            node = t.node(ino)
            if node is not None:
                node.flags |= WRITING
                self.content_changed(t, node)
            return node
        node = self.store.transact(start)
        if node is None:
            return None
        held = self.store.held[ino] = Held(node.size, node.mtime_ns, node.ctime_ns)
        return held

    def released(self, ino: int) -> Held | None:
        """A writer of ``ino`` let go; the file's held size and times, if it has some."""
        held = self.store.held.get(ino)
        if held is not None and ino not in self._opens.writers:
            held.open = False  # (the checkpoint commits it: commit_held)
        return held

    # -- commits -------------------------------------------------------------------------
    async def commit_changes(self) -> None:
        """Commit the files whose writers have all closed: their held sizes and times into
        their records (``commit_held``), then a checksum of each changed file's content
        as it is now, which every upload of that content is checked against. Run by the
        checkpoint, and by a replay that meets a change not yet committed (so that its
        write-back waits for no checkpoint)."""
        async with self._committing:
            self.commit_held()
            if self._unsummed:
                await self._record_sums()

    async def _record_sums(self) -> None:
        """A SHA-256 of each changed file no writer has open, recorded with its generation:
        a write after this one moves the generation first (``content_changed``), so a sum
        is only ever taken as the content of the generation it names."""
        todo = self._to_sum()
        if not todo:
            return
        content = self.store.content
        if sum(size for _i, _g, size, _p in todo) <= SUM_INLINE_MAX:
            digests = [hash_content(content, path, size) for _i, _g, size, path in todo]
        else:
            digests = await trio.to_thread.run_sync(
                lambda: [hash_content(content, path, size) for _i, _g, size, path in todo])
        done = self._save_sums(todo, digests)
        for (ino, _gen, size, _path), digest in zip(todo, digests):
            if digest is None and ino in done:
                log.error("the content of inode %d is shorter than its size (%d bytes) when it "
                          "is committed: it gets no checksum, and will not be uploaded", ino, size)
        self._unsummed.difference_update(done)

    def _to_sum(self) -> list[_ToSum]:
        todo = []
        for ino in list(self._unsummed):
            if self._opens.writers.get(ino) or ino in self.store.held:
                continue  # still being written: summed after its last writer's release
            node = self.store.get(ino)
            if node is None or not node.is_file or node.has(ORPHAN) or not node.has(DIRTY):
                self._unsummed.discard(ino)
                continue
            todo.append((ino, node.gen, node.size, self.store.content_path(ino)))
        return todo

    def _save_sums(self, todo: list[_ToSum], digests: list[bytes | None]) -> list[int]:
        """Record the sums of files not written since; those done (summed or gone)."""
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
        return done

    async def record_base_sum(self, node: Node) -> None:
        """The SHA-256 of a clean file whole in the cache, as a writer opens it: the content
        of its base version, which the replay of the change to come compares with a hash
        the server computes before it replaces the file (a change there that kept the size
        and mtime second). Taken here, not when the file was fetched: only files changed
        here need it (at the checkpoint that makes files whole it cost a cold read of small
        files ~32 us a file), and an upload that lands records the next one for free."""
        if node.base is None or node.size > BASE_SUM_MAX or self.conn.remote.can_hash is False \
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

    def commit_held(self) -> None:
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

    def content_changed(self, t: Txn, node: Node) -> None:
        node.gen += 1
        node.flags &= ~DAMAGED  # (edited: the user's own version now, uploaded as any)
        self._unsummed.add(node.ino)
        if not node.has(DIRTY) and not node.has(ORPHAN):
            node.flags |= DIRTY
            self.journal(t, Op("store", node.ino, t.path_of(node.ino), base=node.base,
                               parent=node.parent))
        t.put(node)

    # -- sizes and attributes --------------------------------------------------------------
    def truncate(self, handle: OpenFile | None, size: int, ino: int = 0) -> None:
        """The new size is committed first, then the content file cut or grown: a kill in
        between leaves a file whose length differs from the recorded size, which the next
        start fits to it (``store.opening.fit_dirty_content``). The other order lost data: a file
        cut while the index still had the old size read as empty, or as zeros once written
        past its end, under a size that claimed the old bytes."""
        ino = handle.ino if handle else ino
        log.debug("truncate inode %d to %d", ino, size)
        now = time.time_ns()

        def change(t: Txn) -> None:
            node = t.node(ino)
            assert node is not None, f"truncate of inode {ino}, which is not in the index"
            node.size = size
            node.mtime_ns = node.ctime_ns = now
            node.flags |= FULL
            node.flags &= ~WRITING  # (a kill before the cut must not take the file's length)
            self.content_changed(t, node)

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
        self._content.cut(ino)
        if handle:
            handle.wrote = True
        self.changed()

    def mark_full(self, ino: int) -> None:
        def change(t: Txn) -> None:
            node = t.node(ino)
            assert node is not None, f"inode {ino} is not in the index"
            node.flags |= FULL
            t.put(node)
        self.store.transact(change)

    async def setattr(self, node: Node, *, mode: int | None = None, size: int | None = None,
                      atime_ns: int | None = None, mtime_ns: int | None = None,
                      handle: OpenFile | None = None, uid: int | None = None,
                      gid: int | None = None) -> Node | None:
        """The new size and attributes; the node after them, or None when only the size
        changed (the caller reads the node again). ``uid``, ``gid``: a new owner, in the
        server's ids (``--owners remote``; the caller checked who may)."""
        ino = node.ino
        if size is not None:
            if node.is_dir:
                raise IsADirectory()
            if not node.has(FULL) and size and node.size:
                await self._content.ensure_present(node, 0, min(size, node.size))
            await self._content.settle(ino)
            self.truncate(handle, size, ino)
        if mode is None and atime_ns is None and mtime_ns is None and uid is None and gid is None:
            return None
        now = time.time_ns()
        node = self.store.transact(lambda t: self._set_attrs(t, ino, mode, atime_ns, mtime_ns, now,
                                                             uid, gid))
        self.changed()
        return node

    def _set_attrs(self, t: Txn, ino: int, mode: int | None, atime_ns: int | None,
                   mtime_ns: int | None, now: int, uid: int | None = None, gid: int | None = None) -> Node:
        n = t.node(ino)
        assert n is not None, f"setattr of inode {ino}, which is not in the index"
        owner_changed = self._set_owner(n, uid, gid)
        if mode is not None:
            n.mode = stat_mod.S_IFMT(n.mode) | (mode & 0o7777)
        if atime_ns is not None:
            n.atime_ns = atime_ns
        if mtime_ns is not None:
            n.mtime_ns = mtime_ns
        n.ctime_ns = now
        if n.is_symlink or n.flags & (ORPHAN | LOCAL_ONLY):
            # symlink times stay local (SFTP cannot set them); orphans and local-only objects
            # never go; a symlink's new owner goes alone (``Remote.set_link_owner``)
            if owner_changed and n.is_symlink and not n.flags & (ORPHAN | LOCAL_ONLY | ATTR_DIRTY):
                n.flags |= ATTR_DIRTY
                self.journal(t, Op("setattr", ino, t.path_of(ino), base=n.base, parent=n.parent))
            t.put(n)
            return n
        if owner_changed and not n.has(ATTR_DIRTY):
            # A new owner is journaled even for a changed file: an upload sends the owner
            # a file had, the setattr the one it was given (after the upload, in journal order).
            n.flags |= ATTR_DIRTY
            self.journal(t, Op("setattr", ino, t.path_of(ino), base=n.base, parent=n.parent))
        if n.has(DIRTY):
            if mode is None and atime_ns is None and mtime_ns is None:
                t.put(n)
                return n
            # The pending upload sends the mode and times (a file's upload is a new file
            # with them, renamed over the old): it takes them when it begins, so one
            # under way now must be followed by another (``Reconcile.agree`` sees the new gen).
            n.gen += 1
            # The content is as it was: its checksum holds for the new generation.
            found = t.content_sum(ino)
            if found is not None and found.gen == n.gen - 1:
                t.set_content_sum(ino, n.gen, found.size, found.digest)
            else:
                self._unsummed.add(ino)
        elif not n.has(ATTR_DIRTY):
            n.flags |= ATTR_DIRTY
            self.journal(t, Op("setattr", ino, t.path_of(ino), base=n.base, parent=n.parent))
        t.put(n)
        return n

    @staticmethod
    def _set_owner(n: Node, uid: int | None, gid: int | None) -> bool:
        """A new owner into ``n`` (``OWNER_DIRTY``: its setattr sends it); whether it changed."""
        changed = (uid is not None and uid != n.uid) or (gid is not None and gid != n.gid)
        if changed:
            n.uid = n.uid if uid is None else uid
            n.gid = n.gid if gid is None else gid
            n.flags |= OWNER_DIRTY
        return changed

    def settle_kept(self, ino: int, drop: bool, resend_content: bool) -> None:
        """A kept version (``KEPT``) let go: its base forgotten (``drop``: the next listing
        takes the server's version whole), its content journaled again as a change
        (``resend_content``), or its mode and times."""
        def change(t: Txn) -> None:
            n = t.node(ino)
            if n is None:
                return
            n.flags &= ~KEPT
            if drop:
                n.base = None  # (the next listing takes the server's version whole)
            elif resend_content:
                self.content_changed(t, n)
                return
            elif not n.has(ATTR_DIRTY):
                n.flags |= ATTR_DIRTY
                self.journal(t, Op("setattr", n.ino, t.path_of(n.ino), base=n.base, parent=n.parent))
            t.put(n)
        self.store.transact(change)

    async def fsync(self, handle: OpenFile | None) -> None:
        """Make written data and the index durable on local disk. A file no writer has
        open any more is committed first, checksum included (``commit_changes``); one still
        open for writing is summed after its last release: a sum at every fsync would hash
        the whole file each time (a database fsyncs at every transaction)."""
        if handle is not None:
            if not self._opens.writers.get(handle.ino):
                await self.commit_changes()
            await trio.to_thread.run_sync(os.fsync, handle.fd)
        await trio.to_thread.run_sync(self.store.sync)
