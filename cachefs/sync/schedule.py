"""When to reconcile: write-back after a burst of changes, on reconnect, on a schedule.

Owns: the doorbell's reading (``Wakeup``: pokes from the cache and the link), the quiet
time that ends a burst and the longest a burst holds write-back back, the full passes'
schedule (every ``interval``; once at mount; once each time the mount has been idle for
``idle``: Sync Center's "at log on" and "when idle"), and the pass lock (one pass at a
time). Idleness is read from a counter the FUSE layer keeps anyway (handles opened) and
the doorbell's pokes, sampled here every ``IDLE_STEP`` at most: no request pays for it.
Must not touch: the store, the remote, the journal (what a pass does is the replay's).
Lock/ordering: ``pass_lock`` is held for a whole pass; a request during a pass waits for
it and runs next (so it sees every change made before it was asked). Nothing else here
is shared: one ``run`` task reads the doorbell.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..link.wakeup import Wakeup

log = logging.getLogger(__name__)

#: how often a burst's end is looked for
SETTLE_STEP = 0.05
#: how often the activity counter is read, at most (a quarter of ``idle`` when shorter)
IDLE_STEP = 1.0


class Schedule:
    def __init__(self, wakeup: Wakeup, writeback_delay: float, writeback_hold: float,
                 interval: float) -> None:
        self.wakeup = wakeup
        self.writeback_delay = writeback_delay  # quiet time that ends a burst of changes
        self.writeback_hold = writeback_hold  # longest a burst holds write-back back
        self.interval = interval  # between full passes
        self.pass_lock = trio.Lock()
        self._at_mount = False  # a full pass is due at once (the mount just started)
        self.idle: float | None = None  # a full pass after this long without activity
        self._activity: Callable[[], int] = lambda: 0
        self._active = (-1, 0.0, True)  # last reading, since when, its idle pass made

    def also_at(self, *, at_mount: bool = False, idle: float | None = None,
                activity: Callable[[], int] | None = None) -> None:
        """Full passes at mount (the first ``next``) and after ``idle`` seconds in which
        ``activity()`` (a count that grows with use) and the doorbell stayed still."""
        self._at_mount = at_mount
        self.idle = idle
        if activity is not None:
            self._activity = activity

    async def next(self) -> bool:
        """Until a poke (False) or a scheduled full pass (True): at mount, at the
        interval's end, or when idle."""
        if self._at_mount:
            self._at_mount = False
            log.info("sync at mount")
            return True
        scheduled = True
        with trio.move_on_after(self.interval):
            scheduled = await self._idle_or_poke()
        if scheduled:
            log.debug("scheduled sync")
        self.wakeup.clear()
        return scheduled

    async def _idle_or_poke(self) -> bool:
        """Until a poke (False), or until the mount has been idle for ``idle`` (True),
        once per idle spell; without ``idle``, until a poke."""
        if self.idle is None:
            await self.wakeup.wait()
            return False
        step = min(IDLE_STEP, self.idle / 4)
        while True:
            with trio.move_on_after(step):
                await self.wakeup.wait()
                return False
            if self._idle_now():
                log.info("sync when idle (nothing opened for %g s)", self.idle)
                return True

    def _idle_now(self) -> bool:
        """Whether an idle spell of ``idle`` seconds has just been reached (the first
        reading starts a spell: the mount's start counts as activity)."""
        assert self.idle is not None
        reading = self._activity() + self.wakeup.pokes
        seen, since, done = self._active
        now = trio.current_time()
        if reading != seen:
            self._active = (reading, now, False)
            return False
        if done or now - since < self.idle:
            return False
        self._active = (reading, since, True)
        return True

    async def settle(self) -> None:
        """Wait until changes stop coming for ``writeback_delay``, at most
        ``writeback_hold``: a burst (an untar, a build, a git commit) runs with the CPU to
        itself and is replayed as one batch, instead of every few files. The doorbell is
        read every ``SETTLE_STEP``, so the pass starts that soon after the quiet time
        (it started up to twice the quiet time after the last change)."""
        now = trio.current_time()
        deadline = now + self.writeback_hold
        quiet_since, seen = now, self.wakeup.pokes
        while True:
            if self.wakeup.pokes != seen:
                quiet_since, seen = now, self.wakeup.pokes
            left = min(quiet_since + self.writeback_delay, deadline) - now
            if left <= 0:
                return
            await trio.sleep(min(SETTLE_STEP, left))
            now = trio.current_time()
