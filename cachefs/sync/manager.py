"""The synchronization manager: replays the journal onto the remote (Coda's reintegration).

Owns: when to reconcile (write-back after a change, on reconnect, on request, on a
schedule), the replay of each journaled operation with conflict detection, conflict
records, and the progress shown in status.
Must not touch: FUSE. It is the only component that changes the remote.

Every replayed operation is idempotent or recognises that it already happened, so a
crash or a dropped connection at any point resumes cleanly:
- an upload goes to a temporary name and is renamed over the target, then the remote
  mtime is set to the local one; a retry that finds the remote already equal to the
  local (size, mtime) knows its upload landed;
- removals that find nothing to remove, and folders that already exist, count as done;
- the journal entry is deleted, and the node's new base version recorded, in one
  transaction after the remote change.

A conflict never loses a version: the remote keeps the name, the local version is
uploaded beside it as ``NAME (conflict YYYY-MM-DD HHMMSS HOST-ID).EXT``, a name nothing
has (see ``_aside``).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import stat as stat_mod
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

import lmdb
import trio

from ..cache.cache import Cache
from ..cache.hoard import Hoard
from ..cache.reconcile import ChangedWhileSent, Reconcile
from ..defaults import DEFAULT_WRITEBACK_HOLD
from ..progress import Progress
from ..store.crypto import RecordError
from ..store.index import (ATTR_DIRTY, ORPHAN, Node,
                           Store, Txn, index_damaged)
from ..errors import ContentDamaged, RemoteError, SyncFailed, Unavailable
from ..link.connectivity import Connectivity
from ..paths import join
from ..remote import Remote, RemoteStat
from ..cache.transfer import LocalGone, Transfers
from ..link.wakeup import Wakeup
from ..store.journal import CONTENT_OPS, Op, folder_times_last, optimise

#: ``store`` entries whose files the server hashes in one command (``_server_sums``), and
#: the most bytes of them: the command must end within the connection's timeout
HASH_AHEAD = 256
HASH_AHEAD_BYTES = 64 << 20


log = logging.getLogger(__name__)


#: the most names ``NAME (conflict ... CLIENT N).EXT`` tried for one conflict copy
CONFLICT_NAME_TRIES = 100


def client_tag(host: str, cache_id: str) -> str:
    """``HOST-ID``: the short host name and the cache's id (two caches on one host, or two
    hosts of one name, never make the same conflict name), as file-name-safe text."""
    host = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "-" for c in host)[:32]
    return f"{host or 'host'}-{cache_id}"


def conflict_name(name: bytes, when: float, client: str, n: int = 1) -> bytes:
    """``NAME (conflict YYYY-MM-DD HHMMSS CLIENT).EXT`` (the extension kept last); the
    ``n``-th choice, when the earlier ones are taken, ends ``CLIENT N)``. The stem is cut
    so the name fits 255 bytes: between two characters when it is UTF-8 (a name cut
    inside a character could not be typed, nor given to ``resolve``), else anywhere."""
    stamp = datetime.fromtimestamp(when).strftime("%Y-%m-%d %H%M%S")
    tag = f" (conflict {stamp} {client}{f' {n}' if n > 1 else ''})".encode()
    dot = name.rfind(b".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, b"")
    if 255 - len(tag) - len(ext) < 1:  # an "extension" too long to keep whole
        stem, ext = name, b""
    return _cut(stem, 255 - len(tag) - len(ext)) + tag + ext


def _cut(text: bytes, room: int) -> bytes:
    """``text`` in at most ``room`` bytes, never ending inside a UTF-8 character."""
    if len(text) <= room:
        return text
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return text[:room]  # not UTF-8: bytes are all there is
    while room > 0 and text[room] & 0xC0 == 0x80:  # a continuation byte: inside a character
        room -= 1
    return text[:room]


def _same_second(a_ns: int, b_ns: int) -> bool:
    return a_ns // 1_000_000_000 == b_ns // 1_000_000_000


@dataclass
class PassResult:
    complete: bool
    reason: str | None = None
    conflicts: list[dict] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # paths whose content failed its checksum


def _damage_note(paths: list[str]) -> str:
    shown = ", ".join(repr(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return (f"damaged in the cache, not uploaded: {shown} (the server keeps its version; "
            "see 'cachefs conflicts')")


class SyncManager:
    def __init__(self, store: Store, cache: Cache, conn: Connectivity, hoard: Hoard | None = None, *,
                 writeback_delay: float = 0.3, writeback_hold: float = DEFAULT_WRITEBACK_HOLD,
                 interval: float = 300.0, flush_timeout: float = 30.0, parallel: int = 8,
                 transfers: Transfers | None = None, wakeup: Wakeup | None = None) -> None:
        self.store = store
        self.cache = cache
        self.hoard = hoard or Hoard(cache)
        self.conn = conn
        self.remote: Remote = conn.remote
        self.writeback_delay = writeback_delay  # quiet time that ends a burst of changes
        self.writeback_hold = writeback_hold  # longest a burst holds write-back back
        self.parallel = parallel  # independent operations replayed at once
        #: the blocking upload jobs, run in a worker thread or handed on to a worker process
        self.transfers = transfers or Transfers.in_process(self.remote, store.content)
        #: rung by the cache (a change journaled, a writer gone) and the link (back online)
        self.wakeup = wakeup or Wakeup()
        self.interval = interval
        self.flush_timeout = flush_timeout
        self.host = socket.gethostname().split(".")[0] or "host"
        #: what conflict copies and temporary names made by this cache carry
        self.client = client_tag(self.host, store.cache_id)
        self.clock = time.time  # the time a conflict copy's name shows
        #: this mount's own mark on the temporary name of a conflict copy (two caches of
        #: one id, a copied cache dir, must not write one temporary file either)
        self._nonce = os.urandom(2).hex()
        self.syncing = False
        self.progress = Progress()
        #: the store changes of the replay (a node and its content, written in one place)
        self.reconcile = Reconcile(store, lambda ino: bool(cache.writers.get(ino)))
        self.last_sync: float | None = None
        self.last_error: str | None = None
        self._pass_lock = trio.Lock()
        #: changes the remote refused for good (recorded as ``error`` conflicts) since the
        #: last ``sync`` request, which reports them: (path, error), the first few kept
        self._refusals: list[tuple[bytes, RemoteError]] = []
        self._refusal_count = 0
        #: folders whose times this mount set on the server (see ``_keep_folder_times``)
        self._timed_folders: set[int] = set()
        # Created here and deleted again before their creation reached the remote (kept
        # for the mount's life: inode numbers are never reused).
        self._gone: set[int] = set()
        #: journal seq -> the SHA-256 the server computed for that ``store``'s file in
        #: this pass, before its batch (``_server_sums``); the entries looked at for it
        self._their_sums: dict[int, bytes] = {}
        self._hashed: set[int] = set()
        #: what damaged content the running pass found (the sync that asked is told)
        self._damaged_now: list[str] = []
        cache.changed = self.wakeup.poke  # moved to the daemon at merge
        conn.on_online(self.wakeup.poke)
        cache.rebuild_local_dirs()

    # -- triggers -------------------------------------------------------------------------
    def poke(self) -> None:
        """Something changed (journal append, release, reconnect): reconcile soon.
        Offline, changes only wait for the reconnect, which pokes again."""
        self.wakeup.poke()

    async def _settle(self) -> None:
        """Wait until changes stop coming for ``writeback_delay``, at most
        ``writeback_hold``: a burst (an untar, a build, a git commit) runs with the CPU to
        itself and is replayed as one batch, instead of every few files."""
        deadline = trio.current_time() + self.writeback_hold
        while True:
            seen = self.wakeup.pokes
            await trio.sleep(max(0.0, min(self.writeback_delay, deadline - trio.current_time())))
            if self.wakeup.pokes == seen or trio.current_time() >= deadline:
                return

    async def run(self) -> None:
        """Write-back after changes and on reconnect; a full pass on the schedule."""
        while True:
            scheduled = True
            with trio.move_on_after(self.interval):
                await self.wakeup.wait()
                scheduled = False
            self.wakeup.clear()
            if not self.conn.online:
                continue
            try:
                if scheduled:
                    await self.full_pass()
                    continue
                await self._settle()
                if self.pending():
                    await self.reintegrate()
            except SyncFailed as exc:
                log.info("scheduled sync incomplete: %s", exc)
            except (RecordError, lmdb.Error) as exc:  # a damaged index: one clear line
                self.last_error = index_damaged(self.store.dir, exc)
                log.error("%s", self.last_error)
                await trio.sleep(self.writeback_delay * 10)
            except Exception:  # write-back must go on; the journal keeps the work
                log.exception("reconciliation pass failed")
                await trio.sleep(self.writeback_delay * 10)

    async def full_pass(self) -> None:
        """Replay the journal and refresh pinned trees; ``SyncFailed`` if incomplete."""
        try:  # a round trip even when there is nothing to send: "synced" means reachable
            await self.conn.call(self.remote.ping)
        except Unavailable as exc:
            raise SyncFailed(f"remote is offline: {exc}", errno.EHOSTDOWN) from exc
        result = await self.reintegrate()
        if not result.complete:
            raise SyncFailed(result.reason or "reconciliation did not complete")
        if result.damaged:
            raise SyncFailed(_damage_note(result.damaged))
        try:
            await self.hoard.refresh()
        except Unavailable as exc:
            raise SyncFailed(f"remote is offline: {exc}", errno.EHOSTDOWN) from exc
        except RemoteError as exc:
            raise SyncFailed(f"refreshing pinned folders failed: {exc}", exc.errno or errno.EIO) from exc
        self.last_sync = time.time()

    def pending(self) -> int:
        return self.store.count(self.store.journal)

    async def request_sync(self) -> None:
        """One full pass now (joining one under way); raises ``SyncFailed`` unless the
        journal is empty and the remote reachable afterwards."""
        await self.conn.try_connect()
        if self.conn.state.value == "offline-by-request":
            raise SyncFailed("working offline by request ('cachefs online' or "
                             "'echo online > .cachefs/control' to reconnect)", errno.EHOSTDOWN)
        if not self.conn.online:
            raise SyncFailed(f"remote is offline: {self.conn.last_error or 'not reachable'}",
                             errno.EHOSTDOWN)
        await self.full_pass()
        self._report_refusals()

    def _report_refusals(self) -> None:
        """``SyncFailed`` with the first refused change's errno when the remote refused a
        replayed change since the last request (by this pass or by a write-back pass
        before it): the journal is empty, yet not everything reached the server."""
        refusals, count = self._refusals, self._refusal_count
        if not count:
            return
        self._refusals, self._refusal_count = [], 0
        path, exc = refusals[0]
        more = f" and {count - 1} more" if count > 1 else ""
        raise SyncFailed(f"the remote refused {count} change{'s' if count > 1 else ''} (kept here, "
                         f"see 'cachefs conflicts'): {path.decode('utf-8', 'replace')}: {exc}{more}",
                         exc.errno or errno.EIO)

    async def flush_at_unmount(self) -> None:
        """Like SyncMgr's sync at logoff: drain the journal, bounded by a timeout."""
        if not self.pending() or not await self.conn.try_connect():
            return
        log.info("unmounting: replaying %d pending changes (at most %g s)",
                 self.pending(), self.flush_timeout)
        with trio.move_on_after(self.flush_timeout):
            await self.reintegrate()
        if self.pending():
            log.warning("%d changes still pending: they will be replayed by the next mount",
                        self.pending())

    # -- conflicts ---------------------------------------------------------------------------
    def conflicts(self) -> list[dict]:
        return self.store.conflict_records()

    async def resolve(self, path: bytes, keep: str) -> None:
        """Settle the conflicts recorded for ``path`` (the original or the copy's path):
        ``local`` keeps this machine's version under the name, ``remote`` the server's,
        ``both`` keeps both files as they are. The changes go through the journal."""
        text = path.decode("utf-8", "surrogateescape")
        records = [r for r in self.conflicts() if text in (r.get("path"), r.get("conflict_path"))]
        if not records:
            raise SyncFailed(f"no conflict recorded for {text!r}", errno.ENOENT)
        if keep == "local" and any(r["kind"] == "damaged-local" for r in records):
            raise SyncFailed(f"{text!r}: the local version failed its checksum and is kept here only; "
                             "copy what you keep of it to a name of your choice, which uploads it, "
                             "then resolve with 'remote' or 'both'", errno.EINVAL)
        for record in records:
            original = record["path"].encode("utf-8", "surrogateescape")
            copy = record.get("conflict_path")
            copy = copy.encode("utf-8", "surrogateescape") if copy else None
            kind = record["kind"]
            if copy is not None:
                if keep == "local":
                    await self.cache.rename_path(copy, original)
                elif keep == "remote":
                    await self.cache.unlink_path(copy)
            elif kind == "deleted-local-changed-remote" and keep == "local":
                await self.cache.unlink_path(original)
            elif kind == "deleted-remote-changed-local" and keep == "remote":
                await self.cache.unlink_path(original)
            elif kind == "error":  # the version the server refused: send again, or drop it
                self.cache.settle_kept(original, record.get("refused", "store"), send_again=keep == "local",
                                       drop=keep == "remote")
            self.store.delete_conflict(record["id"])
            self.cache.clear_conflict(original)
        self.poke()

    # -- a pass ---------------------------------------------------------------------------
    async def reintegrate(self) -> PassResult:
        """One replay of the journal; a request during a pass waits for it and runs next
        (so it sees every change made before it was asked)."""
        async with self._pass_lock:
            self.syncing = True
            try:
                result = await self._pass()
            finally:
                self.syncing = False
            if result.complete:
                self.last_sync = time.time()
                # (damaged files not uploaded stay in status while their record is kept)
                damaged = [r["path"] for r in self.conflicts() if r.get("kind") == "damaged-local"]
                self.last_error = _damage_note(damaged) if damaged else None
                if self._refusal_count:  # (replayed, but the remote refused some changes)
                    self.last_error = (f"the remote refused {self._refusal_count} change(s), kept "
                                       f"here: see 'cachefs conflicts'")
            else:
                self.last_error = result.reason
            return result

    async def _pass(self) -> PassResult:
        self._damaged_now = []
        result = await self._replay_journal()
        result.damaged = self._damaged_now
        return result

    async def _replay_journal(self) -> PassResult:
        ops, damaged = self.store.journal_ops_until_damaged()
        if damaged is not None:  # replay what comes before it, then stop there
            log.error("%s", damaged)
        if not ops:
            return PassResult(damaged is None, damaged)
        alive, folders = set(), set()
        for ino in {op.ino for op in ops}:
            node = self.store.get(ino)
            if node is not None and not node.has(ORPHAN):
                alive.add(ino)
                if node.is_dir:
                    folders.add(ino)
        # Entries whose upload began (a crash or a cut connection stopped it) keep their
        # form: their recovery compares the remote with what was being sent.
        kept, dropped = optimise(ops, alive, lambda seq: self.store.upload_mark(seq) is not None)
        if dropped or len(kept) != len(ops) or any(a is not b for a, b in zip(kept, ops)):
            self._rewrite(ops, kept, dropped)
        kept = folder_times_last(kept, folders)  # (a folder's times land after its contents)
        self.progress = Progress(0, len(kept), 0, self._bytes_to_send(kept), time.time())
        batches = list(_batches(kept, self.parallel))
        self._their_sums, self._hashed = {}, set()
        for at, batch in enumerate(batches):
            if any(op.kind in CONTENT_OPS and self.cache.writers.get(op.ino) for op in batch):
                # Replay stops at a file still open for writing (close-to-open: its content
                # is not final); release() starts the next pass.
                return PassResult(False, "a file is still open for writing")
            failures: list[str] = []
            if any(op.kind == "store" and op.seq not in self._hashed for op in batch):
                await self._server_sums(op for later in _until_barrier(batches, at) for op in later)
            if len(batch) == 1:
                await self._replay_one(batch[0], failures)
            else:
                async with trio.open_nursery() as nursery:
                    for op in batch:
                        nursery.start_soon(self._replay_one, op, failures)
            if failures:
                return PassResult(False, failures[0])
        if damaged is not None:
            return PassResult(False, damaged)
        if not self.pending():
            self.store.transact(lambda t: t.clear_produced())
        return PassResult(True)

    async def _replay_one(self, op: Op, failures: list[str]) -> None:
        """Replay ``op``; a reason is added to ``failures`` when the pass must stop."""
        if op.ino in self._gone:
            # Created here, then deleted here during this pass before its creation
            # reached the remote: the rest of its story need not reach it either.
            self._finish(op)
            return
        try:
            sent = await self._replay(op)
        except Unavailable as exc:
            failures.append(f"remote is offline: {exc}")
            return
        except ChangedWhileSent as exc:
            failures.append(str(exc))
            return
        except RemoteError as exc:
            # The remote refuses this change for good (permission, quota...): keep the
            # local version, record it, and go on with the rest.
            log.error("cannot replay %s %r: %s", op.kind, op.path, exc)
            self._finish(op, partial(Reconcile.refused, ino=op.ino), self._record(op, "error", error=str(exc), refused=op.kind))
            self._refusal_count += 1
            if len(self._refusals) < 10:
                self._refusals.append((op.path, exc))
        except (OSError, ValueError, KeyError, lmdb.Error) as exc:
            # A local failure (disk, a record that went away, a damaged record): stop
            # here, the entry stays in the journal and the next pass retries it.
            if isinstance(exc, (RecordError, lmdb.Error)):
                log.error("replay of %s %r stopped: %s", op.kind, op.path, index_damaged(self.store.dir, exc))
            else:
                log.exception("replay of %s %r failed", op.kind, op.path)
            failures.append(f"replay of {op.path!r} failed: {exc}")
            return
        else:
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

    def _finish(self, op: Op, update=None, conflict: dict | None = None) -> None:
        """The op is on the remote (or settled): drop it from the journal, and record
        what the node now agrees with, in one transaction."""
        def change(t: Txn) -> None:
            t.delete_op(op.seq)
            t.clear_upload(op.seq)
            if update is not None:
                update(t)
            if conflict is not None:
                t.add_conflict(conflict)

        self.store.transact(change)
        self.cache.op_done(op)

    def _record(self, op: Op, kind: str, **details) -> dict:
        record = {"kind": kind, "path": op.path.decode("utf-8", "surrogateescape"),
                  "time": datetime.now().astimezone().isoformat(timespec="seconds"),
                  "ino": op.ino, **details}
        log.warning("conflict (%s) on %r", kind, op.path)
        return record

    # -- remote helpers -------------------------------------------------------------------
    async def _stat(self, path: bytes) -> RemoteStat | None:
        try:
            return await self.conn.call(self.remote.stat, path)
        except RemoteError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise

    async def _make_parents(self, path: bytes) -> bool:
        """Re-create missing folders above ``path``; True if any was missing."""
        parts = path.split(b"/")[:-1]
        made = False
        for i in range(1, len(parts) + 1):
            folder = b"/".join(parts[:i])
            st = await self._stat(folder)
            if st is None:
                try:
                    await self.conn.call(self.remote.mkdir, folder, 0o755)
                except RemoteError:
                    # Made meanwhile by the replay of something else in it (side by side)?
                    st = await self._stat(folder)
                    if st is None or not stat_mod.S_ISDIR(st.mode):
                        raise
                made = True
        return made

    async def _same_content(self, node: Node, path: bytes, remote: RemoteStat) -> bool:
        """Whether the remote file holds our content: compared with our content's
        checksum as committed (never with bytes read back from a content file that may be
        damaged), by a hash the server computes where it can, else by reading it."""
        if remote.size != node.size or not stat_mod.S_ISREG(remote.mode):
            return False
        ours = self._sum_of(node)
        if ours is not None and self.remote.can_hash is not False:
            try:
                theirs = await self.conn.call(self.remote.hash_files, [path])
            except RemoteError:
                theirs = None
            if theirs and theirs[0] is not None:
                return theirs[0] == ours
        if node.size > 64 << 20:
            return False  # too costly to compare: treat as a conflict (both kept)
        data = await self.conn.call(self.remote.read, path, 0, node.size + 1, bulk=True)
        if ours is not None:
            return hashlib.sha256(data).digest() == ours
        mine = await trio.to_thread.run_sync(_read_content, self.store.content,
                                             self.store.content_path(node.ino), node.size)
        return hashlib.sha256(data).digest() == hashlib.sha256(mine).digest()

    def _sum_of(self, node: Node) -> bytes | None:
        """The checksum recorded when the node's current content was committed."""
        found = self.store.content_sum(node.ino)
        if found is None or found.gen != node.gen or found.size != node.size:
            return None
        return found.digest

    async def _server_sums(self, ops) -> None:
        """For the next ``store`` entries (from a batch on, up to ``HASH_AHEAD`` of them)
        whose file's base version has a known hash: the hash of what the server has now,
        in one call (one exec of ``sha256sum`` over SSH for the lot: an exec costs a
        session on the server, 5-100 ms, more than the replay of a small file). A server
        change that kept the size and the mtime second shows as another hash than the
        base's (``_replay_content``)."""
        if self.remote.can_hash is False:
            return
        wanted = []
        size = 0
        for op in ops:
            if op.kind != "store" or op.seq in self._hashed:
                continue
            node = self.store.get(op.ino)
            if node is None or node.base is None or node.gen == node.synced_gen \
                    or node.base[0] > HASH_AHEAD_BYTES:
                self._hashed.add(op.seq)
                continue
            if len(wanted) == HASH_AHEAD or (wanted and size + node.base[0] > HASH_AHEAD_BYTES):
                break
            self._hashed.add(op.seq)
            found = self.store.base_sum(op.ino)
            if found is not None and found.version == node.base:
                wanted.append(op)
                size += node.base[0]
        if not wanted:
            return
        try:
            digests = await self.conn.call(self.remote.hash_files, [op.path for op in wanted])
        except (RemoteError, Unavailable) as exc:  # (offline: the replay itself stops next)
            log.debug("server hashes not had: %s", exc)
            return
        self._their_sums.update((op.seq, d) for op, d in zip(wanted, digests or []) if d is not None)

    def _temp_name(self, path: bytes, seq: int, kind: bytes = b"tmp") -> bytes:
        return _temp_name(path, seq, self.client, kind)

    async def _aside(self, path: bytes, make) -> bytes:
        """Make our version of ``path`` under its conflict name: ``await make(copy)``
        must create ``copy`` only where nothing has that name (an exclusive rename, a
        mkdir, a symlink). A name found taken (by another client's copy made in the same
        second, or anything else) is never replaced: the next name is tried,
        ``... CLIENT 2)``, ``... CLIENT 3)``. The copy's path."""
        parent, _, name = path.rpartition(b"/")
        when = self.clock()
        for n in range(1, CONFLICT_NAME_TRIES + 1):
            copy = join(parent, conflict_name(name, when, self.client, n))
            try:
                await make(copy)
                return copy
            except RemoteError as exc:
                # SFTP reports an existing name as a plain failure: look before giving up
                if exc.errno != errno.EEXIST and await self._stat(copy) is None:
                    raise
                log.info("conflict name %r is taken: trying another", copy)
        raise RemoteError(errno.EEXIST, f"no free conflict name for {name!r} "
                                        f"after {CONFLICT_NAME_TRIES} tries")

    async def _rename_exclusive(self, src: bytes, dst: bytes) -> None:
        """Rename ``src`` to ``dst`` unless ``dst`` exists (``RemoteError(EEXIST)``). A
        server whose exclusive rename fails for another reason (OpenSSH's link() on a file
        system without hard links may) gets a plain rename once ``dst`` is seen absent."""
        try:
            await self.conn.call(self.remote.rename_noreplace, src, dst)
            return
        except RemoteError as exc:
            if exc.errno == errno.EEXIST:
                raise
            if await self._stat(dst) is not None:
                raise RemoteError(errno.EEXIST, "rename: the target exists") from exc
            if await self._stat(src) is None:
                raise
            log.debug("exclusive rename of %r refused (%s): a plain rename", src, exc)
        await self.conn.call(self.remote.rename, src, dst)

    async def _upload(self, node: Node, path: bytes, seq: int) -> RemoteStat:
        temp = self._temp_name(path, seq)
        digest = self._sum_of(node)
        if digest is None:
            raise ContentDamaged(f"no checksum of inode {node.ino}'s content was recorded")
        return await self.conn.call(self.transfers.upload, node.size, path, self.store.content_path(node.ino),
                                    stat_mod.S_IMODE(node.mode), temp, node.atime_ns, node.mtime_ns,
                                    digest, bulk=True)

    # -- one operation ----------------------------------------------------------------------
    async def _replay(self, op: Op) -> int:
        """Apply one journaled operation to the remote; bytes sent."""
        log.debug("replay %d %s %r%s", op.seq, op.kind, op.path, f" -> {op.dst!r}" if op.dst else "")
        handler = getattr(self, f"_replay_{op.kind}")
        try:
            return await handler(op)
        except ContentDamaged as exc:  # (an upload beside the replay's own: a relink's copy)
            return await self._damaged(op, str(exc))

    async def _replay_create(self, op: Op) -> int:
        return await self._replay_content(op, created=True)

    async def _replay_store(self, op: Op) -> int:
        return await self._replay_content(op, created=False)

    async def _replay_content(self, op: Op, created: bool) -> int:
        node = self.store.get(op.ino)
        if node is None or node.has(ORPHAN):
            if created:
                self._gone.add(op.ino)
            self._finish(op)
            return 0
        if node.gen == node.synced_gen and not created:
            self._finish(op)  # an earlier operation already uploaded this content
            return 0
        digest = self._sum_of(node)
        if digest is None:
            # Released since the last checkpoint: commit it now rather than wait for one.
            await self.cache.commit_changes()
            node = self.store.get(op.ino)
            if node is None or node.has(ORPHAN):
                return await self._replay_content(op, created)
            if self.cache.writers.get(op.ino):
                raise ChangedWhileSent(f"{op.path!r} was opened for writing again: sent at its release")
            digest = self._sum_of(node)
            if digest is None:
                return await self._damaged(op, "no checksum of its content was recorded when it was "
                                               "written (its content file was short or gone then)")
        gen = node.gen
        try:
            return await self._replay_checked(op, node, gen, digest, created)
        except (ContentDamaged, LocalGone) as exc:
            now = self.store.get(op.ino)
            if now is None or now.has(ORPHAN):
                if created:
                    self._gone.add(op.ino)
                self._finish(op)  # deleted here meanwhile: its unlink follows in the journal
                return 0
            if now.gen != gen:
                raise ChangedWhileSent(f"{op.path!r} was written while it was uploaded: "
                                        "sent again at the next pass") from exc
            reason = "its content file is gone" if isinstance(exc, LocalGone) else str(exc)
            return await self._damaged(op, reason)

    async def _replay_checked(self, op: Op, node: Node, gen: int, digest: bytes, created: bool) -> int:
        """``_replay_content`` of content whose checksum is ``digest``: every upload of it
        is checked against it as it is sent (``ContentDamaged``, ``LocalGone``)."""
        conflict = None
        # Was an upload of this entry started before (a crash or a cut connection since)?
        # Then (size, mtime) of what it was sending.
        earlier = self.store.upload_mark(op.seq)
        theirs = self._their_sums.pop(op.seq, None)
        if theirs is not None and not created:
            # The server hashed the file before this batch: another hash than the base
            # version's is a change there, even one that kept the size and mtime second.
            base = self.store.base_sum(op.ino)
            if base is not None and base.version == node.base and theirs != base.digest:
                remote = await self._stat(op.path)
                if remote is not None and remote.version() == node.base:
                    if theirs == digest:  # (our content already: an upload that landed)
                        await self._landed(op, node, remote, gen)
                        return 0
                    log.info("%r changed on the server although its size and mtime second did "
                             "not: keeping both versions", op.path)
                    self.store.transact(lambda t: t.drop_base_sum(op.ino))
                    return await self._keep_both(op, node, remote, gen)
        # The common case in one job: the remote is as expected, upload.
        self.store.transact(lambda t: t.mark_upload(op.seq, node.size, node.mtime_ns))
        try:
            outcome, found = await self.conn.call(
                self.transfers.upload_unless_changed, created, node.base, node.size, op.path,
                self.store.content_path(node.ino), stat_mod.S_IMODE(node.mode),
                self._temp_name(op.path, op.seq), node.atime_ns, node.mtime_ns, digest, bulk=True)
        except RemoteError as exc:
            if exc.errno != errno.ENOENT:
                raise
            outcome, found = "gone", None  # a folder above is missing: the slow path
        if outcome == "uploaded":
            await self._landed(op, node, found, gen)
            return node.size
        remote = found if outcome == "changed" else await self._stat(op.path)
        if remote is None:
            if not created and node.base is not None:
                conflict = self._record(op, "deleted-remote-changed-local")
        elif created or remote.version() != node.base:
            # ``ours``: an earlier upload of this entry was under way when a crash or a cut
            # connection stopped it, and it had landed (its size and mtime are there).
            ours = earlier is not None and stat_mod.S_ISREG(remote.mode) \
                and remote.size == earlier[0] and _same_second(remote.mtime_ns, earlier[1])
            # Our older upload is there but the file changed here since: send it again.
            resend = ours and (node.size != earlier[0] or not _same_second(node.mtime_ns, earlier[1]))
            if not resend:
                if ours or await self._same_content(node, op.path, remote):
                    await self._landed(op, node, remote, gen)
                    return 0
                return await self._keep_both(op, node, remote, gen)
        try:
            new = await self._upload(node, op.path, op.seq)
        except RemoteError as exc:
            if exc.errno != errno.ENOENT or not await self._make_parents(op.path):
                raise
            # Created here inside a folder that was removed there: re-create it.
            conflict = conflict or self._record(op, "folder-recreated")
            new = await self._upload(node, op.path, op.seq)
        await self._landed(op, node, new, gen, conflict)
        return node.size

    async def _landed(self, op: Op, node: Node, remote: RemoteStat, gen: int,
                      conflict: dict | None = None) -> None:
        """Our version ``gen`` of the file is on the remote under ``op.path`` as ``remote``:
        its other names there follow it, then the entry is done."""
        await self._relink(node, op, remote)
        self._finish(op, self._agree(op.ino, remote, gen), conflict)
        if op.kind == "store" and op.parent in self._timed_folders:
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
            await self.conn.call(self.remote.set_attrs, op.path.rpartition(b"/")[0],
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
        before = self._base(op.ino, node.base)
        for other in self.store.paths_of(node.ino):
            if other == op.path:
                continue
            try:
                await self._relink_one(node, op, other, before, now)
            except RemoteError as exc:
                # The upload itself landed: this name is left as the server has it.
                log.warning("could not relink %r to %r on the server: %s", other, op.path, exc)

    async def _relink_one(self, node: Node, op: Op, other: bytes, before: tuple[int, int, int] | None,
                          now: RemoteStat) -> None:
        remote = await self._stat(other)
        if remote is None or remote.version() == now.version():
            return
        if before is None or remote.version() != before:
            log.warning("not relinking %r to %r: it changed on the server", other, op.path)
            return
        folder, _, _ = other.rpartition(b"/")
        temp = join(folder, self._temp_name(other, op.seq))
        for attempt in range(2):
            try:
                await self.conn.call(self.remote.link, op.path, temp)
                break
            except RemoteError as exc:
                if exc.errno in (errno.EXDEV, errno.ENOTSUP, errno.EPERM, errno.EOPNOTSUPP):
                    await self._upload(node, other, op.seq)  # no hard links there: a copy
                    return
                if attempt:
                    raise
            # The temporary name may be left by an interrupted pass (SFTP v3 reports an
            # existing name as a plain failure): remove it and link once more.
            try:
                await self.conn.call(self.remote.unlink, temp)
            except RemoteError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        await self.conn.call(self.remote.rename, temp, other)

    def _agree(self, ino: int, remote: RemoteStat, gen: int | None) -> Callable[[Txn], None]:
        """An update that records ``remote`` as the node's base version."""
        return partial(Reconcile.agree, ino=ino, version=remote.version(), gen=gen)

    async def _keep_both(self, op: Op, node: Node, remote: RemoteStat, gen: int) -> int:
        """Changed on both sides: the remote keeps the name, ours goes beside it. Our
        version is uploaded under a temporary name of this cache's, then renamed to its
        conflict name without replacing anything there (another client's copy of the
        same file, made in the same second, keeps its name: ours takes the next)."""
        parent = op.path.rpartition(b"/")[0]
        temp = join(parent, self._temp_name(op.path, op.seq, b"copy") + b"-" + self._nonce.encode())
        copy_stat = await self._upload(node, temp, op.seq)
        try:
            copy = await self._aside(op.path, partial(self._rename_exclusive, temp))
        except RemoteError:
            with trio.move_on_after(self.conn.timeout * 2 + 1):
                try:
                    await self.conn.call(self.remote.unlink, temp)
                except (RemoteError, Unavailable) as exc:
                    log.debug("could not remove %r: %s", temp, exc)
            raise
        copy_name = copy.rpartition(b"/")[2]
        record = self._record(op, "changed-both", conflict_path=copy.decode("utf-8", "surrogateescape"),
                              local={"size": node.size, "mtime_ns": node.mtime_ns},
                              remote={"size": remote.size, "mtime_ns": remote.mtime_ns})
        # Our version, now the conflict copy, stays cached under its new name.
        kept = await self.reconcile.copy_content(op.ino, node.size)

        def update(t: Txn) -> None:
            kept.placed = False
            n = self.reconcile.unchanged(t, op, gen, "its conflict copy was made")
            if n is None:
                return
            self.reconcile.keep_conflict_copy(t, kept, n, op.parent, copy_name, copy_stat.version(), gen)
            self.reconcile.show_server_version(t, n, remote, gen)

        try:
            self._finish(op, update, record)
        finally:
            self.reconcile.discard(kept)  # (unless placed: the server's copy is fetched on use)
        self.cache.remote_changed(op.ino, parent_ino=op.parent)
        return node.size

    async def _damaged(self, op: Op, reason: str) -> int:
        """Our version failed its checksum (cut short, gone, other bytes than were written):
        it is never uploaded, and the server keeps its version, which the name shows from
        now on. What is left of ours stays here under ``NAME (damaged ...)``, local only
        (``DAMAGED``: kept by listings, never evicted, never uploaded as it is), and a
        ``damaged-local`` conflict record and the status's last error say so."""
        node = self.store.get(op.ino)
        if node is None or node.has(ORPHAN):
            self._finish(op)
            return 0
        gen = node.gen
        remote = await self._stat(op.path)
        if remote is not None and not stat_mod.S_ISREG(remote.mode):
            remote = None  # (the name is something else there now: the listing shows it)
        kept = await self.reconcile.copy_content(op.ino, node.size)  # (what is left of ours)
        left = kept.copied
        name: list[bytes] = []
        parent = node.parent

        def update(t: Txn) -> None:
            kept.placed = False
            name.clear()
            n = self.reconcile.unchanged(t, op, gen, "its damage was looked at")
            if n is None:
                return
            kept_as = self.reconcile.keep_damaged_copy(t, kept, n, time.time())
            if kept_as is not None:
                name.append(kept_as)
            if remote is not None:  # the name shows the server's version, fetched on use
                self.reconcile.drop_damaged(t, n, remote)

        try:
            folder = self.store.path_of(parent)
        except KeyError:
            folder = b""
        try:
            self.store.transact(update)
        finally:
            self.reconcile.discard(kept)
        copy_path = join(folder, name[0]) if name else None
        record = self._record(op, "damaged-local", error=reason,
                              conflict_path=copy_path.decode("utf-8", "surrogateescape") if copy_path else None,
                              local={"size": node.size, "left": left})
        log.error("the cache's copy of %r is damaged (%s): not uploaded, the server keeps its "
                  "version; %s", op.path, reason,
                  f"what is left of it ({left} of {node.size} bytes) is kept here only as {copy_path!r}"
                  if copy_path else "nothing of it is left")
        self._finish(op, conflict=record)
        if op.kind == "create":
            self._gone.add(op.ino)
        self.cache.remote_changed(op.ino, parent_ino=parent, moved_aside=remote is None)
        self._damaged_now.append(op.path.decode("utf-8", "surrogateescape"))
        return 0

    async def _replay_setattr(self, op: Op) -> int:
        node = self.store.get(op.ino)
        if node is None or node.has(ORPHAN):
            self._finish(op)
            return 0
        sent = (stat_mod.S_IMODE(node.mode), node.atime_ns, node.mtime_ns)
        try:
            await self.conn.call(self.remote.set_attrs, op.path, *sent)
        except RemoteError as exc:
            if exc.errno != errno.ENOENT:
                raise
            self._finish(op, conflict=self._record(op, "attributes-of-deleted"))
            return 0

        self._finish(op, partial(Reconcile.attributes_sent, op=op, sent=sent))
        if node.is_dir:
            if len(self._timed_folders) > 100_000:  # (a bound; only a folder time is at stake)
                self._timed_folders.clear()
            self._timed_folders.add(op.ino)
        return 0

    async def _replay_mkdir(self, op: Op) -> int:
        remote = await self._stat(op.path)
        if remote is not None and not stat_mod.S_ISDIR(remote.mode):
            return await self._rename_local_aside(op, remote)
        if remote is None:
            try:
                await self.conn.call(self.remote.mkdir, op.path, stat_mod.S_IMODE(op.mode) or 0o755)
            except RemoteError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                await self._make_parents(op.path)
                await self.conn.call(self.remote.mkdir, op.path, stat_mod.S_IMODE(op.mode) or 0o755)
            remote = await self._stat(op.path)
        self._finish(op, self._agree(op.ino, remote, None) if remote else None)
        return 0

    async def _rename_local_aside(self, op: Op, remote: RemoteStat) -> int:
        """A folder or symlink made here collides with another kind of object there:
        ours is created under a conflict name."""
        async def make(copy: bytes) -> None:  # (both refuse a name that exists)
            if op.kind == "mkdir":
                await self.conn.call(self.remote.mkdir, copy, stat_mod.S_IMODE(op.mode) or 0o755)
            else:
                await self.conn.call(self.remote.symlink, op.target, copy)

        copy = await self._aside(op.path, make)
        self._finish(op, conflict=self._record(op, "created-both",
                                               conflict_path=copy.decode("utf-8", "surrogateescape")))
        self.cache.remote_changed(op.ino, parent_ino=op.parent, moved_aside=True)
        return 0

    async def _replay_symlink(self, op: Op) -> int:
        remote = await self._stat(op.path)
        if remote is not None:
            if stat_mod.S_ISLNK(remote.mode):
                target = await self.conn.call(self.remote.readlink, op.path)
                if target == op.target:
                    self._finish(op, self._agree(op.ino, remote, None))
                    return 0
            return await self._rename_local_aside(op, remote)
        await self._make_parents(op.path)
        await self.conn.call(self.remote.symlink, op.target, op.path)
        remote = await self._stat(op.path)
        self._finish(op, self._agree(op.ino, remote, None) if remote else None)
        return 0

    async def _replay_link(self, op: Op) -> int:
        remote = await self._stat(op.dst)
        if remote is None:
            try:
                await self.conn.call(self.remote.link, op.path, op.dst)
            except RemoteError as exc:
                if exc.errno != errno.ENOENT or not self._gone_here(op.ino):
                    raise
                # The source never reached the remote and is deleted here: nothing to link.
        self._finish(op)
        return 0

    def _gone_here(self, ino: int) -> bool:
        node = self.store.get(ino)
        return node is None or node.has(ORPHAN)

    def _base(self, ino: int, recorded: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        """The version a journal entry should expect: what the replay itself produced for
        that node, if it did, else what was recorded with the entry."""
        return self.store.produced(ino) or recorded

    async def _replay_unlink(self, op: Op) -> int:
        remote = await self._stat(op.path)
        if remote is None:
            self._finish(op)
            return 0
        base = self._base(op.ino, op.base)
        if base is not None and remote.version() != base:
            # Deleted here, changed there: the changed version survives.
            self._finish(op, conflict=self._record(op, "deleted-local-changed-remote"))
            return 0
        if stat_mod.S_ISDIR(remote.mode):
            return await self._replay_rmdir(op)
        await self.conn.call(self.remote.unlink, op.path)
        self._finish(op)
        return 0

    async def _replay_rmdir(self, op: Op) -> int:
        remote = await self._stat(op.path)
        if remote is None:
            self._finish(op)
            return 0
        try:
            await self.conn.call(self.remote.rmdir, op.path)
        except RemoteError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) or exc.errno == errno.EIO:
                # New entries appeared there: nothing that changed there is deleted.
                entries = await self.conn.call(self.remote.listdir, op.path)
                if entries:
                    self._finish(op, conflict=self._record(op, "folder-not-empty-remote"))
                    return 0
            raise
        self._finish(op)
        return 0

    async def _replay_rename(self, op: Op) -> int:
        src = await self._stat(op.path)
        dst = await self._stat(op.dst)
        if src is None:
            # Already moved (a crash after the rename), or moved/deleted there.
            if dst is None and self._gone_here(op.ino):
                self._finish(op)  # never reached the remote, and deleted here since
            elif dst is None:
                self._finish(op, conflict=self._record(op, "renamed-missing-remote"))
            else:
                self._finish(op)
            return 0
        conflict = None
        replaced_base = self._base(op.replaced, op.replaced_base) if op.replaced else None
        await self._make_parents(op.dst)
        taken = dst is not None and (replaced_base is None or dst.version() != replaced_base)
        if not taken:
            try:
                if dst is None:  # nothing there: nothing that appears meanwhile is replaced
                    await self._rename_exclusive(op.path, op.dst)
                else:  # replacing the object we knew there
                    await self.conn.call(self.remote.rename, op.path, op.dst)
            except RemoteError as exc:
                if exc.errno != errno.EEXIST:
                    raise
                taken = True  # the name appeared there meanwhile
        if taken:
            # A name that appeared there (or changed there): ours becomes a conflict copy.
            target = await self._aside(op.dst, partial(self._rename_exclusive, op.path))
            conflict = self._record(op, "renamed-onto-new-remote",
                                    conflict_path=target.decode("utf-8", "surrogateescape"))
        self._finish(op, conflict=conflict)
        if conflict is not None:
            self.cache.remote_changed(op.ino, parent_ino=op.dst_parent, moved_aside=True)
        return 0


#: operations that change one object (and, for mkdir, add its name to its folder); the
#: others (link, unlink, rmdir, rename, symlink) run alone, between the runs of these
_INDEPENDENT = {"create", "store", "setattr", "mkdir"}


def _batches(ops: list[Op], width: int):
    """Journal order, cut into groups that may run concurrently, at most ``width`` each.

    Every namespace change but mkdir runs alone (a barrier). Between two barriers, an
    operation goes one layer after the last one it depends on: the last about the same
    object, the last about its folder (a folder is made before what goes in it, and its
    times are set after, as the journal had them), and, for a folder, the last about
    anything in it. A copied tree thus replays ``width`` files at a time (creates in one
    layer, the ``setattr`` that gave each the original's mode in the next) instead of
    one folder or two entries at a time."""
    run: list[Op] = []
    for op in ops:
        if op.kind in _INDEPENDENT:
            run.append(op)
            continue
        yield from _layers(run, width)
        run = []
        yield [op]
    yield from _layers(run, width)


def _until_barrier(batches: list[list[Op]], at: int) -> list[list[Op]]:
    """The batches from ``at`` on, up to the next one that changes names (a rename, link,
    unlink, ...): a hash the server gives of a path before such a change may be of
    another file than the one there when the ``store`` entry after it is replayed (a
    rename onto that name in the same pass made a false conflict)."""
    out = [batches[at]]
    for batch in batches[at + 1:]:
        if any(op.kind not in _INDEPENDENT for op in batch):
            break
        out.append(batch)
    return out


def _layers(run: list[Op], width: int):
    layers: list[list[Op]] = []
    last: dict[int, int] = {}  # object -> layer of the latest operation about it
    inner: dict[int, int] = {}  # folder -> layer of the latest operation on something in it
    for op in run:
        layer = 1 + max(last.get(op.ino, -1), last.get(op.parent, -1), inner.get(op.ino, -1))
        last[op.ino] = layer
        inner[op.parent] = max(inner.get(op.parent, -1), layer)
        if layer == len(layers):
            layers.append([])
        layers[layer].append(op)
    for layer in layers:
        for start in range(0, len(layer), width):
            yield layer[start:start + width]


def _temp_name(path: bytes, seq: int, client: str, kind: bytes = b"tmp") -> bytes:
    """An upload's temporary name beside its target, ``.NAME.cachefs-tmp-SEQ-CLIENT``: the
    cache's tag keeps two caches that replay the same file with the same sequence number
    from writing into one temporary file (the two versions mixed, or one rename finding
    the file gone)."""
    return (b"." + _cut(path.rsplit(b"/", 1)[-1], 160) + b".cachefs-" + kind + b"-"
            + f"{seq}-{client[-40:]}".encode())


def _read_content(content, content_path: str, size: int) -> bytes:
    fd = os.open(content_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with content.reader(fd, size) as stream:
            return stream.read(size)
    finally:
        os.close(fd)

