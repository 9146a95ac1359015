"""A folder listed again, in-process: a real store and cache over a real local share. A
listing that brings nothing new must not touch the index (``Listings._unchanged_listing``), and
every kind of change on the share must still arrive through it."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import trio

from cachefs.cache.cache import Cache, CacheConfig
from cachefs.cache.common import Freshness
from cachefs.cache.listing import RECHECK_BATCH, RECHECK_ENTRIES
from cachefs.store.index import FULL, ROOT_INO, Store
from cachefs.remote.local import LocalRemote
from cachefs.link.connectivity import Connectivity


def _change_size(d: Path) -> None:
    (d / "a.txt").write_bytes(b"longer content")


def _change_mtime(d: Path) -> None:
    os.utime(d / "a.txt", (1_500_000_000, 1_500_000_000))


def _change_mode(d: Path) -> None:
    os.chmod(d / "a.txt", 0o600)


def _add_name(d: Path) -> None:
    (d / "new.txt").write_bytes(b"n")


def _remove_name(d: Path) -> None:
    (d / "b.txt").unlink()


def _file_becomes_folder(d: Path) -> None:
    (d / "b.txt").unlink()
    (d / "b.txt").mkdir()


def _add_subfolder(d: Path) -> None:
    (d / "sub2").mkdir()


def _hard_link(d: Path) -> None:
    os.link(d / "a.txt", d / "sub" / "a-link.txt")


def _cache_of(tmp_path: Path, share: Path) -> tuple[Store, Connectivity]:
    """A store in tmp_path/cache and a connection to the local share."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    return Store(cache_dir, f"file://{share}"), Connectivity(LocalRemote(str(share), 10.0))


def _writes_to(store: Store) -> list:
    """The index's write transactions from now on (one item each)."""
    writes: list = []
    run_write = store.run_write
    store.run_write = lambda *a, **k: (writes.append(a), run_write(*a, **k))[1]
    return writes


def _view(children) -> dict:
    return {c.name: (c.mode, c.size, c.mtime_ns // 10**9, c.nlink) for c in children}


@pytest.mark.parametrize("change", [None, _change_size, _change_mtime, _change_mode, _add_name,
                                    _remove_name, _file_becomes_folder, _add_subfolder, _hard_link])
def test_folder_listed_again(tmp_path: Path, change) -> None:
    share = tmp_path / "share"
    d = share / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_bytes(b"a")
    (d / "b.txt").write_bytes(b"b")
    os.utime(d / "a.txt", (1_600_000_000, 1_600_000_000))
    store, conn = _cache_of(tmp_path, share)

    async def main() -> None:
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig())
        ino = (await cache.lookup(ROOT_INO, b"d")).ino
        await cache.listdir(ino)
        await cache.listdir(ino, refresh=True)  # once more: the index agrees with the share now
        writes = _writes_to(store)
        if change is not None:
            change(d)
        children = await cache.listdir(ino, refresh=True)
        # What a fresh cache lists from the share as it is now:
        fresh_dir = tmp_path / "fresh"
        fresh_dir.mkdir(mode=0o700)
        fresh = Cache(Store(fresh_dir, f"file://{share}"), conn, CacheConfig())
        expected = await fresh.listdir((await fresh.lookup(ROOT_INO, b"d")).ino)
        fresh.store.close()
        assert _view(children) == _view(expected)
        assert _view(store.children(ino)) == _view(expected)
        if change is None:
            assert writes == []  # nothing new: the index was not written
        else:
            assert writes

    try:
        trio.run(main)
    finally:
        store.close()
        shutil.rmtree(tmp_path / "fresh", ignore_errors=True)


def test_files_read_whole_keep_their_folder_listing(tmp_path: Path) -> None:
    """The checkpoint that marks files whole marks them in the folder's kept listing too,
    which stays kept: listed again, the folder is compared with it and nothing is written."""
    share = tmp_path / "share"
    (share / "d").mkdir(parents=True)
    for i in range(5):
        (share / "d" / f"f{i}").write_bytes(b"%d" % i * 100_000)  # (no small-file batches)
    store, conn = _cache_of(tmp_path, share)

    async def main() -> None:
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig())
        async with trio.open_nursery() as nursery:
            cache.start_fetching(nursery)  # (for the fetches; no checkpoint but the test's own)
            await read_three(cache)
            nursery.cancel_scope.cancel()

    async def read_three(cache: Cache) -> None:
        ino = (await cache.lookup(ROOT_INO, b"d")).ino
        await cache.listdir(ino)
        for name in (b"f0", b"f1", b"f2"):
            handle = await cache.open((await cache.lookup(ino, name)).ino)
            assert await cache.read(handle, 0, 1 << 20) == (share / "d" / name.decode()).read_bytes()
            cache.release(handle)
        await cache.checkpoint()
        assert all(store.get(n.ino).has(FULL) == (n.name in (b"f0", b"f1", b"f2"))
                   for n in store.children(ino))
        kept = cache._listings.kept_names(ino)
        assert kept is not None  # the checkpoint left the kept listing in place
        assert {name for name, node in kept.items() if node.has(FULL)} == {b"f0", b"f1", b"f2"}
        writes = _writes_to(store)
        children = await cache.listdir(ino, refresh=True)
        assert writes == []
        assert [cache.content_state(n) for n in children] == ["cached"] * 3 + ["remote"] * 2

    try:
        trio.run(main)
    finally:
        store.close()


