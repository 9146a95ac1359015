"""Every index record is checked when read (issue 19, item 4), in-process.

A plain cache's records carry a CRC32 of key and value, an encrypted cache's the AES-GCM
tag with the key as associated data (schema 2); a schema-1 cache (no checks) is upgraded
at open. The caches made by the release before schema 2 are fixtures
(tests/fixtures/schema1/make.sh made them with that release's real mount: offline
changes, then kill -9). The bit-flip trials damage copies of such a cache with pending
changes and replay its journal onto a copy of its share: the result is the right one or
the cache is refused; never a change applied in a guessed form.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import tarfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import lmdb
import pytest
import trio

from cachefs.store import crypto
from cachefs.cache.cache import Cache, CacheConfig
from cachefs.store.crypto import PlainCodec, RecordError, SealedCodec
from cachefs.store.index import ROOT_INO, Store, StoreError
from cachefs.remote.local import LocalRemote
from cachefs.link.connectivity import Connectivity
from cachefs.sync.manager import SyncManager

FIXTURES = Path(__file__).parent / "fixtures" / "schema1"
KEY_SECRET = b"fixture key\n"

#: the fixture's journal, as the release before schema 2 wrote it
JOURNAL = [("store", b"a.txt"), ("create", b"new.txt"), ("mkdir", b"nd"), ("create", b"nd/new2.txt"),
           ("rename", b"old.txt"), ("unlink", b"gone.txt"), ("setattr", b"d/b.txt"),
           ("link", b"new.txt"), ("symlink", b"sym")]


def _expected_share(share: Path) -> dict:
    """What the share holds once the fixture's journal is replayed."""
    out = {}
    for folder, dirs, files in os.walk(share):
        for name in sorted(dirs + files):
            p = Path(folder) / name
            rel = str(p.relative_to(share))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", p.read_bytes(), stat.S_IMODE(st.st_mode))
    return out


REPLAYED = {
    "a.txt": ("file", b"a\na edited offline\n", 0o644),
    "d": ("dir",),
    "d/b.txt": ("file", b"b\n", 0o600),
    "nd": ("dir",),
    "nd/new2.txt": ("file", b"new2 in nd\n", 0o644),
    "new.txt": ("file", b"new\n", 0o644),
    "new-link.txt": ("file", b"new\n", 0o644),
    "renamed.txt": ("file", b"old\n", 0o644),
    "sym": ("link", "a.txt"),
}


def _unpack(kind: str, where: Path) -> tuple[Path, Path, str, bytes | None]:
    """The fixture ``kind`` unpacked in ``where``: cache dir, share, remote text, key."""
    where.mkdir(parents=True, exist_ok=True)
    with tarfile.open(FIXTURES / f"{kind}.tar.gz") as tar:
        tar.extractall(where, filter="fully_trusted")
    os.chmod(where / "cache", 0o700)
    key = crypto.open_key(where / "cache", KEY_SECRET) if kind == "sealed" else None
    return where / "cache", where / "share", f"/tmp/cachefs-schema1-fixture/{kind}/share", key


def _with_sync(cache_dir: Path, share: Path, remote_text: str, key: bytes | None,
               body: Callable[[Store, SyncManager], Awaitable[None]]) -> None:
    """Open the cache (StoreError if refused) with a sync manager onto ``share``, and run
    ``body`` with them."""
    store = Store(cache_dir, remote_text, key=key)
    try:
        conn = Connectivity(LocalRemote(str(share), 10.0))

        async def main() -> None:
            await conn.first_connect()
            await body(store, SyncManager(store, Cache(store, conn, CacheConfig()), conn))

        trio.run(main)
    finally:
        store.close()


def _replay(cache_dir: Path, share: Path, remote_text: str, key: bytes | None) -> None:
    """Open the cache (StoreError if refused) and replay its journal onto ``share``."""
    async def replay(_store: Store, sync: SyncManager) -> None:
        result = await sync.reintegrate()
        assert result.complete, result.reason
        assert sync.pending() == 0

    _with_sync(cache_dir, share, remote_text, key, replay)


