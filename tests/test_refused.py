"""A change the server refused for good (permission, quota: an ``error`` conflict) keeps
the local version: a later listing of the server's version does not replace it, eviction
does not drop it, and ``resolve`` sends it again (``local``), drops it for the server's
(``remote``) or leaves it here (``both``). In-process: a real store, cache and sync
manager over a real local share whose uploads can be refused."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from cachefs.cache.cache import Cache, CacheConfig
from cachefs.store.index import KEPT, ROOT_INO, Store
from cachefs.errors import RemoteError, SyncFailed
from cachefs.remote.local import LocalRemote
from cachefs.link.connectivity import Connectivity
from cachefs.sync.manager import SyncManager
from tests.fixtures.mount import run_recover

OURS = b"changed here, refused there"
THEIRS = b"changed on the server afterwards"


class RefusingRemote(LocalRemote):
    """A local share that refuses uploads while ``refusing`` is set."""

    refusing = True

    def upload(self, path, source, mode, temp_name, times=None):
        if self.refusing:
            raise RemoteError(errno.EACCES, "upload: Permission denied")
        return super().upload(path, source, mode, temp_name, times)


async def _read(cache: Cache, name: bytes) -> bytes:
    node = await cache.lookup(ROOT_INO, name)
    handle = await cache.open(node.ino)
    try:
        return await cache.read(handle, 0, 1 << 20)
    finally:
        cache.release(handle)


async def _write(cache: Cache, name: bytes, data: bytes) -> None:
    node = await cache.lookup(ROOT_INO, name)
    handle = await cache.open(node.ino, os.O_WRONLY | os.O_TRUNC)
    cache.write(handle, 0, data)
    cache.release(handle)


@pytest.mark.parametrize("keep,seen_by", [("local", "listing"), ("remote", "listing"), ("both", "listing"),
                                          ("local", "open")])
def test_a_refused_change_is_kept_until_resolved(tmp_path: Path, keep: str, seen_by: str) -> None:
    """``seen_by``: the server's change is met by a listing of the folder, or by the
    revalidation at an open (the folder's listing still fresh)."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "a.txt").write_bytes(b"the first version")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)

    async def main() -> None:
        store = Store(cache_dir, f"file://{share}")
        remote = RefusingRemote(str(share), 10.0)
        conn = Connectivity(remote)
        await conn.first_connect()
        dir_timeout = 0.01 if seen_by == "listing" else 60.0
        cache = Cache(store, conn, CacheConfig(attr_timeout=0.01, dir_timeout=dir_timeout))
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            sync = SyncManager(store, cache, conn)
            await _read(cache, b"a.txt")
            await _write(cache, b"a.txt", OURS)
            with pytest.raises(SyncFailed) as failed:
                await sync.request_sync()
            assert failed.value.errno == errno.EACCES
            assert [r["kind"] for r in sync.conflicts()] == ["error"]
            if seen_by == "open":  # (the refusal made the folder be listed again: now)
                assert await _read(cache, b"a.txt") == OURS
            # The server's file changes; the folder is listed again, the file opened again.
            (share / "a.txt").write_bytes(THEIRS)
            os.utime(share / "a.txt", (2_000_000_000, 2_000_000_000))
            await trio.sleep(0.05)
            assert await _read(cache, b"a.txt") == OURS  # (was the server's: ours lost)
            node = store.child(ROOT_INO, b"a.txt")
            assert node is not None and node.has(KEPT)
            assert cache.evict_content(node) == 0
            assert await _read(cache, b"a.txt") == OURS

            remote.refusing = False
            await sync.resolve(b"a.txt", keep)
            await sync.request_sync()
            await trio.sleep(0.05)
            names = sorted(os.listdir(share))
            if keep == "local":
                # sent again: the server changed since our base, so both are kept there
                assert (share / "a.txt").read_bytes() == THEIRS
                copies = [n for n in names if "(conflict " in n]
                assert len(copies) == 1 and (share / copies[0]).read_bytes() == OURS, names
            elif keep == "remote":
                assert names == ["a.txt"] and (share / "a.txt").read_bytes() == THEIRS
                assert await _read(cache, b"a.txt") == THEIRS
            else:
                assert names == ["a.txt"] and (share / "a.txt").read_bytes() == THEIRS
                assert await _read(cache, b"a.txt") == OURS  # still here, and only here
            nursery.cancel_scope.cancel()
        store.close()

    trio.run(main)
    if keep == "both":  # the version kept here only is one ``cachefs recover`` saves
        out = tmp_path / "recovered"
        result = run_recover(str(cache_dir), "--to", str(out))
        assert result.returncode == 0, result.stdout + result.stderr
        assert (out / "files" / "a.txt").read_bytes() == OURS, result.stdout


class RefusingXattrs(LocalRemote):
    """A local share whose files refuse extended attributes while ``refusing`` is set."""

    refusing = True

    def set_xattr(self, path, name, value):
        if self.refusing:
            raise RemoteError(errno.EPERM, "setxattr: Operation not permitted")
        super().set_xattr(path, name, value)


@pytest.mark.parametrize("keep", ["local", "remote", "both"])
def test_a_refused_attribute_is_counted_and_settled(tmp_path: Path, keep: str) -> None:
    """An attribute the share refused is an ``error`` conflict that the next sync reports
    (it went uncounted: the sync succeeded, last_error empty); ``local`` sends it again,
    ``remote`` shows the server's again (ours showed for good), ``both`` keeps ours here."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "a.txt").write_bytes(b"a")
    os.setxattr(share / "a.txt", "user.x", b"server")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)

    async def main() -> None:
        store = Store(cache_dir, f"file://{share}")
        remote = RefusingXattrs(str(share), 10.0)
        conn = Connectivity(remote)
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig(attr_timeout=0.01, dir_timeout=0.01))
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            sync = SyncManager(store, cache, conn)
            ino = (await cache.lookup(ROOT_INO, b"a.txt")).ino
            assert await cache.getxattr(ino, b"user.x") == b"server"
            await cache.setxattr(ino, b"user.x", b"ours")
            with pytest.raises(SyncFailed) as failed:
                await sync.request_sync()
            assert failed.value.errno == errno.EPERM
            assert sync.status.last_error
            found = sync.conflicts()
            assert [(r["kind"], r["refused"], r["xattr"]) for r in found] == [("error", "xattr", "user.x")]
            assert not store.get(ino).has(KEPT)  # (the node's other changes go on)
            await sync.request_sync()  # reported once
            remote.refusing = False
            await sync.resolve(b"a.txt", keep)
            await sync.request_sync()
            want_share = b"ours" if keep == "local" else b"server"
            assert os.getxattr(share / "a.txt", "user.x") == want_share
            assert await cache.getxattr(ino, b"user.x") == (b"server" if keep == "remote" else b"ours")
            assert sync.conflicts() == []
            nursery.cancel_scope.cancel()
        store.close()

    trio.run(main)