def test_freshness_is_pruned_of_what_timed_out() -> None:
    """Times older than the timeout count as none, and go once the table has doubled:
    the table holds what was marked within one timeout, not every node ever listed."""
    fresh = Freshness(ttl=10.0)
    now = time.monotonic()
    fresh.mark_all(list(range(1000)), now - 20)  # timed out already
    fresh.mark_all(list(range(1000, 1100)), now)
    assert len(fresh) == 100  # (1,100 > 1,024: pruned)
    assert fresh.fresh(1050) and not fresh.fresh(5)
    fresh.mark_all(list(range(2000, 2500)), now - 20)
    assert len(fresh) == 600  # (not doubled since: nothing pruned)
    fresh.drop(1050)
    assert not fresh.fresh(1050)


def test_listing_many_folders_keeps_few_times(tmp_path: Path) -> None:
    """Folders listed one after the other, each a timeout after the last, leave the times
    of the last ones only (every node's check time was kept for the mount's life: about
    70 MiB per million nodes listed)."""
    share = tmp_path / "share"
    for d in range(8):
        (share / f"d{d}").mkdir(parents=True)
        for i in range(1000):
            (share / f"d{d}" / f"f{i}").touch()
    store, conn = _cache_of(tmp_path, share)

    async def main() -> None:
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig(attr_timeout=0.05, dir_timeout=0.05))
        for d in range(8):
            folder = await cache.lookup(ROOT_INO, b"d%d" % d)
            assert len(await cache.listdir(folder.ino)) == 1000
            await trio.sleep(0.06)
        sizes = cache._listings.sizes()
        assert sizes["checked"] <= 2 * 1001 + 1024, sizes  # (8,000 and more before)

    try:
        trio.run(main)
    finally:
        store.close()


def test_a_stale_files_last_use_stays(tmp_path: Path) -> None:
    """A file whose content a listing finds stale (the server's version changed) keeps its
    last use: only its content went, and it is read again on handles already open, which
    renew no open. Its content evicted, the last use goes with it."""
    share = tmp_path / "share"
    (share / "d").mkdir(parents=True)
    (share / "d" / "a.txt").write_bytes(b"a" * 100)
    store, conn = _cache_of(tmp_path, share)

    async def main() -> None:
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig())
        d = await cache.lookup(ROOT_INO, b"d")
        node = await cache.lookup(d.ino, b"a.txt")
        async with trio.open_nursery() as nursery:
            cache.start_fetching(nursery)
            handle = await cache.open(node.ino)
            assert await cache.read(handle, 0, 100) == b"a" * 100
            cache.release(handle)
            used = cache.last_use(node)
            assert used > 0
            (share / "d" / "a.txt").write_bytes(b"b" * 200)  # the server's version changes
            await cache.listdir(d.ino, refresh=True)
            assert cache.content_state(store.get(node.ino)) == "remote"  # dropped as stale
            assert cache.last_use(store.get(node.ino)) == used
            handle = await cache.open(node.ino)
            assert await cache.read(handle, 0, 200) == b"b" * 200
            cache.release(handle)
            await cache.checkpoint()
            node = store.get(node.ino)
            assert cache.evict_content(node) == 200
            assert cache.last_use(node) == node.last_use  # (what the index holds, 0 here)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        store.close()


