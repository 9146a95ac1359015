"""Damaged content and server changes that keep size and mtime (issue 19, items 3 and 11),
in-process: a real store, cache and sync manager over a real local share, or over the
test sshd (``sftp``: the server hashes files with ``sha256sum`` over an exec channel).

Item 3: a changed file's content carries a SHA-256 recorded when it is committed; a replay
never uploads content that fails it. Item 11: the hash of the version the cache last agreed
with the server on is compared with a hash the server computes before an upload replaces
a file.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import trio

from cachefs.address import parse_remote
from cachefs.store import crypto
from cachefs.cache.cache import Cache, CacheConfig
from cachefs.cache.reconcile import ContentCopy, Reconcile
from cachefs.store.index import DAMAGED, ROOT_INO, Store
from devtools.devserver import SshServer
from cachefs.remote import open_remote
from cachefs.remote.local import LocalRemote
from cachefs.link.connectivity import Connectivity
from cachefs.errors import SyncFailed
from cachefs.sync.manager import SyncManager
from tests.test_remote import sftp_options

OURS = b"".join(b"our offline edit, line %06d\n" % i for i in range(6000))  # 3 sealed blocks
SERVER = b"the server's version\n"


class Side:
    """One mount's worth of parts, opened on a cache directory (``reopen``: unmount and
    mount again, as a user would, with the same cache)."""

    def __init__(self, cache_dir: Path, remote_text: str, remote, key: bytes | None = None) -> None:
        self.cache_dir, self.remote_text, self.remote, self.key = cache_dir, remote_text, remote, key
        self.store = Store(cache_dir, remote_text, key=key)
        self.conn = Connectivity(remote)
        self.cache = Cache(self.store, self.conn, CacheConfig(checkpoint_interval=3600))
        self.sync = SyncManager(self.store, self.cache, self.conn)
        self._scope = trio.CancelScope()
        self._ended = trio.Event()

    async def start(self, nursery: trio.Nursery) -> "Side":
        """Connected, with the cache's background work running (``close`` ends it)."""
        async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
            try:
                with self._scope:
                    await self.cache.run(task_status=task_status)
            finally:
                self._ended.set()
        await self.conn.first_connect()
        await nursery.start(run)
        return self

    async def close(self) -> None:
        """Unmount: the last checkpoint (which commits every change), then the store."""
        self._scope.cancel()
        await self._ended.wait()
        self.store.close()

    async def die(self) -> None:
        """As a killed process ends: its tasks stop and the index and the lock are closed
        without ``Store.close`` (no sync of the index)."""
        self._scope.cancel()
        await self._ended.wait()
        self.store.env.close()
        os.close(self.store._lock_fd)

    async def write(self, name: bytes, data: bytes, *, truncate: bool = True) -> int:
        try:
            ino = (await self.cache.lookup(ROOT_INO, name)).ino
            handle = await self.cache.open(ino, os.O_WRONLY | (os.O_TRUNC if truncate else 0))
        except Exception:
            node, handle = await self.cache.create(ROOT_INO, name, 0o644, os.O_WRONLY)
            ino = node.ino
        self.cache.write(handle, 0, data)
        self.cache.release(handle)
        return ino

    async def read(self, name: bytes) -> bytes:
        node = await self.cache.lookup(ROOT_INO, name)
        handle = await self.cache.open(node.ino)
        try:
            return await self.cache.read(handle, 0, node.size + 1)
        finally:
            self.cache.release(handle)


def _local(share: Path) -> tuple[str, LocalRemote]:
    return f"file://{share}", LocalRemote(str(share), 10.0)


