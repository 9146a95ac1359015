"""Server callbacks (Coda's, in the form a plain SSH server allows): a watcher runs beside
the share and streams the paths that change there; while that stream is live, cached
listings and attributes are current until a change says otherwise, so nothing cached waits
for a look at the remote.

Owns: the watcher's life (started when the mount is online, started again after it ends,
given up on a server that cannot run one), whether callbacks are live and since when
(told to ``Listings.trust``), and the refresh of what each change touched: the folder
listed again in the background, then the kernel told to drop the names and attributes it
holds of it.
Must not touch: the index (``Listings`` applies listings), the remote other than starting
the watcher and reading its stream, the journal.

Concurrency: ``run`` is a task of the cache's nursery; the stream is read in a worker
thread (``Watch.read`` blocks for at most a second), and everything else runs on the trio
thread. One refresh task per folder at a time; a change told while it lists starts another
round (its listing may predate the change).

Staleness: with callbacks live, a change on the server reaches the mount in about one
round trip plus one listing. If the link dies silently, the stream says nothing until the
heartbeat notices (``--heartbeat`` + ``--timeout``): that long, cached data may be served
as it was, which is what an offline mount does anyway.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import trio

from ..errors import CacheError, NotFound, RemoteError, Unavailable
from ..link.connectivity import Connectivity
from ..remote import RemoteUnreachable, Watch, WatchEnded
from ..store.index import Store
from .common import Kernel
from .listing import Listings

log = logging.getLogger(__name__)

RETRY_FIRST, RETRY_MOST = 5.0, 300.0  # seconds before a watcher that ended is started again
READY_WITHIN = 120.0  # a watcher not ready by then is given up (a server that ignores it)
CLOSE_WITHIN = 2.0  # seconds given to stopping a watcher


class Callbacks:
    def __init__(self, store: Store, conn: Connectivity, listings: Listings, kernel: Kernel,
                 using: str = "auto") -> None:
        """``using``: "auto", "inotifywait", "python3", or "off"."""
        self.store = store
        self.conn = conn
        self.listings = listings
        self.kernel = kernel
        self.using = using
        self.live_since: float | None = None  # monotonic time the watcher was seen ready
        #: why there are no callbacks (``cachefs status``), None while they are live
        self.why_not: str | None = "not started" if using != "off" else "turned off (--callbacks off)"
        self.changes = 0  # changes told since the mount started
        self.went_live = False  # the last watcher started went live
        #: the live watcher tells only some changes (``Watch.complete`` False): not trusted
        self.partial = False
        self._pending: dict[int, set[bytes]] = {}  # folder -> names changed, not yet refreshed
        self._online = trio.Event()
        conn.on_online(lambda: self._online.set())

    @property
    def live(self) -> bool:
        return self.live_since is not None

    async def run(self) -> None:
        """Keep a watcher running while online. Runs until cancelled."""
        if self.using == "off":
            return
        wait = RETRY_FIRST
        async with trio.open_nursery() as nursery:
            while True:
                if not self.conn.online:
                    self._online = trio.Event()
                    if not self.conn.online:
                        await self._online.wait()
                reason, retry = await self._watch_once(nursery)
                self.why_not = reason
                if self.went_live:
                    wait = RETRY_FIRST  # (a watcher that ran: not a server that keeps failing)
                if retry:
                    log.info("callbacks: %s; checks by time, a watcher again in %g s", reason, wait)
                    with trio.move_on_after(wait):
                        await self._went_offline()
                    wait = min(RETRY_MOST, wait * 2)
                else:
                    log.info("callbacks: %s; checks by time until the next reconnection", reason)
                    self._online = trio.Event()
                    await self._online.wait()  # (the next time the mount comes back online)
                    wait = RETRY_FIRST

    async def _went_offline(self) -> None:
        while self.conn.online:
            await trio.sleep(1.0)

    async def _watch_once(self, nursery: trio.Nursery) -> tuple[str, bool]:
        """Start a watcher and follow it until it ends: why it ended, and whether to try again."""
        self.went_live = False
        try:
            watch = await trio.to_thread.run_sync(partial(self.conn.remote.watch, self.using),
                                                  abandon_on_cancel=True)
        except WatchEnded as exc:
            return str(exc), exc.retry
        except (RemoteUnreachable, RemoteError, OSError) as exc:
            return f"the watcher could not start: {exc}", True
        try:
            return await self._follow(watch, nursery)
        finally:
            self._distrust()
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_WITHIN):
                # (also at unmount: the watcher ends with its channel or pipe)
                await trio.to_thread.run_sync(watch.close, abandon_on_cancel=True)

    async def _follow(self, watch: Watch, nursery: trio.Nursery) -> tuple[str, bool]:
        started = time.monotonic()
        while True:
            try:
                changed = await trio.to_thread.run_sync(watch.read, 1.0, abandon_on_cancel=True)
            except WatchEnded as exc:
                return str(exc), exc.retry
            if not self.conn.online:
                return "the mount went offline", True
            if changed:
                self._told(changed, nursery)
            if watch.ready and self.live_since is None:
                self.went_live = True
                self.live_since = time.monotonic()
                self.why_not = None
                self.partial = not watch.complete
                if self.partial:
                    # Some changes go untold (Samba: disk changes below the folder watched):
                    # what is told is applied at once, the rest is still checked by time.
                    log.info("callbacks live, partial: the server tells changes made through it; "
                             "checks by time go on for the rest (%.1f s to watch the share)",
                             self.live_since - started)
                    continue
                self.listings.trust(self.live_since)
                # What was listed just before counts as current by time only: listed
                # again now, it stays current while the callbacks live, and its next use
                # costs no round trip (those worth it: ``Listings.listed_before``).
                for folder in self.listings.listed_before(self.live_since):
                    self._refresh_soon(folder, set(), nursery)
                log.info("callbacks live: the server tells each change (%.1f s to watch the share)",
                         self.live_since - started)
            elif not watch.started and time.monotonic() - started > self.conn.timeout:
                return "the server runs no commands (no word from the watcher)", False
            elif not watch.ready and time.monotonic() - started > READY_WITHIN:
                return f"the watcher was not ready within {READY_WITHIN:g} s", False

    def _distrust(self) -> None:
        if self.live_since is not None:
            log.info("callbacks ended: checks by time from now")
        self.live_since = None
        self.listings.trust(None)

    # -- changes ---------------------------------------------------------------------------
    def _told(self, paths: list[bytes], nursery: trio.Nursery) -> None:
        self.changes += len(paths)
        # (inotify tells a path at each write: one look per path and batch is enough)
        for folder, names in self.listings.changed_remotely(list(dict.fromkeys(paths))).items():
            self._refresh_soon(folder, names, nursery)

    def _refresh_soon(self, folder: int, names: set[bytes], nursery: trio.Nursery) -> None:
        pending = self._pending.get(folder)
        if pending is not None:
            pending.update(names)  # (its refresh goes round again)
            return
        self._pending[folder] = set(names)
        nursery.start_soon(self._refresh, folder)

    async def _refresh(self, folder: int) -> None:
        """List ``folder`` again and tell the kernel what of it to drop, until no change
        of it came in meanwhile."""
        try:
            while True:
                names = self._pending.get(folder)
                if names is None:
                    return
                self._pending[folder] = set()
                node = self.store.get(folder)
                if node is None or not node.is_dir:
                    return
                try:
                    await self.listings.list_again(node)
                except (Unavailable, RemoteError, NotFound, CacheError, KeyError) as exc:
                    # (KeyError: the folder went with its parent's refresh meanwhile)
                    log.debug("refresh of folder %d after a change: %s", folder, exc)
                for name in names:
                    self.kernel.invalidate_entry(folder, name)
                    child = self.store.child(folder, name)
                    if child is not None:
                        self.kernel.invalidate_inode(child.ino)
                self.kernel.invalidate_inode(folder)
                if not self._pending.get(folder):
                    return
        finally:
            self._pending.pop(folder, None)
