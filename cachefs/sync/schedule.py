"""When to reconcile: write-back after a burst of changes, on reconnect, on a schedule.

Owns: the doorbell's reading (``Wakeup``: pokes from the cache and the link), the quiet
time that ends a burst and the longest a burst holds write-back back, the interval of
full passes, and the pass lock (one pass at a time).
Must not touch: the store, the remote, the journal (what a pass does is the replay's).
Lock/ordering: ``pass_lock`` is held for a whole pass; a request during a pass waits for
it and runs next (so it sees every change made before it was asked). Nothing else here
is shared: one ``run`` task reads the doorbell.
"""

from __future__ import annotations

import trio

from ..link.wakeup import Wakeup

#: how often a burst's end is looked for
SETTLE_STEP = 0.05


class Schedule:
    def __init__(self, wakeup: Wakeup, writeback_delay: float, writeback_hold: float,
                 interval: float) -> None:
        self.wakeup = wakeup
        self.writeback_delay = writeback_delay  # quiet time that ends a burst of changes
        self.writeback_hold = writeback_hold  # longest a burst holds write-back back
        self.interval = interval  # between full passes
        self.pass_lock = trio.Lock()

    async def next(self) -> bool:
        """Until a poke (False) or the interval's end (True: a scheduled full pass)."""
        scheduled = True
        with trio.move_on_after(self.interval):
            await self.wakeup.wait()
            scheduled = False
        self.wakeup.clear()
        return scheduled

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
