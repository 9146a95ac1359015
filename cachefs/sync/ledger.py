"""Settling journal entries: an entry leaves the journal in the one transaction that
records what its node now agrees with, and the cache hears of it after the commit.

Owns: ``finish`` (delete the entry and its upload mark, apply the cache's named update,
add a conflict record: one transaction), the nodes created here and deleted again before
their creation reached the server (``gone``), and the version an entry should expect of
its node (``expected_base``).
Must not touch: nodes, entries or content files (only the named operations of
``cache.reconcile`` handed in as ``update``), the remote.
Lock/ordering: ``finish`` commits before it calls ``cache.op_done`` (the cache drops its
local-truth marks for what the commit settled) and tells the conflict's listeners (the
daemon's notifications: they must not block); nothing here awaits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..cache.cache import Cache
from ..store.index import Store, Txn
from ..store.journal import Op
from ..store.records import Version

Update = Callable[[Txn], None]


class Ledger:
    def __init__(self, store: Store, cache: Cache) -> None:
        self.store = store
        self.cache = cache
        #: created here and deleted again before their creation reached the remote (kept
        #: for the mount's life: inode numbers are never reused)
        self.gone: set[int] = set()
        #: called with each conflict record once it is committed
        self.conflict_listeners: list[Callable[[dict[str, Any]], None]] = []

    def finish(self, op: Op, update: Update | None = None, conflict: dict[str, Any] | None = None) -> None:
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
        if conflict is not None:
            for listener in self.conflict_listeners:
                listener(conflict)

    def expected_base(self, ino: int, recorded: Version | None) -> Version | None:
        """The version a journal entry should expect: what the replay itself produced for
        that node, if it did, else what was recorded with the entry."""
        return self.store.produced(ino) or recorded
