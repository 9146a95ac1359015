"""The synchronization manager: the façade the daemon, control and the tests use over the
parts that replay the journal onto the remote (Coda's reintegration).

Owns: the parts and their wiring (built here from what the daemon hands over), the
entry points (``run``, ``full_pass``, ``request_sync``, ``reintegrate``,
``flush_at_unmount``, ``resolve``, ``poke``) and the status fields control reads.
Must not touch: FUSE; nodes, entries and content files (only through the cache's
``Reconcile`` operations and the store's journal operations). It is the only component
that changes the remote.

The parts, lowest first (each imports only those before it):
  naming, ordering, status   pure: conflict and temporary names; batches; what status shows
  remote_side                the replay's calls on the server (stat, mkdir -p, upload...)
  ledger                     an entry's end: journal delete + the node's update, one commit
  conflicts                  records, copies beside (keep both), refusals, ``resolve``
  sums                       the server's hashes asked for ahead of a batch
  content                    the replay of ``create``/``store``, damaged versions
  replay                     a pass: optimise, batches, each entry, namespace operations
  schedule                   when: write-back after a burst, reconnect, interval; pass lock

Lock/ordering: one trio thread. ``Schedule.pass_lock`` is held for a whole pass (the
replay's state is used under it only); a store write transaction never spans an await;
an entry leaves the journal in the transaction that records its node's new state, after
the remote change; content is copied and synced before a commit names it.

A conflict never loses a version: the remote keeps the name, the local version is
uploaded beside it as ``NAME (conflict YYYY-MM-DD HHMMSS HOST-ID).EXT``, a name nothing
has (see ``Conflicts.aside``).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import lmdb
import trio

from ..cache.cache import Cache
from ..cache.hoard import Hoard
from ..cache.transfer import Transfers
from ..defaults import DEFAULT_WRITEBACK_HOLD
from ..errors import RemoteError, SyncFailed, Unavailable
from ..link.connectivity import Connectivity, State
from ..link.wakeup import Wakeup
from ..progress import Progress
from ..remote import Remote
from ..store.crypto import RecordError
from ..store.index import Store, index_damaged
from .conflicts import Conflicts
from .content import ContentReplay
from .ledger import Ledger
from .naming import client_tag
from .remote_side import RemoteSide
from .replay import Replayer
from .schedule import Schedule
from .status import PassResult, SyncStatus, damage_note
from .sums import ServerSums

__all__ = ["SyncManager"]

log = logging.getLogger(__name__)


class SyncManager:
    def __init__(self, store: Store, cache: Cache, conn: Connectivity, hoard: Hoard | None = None, *,
                 writeback_delay: float = 0.2, writeback_hold: float = DEFAULT_WRITEBACK_HOLD,
                 interval: float = 300.0, flush_timeout: float = 30.0,
                 transfers: Transfers | None = None, wakeup: Wakeup | None = None) -> None:
        self.store = store
        self.cache = cache
        self._flushing: trio.CancelScope | None = None  # the replay of flush_at_unmount
        self.hoard = hoard or Hoard(cache)
        self.conn = conn
        self.remote: Remote = conn.remote
        self.flush_timeout = flush_timeout
        self.host = socket.gethostname().split(".")[0] or "host"
        #: what conflict copies and temporary names made by this cache carry
        self.client = client_tag(self.host, store.cache_id)
        #: rung by the cache (a change journaled, a writer gone) and the link (back online)
        self.wakeup = wakeup or Wakeup()
        self.schedule = Schedule(self.wakeup, writeback_delay, writeback_hold, interval)
        self.status = SyncStatus()
        #: the blocking upload jobs, run in a worker thread or handed on to a worker process
        side = RemoteSide(store, conn, transfers or Transfers.in_process(self.remote, store.content), self.client,
                          remote_owners=cache.config.owners == "remote")
        #: the store changes of the replay (a node and its content, written in one place)
        reconcile = cache.reconcile
        ledger = Ledger(store, cache)
        sums = ServerSums(store, side)
        self._conflicts = Conflicts(store, cache, side, ledger, reconcile)
        content = ContentReplay(store, cache, side, ledger, self._conflicts, sums, reconcile)
        self._replayer = Replayer(store, cache, side, ledger, self._conflicts, content, sums)
        self._ledger = ledger
        #: called with why a sync failed, or None once a pass completed (notifications)
        self._failure_listeners: list[Callable[[str | None], None]] = []
        conn.on_online(self.wakeup.poke)

    def on_conflict(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call ``callback(record)`` for each conflict recorded, once it is committed."""
        self._ledger.conflict_listeners.append(callback)

    def on_failure(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(reason)`` when a sync fails (a local error, a damaged journal
        entry or index, pinned folders not refreshed: not the link going away, which the
        link tells, nor a conflict), and ``callback(None)`` when a pass completes."""
        self._failure_listeners.append(callback)

    def _tell_failure(self, reason: str | None) -> None:
        for callback in self._failure_listeners:
            callback(reason)

    # -- status (control reads these) -------------------------------------------------------
    @property
    def syncing(self) -> bool:
        return self.status.syncing

    @property
    def last_sync(self) -> float | None:
        return self.status.last_sync

    @property
    def last_error(self) -> str | None:
        return self.status.last_error

    @property
    def progress(self) -> Progress:
        """The running (or last) pass's progress."""
        return self._replayer.progress

    @property
    def clock(self) -> Callable[[], float]:
        """The time a conflict copy's name shows."""
        return self._conflicts.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self._conflicts.clock = clock

    def pending(self) -> int:
        return self.store.count(self.store.journal)

    # -- triggers -------------------------------------------------------------------------
    def poke(self) -> None:
        """Something changed (journal append, release, reconnect): reconcile soon.
        Offline, changes only wait for the reconnect, which pokes again."""
        self.wakeup.poke()

    async def run(self) -> None:
        """Write-back after changes and on reconnect; a full pass on the schedule.
        Changes an earlier mount left pending are replayed as soon as this one is online
        (at once, or when the link comes back), not at the first full pass."""
        if self.pending():
            log.info("%d changes left pending by an earlier mount: replaying them once online",
                     self.pending())
            self.wakeup.poke()
        while True:
            scheduled = await self.schedule.next()
            if not self.conn.online:
                continue
            try:
                await self._triggered(scheduled)
            except SyncFailed as exc:
                log.info("scheduled sync incomplete: %s", exc)
            except (RecordError, lmdb.Error) as exc:  # a damaged index: one clear line
                self.status.last_error = index_damaged(self.store.dir, exc)
                log.error("%s", self.status.last_error)
                self._tell_failure(self.status.last_error)
                await trio.sleep(self.schedule.writeback_delay * 10)
            except Exception as exc:  # write-back must go on; the journal keeps the work
                log.exception("reconciliation pass failed")
                self._tell_failure(f"reconciliation pass failed: {type(exc).__name__}")
                await trio.sleep(self.schedule.writeback_delay * 10)

    async def _triggered(self, scheduled: bool) -> None:
        if scheduled:
            await self.full_pass()
            return
        await self.schedule.settle()
        if self.pending():
            await self.reintegrate()

    # -- passes -----------------------------------------------------------------------------
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
            raise SyncFailed(damage_note(result.damaged))
        try:
            await self.hoard.refresh()
        except Unavailable as exc:
            raise SyncFailed(f"remote is offline: {exc}", errno.EHOSTDOWN) from exc
        except RemoteError as exc:
            self._tell_failure(f"refreshing pinned folders failed: {exc}")
            raise SyncFailed(f"refreshing pinned folders failed: {exc}", exc.errno or errno.EIO) from exc
        self.status.last_sync = time.time()

    async def request_sync(self) -> None:
        """One full pass now (joining one under way); raises ``SyncFailed`` unless the
        journal is empty and the remote reachable afterwards."""
        await self.conn.try_connect()
        if self.conn.state is State.WORK_OFFLINE:
            raise SyncFailed("working offline by request ('cachefs online' or "
                             "'echo online > .cachefs/control' to reconnect)", errno.EHOSTDOWN)
        if not self.conn.online:
            raise SyncFailed(f"remote is offline: {self.conn.last_error or 'not reachable'}",
                             errno.EHOSTDOWN)
        await self.full_pass()
        self._conflicts.report_refusals()

    async def flush_at_unmount(self) -> None:
        """Like SyncMgr's sync at logoff: drain the journal, bounded by a timeout."""
        if self.flush_timeout <= 0 or not self.pending() or not await self.conn.try_connect():
            return  # (0: --sync-at-unmount 0, changes left for the next mount)
        log.info("unmounting: replaying %d pending changes (at most %g s)",
                 self.pending(), self.flush_timeout)
        try:
            with trio.move_on_after(self.flush_timeout) as self._flushing:
                await self.reintegrate()
        finally:
            self._flushing = None
        if self.pending():
            log.warning("%d changes still pending: they will be replayed by the next mount",
                        self.pending())

    def cut_flush_short(self) -> None:
        """End the replay of ``flush_at_unmount`` now, if one runs (a second signal: the
        changes left stay journaled for the next mount)."""
        if self._flushing is not None:
            self._flushing.cancel()

    async def reintegrate(self) -> PassResult:
        """One replay of the journal; a request during a pass waits for it and runs next
        (so it sees every change made before it was asked)."""
        async with self.schedule.pass_lock:
            self.status.syncing = True
            try:
                result = await self._replayer.replay()
            finally:
                self.status.syncing = False
            # (damaged files not uploaded stay in status while their record is kept)
            damaged = [r["path"] for r in self.conflicts() if r.get("kind") == "damaged-local"] \
                if result.complete else []
            self.status.after_pass(result, time.time(), damaged, self._conflicts.refusal_count)
            if result.failed or result.complete:
                self._tell_failure((result.reason or "reconciliation did not complete") if result.failed else None)
            return result

    # -- conflicts ---------------------------------------------------------------------------
    def conflicts(self) -> list[dict[str, Any]]:
        return self._conflicts.records()

    async def resolve(self, path: bytes, keep: str) -> None:
        """Settle the conflicts recorded for ``path`` (the original or the copy's path):
        ``local`` keeps this machine's version under the name, ``remote`` the server's,
        ``both`` keeps both files as they are. The changes go through the journal."""
        await self._conflicts.resolve(path, keep)
        self.poke()
