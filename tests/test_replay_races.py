"""Changes made while the sync manager's call for an earlier change is on the way, in-process:
a real store, cache and sync manager over a real local share, whose remote pauses inside
the call until the test has made the next change."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import trio

from cachefs.cache.cache import Cache, CacheConfig
from cachefs.store.index import ROOT_INO, Store
from cachefs.remote.local import LocalRemote
from cachefs.link.connectivity import Connectivity
from cachefs.sync.manager import SyncManager


class PausingRemote(LocalRemote):
    """A local share whose ``set_attrs`` waits, once it has begun, for ``go``."""

    def __init__(self, root: str) -> None:
        super().__init__(root, 10.0)
        self.entered = threading.Event()
        self.go = threading.Event()

    def set_attrs(self, path: bytes, mode: int, atime_ns: int, mtime_ns: int) -> None:
        self.entered.set()
        self.go.wait(10)
        super().set_attrs(path, mode, atime_ns, mtime_ns)


def test_mode_changed_while_its_earlier_change_is_sent_reaches_the_server(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "f.txt").write_bytes(b"x")
    os.chmod(share / "f.txt", 0o644)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    store = Store(cache_dir, f"file://{share}")
    remote = PausingRemote(str(share))
    conn = Connectivity(remote)

    async def main() -> None:
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig())
        sync = SyncManager(store, cache, conn)
        ino = (await cache.lookup(ROOT_INO, b"f.txt")).ino
        await cache.setattr(ino, mode=0o640)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync.reintegrate)
            await trio.to_thread.run_sync(remote.entered.wait, 10)
            await cache.setattr(ino, mode=0o600)  # while 0o640 is on the way
            remote.go.set()
        await sync.reintegrate()
        assert sync.pending() == 0
        assert stat.S_IMODE(os.stat(share / "f.txt").st_mode) == 0o600

    try:
        trio.run(main)
    finally:
        store.close()
