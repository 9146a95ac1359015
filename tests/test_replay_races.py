"""Changes made while the sync manager's call for an earlier change is on the way, in-process:
a real store, cache and sync manager over a real local share, whose remote pauses inside
the call until the test has made the next change; and on a real mount whose link a proxy
stalls while a pass waits on it."""

from __future__ import annotations

import os
import re
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from cachefs.cache.cache import Cache, CacheConfig
from cachefs.store.index import ROOT_INO, Store
from cachefs.remote.dav import DavRemote
from cachefs.remote.local import LocalRemote
from cachefs.link.connectivity import Connectivity
from cachefs.sync.manager import SyncManager
from cachefs.sync.naming import temp_name
from cachefs.sync.remote_side import RemoteSide
from devtools.davserver import DavServer


class PausingRemote(LocalRemote):
    """A local share whose ``set_attrs`` waits, once it has begun, for ``go``."""

    def __init__(self, root: str) -> None:
        super().__init__(root, 10.0)
        self.entered = threading.Event()
        self.go = threading.Event()

    def set_attrs(self, path: bytes, mode: int, atime_ns: int, mtime_ns: int,
                  owner: tuple[int, int] | None = None) -> None:
        self.entered.set()
        self.go.wait(10)
        super().set_attrs(path, mode, atime_ns, mtime_ns, owner)


@pytest.mark.parametrize("change", ["mode", "owner"])
def test_attributes_changed_while_an_earlier_change_is_sent_reach_the_server(tmp_path: Path, change: str) -> None:
    """A chmod, or (--owners remote) a chown, while an earlier chmod's SETSTAT is on the
    way is not journaled again (the earlier entry is pending): the end of that entry must
    see what changed meanwhile and journal the node again, or it never goes (an owner sent
    without one: the next listing would take it back)."""
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
        cache = Cache(store, conn, CacheConfig(owners="remote" if change == "owner" else "local"))
        sync = SyncManager(store, cache, conn)
        ino = (await cache.lookup(ROOT_INO, b"f.txt")).ino
        await cache.setattr(ino, mode=0o640)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync.reintegrate)
            await trio.to_thread.run_sync(remote.entered.wait, 10)
            if change == "mode":  # while 0o640 is on the way
                await cache.setattr(ino, mode=0o600)
            else:
                await cache.setattr(ino, uid=4321, gid=4322)
            remote.go.set()
        await sync.reintegrate()
        assert sync.pending() == 0
        st = os.stat(share / "f.txt")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == \
            ((0o600, os.getuid(), os.getgid()) if change == "mode" else (0o640, 4321, 4322))

    try:
        trio.run(main)
    finally:
        store.close()


class RenamePausingRemote(LocalRemote):
    """A local share whose first exclusive rename (a rename onto a free name) waits,
    once it has begun, for ``go``."""

    def __init__(self, root: str) -> None:
        super().__init__(root, 10.0)
        self.entered = threading.Event()
        self.go = threading.Event()

    def rename_noreplace(self, src: bytes, dst: bytes) -> None:
        if not self.entered.is_set():
            self.entered.set()
            self.go.wait(10)
        super().rename_noreplace(src, dst)


async def _put(cache: Cache, name: bytes, data: bytes) -> None:
    """``name`` created and written (``git``'s lock file), then renamed over ``name``
    without its ``.lock``, as git puts its index and refs in place."""
    node, handle = await cache.create(ROOT_INO, name, 0o644, os.O_WRONLY)
    cache.write(handle, 0, data)
    cache.release(handle)
    await cache.rename(ROOT_INO, name, ROOT_INO, name.removesuffix(b".lock"))


