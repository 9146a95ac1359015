"""The persistent store: one LMDB environment plus sparse content files.

Owns: the on-disk layout of the cache directory, the sub-databases and their keys, the
transactions (``Store.run_write``, ``Txn``: the named record operations every writer
uses), the map's growth, and the exclusive lock that keeps two mounts off one cache.
The records themselves are in ``records``, the checks made at open in ``opening``.
Must not touch: the network, trio, FUSE. All methods are short, synchronous and safe
to call from the trio thread; a write transaction begins and commits inside one method.

Layout of ``CACHE_DIR`` (mode 0700)::

    lock            flock()ed by the mount that uses the cache
    index/          the LMDB environment (data.mdb, lock.mdb)
    index-made      written once the index holds its first records: a cache that has
                    it (or has content files) and no index is damaged, never a new one
    data/<ino>      sparse content file of node <ino> (mode 0600)
    mount.log       the daemon's log when not in the foreground
    unmounted       what the last mount left pending as it ended, for ``cachefs unmount``
                    (written by the daemon through ``mounts.note_unmounted``)

Sub-databases (all keys big-endian so cursors iterate in numeric order):

    meta      b"schema" -> b"2"; b"next_ino" -> u64; b"remote" -> the address text;
              b"connected" -> b"1" once the remote was reached (the cache is usable offline);
              b"cache_id" -> 6 hex digits, random, made with the cache (names its conflict
              copies, so that two caches on one host never pick the same name);
              b"last_seq" -> u64, the highest journal sequence number ever given (numbers
              are never reused, so a mark kept by number never matches a newer entry);
              b"u:" + seq u64 -> JSON [[size, mtime_ns], ...], the marks of the uploads begun
              for that journal entry, oldest first (a retry that finds a remote of one's size
              and mtime knows that upload landed; each is kept, as a later upload cut before
              it landed leaves an earlier one's there; 16 at most, and only the landed
              one's and the next once the replay has found which landed; a cache of
              before keeps one, [size, mtime_ns]);
              b"v:" + ino u64 -> JSON [size, mtime_ns, kind], the remote version the replay
              itself produced for the node (later entries compare the remote with it);
              b"pinned" -> JSON list of the pinned roots' inode numbers (``cache.hoard``)
    nodes     ino u64 -> Node record (see ``Node``)
    entries   parent u64 + name -> child ino u64   (the directory tree; encrypted: a keyed
              hash of the name in the key, ino + name sealed in the value)
    ranges    ino u64 -> byte ranges of content present in data/<ino> (``ranges.encode``)
    journal   seq u64 -> operation (``journal.Op``): appended by the cache in the same
              transaction as the change it records; deleted, rewritten or followed up by the
              sync manager as it replays
    conflicts id u64 -> conflict record
    links     ino u64 + entry key -> b""   (the names of hard-linked files; may hold
              stale names, which readers check against entries)
    sums      ino u64 + b"c" -> the SHA-256 of a changed file's content as committed (at the
              checkpoint after its last writer's release): generation, size, digest; an
              upload is checked against it as it is sent (``ContentSum``)
              ino u64 + b"b" -> the SHA-256 of the remote version the file last agreed with
              (whole in the cache, or uploaded): that version and the digest, compared with
              a hash the server computes before an upload replaces it (``BaseSum``)
    xattrs    ino u64 -> the node's ``user.`` extended attributes, all in one record
              (``xattrs.XattrSet``: names and values sealed together, none in the key);
              deleted with the node, never by eviction (they may be on no server)

Every value but ``meta/schema`` is sealed by the codec with its key (``crypto``): a
CRC32 of key and value after the value in a plain cache, AES-GCM with the key as
associated data in an encrypted one. Every read checks it: a damaged record raises
``RecordError`` and is never used. Schema 1 (no checks) is upgraded at open.

Node records (``records.Node``) are ``struct`` packed with a leading record version so a
cache written by another release is refused with a clear message instead of being misread.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import json
import logging
import operator
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from ..paths import join
from . import crypto, journal, opening
from . import ranges as rangeset
from .crypto import RecordError
from .journal import Op
from .opening import PROBE_CRASHED, check_private_dir, probe_index
from .xattrs import XattrSet
from .records import (_U64, ATTR_DIRTY, CONFLICT, DAMAGED, DIRTY, FIRST_INO, FULL, INDEX_MARK, KEPT,
                      KERNEL_WRITES, LISTED, LOCAL_TRUTH, ORPHAN, OWNER_DIRTY, PINNED, ROOT_INO, SCHEMA, TARGET,
                      WRITING, BaseSum, ContentSum, Held, Node, StoreError, _key, _sum_key,
                      index_damaged)
from .records import LOCAL_ONLY

__all__ = ["ATTR_DIRTY", "CONFLICT", "DAMAGED", "DIRTY", "FIRST_INO", "FULL", "INDEX_MARK", "KEPT",
           "KERNEL_WRITES", "LISTED", "LOCAL_TRUTH", "ORPHAN", "OWNER_DIRTY", "PINNED", "ROOT_INO", "SCHEMA",
           "TARGET", "WRITING", "BaseSum", "ContentSum", "Held", "Node", "StoreError",
           "index_damaged", "PROBE_CRASHED", "check_private_dir", "probe_index",
           "Store", "Txn"]
__all__ += ["LOCAL_ONLY"]

T = TypeVar("T")

log = logging.getLogger(__name__)

_first = operator.itemgetter(0)


def _path_of(store: "Store", txn: lmdb.Transaction, ino: int) -> bytes:
    """The share-relative path of a node, walking up its parents; KeyError if one of
    them is gone."""
    parts: list[bytes] = []
    while ino != ROOT_INO:
        data = txn.get(_key(ino), db=store.nodes)
        if data is None:
            raise KeyError(ino)
        ino, name = Node.parent_and_name(ino, store._open_record(data, _key(ino), "node", ino))
        parts.append(name)
    return b"/".join(reversed(parts))


#: how long a lock held by someone else is waited for before the cache counts as in use: a
#: process that another thread of the lock's owner forks holds a copy of its descriptor
#: (and so the lock) for the instant until it execs, even after the owner let it go (seen
#: in one process that closes a store and opens it again while a watcher starts)
LOCK_WAIT = 0.5


def _lock_within(fd: int, seconds: float) -> bool:
    """Whether the exclusive lock on ``fd`` was taken within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


