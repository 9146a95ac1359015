"""Conflict copies never replace anything, in-process: two clients (each a real store, cache
and sync manager with a cache of its own) over one real local share, as two mounts of one
share on one machine, or two machines of one host name. Their replays are held at the
conflict step until both are there, then let go together (``HoldingRemote``), which is
how the copies once overwrote each other (one version lost, or a replay that failed with
ENOENT on the other's temporary file and was recorded as an ``error``).

Also: a name taken by someone's file, a folder or a rename put aside under a taken name,
``sync`` failing with the remote's errno when it refused a change, and the names' cut
at 255 bytes between two UTF-8 characters."""

from __future__ import annotations

import errno
import os
import re
import threading
from datetime import datetime
from pathlib import Path

import pytest
import trio

from cachefs.cache.cache import Cache, CacheConfig
from cachefs.store.index import ROOT_INO, Store
from cachefs.errors import RemoteError, SyncFailed
from cachefs.remote.local import LocalRemote
from cachefs.link.connectivity import Connectivity
from cachefs.sync.manager import SyncManager
from cachefs.sync.naming import client_tag, conflict_name

WHEN = 1_796_000_000.0  # the clock the tests give both clients: one second for all copies
SERVER = b"the server's version"


class HoldingRemote(LocalRemote):
    """A local share whose uploads under another name than the file's own (a conflict
    copy) and whose exclusive renames wait until every client has reached them."""

    def __init__(self, root: str, barrier: threading.Barrier) -> None:
        super().__init__(root, 10.0)
        self.barrier = barrier
        self.held: set[str] = set()

    def _hold(self, step: str) -> None:
        if step not in self.held:  # (each step once: a second try goes on alone)
            self.held.add(step)
            self.barrier.wait(10)  # (a BrokenBarrierError fails the test)

    def upload(self, path, source, mode, temp_name, times=None):
        if path != b"col.txt":
            self._hold("upload")
        return super().upload(path, source, mode, temp_name, times)

    def rename_noreplace(self, src: bytes, dst: bytes) -> None:
        self._hold("rename")
        return super().rename_noreplace(src, dst)


class Client:
    def __init__(self, store: Store, conn: Connectivity, cache: Cache, sync: SyncManager) -> None:
        self.store, self.conn, self.cache, self.sync = store, conn, cache, sync


async def _client(nursery: trio.Nursery, tmp_path: Path, share: Path, name: str, remote: LocalRemote,
                  cache_id: str | None = None) -> Client:
    cache_dir = tmp_path / f"cache{name}"
    cache_dir.mkdir(mode=0o700)
    store = Store(cache_dir, f"file://{share}")
    if cache_id is not None:  # a copied cache dir: both caches have one id
        store.cache_id = cache_id
    conn = Connectivity(remote)
    await conn.first_connect()
    cache = Cache(store, conn, CacheConfig())
    await nursery.start(cache.run)
    sync = SyncManager(store, cache, conn)
    sync.clock = lambda: WHEN
    return Client(store, conn, cache, sync)


async def _write(client: Client, name: bytes, data: bytes) -> None:
    node = await client.cache.lookup(ROOT_INO, name)
    handle = await client.cache.open(node.ino, os.O_WRONLY | os.O_TRUNC)
    client.cache.write(handle, 0, data)
    client.cache.release(handle)


async def _read(client: Client, name: bytes) -> bytes:
    node = await client.cache.lookup(ROOT_INO, name)
    handle = await client.cache.open(node.ino)
    try:
        return await client.cache.read(handle, 0, 1 << 20)
    finally:
        client.cache.release(handle)


def _server_changes(share: Path) -> None:
    (share / "col.txt").write_bytes(SERVER)
    os.utime(share / "col.txt", (2_000_000_000, 2_000_000_000))


