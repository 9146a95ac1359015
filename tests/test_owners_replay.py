"""``--owners remote`` at replay, in-process: a real store, cache and sync manager over a
real local share (the test runs as root, so owners can be given). An owner set here is
no longer "to send" once a creation carried it (``OWNER_DIRTY`` cleared: later SETSTATs
go without it); a folder made there whose owner the server refuses stays made, its owner
then sent and refused as a change of attributes (an ``error`` conflict, nothing lost);
the record of an uploaded file takes the owner the server gave it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from cachefs.cache.cache import Cache, CacheConfig
from cachefs.errors import RemoteError
from cachefs.link.connectivity import Connectivity
from cachefs.remote.local import LocalRemote
from cachefs.store.index import OWNER_DIRTY, ROOT_INO, Store
from cachefs.sync.manager import SyncManager


OTHER = 4321


class RefusingOwners(LocalRemote):
    """A local share that refuses every change of owner (an SSH account not root), and
    counts the SETSTATs that carried one."""

    def __init__(self, root: str) -> None:
        super().__init__(root, 10.0)
        self.owners_sent = 0
        self.refuse = True

    def set_attrs(self, path: bytes, mode: int, atime_ns: int, mtime_ns: int,
                  owner: tuple[int, int] | None = None) -> None:
        if owner is not None:
            self.owners_sent += 1
            if self.refuse:
                raise RemoteError(errno.EPERM, "setstat: Permission denied")
        super().set_attrs(path, mode, atime_ns, mtime_ns, owner)


def _run(tmp_path: Path, remote_class: type[LocalRemote], body, made: bool = False) -> None:  # type: ignore[no-untyped-def]
    share = tmp_path / "share"
    if not made:
        share.mkdir()
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    store = Store(cache_dir, f"file://{share}")
    remote = remote_class(str(share))
    conn = Connectivity(remote)

    async def main() -> None:
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig(owners="remote"))
        sync = SyncManager(store, cache, conn)
        await body(share, store, cache, sync, remote)

    try:
        trio.run(main)
    finally:
        store.close()


def test_an_owner_sent_with_a_creation_is_no_longer_to_send(tmp_path: Path) -> None:
    async def body(share, store, cache, sync, remote) -> None:  # type: ignore[no-untyped-def]
        remote.refuse = False
        node, handle = await cache.create(ROOT_INO, b"f", 0o4755, os.O_WRONLY, (OTHER, OTHER))
        cache.write(handle, 0, b"#!/bin/sh\n")
        cache.release(handle)
        folder = await cache.mkdir(ROOT_INO, b"d", 0o755, (OTHER, OTHER))
        await sync.reintegrate()
        assert sync.pending() == 0
        for name, ino in ((b"f", node.ino), (b"d", folder.ino)):
            st = os.lstat(share / name.decode())
            assert (st.st_uid, st.st_gid) == (OTHER, OTHER)
            record = store.get(ino)
            assert record is not None and (record.uid, record.gid) == (OTHER, OTHER)
            assert not record.flags & OWNER_DIRTY, name
        sent = remote.owners_sent  # (the folder's SETSTAT after its MKDIR)
        await cache.setattr(node.ino, mode=0o4750)  # a chmod: no owner with it now
        await sync.reintegrate()
        assert sync.pending() == 0 and remote.owners_sent == sent
        assert os.stat(share / "f").st_mode & 0o7777 == 0o4750

    _run(tmp_path, RefusingOwners, body)


def test_a_folder_made_there_whose_owner_is_refused_stays_made(tmp_path: Path) -> None:
    async def body(share, store, cache, sync, remote) -> None:  # type: ignore[no-untyped-def]
        folder = await cache.mkdir(ROOT_INO, b"d", 0o755, (OTHER, OTHER))
        node, handle = await cache.create(folder.ino, b"inside", 0o644, os.O_WRONLY)
        cache.write(handle, 0, b"x")
        cache.release(handle)
        await sync.reintegrate()
        await sync.reintegrate()  # (the owner's setattr, journaled by the first pass)
        assert (share / "d").is_dir() and (share / "d/inside").read_bytes() == b"x"
        assert [(c["kind"], c.get("refused"), c["path"]) for c in sync.conflicts()] == [("error", "setattr", "d")]
        record = store.get(folder.ino)
        assert record is not None and (record.uid, record.gid) == (OTHER, OTHER)  # (kept here)
        assert sync.pending() == 0

    _run(tmp_path, RefusingOwners, body)


def test_a_conflict_copy_has_the_owner_of_our_version(tmp_path: Path) -> None:
    """Our version of a file the server changed meanwhile goes to a conflict copy: its
    record has the file's owner (it had 0:0, shown until the folder was listed again, and
    sent by the copy's next upload)."""
    async def body(share, store, cache, sync, remote) -> None:  # type: ignore[no-untyped-def]
        (share / "f").write_bytes(b"base")
        os.chown(share / "f", OTHER, OTHER)
        node = await cache.lookup(ROOT_INO, b"f")
        handle = await cache.open(node.ino, os.O_WRONLY | os.O_TRUNC)
        cache.write(handle, 0, b"ours, longer")
        cache.release(handle)
        (share / "f").write_bytes(b"theirs")
        os.utime(share / "f", (2_000_000_000, 2_000_000_000))
        await sync.reintegrate()
        copies = [c for c in os.listdir(share) if c != "f"]
        assert len(copies) == 1, copies
        assert (share / copies[0]).read_bytes() == b"ours, longer"
        assert os.lstat(share / copies[0]).st_uid == OTHER
        ino = store.child_ino(ROOT_INO, copies[0].encode())  # (the record, not a listing)
        copy = store.get(ino) if ino is not None else None
        assert copy is not None and (copy.uid, copy.gid) == (OTHER, OTHER), copy

    _run(tmp_path, RefusingOwners, body)