def _cache_dir(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir(mode=0o700)
    return path


def _damaged_copies(share_listing: list[str]) -> list[str]:
    return [n for n in share_listing if "(damaged" in n]


@pytest.mark.parametrize("damage", ["truncated", "deleted", "flipped", "emptied"])
@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "encrypted"])
def test_damaged_content_is_never_uploaded(tmp_path: Path, share: Path, damage: str, sealed: bool) -> None:
    """Edited offline, content file damaged between two mounts: the server keeps its
    version, what is left of ours is kept here as a damaged copy, and the user is told."""
    (share / "f.txt").write_bytes(SERVER)
    text, remote = _local(share)
    key = crypto.open_key(_cache_dir(tmp_path), b"secret") if sealed else None

    async def main(nursery: trio.Nursery) -> None:
        side = await Side(tmp_path / "cache", text, remote, key).start(nursery)
        assert await side.read(b"f.txt") == SERVER
        ino = await side.write(b"f.txt", OURS)
        await side.close()  # unmount: the change is committed with its checksum

        content = tmp_path / "cache" / "data" / str(ino)
        if damage == "truncated":
            os.truncate(content, 100)
        elif damage == "emptied":
            os.truncate(content, 0)
        elif damage == "deleted":
            content.unlink()
        else:  # one byte of the stored content changed (a plain cache has no other check)
            data = bytearray(content.read_bytes())
            data[len(data) // 2] ^= 0x20
            content.write_bytes(bytes(data))

        side = await Side(tmp_path / "cache", text, remote, key).start(nursery)
        assert side.sync.pending() == 1
        with pytest.raises(SyncFailed, match="damaged in the cache"):
            await side.sync.full_pass()
        assert (share / "f.txt").read_bytes() == SERVER  # the server keeps its version
        assert side.sync.pending() == 0
        assert "damaged in the cache" in (side.sync.last_error or "")
        records = side.sync.conflicts()
        assert [r["kind"] for r in records] == ["damaged-local"]
        assert not _damaged_copies(os.listdir(share))  # nothing of ours went to the server
        assert await side.read(b"f.txt") == SERVER  # the name shows the server's version
        names = [n.name for n in side.store.children(ROOT_INO)]
        copies = [n for n in names if b"(damaged" in n]
        # What can still be read of ours from its start: a sealed file's blocks up to the
        # first that does not open (64 KiB each).
        expected = {"truncated": 0 if sealed else 100, "flipped": 65536 if sealed else len(OURS)}.get(damage, 0)
        if not expected:  # nothing is left of ours: no copy, and the record says so
            assert copies == [] and records[0]["conflict_path"] is None
        else:
            assert len(copies) == 1 and records[0]["conflict_path"] == copies[0].decode()
            left = await side.read(copies[0])
            assert len(left) == expected
            if damage == "truncated" or sealed:
                assert left == OURS[:expected]
            copy = side.store.child(ROOT_INO, copies[0])
            assert copy.has(DAMAGED)
            # kept by a listing of its folder (it is on no server) and never evicted
            await side.cache.listdir(ROOT_INO, refresh=True)
            assert side.store.child(ROOT_INO, copies[0]) is not None
            assert side.cache.evict_content(copy) == 0
            await side.sync.full_pass()  # and never uploaded
            assert not _damaged_copies(os.listdir(share))
            # It cannot take the name the server has; "remote" deletes it, here only.
            with pytest.raises(SyncFailed, match="failed its checksum"):
                await side.sync.resolve(b"f.txt", "local")
            await side.sync.resolve(copies[0], "remote")
            await side.sync.full_pass()
            assert side.store.child(ROOT_INO, copies[0]) is None
            assert side.sync.conflicts() == [] and side.sync.last_error is None
            assert os.listdir(share) == ["f.txt"] and (share / "f.txt").read_bytes() == SERVER
        await side.close()

    trio.run(_in_nursery, main)


def test_a_change_released_just_now_is_committed_and_uploaded(tmp_path: Path, share: Path) -> None:
    """A change released less than a checkpoint ago has no checksum yet: the replay commits
    it (as the checkpoint would) and uploads it, checked."""
    text, remote = _local(share)

    async def main(nursery: trio.Nursery) -> None:
        side = await Side(_cache_dir(tmp_path), text, remote).start(nursery)
        ino = await side.write(b"new.txt", OURS)
        assert side.store.content_sum(ino) is None
        await side.sync.full_pass()
        assert (share / "new.txt").read_bytes() == OURS
        found = side.store.content_sum(ino)
        assert found is not None and found.digest == hashlib.sha256(OURS).digest()
        await side.close()

    trio.run(_in_nursery, main)


def test_a_created_file_damaged_stays_here_as_a_copy(tmp_path: Path, share: Path) -> None:
    text, remote = _local(share)

    async def main(nursery: trio.Nursery) -> None:
        side = await Side(_cache_dir(tmp_path), text, remote).start(nursery)
        ino = await side.write(b"made-offline.txt", OURS)
        await side.close()
        os.truncate(tmp_path / "cache" / "data" / str(ino), 10)
        side = await Side(tmp_path / "cache", text, remote).start(nursery)
        with pytest.raises(SyncFailed):
            await side.sync.full_pass()
        assert os.listdir(share) == []
        names = [n.name for n in side.store.children(ROOT_INO)]
        assert len(names) == 1 and names[0].startswith(b"made-offline (damaged ")
        assert await side.read(names[0]) == OURS[:10]
        await side.close()

    trio.run(_in_nursery, main)


def _edit_on_server_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _same_size_change_case(tmp_path: Path, share: Path, text: str, remote, *, expect_both: bool) -> None:
    (share / "cfg.txt").write_bytes(b"value = 1\n")
    os.utime(share / "cfg.txt", (1_700_000_000, 1_700_000_000))

    async def main(nursery: trio.Nursery) -> None:
        side = await Side(_cache_dir(tmp_path), text, remote).start(nursery)
        assert await side.read(b"cfg.txt") == b"value = 1\n"
        await side.cache.checkpoint()  # made whole: the base version's hash is recorded
        await side.write(b"cfg.txt", b"value = 3\n")  # offline, say
        await side.cache.checkpoint()
        _edit_on_server_keeping_size_and_mtime(share / "cfg.txt", b"value = 2\n")
        await side.sync.full_pass()
        if expect_both:
            assert (share / "cfg.txt").read_bytes() == b"value = 2\n"
            copies = [n for n in os.listdir(share) if "conflict" in n]
            assert len(copies) == 1 and (share / copies[0]).read_bytes() == b"value = 3\n"
            assert [r["kind"] for r in side.sync.conflicts()] == ["changed-both"]
        else:  # without server hashes: today's behaviour (documented)
            assert (share / "cfg.txt").read_bytes() == b"value = 3\n"
        await side.close()

    trio.run(_in_nursery, main)


def test_local_share_change_keeping_size_and_mtime_keeps_both(tmp_path: Path, share: Path) -> None:
    text, remote = _local(share)
    _same_size_change_case(tmp_path, share, text, remote, expect_both=True)


def test_sftp_change_keeping_size_and_mtime_keeps_both(tmp_path: Path, share: Path, sshd) -> None:
    remote = open_remote(parse_remote(sshd.address()), sftp_options(sshd))
    try:
        _same_size_change_case(tmp_path, share, sshd.address(), remote, expect_both=True)
        assert remote.can_hash is True
    finally:
        remote.close()


def test_sftp_without_exec_keeps_todays_behaviour(tmp_path: Path, share: Path, caplog) -> None:
    """A server that runs no commands (``ForceCommand internal-sftp``): found out once,
    logged once, and the replay goes on as before."""
    with SshServer(tmp_path / "sshd-sftp-only", share=share, force_internal_sftp=True) as sshd:
        remote = open_remote(parse_remote(sshd.address()), sftp_options(sshd))
        try:
            with caplog.at_level("INFO", logger="cachefs.remote.sftp"):
                _same_size_change_case(tmp_path, share, sshd.address(), remote, expect_both=False)
            assert remote.can_hash is False
            assert sum("does not run sha256sum" in r.getMessage() for r in caplog.records) == 1
        finally:
            remote.close()


def test_no_remote_hash_option_runs_no_command(tmp_path: Path, share: Path, sshd) -> None:
    remote = open_remote(parse_remote(sshd.address()), sftp_options(sshd, remote_hash=False))
    try:
        assert remote.can_hash is False
        remote.connect()
        assert remote.hash_files([b"x"]) is None
    finally:
        remote.close()


def test_sftp_hash_files_names_with_any_bytes(share: Path, sshd) -> None:
    names = [b"plain.txt", b"it's \"quoted\" $HOME `x`.txt", b"new\nline", b"\xff\xfe latin"]
    for i, name in enumerate(names):
        (share / os.fsdecode(name)).write_bytes(b"%d" % i * 1000)
    remote = open_remote(parse_remote(sshd.address()), sftp_options(sshd))
    try:
        remote.connect()
        got = remote.hash_files(names + [b"missing"])
        assert got == [hashlib.sha256(b"%d" % i * 1000).digest() for i in range(len(names))] + [None]
    finally:
        remote.close()


def test_changed_during_upload_is_not_called_damaged(tmp_path: Path, share: Path) -> None:
    """A file written again while its upload reads it fails the old checksum: that is a
    newer version to send, not damage."""
    class Writing(LocalRemote):
        def upload(self, path, source, mode, temp_name, times=None):
            def rewritten():
                stream = source()
                first = stream.read(10)
                hook()  # the file changes here while the upload reads it
                rest = stream.read(1 << 20)
                return _Joined(first + rest, stream)
            return super().upload(path, rewritten, mode, temp_name, times)

    text = f"file://{share}"
    remote = Writing(str(share), 10.0)

    async def main(nursery: trio.Nursery) -> None:
        nonlocal hook
        side = await Side(_cache_dir(tmp_path), text, remote).start(nursery)
        ino = await side.write(b"w.txt", OURS)
        await side.cache.checkpoint()
        token = trio.lowlevel.current_trio_token()

        def change() -> None:
            async def again() -> None:
                await side.write(b"w.txt", b"X" * len(OURS), truncate=False)
            trio.from_thread.run(again, trio_token=token)
        hook = change
        with pytest.raises(SyncFailed, match="written while it was uploaded"):
            await side.sync.full_pass()
        assert not (share / "w.txt").exists()
        assert side.sync.conflicts() == []
        hook = lambda: None
        await side.cache.checkpoint()
        await side.sync.full_pass()
        assert (share / "w.txt").read_bytes() == b"X" * len(OURS)
        assert side.store.get(ino) is not None
        await side.close()

    hook = lambda: None
    trio.run(_in_nursery, main)


async def _in_nursery(main) -> None:
    async with trio.open_nursery() as nursery:
        await main(nursery)


class _Joined:
    def __init__(self, data: bytes, inner) -> None:
        self._data, self._inner = data, inner

    def read(self, n: int = -1) -> bytes:
        out, self._data = (self._data, b"") if n < 0 else (self._data[:n], self._data[n:])
        return out or self._inner.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._inner.close()


# -- through a real mount and the test sshd ---------------------------------------------------
def test_damaged_content_file_after_a_remount_is_not_uploaded(mount_factory, share: Path) -> None:
    """The reproduction of item 3: edit offline, unmount, cut one content file and delete
    another, mount again, go online, sync. Before checksums the server got 100 bytes of the
    edit (and the mount showed NUL bytes past them) and an empty ``new.txt``."""
    from tests.fixtures.mount import status
    from tests.test_conflicts import conflict_records as read_conflicts
    from tests.test_writes import control, go_offline, sync, wait_for

    (share / "doc.txt").write_bytes(SERVER)
    mount = mount_factory()
    mount.start()
    mnt = mount.mountpoint
    assert (mnt / "doc.txt").read_bytes() == SERVER
    go_offline(mnt)
    (mnt / "doc.txt").write_bytes(OURS)
    (mnt / "new.txt").write_bytes(OURS)
    doc, new = os.stat(mnt / "doc.txt").st_ino, os.stat(mnt / "new.txt").st_ino
    mount.stop()
    os.truncate(mount.cache_dir / "data" / str(doc), 100)
    (mount.cache_dir / "data" / str(new)).unlink()

    with mount_factory(name="mnt", allowed_errors=[r"is damaged"]) as again:
        mnt = again.mountpoint
        control(mnt, "online")
        try:
            sync(mnt)  # fails when it is the pass that finds the damage (write-back may be first)
        except OSError as exc:
            assert exc.errno == errno.EIO
        wait_for(lambda: status(mnt)["pending"] == 0, 15, "the replay")
        assert (share / "doc.txt").read_bytes() == SERVER
        assert not (share / "new.txt").exists()
        assert sorted(os.listdir(share)) == ["doc.txt"]
        assert "damaged in the cache" in (status(mnt)["last_error"] or "")
        kinds = sorted((r["kind"], r["path"]) for r in read_conflicts(mnt))
        assert kinds == [("damaged-local", "doc.txt"), ("damaged-local", "new.txt")]
        assert (mnt / "doc.txt").read_bytes() == SERVER
        copies = [n for n in os.listdir(mnt) if "(damaged" in n]
        assert len(copies) == 1 and copies[0].startswith("doc (damaged ")
        assert (mnt / copies[0]).read_bytes() == OURS[:100]
        assert os.getxattr(mnt / copies[0], "user.cachefs.state") == b"damaged"
        assert os.getxattr(mnt / "doc.txt", "user.cachefs.state") == b"conflict"
        sync(mnt)  # a later sync succeeds, and the copy is still only here
        assert sorted(os.listdir(share)) == ["doc.txt"]
        assert copies[0] in os.listdir(mnt)


DAMAGE_ROUNDS = 4


def test_seeded_edits_kills_and_damage_between_mounts(mount_factory, sshd, share: Path) -> None:
    """A seeded model: each round edits and creates files offline (the server stopped),
    ends the mount cleanly or with ``kill -9`` (then mounts it once more offline, whose
    checkpoint commits what the kill left), damages some of the changed files' content
    files (cut, emptied, deleted, one byte changed), then mounts online and syncs. Every
    damaged file must be reported (``damaged-local``) with the server keeping its version;
    every other change must reach the server; nothing damaged may reach it.
    ``CACHEFS_DAMAGE_SEED=N`` replays one seed."""
    import random

    from tests.fixtures.mount import status
    from tests.test_conflicts import conflict_records
    from tests.test_writes import control, read_all, sync, wait_for, wait_state

    seed = int(os.environ.get("CACHEFS_DAMAGE_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    names = [f"f{i}.txt" for i in range(6)]
    server: dict[str, bytes] = {n: f"server {n}\n".encode() * 50 for n in names}
    for name, data in server.items():
        (share / name).write_bytes(data)
    allowed = [r"is damaged", r"shorter than its size"]
    mount = mount_factory(allowed_errors=allowed)
    mount.start()
    read_all(mount.mountpoint)
    reported = 0
    for round_no in range(DAMAGE_ROUNDS):
        where = f"seed {seed}, round {round_no}"
        mnt = mount.mountpoint
        sshd.stop()
        wait_state(mnt, "offline")
        edited: dict[str, tuple[int, bytes]] = {}
        for name in rng.sample(names, 3) + [f"new{round_no}-{i}.txt" for i in range(rng.randint(0, 2))]:
            data = f"round {round_no} {name} ".encode() * rng.randint(1, 400)
            (mnt / name).write_bytes(data)
            edited[name] = (os.stat(mnt / name).st_ino, data)
        if rng.random() < 0.5:
            mount.kill9()
            offline = mount_factory(name="mnt", check_log=False)
            offline.start()  # (server down: offline; its last checkpoint commits the rest)
            offline.stop()
        else:
            mount.stop()
        damaged = set(rng.sample(sorted(edited), rng.randint(1, 2)))
        for name in damaged:
            content = mount.cache_dir / "data" / str(edited[name][0])
            how = rng.choice(["cut", "empty", "delete", "flip"])
            if how == "cut":
                os.truncate(content, len(edited[name][1]) // 2)
            elif how == "empty":
                os.truncate(content, 0)
            elif how == "delete":
                content.unlink()
            else:
                data = bytearray(content.read_bytes())
                data[rng.randrange(len(data))] ^= 0x01
                content.write_bytes(bytes(data))
        sshd.start()
        mount = mount_factory(name="mnt", allowed_errors=allowed)
        mount.start()
        mnt = mount.mountpoint
        control(mnt, "online")
        try:
            sync(mnt)
        except OSError:
            pass  # EIO when this sync's pass found the damage (write-back may come first)
        wait_for(lambda: status(mnt)["pending"] == 0, 20, f"the replay ({where})")
        sync(mnt)
        for name, (_ino, data) in edited.items():
            if name in damaged:
                if name in server:
                    assert (share / name).read_bytes() == server[name], f"{name} ({where})"
                else:
                    assert not (share / name).exists(), f"{name} ({where})"
            else:
                assert (share / name).read_bytes() == data, f"{name} ({where})"
                server[name] = data
        assert not [n for n in os.listdir(share) if "damaged" in n or "cachefs-tmp" in n], where
        records = [r for r in conflict_records(mnt) if r["kind"] == "damaged-local"]
        assert sorted(r["path"] for r in records[reported:]) == sorted(damaged), where
        assert sorted(r["kind"] for r in conflict_records(mnt)) == ["damaged-local"] * len(records), where
        reported = len(records)
        assert "damaged in the cache" in (status(mnt)["last_error"] or ""), where
        names = sorted(server)
        read_all(mnt)  # (the next round edits offline: every file whole in the cache)
    mount.stop()


def test_mount_keeps_both_when_the_server_change_kept_size_and_mtime(mount_factory, share: Path) -> None:
    """Item 11 through a real mount and the test sshd (which runs commands): edited here
    offline, changed there in the same second with the same size; before, ``sync`` replaced
    the server's change with no conflict."""
    from tests.test_conflicts import conflict_records
    from tests.test_writes import control, go_offline, sync_until_done

    (share / "cfg.txt").write_bytes(b"value = 1\n")
    os.utime(share / "cfg.txt", (1_700_000_000, 1_700_000_000))
    with mount_factory() as mount:
        mnt = mount.mountpoint
        assert (mnt / "cfg.txt").read_bytes() == b"value = 1\n"
        go_offline(mnt)
        (mnt / "cfg.txt").write_bytes(b"value = 3\n")
        _edit_on_server_keeping_size_and_mtime(share / "cfg.txt", b"value = 2\n")
        control(mnt, "online")
        sync_until_done(mnt)
        assert (share / "cfg.txt").read_bytes() == b"value = 2\n"
        copies = [n for n in os.listdir(share) if "conflict" in n]
        assert len(copies) == 1 and (share / copies[0]).read_bytes() == b"value = 3\n"
        assert [r["kind"] for r in conflict_records(mnt)] == ["changed-both"]


def test_a_change_written_through_kernel_passthrough_is_checked_too(mount_factory, share: Path) -> None:
    """A writer that joins the kernel's passthrough readers writes into the content file
    without the mount seeing its writes: its change is summed after its release like any,
    so damage to it between mounts is caught (without a sum, the next mount would have
    taken the damaged file as it is and uploaded it)."""
    from tests.test_conflicts import conflict_records
    from tests.test_passthrough import _mount_and_open, _passthrough_files
    from tests.test_writes import control, sync, wait_for

    data = os.urandom(2 << 20)
    mount, path, reader = _mount_and_open(mount_factory, share, "db.bin", data)
    mnt = mount.mountpoint
    ino = os.fstat(reader).st_ino
    try:
        control(mnt, "offline")
        with open(path, "r+b") as writer:
            assert _passthrough_files(mnt) == 1
            writer.seek(1000)
            writer.write(b"written through the kernel")
    finally:
        os.close(reader)
    mount.stop()
    content = mount.cache_dir / "data" / str(ino)
    damaged = bytearray(content.read_bytes())
    damaged[1 << 20] ^= 0x01
    content.write_bytes(bytes(damaged))
    with mount_factory(allowed_errors=[r"is damaged"]) as again:
        control(again.mountpoint, "online")
        try:
            sync(again.mountpoint)
        except OSError:
            pass
        wait_for(lambda: [r["kind"] for r in conflict_records(again.mountpoint)] == ["damaged-local"],
                 15, "the damage reported")
        assert (share / "db.bin").read_bytes() == data


def test_a_name_renamed_onto_in_the_same_pass_is_hashed_after_the_rename(tmp_path: Path, share: Path) -> None:
    """One pass replays ``store c``, ``rename b -> a`` and ``store a`` (b's file, edited
    after the rename). The server's hashes asked for at the first store must not stand for
    ``a`` after the rename: the hash of the old ``a`` against b's base made a false
    conflict (found by the seeded kill -9 test: a conflict copy with one client)."""
    for name, data in ((b"a.txt", b"AAAA-1\n"), (b"b.txt", b"BBBB-1\n"), (b"c.txt", b"c-1\n")):
        (share / name.decode()).write_bytes(data)
    text, remote = _local(share)

    async def main(nursery: trio.Nursery) -> None:
        side = await Side(_cache_dir(tmp_path), text, remote).start(nursery)
        for name in (b"a.txt", b"b.txt", b"c.txt"):
            await side.read(name)
        await side.cache.checkpoint()
        await side.write(b"c.txt", b"c-2\n")
        await side.cache.rename(ROOT_INO, b"b.txt", ROOT_INO, b"a.txt")
        await side.write(b"a.txt", b"BBBB-2\n")
        await side.cache.checkpoint()
        await side.sync.full_pass()
        assert side.sync.conflicts() == []
        assert sorted(os.listdir(share)) == ["a.txt", "c.txt"]
        assert (share / "a.txt").read_bytes() == b"BBBB-2\n"
        await side.close()

    trio.run(_in_nursery, main)


class _Died(Exception):
    """The mount process ends here (as a kill -9 would, in-process)."""


async def _change_on_both_sides(side: Side, share: Path, ours: bytes) -> None:
    """f.txt read whole, written here (committed), then changed on the server too."""
    await side.read(b"f.txt")
    await side.write(b"f.txt", ours)
    await side.cache.checkpoint()
    (share / "f.txt").write_bytes(b"changed on the server\n")


def test_a_conflict_copy_is_whole_when_the_mount_dies_right_after_its_commit(tmp_path: Path,
                                                                          share: Path) -> None:
    """Changed on both sides: the commit that names our version's conflict copy (cached
    whole) is followed at once by the end of the process. The next mount must read the
    copy as ours: the content file was moved after that commit, so a kill in between left
    a copy that read empty and was never fetched again."""
    (share / "f.txt").write_bytes(b"first version\n")
    os.utime(share / "f.txt", (1_700_000_000, 1_700_000_000))
    text, remote = _local(share)
    cache_dir = _cache_dir(tmp_path)
    ours = b"changed here, offline\n"

    async def first(nursery: trio.Nursery) -> None:
        side = await Side(cache_dir, text, remote).start(nursery)
        await _change_on_both_sides(side, share, ours)

        def died(op) -> None:
            if op.kind == "store":
                raise _Died()
        side.cache.op_done = died  # (called right after the entry's commit)
        with pytest.raises(_Died):
            await side.sync.full_pass()
        await side.die()

    async def second(nursery: trio.Nursery) -> None:
        side = await Side(cache_dir, text, remote).start(nursery)
        copies = [n for n in os.listdir(share) if "(conflict " in n]
        assert len(copies) == 1 and (share / copies[0]).read_bytes() == ours
        assert await side.read(copies[0].encode()) == ours
        assert await side.read(b"f.txt") == b"changed on the server\n"
        await side.close()

    trio.run(_in_nursery, first)
    trio.run(_in_nursery, second)


def test_a_kill_between_the_conflict_copys_content_and_its_commit_loses_nothing(
        tmp_path: Path, share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Changed on both sides: the process ends after our version's content was copied for
    its conflict copy and before the commit that names the copy (the other step of the
    window ``test_a_conflict_copy_is_whole_when_the_mount_dies_right_after_its_commit``
    covers). No copy may read empty: the entry stays, the next pass makes the copy again,
    and every conflict copy on the server and in the cache holds our version."""
    (share / "f.txt").write_bytes(b"first version\n")
    os.utime(share / "f.txt", (1_700_000_000, 1_700_000_000))
    text, remote = _local(share)
    cache_dir = _cache_dir(tmp_path)
    ours = b"changed here, offline, before the kill\n"
    copy_content = Reconcile.copy_content

    async def copied_then_died(self: Reconcile, ino: int, size: int) -> ContentCopy:
        await copy_content(self, ino, size)  # (its content file stays: nothing removes it)
        raise _Died()

    async def first(nursery: trio.Nursery) -> None:
        side = await Side(cache_dir, text, remote).start(nursery)
        await _change_on_both_sides(side, share, ours)
        monkeypatch.setattr(Reconcile, "copy_content", copied_then_died)
        with pytest.raises(_Died):
            await side.sync.full_pass()
        monkeypatch.setattr(Reconcile, "copy_content", copy_content)
        await side.die()

    async def second(nursery: trio.Nursery) -> None:
        side = await Side(cache_dir, text, remote).start(nursery)
        assert side.sync.pending() == 1  # (the entry stayed)
        await side.sync.full_pass()
        copies = sorted(n for n in os.listdir(share) if "(conflict " in n)
        assert copies and all((share / name).read_bytes() == ours for name in copies)
        for name in copies:
            assert await side.read(name.encode()) == ours
        assert await side.read(b"f.txt") == b"changed on the server\n"
        assert side.sync.pending() == 0
        await side.close()

    trio.run(_in_nursery, first)
    trio.run(_in_nursery, second)


def test_a_kill_while_a_damaged_version_is_set_aside_loses_nothing(
        tmp_path: Path, share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process ends as the replay sets a damaged version aside: the copy, the name
    showing the server's version, the entry's end and the record commit together, so the
    next mount finds either all of it or none and ends with one copy and one record."""
    from cachefs.sync.ledger import Ledger
    (share / "f.txt").write_bytes(SERVER)
    text, remote = _local(share)
    cache_dir = _cache_dir(tmp_path)
    finish = Ledger.finish

    def died_at_the_record(self: Ledger, op, update=None, conflict=None) -> None:
        if conflict is not None and conflict.get("kind") == "damaged-local":
            raise _Died()
        finish(self, op, update, conflict)

    async def first(nursery: trio.Nursery) -> None:
        side = await Side(cache_dir, text, remote).start(nursery)
        await side.read(b"f.txt")
        ino = await side.write(b"f.txt", OURS)
        await side.close()
        os.truncate(cache_dir / "data" / str(ino), 100)  # damaged between two mounts
        side = await Side(cache_dir, text, remote).start(nursery)
        monkeypatch.setattr(Ledger, "finish", died_at_the_record)
        with pytest.raises(_Died):
            await side.sync.full_pass()
        monkeypatch.setattr(Ledger, "finish", finish)
        await side.die()

    async def second(nursery: trio.Nursery) -> None:
        side = await Side(cache_dir, text, remote).start(nursery)
        with pytest.raises(SyncFailed, match="damaged in the cache"):
            await side.sync.full_pass()
        assert side.sync.pending() == 0
        assert [r["kind"] for r in side.sync.conflicts()] == ["damaged-local"]
        copies = [n.name for n in side.store.children(ROOT_INO) if b"(damaged" in n.name]
        assert len(copies) == 1 and await side.read(copies[0]) == OURS[:100]
        assert (share / "f.txt").read_bytes() == SERVER
        assert await side.read(b"f.txt") == SERVER
        await side.close()

    trio.run(_in_nursery, first)
    trio.run(_in_nursery, second)
