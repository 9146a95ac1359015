"""The uploads and attribute changes of one batch of the replay, sent together
(pipelined replay).

Owns: an ``UploadGroup``: the content and ``setattr`` entries of a batch hand in their
upload (``submit``) or their attributes (``submit_attrs``), or say they have none
(``leave``); once every one of them has done either, the attributes go in one request
of all (``Remote.set_attrs_many``: one round trip), and
the uploads are marked in the store in one transaction (``mark_upload``, before
anything is sent, so that after a crash a landed upload is recognised) and sent as a few
jobs side by side over the connections (``Transfers.upload_many_unless_changed``: small
files many to a job, in a few round trips for the lot; a large file a job of its own);
each entry gets its own outcome and goes on with it as if it had been sent alone.
Must not touch: nodes, entries, content files, the journal (each entry's end is its own,
``Ledger.finish``, after its outcome).
Lock/ordering: used by one batch of one pass (the pass lock); every member submits at
most once and leaves once (``ContentReplay.replay``'s ``finally``); nothing here is
shared with another batch. A member that waits for the group waits only for members of
its own batch, which wait for nothing of its.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from ..remote.base import AttrsItem
from ..remote.sftp import SMALL_UPLOAD
from ..store.index import Store, Txn
from ..store.journal import Op
from .remote_side import RemoteSide

log = logging.getLogger(__name__)

#: small files (up to ``SMALL_UPLOAD``) in one job, and their most bytes: one connection
#: sends them in three round trips, within its write window
GROUP_FILES = 128
GROUP_BYTES = 8 << 20


@dataclass
class _Item:
    op: Op
    size: int
    mtime_ns: int
    args: tuple[Any, ...]  # upload_many_unless_changed's item
    done: trio.Event = field(default_factory=trio.Event)
    outcome: Any = None
    error: BaseException | None = None


@dataclass
class _Attrs:
    op: Op
    sent: AttrsItem  # (path, mode, atime_ns, mtime_ns, owner or None)
    done: trio.Event = field(default_factory=trio.Event)
    outcome: Any = None
    error: BaseException | None = None


class UploadGroup:
    def __init__(self, store: Store, side: RemoteSide, members: set[int]) -> None:
        self.store = store
        self.side = side
        self._waiting = set(members)  # seqs that have neither submitted nor left
        self._items: list[_Item] = []
        self._attrs: list[_Attrs] = []
        self._all_in = trio.Event()
        if not self._waiting:
            self._all_in.set()

    def expects(self, seq: int) -> bool:
        """Whether the entry ``seq`` may still hand its upload in."""
        return seq in self._waiting

    def leave(self, seq: int) -> None:
        """The entry ``seq`` has no (more) upload for this group."""
        self._waiting.discard(seq)
        if not self._waiting:
            self._all_in.set()

    async def submit(self, op: Op, size: int, mtime_ns: int, args: tuple[Any, ...]) -> Any:
        """The outcome of this entry's ``upload_unless_changed`` (``args``: its item), sent
        with the others of the batch; its error raised as it would be alone."""
        item = _Item(op, size, mtime_ns, args)
        self._items.append(item)
        self.leave(op.seq)
        await item.done.wait()
        if item.error is not None:
            raise item.error
        if isinstance(item.outcome, BaseException):
            raise item.outcome
        return item.outcome

    async def submit_attrs(self, op: Op, sent: AttrsItem) -> None:
        """``set_attrs`` of (path, mode, atime_ns, mtime_ns, owner), sent with the others of the
        batch; its error raised as it would be alone."""
        item = _Attrs(op, sent)
        self._attrs.append(item)
        self.leave(op.seq)
        await item.done.wait()
        for error in (item.error, item.outcome):
            if error is not None:
                raise error

    async def run(self) -> None:
        """Once every member is in: send the attributes; mark, then send the uploads;
        hand out the outcomes."""
        await self._all_in.wait()
        async with trio.open_nursery() as nursery:
            if self._attrs:
                nursery.start_soon(self._send_attrs, self._attrs)
            nursery.start_soon(self._send_uploads, self._items)
        self._items, self._attrs = [], []

    async def _send_attrs(self, items: list[_Attrs]) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("setting the attributes of %d objects at once", len(items))
        await _settle(items, lambda: self.side.conn.call(self.side.remote.set_attrs_many,
                                                         [item.sent for item in items]))

    async def _send_uploads(self, items: list[_Item]) -> None:
        if not items:
            return

        def mark(t: Txn) -> None:
            for item in items:
                t.mark_upload(item.op.seq, item.size, item.mtime_ns)

        try:
            self.store.transact(mark)
        except Exception as exc:  # (a full disk, a damaged index): each entry reports it
            for item in items:
                item.error = exc
                item.done.set()
            return
        jobs = self._jobs(items)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("uploading %d files in %d jobs", len(items), len(jobs))
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(self._send, job)

    def _jobs(self, items: list[_Item]) -> list[list[_Item]]:
        """A large file alone; the small ones spread over the connections for uploads,
        at most ``GROUP_FILES``/``GROUP_BYTES`` a job."""
        small = [item for item in items if item.size <= SMALL_UPLOAD]
        jobs = [[item] for item in items if item.size > SMALL_UPLOAD]
        if small:
            slots = max(1, int(self.side.conn.bulk_limiter.total_tokens))
            count = max(min(slots, math.ceil(len(small) / 8)), math.ceil(len(small) / GROUP_FILES),
                        math.ceil(sum(item.size for item in small) / GROUP_BYTES))
            jobs += [small[i::count] for i in range(count)]
        return jobs

    async def _send(self, job: list[_Item]) -> None:
        await _settle(job, lambda: self.side.conn.call(self.side.transfers.upload_many_unless_changed,
                                                       [item.args for item in job], bulk=True))


async def _settle(items: Sequence[_Item | _Attrs], call: Callable[[], Awaitable[list[Any]]]) -> None:
    """Each of ``items`` gets its outcome of ``call`` (one per item, in order), or the error
    that failed the whole call (offline, a refused job: each member raises it)."""
    try:
        outcomes = await call()
    except Exception as exc:
        for item in items:
            item.error = exc
    else:
        for item, outcome in zip(items, outcomes):
            item.outcome = outcome
    finally:
        for item in items:
            item.done.set()