def test_the_base_of_a_folder_given_its_owner_is_the_servers_version_after(tmp_path: Path) -> None:
    """The SETSTAT that gives a folder made there its owner carries the node's times too:
    the base recorded is the server's version after it (it kept the MKDIR's time, and a
    rename over the empty folder, offline, then made a false conflict and a copy)."""
    async def body(share, store, cache, sync, remote) -> None:  # type: ignore[no-untyped-def]
        remote.refuse = False
        d1 = await cache.mkdir(ROOT_INO, b"d1", 0o755, (OTHER, OTHER))
        d2 = await cache.mkdir(ROOT_INO, b"d2", 0o755, (OTHER, OTHER))
        await trio.sleep(1.1)  # (the MKDIR's time differs from the node's)
        await sync.reintegrate()
        assert sync.pending() == 0
        for name, ino in ((b"d1", d1.ino), (b"d2", d2.ino)):
            record, st = store.get(ino), remote.stat(name)
            assert record is not None and record.base == st.version(), (record.base, st.version())
            assert (st.uid, st.gid) == (OTHER, OTHER)
        sync.conn.work_offline()
        await cache.rename(ROOT_INO, b"d1", ROOT_INO, b"d2")
        sync.conn.work_online()
        await sync.conn.try_connect()
        await sync.reintegrate()
        assert sorted(os.listdir(share)) == ["d2"]
        assert sync.conflicts() == []

    _run(tmp_path, RefusingOwners, body)


class CutAfterCreation(RefusingOwners):
    """A share where a pass was killed after a folder's MKDIR or a symlink's SYMLINK, before
    its owner went: the object is there already (the SSH account's) when the pass runs."""

    def mkdir(self, path: bytes, mode: int) -> None:
        raise AssertionError("made already")

    def symlink(self, target: bytes, path: bytes) -> None:
        raise AssertionError("made already")


@pytest.mark.parametrize("kind", ["folder", "symlink"])
def test_an_owner_goes_after_a_crash_between_creation_and_owner(tmp_path: Path, kind: str) -> None:
    async def body(share, store, cache, sync, remote) -> None:  # type: ignore[no-untyped-def]
        remote.refuse = False
        if kind == "folder":
            node = await cache.mkdir(ROOT_INO, b"o", 0o755, (OTHER, OTHER))
            os.mkdir(share / "o")
        else:
            node = await cache.symlink(ROOT_INO, b"o", b"t", (OTHER, OTHER))
            os.symlink("t", share / "o")
        await sync.reintegrate()
        st = os.lstat(share / "o")
        assert (st.st_uid, st.st_gid) == (OTHER, OTHER)
        record = store.get(node.ino)
        assert record is not None and not record.has(OWNER_DIRTY) and (record.uid, record.gid) == (OTHER, OTHER)
        assert record.base == remote.stat(b"o").version()
        assert sync.pending() == 0 and sync.conflicts() == []

    _run(tmp_path, CutAfterCreation, body)


class RefusingLinkOwners(RefusingOwners):
    """A share that refuses the owner of a symlink too (EPERM), or cannot change it at all
    (ENOTSUP: an SFTP server without lsetstat@openssh.com)."""

    link_errno = errno.EPERM

    def set_link_owner(self, path: bytes, owner: tuple[int, int]) -> None:
        self.owners_sent += 1
        raise RemoteError(self.link_errno, "lsetstat: refused")


def test_a_symlink_made_there_whose_owner_is_refused_is_recorded(tmp_path: Path) -> None:
    """As a folder's: it stays made, its owner is sent again as a change of attributes and
    that refusal is an ``error`` conflict (it was only logged, its owner to send forever)."""
    async def body(share, store, cache, sync, remote) -> None:  # type: ignore[no-untyped-def]
        link = await cache.symlink(ROOT_INO, b"l", b"t", (OTHER, OTHER))
        await sync.reintegrate()
        await sync.reintegrate()  # (the owner's setattr, journaled by the first pass)
        assert os.readlink(share / "l") == "t"
        assert [(c["kind"], c.get("refused"), c["path"]) for c in sync.conflicts()] == [("error", "setattr", "l")]
        record = store.get(link.ino)
        assert record is not None and (record.uid, record.gid) == (OTHER, OTHER)  # (kept here)
        assert sync.pending() == 0 and remote.owners_sent == 2

    _run(tmp_path, RefusingLinkOwners, body)