def test_file_put_in_place_twice_after_a_restart_mid_pass_ends_as_the_second(tmp_path: Path) -> None:
    """As ``git-index`` below, but the pass that found the first ``index`` deleted ended (a crash, a
    cut link) after its create was settled and before its rename was replayed: the
    journal then holds that rename without its create, and the next pass no longer
    knows the node was never on the server. The rename finds nothing to move and the
    name still holding what it replaced: that goes, as the rename would have taken it."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "index").write_bytes(b"old index from the server")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    store = Store(cache_dir, f"file://{share}")
    conn = Connectivity(LocalRemote(str(share), 10.0))

    async def main() -> None:
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig())
        sync = SyncManager(store, cache, conn)
        await cache.lookup(ROOT_INO, b"index")
        await _put(cache, b"index.lock", b"index of git status")
        await _put(cache, b"index.lock", b"index of git commit")
        first_create = min(op.seq for op in store.journal_ops())
        # The journal as that pass left it: the first create settled (its node is gone).
        store.transact(lambda t: t.delete_op(first_create))
        await sync.reintegrate()
        assert sync.pending() == 0
        assert sync.conflicts() == []
        assert sorted(os.listdir(share)) == ["index"]
        assert (share / "index").read_bytes() == b"index of git commit"

    try:
        trio.run(main)
    finally:
        store.close()


async def _run_steps(cache: Cache, steps: list[tuple[str, ...]]) -> None:
    for step, *args in steps:
        if step == "write":
            node, handle = await cache.create(ROOT_INO, args[0].encode(), 0o644, os.O_WRONLY)
            cache.write(handle, 0, args[1].encode())
            cache.release(handle)
        elif step == "mv":
            await cache.rename(ROOT_INO, args[0].encode(), ROOT_INO, args[1].encode())
        else:
            await cache.unlink(ROOT_INO, args[0].encode())


@pytest.mark.parametrize("before, during, end", [
    # git status then git commit: each writes index.lock and renames it over index; a pass
    # reads the journal after the first and, while it runs, the second replaces the first:
    # the first's rename, whose node died during the pass, still takes the old index away
    # (else the second's, which replaced a file the server never had, found the old one
    # there: a false conflict that put the server's old index in place of the user's)
    ([("write", "a", "Y"), ("mv", "a", "c")], [("write", "a", "Z"), ("mv", "a", "c")], {"c": "Z"}),
    # a file renamed twice before the pass; during it, another put over its last name
    ([("write", "a", "Y"), ("mv", "a", "b"), ("mv", "b", "c")],
     [("write", "d", "Z"), ("mv", "d", "c")], {"c": "Z"}),
    # renamed over the old file before the pass; moved on during it (it lives on)
    ([("write", "a", "Y"), ("mv", "a", "c")], [("mv", "c", "b")], {"b": "Y"}),
    # put in place before the pass, deleted during it: the old file goes too
    ([("write", "a", "Y"), ("mv", "a", "c")], [("unlink", "c")], {}),
    # put in place, renamed on, then deleted during the pass
    ([("write", "a", "Y"), ("mv", "a", "c"), ("mv", "c", "b")], [("unlink", "b")], {}),
    # put in place twice during the pass, over a file put there before it
    ([("write", "a", "Y"), ("mv", "a", "c")],
     [("write", "a", "Z"), ("mv", "a", "c"), ("write", "a", "W"), ("mv", "a", "c")], {"c": "W"}),
], ids=["git-index", "chain-then-replaced", "moved-on", "deleted", "moved-then-deleted", "replaced-twice"])
def test_files_created_before_a_pass_and_changed_during_it_end_as_here(
        tmp_path: Path, before: list[tuple[str, ...]], during: list[tuple[str, ...]], end: dict[str, str]) -> None:
    """The server ends as the mount shows, with no conflict recorded: the files made
    before a pass, whose story goes on (or ends) while the pass runs. ``c`` is on the
    server from the start (the old version a rename replaces)."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "c").write_bytes(b"old c from the server")
    (share / "f.txt").write_bytes(b"x")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    store = Store(cache_dir, f"file://{share}")
    remote = RenamePausingRemote(str(share))
    conn = Connectivity(remote)

    async def main() -> None:
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig())
        sync = SyncManager(store, cache, conn)
        await cache.lookup(ROOT_INO, b"c")
        await cache.lookup(ROOT_INO, b"f.txt")
        await cache.rename(ROOT_INO, b"f.txt", ROOT_INO, b"g.txt")  # (the pass pauses in it)
        await _run_steps(cache, before)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync.reintegrate)
            await trio.to_thread.run_sync(remote.entered.wait, 10)
            await _run_steps(cache, during)
            remote.go.set()
        await sync.reintegrate()
        assert sync.pending() == 0
        assert sync.conflicts() == []
        on_server = {name: (share / name).read_text() for name in os.listdir(share) if name != "g.txt"}
        assert on_server == end

    try:
        trio.run(main)
    finally:
        store.close()


