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
        itself and is replayed as one batch, instead of every few files."""
        deadline = trio.current_time() + self.writeback_hold
        while True:
            seen = self.wakeup.pokes
            await trio.sleep(max(0.0, min(self.writeback_delay, deadline - trio.current_time())))
            if self.wakeup.pokes == seen or trio.current_time() >= deadline:
                return