async def _sync_all(clients: list[Client]) -> dict[int, str]:
    """``online`` and ``sync`` on every client at the same moment; what each sync said."""
    said: dict[int, str] = {}

    async def one(i: int, client: Client) -> None:
        client.conn.work_online()
        try:
            await client.sync.request_sync()
            said[i] = "ok"
        except SyncFailed as exc:
            said[i] = f"failed: {exc}"

    async with trio.open_nursery() as nursery:
        for i, client in enumerate(clients):
            nursery.start_soon(one, i, client)
    return said


def _problems(share: Path, clients: list[Client], versions: list[bytes], said: dict[int, str]) -> list[str]:
    problems = [f"client {i}: sync {text}" for i, text in said.items() if text != "ok"]
    names = sorted(os.listdir(share))
    if (share / "col.txt").read_bytes() != SERVER:
        problems.append(f"col.txt on the server: {(share / 'col.txt').read_bytes()!r}")
    copies = {n: (share / n).read_bytes() for n in names if "(conflict " in n}
    if sorted(copies.values()) != sorted(versions):
        problems.append(f"conflict copies {copies}, want one of each of {versions}")
    leftovers = [n for n in names if ".cachefs-" in n]
    if leftovers:
        problems.append(f"temporary files left: {leftovers}")
    for i, (client, mine) in enumerate(zip(clients, versions)):
        records = client.sync.conflicts()
        kinds = [r["kind"] for r in records]
        if kinds != ["changed-both"]:
            problems.append(f"client {i} recorded {kinds}: {records}")
            continue
        copy = records[0]["conflict_path"]
        if copies.get(copy) != mine:
            problems.append(f"client {i}'s record points at {copy!r}, which holds {copies.get(copy)!r}, "
                            f"not its version {mine!r}")
    return problems


def _two_clients_collide(tmp_path: Path, same_id: bool) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "col.txt").write_bytes(b"original")
    barrier = threading.Barrier(2)
    versions = [b"A's version of col.txt, " * 20, b"B's version, which is another " * 30]
    out: list[str] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a = await _client(nursery, tmp_path, share, "A", HoldingRemote(str(share), barrier))
            b = await _client(nursery, tmp_path, share, "B", HoldingRemote(str(share), barrier),
                              cache_id=a.store.cache_id if same_id else None)
            clients = [a, b]
            for client, version in zip(clients, versions):
                assert await _read(client, b"col.txt") == b"original"
                client.conn.work_offline()
                await _write(client, b"col.txt", version)
            _server_changes(share)
            said = await _sync_all(clients)
            out.extend(_problems(share, clients, versions, said))
            if not out:
                tags = sorted(r["conflict_path"] for c in clients for r in c.sync.conflicts())
                host = clients[0].sync.host
                pattern = re.escape(f"col (conflict {datetime.fromtimestamp(WHEN):%Y-%m-%d %H%M%S} ") \
                    + rf"{re.escape(host)}-[0-9a-f]{{6}}( 2)?\)\.txt"
                out.extend(f"unexpected copy name {t!r}" for t in tags if not re.fullmatch(pattern, t))
                if same_id:  # one name for both: the second takes " 2"
                    first = min(tags, key=len)
                    if sorted(tags) != sorted([first, first.removesuffix(").txt") + " 2).txt"]):
                        out.append(f"copy names {tags}: the second should end ' 2)'")
                elif tags[0][:-5].rsplit("-", 1)[1] == tags[1][:-5].rsplit("-", 1)[1]:
                    out.append(f"copy names {tags} do not tell the two caches apart")
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert not out, "\n".join(out)


def test_two_clients_conflict_copies_keep_both_versions(tmp_path: Path) -> None:
    """Two caches on one host, same second: each copy names its cache (host and cache id),
    so both versions survive, each under the name its own record gives."""
    _two_clients_collide(tmp_path, same_id=False)


def test_conflict_copy_name_taken_meanwhile_takes_the_next(tmp_path: Path) -> None:
    """Two caches with one id (a copied cache dir on a machine of the same name), same
    second: the two copies want one name; the rename refuses to replace the first, and
    the second takes ``... 2)``."""
    _two_clients_collide(tmp_path, same_id=True)