class UploadPausingRemote(LocalRemote):
    """A local share whose first upload, once it has landed, waits for ``go``."""

    def __init__(self, root: str) -> None:
        super().__init__(root, 10.0)
        self.entered = threading.Event()
        self.go = threading.Event()

    def upload(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        landed = super().upload(*args, **kwargs)
        if not self.entered.is_set():
            self.entered.set()
            self.go.wait(10)
        return landed


@pytest.mark.parametrize("during, end", [
    ([("write", "a", "Y"), ("mv", "a", "c"), ("unlink", "c")], {}),
    ([("write", "a", "Y"), ("mv", "a", "c")], {"c": "Y"}),
    ([("unlink", "c")], {}),
], ids=["replaced-then-deleted", "replaced", "deleted"])
def test_file_replaced_while_its_upload_lands_ends_as_here(
        tmp_path: Path, during: list[tuple[str, ...]], end: dict[str, str]) -> None:
    """A file made here is being uploaded when another is put over it (its rename
    records no base version of the first: it was not on the server yet); the upload
    lands. When the second is deleted before it reaches the server, the first (on the
    server now, by the replay's own upload) still goes, as it went here."""
    share = tmp_path / "share"
    share.mkdir()
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    store = Store(cache_dir, f"file://{share}")
    remote = UploadPausingRemote(str(share))
    conn = Connectivity(remote)

    async def main() -> None:
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig())
        sync = SyncManager(store, cache, conn)
        await _run_steps(cache, [("write", "c", "X")])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync.reintegrate)
            await trio.to_thread.run_sync(remote.entered.wait, 10)
            await _run_steps(cache, during)
            remote.go.set()
        await sync.reintegrate()
        assert sync.pending() == 0
        assert sync.conflicts() == []
        assert {name: (share / name).read_text() for name in os.listdir(share)} == end

    try:
        trio.run(main)
    finally:
        store.close()


def test_git_index_put_in_place_twice_while_a_pass_waits_on_the_link(mount_factory, sshd, share: Path,
                                                                       tmp_path: Path) -> None:
    """The WAN benchmark's false conflict, on a real mount: ``git status`` puts
    ``index`` in place (``index.lock`` renamed over it), a pass reads the journal and
    waits on a stalled link, and meanwhile ``git commit`` puts its own ``index`` in place.
    The server ends with the commit's index and no conflict is recorded."""
    from tests.fixtures.mount import status
    from tests.fixtures.proxy import TcpProxy, proxied
    from tests.test_conflicts import conflict_records
    from tests.test_writes import sync_until_done, wait_for

    (share / "index").write_bytes(b"old index from the server")
    (share / "f.txt").write_bytes(b"x")
    with TcpProxy(sshd.host, sshd.port) as proxy:
        with proxied(mount_factory, sshd, proxy, tmp_path, "--callbacks", "off",
                     timeout="10", attr_timeout="60") as mount:
            mnt = mount.mountpoint
            assert sorted(os.listdir(mnt)) == ["f.txt", "index"]
            assert (mnt / "index").read_bytes() == b"old index from the server"
            proxy.stall()
            try:
                os.rename(mnt / "f.txt", mnt / "g.txt")  # (the pass waits in its replay)
                (mnt / "index.lock").write_bytes(b"index of git status")
                os.rename(mnt / "index.lock", mnt / "index")
                wait_for(lambda: status(mnt)["state"] == "syncing", 10, "a pass to start")
                (mnt / "index.lock").write_bytes(b"index of git commit")
                os.rename(mnt / "index.lock", mnt / "index")
            finally:
                proxy.resume()
            wait_for(lambda: status(mnt)["pending"] == 0, 30, "the journal to be replayed")
            sync_until_done(mnt)
            assert conflict_records(mnt) == []
            assert sorted(os.listdir(share)) == ["g.txt", "index"]
            assert (share / "index").read_bytes() == b"index of git commit"
            assert (mnt / "index").read_bytes() == b"index of git commit"
            # (the pass that began before the commit settled the status's index there)
            assert re.search(r"journal optimised: 0 entries dropped, 1 rewritten \(\d+ rename -> unlink b'index'\)",
                             mount.log_text())


