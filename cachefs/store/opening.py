"""Opening a cache directory safely: the private folder, a missing or emptied index, a
walk of its pages in a child process, every record read once through its check, the
schema (made, checked, or upgraded from schema 1), and the files a crash left mid-write.

Owns: the checks done once at open, before anything is served. Must not touch: the
network, trio, FUSE. A friend of ``index.Store``: it opens the store's environment (``env``,
``writemap``), reads records through the store's own checked readers (``_open_record``,
``_entry``, ``_op``, ``_meta_get``), and writes the schema's first records and
``cache_id`` through its sealing writers (``_meta_put``, ``_pack``).
"""

from __future__ import annotations

import json
import logging
import os
import stat as stat_mod
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import lmdb

from . import journal
from . import ranges as rangeset
from .crypto import RecordError
from .journal import Op
from .xattrs import XattrSet
from .records import (_U64, DIRTY, FIRST_INO, FULL, INDEX_MARK, INDEX_MARK_TEXT, KERNEL_WRITES, ROOT_INO,
                      SCHEMA, WRITING, Node, StoreError, _key, index_damaged)

if TYPE_CHECKING:
    from .index import Store

log = logging.getLogger(__name__)


#: how ``probe_index`` begins its answer when LMDB ended the reader
PROBE_CRASHED = "LMDB stopped with signal"


def _walk_index(index: Path) -> None:
    """Walk every page of every sub-database of ``index``, read-only, finding each
    record again by its key."""
    env = lmdb.open(str(index), readonly=True, lock=False, max_dbs=64, subdir=True)
    try:
        with env.begin() as txn:
            names = [bytes(k) for k, _v in txn.cursor()]
            for name in names:
                db = env.open_db(name, txn=txn, create=False)
                for key, value in txn.cursor(db=db):
                    if txn.get(key, db=db) != value:
                        raise RecordError(f"record {bytes(key)!r} of {name!r} is not found by its key")
    finally:
        env.close()


class ApartFailed(Exception):
    """Work done in a child process (``run_apart``) failed: what it raised, or the signal
    that ended it (the message then begins with ``PROBE_CRASHED``)."""