def _one_client(tmp_path: Path, share: Path, body) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            client = await _client(nursery, tmp_path, share, "A", LocalRemote(str(share), 10.0))
            await body(client)
            nursery.cancel_scope.cancel()

    trio.run(main)


def _copy_name(client: Client, name: str, n: int = 1) -> str:
    return conflict_name(name.encode(), WHEN, client.sync.client, n).decode()


def test_a_file_at_the_conflict_name_is_never_replaced(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "col.txt").write_bytes(b"original")

    async def body(client: Client) -> None:
        await _read(client, b"col.txt")
        client.conn.work_offline()
        await _write(client, b"col.txt", b"ours")
        _server_changes(share)
        (share / _copy_name(client, "col.txt")).write_bytes(b"someone's file")
        said = await _sync_all([client])
        assert said == {0: "ok"}
        assert (share / _copy_name(client, "col.txt")).read_bytes() == b"someone's file"
        assert (share / _copy_name(client, "col.txt", 2)).read_bytes() == b"ours"
        [record] = client.sync.conflicts()
        assert record["conflict_path"] == _copy_name(client, "col.txt", 2)

    _one_client(tmp_path, share, body)


@pytest.mark.parametrize("kind", ["mkdir", "symlink", "rename"])
def test_put_aside_under_a_taken_conflict_name_takes_the_next(tmp_path: Path, kind: str) -> None:
    """A folder or symlink made here where the server has another kind of object, and a
    rename here onto a name that appeared there: ours goes beside it, and a conflict name
    already taken (here by a file of someone's) is left alone."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "moved.txt").write_bytes(b"moved here")

    async def body(client: Client) -> None:
        await client.cache.listdir(ROOT_INO, refresh=True)
        client.conn.work_offline()
        if kind == "mkdir":
            await client.cache.mkdir(ROOT_INO, b"d", 0o755)
        elif kind == "symlink":
            await client.cache.symlink(ROOT_INO, b"d", b"somewhere")
        else:
            await client.cache.rename(ROOT_INO, b"moved.txt", ROOT_INO, b"d")
        (share / "d").write_bytes(b"the server's d")
        (share / _copy_name(client, "d")).write_bytes(b"someone's file")
        said = await _sync_all([client])
        assert said == {0: "ok"}, said
        assert (share / "d").read_bytes() == b"the server's d"
        assert (share / _copy_name(client, "d")).read_bytes() == b"someone's file"
        ours = share / _copy_name(client, "d", 2)
        if kind == "mkdir":
            assert ours.is_dir()
        elif kind == "symlink":
            assert os.readlink(ours) == "somewhere"
        else:
            assert ours.read_bytes() == b"moved here"
        [record] = client.sync.conflicts()
        assert record["conflict_path"] == ours.name, record

    _one_client(tmp_path, share, body)


class RefusingRemote(LocalRemote):
    """A share whose server refuses every upload (a permission, a quota)."""

    def upload(self, path, source, mode, temp_name, times=None):
        raise RemoteError(errno.EACCES, "upload: Permission denied")


def test_sync_fails_with_the_errno_of_a_refused_change(tmp_path: Path) -> None:
    """The replay goes on past a refused change (kept here, recorded as ``error``), and
    the ``sync`` that asked fails with the remote's errno; the next one has nothing to
    report. A write-back pass's refusal is reported by the next ``sync`` as well."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "a.txt").write_bytes(b"a")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            client = await _client(nursery, tmp_path, share, "A", RefusingRemote(str(share), 10.0))
            await _read(client, b"a.txt")
            await _write(client, b"a.txt", b"changed here")
            with pytest.raises(SyncFailed) as failed:
                await client.sync.request_sync()
            assert failed.value.errno == errno.EACCES
            assert "a.txt" in str(failed.value)
            assert [r["kind"] for r in client.sync.conflicts()] == ["error"]
            assert client.sync.pending() == 0
            await client.sync.request_sync()  # reported once
            await _write(client, b"a.txt", b"changed again")
            await client.sync.reintegrate()  # a write-back pass meets it
            with pytest.raises(SyncFailed) as failed:
                await client.sync.request_sync()
            assert failed.value.errno == errno.EACCES
            nursery.cancel_scope.cancel()

    trio.run(main)


