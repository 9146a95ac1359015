"""The replay of a content change (``create``, ``store``): upload, or see that it landed,
or keep both versions, or keep what is left of a damaged one.

Owns: the decisions of one content entry's replay; the folders whose times this mount
set on the server (``timed_folders``: an upload into one sets them again); the damaged
content the running pass found (``damaged_now``).
Must not touch: nodes, entries or content files (``cache.reconcile`` does, named), the
journal's order, the schedule.
Lock/ordering: an upload is marked in the store (``mark_upload``) before it starts, so
that after a crash its landing is recognised; our content is checked against the
checksum recorded at its commit while it is sent (``ContentDamaged``, ``LocalGone``); the
entry ends (``Ledger.finish``) only after the server has the version, and the other names
of a hard-linked file follow it (``_relink``) before that. Runs side by side with other
entries of its batch: they are about other nodes (``ordering.batches``).
"""

from __future__ import annotations

import errno
import logging
import stat as stat_mod
import time
from typing import Any

from ..cache.cache import Cache
from ..cache.reconcile import ChangedWhileSent, Reconcile
from ..cache.transfer import LocalGone
from ..errors import ContentDamaged, RemoteError, Unavailable
from ..paths import join
from ..remote import RemoteStat
from ..store.index import ATTR_DIRTY, ORPHAN, Node, Store, Txn
from ..store.journal import Op
from ..store.records import Version
from .conflicts import Conflicts, record
from .ledger import Ledger
from .remote_side import RemoteSide
from .sums import ServerSums
from .uploads import UploadGroup

log = logging.getLogger(__name__)



def _same_second(a_ns: int, b_ns: int) -> bool:
    return a_ns // 1_000_000_000 == b_ns // 1_000_000_000


def landed_before(marks: list[tuple[int, int]], remote: RemoteStat) -> tuple[int, int] | None:
    """The mark of an earlier upload of this entry that a crash or a cut connection
    stopped after it had landed (its size and mtime are there), if one did."""
    if not stat_mod.S_ISREG(remote.mode):
        return None
    for size, mtime_ns in reversed(marks):
        if remote.size == size and _same_second(remote.mtime_ns, mtime_ns):
            return size, mtime_ns
    return None