def run_apart(work: Callable[[], object], doing: str) -> object:
    """``work()`` run in a forked child process and its answer (JSON) handed back: some
    damage makes LMDB abort the process that reads an index (an assertion in its C
    code), which no exception handler sees. ``doing`` names the work in the failures:
    ``ApartFailed`` says what the child raised, or the signal that ended it."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: work, answer, never return
        status = 0
        try:
            os.close(read_fd)
            try:
                reply: dict[str, object] = {"answer": work()}
            except Exception as exc:  # noqa: BLE001 - any failure is the answer
                reply = {"error": f"{type(exc).__name__}: {exc}"[:4000]}
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(json.dumps(reply).encode())
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            text = pipe.read().decode(errors="replace")
    finally:
        _pid, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        raise ApartFailed(f"{PROBE_CRASHED} {os.WTERMSIG(status)} while {doing}")
    try:
        answer: object = json.loads(text) if text else None
    except ValueError:
        answer = None
    if isinstance(answer, dict) and "error" in answer:
        raise ApartFailed(str(answer["error"]))
    if not isinstance(answer, dict) or "answer" not in answer or os.waitstatus_to_exitcode(status) != 0:
        raise ApartFailed(f"{doing} failed")
    return answer["answer"]


def probe_index(index: Path) -> str | None:
    """What is wrong with the pages of the index, found by walking them in a child
    process (``run_apart``). None when the walk went through."""
    try:
        run_apart(lambda: _walk_index(index), "reading its pages")
    except ApartFailed as exc:
        return str(exc)
    return None


def index_of_a_cache(index: Path) -> bool:
    """Whether the LMDB environment in ``index`` is a cache's: its ``meta`` records a
    schema and a remote (made with the index, before anything else: ``check_schema``).
    Read-only and without LMDB's lock file, so that nothing is made in a folder that is
    not a cache; run it apart (``run_apart``), as any read of an index not known good."""
    env = lmdb.open(str(index), readonly=True, lock=False, max_dbs=16, subdir=True, create=False)
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            return txn.get(b"schema", db=meta) is not None and txn.get(b"remote", db=meta) is not None
    finally:
        env.close()


def check_private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700, or refuse one that others may write to."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_mode & 0o022:
        raise StoreError(
            f"cache directory {path} is writable by group or others (mode {stat_mod.S_IMODE(st.st_mode):o}); "
            f"run 'chmod 700 {path}' or choose another --cache-dir"
        )
    if st.st_uid != os.geteuid():
        raise StoreError(f"cache directory {path} belongs to another user (uid {st.st_uid})")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def open_environment(store: Store, map_size: int) -> None:
    """Open the LMDB environment of ``store``, its pages walked first when the cache
    already had an index, with ``writemap`` where the whole map can be allocated."""
    # sync=False: commits are made durable by ``checkpoint`` (and by fsync from
    # programs), not one fsync per commit; a process crash loses nothing.
    # writemap: a transaction writes its pages in the shared map, and the commit has no
    # pages to copy out (a create's commit 12 us less). A write into a hole of the map
    # would die of SIGBUS on a full disk, so the whole map is kept allocated
    # (``_allocate_map``); where that cannot be done, the index runs without writemap.
    store.writemap = True
    if store._once_indexed:  # (before this process opens it: LMDB allows one env per path)
        failure = probe_index(store.dir / "index")
        if failure is not None:
            raise StoreError(index_damaged(store.dir, failure))
    try:
        store.env = store._open_env(map_size)
        store._env_open = True
        try:
            store._allocate_map(store.env.info()["map_size"])
        except OSError as exc:
            log.warning("the cache index runs without writemap (slower commits): cannot "
                        "allocate its %d MiB map on disk: %s",
                        store.env.info()["map_size"] >> 20, exc)
            store.env.close()
            store.writemap = False
            store.env = store._open_env(map_size)
            store._env_open = True
    except lmdb.Error as exc:
        raise StoreError(index_damaged(store.dir, f"it does not open: {exc}")) from exc


def index_present(store: Store) -> bool:
    """Refuse a cache that once held an index (its mark, or content files, say so)
    and has none now, before LMDB would make a new, empty one: an empty index would
    show the server's files and drop every change the lost one journaled. Whether
    the cache ever held one."""
    index = store.dir / "index"
    made = (store.dir / INDEX_MARK).exists()
    try:
        with os.scandir(store.data_dir) as it:
            has_content = any(True for _ in it)
    except FileNotFoundError:
        has_content = False
    if not (made or has_content):
        return False
    mdb = index / "data.mdb"
    if not index.is_dir():
        what = f"its index folder {index} is missing"
    elif not mdb.exists():
        what = f"{mdb} is missing"
    elif mdb.stat().st_size == 0:
        what = f"{mdb} is empty (0 bytes)"
    else:
        return True
    raise StoreError(index_damaged(store.dir, what))


def mark_indexed(store: Store) -> None:
    """Write ``INDEX_MARK`` once the index holds its records (durably first)."""
    mark = store.dir / INDEX_MARK
    if mark.exists():
        return
    store.env.sync(True)
    fd = os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, INDEX_MARK_TEXT)
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(store.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def check_integrity(store: Store) -> list[Node]:
    """Read every record once: a damaged page shows up now, as a clear refusal,
    instead of in the middle of serving a request. Returns the files with local
    changes."""
    with store.env.begin() as txn:
        _check_keys(store, txn)
        _check_values(store, txn)
        dirty = []
        for key, value in txn.cursor(db=store.nodes):
            node = store._unpack(_U64.unpack(key)[0], value)
            if node.flags & DIRTY and node.flags & FULL and node.is_file:
                dirty.append(node)
        for key, value in txn.cursor(db=store.journal):
            store._op(key, value)
    return dirty


def _check_keys(store: Store, txn: lmdb.Transaction) -> None:
    """Each record found by walking is found again by its key: a damaged key in a
    branch page would send lookups astray (a node "gone", a name not there)."""
    for db in (store.meta, store.nodes, store.entries, store.ranges_db, store.journal,
               store.conflicts, store.links, store.sums, store.xattrs):
        for key, value in txn.cursor(db=db):
            if txn.get(key, db=db) != value:
                raise RecordError(f"record {bytes(key)!r} is not found by its key")


def _check_values(store: Store, txn: lmdb.Transaction) -> None:
    """Every value but the nodes' and the journal's opens through its check and decodes."""
    for key, value in txn.cursor(db=store.meta):
        if key != b"schema":
            store._open_record(value, key, "meta", bytes(key))
    for key, value in txn.cursor(db=store.entries):
        store._entry(key, value)
    for key, value in txn.cursor(db=store.ranges_db):
        rangeset.decode(store._open_record(value, key, "ranges of node", _U64.unpack(key)[0]))
    for key, value in txn.cursor(db=store.conflicts):
        json.loads(store._open_record(value, key, "conflict", _U64.unpack(key)[0]))
    for key, value in txn.cursor(db=store.links):
        store._open_record(value, key, "link", _U64.unpack(key[:8])[0])
    for key, value in txn.cursor(db=store.sums):
        store._open_record(value, key, "checksum of node", _U64.unpack(key[:8])[0])
    for key, value in txn.cursor(db=store.xattrs):
        XattrSet.unpack(store._open_record(value, key, "extended attributes of node", _U64.unpack(key)[0]))


def fit_dirty_content(store: Store, nodes: list[Node]) -> None:
    """Make each changed file's content as long as its recorded size. A truncation's
    size is committed before the file is cut: a kill in between leaves the file longer
    than the size the index (and so every reader) knows, and bytes past the size would
    show again if the file later grew. A file that was being written (``WRITING``: its
    writes land before the index hears of them, if ever before the release) or that
    the kernel was writing itself (``KERNEL_WRITES``) is the other way round: its
    record takes the content file's length and mtime."""
    for node in nodes:
        if not node.flags & (KERNEL_WRITES | WRITING) and store.has_current_sum(node):
            # Committed with its checksum: nothing interrupted to finish, and a content
            # file of another length is damage, to be found (never padded with zeros).
            continue
        try:
            fd = os.open(store.content_path(node.ino), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # created, then killed before its content file: opened on use
        try:
            if node.flags & (KERNEL_WRITES | WRITING):
                st = os.fstat(fd)
                length = st.st_size if node.flags & KERNEL_WRITES else \
                    max(node.size, store.content.length(fd))  # (writes only grow it)
                node.size, node.mtime_ns = length, max(node.mtime_ns, st.st_mtime_ns)
                node.flags &= ~(KERNEL_WRITES | WRITING)
                store.put(node)
                log.info("inode %d takes its content file's size %d: it was being "
                         "written when the mount ended", node.ino, node.size)
            elif store.content.fit(fd, node.size):
                log.info("content of inode %d fitted to its recorded size %d after a crash",
                         node.ino, node.size)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------


def _drop_made_dbs(store: Store) -> None:
    """Take away the (empty) sub-databases this open made in an older cache."""
    if store._made_dbs:
        with store.env.begin(write=True) as txn:
            for db in store._made_dbs:
                txn.drop(db, delete=True)


def check_schema(store: Store, remote_text: str) -> None:
    with store.env.begin() as txn:
        schema = txn.get(b"schema", db=store.meta)
        schema = None if schema is None else bytes(schema)
    if schema == b"1":
        try:
            upgrade_schema1(store)
        except BaseException:
            _drop_made_dbs(store)  # (refused: the cache is left as it was found)
            raise
        schema = SCHEMA
    with store.env.begin(write=True) as txn:
        if schema is None:
            if txn.stat(store.nodes)["entries"]:
                raise StoreError(index_damaged(store.dir, "it has no schema mark"))
            if store._once_indexed:
                raise StoreError(index_damaged(store.dir, "it holds no records: it was emptied"))
            txn.put(b"schema", SCHEMA, db=store.meta)
            store._meta_put(txn, b"next_ino", _U64.pack(FIRST_INO))
            store._meta_put(txn, b"remote", remote_text.encode())
            store._meta_put(txn, b"cache_id", os.urandom(3).hex().encode())
            now = time.time_ns()
            root = Node(ROOT_INO, ROOT_INO, b"", stat_mod.S_IFDIR | 0o755, 0, now, now, now, nlink=2)
            txn.put(_key(ROOT_INO), store._pack(root), db=store.nodes)
        elif schema != SCHEMA:
            raise StoreError(
                f"cache in {store.dir} has schema {schema.decode(errors='replace')}, this release "
                f"reads schemas 1 and {SCHEMA.decode()}; use another --cache-dir or remove that one"
            )
        else:
            stored = (store._meta_get(txn, b"remote") or b"").decode(errors="replace")
            if stored != remote_text:
                raise StoreError(f"cache in {store.dir} belongs to remote {stored!r}, not {remote_text!r}")
            if store._meta_get(txn, b"cache_id") is None:  # a cache made before the id
                store._meta_put(txn, b"cache_id", os.urandom(3).hex().encode())
        #: this cache's short random id (see ``meta``)
        cache_id = store._meta_get(txn, b"cache_id")
        assert cache_id is not None, "written above"
        store.cache_id = cache_id.decode()


def upgrade_schema1(store: Store) -> None:
    """Rewrite a schema-1 cache (records without checks) as schema 2, in one
    transaction: every record is first checked as well as schema 1 allows (it decodes,
    lengths agree, a sealed one decrypts), then sealed with its key. A record that
    fails refuses the upgrade (and the mount) and changes nothing."""
    codec = store.codec
    rewritten = 0

    def txn_fn(txn: lmdb.Transaction) -> None:
        nonlocal rewritten
        plan: list[tuple[object, bytes, bytes]] = []  # (db, key, new value)
        for key, value in txn.cursor(db=store.meta):
            key = bytes(key)
            if key == b"schema":
                continue
            body = codec.open_schema1(value) if key == b"remote" else bytes(value)
            if key in (b"next_ino", b"last_seq") and len(body) != 8:
                raise RecordError(f"meta {key!r} has {len(body)} bytes, not 8")
            if key.startswith((b"u:", b"v:")) or key == b"pinned":
                json.loads(body)
            plan.append((store.meta, key, codec.seal(body, key)))
        for key, value in txn.cursor(db=store.nodes):
            key = bytes(key)
            body = codec.open_schema1(value)
            Node.unpack(_U64.unpack(key)[0], body)
            plan.append((store.nodes, key, codec.seal(body, key)))
        for key, value in txn.cursor(db=store.entries):
            key, value = bytes(key), bytes(value)
            if len(value) < 8:
                raise RecordError(f"folder entry {key!r} is cut short")
            name = codec.open_schema1(value[8:]) if codec.encrypted else b""
            plan.append((store.entries, key, codec.seal(value[:8] + name, key)))
        for key, value in txn.cursor(db=store.ranges_db):
            key, value = bytes(key), bytes(value)
            rangeset.decode(value)
            plan.append((store.ranges_db, key, codec.seal(value, key)))
        for key, value in txn.cursor(db=store.journal):
            key = bytes(key)
            body = codec.open_schema1(value)
            Op.decode(journal.seq_of(key), body)
            plan.append((store.journal, key, codec.seal(body, key)))
        for key, value in txn.cursor(db=store.conflicts):
            key = bytes(key)
            body = codec.open_schema1(value)
            json.loads(body)
            plan.append((store.conflicts, key, codec.seal(body, key)))
        for key, _value in txn.cursor(db=store.links):
            key = bytes(key)
            plan.append((store.links, key, codec.seal(b"", key)))
        for db, key, value in plan:
            txn.put(key, value, db=db)
        txn.put(b"schema", SCHEMA, db=store.meta)
        rewritten = len(plan)

    store.run_write(txn_fn)
    store.env.sync(True)
    log.info("cache %s upgraded from schema 1 to %s: %d records now carry a check",
             store.dir, SCHEMA.decode(), rewritten)
