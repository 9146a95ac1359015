"""What content checksums cost (issue 19, items 3 and 11), in-process.

    python bench/sums.py            # all parts; the replay part starts a private sshd

- the hash functions on this machine (MiB/s, and one 4 KiB buffer);
- creates of 4 KiB files: the handler work (create, write, release) and the commit that
  records their sums (``Cache.commit_changes``), per file;
- the commit of one 100 MiB file released (its SHA-256, in a worker thread);
- the base sums of 2,000 small files made whole at a checkpoint;
- ``store`` replays per second over the test sshd with and without the server's hashes
  (one ``sha256sum`` exec per batch of 8), alternated in the same run.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachefs.address import parse_remote  # noqa: E402
from cachefs.cache.cache import Cache, CacheConfig  # noqa: E402
from cachefs.store.index import ROOT_INO, Store  # noqa: E402
from devtools.devserver import SshServer  # noqa: E402
from cachefs.remote import open_remote  # noqa: E402
from cachefs.remote.local import LocalRemote  # noqa: E402
from cachefs.remote.options import ConnectOptions  # noqa: E402
from cachefs.link.connectivity import Connectivity  # noqa: E402
from cachefs.sync.manager import SyncManager  # noqa: E402


def hashes() -> None:
    data = os.urandom(64 << 20)
    small = os.urandom(4096)
    for name, fn in [("sha256", lambda d: hashlib.sha256(d).digest()),
                     ("blake2b", lambda d: hashlib.blake2b(d).digest()),
                     ("crc32", zlib.crc32)]:
        best = min(_timed(fn, data) for _ in range(3))
        t = time.perf_counter()
        for _ in range(20000):
            fn(small)
        per = (time.perf_counter() - t) / 20000 * 1e6
        print(f"{name:8s} {64 / best:6.0f} MiB/s   4 KiB: {per:.2f} us")


def _timed(fn, arg) -> float:
    t = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t


async def _parts(root: Path, remote, text: str):
    cache_dir = root / "cache"
    cache_dir.mkdir(mode=0o700)
    store = Store(cache_dir, text)
    conn = Connectivity(remote)
    await conn.first_connect()
    cache = Cache(store, conn, CacheConfig(checkpoint_interval=3600))
    return store, conn, cache


def creates_and_release(n: int = 2000) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / "share").mkdir()
            store, _conn, cache = await _parts(root, LocalRemote(str(root / "share"), 10.0), "local")
            data = os.urandom(4096)
            t = time.perf_counter()
            for i in range(n):
                node, handle = await cache.create(ROOT_INO, b"f%d" % i, 0o644, os.O_WRONLY)
                cache.write(handle, 0, data)
                cache.release(handle)
            made = time.perf_counter() - t
            t = time.perf_counter()
            cache._writes.commit_held()
            held = time.perf_counter() - t
            t = time.perf_counter()
            await cache.commit_changes()
            summed = time.perf_counter() - t
            assert store.content_sum(node.ino) is not None
            print(f"create+write+release of a 4 KiB file: {made / n * 1e6:.1f} us; its commit: "
                  f"{held / n * 1e6:.1f} us; its checksum at that commit: {summed / n * 1e6:.1f} us "
                  f"(trio thread, {n} files)")
            big = os.urandom(1 << 20)
            node, handle = await cache.create(ROOT_INO, b"big", 0o644, os.O_WRONLY)
            for i in range(100):
                cache.write(handle, i << 20, big)
            cache.release(handle)
            cache._writes.commit_held()
            t0 = trio.current_time()
            t = time.perf_counter()
            await cache.commit_changes()
            print(f"commit of a released 100 MiB file: {(time.perf_counter() - t) * 1e3:.0f} ms "
                  "(its SHA-256, in a worker thread)")
            del t0
            store.close()
    trio.run(main)


def base_sums(n: int = 2000) -> None:
    """A writer's open of a clean, whole 4 KiB file records its base sum first: the open
    with it and without it (the remote said it cannot hash), alternated."""
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            share = root / "share"
            share.mkdir()
            for i in range(n):
                (share / f"f{i}").write_bytes(os.urandom(4096))
            remote = LocalRemote(str(share), 10.0)
            store, _conn, cache = await _parts(root, remote, "local")
            async with trio.open_nursery() as nursery:
                await nursery.start(cache.run)
                nodes = []
                for i in range(n):
                    node = await cache.lookup(ROOT_INO, b"f%d" % i)
                    h = await cache.open(node.ino)
                    await cache.read(h, 0, 4096)
                    cache.release(h)
                    nodes.append(node)
                await cache.checkpoint()
                took = {True: 0.0, False: 0.0}
                for i, node in enumerate(nodes):
                    with_sum = i % 2 == 0
                    remote.can_hash = with_sum
                    t = time.perf_counter()
                    h = await cache.open(node.ino, os.O_WRONLY)
                    took[with_sum] += time.perf_counter() - t
                    cache.release(h)
                assert store.base_sum(nodes[0].ino) is not None and store.base_sum(nodes[1].ino) is None
                nursery.cancel_scope.cancel()
            half = n // 2
            print(f"a writer's open of a clean 4 KiB file: {took[False] / half * 1e6:.1f} us, "
                  f"{took[True] / half * 1e6:.1f} us with its base sum recorded")
            store.close()
    trio.run(main)


def replays(n: int = 200, rounds: int = 2) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        share = root / "share"
        share.mkdir()
        for i in range(n):
            (share / f"f{i}").write_bytes(b"%d\n" % i * 100)
        with SshServer(root / "sshd", share=share) as sshd:
            config = root / "ssh_config"
            config.touch()
            options = ConnectOptions(timeout=5, identity=sshd.identity, known_hosts=sshd.known_hosts,
                                     ssh_config=config)
            remote = open_remote(parse_remote(sshd.address()), options)

            async def main() -> None:
                store, conn, cache = await _parts(root, remote, sshd.address())
                sync = SyncManager(store, cache, conn)
                async with trio.open_nursery() as nursery:
                    await nursery.start(cache.run)
                    for i in range(n):
                        node = await cache.lookup(ROOT_INO, b"f%d" % i)
                        h = await cache.open(node.ino)
                        await cache.read(h, 0, node.size)
                        cache.release(h)
                    await cache.checkpoint()
                    results: dict[str, list[float]] = {"with": [], "without": []}
                    for r in range(rounds * 2):
                        mode = "with" if r % 2 == 0 else "without"
                        remote.can_hash = True if mode == "with" else False
                        for i in range(n):
                            node = await cache.lookup(ROOT_INO, b"f%d" % i)
                            h = await cache.open(node.ino, os.O_WRONLY)
                            cache.write(h, 0, b"round %d " % r)
                            cache.release(h)
                        await cache.checkpoint()
                        t = time.perf_counter()
                        result = await sync.reintegrate()
                        assert result.complete and not sync.pending(), result
                        results[mode].append(n / (time.perf_counter() - t))
                    nursery.cancel_scope.cancel()
                for mode, rates in results.items():
                    print(f"store replays {mode} server hashes: "
                          + ", ".join(f"{x:.0f}" for x in rates) + " ops/s")
                store.close()
            trio.run(main)
            remote.close()


if __name__ == "__main__":
    hashes()
    creates_and_release()
    base_sums()
    replays()