@pytest.mark.parametrize("kind", ["plain", "sealed"])
def test_a_schema1_cache_with_pending_changes_is_upgraded_and_replayed(tmp_path: Path, kind: str) -> None:
    cache_dir, share, remote_text, key = _unpack(kind, tmp_path)
    env = lmdb.open(str(cache_dir / "index"), max_dbs=12, readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(b"schema", db=env.open_db(b"meta", txn=txn)) == b"1"
    env.close()

    store = Store(cache_dir, remote_text, key=key)
    try:
        with store.env.begin() as txn:
            assert txn.get(b"schema", db=store.meta) == b"2"
        assert [(op.kind, op.path) for op in store.journal_ops()] == JOURNAL
        assert store.get(ROOT_INO).is_dir and store.child(ROOT_INO, b"new.txt").size == 4
        # Every record of every sub-database now carries its check.
        codec = store.codec
        with store.env.begin() as txn:
            for db in (store.nodes, store.entries, store.ranges_db, store.journal, store.links):
                for k, v in txn.cursor(db=db):
                    codec.open(v, k)
                    with pytest.raises(RecordError):
                        codec.open(v[:-1] + bytes([v[-1] ^ 1]), k)
    finally:
        store.close()
    _replay(cache_dir, share, remote_text, key)
    assert _expected_share(share) == REPLAYED


def _all_records(index: Path) -> dict[bytes, list[tuple[bytes, bytes]]]:
    """Every record of every sub-database of the LMDB environment ``index``."""
    env = lmdb.open(str(index), max_dbs=12, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            names = [bytes(k) for k, _v in txn.cursor()]
            return {name: [(bytes(k), bytes(v)) for k, v in txn.cursor(db=env.open_db(name, txn=txn))]
                    for name in names}
    finally:
        env.close()


def test_a_damaged_schema1_record_refuses_the_upgrade_and_changes_nothing(tmp_path: Path) -> None:
    cache_dir, _share, remote_text, _key = _unpack("plain", tmp_path)
    env = lmdb.open(str(cache_dir / "index"), max_dbs=12)
    with env.begin(write=True) as txn:
        journal = env.open_db(b"journal", txn=txn)
        k, v = next(iter(txn.cursor(db=journal)))
        txn.put(k, v[:5], db=journal)  # a journal entry cut short: not JSON any more
    env.close()
    before = _all_records(cache_dir / "index")
    assert b"sums" not in before  # (schema 1 had none: the open must not leave one behind)
    with pytest.raises(StoreError, match="damaged"):
        Store(cache_dir, remote_text)
    after = _all_records(cache_dir / "index")
    assert after == before
    assert (b"schema", b"1") in after[b"meta"] and (k, v[:5]) in after[b"journal"]


@pytest.mark.parametrize("codec", [PlainCodec(), SealedCodec(b"k" * 32)], ids=["plain", "sealed"])
def test_every_changed_bit_of_a_record_or_its_key_fails_the_check(codec) -> None:
    key, value = b"\x00" * 7 + b"\x10", b'{"v": 1, "kind": "create", "path": "nd/new2.txt"}'
    sealed = codec.seal(value, key)
    assert codec.open(sealed, key) == value
    for i in range(len(sealed) * 8):
        flipped = bytearray(sealed)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(RecordError):
            codec.open(bytes(flipped), key)
    for i in range(len(key) * 8):
        other = bytearray(key)
        other[i // 8] ^= 1 << (i % 8)
        with pytest.raises(RecordError):
            codec.open(sealed, bytes(other))
    for cut in range(len(sealed)):
        with pytest.raises(RecordError):
            codec.open(sealed[:cut], key)


def _schema2_template(tmp_path: Path, kind: str) -> tuple[Path, Path, str, bytes | None]:
    """The fixture upgraded to schema 2, its index compacted (small copies per trial)."""
    cache_dir, share, remote_text, key = _unpack(kind, tmp_path / "template")
    Store(cache_dir, remote_text, key=key).close()
    env = lmdb.open(str(cache_dir / "index"), max_dbs=12, readonly=True, lock=False)
    (tmp_path / "compact").mkdir()
    env.copy(str(tmp_path / "compact"), compact=True)
    env.close()
    os.replace(tmp_path / "compact" / "data.mdb", cache_dir / "index" / "data.mdb")
    return cache_dir, share, remote_text, key


def _trial(tmp_path: Path, template: tuple, n: int, damage) -> str:
    """Copy the template, damage the copy, replay: 'refused' or 'right' (else it fails)."""
    cache_dir, share, remote_text, key = template
    where = tmp_path / f"t{n}"
    shutil.copytree(cache_dir, where / "cache")
    shutil.copytree(share, where / "share", symlinks=True)
    damage(where / "cache" / "index")
    try:
        _replay(where / "cache", where / "share", remote_text, key)
    except StoreError as exc:
        assert "damaged" in str(exc) and "cachefs recover" in str(exc), exc
        return "refused"
    finally:
        shutil.rmtree(where / "cache", ignore_errors=True)
    got = _expected_share(where / "share")
    shutil.rmtree(where)
    assert got == REPLAYED, f"trial {n}: a damaged cache replayed to {got}"
    return "right"


@pytest.mark.parametrize("kind", ["plain", "sealed"])
def test_a_flipped_bit_in_a_journal_entry_or_node_record_is_never_applied(tmp_path: Path, kind: str) -> None:
    """Bits of every journal entry and node record (value and key, flipped through LMDB,
    as a disk would change them in place), one at a time: every trial is refused."""
    template = _schema2_template(tmp_path, kind)
    env = lmdb.open(str(template[0] / "index"), max_dbs=12, readonly=True, lock=False)
    records = []
    with env.begin() as txn:
        for name in (b"journal", b"nodes"):
            db = env.open_db(name, txn=txn)
            records += [(name, bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
    env.close()
    rng = random.Random(19)
    trials = []
    for name, k, v in records:
        # A sample of the bits of key and value (each trial opens a copy of the cache:
        # test_every_changed_bit_... flips every bit of one record through the codec).
        bits = rng.sample(range(len(v) * 8), 48 if name == b"journal" and kind == "plain" else 16)
        trials += [(name, k, v, "key", i) for i in range(len(k) * 8) if rng.random() < 0.125]
        trials += [(name, k, v, "value", i) for i in bits]

    outcomes = {"refused": 0, "right": 0}
    for n, (name, k, v, part, bit) in enumerate(trials):
        def damage(index: Path, name=name, k=k, v=v, part=part, bit=bit) -> None:
            env = lmdb.open(str(index), max_dbs=12)
            with env.begin(write=True) as txn:
                db = env.open_db(name, txn=txn)
                txn.delete(k, db=db)
                if part == "key":
                    k2 = bytearray(k)
                    k2[bit // 8] ^= 1 << (bit % 8)
                    txn.put(bytes(k2), v, db=db)
                else:
                    v2 = bytearray(v)
                    v2[bit // 8] ^= 1 << (bit % 8)
                    txn.put(k, bytes(v2), db=db)
            env.close()
        outcomes[_trial(tmp_path, template, n, damage)] += 1
    print(kind, "record flips:", len(trials), outcomes)
    assert outcomes == {"refused": len(trials), "right": 0}, outcomes


def test_random_bits_flipped_in_the_index_file_are_refused_or_harmless(tmp_path: Path) -> None:
    """Bits flipped anywhere in data.mdb (pages, page headers, free space): the replay
    gives the right result or the cache is refused with the clear message."""
    template = _schema2_template(tmp_path, "plain")
    size = (template[0] / "index" / "data.mdb").stat().st_size
    rng = random.Random(4)
    outcomes = {"refused": 0, "right": 0}
    for n in range(100):
        offsets = [rng.randrange(8192, size) for _ in range(rng.choice((1, 1, 3)))]

        def damage(index: Path, offsets=offsets) -> None:
            with open(index / "data.mdb", "r+b") as f:
                for off in offsets:
                    f.seek(off)
                    byte = f.read(1)[0]
                    f.seek(off)
                    f.write(bytes([byte ^ (1 << rng.randrange(8))]))
        outcomes[_trial(tmp_path, template, n, damage)] += 1
    print("random flips:", outcomes)
    assert outcomes["refused"] > 0, outcomes


def test_a_journal_entry_damaged_while_mounted_stops_the_replay_there(tmp_path: Path) -> None:
    """Damage that appears after the open: the entries before the damaged one are
    replayed, it and those after it wait, and the reason names it."""
    cache_dir, share, remote_text, key = _unpack("plain", tmp_path)

    async def damage_then_replay(store: Store, sync: SyncManager) -> None:
        with store.env.begin(write=True) as txn:  # entry 5 (the rename) gets a flipped bit
            k = (5).to_bytes(8, "big")
            v = bytearray(txn.get(k, db=store.journal))
            v[v.index(b"renamed.txt") + 2] ^= 0x01  # "reoamed.txt": still a valid entry
            txn.put(k, bytes(v), db=store.journal)
        result = await sync.reintegrate()
        assert not result.complete
        assert "journal entry 5 fails its checksum" in result.reason and "cachefs recover" in result.reason
        assert sync.last_error == result.reason
        assert sync.pending() == 5  # entries 5 to 9

    _with_sync(cache_dir, share, remote_text, key, damage_then_replay)
    got = _expected_share(share)
    assert got["a.txt"] == REPLAYED["a.txt"] and got["nd/new2.txt"] == REPLAYED["nd/new2.txt"]  # 1-4
    assert "old.txt" in got and "renamed.txt" not in got and "reoamed.txt" not in got
    assert "gone.txt" in got  # 5 and what follows wait