def test_a_symlink_whose_owner_the_server_cannot_change_shows_the_servers(tmp_path: Path) -> None:
    """ENOTSUP (no lsetstat there): the owner is not to send any more, the record shows the
    server's owner, no conflict, nothing left in the journal."""
    async def body(share, store, cache, sync, remote) -> None:  # type: ignore[no-untyped-def]
        remote.link_errno = errno.ENOTSUP
        link = await cache.symlink(ROOT_INO, b"l", b"t", (OTHER, OTHER))
        await sync.reintegrate()
        record = store.get(link.ino)
        st = os.lstat(share / "l")
        assert record is not None and not record.has(OWNER_DIRTY)
        assert (record.uid, record.gid) == (st.st_uid, st.st_gid) == (0, 0)
        assert sync.pending() == 0 and sync.conflicts() == []

    _run(tmp_path, RefusingLinkOwners, body)


def test_an_older_upload_sent_again_keeps_the_owner_there(tmp_path: Path) -> None:
    """Our older upload of the entry landed (a cut pass), the file was written here again
    since, and chown'ed on the server meanwhile (no new version): sent again, it keeps
    that owner, as any upload of a file whose owner was not set here (it put back the
    one last seen, OTHER)."""
    async def body(share, store, cache, sync, remote) -> None:  # type: ignore[no-untyped-def]
        (share / "f").write_bytes(b"base")
        os.chown(share / "f", OTHER, OTHER)
        node = await cache.lookup(ROOT_INO, b"f")
        handle = await cache.open(node.ino, os.O_WRONLY | os.O_TRUNC)
        cache.write(handle, 0, b"ours, written again")
        cache.release(handle)
        [op] = [o for o in store.journal_ops() if o.ino == node.ino]
        store.transact(lambda t: t.mark_upload(op.seq, 5, 1_900_000_000_000_000_000))  # (its size, mtime)
        (share / "f").write_bytes(b"older")
        os.utime(share / "f", ns=(1_900_000_000_000_000_000, 1_900_000_000_000_000_000))
        os.chown(share / "f", OTHER + 1, OTHER + 1)  # (a chown there, after it landed)
        await sync.reintegrate()
        assert (share / "f").read_bytes() == b"ours, written again" and sync.conflicts() == []
        st = os.stat(share / "f")
        assert (st.st_uid, st.st_gid) == (OTHER + 1, OTHER + 1)

    _run(tmp_path, RefusingOwners, body)


def test_the_roots_refused_owner_is_kept_at_the_next_start(tmp_path: Path) -> None:
    """A chown of the mount root the server refused is kept here (``KEPT``, an ``error``
    conflict): the start's read of the root's attributes leaves it (it put the server's
    owner back, as only a pending change was spared)."""
    async def body(share, store, cache, sync, remote) -> None:  # type: ignore[no-untyped-def]
        await cache.setattr(ROOT_INO, uid=OTHER, gid=OTHER)
        await sync.reintegrate()
        assert [(c["kind"], c.get("refused")) for c in sync.conflicts()] == [("error", "setattr")]
        async with trio.open_nursery() as nursery:  # (the next start: the root read first)
            await nursery.start(cache.run)
            nursery.cancel_scope.cancel()
        root = store.get(ROOT_INO)
        assert root is not None and (root.uid, root.gid) == (OTHER, OTHER)
        assert (os.stat(share).st_uid, os.stat(share).st_gid) == (0, 0)

    _run(tmp_path, RefusingOwners, body)


class CountingRoot(LocalRemote):
    """A local share that counts the STATs of its root (its pings aside) and the listings
    of it."""

    def __init__(self, root: str) -> None:
        super().__init__(root, 10.0)
        self.root_stats = 0
        self.root_listings = 0

    def stat(self, path: bytes):  # type: ignore[no-untyped-def]
        if path == b"":
            self.root_stats += 1
        return super().stat(path)

    def ping(self) -> None:  # (the link's heartbeat: not counted)
        super().stat(b"")

    def listdir(self, path: bytes):  # type: ignore[no-untyped-def]
        if path == b"":
            self.root_listings += 1
        return super().listdir(path)


def test_the_root_is_read_once_at_start(tmp_path: Path) -> None:
    """Its attributes (owner included) before the first request, then its listing: one
    STAT of it, not a second one in the start's listing."""
    async def body(share, store, cache, sync, remote) -> None:  # type: ignore[no-untyped-def]
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            with trio.fail_after(10):
                while not remote.root_listings:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        assert remote.root_stats == 1
        root = store.get(ROOT_INO)
        assert root is not None and (root.uid, root.gid) == (OTHER, OTHER + 1)

    os.makedirs(tmp_path / "share")
    os.chown(tmp_path / "share", OTHER, OTHER + 1)
    _run(tmp_path, CountingRoot, body, made=True)
