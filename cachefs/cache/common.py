"""What the cache's parts share: their configuration, the ``Kernel`` they tell of stale
data, the reserved control name, and small helpers.

Owns no state. Must not touch: anything above the cache (FUSE, sync), the remote.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

CONTROL_NAME = b".cachefs"  # hidden at the root: never listed from nor sent to the remote


@dataclass(frozen=True)
class CacheConfig:
    attr_timeout: float = 3.0  # seconds before open() revalidates attributes
    dir_timeout: float = 3.0  # seconds before a listing is fetched again
    chunk_size: int = 4 << 20  # unit of content fetches
    readahead: int = 8  # chunks fetched ahead of a sequential reader
    checkpoint_interval: float = 1.0
    passthrough: bool = True  # let the kernel read fully cached files itself, where it can


class Kernel:
    """What the cache asks of the kernel; ``cachefs.fs`` supplies the real one."""

    def invalidate_inode(self, ino: int) -> None:  # drop cached data and attributes
        pass

    def invalidate_entry(self, parent: int, name: bytes) -> None:  # drop a name lookup
        pass

    async def settled(self) -> None:
        """Return once every invalidation asked for so far has reached the kernel."""

    def backing_open(self, fd: int) -> int:
        """Register ``fd`` as a file the kernel reads and writes itself (FUSE passthrough):
        its backing id, or 0 when the kernel or pyfuse3 cannot."""
        return 0

    def backing_close(self, backing_id: int) -> None:
        pass

    @property
    def passthrough(self) -> bool:  # whether backing_open may succeed
        return False

    #: why backing_open cannot succeed, while it cannot (``cachefs status``)
    passthrough_off = "no FUSE mount"


def valid_name(name: bytes) -> bool:
    return bool(name) and name not in (b".", b"..") and b"/" not in name and b"\0" not in name \
        and len(name) <= 255


def decrement(table: dict[int, int], key: int) -> None:
    count = table.get(key, 0) - 1
    if count > 0:
        table[key] = count
    else:
        table.pop(key, None)


class Freshness:
    """ino -> when it was last found current on the remote (a listing, a revalidation).

    An entry older than ``ttl`` means the same as none, so the table is pruned of those
    whenever it has doubled since the last pruning: it holds at most about twice the
    entries marked within one ``ttl`` (plus 1,024), not one per node ever listed (that
    was ~70 MiB per million nodes). A pruning is one pass over the table, paid for by the
    inserts that doubled it."""

    __slots__ = ("ttl", "_at", "_prune_at")

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._at: dict[int, float] = {}
        self._prune_at = 1024

    def fresh(self, ino: int) -> bool:
        at = self._at.get(ino)
        return at is not None and time.monotonic() - at < self.ttl

    def mark(self, ino: int, now: float) -> None:
        self._at[ino] = now
        if len(self._at) > self._prune_at:
            self._prune()

    def mark_all(self, inos: list[int], now: float) -> None:
        at = self._at
        for ino in inos:
            at[ino] = now
        if len(at) > self._prune_at:
            self._prune()

    def drop(self, ino: int) -> None:
        self._at.pop(ino, None)

    def __len__(self) -> int:
        return len(self._at)

    def _prune(self) -> None:
        now, ttl = time.monotonic(), self.ttl
        self._at = {ino: at for ino, at in self._at.items() if now - at < ttl}
        self._prune_at = max(1024, 2 * len(self._at))