def test_a_change_run_again_after_the_map_grew_holds_its_folder_once(tmp_path: Path) -> None:
    """A write transaction is run again when the index's map had to grow: the change's
    folder is held as local truth once (its journal entry's replay releases it once), not
    once per attempt, which kept it from being listed again until a restart."""
    import lmdb
    share = tmp_path / "share"
    share.mkdir()
    store, conn = _cache_of(tmp_path, share)
    run_write = store.run_write
    attempts = []

    def full_once(fn, *args, **kw):
        def first_fails(txn):
            result = fn(txn)
            attempts.append(1)
            if len(attempts) == 1:
                raise lmdb.MapFullError("as if the map were full")
            return result
        return run_write(first_fails, *args, **kw)

    async def main() -> None:
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig())
        await cache.listdir(ROOT_INO)  # (so that the mkdir's own transaction comes first)
        store.run_write = full_once
        node = await cache.mkdir(ROOT_INO, b"new", 0o755)
        store.run_write = run_write
        assert len(attempts) == 2  # (the change was run again)
        folders = store.journal_ops()[-1].folders()
        assert folders and all(cache._listings.local_dirs.get(f) == 1 for f in folders), \
            cache._listings.local_dirs
        assert node.name == b"new"

    try:
        trio.run(main)
    finally:
        store.close()