@pytest.mark.parametrize("left", ["temporary", "landed", "theirs"])
def test_an_upload_cut_before_its_file_was_deleted_here_leaves_nothing(tmp_path: Path, left: str) -> None:
    """A kill or a cut link stopped an upload (its mark still set); the file is deleted
    here before the next pass, which drops its entries. ``temporary``: the upload's
    temporary file on the server goes too. ``landed``: the kill came after the upload's
    rename into place, before its entry was marked done: the file it left under its name
    goes too (the crash loop met it again when the name was used next: a false conflict,
    the server's copy outliving its deletion here). ``theirs``: a file there that is not
    the upload's (another size and mtime) stays. The mark goes in each case."""
    share = tmp_path / "share"
    share.mkdir()
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    store = Store(cache_dir, f"file://{share}")
    conn = Connectivity(LocalRemote(str(share), 10.0))

    async def main() -> None:
        sync, op = await _g1_cut_then_deleted_here(store, conn, share, left)
        await sync.reintegrate()
        assert sync.pending() == 0
        if left == "theirs":
            assert (share / "g1").read_bytes() == b"theirs!!"
        else:
            assert sorted(os.listdir(share)) == [], f"what the cut upload left stayed ({left})"
        assert store.upload_mark(op.seq) is None

    try:
        trio.run(main)
    finally:
        store.close()


async def _g1_cut_then_deleted_here(store: Store, conn: Connectivity, share: Path,
                                    left: str) -> tuple[SyncManager, Any]:
    """A file ``g1`` of 7 bytes created here, its upload cut by a kill (its mark set), then
    deleted here: the sync manager and its create entry. What the cut upload ``left`` on
    the server: its ``temporary`` file, the file ``landed`` under its name, or a file there
    that is ``theirs`` (another size and mtime)."""
    mtime_ns = 1_700_000_000_000_000_000
    await conn.first_connect()
    cache = Cache(store, conn, CacheConfig())
    sync = SyncManager(store, cache, conn)
    await cache.listdir(ROOT_INO)
    node, handle = await cache.create(ROOT_INO, b"g1", 0o644, os.O_WRONLY)
    cache.write(handle, 0, b"content")
    cache.release(handle)
    await cache.checkpoint()
    [op] = [op for op in store.journal_ops() if op.ino == node.ino]
    store.transact(lambda t: t.mark_upload(op.seq, 7, mtime_ns))
    there = share / (temp_name(b"g1", op.seq, sync.client).decode() if left == "temporary" else "g1")
    there.write_bytes(b"theirs!!" if left == "theirs" else b"content")
    os.utime(there, ns=(mtime_ns, mtime_ns))
    await cache.unlink(ROOT_INO, b"g1")
    return sync, op


