"""What the cache's parts share: their configuration, the ``Kernel`` they tell of stale
data, the reserved control name, and small helpers.

Owns no state. Must not touch: anything above the cache (FUSE, sync), the remote.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
    callbacks: str = "auto"  # the server's watcher: auto, inotifywait, python3, off
    #: whose files: "local" (the mounting user's, owners never sent) or "remote" (the
    #: server's; owners set here are replayed)
    owners: str = "local"


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

    def store(self, ino: int, data: bytes) -> None:
        """Put ``data`` into the kernel's page cache of ``ino`` from offset 0 (FUSE
        notify_store), so that reads of it ask nothing of this process (where it cannot,
        the reads come as before)."""

    @property
    def passthrough(self) -> bool:  # whether backing_open may succeed
        return False

    #: why backing_open cannot succeed, while it cannot (``cachefs status``)
    passthrough_off = "no FUSE mount"


#: (name, n) -> the n-th name a local-only object moves to when the server lists an object
#: under its name (the daemon gives ``sync.naming.conflict_name`` with the mount's client tag)
LocalCopyName = Callable[[bytes, int], bytes]


def local_copy_name(name: bytes, n: int) -> bytes:
    """``LocalCopyName`` when none is given (tests): ``NAME (local N)``."""
    return name[:240] + f" (local {n})".encode()


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

    Time-based by default: a mark older than ``ttl`` means the same as none. While the
    server's callbacks are live (``trusted_since`` set: the time the watcher was seen
    ready), every mark made since then stays fresh until a change voids it (``void``):
    the watcher tells each change. A mark of a listing that started before a void of the
    same node is not taken (the listing may predate the change).

    The table is pruned of marks that mean nothing any more whenever it has doubled since
    the last pruning: it holds about twice the entries marked within one ``ttl`` (plus
    1,024) or, with callbacks, those marked since they went live; not one per node ever
    listed (that was ~70 MiB per million nodes). A pruning is one pass over the table,
    paid for by the inserts that doubled it."""

    __slots__ = ("ttl", "trusted_since", "_at", "_prune_at", "_void", "_void_at")

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.trusted_since: float | None = None
        self._at: dict[int, float] = {}
        self._prune_at = 1024
        self._void: dict[int, float] = {}  # ino -> when a change voided its mark
        self._void_at = 4096  # pruned when it grows past this

    def fresh(self, ino: int) -> bool:
        at = self._at.get(ino)
        if at is None:
            return False
        since = self.trusted_since
        return (since is not None and at >= since) or time.monotonic() - at < self.ttl

    def trusted(self, ino: int) -> bool:
        """Fresh, and by the callbacks while they are live (not only by time: a mark
        from before they went live goes stale after ``ttl``)."""
        at = self._at.get(ino)
        if at is None:
            return False
        since = self.trusted_since
        return at >= since if since is not None else time.monotonic() - at < self.ttl

    def mark(self, ino: int, now: float) -> None:
        """Found current by a look at the remote that began at ``now``."""
        if self._void and self._void.get(ino, -1.0) >= now:
            return
        self._at[ino] = now
        if len(self._at) > self._prune_at:
            self._prune()

    def mark_all(self, inos: list[int], now: float) -> None:
        at = self._at
        if self._void:
            void = self._void
            for ino in inos:
                if void.get(ino, -1.0) < now:
                    at[ino] = now
        else:
            for ino in inos:
                at[ino] = now
        if len(at) > self._prune_at:
            self._prune()

    def drop(self, ino: int) -> None:
        self._at.pop(ino, None)

    def void(self, ino: int, now: float) -> None:
        """A change of ``ino`` was told at ``now``: marks from before it are not taken."""
        self._at.pop(ino, None)
        self._void[ino] = now
        if len(self._void) > self._void_at:
            # Kept only while a look begun before them may still be on its way.
            self._void = {i: at for i, at in self._void.items() if now - at < VOID_KEPT}
            self._void_at = max(4096, 2 * len(self._void))

    def trust(self, since: float | None) -> None:
        """Callbacks live from ``since`` on (None: they are not)."""
        self.trusted_since = since
        if since is None:
            self._void.clear()

    def current_before(self, since: float) -> list[int]:
        """The nodes marked before ``since`` that are still fresh by time, the latest
        marked last."""
        now, ttl = time.monotonic(), self.ttl
        return sorted((ino for ino, at in self._at.items() if at < since and now - at < ttl),
                      key=self._at.__getitem__)

    def __len__(self) -> int:
        return len(self._at)

    def _prune(self) -> None:
        now, ttl, since = time.monotonic(), self.ttl, self.trusted_since
        if since is None:
            self._at = {ino: at for ino, at in self._at.items() if now - at < ttl}
        else:
            self._at = {ino: at for ino, at in self._at.items() if now - at < ttl or at >= since}
        self._prune_at = max(1024, 2 * len(self._at))


#: how long a void is remembered (``Freshness.void``): longer than any listing may take
VOID_KEPT = 600.0
