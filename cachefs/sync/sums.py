"""The server's hashes of the files a pass is about to replace, asked for ahead in one call.

Owns: for the running pass, journal seq -> the SHA-256 the server computed for that
``store`` entry's file before its batch (``pop``), and which entries were looked at.
Must not touch: the store beyond reading (nodes, base sums), the journal, the cache.
Lock/ordering: used by one pass at a time (under the sync manager's pass lock); ``reset``
at the start of each. A hash is asked for only up to the next namespace change
(``ordering.until_barrier``): after a rename, a path may name another file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ..errors import RemoteError, Unavailable
from ..store.index import Store
from ..store.journal import Op
from .ordering import until_barrier
from .remote_side import RemoteSide

log = logging.getLogger(__name__)

#: ``store`` entries whose files the server hashes in one command, and the most bytes of
#: them: the command must end within the connection's timeout
HASH_AHEAD = 256
HASH_AHEAD_BYTES = 64 << 20


class ServerSums:
    def __init__(self, store: Store, side: RemoteSide) -> None:
        self.store = store
        self.side = side
        self._theirs: dict[int, bytes] = {}
        self._looked_at: set[int] = set()

    def reset(self) -> None:
        self._theirs, self._looked_at = {}, set()

    def pop(self, seq: int) -> bytes | None:
        """The server's hash of the file of ``store`` entry ``seq``, if it was had."""
        return self._theirs.pop(seq, None)

    async def before(self, batches: list[list[Op]], at: int) -> None:
        """Ask ahead when batch ``at`` has a ``store`` entry not looked at yet."""
        if any(op.kind == "store" and op.seq not in self._looked_at for op in batches[at]):
            await self.ask(op for later in until_barrier(batches, at) for op in later)

    async def ask(self, ops: Iterable[Op]) -> None:
        """For the next ``store`` entries (from a batch on, up to ``HASH_AHEAD`` of them)
        whose file's base version has a known hash: the hash of what the server has now,
        in one call (one exec of ``sha256sum`` over SSH for the lot: an exec costs a
        session on the server, 5-100 ms, more than the replay of a small file). A server
        change that kept the size and the mtime second shows as another hash than the
        base's (``ContentReplay``)."""
        if self.side.remote.can_hash is False:
            return
        wanted = self._wanted(ops)
        if not wanted:
            return
        try:
            digests = await self.side.conn.call(self.side.remote.hash_files, [op.path for op in wanted])
        except (RemoteError, Unavailable) as exc:  # (offline: the replay itself stops next)
            log.debug("server hashes not had: %s", exc)
            return
        self._theirs.update((op.seq, d) for op, d in zip(wanted, digests or []) if d is not None)

    def _wanted(self, ops: Iterable[Op]) -> list[Op]:
        """The entries to ask about, within ``HASH_AHEAD`` and ``HASH_AHEAD_BYTES``; every
        entry looked at (asked about or not worth it) is not looked at again."""
        wanted: list[Op] = []
        size = 0
        for op in ops:
            if op.kind != "store" or op.seq in self._looked_at:
                continue
            node = self.store.get(op.ino)
            if node is None or node.base is None or node.gen == node.synced_gen \
                    or node.base[0] > HASH_AHEAD_BYTES:
                self._looked_at.add(op.seq)
                continue
            if len(wanted) == HASH_AHEAD or (wanted and size + node.base[0] > HASH_AHEAD_BYTES):
                break
            self._looked_at.add(op.seq)
            found = self.store.base_sum(op.ino)
            if found is not None and found.version == node.base:
                wanted.append(op)
                size += node.base[0]
        return wanted