def test_a_landed_upload_changed_there_while_looked_at_stays(tmp_path: Path, share: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """As the ``landed`` case above, on a WebDAV server, whose removals can be made
    conditional: another client rewrites the file there between the replay's look (which
    found our landed upload) and its removal. The removal is of the version looked at only
    (``unlink_if``): theirs stays. (It was removed unconditionally: their change lost.)"""
    server = DavServer(tmp_path / "davd", share=share)
    server.start()
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    store = Store(cache_dir, server.address())
    conn = Connectivity(DavRemote(server.host, "/", port=server.port, user=server.user,
                                  password=server.password, timeout=5.0))
    looked = RemoteSide.stat

    async def look_then_theirs(side: RemoteSide, path: bytes) -> Any:
        found = await looked(side, path)
        if path == b"g1" and found is not None and found.size == 7:  # (our landed upload)
            (share / "g1").write_bytes(b"theirs, written just now")
        return found

    async def main() -> None:
        sync, op = await _g1_cut_then_deleted_here(store, conn, share, "landed")
        monkeypatch.setattr(RemoteSide, "stat", look_then_theirs)
        await sync.reintegrate()
        monkeypatch.setattr(RemoteSide, "stat", looked)
        assert sync.pending() == 0
        assert (share / "g1").read_bytes() == b"theirs, written just now"
        assert store.upload_mark(op.seq) is None

    try:
        trio.run(main)
    finally:
        store.close()
        conn.remote.close()
        server.stop()


@pytest.mark.parametrize("left", ["landed", "temporary"])
@pytest.mark.parametrize("then", ["unlink", "replaced"])
def test_a_cut_upload_of_a_changed_file_deleted_here_since_leaves_nothing(tmp_path: Path, then: str,
                                                                         left: str) -> None:
    """A kill stopped the upload of a change to a server file (a ``store`` entry) before
    its entry was marked done (its mark still set): ``landed``, after the upload's rename
    into place; ``temporary``, while its temporary file was written. Before the next pass
    the file is deleted here (``unlink``) or another file is renamed over it
    (``replaced``). The store entry finds its node gone and ends, its temporary file
    removed; the unlink or the rename then meets the landed upload under the name, which
    is our own version, not a change of the server's: the name goes (or takes the renamed
    file), with no conflict record and no conflict copy. (The crash loop met both: a
    conflict copy with a single writer, temporary files left on the server.)"""
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"old content")
    os.utime(share / "f", ns=(1_600_000_000_000_000_000,) * 2)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    store = Store(cache_dir, f"file://{share}")
    conn = Connectivity(LocalRemote(str(share), 10.0))

    async def main() -> None:
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig())
        sync = SyncManager(store, cache, conn)
        await cache.listdir(ROOT_INO)
        node = await cache.lookup(ROOT_INO, b"f")
        handle = await cache.open(node.ino, os.O_WRONLY | os.O_TRUNC)
        cache.write(handle, 0, b"new content, ours")
        cache.release(handle)
        await cache.checkpoint()
        [op] = [op for op in store.journal_ops() if op.ino == node.ino]
        assert op.kind == "store"
        now = store.get(node.ino)
        # What the cut upload left: its mark here, our version in place there (or its
        # temporary file beside the old one).
        store.transact(lambda t: t.mark_upload(op.seq, now.size, now.mtime_ns))
        there = share / ("f" if left == "landed" else temp_name(b"f", op.seq, sync.client).decode())
        there.write_bytes(b"new content, ours")
        os.utime(there, ns=(now.mtime_ns, now.mtime_ns))
        if then == "unlink":
            await cache.unlink(ROOT_INO, b"f")
        else:
            _, h = await cache.create(ROOT_INO, b"g", 0o644, os.O_WRONLY)
            cache.write(h, 0, b"the file put over it")
            cache.release(h)
            await cache.rename(ROOT_INO, b"g", ROOT_INO, b"f")
        await sync.reintegrate()
        assert sync.pending() == 0
        assert sync.conflicts() == []
        if then == "unlink":
            assert sorted(os.listdir(share)) == []
        else:
            assert sorted(os.listdir(share)) == ["f"]
            assert (share / "f").read_bytes() == b"the file put over it"
        assert store.upload_mark(op.seq) is None

    try:
        trio.run(main)
    finally:
        store.close()


