"""A folder listed again, in-process: a real store and cache over a real local share. A
listing that brings nothing new must not touch the index (``Cache._unchanged_listing``), and
every kind of change on the share must still arrive through it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio

from cachefs.cache.cache import Cache, CacheConfig
from cachefs.cache.store import ROOT_INO, Store
from cachefs.remote.local import LocalRemote
from cachefs.sync.connectivity import Connectivity


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
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    store = Store(cache_dir, f"file://{share}")
    conn = Connectivity(LocalRemote(str(share), 10.0))

    async def main() -> None:
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig())
        ino = (await cache.lookup(ROOT_INO, b"d")).ino
        await cache.listdir(ino)
        await cache.listdir(ino, refresh=True)  # once more: the index agrees with the share now
        writes = []
        run_write = store.run_write
        store.run_write = lambda *a, **k: (writes.append(a), run_write(*a, **k))[1]
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
