"""The store and byte-range logic, in-process (no FUSE, no network)."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import lmdb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefs.store import ranges as rangeset
from cachefs.defaults import parse_size
from cachefs.store.index import DIRTY, FULL, ROOT_INO, Node, Store, StoreError
from cachefs.cache.listing import apply_listing
from cachefs.remote.base import RemoteStat
from cachefs.store.journal import Op
from tests.fixtures.mount import tmpfs


# -- ranges ---------------------------------------------------------------------------------
def test_add_merges_overlapping_and_adjacent() -> None:
    rs = rangeset.add([], 10, 20)
    rs = rangeset.add(rs, 30, 40)
    assert rs == [(10, 20), (30, 40)]
    assert rangeset.add(rs, 20, 30) == [(10, 40)]
    assert rangeset.add(rs, 0, 5) == [(0, 5), (10, 20), (30, 40)]
    assert rangeset.add(rs, 15, 35) == [(10, 40)]


def test_missing_and_covers() -> None:
    rs = [(0, 10), (20, 30)]
    assert rangeset.missing(rs, 0, 30) == [(10, 20)]
    assert rangeset.missing(rs, 5, 25) == [(10, 20)]
    assert rangeset.missing(rs, 25, 40) == [(30, 40)]
    assert rangeset.covers(rs, 21, 29)
    assert not rangeset.covers(rs, 9, 11)
    assert rangeset.clip(rs, 25) == [(0, 10), (20, 25)]


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 60)), max_size=20),
       st.integers(0, 250), st.integers(0, 60))
def test_ranges_agree_with_a_set_of_bytes(spans: list[tuple[int, int]], start: int, length: int) -> None:
    rs: rangeset.Ranges = []
    present: set[int] = set()
    for s, n in spans:
        rs = rangeset.add(rs, s, s + n)
        present.update(range(s, s + n))
    assert rangeset.total(rs) == len(present)
    assert all(a < b for a, b in rs) and all(rs[i][1] < rs[i + 1][0] for i in range(len(rs) - 1))
    gaps = rangeset.missing(rs, start, start + length)
    assert {i for a, b in gaps for i in range(a, b)} == set(range(start, start + length)) - present
    assert rangeset.decode(rangeset.encode(rs)) == rs


def test_parse_size() -> None:
    assert parse_size("10G") == 10 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5GiB") == int(1.5 * (1 << 30))
    assert parse_size("4096") == 4096
    for bad in ("", "lots", "-1M", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


# -- records --------------------------------------------------------------------------------
def test_node_record_round_trip_keeps_bytes_names() -> None:
    node = Node(ino=99, parent=1, name=b"caf\xe9\nx", mode=stat.S_IFLNK | 0o777, size=3,
                mtime_ns=1_700_000_000_123_456_789, atime_ns=1, ctime_ns=2, uid=5, gid=6,
                nlink=1, flags=FULL | DIRTY, base=(3, 1_700_000_000_000_000_000, stat.S_IFLNK),
                last_use=12.5, target=b"../t\xff", gen=7, synced_gen=4)
    assert Node.unpack(99, node.pack()) == node


@given(parent=st.integers(0, 2**64 - 1), name=st.binary(min_size=1, max_size=255),
       target=st.binary(max_size=300), size=st.integers(0, 2**64 - 1),
       base=st.none() | st.tuples(st.integers(0, 2**63 - 1), st.integers(-2**63, 2**63 - 1),
                                  st.integers(0, 2**32 - 1)))
def test_parent_and_name_read_what_unpack_reads(parent: int, name: bytes, target: bytes, size: int,
                                                base: tuple[int, int, int] | None) -> None:
    # The path walk reads two fields at fixed offsets instead of the whole record.
    node = Node(ino=7, parent=parent, name=name, mode=stat.S_IFREG | 0o644, size=size,
                mtime_ns=-5, atime_ns=6, ctime_ns=7, base=base, last_use=3.25, target=target,
                gen=2**64 - 1, synced_gen=1)
    data = node.pack()
    whole = Node.unpack(7, data)
    assert Node.parent_and_name(7, data) == (whole.parent, whole.name) == (parent, name)
    with pytest.raises(StoreError, match="truncated"):
        Node.parent_and_name(7, data[:Node._HEAD.size + len(name) - 1])


def test_unknown_record_version_is_refused() -> None:
    data = bytearray(Node(2, 1, b"x", stat.S_IFREG, 0, 0, 0, 0).pack())
    data[0] = 9
    for read in (Node.unpack, Node.parent_and_name):
        with pytest.raises(StoreError, match="record version"):
            read(2, bytes(data))


def test_journal_op_round_trip() -> None:
    op = Op("rename", 17, b"a/caf\xe9", base=(1, 2, stat.S_IFREG), parent=3, dst=b"b/new\nname",
            dst_parent=4, replaced=9, replaced_base=(5, 6, stat.S_IFREG))
    back = Op.decode(42, op.encode())
    assert back.seq == 42
    back.seq = 0
    assert back == op


# -- the store ------------------------------------------------------------------------------
def _rstat(kind: int, size: int = 0, mtime: int = 1) -> RemoteStat:
    return RemoteStat(mode=kind | 0o644, size=size, mtime_ns=mtime * 10**9, atime_ns=0)


def test_store_creates_private_dir_and_refuses_a_second_user(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    store = Store(d, "file:///x")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    with pytest.raises(StoreError, match="in use"):
        Store(d, "file:///x")
    store.close()
    Store(d, "file:///x").close()  # reopens once released


def test_store_refuses_a_cache_of_another_remote_or_schema(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    Store(d, "file:///x").close()
    with pytest.raises(StoreError, match="belongs to remote"):
        Store(d, "file:///y")
    store = Store(d, "file:///x")
    with store.env.begin(write=True) as txn:
        txn.put(b"schema", b"999", db=store.meta)  # (the one value kept raw: read first)
    store.close()
    with pytest.raises(StoreError, match="schema 999, this release reads schemas 1 and 2"):
        Store(d, "file:///x")


def test_an_emptied_index_is_refused(tmp_path: Path) -> None:
    """An index replaced by an empty one (LMDB makes one where the file is empty) is
    damage, never a new cache: its journal would be lost without a word."""
    d = tmp_path / "cache"
    Store(d, "file:///x").close()
    assert (d / "index-made").exists()
    for name in ("data.mdb", "lock.mdb"):
        os.unlink(d / "index" / name)
    lmdb.open(str(d / "index"), max_dbs=12).close()  # a new, empty environment
    with pytest.raises(StoreError, match=r"damaged \(it holds no records: it was emptied\).*cachefs recover"):
        Store(d, "file:///x")


def test_a_cache_without_its_mark_is_marked_and_one_with_content_needs_its_index(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    store = Store(d, "file:///x")
    os.close(store.new_content_file(20))
    store.close()
    os.unlink(d / "index-made")  # a cache made before the mark
    Store(d, "file:///x").close()
    assert (d / "index-made").exists()  # marked at its next open
    os.unlink(d / "index-made")
    os.unlink(d / "index" / "data.mdb")
    # Without the mark, content files say that an index was there.
    with pytest.raises(StoreError, match=r"data.mdb is missing\).*cachefs recover"):
        Store(d, "file:///x")
    assert not (d / "index" / "data.mdb").exists()  # nothing made in its place
    fresh = tmp_path / "fresh"
    fresh.mkdir(mode=0o700)
    (fresh / "data").mkdir(mode=0o700)
    Store(fresh, "file:///x").close()  # a new cache (an empty data/ is no evidence)


def test_store_refuses_a_directory_others_may_write(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(StoreError, match="writable by group or others"):
        Store(d, "file:///x")


def test_apply_listing_adds_updates_and_removes(tmp_path: Path) -> None:
    store = Store(tmp_path / "c", "file:///x")
    apply_listing(store, ROOT_INO, [(b"a", _rstat(stat.S_IFREG, 5)), (b"d", _rstat(stat.S_IFDIR))])
    a = store.child(ROOT_INO, b"a")
    assert a is not None and a.size == 5 and a.base == (5, 10**9, stat.S_IFREG)
    assert [n.name for n in store.children(ROOT_INO)] == [b"a", b"d"]
    assert store.path_of(store.child(ROOT_INO, b"d").ino) == b"d"

    # The same listing again writes nothing, and no kept listing counts as changed.
    generations = (store.generation, dict(store.folder_generation))
    again = apply_listing(store, ROOT_INO, [(b"a", _rstat(stat.S_IFREG, 5)), (b"d", _rstat(stat.S_IFDIR))])
    assert again.same and not again.changed and not again.removed
    assert again.children == store.children(ROOT_INO)
    assert (store.generation, store.folder_generation) == generations

    delta = apply_listing(store, ROOT_INO, [(b"a", _rstat(stat.S_IFREG, 7, 2))])
    assert not delta.same and store.folder_generation != generations[1]
    assert delta.children == store.children(ROOT_INO)  # handed back as written, unpacked or not
    assert [n.ino for n in delta.changed] == [a.ino]
    assert [n.name for n in delta.removed] == [b"d"]
    assert store.child(ROOT_INO, b"a").size == 7
    assert store.child(ROOT_INO, b"d") is None

    # A node with local changes is not overwritten nor removed by a listing.
    node = store.child(ROOT_INO, b"a")
    node.flags |= DIRTY
    node.size = 100
    store.put(node)
    apply_listing(store, ROOT_INO, [])
    kept = store.child(ROOT_INO, b"a")
    assert kept is not None and kept.size == 100
    store.close()


def test_apply_listing_leaves_a_file_open_for_writing_as_it_is(tmp_path: Path) -> None:
    """A writer that has not written yet is about to: the server's new version must not
    replace the node (its content would be dropped under the writer)."""
    store = Store(tmp_path / "c", "file:///x")
    apply_listing(store, ROOT_INO, [(b"a", _rstat(stat.S_IFREG, 5)), (b"b", _rstat(stat.S_IFREG, 5))])
    a, b = store.child(ROOT_INO, b"a"), store.child(ROOT_INO, b"b")
    delta = apply_listing(store, ROOT_INO, [(b"a", _rstat(stat.S_IFREG, 7, 2)), (b"b", _rstat(stat.S_IFREG, 7, 2))],
                          keep=lambda ino: ino == a.ino)
    assert [n.ino for n in delta.changed] == [b.ino]
    assert store.child(ROOT_INO, b"a") == a and store.child(ROOT_INO, b"b").size == 7
    store.close()


@pytest.mark.parametrize("key", [None, b"k" * 32], ids=["plain", "sealed"])
def test_a_first_listing_is_written_as_the_general_path_would(tmp_path: Path, key) -> None:
    """A folder listed with no entry cached takes the batch path (``_Applied._take_new``,
    ``Txn.add_children``): the records, the order of the children handed back and the
    next inode number are those of a listing applied entry by entry (the same listing
    applied to a folder that had one entry, which then goes)."""
    listing = [(b"f%03d" % i, _rstat(stat.S_IFREG, i, i)) for i in range(300)]
    listing += [(b"caf\xe9", _rstat(stat.S_IFDIR)), (b"l", _rstat(stat.S_IFLNK, 3))]
    random.Random(5).shuffle(listing)
    first = Store(tmp_path / "a", "file:///x", key=key)
    delta = apply_listing(first, ROOT_INO, listing)
    general = Store(tmp_path / "b", "file:///x", key=key)
    apply_listing(general, ROOT_INO, [(b"old", _rstat(stat.S_IFREG))])
    apply_listing(general, ROOT_INO, listing)
    assert not delta.same and not delta.changed and not delta.removed
    assert delta.children == first.children(ROOT_INO)  # in the order children reads them
    assert [n.name for n in first.children(ROOT_INO)] == [n.name for n in general.children(ROOT_INO)]
    for made, expected in zip(first.children(ROOT_INO), general.children(ROOT_INO)):
        assert (made.mode, made.size, made.mtime_ns, made.atime_ns, made.ctime_ns, made.nlink, made.base,
                made.flags, made.parent) == (expected.mode, expected.size, expected.mtime_ns, expected.atime_ns,
                                             expected.ctime_ns, expected.nlink, expected.base, expected.flags,
                                             expected.parent)
        assert first.child(ROOT_INO, made.name) == made
        assert first.path_of(made.ino) == made.name
    assert first.get(ROOT_INO).nlink == 3  # one subfolder
    inos = sorted(n.ino for n in first.children(ROOT_INO))
    assert inos == list(range(inos[0], inos[0] + len(listing)))
    again = apply_listing(first, ROOT_INO, [(b"new", _rstat(stat.S_IFREG))] + listing)
    assert first.child(ROOT_INO, b"new").ino == inos[-1] + 1  # numbers move on past the batch
    assert [n.name for n in again.removed] == []
    first.close()
    general.close()


@pytest.mark.parametrize("key", [None, b"k" * 32], ids=["plain", "sealed"])
def test_changed_files_are_fitted_to_their_recorded_size_at_open(tmp_path: Path, key) -> None:
    """A kill between a write's bytes and its size, or between a truncation's size and
    the cut, leaves content longer or shorter than the index says: the next open fits
    the files with local changes to their recorded size (bytes past it would show again
    when the file grows), and leaves clean files alone."""
    store = Store(tmp_path / "c", "file:///x", key=key)
    apply_listing(store, ROOT_INO, [(name, _rstat(stat.S_IFREG, 10)) for name in (b"long", b"short", b"clean")])
    sizes = {b"long": 5, b"short": 20, b"clean": 10}
    written = {b"long": b"L" * 12, b"short": b"S" * 10, b"clean": b"C" * 15}
    for name, size in sizes.items():
        node = store.child(ROOT_INO, name)
        node.size = size
        node.flags |= FULL | (DIRTY if name != b"clean" else 0)
        store.put(node)
        fd = os.open(store.content_path(node.ino), os.O_RDWR | os.O_CREAT, 0o600)
        store.content.pwrite(fd, written[name], 0)
        os.close(fd)
    inos = {name: store.child(ROOT_INO, name).ino for name in sizes}
    store.close()

    store = Store(tmp_path / "c", "file:///x", key=key)
    for name, want in {b"long": b"L" * 5, b"short": b"S" * 10 + bytes(10), b"clean": b"C" * 15}.items():
        fd = os.open(store.content_path(inos[name]), os.O_RDONLY)
        try:
            got = store.content.pread(fd, 64, 0)  # (the sealed codec reads zeros past the end)
        finally:
            os.close(fd)
        assert got[:len(want)] == want and not got[len(want):].strip(b"\0"), (name, got)
    store.close()


def test_journal_append_is_ordered_and_survives_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path / "c", "file:///x")
    for i in range(5):
        store.transact(lambda t, i=i: t.append(Op("mkdir", 100 + i, b"d%d" % i, parent=1)))
    store.close()
    store = Store(tmp_path / "c", "file:///x")
    ops = store.journal_ops()
    assert [op.path for op in ops] == [b"d0", b"d1", b"d2", b"d3", b"d4"]
    assert [op.seq for op in ops] == sorted(op.seq for op in ops)
    store.close()



@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    with tmpfs(tmp_path / "tmpfs", 12) as path:
        yield path


def test_index_map_stays_allocated_as_it_grows_and_a_full_disk_is_a_clean_error(tiny_tmpfs: Path) -> None:
    """With writemap, a write into a hole of the map would kill the mount with SIGBUS on a
    full disk: the map is allocated whole, at open and at each growth, and a growth the
    disk has no room for is ENOSPC, with everything committed before still there."""
    import errno
    cache = tiny_tmpfs / "cache"
    store = Store(cache, "file:///x", map_size=1 << 20)
    assert store.writemap
    data_mdb = cache / "index" / "data.mdb"

    def fill(first: int, count: int) -> None:
        for ino in range(first, first + count):
            store.put(Node(ino=ino, parent=ROOT_INO, name=b"n%07d" % ino + b"x" * 200,
                           mode=stat.S_IFREG | 0o644, size=ino, mtime_ns=0, atime_ns=0, ctime_ns=0))

    fill(100, 8000)  # ~2.5 MiB of records: the 1 MiB map doubles twice or more
    map_size = store.env.info()["map_size"]
    assert map_size >= 4 << 20
    assert os.stat(data_mdb).st_blocks * 512 >= map_size, "the grown map is not allocated"
    fd = os.open(tiny_tmpfs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)  # the rest of the disk
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with pytest.raises(OSError) as refused:
        fill(10_000, 200_000)
    assert refused.value.errno == errno.ENOSPC, refused.value
    assert "disk is full" in str(refused.value)
    assert store.get(100).size == 100 and store.get(8099).size == 8099
    os.unlink(tiny_tmpfs / "filler")
    fill(300_000, 8000)  # room again: the map grows on
    assert store.get(307_999).size == 307_999
    store.close()


def test_index_without_room_for_its_map_runs_without_writemap(tiny_tmpfs: Path) -> None:
    cache = tiny_tmpfs / "cache"
    store = Store(cache, "file:///x", map_size=64 << 20)  # more than the disk holds
    assert not store.writemap
    store.put(Node(ino=100, parent=ROOT_INO, name=b"a", mode=stat.S_IFREG | 0o644, size=7,
                   mtime_ns=0, atime_ns=0, ctime_ns=0))
    assert store.get(100).size == 7
    store.close()