def _share_and_cache(tmp_path: Path, server_has_f: bool) -> tuple[Path, Store, Connectivity]:
    """A share (with a file ``f`` of its own, if asked) and a new cache of it."""
    share = tmp_path / "share"
    share.mkdir()
    if server_has_f:
        (share / "f").write_bytes(b"old content on the server")
        os.utime(share / "f", ns=(1_600_000_000_000_000_000,) * 2)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    store = Store(cache_dir, f"file://{share}")
    return share, store, Connectivity(LocalRemote(str(share), 10.0))


async def _f_written(store: Store, conn: Connectivity, created: bool,
                     text: bytes) -> tuple[Cache, SyncManager, Any]:
    """Online, ``f`` written with ``text`` (created here, or the server's emptied first)."""
    await conn.first_connect()
    cache = Cache(store, conn, CacheConfig())
    sync = SyncManager(store, cache, conn)
    await cache.listdir(ROOT_INO)
    if created:
        node, handle = await cache.create(ROOT_INO, b"f", 0o644, os.O_WRONLY)
    else:
        node = await cache.lookup(ROOT_INO, b"f")
        handle = await cache.open(node.ino, os.O_WRONLY | os.O_TRUNC)
    cache.write(handle, 0, text)
    cache.release(handle)
    return cache, sync, node


@pytest.mark.parametrize("created", [False, True])
def test_a_landed_upload_then_a_change_of_same_size_and_second_is_sent_again(tmp_path: Path, created: bool) -> None:
    """A kill came after an upload had landed, before its entry was marked done; the next
    mount changed the file again within the same second without changing its size (a
    ``pwrite`` inside it). The server's file has the mark's size and mtime second, so it
    is the older upload of ours, but it is not our content now: it is sent again (never
    taken as landed, which left the server with the older content and the file marked
    synced here: a change lost), and it is no conflict either."""
    share, store, conn = _share_and_cache(tmp_path, server_has_f=not created)

    async def main() -> None:
        cache, sync, node = await _f_written(store, conn, created, b"first version, ours")
        await cache.checkpoint()
        [op] = [op for op in store.journal_ops() if op.ino == node.ino]
        first = store.get(node.ino)
        # What the cut upload left: its mark here, the first version in place there.
        store.transact(lambda t: t.mark_upload(op.seq, first.size, first.mtime_ns))
        (share / "f").write_bytes(b"first version, ours")
        os.utime(share / "f", ns=(first.mtime_ns, first.mtime_ns))
        # The next mount: a write inside the file, its mtime in the same second.
        handle = await cache.open(node.ino, os.O_WRONLY)
        cache.write(handle, 0, b"SECOND")
        cache.release(handle)
        await cache.setattr(node.ino, mtime_ns=first.mtime_ns + 1)
        await cache.checkpoint()
        now = store.get(node.ino)
        assert now.size == first.size and now.mtime_ns // 10**9 == first.mtime_ns // 10**9
        await sync.reintegrate()
        assert sync.pending() == 0
        assert sync.conflicts() == []
        assert sorted(os.listdir(share)) == ["f"]
        assert (share / "f").read_bytes() == b"SECONDversion, ours"

    try:
        trio.run(main)
    finally:
        store.close()


