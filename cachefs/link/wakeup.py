"""``Wakeup``: changes wait to be reconciled. The cache pokes it when it journals a change
or a writer lets go of a file, the link when it comes back online; the sync manager waits
on it. Built by the daemon and handed to the cache and the sync manager; the sync manager
subscribes it to the link's comebacks (``Connectivity.on_online``).
Owns only a counter and a trio event; knows nothing of what changed."""

from __future__ import annotations

import trio


class Wakeup:
    def __init__(self) -> None:
        #: pokes so far: a waiter that settles a burst compares two readings
        self.pokes = 0
        self._event = trio.Event()

    def poke(self) -> None:
        """Something changed: reconcile soon. Safe from any trio task; not from a thread."""
        self.pokes += 1
        self._event.set()

    async def wait(self) -> None:
        """Until the next poke (returns at once when one came since the last ``clear``)."""
        await self._event.wait()

    def clear(self) -> None:
        self._event = trio.Event()