def test_content_the_sync_manager_drops_leaves_the_count_of_cached_bytes(tmp_path: Path) -> None:
    """When the replay changed the server under a file (``remote_changed``), its dropped
    content leaves the running count of cached bytes that eviction works from."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "a.txt").write_bytes(b"a" * 1000)
    store, conn = _cache_of(tmp_path, share)

    async def main() -> None:
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig())
        node = await cache.lookup(ROOT_INO, b"a.txt")
        async with trio.open_nursery() as nursery:
            cache.start_fetching(nursery)
            handle = await cache.open(node.ino)
            assert await cache.read(handle, 0, 1000) == b"a" * 1000
            cache.release(handle)
            assert cache.cached_bytes() == 1000
            cache.remote_changed(node.ino, ROOT_INO)
            assert cache.content_state(store.get(node.ino)) == "remote"
            assert cache.cached_bytes() == 0
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        store.close()


def test_folders_listed_before_are_checked_again_several_to_a_call(tmp_path: Path) -> None:
    """On a fast link the listers ahead of a reader list a folder never listed alone, and
    check again those listed before several to a call (``Listings._next_batch``): up to
    ``RECHECK_BATCH``, with ``RECHECK_ENTRIES`` entries between them, a larger one alone."""
    share = tmp_path / "share"
    for d in range(12):
        (share / f"d{d:02}").mkdir(parents=True)
        for i in range(3):
            (share / f"d{d:02}" / f"f{i}").write_bytes(b"x")
    (share / "e-big").mkdir()
    for i in range(RECHECK_ENTRIES):
        (share / "e-big" / f"f{i}").touch()
    store, conn = _cache_of(tmp_path, share)
    calls: list[list[bytes]] = []  # each call's folders (the local remote's listdir_many
    remote = conn.remote            # calls listdir for each: those are not calls of their own)
    remote.listdir_many = lambda paths: (calls.append(list(paths)), [one(p) for p in paths])[1]  # type: ignore[method-assign]
    remote.listdir = lambda path: (calls.append([path]), one(path))[1]  # type: ignore[method-assign]

    def one(path: bytes) -> list:
        return type(remote).listdir(remote, path)
    subfolders = sorted(p.name.encode() for p in share.iterdir())

    async def listed_ahead(cache: Cache) -> list[list[bytes]]:
        calls.clear()
        await cache.listdir(ROOT_INO, refresh=True, prefetch_subfolders=True)
        inos = [(await cache.lookup(ROOT_INO, name)).ino for name in subfolders]
        with trio.fail_after(10):
            while not all(cache._listings._listed.fresh(ino) for ino in inos):
                await trio.sleep(0.01)
        return [c for c in calls if c != [b""]]  # (the root's own listing left out)

    async def main() -> None:
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig(attr_timeout=0.5, dir_timeout=0.5))
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            first = await listed_ahead(cache)
            assert sorted(first) == [[name] for name in subfolders]  # never listed: one to a call
            await trio.sleep(0.6)  # (every listing stale now)
            again = await listed_ahead(cache)
            assert sorted(p for c in again for p in c) == subfolders  # each once
            assert [b"e-big"] in again  # too large to go with others
            assert max(len(c) for c in again) == RECHECK_BATCH
            assert len(again) <= 4  # (12 small folders: 8 + 4, or fewer at a time)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        store.close()


_NAMES = [b"d%02d" % d for d in range(6)]


def _six_folders(tmp_path: Path) -> tuple[Store, Connectivity]:
    for name in _NAMES:
        (tmp_path / "share" / name.decode()).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "share" / name.decode() / f"f{i}").write_bytes(b"x")
    return _cache_of(tmp_path, tmp_path / "share")


async def _listed_then_stale(cache: Cache, ttl: float) -> list[int]:
    """Every subfolder of the root listed once, then stale; their inode numbers."""
    await cache.listdir(ROOT_INO, refresh=True, prefetch_subfolders=True)
    inos = [(await cache.lookup(ROOT_INO, name)).ino for name in _NAMES]
    with trio.fail_after(10):
        while not all(cache._listings._listed.fresh(ino) for ino in inos):
            await trio.sleep(0.01)
    await trio.sleep(ttl + 0.1)
    return inos


def test_a_folder_found_gone_by_a_check_ahead_leaves_its_parent(tmp_path: Path) -> None:
    """A folder checked again ahead with others (``_list_together``) and found gone on the
    server has its parent listed again, as a folder checked alone does (reviewed: the
    batch passed over it, and the parent kept showing it until its own listing timed
    out)."""
    store, conn = _six_folders(tmp_path)

    async def main() -> None:
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig(attr_timeout=1, dir_timeout=1, callbacks="off"))
        listings = cache._listings
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            await _listed_then_stale(cache, 1)
            await cache.listdir(ROOT_INO, refresh=True)  # the root current, its subfolders stale
            shutil.rmtree(tmp_path / "share" / "d02")  # gone on the server since
            await cache.listdir(ROOT_INO, prefetch_subfolders=True)  # checks ahead: one batch
            with trio.fail_after(5):
                while listings._prefetching or listings._queue:
                    await trio.sleep(0.01)
            await trio.sleep(0.1)
            names = sorted(c.name for c in await cache.listdir(ROOT_INO))
            assert names == [n for n in _NAMES if n != b"d02"]
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        store.close()


def test_a_check_ahead_in_flight_is_given_up_when_the_mount_goes_offline(tmp_path: Path) -> None:
    """A batch of checks ahead under way when the link goes is given up at once, and its
    folders' locks with it (reviewed: it held them until its call's own deadline, and a
    program's ls of one of them waited that long once the link was back)."""
    store, conn = _six_folders(tmp_path)
    silent, release, hung = threading.Event(), threading.Event(), []

    def gated(real):  # a call that hangs while the link is silent (the root's answers)
        def call(arg):
            if silent.is_set() and arg != b"":
                hung.append(arg)
                release.wait(30)
            return real(arg)
        return call

    conn.remote.listdir = gated(conn.remote.listdir)  # type: ignore[method-assign]
    conn.remote.listdir_many = gated(conn.remote.listdir_many)  # type: ignore[method-assign]

    async def main() -> None:
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig(attr_timeout=0.5, dir_timeout=0.5, callbacks="off"))
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            inos = await _listed_then_stale(cache, 0.5)
            silent.set()
            await cache.listdir(ROOT_INO, refresh=True, prefetch_subfolders=True)
            with trio.fail_after(5):
                while not hung:
                    await trio.sleep(0.01)
            conn.report_failure("link cut")  # (a call timed out, say)
            await trio.sleep(0.2)
            silent.clear()
            assert await conn.try_connect()
            started = time.monotonic()
            with trio.move_on_after(5):
                await cache.listdir(inos[0])
            release.set()
            assert time.monotonic() - started < 2
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        release.set()
        store.close()