class ContentReplay:
    def __init__(self, store: Store, cache: Cache, side: RemoteSide, ledger: Ledger,
                 conflicts: Conflicts, sums: ServerSums, reconcile: Reconcile) -> None:
        self.store = store
        self.cache = cache
        self.side = side
        self.ledger = ledger
        self.conflicts = conflicts
        self.sums = sums
        self.reconcile = reconcile
        #: folders whose times this mount set on the server (see ``_keep_folder_times``)
        self.timed_folders: set[int] = set()
        #: what damaged content the running pass found (the sync that asked is told)
        self.damaged_now: list[str] = []
        #: the running batch's uploads, sent together (set by the replay for a batch)
        self.group: UploadGroup | None = None

    def folder_timed(self, ino: int) -> None:
        """A folder's times were set on the server by this mount (its ``setattr``)."""
        if len(self.timed_folders) > 100_000:  # (a bound; only a folder time is at stake)
            self.timed_folders.clear()
        self.timed_folders.add(ino)

    async def replay(self, op: Op, created: bool) -> int:
        """Replay a ``create`` or ``store`` entry; bytes sent. In a batch with others, its
        upload goes with theirs (``group``), or it leaves the group."""
        try:
            return await self._replay(op, created)
        finally:
            if self.group is not None:
                self.group.leave(op.seq)

    async def _replay(self, op: Op, created: bool) -> int:
        node = self.store.get(op.ino)
        if node is None or node.has(ORPHAN):
            await self._gone_here(op, created)
            return 0
        if self._settled_already(op, node, created):
            if self.store.upload_mark(op.seq) is not None:  # (a cut upload's leftover)
                await self.side.remove_temporary(op.path, op.seq)
            self.ledger.finish(op)
            return 0
        digest = self.side.sum_of(node)
        if digest is None:
            # Released since the last checkpoint: commit it now rather than wait for one.
            await self.cache.commit_changes()
            node = self.store.get(op.ino)
            if node is None or node.has(ORPHAN):
                return await self._replay(op, created)
            if self.cache.writers.get(op.ino):
                raise ChangedWhileSent(f"{op.path!r} was opened for writing again: sent at its release")
            digest = self.side.sum_of(node)
            if digest is None:
                return await self.damaged(op, "no checksum of its content was recorded when it was "
                                              "written (its content file was short or gone then)")
        gen = node.gen
        try:
            return await self._replay_checked(op, node, gen, digest, created)
        except (ContentDamaged, LocalGone) as exc:
            return await self._check_failed(op, gen, created, exc)

    def _settled_already(self, op: Op, node: Node, created: bool) -> bool:
        """Nothing to send: an earlier entry already uploaded this content (the caller
        ends the entry)."""
        return node.gen == node.synced_gen and not created

    async def _gone_here(self, op: Op, created: bool) -> None:
        """The node is gone here (its unlink, or the rename that replaced it, follows in
        the journal): nothing to send, the entry ends. But an upload of this entry may
        have begun before a kill or a cut link stopped it (its mark is set): its temporary
        file on the server goes (nothing else would remove it), and it may have landed (the
        server has a file of a mark's size and mtime under the name): that version is ours.
        Of a file the server had (``store``), it is recorded as the version the replay
        produced, which the unlink or the rename over it then expects (else they took it
        for a change of the server's: a false conflict, a conflict copy or the file kept
        there). Of a file created here, nothing else would remove it: it goes now."""
        if created:
            self.ledger.gone.add(op.ino)
        landed = await self.left_by_cut_upload(op)
        if landed is not None and created:
            await self.side.remove_landed(op.path, landed)
            landed = None
        version = landed.version() if landed is not None else None
        self.ledger.finish(op, None if version is None else (lambda t: t.set_produced(op.ino, version)))

    async def left_by_cut_upload(self, op: Op) -> RemoteStat | None:
        """Where an upload of entry ``op`` began (its mark is set) and a kill or a cut link
        stopped it: its temporary file on the server removed, and the file under its name
        if it is that upload landed (a mark's size and mtime: ``landed_before``), else
        None. A failed look is logged, never a reason to stop the replay."""
        marks = self.store.upload_marks(op.seq)
        if not marks:
            return None
        await self.side.remove_temporary(op.path, op.seq)
        try:
            found = await self.side.stat(op.path)
        except RemoteError as exc:
            log.warning("could not look at %r, perhaps left by an upload before a crash: %s", op.path, exc)
            return None
        return found if found is not None and landed_before(marks, found) else None

    async def _check_failed(self, op: Op, gen: int, created: bool, exc: Exception) -> int:
        """An upload stopped by its check: the file was deleted or written meanwhile, or
        our version is damaged."""
        now = self.store.get(op.ino)
        if now is None or now.has(ORPHAN):
            if created:
                self.ledger.gone.add(op.ino)
            self.ledger.finish(op)  # deleted here meanwhile: its unlink follows in the journal
            return 0
        if now.gen != gen:
            raise ChangedWhileSent(f"{op.path!r} was written while it was uploaded: "
                                   "sent again at the next pass") from exc
        reason = "its content file is gone" if isinstance(exc, LocalGone) else str(exc)
        return await self.damaged(op, reason)

    async def _replay_checked(self, op: Op, node: Node, gen: int, digest: bytes, created: bool) -> int:
        """``replay`` of content whose checksum is ``digest``: every upload of it is
        checked against it as it is sent (``ContentDamaged``, ``LocalGone``)."""
        # Were uploads of this entry started before (a crash or a cut connection since)?
        # Then (size, mtime) of what each was sending.
        earlier = self.store.upload_marks(op.seq)
        done = await self._changed_in_place(op, node, gen, digest, created)
        if done is not None:
            return done
        # The common case in one job: the remote is as expected, upload.
        outcome, found = await self._upload_if_expected(op, node, digest, created)
        if outcome == "uploaded":
            assert found is not None
            await self._landed(op, node, found, gen)
            return node.size
        remote = found if outcome == "changed" else await self.side.stat(op.path)
        conflict = None
        if remote is None:
            if not created and node.base is not None:
                conflict = record(op, "deleted-remote-changed-local")
        elif created or remote.version() != node.base:
            landed = landed_before(earlier, remote)
            if landed is None or (node.size == landed[0] and _same_second(node.mtime_ns, landed[1])):
                return await self._theirs_or_ours(op, node, remote, gen, landed is not None)
            # Our older upload is there but the file changed here since: send it again. The
            # marks are that upload's and this one's from now on: those of uploads cut
            # before they landed cannot be there, and none is later taken for ours when the
            # server's file comes to have its size and mtime second.
            self.store.transact(lambda t: t.keep_upload_marks(op.seq, [landed, (node.size, node.mtime_ns)]))
        return await self._send(op, node, gen, conflict)

    async def _changed_in_place(self, op: Op, node: Node, gen: int, digest: bytes, created: bool) -> int | None:
        """The server hashed the file before this batch: another hash than the base
        version's is a change there, even one that kept the size and mtime second. None
        when that tells nothing (the replay goes on)."""
        theirs = self.sums.pop(op.seq)
        if theirs is None or created:
            return None
        base = self.store.base_sum(op.ino)
        if base is None or base.version != node.base or theirs == base.digest:
            return None
        remote = await self.side.stat(op.path)
        if remote is None or remote.version() != node.base:
            return None
        if theirs == digest:  # (our content already: an upload that landed)
            await self._landed(op, node, remote, gen)
            return 0
        log.info("%r changed on the server although its size and mtime second did "
                 "not: keeping both versions", op.path)
        self.store.transact(lambda t: t.drop_base_sum(op.ino))
        return await self.conflicts.keep_both(op, node, remote, gen)

    async def _upload_if_expected(self, op: Op, node: Node, digest: bytes,
                                  created: bool) -> tuple[str, RemoteStat | None]:
        """("uploaded", new version) when the server had what we expected (nothing, for a
        file created here; the base version else), or ("changed", what is there) /
        ("gone", None) to settle."""
        args = (created, node.base, node.size, op.path, self.store.content_path(node.ino),
                stat_mod.S_IMODE(node.mode), self.side.temp_name(op.path, op.seq), node.atime_ns,
                node.mtime_ns, digest, self.side.owner_of(node), self.side.owner_kept(node))
        try:
            found: tuple[str, RemoteStat | None]
            if self.group is not None and self.group.expects(op.seq):
                # (the group marks the upload with the others', before sending)
                found = await self.group.submit(op, node.size, node.mtime_ns, args)
                return found
            self.store.transact(lambda t: t.mark_upload(op.seq, node.size, node.mtime_ns))
            found = await self.side.conn.call(self.side.transfers.upload_unless_changed, *args, bulk=True)
            return found
        except RemoteError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return "gone", None  # a folder above is missing: the slow path

    async def _theirs_or_ours(self, op: Op, node: Node, remote: RemoteStat, gen: int, ours: bool) -> int:
        """The server has another version than expected: ours (the same content, as an
        upload that landed before a crash left it), an older upload of ours (``ours``: a
        mark's size and mtime second, but the file was written here again since, keeping
        both: sent again), or another one (both kept)."""
        if await self.side.same_content(node, op.path, remote):
            await self._landed(op, node, remote, gen)
            return 0
        if ours:
            return await self._send(op, node, gen, None)
        return await self.conflicts.keep_both(op, node, remote, gen)

    async def _send(self, op: Op, node: Node, gen: int, conflict: dict[str, Any] | None) -> int:
        keep = self.side.owner_kept(node)  # (as ``_upload_if_expected``'s)
        try:
            new = await self.side.upload(node, op.path, op.seq, keep)
        except RemoteError as exc:
            if exc.errno != errno.ENOENT or not await self.side.make_parents(op.path):
                raise
            # Created here inside a folder that was removed there: re-create it.
            conflict = conflict or record(op, "folder-recreated")
            new = await self.side.upload(node, op.path, op.seq, keep)
        await self._landed(op, node, new, gen, conflict)
        return node.size

    async def _landed(self, op: Op, node: Node, remote: RemoteStat, gen: int,
                      conflict: dict[str, Any] | None = None) -> None:
        """Our version ``gen`` of the file is on the remote under ``op.path`` as ``remote``:
        its other names there follow it, then the entry is done."""
        await self._relink(node, op, remote)
        version, owner, sent = remote.version(), (remote.uid, remote.gid), self.side.owner_of(node)
        self.ledger.finish(op, lambda t: Reconcile.agree(t, op.ino, version, gen, owner, sent), conflict)
        if op.kind == "store" and op.parent in self.timed_folders:
            await self._keep_folder_times(op)

    async def _keep_folder_times(self, op: Op) -> None:
        """An upload is a new file renamed over the old one, which sets the folder's mtime
        on the server to now; a change of a file's content moves no folder's time here
        (nor on a local file system). A folder whose times a program set (its ``setattr``
        replayed by this mount: ``rsync``, ``tar``, ``touch -d``) gets them back."""
        folder = self.store.get(op.parent)
        if folder is None or not folder.is_dir or folder.has(ATTR_DIRTY):
            return  # (its own setattr is on the way, and goes after this: folder_times_last)
        try:
            await self.side.conn.call(self.side.remote.set_attrs, op.path.rpartition(b"/")[0],
                                      stat_mod.S_IMODE(folder.mode), folder.atime_ns, folder.mtime_ns)
        except (RemoteError, Unavailable) as exc:  # the content landed: only the time is off
            log.warning("could not set the times of the folder of %r again: %s", op.path, exc)

    async def _relink(self, node: Node, op: Op, now: RemoteStat) -> None:
        """An upload replaces the remote file under ``op.path`` only (a new file renamed
        over it), which cuts it from the file's other names there. A file with several
        names here gets them back: each other name that still holds the version the upload
        replaced is linked to the new file (a link to a temporary name, renamed over it).
        A name holding anything else is someone else's file now, and a name not there yet
        comes with its own ``link`` entry."""
        if node.nlink < 2 or node.is_dir:
            return
        # (this entry is not finished yet: what the remote had is still the recorded base)
        before = self.ledger.expected_base(op.ino, node.base)
        for other in self.store.paths_of(node.ino):
            if other == op.path:
                continue
            try:
                await self._relink_one(node, op, other, before, now)
            except RemoteError as exc:
                # The upload itself landed: this name is left as the server has it.
                log.warning("could not relink %r to %r on the server: %s", other, op.path, exc)

    async def _relink_one(self, node: Node, op: Op, other: bytes, before: Version | None,
                          now: RemoteStat) -> None:
        remote = await self.side.stat(other)
        if remote is None or remote.version() == now.version():
            return
        if before is None or remote.version() != before:
            log.warning("not relinking %r to %r: it changed on the server", other, op.path)
            return
        folder, _, _ = other.rpartition(b"/")
        temp = join(folder, self.side.temp_name(other, op.seq))
        call, server = self.side.conn.call, self.side.remote
        for attempt in range(2):
            try:
                await call(server.link, op.path, temp)
                break
            except RemoteError as exc:
                if exc.errno in (errno.EXDEV, errno.ENOTSUP, errno.EPERM, errno.EOPNOTSUPP):
                    await self.side.upload(node, other, op.seq)  # no hard links there: a copy
                    return
                if attempt:
                    raise
            # The temporary name may be left by an interrupted pass (SFTP v3 reports an
            # existing name as a plain failure): remove it and link once more.
            try:
                await call(server.unlink, temp)
            except RemoteError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        await call(server.rename, temp, other)

    async def damaged(self, op: Op, reason: str) -> int:
        """Our version failed its checksum (cut short, gone, other bytes than were written):
        it is never uploaded, and the server keeps its version, which the name shows from
        now on. What is left of ours stays here under ``NAME (damaged ...)``, local only
        (``DAMAGED``: kept by listings, never evicted, never uploaded as it is), and a
        ``damaged-local`` conflict record and the status's last error say so."""
        node = self.store.get(op.ino)
        if node is None or node.has(ORPHAN):
            self.ledger.finish(op)
            return 0
        remote = await self.side.stat(op.path)
        if remote is not None and not stat_mod.S_ISREG(remote.mode):
            remote = None  # (the name is something else there now: the listing shows it)
        found = record(op, "damaged-local", error=reason, conflict_path=None,
                       local={"size": node.size, "left": 0})
        await self._keep_what_is_left(op, node, remote, found)
        copy_path, left = found["conflict_path"], found["local"]["left"]
        log.error("the cache's copy of %r is damaged (%s): not uploaded, the server keeps its "
                  "version; %s", op.path, reason,
                  f"what is left of it ({left} of {node.size} bytes) is kept here only as {copy_path!r}"
                  if copy_path else "nothing of it is left")
        if op.kind == "create":
            self.ledger.gone.add(op.ino)
        self.cache.remote_changed(op.ino, parent_ino=node.parent, moved_aside=remote is None)
        self.damaged_now.append(op.path.decode("utf-8", "surrogateescape"))
        return 0

    async def _keep_what_is_left(self, op: Op, node: Node, remote: RemoteStat | None,
                                 found: dict[str, Any]) -> None:
        """What can be read of our damaged version kept under ``NAME (damaged ...)``, the
        name showing the server's version ``remote`` (when it has a file there), the entry
        ended and the conflict record ``found`` written, in one transaction (a kill between
        them would leave the entry to be replayed against a node that no longer holds it):
        ``found`` gets the copy's path (None: nothing kept) and its size."""
        gen = node.gen
        kept = await self.reconcile.copy_content(op.ino, node.size)  # (what is left of ours)
        try:
            folder = self.store.path_of(node.parent)
        except KeyError:
            folder = b""
        found["local"]["left"] = kept.copied

        def update(t: Txn) -> None:
            kept.placed = False
            found["conflict_path"] = None
            n = self.reconcile.unchanged(t, op, gen, "its damage was looked at")
            if n is None:
                return
            kept_as = self.reconcile.keep_damaged_copy(t, kept, n, time.time())
            if kept_as is not None:
                found["conflict_path"] = join(folder, kept_as).decode("utf-8", "surrogateescape")
            if remote is not None:  # the name shows the server's version, fetched on use
                self.reconcile.drop_damaged(t, n, remote)

        try:
            self.ledger.finish(op, update, found)
        finally:
            self.reconcile.discard(kept)