@pytest.mark.parametrize("created", [False, True])
def test_a_landed_upload_then_a_second_cut_before_landing_is_still_ours(tmp_path: Path, created: bool) -> None:
    """A kill after an upload had landed (its entry not marked done); the next mount's
    replay began sending a changed version and was cut before it landed; the file changed
    again. The server's file is the first upload, ours: the latest version is sent, no
    conflict (the crash loop met this: the second mark replaced the first, the landed
    upload looked like a change of the server's, and the latest version became a conflict
    copy beside the first)."""
    share, store, conn = _share_and_cache(tmp_path, server_has_f=not created)

    async def main() -> None:
        cache, sync, node = await _f_written(store, conn, created, b"first version")
        await cache.setattr(node.ino, mtime_ns=1_700_000_000_000_000_000)
        await cache.checkpoint()
        [op] = [op for op in store.journal_ops() if op.ino == node.ino]
        first = store.get(node.ino)
        # The first upload landed; its mark stayed.
        store.transact(lambda t: t.mark_upload(op.seq, first.size, first.mtime_ns))
        (share / "f").write_bytes(b"first version")
        os.utime(share / "f", ns=(first.mtime_ns, first.mtime_ns))
        for text, mtime_ns, cut in [(b"second, longer version", 1_700_000_010_000_000_000, True),
                                    (b"third and last version here", 1_700_000_020_000_000_000, False)]:
            handle = await cache.open(node.ino, os.O_WRONLY | os.O_TRUNC)
            cache.write(handle, 0, text)
            cache.release(handle)
            await cache.setattr(node.ino, mtime_ns=mtime_ns)
            await cache.checkpoint()
            if cut:  # (the second mount's upload, marked, cut before it landed)
                now = store.get(node.ino)
                store.transact(lambda t: t.mark_upload(op.seq, now.size, now.mtime_ns))
        await sync.reintegrate()
        assert sync.pending() == 0
        assert sync.conflicts() == []
        assert sorted(os.listdir(share)) == ["f"]
        assert (share / "f").read_bytes() == b"third and last version here"

    try:
        trio.run(main)
    finally:
        store.close()


def test_a_found_landed_upload_leaves_its_mark_and_the_resend_s_only(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Marks of uploads cut before they landed do not pile up: once the replay finds
    which upload landed, the entry's marks are that one's and the resend's only (any other
    one, kept, could later take a change of the server's for ours). The resend is cut
    (the link goes while it is sent: the remote side's upload fails); the next pass sends
    the latest version, with no conflict."""
    from cachefs.errors import Unavailable
    from cachefs.sync.remote_side import RemoteSide

    share, store, conn = _share_and_cache(tmp_path, server_has_f=False)

    async def main() -> None:
        cache, sync, node = await _f_written(store, conn, True, b"first version")
        await cache.setattr(node.ino, mtime_ns=1_700_000_000_000_000_000)
        await cache.checkpoint()
        [op] = [op for op in store.journal_ops() if op.ino == node.ino]
        first = store.get(node.ino)
        landed = (first.size, first.mtime_ns)
        # The first upload landed, then uploads of two other versions were begun and cut.
        store.transact(lambda t: t.mark_upload(op.seq, *landed))
        (share / "f").write_bytes(b"first version")
        os.utime(share / "f", ns=(first.mtime_ns, first.mtime_ns))
        for i in range(2):
            store.transact(lambda t, i=i: t.mark_upload(op.seq, 100 + i, 1_700_000_005_000_000_000 + i))
        handle = await cache.open(node.ino, os.O_WRONLY | os.O_TRUNC)
        cache.write(handle, 0, b"the latest version")
        cache.release(handle)
        await cache.setattr(node.ino, mtime_ns=1_700_000_020_000_000_000)
        await cache.checkpoint()
        latest = store.get(node.ino)
        assert len(store.upload_marks(op.seq)) == 3

        async def cut(*args: object, **kwargs: object) -> None:
            raise Unavailable("the link went while the file was sent")

        monkeypatch.setattr(RemoteSide, "upload", cut)
        await sync.reintegrate()
        assert store.upload_marks(op.seq) == [landed, (latest.size, latest.mtime_ns)]
        assert (share / "f").read_bytes() == b"first version"
        monkeypatch.undo()
        await sync.reintegrate()
        assert sync.pending() == 0
        assert sync.conflicts() == []
        assert sorted(os.listdir(share)) == ["f"]
        assert (share / "f").read_bytes() == b"the latest version"
        assert store.upload_marks(op.seq) == []

    try:
        trio.run(main)
    finally:
        store.close()
