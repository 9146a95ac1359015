"""The replay of the journal onto the server (Coda's reintegration), one pass at a time.

Owns: a pass (the journal read, optimised and its rewrite stored, cut into batches,
replayed batch by batch), the handling of each entry's outcome (done, refused for good,
stopped for a retry), the replay of the namespace entries (``setattr``, ``mkdir``,
``symlink``, ``link``, ``unlink``, ``rmdir``, ``rename``), and the running pass's
``progress``. Content entries go to ``ContentReplay``, conflict copies to ``Conflicts``.
Must not touch: nodes, entries or content files (``cache.reconcile`` operations do), the
schedule (when a pass runs), FUSE.

Every replayed operation is idempotent or recognises that it already happened, so a
crash or a dropped connection at any point resumes cleanly: removals that find nothing
to remove, and folders that already exist, count as done; an entry is deleted, and its
node's new base version recorded, in one transaction after the remote change.

Lock/ordering: one pass at a time (the caller holds the pass lock). Batches run in
journal order; the entries of one batch run side by side in a nursery and are about
different nodes (``ordering.batches``), so what they share here (``Ledger.gone``,
``progress``, the refusals) is changed only between awaits. A pass stops at a file open
for writing (close-to-open: its ``release`` pokes the next pass).
"""

from __future__ import annotations

import errno
import logging
import stat as stat_mod
import time
from functools import partial

import lmdb
import trio

from ..cache.cache import Cache
from ..cache.reconcile import ChangedWhileSent, Reconcile
from ..errors import ContentDamaged, RemoteError, Unavailable
from ..progress import Progress
from ..remote import RemoteStat
from ..store.crypto import RecordError
from ..store.index import ORPHAN, OWNER_DIRTY, Store, Txn, index_damaged
from ..store.journal import CONTENT_OPS, Op, folder_times_last, optimise, remains_of_deleted
from .conflicts import Conflicts, Record, record
from .content import ContentReplay
from .ledger import Ledger
from .ordering import batches
from .remote_side import RemoteSide
from .status import PassResult
from .sums import ServerSums
from .uploads import UploadGroup

#: the kinds of later entries about a node moved aside that follow it to its new name
#: (``Replayer._moved_aside``): changes of it in place
_REHOMED_LATER = {"store", "setattr", "xattr"}


def _entries_about(later: list[Op], ino: int, path: bytes, copy: bytes) -> list[tuple[Op, bytes, bytes]] | None:
    """The entries after one whose node ``ino``, at ``path``, the server now has at
    ``copy`` (a sibling name): those about the node or inside it (a folder), each with
    where the node is by then here and there (a later rename of a folder above it moves
    both alike). None when the node cannot follow safely: a later entry renames or links
    it, changes it other than in place, or puts something onto its name."""
    here, there = path, copy
    about: list[tuple[Op, bytes, bytes]] = []
    for o in later:
        if o.kind == "rename" and o.ino != ino and here.startswith(o.path + b"/"):
            here, there = o.dst + here[len(o.path):], o.dst + there[len(o.path):]
            continue  # (a folder above it moved: it moved along)
        inside = here + b"/"
        if not (o.ino == ino or o.path.startswith(inside) or o.dst.startswith(inside) or o.dst == here):
            continue
        if o.dst == here or (o.ino == ino and (o.path != here or o.dst or o.kind not in _REHOMED_LATER)):
            log.debug("not re-homed: %s %r", o.kind, o.path)
            return None
        about.append((o, here, there))
    return about


def _moved_to(p: bytes, path: bytes, copy: bytes) -> bytes:
    """``p`` after the node at ``path`` became ``copy``: ``copy`` itself, or the same
    place under it (``p`` inside a folder), or ``p`` unchanged (elsewhere, or empty)."""
    return copy + p[len(path):] if p == path or p.startswith(path + b"/") else p