# -- the names --------------------------------------------------------------------------------

def test_client_tag_names_host_and_cache() -> None:
    assert client_tag("vm", "3fa9c2") == "vm-3fa9c2"
    assert client_tag("we(ird)/ho st", "3fa9c2") == "we-ird--ho-st-3fa9c2"
    assert client_tag("", "3fa9c2") == "host-3fa9c2"


def test_conflict_name_counts_from_the_second() -> None:
    first = conflict_name(b"col.txt", WHEN, "vm-3fa9c2")
    assert first.endswith(b" vm-3fa9c2).txt")
    assert conflict_name(b"col.txt", WHEN, "vm-3fa9c2", 2) == first.replace(b"3fa9c2)", b"3fa9c2 2)")


@pytest.mark.parametrize("char", ["é", "€", "😀", "字"])
def test_conflict_name_of_a_long_utf8_name_is_cut_between_characters(char: str) -> None:
    """A 255-byte name of multibyte characters: the copy's name is UTF-8 still (so it can
    be named in ``resolve``), at most 255 bytes, and keeps as much of the stem as fits;
    for every place the cut can fall (host names of other lengths, other endings)."""
    unit = char.encode()
    for tail in (b"", b".txt", b"x", b"xy", b"xyz"):
        name = (unit * ((255 - len(tail)) // len(unit)) + tail)[:255]
        for pad in range(4):
            for n in (1, 12):
                copy = conflict_name(name, WHEN, "vm-3fa9c2" + "h" * pad, n)
                assert len(copy) <= 255
                text = copy.decode("utf-8")  # (raises if cut inside a character)
                stem = text.split(" (conflict ")[0]
                assert name.decode().startswith(stem)
                assert len(copy) > 255 - len(unit)  # nothing cut that would have fitted


def test_conflict_name_of_a_long_non_utf8_name_fits() -> None:
    name = b"\xff\xe9" * 127 + b".d"
    copy = conflict_name(name, WHEN, "vm-3fa9c2")
    assert len(copy) == 255 and copy.endswith(b").d") and copy.startswith(b"\xff\xe9")


# -- the backends' exclusive rename -------------------------------------------------------------

@pytest.mark.parametrize("backend", ["sftp", "local"])
def test_rename_noreplace_refuses_an_existing_target(backend: str, sshd, share: Path) -> None:
    """A file, a folder and a symlink are renamed onto a free name, and refused (EEXIST,
    both left as they were) onto a taken one, over the real OpenSSH server and locally."""
    from tests.test_remote import sftp_remote

    remote = sftp_remote(sshd) if backend == "sftp" else LocalRemote(str(share), 10.0)
    try:
        remote.connect()
        (share / "taken").write_bytes(b"someone's")
        (share / "f").write_bytes(b"ours")
        (share / "d").mkdir()
        os.symlink("target", share / "l")
        for name in ("f", "d", "l"):
            with pytest.raises(RemoteError) as refused:
                remote.rename_noreplace(name.encode(), b"taken")
            assert refused.value.errno == errno.EEXIST, refused.value
            assert (share / "taken").read_bytes() == b"someone's"
            assert os.path.lexists(share / name)
            remote.rename_noreplace(name.encode(), f"{name}2".encode())
            assert not os.path.lexists(share / name) and os.path.lexists(share / f"{name}2")
        assert (share / "f2").read_bytes() == b"ours" and (share / "d2").is_dir()
        assert os.readlink(share / "l2") == "target"
        with pytest.raises(RemoteError) as missing:
            remote.rename_noreplace(b"nothing", b"free")
        assert missing.value.errno == errno.ENOENT
    finally:
        remote.close()
