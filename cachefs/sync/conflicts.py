"""Conflicts: a version changed on both sides is never lost, and the user settles it.

Owns: the conflict records' form (``record``), the making of our version beside the
server's under a conflict name nothing has (``aside``, ``keep_both``), the changes the
server refused for good since the last ``sync`` request (``refused``,
``report_refusals``), and ``resolve``. The clock a conflict name shows (``clock``) and
this mount's own mark on a copy's temporary name (``nonce``).
Must not touch: nodes, entries or content files (the cache's ``Reconcile`` operations do
that), the journal's order.
Lock/ordering: ``keep_both`` uploads and renames first (no transaction open), copies our
content second (``Reconcile.copy_content``: synced before any commit names it), and ends
the entry, names the copy and shows the server's version in one transaction last. A
``resolve`` goes through the cache's path API, hence through the journal, like any change.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import partial
from typing import Any

import trio

from ..cache.cache import Cache
from ..cache.reconcile import Reconcile
from ..errors import RemoteError, SyncFailed, Unavailable
from ..paths import join
from ..remote import RemoteStat
from ..store.index import Node, Store, Txn
from ..store.journal import Op
from ..store.records import Version
from ..store.xattrs import XattrSet
from .ledger import Ledger
from .naming import CONFLICT_KINDS, CONFLICT_NAME_TRIES, conflict_name
from .remote_side import RemoteSide

log = logging.getLogger(__name__)

Record = dict[str, Any]


def record(op: Op, kind: str, **details: Any) -> Record:
    """A conflict record about ``op`` (logged). A rename's record names its target too
    (``target``): every name a record names shows ``conflict`` in its state."""
    assert kind in CONFLICT_KINDS, kind
    found = {"kind": kind, "path": op.path.decode("utf-8", "surrogateescape"),
             "time": datetime.now().astimezone().isoformat(timespec="seconds"),
             "ino": op.ino, **details}
    if op.kind == "rename" and op.dst:
        found["target"] = op.dst.decode("utf-8", "surrogateescape")
    log.warning("conflict (%s) on %r", kind, op.path)
    return found


def _version(recorded: Any) -> Version | None:
    """The server's version a record keeps (``version``: JSON's list), or None (a record
    of an earlier release has none)."""
    if isinstance(recorded, list) and len(recorded) == 3 and all(type(v) is int for v in recorded):
        return (recorded[0], recorded[1], recorded[2])
    return None


def _text_path(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


class Conflicts:
    def __init__(self, store: Store, cache: Cache, side: RemoteSide, ledger: Ledger,
                 reconcile: Reconcile) -> None:
        self.store = store
        self.cache = cache
        self.side = side
        self.ledger = ledger
        self.reconcile = reconcile
        self.clock: Callable[[], float] = time.time  # the time a conflict copy's name shows
        #: this mount's own mark on the temporary name of a conflict copy (two caches of
        #: one id, a copied cache dir, must not write one temporary file either)
        self.nonce = os.urandom(2).hex()
        #: changes the remote refused for good (recorded as ``error`` conflicts) since the
        #: last ``sync`` request, which reports them: (path, error), the first few kept
        self._refusals: list[tuple[bytes, RemoteError]] = []
        self.refusal_count = 0

    def records(self) -> list[Record]:
        return self.store.conflict_records()

    # -- making copies on the server ----------------------------------------------------
    async def aside(self, path: bytes, make: Callable[[bytes], Awaitable[None]]) -> bytes:
        """Make our version of ``path`` under its conflict name: ``await make(copy)``
        must create ``copy`` only where nothing has that name (an exclusive rename, a
        mkdir, a symlink). A name found taken (by another client's copy made in the same
        second, or anything else) is never replaced: the next name is tried,
        ``... CLIENT 2)``, ``... CLIENT 3)``. The copy's path."""
        parent, _, name = path.rpartition(b"/")
        when = self.clock()
        for n in range(1, CONFLICT_NAME_TRIES + 1):
            copy = join(parent, conflict_name(name, when, self.side.client, n))
            try:
                await make(copy)
                return copy
            except RemoteError as exc:
                # SFTP reports an existing name as a plain failure: look before giving up
                if exc.errno != errno.EEXIST and await self.side.stat(copy) is None:
                    raise
                log.info("conflict name %r is taken: trying another", copy)
        raise RemoteError(errno.EEXIST, f"no free conflict name for {name!r} "
                                        f"after {CONFLICT_NAME_TRIES} tries")

    async def keep_both(self, op: Op, node: Node, remote: RemoteStat, gen: int) -> int:
        """Changed on both sides: the remote keeps the name, ours goes beside it. Our
        version is uploaded under a temporary name of this cache's, then renamed to its
        conflict name without replacing anything there (another client's copy of the
        same file, made in the same second, keeps its name: ours takes the next)."""
        copy, copy_stat, carried_set = await self._upload_aside(op, node)
        copy_name = copy.rpartition(b"/")[2]
        found = record(op, "changed-both", conflict_path=_text_path(copy),
                       local={"size": node.size, "mtime_ns": node.mtime_ns},
                       remote={"size": remote.size, "mtime_ns": remote.mtime_ns})
        # Our version, now the conflict copy, stays cached under its new name.
        kept = await self.reconcile.copy_content(op.ino, node.size)

        def update(t: Txn) -> None:
            kept.placed = False
            n = self.reconcile.unchanged(t, op, gen, "its conflict copy was made")
            if n is None:
                return
            self.reconcile.keep_conflict_copy(t, kept, n, op.parent, copy_name, copy_stat.version(), gen)
            # Carried: the copy has all of the record as it is now (none set meanwhile).
            carried = carried_set is not None and t.xattrs(n.ino) == carried_set
            self.reconcile.move_xattrs(t, kept, n.ino, carried)
            for later in t.ops_after(op.seq):
                if later.kind != "xattr" or later.ino != n.ino:
                    continue  # (the node's pending ones would change the server's version's)
                if carried:
                    t.delete_op(later.seq)
                elif kept.placed:  # (the copy holds the record: they go to it)
                    later.ino, later.path = kept.ino, copy
                    t.put_op(later.seq, later)
            self.reconcile.show_server_version(t, n, remote, gen)

        try:
            self.ledger.finish(op, update, found)
        finally:
            self.reconcile.discard(kept)  # (unless placed: the server's copy is fetched on use)
        self.cache.remote_changed(op.ino, parent_ino=op.parent)
        return node.size

    async def _upload_aside(self, op: Op, node: Node) -> tuple[bytes, RemoteStat, XattrSet | None]:
        """Our version uploaded to a temporary name, then renamed to a free conflict name
        (the temporary file removed again when none is had): the copy's path and stat,
        and the attributes it carries (``RemoteSide.carry_xattrs``)."""
        parent = op.path.rpartition(b"/")[0]
        temp = join(parent, self.side.temp_name(op.path, op.seq, b"copy") + b"-" + self.nonce.encode())
        copy_stat = await self.side.upload(node, temp, op.seq)
        try:
            carried = await self.side.carry_xattrs(node.ino, temp)
            copy = await self.aside(op.path, partial(self.side.rename_exclusive, temp))
        except RemoteError:
            with trio.move_on_after(self.side.conn.timeout * 2 + 1):
                try:
                    await self.side.conn.call(self.side.remote.unlink, temp)
                except (RemoteError, Unavailable) as exc:
                    log.debug("could not remove %r: %s", temp, exc)
            raise
        return copy, copy_stat, carried

    # -- refusals -------------------------------------------------------------------------
    def refused(self, op: Op, exc: RemoteError, kept: bool = True) -> None:
        """The remote refuses this change for good (permission, quota...): keep the local
        version, record it, and go on with the rest. ``kept``: the node is marked ``KEPT``
        (a listing does not replace it; not for an extended attribute, which leaves the
        node's other changes as they are)."""
        log.error("cannot replay %s %r: %s", op.kind, op.path, exc)
        details = {"xattr": op.xattr.decode("utf-8", "surrogateescape")} if op.kind == "xattr" else {}
        self.ledger.finish(op, partial(Reconcile.refused, ino=op.ino) if kept else None,
                           record(op, "error", error=str(exc), refused=op.kind, **details))
        self.refusal_count += 1
        if len(self._refusals) < 10:
            self._refusals.append((op.path, exc))

    def report_refusals(self) -> None:
        """``SyncFailed`` with the first refused change's errno when the remote refused a
        replayed change since the last request (by this pass or by a write-back pass
        before it): the journal is empty, yet not everything reached the server."""
        refusals, count = self._refusals, self.refusal_count
        if not count:
            return
        self._refusals, self.refusal_count = [], 0
        path, exc = refusals[0]
        more = f" and {count - 1} more" if count > 1 else ""
        raise SyncFailed(f"the remote refused {count} change{'s' if count > 1 else ''} (kept here, "
                         f"see 'cachefs conflicts'): {path.decode('utf-8', 'replace')}: {exc}{more}",
                         exc.errno or errno.EIO)

    # -- resolve --------------------------------------------------------------------------
    async def resolve(self, path: bytes, keep: str) -> None:
        """Settle the conflicts recorded for ``path`` (the original or the copy's path):
        ``local`` keeps this machine's version under the name, ``remote`` the server's,
        ``both`` keeps both files as they are. The changes go through the journal."""
        for found in self._records_about(_text_path(path), keep):
            original = found["path"].encode("utf-8", "surrogateescape")
            await self._settle(found, original, keep)
            self.store.delete_conflict(found["id"])
            self.cache.clear_conflict(original)

    def _records_about(self, text: str, keep: str) -> list[Record]:
        records = [r for r in self.records() if text in (r.get("path"), r.get("conflict_path"))]
        if not records:
            raise SyncFailed(f"no conflict recorded for {text!r}", errno.ENOENT)
        if keep == "local" and any(r["kind"] == "damaged-local" for r in records):
            raise SyncFailed(f"{text!r}: the local version failed its checksum and is kept here only; "
                             "copy what you keep of it to a name of your choice, which uploads it, "
                             "then resolve with 'remote' or 'both'", errno.EINVAL)
        return records

    async def _settle(self, found: Record, original: bytes, keep: str) -> None:
        """What ``keep`` means for one record: the copy renamed over the name or removed,
        the deletion done or undone, a refused change sent again or dropped."""
        copy = found.get("conflict_path")
        kind = found["kind"]
        if copy:
            copy_path = copy.encode("utf-8", "surrogateescape")
            if keep == "local":
                await self.cache.rename_path(copy_path, original)
            elif keep == "remote":
                await self.cache.unlink_path(copy_path)
        elif kind == "deleted-local-changed-remote" and keep == "local":
            await self.cache.unlink_path(original, server=(found.get("ino", 0), _version(found.get("version"))))
        elif kind == "deleted-remote-changed-local" and keep == "remote":
            await self.cache.unlink_path(original)
        elif kind == "error" and found.get("refused") == "xattr":  # (an attribute: by its name)
            self.cache.settle_xattr(original, found.get("xattr", "").encode("utf-8", "surrogateescape"),
                                    send_again=keep == "local", drop=keep == "remote")
        elif kind == "error":  # the version the server refused: send again, or drop it
            self.cache.settle_kept(original, found.get("refused", "store"), send_again=keep == "local",
                                   drop=keep == "remote")