#: entries of one batch at most: their uploads go together (``UploadGroup``), the other
#: entries side by side, as many at once as the connections allow
BATCH_WIDTH = 256

log = logging.getLogger(__name__)


#: passes an entry the server answers "busy" is tried before it is refused (recorded, kept)
BUSY_PASSES = 5


class Replayer:
    def __init__(self, store: Store, cache: Cache, side: RemoteSide, ledger: Ledger, conflicts: Conflicts,
                 content: ContentReplay, sums: ServerSums) -> None:
        self.store = store
        self.cache = cache
        self.side = side
        self.ledger = ledger
        self.conflicts = conflicts
        self.content = content
        self.sums = sums
        self.progress = Progress()
        self._failed = False  # the running pass met a local failure (not the link's, not a writer's)
        self._link_owner_told = False  # the server's refusal of every symlink's owner was logged
        self._pass_ops: dict[int, Op] = {}  # the running pass's entries, by sequence number
        self._last_content: dict[int, int] = {}  # node -> its last content entry in the pass
        self._batches: list[list[Op]] = []  # the running pass's (an entry put last joins them)
        #: entry -> passes the server answered it "busy" (a file another client holds: SMB's
        #: sharing violation or oplock break not given up): retried, then refused
        self._busy: dict[int, int] = {}

    # -- a pass ---------------------------------------------------------------------------
    async def replay(self) -> PassResult:
        """One replay of the journal (the caller holds the pass lock)."""
        self.content.damaged_now = []
        self._failed = False
        result = await self._replay_journal()
        result.damaged = self.content.damaged_now
        result.failed = result.failed or self._failed
        return result

    async def _replay_journal(self) -> PassResult:
        ops, damaged = self.store.journal_ops_until_damaged()
        if damaged is not None:  # replay what comes before it, then stop there
            log.error("%s", damaged)
        if not ops:
            return PassResult(damaged is None, damaged, failed=damaged is not None)
        try:
            kept = await self._optimised(ops)
        except Unavailable as exc:  # (a dropped entry's leftovers on the server: retried next pass)
            return PassResult(False, f"remote is offline: {exc}")
        self._pass_ops = {op.seq: op for op in kept}
        self.progress = Progress(0, len(kept), 0, self._bytes_to_send(kept), time.time())
        self.sums.reset()
        started = time.monotonic()
        self._last_content = {op.ino: op.seq for op in kept if op.kind in CONTENT_OPS}
        self._batches = list(batches(kept, BATCH_WIDTH))
        stopped = await self._replay_batches(self._batches)
        log.debug("pass: %d of %d entries replayed in %.3f s", self.progress.ops_done, len(kept),
                  time.monotonic() - started)
        if stopped is not None:
            return PassResult(False, stopped)
        if damaged is not None:
            return PassResult(False, damaged, failed=True)
        if not self.store.count(self.store.journal):
            self.store.transact(lambda t: t.clear_produced())
        return PassResult(True)

    async def _optimised(self, ops: list[Op]) -> list[Op]:
        """The journal optimised (the rewrite stored), in replay order. An entry dropped
        whose upload had begun (a kill or a cut link stopped it; the object was deleted
        here since) first has its temporary file on the server removed, and the file
        itself where that upload had landed (``ContentReplay.left_by_cut_upload``): nothing
        else would ever remove them (its mark goes with the entry)."""
        alive, folders = set(), set()
        for ino in {op.ino for op in ops}:
            node = self.store.get(ino)
            if node is not None and not node.has(ORPHAN):
                alive.add(ino)
                if node.is_dir:
                    folders.add(ino)
        # Entries whose upload began (a crash or a cut connection stopped it) keep their
        # form: their recovery compares the remote with what was being sent.
        kept, dropped = optimise(ops, alive, lambda seq: self.store.upload_mark(seq) is not None,
                                 self.store.produced, self.side.remote.capabilities.exclusive_create)
        for op in dropped:
            if op.kind in CONTENT_OPS and (landed := await self.content.left_by_cut_upload(op)) is not None:
                # (its object was deleted here since: nothing else would take it away, and
                # the name's next user here would meet it as a change of the server's)
                await self.side.remove_landed(op.path, landed)
        if dropped or len(kept) != len(ops) or any(a is not b for a, b in zip(kept, ops)):
            self._rewrite(ops, kept, dropped)
        return folder_times_last(kept, folders)  # (a folder's times land after its contents)

    async def _replay_batches(self, batches: list[list[Op]]) -> str | None:
        """Each batch in turn; why the pass stopped, or None."""
        for at, batch in enumerate(batches):
            open_now = [op for op in batch if op.kind in CONTENT_OPS and self.cache.writers.get(op.ino)]
            if open_now:
                # Replay stops at a file still open for writing (close-to-open: its content
                # is not final); release() starts the next pass. The others of its batch
                # (which depend on nothing in it) go first.
                batch = [op for op in batch if op not in open_now]
                if batch:
                    await self.sums.before([batch], 0)
                    await self._replay_batch(batch)
                return "a file is still open for writing"
            await self.sums.before(batches, at)
            stopped = await self._replay_batch(batch)
            if stopped is not None:
                return stopped
        return None

    async def _replay_batch(self, batch: list[Op]) -> str | None:
        """The entries of one batch side by side (their uploads and attributes sent
        together: ``UploadGroup``); why the pass must stop, or None."""
        failures: list[str] = []
        if len(batch) == 1:
            await self._replay_one(batch[0], failures)
            return failures[0] if failures else None
        together = {op.seq for op in batch if op.kind in CONTENT_OPS or op.kind == "setattr"}
        group = self.content.group = UploadGroup(self.store, self.side, together) if len(together) > 1 else None
        try:
            async with trio.open_nursery() as nursery:
                if group is not None:
                    nursery.start_soon(group.run)
                for op in batch:
                    nursery.start_soon(self._replay_one, op, failures)
        finally:
            self.content.group = None
        return failures[0] if failures else None

    async def _replay_one(self, op: Op, failures: list[str]) -> None:
        """Replay ``op``; a reason is added to ``failures`` when the pass must stop."""
        if op.ino in self.ledger.gone:
            # Created here, then deleted here during this pass before its creation
            # reached the remote: the rest of its story need not reach it either, but
            # for the remote object a rename of it replaced (it goes, as optimise has it).
            removal = remains_of_deleted(op, self.store.produced)
            if removal is None:
                if self.content.group is not None:
                    self.content.group.leave(op.seq)
                self.ledger.finish(op)
                return
            self._rewrite([op], [removal], [])
            op = removal
        try:
            sent = await self._replay(op)
        except Unavailable as exc:
            failures.append(f"remote is offline: {exc}")
            return
        except ChangedWhileSent as exc:
            failures.append(str(exc))
            return
        except RemoteError as exc:
            passes = self._busy.pop(op.seq, 0)
            if exc.errno in (errno.EBUSY, errno.EAGAIN) and passes < BUSY_PASSES:
                # Held by another client for now: the entry stays, the next pass tries again
                # (in order: what follows it waits too), and after BUSY_PASSES it is refused.
                self._busy[op.seq] = passes + 1
                failures.append(f"{op.path!r} is busy on the server (held by another client): "
                                f"tried again at the next pass ({exc})")
                return
            self.conflicts.refused(op, exc, kept=op.kind != "xattr")  # (for good: recorded, the rest goes on)
        except (OSError, ValueError, KeyError, lmdb.Error) as exc:
            # A local failure (disk, a record that went away, a damaged record): stop
            # here, the entry stays in the journal and the next pass retries it.
            if isinstance(exc, (RecordError, lmdb.Error)):
                log.error("replay of %s %r stopped: %s", op.kind, op.path, index_damaged(self.store.dir, exc))
            else:
                log.exception("replay of %s %r failed", op.kind, op.path)
            failures.append(f"replay of {op.path!r} failed: {exc}")
            self._failed = True
            return
        else:
            self._busy.pop(op.seq, None)  # (busy before, done now)
            self.progress.bytes_done += sent
        self.progress.ops_done += 1

    def _rewrite(self, ops: list[Op], kept: list[Op], dropped: list[Op]) -> None:
        kept_by_seq = {op.seq: op for op in kept}
        replaced: list[tuple[Op, Op]] = []

        def change(t: Txn) -> None:
            replaced.clear()
            for op in ops:
                new = kept_by_seq.get(op.seq)
                if new is None:
                    t.delete_op(op.seq)
                    t.clear_upload(op.seq)
                elif new is not op:
                    t.put_op(op.seq, new)
                    replaced.append((op, new))

        self.store.transact(change)
        for op in dropped:
            self.cache.op_done(op)
        for op, new in replaced:
            self.cache.op_replaced(op, new)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("journal optimised: %d entries dropped, %d rewritten (%s)", len(dropped), len(replaced),
                      ", ".join(f"{op.seq} {op.kind} -> {new.kind} {new.path!r}" for op, new in replaced[:5]))

    def _bytes_to_send(self, ops: list[Op]) -> int:
        total = 0
        for op in ops:
            if op.kind in CONTENT_OPS:
                node = self.store.get(op.ino)
                if node is not None and node.gen != node.synced_gen:
                    total += node.size
        return total

    # -- one operation ----------------------------------------------------------------------
    async def _replay(self, op: Op) -> int:
        """Apply one journaled operation to the remote; bytes sent."""
        log.debug("replay %d %s %r%s", op.seq, op.kind, op.path, f" -> {op.dst!r}" if op.dst else "")
        try:
            if op.kind in CONTENT_OPS:
                return await self.content.replay(op, created=op.kind == "create")
            sent: int = await getattr(self, f"_replay_{op.kind}")(op)
            return sent
        except ContentDamaged as exc:  # (an upload beside the replay's own: a relink's copy)
            return await self.content.damaged(op, str(exc))

    def _agree(self, op: Op, remote: RemoteStat | None, sent: tuple[int, int] | None = None) -> partial[None] | None:
        """The update that records ``remote`` (when had) as the node's base version, and
        its owner (``sent``: the owner given it, as ``Reconcile.agree``)."""
        return None if remote is None else partial(Reconcile.agree, ino=op.ino, version=remote.version(), gen=None,
                                                   owner=(remote.uid, remote.gid), sent=sent)

    async def _replay_setattr(self, op: Op) -> int:
        try:
            return await self._set_attrs(op)
        finally:
            if self.content.group is not None:
                self.content.group.leave(op.seq)

    async def _set_attrs(self, op: Op) -> int:
        node = self.store.get(op.ino)
        if node is None or node.has(ORPHAN):
            self.ledger.finish(op)
            return 0
        sent = (stat_mod.S_IMODE(node.mode), node.atime_ns, node.mtime_ns)
        # (an owner set here goes in the same request: no round trip more)
        seen = (node.uid, node.gid) if self.side.remote_owners else None  # (compared once sent)
        owner = seen if node.has(OWNER_DIRTY) else None
        group = self.content.group
        try:
            if node.is_symlink:  # (only its owner goes: SETSTAT would follow the link)
                if owner is not None and not await self._set_link_owner(op.path, owner):
                    log.info("%r: the server cannot change the owner of a symlink: kept here until "
                             "its folder is listed again", op.path)
            elif group is not None and group.expects(op.seq):  # (with the batch's others)
                await group.submit_attrs(op, (op.path, *sent, owner))
            elif owner is None:
                await self.side.conn.call(self.side.remote.set_attrs, op.path, *sent)
            else:
                await self.side.conn.call(self.side.remote.set_attrs, op.path, *sent, owner)
        except RemoteError as exc:
            if exc.errno != errno.ENOENT:
                raise
            self.ledger.finish(op, conflict=record(op, "attributes-of-deleted"))
            return 0
        self.ledger.finish(op, partial(Reconcile.attributes_sent, op=op, sent=sent, owner=seen,
                                           owner_sent=owner is not None))
        if node.is_dir:
            self.content.folder_timed(op.ino)
        return 0

    async def _set_link_owner(self, path: bytes, owner: tuple[int, int]) -> bool:
        """The owner of symlink ``path`` there (lchown, lsetstat@openssh.com); False where
        the remote cannot change it (ENOTSUP)."""
        try:
            await self.side.conn.call(self.side.remote.set_link_owner, path, owner)
        except RemoteError as exc:
            if exc.errno != errno.ENOTSUP:
                raise
            return False
        return True

    async def _replay_xattr(self, op: Op) -> int:
        """Extended attribute ``op.xattr`` of the node as it is now: set on the server,
        or removed there when the node has it no more (a remote that keeps none never
        gets these entries). A share that keeps none (ENOTSUP): kept here, logged.
        Refused there (EPERM, ENOSPC ...): kept here, recorded as an ``error`` conflict,
        without the ``KEPT`` mark of a refused content change (the node's other changes
        go on as they are)."""
        if not self.store.has_op(op.seq):
            return 0  # (dropped by a conflict of its node in this pass: Reconcile.move_xattrs)
        node = self.store.get(op.ino)
        found = self.store.get_xattrs(op.ino) if node is not None and not node.has(ORPHAN) else None
        if found is None and (node is None or node.has(ORPHAN)):
            self.ledger.finish(op)  # (gone here since: its removal takes them along)
            return 0
        value = found.get(op.xattr) if found is not None else None
        remote = self.side.remote
        if node is not None and self._last_content.get(op.ino, 0) > op.seq \
                and await self._changed_there(op, node.base):
            self._put_last(op)
            return 0
        try:
            if value is None:
                await self.side.conn.call(remote.remove_xattr, op.path, op.xattr)
            else:
                await self.side.conn.call(remote.set_xattr, op.path, op.xattr, value)
        except RemoteError as exc:
            if exc.errno == errno.ENOENT:
                self.ledger.finish(op, conflict=record(op, "attributes-of-deleted"))
            elif exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                # (the share's file system keeps none: the attribute stays in this cache)
                log.warning("the share keeps no extended attributes (%r): %s kept here only",
                            op.path, op.xattr)
                self.ledger.finish(op)
            else:  # (refused there: kept here, recorded, counted; the node's other changes go on)
                self.conflicts.refused(op, exc, kept=False)
            return 0
        self.ledger.finish(op)
        return len(value or b"")

    async def _changed_there(self, op: Op, base: tuple[int, int, int] | None) -> bool:
        """Whether the server's file at ``op.path`` is not the version our changes start
        from (a content entry of the node follows ``op``: it will keep both versions)."""
        expected = self.ledger.expected_base(op.ino, base)
        there = await self.side.stat(op.path)
        return there is not None and expected is not None and there.version() != expected

    def _put_last(self, op: Op) -> None:
        """An attribute change of a file the server changed, whose content change follows:
        sent after that (the server's version must not get ours; if both versions are
        kept, the copy takes it over and this entry goes: ``Conflicts.keep_both``). The
        entry moves to the journal's end, its folders still held, and to the pass's end."""
        moved: list[Op] = []

        def change(t: Txn) -> None:
            moved.clear()
            t.delete_op(op.seq)
            new = Op("xattr", op.ino, t.path_of(op.ino), parent=op.parent, xattr=op.xattr)
            t.append(new)
            moved.append(new)

        self.store.transact(change)
        self.cache.op_replaced(op, moved[0])
        self._pass_ops[moved[0].seq] = moved[0]  # (a later re-homing rewrites it there too)
        self._batches.append([moved[0]])
        self.progress.ops_total += 1

    async def _mkdir(self, path: bytes, mode: int) -> None:
        await self.side.conn.call(self.side.remote.mkdir, path, stat_mod.S_IMODE(mode) or 0o755)

    async def _replay_mkdir(self, op: Op) -> int:
        remote = await self.side.stat(op.path)
        if remote is not None and not stat_mod.S_ISDIR(remote.mode):
            return await self._rename_local_aside(op)
        if remote is None:
            try:
                await self._mkdir(op.path, op.mode)
            except RemoteError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                await self.side.make_parents(op.path)
                await self._mkdir(op.path, op.mode)
            remote = await self.side.stat(op.path)
        # (there already: made by a pass cut before its owner went, or by another; the
        # owner step is the same, free when the owners match)
        remote, owner, refused = await self._owned(op, remote)
        agree = self._agree(op, remote, owner)
        if refused:  # (the folder is there: its owner goes as a change of attributes)
            def update(t: Txn) -> None:
                if agree is not None:
                    agree(t)
                Reconcile.owner_pending(t, op.ino)
            self.ledger.finish(op, update)
        else:
            self.ledger.finish(op, agree)
        return 0

    async def _owned(self, op: Op, remote: RemoteStat | None
                     ) -> tuple[RemoteStat | None, tuple[int, int] | None, bool]:
        """A folder made there gets the owner it was made with here (``--owners remote``;
        SFTP's MKDIR takes none): one SETSTAT more, only when it differs (it carries the
        node's mode and times too: the folder is read again, so that the recorded base is
        the server's version after it). The server's folder, the owner given (None:
        none), and whether the server refused it."""
        node = self.store.get(op.ino)
        owner = self.side.owner_of(node) if node is not None else None
        if remote is None or node is None or owner is None:
            return remote, None, False
        if (remote.uid, remote.gid) == owner:
            return remote, owner, False
        try:
            await self.side.conn.call(self.side.remote.set_attrs, op.path, stat_mod.S_IMODE(node.mode),
                                      node.atime_ns, node.mtime_ns, owner)
        except RemoteError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise
            log.info("%r: made there, its owner to be sent again as a change of attributes: %s", op.path, exc)
            return remote, None, True
        return await self.side.stat(op.path), owner, False

    async def _rename_local_aside(self, op: Op) -> int:
        """A folder or symlink made here collides with another kind of object there:
        ours is created under a conflict name."""
        async def make(copy: bytes) -> None:  # (both refuse a name that exists)
            if op.kind == "mkdir":
                await self._mkdir(copy, op.mode)
            else:
                await self.side.conn.call(self.side.remote.symlink, op.target, copy)

        copy = await self.conflicts.aside(op.path, make)
        self._moved_aside(op, op.path, copy, op.parent,
                          record(op, "created-both", conflict_path=copy.decode("utf-8", "surrogateescape")))
        return 0

    def _moved_aside(self, op: Op, path: bytes, copy: bytes, parent: int, found: Record) -> None:
        """Our node of ``op``, at ``path`` here, is ``copy`` on the server now (the name
        is another's there): the entry ends with the conflict ``found``, and the node is
        re-homed here under the copy's name, keeping its content and extended attributes
        (a folder: its children, local-only objects too), with the later entries about it
        at ``path`` sent to ``copy`` and those inside it to the same place under ``copy``
        (one transaction). Where that cannot be told safely (a later entry about it
        elsewhere or of another kind, one onto ``path``, a hard link, the name taken here),
        it is forgotten here as before, and the listing brings both back."""
        name, new_name = path.rpartition(b"/")[2], copy.rpartition(b"/")[2]
        moved: list[Op] = []
        rehomed = [False]

        def update(t: Txn) -> None:
            moved.clear()
            rehomed[0] = False
            about = _entries_about(t.ops_after(op.seq), op.ino, path, copy)
            if about is None:
                return
            if not self.cache.reconcile.rehome(t, op.ino, parent, name, new_name):
                return
            for o, here, there in about:  # (changes inside a folder follow it: under the copy)
                o.path, o.dst = _moved_to(o.path, here, there), _moved_to(o.dst, here, there)
                t.put_op(o.seq, o)
            moved.extend(o for o, _here, _there in about)
            rehomed[0] = True

        self.ledger.finish(op, update, found)
        log.debug("%r moved aside to %r: %s", path, copy, "re-homed here" if rehomed[0] else "forgotten here")
        if rehomed[0]:
            for o in moved:  # (the running pass holds them too)
                held = self._pass_ops.get(o.seq)
                if held is not None:
                    held.path, held.dst = o.path, o.dst
            self.cache.remote_changed(op.ino, parent_ino=parent, rehomed_from=name)
        else:
            self.cache.remote_changed(op.ino, parent_ino=parent, moved_aside=True)

    async def _replay_symlink(self, op: Op) -> int:
        remote = await self.side.stat(op.path)
        if remote is not None:
            if not stat_mod.S_ISLNK(remote.mode) \
                    or await self.side.conn.call(self.side.remote.readlink, op.path) != op.target:
                return await self._rename_local_aside(op)
            # (there already: made by a pass cut before its owner went, or by another; the
            # owner step is the same, free when the owners match)
        else:
            await self.side.make_parents(op.path)
            await self.side.conn.call(self.side.remote.symlink, op.target, op.path)
            remote = await self.side.stat(op.path)
        node = self.store.get(op.ino)
        owner = self.side.owner_of(node) if node is not None else None
        if remote is not None and owner is not None and (remote.uid, remote.gid) != owner:
            # (--owners remote: its creator's, as a file's upload gives it; no round trip more
            # when the SSH account is the creator)
            try:
                if await self._set_link_owner(op.path, owner):
                    remote = remote._replace(uid=owner[0], gid=owner[1])  # (a chown keeps its times)
                else:  # (the server keeps the SSH account's owner: shown as it is)
                    if not self._link_owner_told:
                        self._link_owner_told = True
                        log.warning("the server cannot change the owner of a symlink: "
                                    "symlinks made here get the SSH account's (%r first)", op.path)
            except RemoteError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    raise
                log.info("%r: made there, its owner to be sent again as a change of attributes: %s",
                         op.path, exc)
                agree = self._agree(op, remote)

                def update(t: Txn) -> None:  # (refused again there: recorded as any setattr's)
                    if agree is not None:
                        agree(t)
                    Reconcile.owner_pending(t, op.ino)
                self.ledger.finish(op, update)
                return 0
        self.ledger.finish(op, self._agree(op, remote, owner))
        return 0

    async def _replay_link(self, op: Op) -> int:
        remote = await self.side.stat(op.dst)
        if remote is None:
            try:
                await self.side.conn.call(self.side.remote.link, op.path, op.dst)
            except RemoteError as exc:
                if exc.errno != errno.ENOENT or not self._gone_here(op.ino):
                    raise
                # The source never reached the remote and is deleted here: nothing to link.
        self.ledger.finish(op)
        return 0

    def _gone_here(self, ino: int) -> bool:
        node = self.store.get(ino)
        return node is None or node.has(ORPHAN)

    async def _replay_unlink(self, op: Op) -> int:
        remote = await self.side.stat(op.path)
        if remote is None:
            self.ledger.finish(op)
            return 0
        base = self.ledger.expected_base(op.ino, op.base)
        if base is not None and remote.version() != base:
            # Deleted here, changed there: the changed version survives.
            self.ledger.finish(op, conflict=record(op, "deleted-local-changed-remote", version=list(remote.version())))
            return 0
        if stat_mod.S_ISDIR(remote.mode):
            return await self._replay_rmdir(op)
        try:  # (only the version just seen: a change made since is never removed)
            await self.side.conn.call(self.side.remote.unlink_if, op.path, remote.version())
        except RemoteError as exc:
            if exc.errno != errno.ESTALE:
                raise
            now = await self.side.stat(op.path)
            if now is not None:
                self.ledger.finish(op, conflict=record(op, "deleted-local-changed-remote",
                                                       version=list(now.version())))
                return 0
        self.ledger.finish(op)
        return 0

    async def _replay_rmdir(self, op: Op) -> int:
        remote = await self.side.stat(op.path)
        if remote is None:
            self.ledger.finish(op)
            return 0
        try:
            await self.side.conn.call(self.side.remote.rmdir, op.path)
        except RemoteError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) or exc.errno == errno.EIO:
                # New entries appeared there: nothing that changed there is deleted.
                entries = await self.side.conn.call(self.side.remote.listdir, op.path)
                if entries:
                    self.ledger.finish(op, conflict=record(op, "folder-not-empty-remote"))
                    return 0
            raise
        self.ledger.finish(op)
        return 0

    async def _replay_rename(self, op: Op) -> int:
        src = await self.side.stat(op.path)
        dst = await self.side.stat(op.dst)
        if src is None:
            removal = remains_of_deleted(op, self.store.produced) if self._gone_here(op.ino) else None
            if removal is not None and dst is not None \
                    and dst.version() == self.ledger.expected_base(removal.ino, removal.base):
                # Never on the remote, deleted here since, and the name still holds what
                # it replaced: as in _replay_one, after a restart forgot Ledger.gone.
                self._rewrite([op], [removal], [])
                return await self._replay(removal)
            # Already moved (a crash after the rename), or moved/deleted there.
            if dst is None and self._gone_here(op.ino):
                self.ledger.finish(op)  # never reached the remote, and deleted here since
            elif dst is None:
                self.ledger.finish(op, conflict=record(op, "renamed-missing-remote"))
            else:
                self.ledger.finish(op)
            return 0
        await self.side.make_parents(op.dst)
        if not await self._renamed_onto(op, dst, src):
            # A name that appeared there (or changed there): ours becomes a conflict copy.
            target = await self.conflicts.aside(op.dst, partial(self.side.rename_exclusive, op.path))
            self._moved_aside(op, op.dst, target, op.dst_parent,
                              record(op, "renamed-onto-new-remote",
                                     conflict_path=target.decode("utf-8", "surrogateescape")))
            return 0
        self.ledger.finish(op)
        return 0

    async def _renamed_onto(self, op: Op, dst: RemoteStat | None, src: RemoteStat) -> bool:
        """Renamed to ``op.dst`` on the server, unless the name is taken there by
        something we did not know (False: nothing was renamed)."""
        replaced_base = self.ledger.expected_base(op.replaced, op.replaced_base) if op.replaced else None
        if dst is not None and dst == src and self.side.remote.capabilities.case_insensitive \
                and op.path.decode("utf-8", "surrogateescape").lower() == op.dst.decode("utf-8", "surrogateescape").lower():
            # A change of letter case only (readme -> README) on a server where both name
            # one object: what is "there" is the source itself (the same attributes, tag
            # included: file id and change time; else two objects, on a share that is case
            # sensitive after all, and the checked way below applies).
            await self.side.conn.call(self.side.remote.rename_over, op.path, op.dst, dst.version())
            return True
        if dst is not None and (replaced_base is None or dst.version() != replaced_base):
            return False
        try:
            if dst is None:  # nothing there: nothing that appears meanwhile is replaced
                await self.side.rename_exclusive(op.path, op.dst)
            else:  # replacing the object we knew there, only while it is still that one
                await self.side.conn.call(self.side.remote.rename_over, op.path, op.dst, dst.version())
        except RemoteError as exc:
            if exc.errno != errno.EEXIST:
                raise
            return False  # the name appeared there meanwhile
        return True