class Store:
    """The cache directory: index, content files, lock."""

    env: lmdb.Environment  # (opened by ``opening.open_environment``)

    def __init__(self, cache_dir: Path, remote_text: str, map_size: int = 32 << 20,
                 key: bytes | None = None) -> None:
        """``key``: the cache key of an encrypted cache (see ``crypto.open_key``)."""
        self.dir = cache_dir
        opening.check_private_dir(cache_dir)
        if key is None and (cache_dir / "crypt.json").exists():
            raise StoreError(f"the cache in {cache_dir} is encrypted: mount with --encrypt-cache")
        self.codec = crypto.SealedCodec(key) if key else crypto.PlainCodec()
        self.content = crypto.SealedContent(key) if key else crypto.PlainContent()
        self._lock_fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not _lock_within(self._lock_fd, LOCK_WAIT):
            os.close(self._lock_fd)
            raise StoreError(f"cache directory {cache_dir} is in use by another cachefs mount")
        try:
            self._open(cache_dir, remote_text, map_size)
        except (crypto.CryptoError, lmdb.Error, ValueError, TypeError, KeyError, struct.error) as exc:
            if self._env_open:
                self.env.close()
            os.close(self._lock_fd)
            if not isinstance(exc, crypto.CryptoError):
                raise StoreError(index_damaged(cache_dir, exc)) from exc
            raise StoreError(str(exc)) from exc
        except BaseException:
            if self._env_open:
                self.env.close()
            os.close(self._lock_fd)
            raise

    def _open(self, cache_dir: Path, remote_text: str, map_size: int) -> None:
        self._env_open = False
        self.writemap = True
        self._removals: list[int] = []
        self._after_commit: list[Callable[[], None]] = []
        #: this cache's short random id (``meta/cache_id``; set by ``opening.check_schema``)
        self.cache_id = ""
        #: bumped by every write transaction: what was read before is still true while
        #: it has not moved (``Cache`` keeps folder listings on that condition)
        self.generation = 0
        self.folder_generation: dict[int, int] = {}
        #: bumped when a conflict record is added or deleted (``Cache`` keeps the names
        #: the records name on that condition, for ``user.cachefs.state``)
        self.conflict_generation = 0
        #: ino -> size and times of a file being written, ahead of its record: every
        #: record read here (``_unpack``) shows them (see ``WRITING``)
        self.held: dict[int, Held] = {}
        self.data_dir = cache_dir / "data"
        self._data_prefix = f"{self.data_dir}/"
        self._once_indexed = opening.index_present(self)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        (cache_dir / "index").mkdir(mode=0o700, exist_ok=True)
        opening.open_environment(self, map_size)
        with self.env.begin() as txn:  # (the sub-databases are named in the main one)
            had = {bytes(name) for name, _value in txn.cursor()}
        self.meta = self.env.open_db(b"meta")
        self.nodes = self.env.open_db(b"nodes")
        self.entries = self.env.open_db(b"entries")
        self.ranges_db = self.env.open_db(b"ranges")
        self.journal = self.env.open_db(b"journal")
        self.conflicts = self.env.open_db(b"conflicts")
        #: the names of hard-linked files: _key(ino) + entry key -> b"" (may hold stale names;
        #: readers check them against ``entries``)
        self.links = self.env.open_db(b"links")
        #: content checksums (see the module's docstring, ``ContentSum``, ``BaseSum``)
        self.sums = self.env.open_db(b"sums")
        #: each node's extended attributes (``XattrSet``), one record per node
        self.xattrs = self.env.open_db(b"xattrs")
        #: sub-databases this open made (an older cache lacks some): taken away again when
        #: the cache is refused, which must leave it as it found it
        self._made_dbs = [db for name, db in ((b"links", self.links), (b"sums", self.sums),
                                              (b"xattrs", self.xattrs))
                          if name not in had]
        opening.check_schema(self, remote_text)
        dirty = opening.check_integrity(self)
        opening.fit_dirty_content(self, dirty)
        opening.mark_indexed(self)
        #: changed files with no checksum of their current content (the mount ended between
        #: their last write and its commit, or a cache older than checksums): the cache
        #: takes them as they are at its first commit (``Cache.commit_changes``)
        self.unsummed = [n.ino for n in dirty if not self.has_current_sum(n)]
        self.reserve()

    def _open_env(self, map_size: int) -> lmdb.Environment:
        return lmdb.open(str(self.dir / "index"), map_size=map_size, max_dbs=12, subdir=True,
                         sync=False, metasync=False, mode=0o600, readahead=False,
                         writemap=self.writemap)

    def _allocate_map(self, size: int) -> None:
        """Disk blocks for the index file's first ``size`` bytes (OSError if the disk
        has not that much room)."""
        fd = os.open(self.dir / "index" / "data.mdb", os.O_RDWR | os.O_CLOEXEC)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)

    def _grow_map(self, at_least: int) -> None:
        """Grow the map to ``at_least`` bytes, rounded up to a MiB (no transaction open)."""
        new = -(-at_least // (1 << 20)) << 20
        if self.writemap:
            try:
                self._allocate_map(new)
            except OSError as exc:
                raise OSError(errno.ENOSPC, f"the cache's disk is full ({self.dir}): the "
                              f"index cannot grow to {new >> 20} MiB ({exc.strerror})") from exc
        log.info("cache index: growing the map to %d MiB", new >> 20)
        self.env.set_mapsize(new)

    # -- record encoding (checked; sealed when the cache is encrypted) ---------------------
    # Every value is ``codec.seal(value, key)``: read back only through ``codec.open`` with
    # the same key, which raises ``RecordError`` for a record damaged in value or key. A
    # new sub-database must do the same, and ``opening.check_integrity`` read it.
    def _open_record(self, data: bytes, key: bytes, what: str, which: object) -> bytes:
        try:
            return self.codec.open(data, key)
        except RecordError as exc:
            raise RecordError(f"{what} {which!r} {exc}") from None

    def _pack(self, node: Node) -> bytes:
        if self.held:  # (a record written now carries a held file's latest size and times)
            held = self.held.get(node.ino)
            if held is not None:
                held.size, held.mtime_ns, held.ctime_ns = node.size, node.mtime_ns, node.ctime_ns
        return self.codec.seal(node.pack(), _U64.pack(node.ino))

    def _unpack(self, ino: int, data: bytes) -> Node:
        try:
            body = self.codec.open(data, _U64.pack(ino))
        except RecordError as exc:
            raise RecordError(f"node {ino} {exc}") from None
        node = Node.unpack(ino, body)
        if self.held:
            held = self.held.get(ino)
            if held is not None:
                node.size, node.mtime_ns, node.ctime_ns = held.size, held.mtime_ns, held.ctime_ns
        return node

    def _ekey(self, parent: int, name: bytes) -> bytes:
        return _U64.pack(parent) + self.codec.name_key(name)

    def _evalue(self, ekey: bytes, ino: int, name: bytes) -> bytes:
        # Plain: the name is the key's tail. Sealed: the key holds a keyed hash of the
        # name, so the name itself travels sealed in the value. Checked with the key.
        return self.codec.seal(_U64.pack(ino) + (name if self.codec.encrypted else b""), ekey)

    def _entry(self, key: bytes, value: bytes) -> tuple[bytes, int]:
        """(name, child ino) of a folder entry, checked."""
        try:
            body = self.codec.open(value, key)
        except RecordError as exc:
            raise RecordError(f"folder entry {_U64.unpack(key[:8])[0]}/{bytes(key[8:])!r} {exc}") from None
        if len(body) < 8:
            raise RecordError(f"folder entry {_U64.unpack(key[:8])[0]}/{bytes(key[8:])!r} is cut short")
        return (body[8:] if self.codec.encrypted else bytes(key[8:])), _U64.unpack_from(body)[0]

    def _entry_ino(self, key: bytes, value: bytes) -> int:
        return self._entry(key, value)[1]

    def _op(self, key: bytes, value: bytes) -> Op:
        seq = journal.seq_of(key)
        try:
            return Op.decode(seq, self.codec.open(value, key))
        except RecordError as exc:
            raise RecordError(f"journal entry {seq} {exc}") from None

    def _meta_get(self, txn: lmdb.Transaction, key: bytes) -> bytes | None:
        data = txn.get(key, db=self.meta)
        return None if data is None else self._open_record(data, key, "meta", key)

    def _meta_put(self, txn: lmdb.Transaction, key: bytes, value: bytes) -> None:
        txn.put(key, self.codec.seal(value, key), db=self.meta)

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()
        os.close(self._lock_fd)

    def run_write(self, fn: Callable[[lmdb.Transaction], T],
                  folders: Callable[[], set[int] | None] | None = None) -> T:
        """Run ``fn(txn)`` in one write transaction, growing the map once if it is full.

        Content files that the transaction removes (``remove_after_commit``) go only once
        it has committed: a crash in between must not leave a node without its content.

        ``folders()``, asked after the commit: the only folders whose listings (entries, or
        the nodes listed in them) the transaction changed, if the caller knows
        (``cache.listing.apply_listing``); otherwise (None) every listing read before counts as changed
        (``generation``).
        """
        for attempt in range(2):
            self._removals, self._after_commit = [], []
            try:
                with self.env.begin(write=True) as txn:
                    result = fn(txn)
                touched = folders() if folders is not None else None
                if touched is None:
                    self.generation += 1
                else:
                    for folder in touched:
                        self.folder_generation[folder] = self.folder_generation.get(folder, 0) + 1
            except lmdb.MapFullError:
                if attempt:
                    raise
                self._grow_map(self.env.info()["map_size"] * 2)
                continue
            except lmdb.Error as exc:
                # LMDB reports a short write on a full disk as EIO: tell which it was.
                if self._disk_full():
                    raise OSError(errno.ENOSPC, f"the cache's disk is full ({self.dir})") from exc
                raise
            finally:
                removals, self._removals = self._removals, []
                after, self._after_commit = self._after_commit, []
            for ino in removals:
                self.remove_content_file(ino)
            for callback in after:
                callback()
            return result
        raise AssertionError("unreachable")

    INDEX_RESERVE = 16 << 20

    def reserve(self) -> None:
        """Keep disk blocks allocated ahead of the index's use, so that on a full disk a
        commit that frees space (an unlink, an eviction) can still be written: with
        writemap, by growing the (allocated) map while there is room."""
        try:
            info, stat = self.env.info(), self.env.stat()
            want = (info["last_pgno"] + 1) * stat["psize"] + self.INDEX_RESERVE
            if self.writemap:
                if info["map_size"] < want:  # (4 MiB more: not a growth per checkpoint)
                    self._grow_map(want + self.INDEX_RESERVE // 4)
                return
            if os.stat(self.dir / "index" / "data.mdb").st_blocks * 512 < want:
                self._allocate_map(want)
        except OSError as exc:
            log.debug("could not reserve index space: %s", exc)

    def _disk_full(self) -> bool:
        try:
            st = os.statvfs(self.dir)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < (4 << 20)

    def remove_after_commit(self, ino: int) -> None:
        self._removals.append(ino)

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once the running write transaction has committed (not if
        it fails; not twice when it is run again after the map grew)."""
        self._after_commit.append(callback)

    def transact(self, fn: Callable[["Txn"], T]) -> T:
        """Run ``fn(Txn)`` in one write transaction: a change to the namespace and its
        journal entry commit together or not at all."""
        return self.run_write(lambda txn: fn(Txn(self, txn)))

    def journal_ops(self) -> list[Op]:
        """Every journal entry; ``RecordError`` if one fails its check."""
        with self.env.begin() as txn:
            return [self._op(k, v) for k, v in txn.cursor(db=self.journal)]

    def has_op(self, seq: int) -> bool:
        """Whether journal entry ``seq`` is still there (a conflict may drop later ones
        of its node while a pass holds them)."""
        with self.env.begin() as txn:
            return txn.get(journal.key(seq), db=self.journal) is not None

    def journal_ops_until_damaged(self) -> tuple[list[Op], str | None]:
        """The journal's entries before the first that fails its check, and what is
        wrong with that one (None when none fails): a replay stops there, never applies
        it in a guessed form, nor what comes after it (which may depend on it)."""
        ops: list[Op] = []
        with self.env.begin() as txn:
            for k, v in txn.cursor(db=self.journal):
                try:
                    ops.append(self._op(k, v))
                except (RecordError, ValueError, KeyError, TypeError, struct.error) as exc:
                    return ops, index_damaged(self.dir, exc)
        return ops, None

    # -- meta -------------------------------------------------------------------------
    def get_meta(self, key: bytes) -> bytes | None:
        with self.env.begin() as txn:
            return self._meta_get(txn, key)

    def set_meta(self, key: bytes, value: bytes) -> None:
        self.run_write(lambda txn: self._meta_put(txn, key, value))

    def _new_ino(self, txn: lmdb.Transaction) -> int:
        data = self._meta_get(txn, b"next_ino")
        assert data is not None, "the schema's set-up writes next_ino"
        ino: int = _U64.unpack(data)[0]
        self._meta_put(txn, b"next_ino", _U64.pack(ino + 1))
        return ino

    # -- nodes ------------------------------------------------------------------------
    def get(self, ino: int) -> Node | None:
        with self.env.begin() as txn:
            data = txn.get(_key(ino), db=self.nodes)
        return None if data is None else self._unpack(ino, data)

    def child_ino(self, parent: int, name: bytes) -> int | None:
        key = self._ekey(parent, name)
        with self.env.begin() as txn:
            data = txn.get(key, db=self.entries)
            return None if data is None else self._entry_ino(key, data)

    def child(self, parent: int, name: bytes) -> Node | None:
        key = self._ekey(parent, name)
        with self.env.begin() as txn:
            data = txn.get(key, db=self.entries)
            if data is None:
                return None
            ino = self._entry_ino(key, data)
            rec = txn.get(_key(ino), db=self.nodes)
            return None if rec is None else self._unpack(ino, rec)

    def children(self, parent: int) -> list[Node]:
        """The cached entries of a folder, sorted by name (``name`` and ``parent`` are the
        entry's: for a hard-linked node they may differ from its stored primary name)."""
        with self.env.begin() as txn:
            return self._children_in(txn, parent)

    def _children_in(self, txn: lmdb.Transaction, parent: int, known: dict[int, Node] | None = None,
                     entries: list[tuple[bytes, int]] | None = None) -> list[Node]:
        """``children`` in ``txn``; ``known``: nodes as just written, used as they are;
        ``entries``: the folder's (name, ino) in key order, when the caller has read them."""
        if entries is None:
            entries = self._entries_in(txn, parent)
        out: list[Node] = []
        # (local names: a folder's listing reads a thousand nodes at a time)
        get, nodes, open_record, unpack, held = txn.get, self.nodes, self.codec.open, Node.unpack, self.held
        for name, ino in entries:
            node = known.get(ino) if known else None
            if node is None:
                key = _key(ino)
                rec = get(key, db=nodes)
                if rec is None:
                    continue
                try:
                    node = unpack(ino, open_record(rec, key))
                except RecordError:
                    node = self._unpack(ino, rec)  # (raises, saying which node)
                if held and ino in held:
                    node = self._unpack(ino, rec)
            elif (node.parent, node.name) != (parent, name):
                node = copy.copy(node)  # (``known`` is shared: one object per node)
            # A hard-linked node is listed under each of its names.
            node.parent, node.name = parent, name
            out.append(node)
        return out

    def entry_count(self, parent: int, most: int) -> int:
        """How many entries the folder has, counted up to ``most`` (keys only: no record
        is opened)."""
        prefix = _U64.pack(parent)
        count = 0
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.entries)
            if cur.set_range(prefix):
                for key in cur.iternext(keys=True, values=False):
                    if key[:8] != prefix or count >= most:
                        break
                    count += 1
        return count

    def _entries_in(self, txn: lmdb.Transaction, parent: int) -> list[tuple[bytes, int]]:
        """The folder's (name, ino) pairs, in key order (``_entry``'s work inlined)."""
        prefix = _U64.pack(parent)
        out = []
        cur = txn.cursor(db=self.entries)
        open_record, encrypted, ino_of = self.codec.open, self.codec.encrypted, _U64.unpack_from
        if cur.set_range(prefix):
            for key, value in cur:
                if key[:8] != prefix:
                    break
                try:
                    body = open_record(value, key)
                except RecordError:
                    body = b""
                if len(body) < 8:
                    out.append(self._entry(key, value))  # (raises, saying which entry)
                    continue
                out.append((body[8:] if encrypted else key[8:], ino_of(body)[0]))
        return out

    def put(self, node: Node) -> None:
        self.run_write(lambda txn: txn.put(_key(node.ino), self._pack(node), db=self.nodes))

    def paths_of(self, ino: int) -> list[bytes]:
        """Every share-relative path of a node (several for a hard-linked file)."""
        with self.env.begin() as txn:
            t = Txn(self, txn)
            out = []
            for parent, name in t.names_of(ino):
                try:
                    folder = t.path_of(parent)
                except KeyError:
                    continue
                out.append(join(folder, name))
            return out

    def path_of(self, ino: int) -> bytes:
        """The share-relative path of a node, walking up its parents."""
        with self.env.begin() as txn:
            return _path_of(self, txn, ino)

    def _drop_node(self, txn: lmdb.Transaction, node: Node) -> bool:
        """Forget a node and, for a folder, everything under it (content files too). A
        hard-linked file (or FIFO, socket) under it loses that name only, while it has a
        name left (as an unlink would): its other folders still hold it. Whether one did
        (a node in another folder changed)."""
        kept = False
        stack = [node]
        while stack:
            n = stack.pop()
            if n.is_dir:
                prefix = _U64.pack(n.ino)
                cur = txn.cursor(db=self.entries)
                keys = []
                if cur.set_range(prefix):
                    for key, value in cur:
                        if not key.startswith(prefix):
                            break
                        keys.append(bytes(key))
                        child = self._entry_ino(key, value)
                        data = txn.get(_key(child), db=self.nodes)
                        if data is None:
                            continue
                        c = self._unpack(child, data)
                        if c.nlink > 1 and not c.is_dir and self._drop_link_name(txn, c, n.ino, key, value):
                            kept = True
                        else:
                            stack.append(c)
                for key in keys:
                    txn.delete(key, db=self.entries)
            txn.delete(_key(n.ino), db=self.nodes)
            txn.delete(_key(n.ino), db=self.ranges_db)
            self._delete_sums(txn, n.ino)
            self.remove_after_commit(n.ino)
        return kept

    def _drop_link_name(self, txn: lmdb.Transaction, node: Node, parent: int, key: bytes, value: bytes) -> bool:
        """``_drop_node``: one name of a hard-linked node goes with its folder (the entry
        deleted by the caller): one link fewer, its main name another one if that was it.
        False when no other name is recorded (``add_link_name``; a server's link count
        of a file with one name here): the node goes too."""
        name = self._entry(key, value)[0]
        others = [other for other in Txn(self, txn).names_of(node.ino, scan=False) if other != (parent, name)]
        if not others:
            return False
        node.nlink -= 1
        if (node.parent, node.name) == (parent, name):
            node.parent, node.name = others[0]
        txn.put(_key(node.ino), self._pack(node), db=self.nodes)
        return True

    def drop_content(self, ino: int) -> None:
        """Forget cached content of a clean file (remote changed, or eviction)."""
        def txn_fn(txn: lmdb.Transaction) -> None:
            txn.delete(_key(ino), db=self.ranges_db)
            data = txn.get(_key(ino), db=self.nodes)
            if data is not None:
                node = self._unpack(ino, data)
                node.flags &= ~FULL
                txn.put(_key(ino), self._pack(node), db=self.nodes)
        self.run_write(txn_fn)
        # Truncate rather than unlink: open handles keep reading the same file.
        try:
            os.truncate(self.content_path(ino), 0)
        except FileNotFoundError:
            pass

    # -- content ----------------------------------------------------------------------
    def content_path(self, ino: int) -> str:
        return f"{self._data_prefix}{ino}"  # (not pathlib: this runs for every create and open)

    def new_content_file(self, ino: int) -> int:
        """A new, empty content file for ``ino``, opened read-write."""
        return os.open(self.content_path(ino), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def remove_content_file(self, ino: int) -> None:
        try:
            os.unlink(self.content_path(ino))
        except FileNotFoundError:
            pass

    def get_ranges(self, ino: int) -> rangeset.Ranges:
        key = _key(ino)
        with self.env.begin() as txn:
            data = txn.get(key, db=self.ranges_db)
            return [] if data is None else rangeset.decode(self._open_record(data, key, "ranges of node", ino))

    def save_ranges(self, updates: dict[int, rangeset.Ranges], full: set[int]) -> list[Node]:
        """Record content now present (after it was synced to disk). Returns the nodes
        it marked ``FULL``: the only change to what listings show, which moves the
        generations of their folders alone (of all, for a hard-linked one)."""
        made_full: list[Node] = []

        def txn_fn(txn: lmdb.Transaction) -> None:
            made_full.clear()  # (run again when the map had to grow)
            for ino, rs in updates.items():
                data = txn.get(_key(ino), db=self.nodes)
                if data is None:
                    continue  # the node went away meanwhile
                txn.put(_key(ino), self.codec.seal(rangeset.encode(rs), _key(ino)), db=self.ranges_db)
                if ino in full:
                    node = self._unpack(ino, data)
                    if not node.has(FULL):
                        node.flags |= FULL
                        txn.put(_key(ino), self._pack(node), db=self.nodes)
                        made_full.append(node)

        def folders() -> set[int] | None:
            if any(n.nlink > 1 for n in made_full):
                return None
            return {n.parent for n in made_full}
        self.run_write(txn_fn, folders=folders)
        return made_full

    def nodes_with_content(self) -> list[Node]:
        """Files with some content in the cache (fetched ranges, or whole)."""
        out = []
        with self.env.begin() as txn:
            for key, data in txn.cursor(db=self.nodes):
                node = self._unpack(_U64.unpack(key)[0], data)
                if node.is_file and (node.has(FULL) or txn.get(key, db=self.ranges_db)):
                    out.append(node)
        return out

    def content_bytes(self, node: Node) -> int:
        if node.has(FULL):
            return node.size
        return rangeset.total(self.get_ranges(node.ino))

    def usage(self) -> int:
        """Bytes of content in the cache (one scan; callers keep a running count)."""
        return sum(self.content_bytes(n) for n in self.nodes_with_content())

    def count(self, db: object) -> int:
        with self.env.begin() as txn:
            entries: int = txn.stat(db)["entries"]
            return entries

    def upload_mark(self, seq: int) -> tuple[int, int] | None:
        """(size, mtime) of the last upload started for ``seq`` and not known to have
        finished."""
        marks = self.upload_marks(seq)
        return marks[-1] if marks else None

    def upload_marks(self, seq: int) -> list[tuple[int, int]]:
        """(size, mtime) of each upload started for ``seq`` and not known to have
        finished, oldest first: any of them may be the one that landed."""
        return _marks(self.get_meta(b"u:" + _key(seq)))

    def produced(self, ino: int) -> tuple[int, int, int] | None:
        data = self.get_meta(b"v:" + _key(ino))
        if not data:
            return None
        size, mtime_ns, kind = json.loads(data)
        return int(size), int(mtime_ns), int(kind)

    def conflict_records(self) -> list[dict[str, Any]]:
        with self.env.begin() as txn:
            return [json.loads(self._open_record(v, k, "conflict", _U64.unpack(k)[0]))
                    for k, v in txn.cursor(db=self.conflicts)]

    def delete_conflict(self, cid: int) -> None:
        self.conflict_generation += 1
        self.run_write(lambda txn: txn.delete(_key(cid), db=self.conflicts))

    # -- checksums ----------------------------------------------------------------------
    def content_sum(self, ino: int) -> ContentSum | None:
        with self.env.begin() as txn:
            return Txn(self, txn).content_sum(ino)

    def has_current_sum(self, node: Node) -> bool:
        """Whether the node's content as it is now was committed with a checksum."""
        found = self.content_sum(node.ino)
        return found is not None and found.gen == node.gen

    def base_sum(self, ino: int) -> BaseSum | None:
        with self.env.begin() as txn:
            return Txn(self, txn).base_sum(ino)

    def save_base_sums(self, sums: list[tuple[int, tuple[int, int, int], bytes]]) -> None:
        """Record (ino, version, digest) for clean files whole in the cache, where the node
        is still at that version and unchanged here (it may have moved meanwhile)."""
        def txn_fn(txn: lmdb.Transaction) -> None:
            t = Txn(self, txn)
            for ino, version, digest in sums:
                node = t.node(ino)
                if node is not None and node.base == version \
                        and not node.flags & (DIRTY | KERNEL_WRITES | WRITING):
                    t.set_base_sum(ino, version, digest)
        self.run_write(txn_fn, folders=set)  # (no listing shows them)

    def _delete_sums(self, txn: lmdb.Transaction, ino: int) -> None:
        # (and the node's extended attributes: every node removal passes here)
        txn.delete(_sum_key(ino, b"c"), db=self.sums)
        txn.delete(_sum_key(ino, b"b"), db=self.sums)
        txn.delete(_key(ino), db=self.xattrs)

    # -- extended attributes (``xattrs.XattrSet``) ----------------------------------------
    def get_xattrs(self, ino: int) -> XattrSet | None:
        """The node's extended attributes; None when none were ever recorded."""
        with self.env.begin() as txn:
            return Txn(self, txn).xattrs(ino)

    def sync(self) -> None:
        """Make every commit so far durable (fsync of the index)."""
        self.env.sync(True)


class Txn:
    """Namespace and journal operations inside one write transaction."""

    def __init__(self, store: Store, txn: lmdb.Transaction) -> None:
        self.store = store
        self.txn = txn

    def node(self, ino: int) -> Node | None:
        data = self.txn.get(_key(ino), db=self.store.nodes)
        return None if data is None else self.store._unpack(ino, data)

    def put(self, node: Node) -> None:
        self.txn.put(_key(node.ino), self.store._pack(node), db=self.store.nodes)

    def delete_node(self, ino: int) -> None:
        self.txn.delete(_key(ino), db=self.store.nodes)
        self.txn.delete(_key(ino), db=self.store.ranges_db)
        self.store._delete_sums(self.txn, ino)
        target = _key(ino)
        cur = self.txn.cursor(db=self.store.links)
        while cur.set_range(target) and cur.key().startswith(target):
            cur.delete()

    def child_ino(self, parent: int, name: bytes) -> int | None:
        key = self.store._ekey(parent, name)
        data = self.txn.get(key, db=self.store.entries)
        return None if data is None else self.store._entry_ino(key, data)

    def child(self, parent: int, name: bytes) -> Node | None:
        ino = self.child_ino(parent, name)
        return None if ino is None else self.node(ino)

    def set_entry(self, parent: int, name: bytes, ino: int) -> None:
        key = self.store._ekey(parent, name)
        self.txn.put(key, self.store._evalue(key, ino, name), db=self.store.entries)

    def delete_entry(self, parent: int, name: bytes) -> None:
        self.txn.delete(self.store._ekey(parent, name), db=self.store.entries)

    def has_children(self, parent: int) -> bool:
        prefix = _U64.pack(parent)
        cur = self.txn.cursor(db=self.store.entries)
        return bool(cur.set_range(prefix)) and bytes(cur.key()).startswith(prefix)

    def add_link_name(self, ino: int, parent: int, name: bytes) -> None:
        """Record a name of a hard-linked file, for ``names_of``."""
        key = _key(ino) + self.store._ekey(parent, name)
        self.txn.put(key, self.store.codec.seal(b"", key), db=self.store.links)

    def names_of(self, ino: int, scan: bool = True) -> list[tuple[int, bytes]]:
        """Every (parent, name) that leads to ``ino`` (hard links). git links and unlinks
        every object it writes: the names recorded by ``add_link_name`` spare a scan of
        every entry, which only links made before that record existed still need (none
        without ``scan``: the recorded names only)."""
        target = _key(ino)
        found = []
        cur = self.txn.cursor(db=self.store.links)
        if cur.set_range(target):
            for key, lvalue in cur:
                if not key.startswith(target):
                    break
                self.store._open_record(lvalue, key, "link", ino)
                ekey = bytes(key[8:])
                value = self.txn.get(ekey, db=self.store.entries)
                if value is not None:
                    name, child = self.store._entry(ekey, value)
                    if child == ino:
                        found.append((_U64.unpack(ekey[:8])[0], name))
        if found or not scan:
            return found
        out = []
        for k, v in self.txn.cursor(db=self.store.entries):
            name, child = self.store._entry(k, v)
            if child == ino:
                out.append((_U64.unpack(k[:8])[0], name))
        return out

    def new_ino(self) -> int:
        return self.store._new_ino(self.txn)

    def path_of(self, ino: int) -> bytes:
        return _path_of(self.store, self.txn, ino)

    def append(self, op: Op) -> int:
        """Add an operation at the end of the journal; its sequence number."""
        # Sequence numbers only grow (never reused when the journal empties): marks kept
        # by sequence number, such as an upload under way, must never match a newer entry.
        # (``last_seq`` is written with every entry, so it is the highest ever when present;
        # the journal's last key is asked only of caches older than it)
        last = self.store._meta_get(self.txn, b"last_seq")
        seq: int
        if last is not None:
            seq = _U64.unpack(last)[0] + 1
        else:
            cur = self.txn.cursor(db=self.store.journal)
            seq = (journal.seq_of(cur.key()) if cur.last() else 0) + 1
        self.store._meta_put(self.txn, b"last_seq", _U64.pack(seq))
        op.seq = seq
        self.put_op(seq, op)
        return seq

    def put_op(self, seq: int, op: Op) -> None:
        """Journal entry ``seq`` is ``op`` (new, or rewritten by ``journal.optimise``),
        sealed when the cache is encrypted."""
        key = journal.key(seq)
        self.txn.put(key, self.store.codec.seal(op.encode(), key), db=self.store.journal)

    def delete_op(self, seq: int) -> None:
        self.txn.delete(journal.key(seq), db=self.store.journal)

    # The uploads under way for journal entry ``seq``: after a crash, a remote file with
    # the size and mtime of one is recognised as that upload, not as someone else's change.
    def mark_upload(self, seq: int, size: int, mtime_ns: int) -> None:
        """Record (size, mtime) of the content being uploaded for ``seq``, beside the marks
        of uploads begun before for it (one of those may have landed, and this one be cut
        before it does: the crash loop then met our landed upload as a change of the
        server's, and kept the latest version as a conflict copy)."""
        key = b"u:" + _key(seq)
        marks = [mark for mark in _marks(self.store._meta_get(self.txn, key)) if mark != (size, mtime_ns)]
        self.keep_upload_marks(seq, marks + [(size, mtime_ns)])

    def keep_upload_marks(self, seq: int, marks: list[tuple[int, int]]) -> None:
        """The marks of ``seq`` are these only (the replay found which upload landed)."""
        self.store._meta_put(self.txn, b"u:" + _key(seq), json.dumps(marks[-UPLOAD_MARKS:]).encode())

    def clear_upload(self, seq: int) -> None:
        self.txn.delete(b"u:" + _key(seq), db=self.store.meta)

    # Versions produced on the remote by replay, by node: later journal entries recorded
    # an older base for the same node (or for the object they replace), and must compare
    # the remote with what the replay itself made. Cleared when the journal is empty.
    def set_produced(self, ino: int, version: tuple[int, int, int]) -> None:
        self.store._meta_put(self.txn, b"v:" + _key(ino), json.dumps(version).encode())

    def clear_produced(self) -> None:
        cur = self.txn.cursor(db=self.store.meta)
        keys = []
        if cur.set_range(b"v:"):
            for k, _v in cur:
                if not k.startswith(b"v:"):
                    break
                keys.append(bytes(k))
        for k in keys:
            self.txn.delete(k, db=self.store.meta)

    # Checksums (see ``ContentSum``, ``BaseSum``).
    def set_content_sum(self, ino: int, gen: int, size: int, digest: bytes) -> None:
        key = _sum_key(ino, b"c")
        self.txn.put(key, self.store.codec.seal(ContentSum(gen, size, digest).pack(), key), db=self.store.sums)

    def content_sum(self, ino: int) -> ContentSum | None:
        data = self._sum(ino, b"c", "checksum of node")
        return None if data is None else ContentSum.unpack(ino, data)

    def base_sum(self, ino: int) -> BaseSum | None:
        data = self._sum(ino, b"b", "base checksum of node")
        return None if data is None else BaseSum.unpack(ino, data)

    def _sum(self, ino: int, kind: bytes, what: str) -> bytes | None:
        key = _sum_key(ino, kind)
        data = self.txn.get(key, db=self.store.sums)
        return None if data is None else self.store._open_record(data, key, what, ino)

    def set_base_sum(self, ino: int, version: tuple[int, int, int], digest: bytes) -> None:
        key = _sum_key(ino, b"b")
        self.txn.put(key, self.store.codec.seal(BaseSum(version, digest).pack(), key), db=self.store.sums)

    def xattrs(self, ino: int) -> XattrSet | None:
        key = _key(ino)
        data = self.txn.get(key, db=self.store.xattrs)
        if data is None:
            return None
        return XattrSet.unpack(self.store._open_record(data, key, "extended attributes of node", ino))

    def set_xattrs(self, ino: int, found: XattrSet) -> None:
        key = _key(ino)
        self.txn.put(key, self.store.codec.seal(found.pack(), key), db=self.store.xattrs)

    def delete_xattrs(self, ino: int) -> None:
        self.txn.delete(_key(ino), db=self.store.xattrs)

    def ops_after(self, seq: int) -> list[Op]:
        """The journal's entries after entry ``seq`` (a walk of the journal's end: for the
        rare conflicts that need it, never per request)."""
        cur = self.txn.cursor(db=self.store.journal)
        if not cur.set_range(journal.key(seq + 1)):
            return []
        return [self.store._op(k, v) for k, v in cur]

    def forget_ranges(self, ino: int) -> None:
        """No byte of the node's content file counts as fetched any more."""
        self.txn.delete(_key(ino), db=self.store.ranges_db)

    def drop_base_sum(self, ino: int) -> None:
        self.txn.delete(_sum_key(ino, b"b"), db=self.store.sums)

    # -- what a listing applies (``cache.listing.apply_listing``) --------------------------
    def entries(self, parent: int) -> list[tuple[bytes, int]]:
        """The folder's (name, ino) pairs, in key order."""
        return self.store._entries_in(self.txn, parent)

    def children(self, parent: int, known: dict[int, Node] | None = None,
                 entries: list[tuple[bytes, int]] | None = None) -> list[Node]:
        """``Store.children`` in this transaction; ``known``: nodes as just written, used as
        they are; ``entries``: the folder's ``entries``, when the caller has read them."""
        return self.store._children_in(self.txn, parent, known, entries)

    def add_children(self, parent: int, nodes: list[Node]) -> list[Node]:
        """New ``nodes`` (numbers not used before) and their entries in ``parent`` (which
        holds none of their names), each sub-database's records written in one call;
        the nodes in the order ``children`` reads them (by entry key)."""
        store = self.store
        prefix = _U64.pack(parent)
        name_key, evalue = store.codec.name_key, store._evalue
        keyed = sorted(((prefix + name_key(node.name), node) for node in nodes), key=_first)
        pack = store._pack
        self.txn.cursor(db=store.nodes).putmulti([(_key(node.ino), pack(node)) for node in nodes])
        self.txn.cursor(db=store.entries).putmulti(
            [(ekey, evalue(ekey, node.ino, node.name)) for ekey, node in keyed])
        return [node for _ekey, node in keyed]

    def drop_tree(self, node: Node) -> bool:
        """Forget a node and, for a folder, everything under it (content files too, once
        the transaction has committed). True when a hard-linked node under it kept a
        name in another folder (``Store._drop_node``): that folder's listing changed too."""
        return self.store._drop_node(self.txn, node)

    def next_ino(self) -> int:
        """The number the next new node takes (``set_next_ino`` moves it on)."""
        data = self.store._meta_get(self.txn, b"next_ino")
        assert data is not None, "the schema's set-up writes next_ino"
        return int(_U64.unpack(data)[0])

    def set_next_ino(self, ino: int) -> None:
        self.store._meta_put(self.txn, b"next_ino", _U64.pack(ino))

    def add_conflict(self, record: dict[str, Any]) -> int:
        cur = self.txn.cursor(db=self.store.conflicts)
        cid = _U64.unpack(cur.key())[0] + 1 if cur.last() else 1
        record["id"] = cid
        self.store.conflict_generation += 1
        self.txn.put(_key(cid), self.store.codec.seal(json.dumps(record).encode(), _key(cid)), db=self.store.conflicts)
        return cid


UPLOAD_MARKS = 16  # marks kept per journal entry (the uploads begun for it, newest kept)


def _marks(data: bytes | None) -> list[tuple[int, int]]:
    """The upload marks of a ``u:`` record (one [size, mtime] pair as a cache of before
    wrote it, or a list of them); [] for none or a damaged record."""
    if data is None:
        return []
    try:
        value = json.loads(data)
        if len(value) == 2 and all(isinstance(item, int) for item in value):
            value = [value]  # (one mark, as written before)
        return [(int(size), int(mtime)) for size, mtime in value]
    except (ValueError, TypeError, ArithmeticError):  # (ArithmeticError: 1e999, int(inf))
        return []
