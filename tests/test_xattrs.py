"""Extended attributes in the ``user.`` namespace (issue 23): kept in the cache with each
node, with ext4's limits and errno, journaled and replayed where the remote keeps them
(a local-path remote: the share's own files), local-only over SFTP, copied by ``cp -a``
and ``rsync -aX`` into, out of and within a mount, online, offline and after a remount.

Real mounts (the sshd fixture, and a local folder as the share), real ext4 for the limits;
the record, the limits' rule and the journal's rules also as pure logic.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefs.errors import XattrRefused
from cachefs.store.index import Store, StoreError
from cachefs.store.journal import Op, optimise
from cachefs.store.xattrs import BEYOND, REMOVED, XattrSet, check_request, entry_size
from tests.fixtures.mount import run_with_timeout, status
from tests.test_cli import cachefs, ok
from tests.test_control import command, go_offline, go_online_and_sync

STATE = "user.cachefs.state"
EXT4_MAGIC = 0xEF53


def bounded(function, what: str, timeout: float = 30.0):
    return run_with_timeout(function, timeout, what)


def errno_of(function) -> str:
    try:
        bounded(function, "xattr call")
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]
    return "ok"


def _fs_magic(path: Path) -> int:
    out = subprocess.run(["stat", "-f", "-c", "%t", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip(), 16)


@contextlib.contextmanager
def ext4(tmp_path: Path) -> Iterator[Path]:
    """A small ext4 of its own (4 KiB blocks, 256-byte inodes, no ea_inode: what the rule
    follows), in an image file mounted by loop, whatever /tmp is; unmounted afterwards."""
    image, at = tmp_path / "ext4.img", tmp_path / "ext4"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", "-O", "^ea_inode", str(image)],
                   check=True, timeout=60)
    at.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(at)], check=True, timeout=30)
    try:
        assert _fs_magic(at) == EXT4_MAGIC
        yield at
    finally:
        subprocess.run(["umount", str(at)], timeout=30)


def tree_with_xattrs(root: Path) -> dict[str, dict[str, bytes]]:
    """A small tree whose files and folders carry user attributes; what each has."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(3000))
    (root / "sub" / "deeper" / "c").write_bytes(b"")
    (root / "plain.txt").write_bytes(b"no attributes\n")
    (root / "link").symlink_to("a.txt")
    want = {
        "a.txt": {"user.tag": b"red", "user.xdg.comment": "été".encode()},
        "sub": {"user.folder": b"yes"},
        "sub/b.bin": {"user.bin": bytes(range(256)), "user.empty": b""},
        "sub/deeper/c": {"user.c": b"x" * 1000},
        "plain.txt": {},
    }
    for rel, attrs in want.items():
        for name, value in attrs.items():
            os.setxattr(root / rel, name, value)
    return want


def user_xattrs(path: Path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False)
            for n in bounded(lambda: os.listxattr(path, follow_symlinks=False), f"listxattr {path}")
            if n.startswith("user.")}


def assert_tree(root: Path, want: dict[str, dict[str, bytes]]) -> None:
    for rel, attrs in want.items():
        assert user_xattrs(root / rel) == attrs, rel
    assert (root / "a.txt").read_bytes() == b"alpha\n"


def sync(mnt: Path) -> None:
    command(mnt, "sync")
    assert status(mnt)["pending"] == 0, status(mnt)


# -- the limits: a pure function against a real ext4 file ------------------------------------

def test_limits_follow_ext4(tmp_path: Path) -> None:
    """``XattrSet.set``/``remove`` (``store.xattrs.place``) accept and refuse (ENOSPC) just
    what a real ext4 file (4 KiB blocks, 256-byte inodes) does, over random sequences."""
    with ext4(tmp_path) as disk:
        _compare_with(disk / "f")


def _compare_with(real: Path) -> None:
    for seed in range(25):
        rnd = random.Random(seed)
        real.unlink(missing_ok=True)
        real.write_bytes(b"")
        model = XattrSet()
        names = [b"user." + bytes(rnd.choice(b"abcdefgh") for _ in range(rnd.randint(1, 40))) for _ in range(40)]
        for step in range(300):
            name = rnd.choice(names)
            if rnd.random() < 0.2:
                expected = "ok" if model.get(name) is not None else "ENODATA"
                if expected == "ok":
                    model.remove(name)
                got = errno_of(lambda: os.removexattr(real, name))
            else:
                value = bytes([rnd.choice(b"xy")]) * rnd.choice([0, 1, 3, 5, 17, 100, 300, 900, 2000, 3000])
                try:
                    model.set(name, value)
                    expected = "ok"
                except XattrRefused as exc:
                    expected = errno.errorcode[exc.errno]
                got = errno_of(lambda: os.setxattr(real, name, value))
            assert got == expected, (seed, step, name, got, expected)
    # the figures docs/posix.md gives
    for count, name_len, value_len in ((172, 1, 1), (148, 8, 1), (85, 16, 16), (18, 100, 100)):
        model = XattrSet()
        made = 0
        try:
            while True:
                model.set(b"user." + b"%0*d" % (name_len, made), b"v" * value_len)
                made += 1
        except XattrRefused as exc:
            assert exc.errno == errno.ENOSPC
        assert made == count, (name_len, value_len)
    one = XattrSet()
    one.set(b"user.a", b"x" * 4040)
    with pytest.raises(XattrRefused):
        XattrSet().set(b"user.a", b"x" * 4041)


def test_request_limits_and_record() -> None:
    with pytest.raises(XattrRefused) as too_long:
        check_request(b"user." + b"n" * 251)
    assert too_long.value.errno == errno.ERANGE
    check_request(b"user." + b"n" * 250)
    with pytest.raises(XattrRefused) as empty:
        check_request(b"user.")
    assert empty.value.errno == errno.EINVAL
    with pytest.raises(XattrRefused) as too_big:
        check_request(b"user.a", b"v" * 65537)
    assert too_big.value.errno == errno.E2BIG
    assert entry_size(b"user.a", b"") == 20 and entry_size(b"user.abcde", b"123456") == 32

    found = XattrSet(complete=False)
    found.set(b"user.a", b"1")
    found.remove(b"user.gone")  # removed here before the remote's were read
    again = XattrSet.unpack(found.pack())
    assert again == found and not again.complete
    assert again.items[b"user.gone"] == (REMOVED, None) and again.names() == [b"user.a"]
    again.take_remote([(b"user.gone", b"old"), (b"user.a", b"server's"), (b"user.b", b"2"),
                       (b"user.huge", b"h" * 5000), (b"trusted.x", b"no")])
    assert again.complete and again.names() == [b"user.a", b"user.b", b"user.huge"]
    assert again.get(b"user.a") == b"1" and again.items[b"user.huge"][0] == BEYOND
    with pytest.raises(ValueError):
        XattrSet.unpack(b"\x09\x01")


def test_optimise_keeps_the_last_change_of_each_name_of_a_live_node() -> None:
    ops = [Op("create", 20, b"f", parent=1, seq=1),
           Op("xattr", 20, b"f", xattr=b"user.a", seq=2),
           Op("xattr", 20, b"f", xattr=b"user.b", seq=3),
           Op("xattr", 20, b"f", xattr=b"user.a", seq=4),
           Op("xattr", 21, b"old", xattr=b"user.a", seq=5),  # a server file, deleted here later
           Op("unlink", 21, b"old", base=(1, 1, 0o100000), parent=1, seq=6),
           Op("create", 22, b"tmp", parent=1, seq=7),  # created and deleted here
           Op("xattr", 22, b"tmp", xattr=b"user.a", seq=8),
           Op("unlink", 22, b"tmp", parent=1, seq=9)]
    kept, dropped = optimise(ops, alive={20})
    assert [op.seq for op in kept] == [1, 3, 4, 6]
    assert sorted(op.seq for op in dropped) == [2, 5, 7, 8, 9]
    # an entry written by this release decodes; one of the previous release (no xattr field) too
    op = Op("xattr", 20, b"d/f", xattr=b"user.\xffname", seq=3)
    assert Op.decode(3, op.encode()) == op
    assert Op.decode(1, b'{"kind":"setattr","ino":5,"path":"x","v":1}').xattr == b""


@pytest.mark.parametrize("key", [None, b"k" * 32], ids=["plain", "sealed"])
def test_a_damaged_record_is_refused_at_open_and_goes_with_its_node(tmp_path: Path, key) -> None:
    import lmdb
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    store = Store(cache, "file:///x", key=key)
    found = XattrSet()
    found.set(b"user.secret-name", b"secret-value")
    store.transact(lambda t: t.set_xattrs(77, found))
    store.transact(lambda t: t.set_xattrs(78, found))
    assert store.get_xattrs(77) == found and store.get_xattrs(79) is None
    store.transact(lambda t: t.delete_node(78))
    assert store.get_xattrs(78) is None
    store.close()
    data = (cache / "index" / "data.mdb").read_bytes()
    assert (b"secret-name" in data) == (key is None) and (b"secret-value" in data) == (key is None)
    env = lmdb.open(str(cache / "index"), max_dbs=12)
    with env.begin(write=True) as txn:
        db = env.open_db(b"xattrs", txn=txn)
        k, v = next(iter(txn.cursor(db=db)))
        txn.put(k, bytes(v[:-1]) + bytes([v[-1] ^ 1]), db=db)
    env.close()
    with pytest.raises(StoreError, match="damaged"):
        Store(cache, "file:///x", key=key)


# -- over SFTP: kept in the cache only -------------------------------------------------------

def test_sftp_keeps_them_local_with_ext4_errno(mount_factory, share: Path) -> None:
    (share / "f").write_bytes(b"server file\n")
    (share / "d").mkdir()
    with mount_factory() as mount:
        mnt = mount.mountpoint
        f = mnt / "f"
        assert os.listxattr(f) == []  # user.cachefs.state: read by name, not listed
        assert os.getxattr(f, STATE) == b"remote"
        os.setxattr(f, "user.one", b"1")
        os.setxattr(mnt / "d", "user.dir", b"folder")
        assert sorted(os.listxattr(f)) == ["user.one"]
        assert os.getxattr(f, "user.one") == b"1"
        assert os.getxattr(f, STATE) == b"remote, xattrs local"
        assert os.getxattr(mnt / "d", "user.dir") == b"folder"
        # flags, absence, namespaces, the state attribute, kinds of objects
        assert errno_of(lambda: os.setxattr(f, "user.one", b"2", os.XATTR_CREATE)) == "EEXIST"
        assert errno_of(lambda: os.setxattr(f, "user.two", b"2", os.XATTR_REPLACE)) == "ENODATA"
        os.setxattr(f, "user.one", b"replaced", os.XATTR_REPLACE)
        assert os.getxattr(f, "user.one") == b"replaced"
        assert errno_of(lambda: os.getxattr(f, "user.none")) == "ENODATA"
        assert errno_of(lambda: os.removexattr(f, "user.none")) == "ENODATA"
        assert errno_of(lambda: os.setxattr(f, "trusted.x", b"1")) == "ENOTSUP"
        assert errno_of(lambda: os.setxattr(f, "security.x", b"1")) == "ENOTSUP"
        assert errno_of(lambda: os.getxattr(f, "trusted.x")) == "ENOTSUP"
        assert errno_of(lambda: os.setxattr(f, STATE, b"pinned")) == "EPERM"
        assert errno_of(lambda: os.removexattr(f, STATE)) == "EPERM"
        os.symlink("f", mnt / "ln")
        assert errno_of(lambda: os.setxattr(mnt / "ln", "user.x", b"1", follow_symlinks=False)) == "EPERM"
        # sizes: the kernel's checks, then ext4's room
        assert errno_of(lambda: os.setxattr(f, "user." + "n" * 251, b"1")) == "ERANGE"
        assert errno_of(lambda: os.setxattr(f, "user.big", b"v" * 65537)) == "E2BIG"
        # a name empty after its prefix: EINVAL for each, as ext4 (it was ERANGE, ENODATA)
        assert [errno_of(lambda: os.setxattr(f, "user.", b"1")), errno_of(lambda: os.getxattr(f, "user.")),
                errno_of(lambda: os.removexattr(f, "user."))] == ["EINVAL"] * 3
        (mnt / "full").write_bytes(b"")
        made = 0
        while (err := errno_of(lambda: os.setxattr(mnt / "full", f"user.{made:03d}", b"v"))) == "ok":
            made += 1
        assert (err, made) == ("ENOSPC", 172)  # as many as ext4 takes (test_limits_follow_ext4)
        os.removexattr(f, "user.one")
        assert os.listxattr(f) == []
        sync(mnt)  # (the files made above)
        os.setxattr(f, "user.kept", b"over remounts")
        # the server never hears of them, and nothing waits to be sent
        assert status(mnt)["pending"] == 0
        assert os.listxattr(share / "f") == []
        go_offline(mnt)
        os.setxattr(f, "user.offline", b"made offline")
        assert status(mnt)["pending"] == 0
    with mount_factory(name="mnt2") as again:
        f = again.mountpoint / "f"
        assert user_xattrs(f) == {"user.kept": b"over remounts", "user.offline": b"made offline"}
        assert user_xattrs(again.mountpoint / "d") == {"user.dir": b"folder"}
        (again.mountpoint / "f").unlink()
        (again.mountpoint / "f").write_bytes(b"new")
        assert user_xattrs(again.mountpoint / "f") == {}  # removed with the node


# -- a local folder as the share: replayed onto its files ---------------------------------------

def test_a_file_read_online_has_the_servers_attributes_offline(mount_factory, share: Path) -> None:
    """The server's attributes are read after a fetch of the content (in the background):
    a file read online lists them offline; one never read answers EHOSTDOWN offline where
    the answer depends on them (it listed [], and cp -a copied it without them)."""
    (share / "read.txt").write_bytes(b"read online\n")
    os.setxattr(share / "read.txt", "user.r", b"R")
    (share / "sub").mkdir()
    (share / "sub" / "small.txt").write_bytes(b"small\n")
    os.setxattr(share / "sub" / "small.txt", "user.s", b"S")
    (share / "sub" / "empty").write_bytes(b"")
    os.setxattr(share / "sub" / "empty", "user.e", b"E")
    os.setxattr(share / "sub", "user.pinned", b"P")
    (share / "listed").mkdir()
    os.setxattr(share / "listed", "user.l", b"L")
    (share / "listed" / "empty").write_bytes(b"")
    os.setxattr(share / "listed" / "empty", "user.le", b"LE")
    (share / "never.txt").write_bytes(b"never read\n")
    os.setxattr(share / "never.txt", "user.n", b"N")
    with mount_factory(remote=str(share)) as mount:
        mnt = mount.mountpoint
        assert (mnt / "read.txt").read_bytes() == b"read online\n"
        assert command(mnt, "pin sub") > 0
        os.listdir(mnt / "listed")
        time.sleep(1)  # (the reads after fetches and listings: a local folder answers in ms)
        go_offline(mnt)
        assert user_xattrs(mnt / "read.txt") == {"user.r": b"R"}
        assert user_xattrs(mnt / "sub") == {"user.pinned": b"P"}
        assert user_xattrs(mnt / "sub" / "small.txt") == {"user.s": b"S"}
        assert user_xattrs(mnt / "sub" / "empty") == {"user.e": b"E"}
        assert user_xattrs(mnt / "listed") == {"user.l": b"L"}  # (a folder listed: read after)
        assert user_xattrs(mnt / "listed" / "empty") == {"user.le": b"LE"}
        tree = share.parent / "tree-out"
        assert subprocess.run(["cp", "-a", str(mnt / "sub"), str(tree)]).returncode == 0
        assert user_xattrs(tree) == {"user.pinned": b"P"} and user_xattrs(tree / "empty") == {"user.e": b"E"}
        never = mnt / "never.txt"
        assert errno_of(lambda: os.listxattr(never)) == "EHOSTDOWN"
        assert errno_of(lambda: os.getxattr(never, "user.n")) == "EHOSTDOWN"
        assert errno_of(lambda: os.removexattr(never, "user.n")) == "EHOSTDOWN"
        assert errno_of(lambda: os.setxattr(never, "user.x", b"1", os.XATTR_CREATE)) == "EHOSTDOWN"
        os.setxattr(never, "user.here", b"set offline")
        assert os.getxattr(never, "user.here") == b"set offline"
        copy = share.parent / "copy-out"
        assert subprocess.run(["cp", "-a", str(mnt / "read.txt"), str(copy)]).returncode == 0
        assert user_xattrs(copy) == {"user.r": b"R"}
        go_online_and_sync(mnt)
        assert user_xattrs(never) == {"user.n": b"N", "user.here": b"set offline"}
        assert user_xattrs(share / "never.txt") == {"user.n": b"N", "user.here": b"set offline"}


def test_a_rename_still_to_replay_never_reads_the_old_files_attributes(mount_factory, share: Path) -> None:
    """mv A B offline over the share's B, then online with the replay held back by a file
    open for writing: B's attributes are not read from the share's old B (they were merged
    and kept for good); after the replay B has A's."""
    (share / "A").write_bytes(b"a\n")
    os.setxattr(share / "A", "user.a", b"A")
    (share / "B").write_bytes(b"b\n")
    os.setxattr(share / "B", "user.b", b"B")
    with mount_factory(remote=str(share)) as mount:
        mnt = mount.mountpoint
        go_offline(mnt)
        fd = os.open(mnt / "open.txt", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"x")
            os.rename(mnt / "A", mnt / "B")
            command(mnt, "online")
            deadline = time.monotonic() + 20
            while status(mnt)["connectivity"] != "online":
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert status(mnt)["pending"] > 0  # (held back by the open file)
            assert "user.b" not in user_xattrs(mnt / "B")
        finally:
            os.close(fd)
        sync(mnt)
        assert user_xattrs(share / "B") == {"user.a": b"A"}
        assert user_xattrs(mnt / "B") == {"user.a": b"A"}

def test_local_share_carries_them_online_offline_and_after_a_remount(mount_factory, share: Path) -> None:
    (share / "served.txt").write_bytes(b"on the server\n")
    os.setxattr(share / "served.txt", "user.from", b"server")
    (share / "unread.txt").write_bytes(b"its attributes not read before going offline\n")
    os.setxattr(share / "unread.txt", "user.keep", b"server's")
    os.setxattr(share / "unread.txt", "user.drop", b"server's")
    (share / "d").mkdir()
    with mount_factory(remote=str(share)) as mount:
        mnt = mount.mountpoint
        assert user_xattrs(mnt / "served.txt") == {"user.from": b"server"}  # the server's, read once
        os.setxattr(mnt / "served.txt", "user.here", b"online")
        (mnt / "made.txt").write_bytes(b"made here\n")
        os.setxattr(mnt / "made.txt", "user.a", b"1")
        os.setxattr(mnt / "made.txt", "user.a", b"2")  # folded: one entry sends the last
        os.setxattr(mnt / "d", "user.folder", b"f")
        sync(mnt)
        assert user_xattrs(share / "served.txt") == {"user.from": b"server", "user.here": b"online"}
        assert user_xattrs(share / "made.txt") == {"user.a": b"2"}
        assert user_xattrs(share / "d") == {"user.folder": b"f"}
        assert os.getxattr(mnt / "made.txt", STATE) == b"cached"  # (no "xattrs local" here)

        go_offline(mnt)
        os.removexattr(mnt / "served.txt", "user.from")
        os.setxattr(mnt / "served.txt", "user.off", b"offline")
        (mnt / "made.txt").write_bytes(b"changed offline\n")  # its upload keeps them
        (mnt / "new-off.txt").write_bytes(b"new offline\n")
        os.setxattr(mnt / "new-off.txt", "user.n", b"n")
        (mnt / "doomed.txt").write_bytes(b"x")
        os.setxattr(mnt / "doomed.txt", "user.d", b"d")
        (mnt / "doomed.txt").unlink()
        os.setxattr(mnt / "unread.txt", "user.new", b"offline")  # the server's not known yet
        os.setxattr(mnt / "unread.txt", "user.drop", b"set here")
        os.removexattr(mnt / "unread.txt", "user.drop")  # the last change here: removed
        # the server's never read: "which there are" has no answer offline (not "none")
        assert errno_of(lambda: os.listxattr(mnt / "unread.txt")) == "EHOSTDOWN"
        assert os.getxattr(mnt / "unread.txt", "user.new") == b"offline"
        assert errno_of(lambda: os.getxattr(mnt / "unread.txt", "user.drop")) == "ENODATA"  # (removed here)
        assert status(mnt)["pending"] > 0
        go_online_and_sync(mnt)
        # the server's joined what was set here, once read (online)
        assert user_xattrs(mnt / "unread.txt") == {"user.keep": b"server's", "user.new": b"offline"}
        assert user_xattrs(share / "unread.txt") == {"user.keep": b"server's", "user.new": b"offline"}
        assert status(mnt)["pending"] == 0
        assert user_xattrs(share / "served.txt") == {"user.here": b"online", "user.off": b"offline"}
        assert (share / "made.txt").read_bytes() == b"changed offline\n"
        assert user_xattrs(share / "made.txt") == {"user.a": b"2"}
        assert user_xattrs(share / "new-off.txt") == {"user.n": b"n"}
        assert not (share / "doomed.txt").exists()

        go_offline(mnt)
        os.setxattr(mnt / "new-off.txt", "user.pending", b"across a remount")
    with mount_factory(remote=str(share), name="mnt2") as again:
        mnt = again.mountpoint
        assert user_xattrs(mnt / "new-off.txt") == {"user.n": b"n", "user.pending": b"across a remount"}
        sync(mnt)
        assert user_xattrs(share / "new-off.txt") == {"user.n": b"n", "user.pending": b"across a remount"}


def test_cp_and_rsync_keep_them_into_out_of_and_within_the_mount(mount_factory, share: Path,
                                                                 tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    want = tree_with_xattrs(src)
    out = tmp_path / "out"
    out.mkdir()
    for remote in (str(share), None):  # a local share, then SFTP
        tag = "local" if remote else "sftp"
        with mount_factory(remote=remote, name=f"mnt-{tag}", cache=f"cache-{tag}") as mount:
            mnt = mount.mountpoint
            copies = {"cp": ["cp", "-a"], "rsync": ["rsync", "-aX"]}
            for how, argv in copies.items():
                subprocess.run([*argv, f"{src}/", str(mnt / f"{how}-online")] if how == "rsync" else
                               [*argv, str(src), str(mnt / f"{how}-online")], check=True, timeout=60)
                assert_tree(mnt / f"{how}-online", want)
            go_offline(mnt)
            subprocess.run(["cp", "-a", str(src), str(mnt / "cp-offline")], check=True, timeout=60)
            subprocess.run(["rsync", "-aX", f"{src}/", str(mnt / "rsync-offline")], check=True, timeout=60)
            subprocess.run(["cp", "-a", str(mnt / "cp-online"), str(mnt / "within")], check=True, timeout=60)
            subprocess.run(["rsync", "-aX", f"{mnt}/rsync-online/", str(mnt / "within-rsync")],
                           check=True, timeout=60)
            (mnt / "tar-offline").mkdir()
            subprocess.run(f"tar --xattrs -cf - -C {src} . | tar --xattrs --xattrs-include='user.*' "
                           f"-xf - -C {mnt / 'tar-offline'}", shell=True, check=True, timeout=60)
            for copy in ("cp-offline", "rsync-offline", "within", "within-rsync", "tar-offline"):
                assert_tree(mnt / copy, want)
            go_online_and_sync(mnt)
        with mount_factory(remote=remote, name=f"mnt-{tag}", cache=f"cache-{tag}") as mount:
            mnt = mount.mountpoint
            for copy in ("cp-online", "rsync-online", "cp-offline", "rsync-offline", "within", "within-rsync"):
                assert_tree(mnt / copy, want)  # after a remount
            subprocess.run(["cp", "-a", str(mnt / "within"), str(out / f"cp-{tag}")], check=True, timeout=60)
            subprocess.run(["rsync", "-aX", f"{mnt}/within-rsync/", str(out / f"rsync-{tag}")],
                           check=True, timeout=60)
            (out / f"tar-{tag}").mkdir()
            subprocess.run(f"tar --xattrs -cf - -C {mnt / 'tar-offline'} . | tar --xattrs "
                           f"--xattrs-include='*' -xf - -C {out / f'tar-{tag}'}", shell=True, check=True,
                           timeout=60)
            for copy in ("cp", "rsync", "tar"):  # out of the mount: no user.cachefs.state
                assert_tree(out / f"{copy}-{tag}", want)
                assert not [n for n in os.listxattr(out / f"{copy}-{tag}" / "a.txt") if "cachefs" in n]
            if remote:  # on the share's own files
                for copy in ("cp-online", "rsync-online", "cp-offline", "rsync-offline", "within", "within-rsync"):
                    assert_tree(share / copy, want)
        if remote:
            for copy in ("cp-online", "rsync-online", "cp-offline", "rsync-offline", "within", "within-rsync"):
                shutil.rmtree(share / copy)
            shutil.rmtree(share / "tar-offline")


def test_encrypted_cache_holds_no_name_or_value_in_clear(mount_factory, share: Path, tmp_path: Path) -> None:
    key = tmp_path / "cache.key"
    key.write_bytes(os.urandom(32))
    os.chmod(key, 0o600)
    name, value = "user.zq-attr-name-6c2e", b"zq-attr-value-93b1f0"
    with mount_factory("--encrypt-cache", "--cache-key-file", str(key), remote=str(share)) as mount:
        mnt = mount.mountpoint
        (mnt / "f").write_bytes(b"x")
        os.setxattr(mnt / "f", name, value)
        command(mnt, "offline")
        os.setxattr(mnt / "f", name + "-offline", value + b"-offline")  # journaled too
    data = (tmp_path / "cache" / "index" / "data.mdb").read_bytes()
    for needle in (name.encode(), name.encode()[5:], value):
        assert needle not in data, needle
    with mount_factory("--encrypt-cache", "--cache-key-file", str(key), remote=str(share), name="mnt2") as again:
        assert user_xattrs(again.mountpoint / "f") == {name: value, name + "-offline": value + b"-offline"}
        sync(again.mountpoint)
    assert user_xattrs(share / "f") == {name: value, name + "-offline": value + b"-offline"}


def test_a_kill_loses_no_attribute_change_and_they_follow_renames(mount_factory, share: Path) -> None:
    """Set, renamed, linked and removed offline, then kill -9: the next mount replays every
    change onto the share's files under their new names."""
    (share / "old.txt").write_bytes(b"old\n")
    with mount_factory(remote=str(share)) as mount:
        mnt = mount.mountpoint
        assert user_xattrs(mnt / "old.txt") == {}
        go_offline(mnt)
        os.setxattr(mnt / "old.txt", "user.a", b"1")
        os.rename(mnt / "old.txt", mnt / "moved.txt")
        os.setxattr(mnt / "moved.txt", "user.b", b"2")
        (mnt / "fresh").mkdir()
        (mnt / "fresh" / "f").write_bytes(b"f")
        os.setxattr(mnt / "fresh" / "f", "user.c", b"3")
        os.link(mnt / "fresh" / "f", mnt / "fresh" / "g")
        assert os.getxattr(mnt / "fresh" / "g", "user.c") == b"3"  # one file, two names
        os.setxattr(mnt / "fresh", "user.dir", b"d")
        os.removexattr(mnt / "moved.txt", "user.a")
        mount.kill9()
    with mount_factory(remote=str(share), name="mnt2") as again:
        mnt = again.mountpoint
        assert user_xattrs(mnt / "moved.txt") == {"user.b": b"2"}
        sync(mnt)
        assert user_xattrs(share / "moved.txt") == {"user.b": b"2"}
        assert user_xattrs(share / "fresh" / "f") == {"user.c": b"3"}
        assert user_xattrs(share / "fresh" / "g") == {"user.c": b"3"}
        assert user_xattrs(share / "fresh") == {"user.dir": b"d"}


# -- conflicts: our attributes go with our version ---------------------------------------------

def _conflict_copy(folder: Path, name: str) -> str:
    copies = [n for n in os.listdir(folder) if n.startswith(f"{name} (conflict")]
    assert len(copies) == 1, os.listdir(folder)
    return copies[0]


@pytest.mark.parametrize("attribute_first", [False, True], ids=["written-then-set", "set-then-written"])
def test_changed_on_both_sides_our_attributes_go_with_our_copy_local_share(mount_factory, share: Path,
                                                                           attribute_first: bool) -> None:
    """The copy (ours) had none, and the server's version got ours (its own unseen); set
    before the write, the attribute's entry came first and went onto the server's version."""
    (share / "f").write_bytes(b"v1\n")
    os.setxattr(share / "f", "user.x", b"server-orig")
    with mount_factory(remote=str(share)) as mount:
        mnt = mount.mountpoint
        assert user_xattrs(mnt / "f") == {"user.x": b"server-orig"}
        go_offline(mnt)
        if attribute_first:
            os.setxattr(mnt / "f", "user.mine", b"ours")
        (mnt / "f").write_bytes(b"ours\n")
        if not attribute_first:
            os.setxattr(mnt / "f", "user.mine", b"ours")
        time.sleep(1.1)
        (share / "f").write_bytes(b"theirs, longer\n")
        os.setxattr(share / "f", "user.srv", b"theirs")
        go_online_and_sync(mnt)
        copy = _conflict_copy(mnt, "f")
        ours = {"user.x": b"server-orig", "user.mine": b"ours"}
        theirs = {"user.x": b"server-orig", "user.srv": b"theirs"}
        assert (mnt / copy).read_bytes() == b"ours\n"
        assert user_xattrs(share / copy) == ours
        assert user_xattrs(mnt / copy) == ours
        assert user_xattrs(share / "f") == theirs
        assert user_xattrs(mnt / "f") == theirs
        assert status(mnt)["pending"] == 0
    with mount_factory(remote=str(share), name="mnt2") as again:
        assert user_xattrs(again.mountpoint / copy) == ours
        assert user_xattrs(again.mountpoint / "f") == theirs


def test_changed_on_both_sides_our_attributes_go_with_our_copy_sftp(mount_factory, share: Path) -> None:
    (share / "f").write_bytes(b"v1\n")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        assert (mnt / "f").read_bytes() == b"v1\n"
        os.setxattr(mnt / "f", "user.l", b"local")
        go_offline(mnt)
        (mnt / "f").write_bytes(b"ours\n")
        os.setxattr(mnt / "f", "user.m", b"offline")
        time.sleep(1.1)
        (share / "f").write_bytes(b"theirs, longer\n")
        go_online_and_sync(mnt)
        copy = _conflict_copy(mnt, "f")
        assert (mnt / copy).read_bytes() == b"ours\n"
        assert user_xattrs(mnt / copy) == {"user.l": b"local", "user.m": b"offline"}
        assert user_xattrs(mnt / "f") == {}
        assert os.getxattr(mnt / copy, STATE) == b"conflict, xattrs local"
        # cachefs status PATH names the conflict's kind with it (it showed the bare state)
        shown = ok(cachefs("status", str(mnt / copy))).stdout.splitlines()[0]
        assert shown.split(None, 2)[2] == "conflict (changed-both), xattrs local", shown


@pytest.mark.parametrize("remote", ["sftp", "local"])
def test_moved_aside_our_node_keeps_its_attributes_under_the_conflict_name(mount_factory, share: Path,
                                                                          remote: str) -> None:
    """Renamed here onto a name the server took meanwhile, and a folder made here where
    the server made a file: ours goes aside under a conflict name, keeping its attributes
    (the node was forgotten here with its record: gone from both; entries after the
    rename were dropped), the server's keeps the name with its own."""
    (share / "f").write_bytes(b"ours\n")
    local = remote == "local"
    if local:
        os.setxattr(share / "f", "user.s", b"server")
    with mount_factory(**({"remote": str(share)} if local else {})) as mount:
        mnt = mount.mountpoint
        assert (mnt / "f").read_bytes() == b"ours\n"
        os.setxattr(mnt / "f", "user.before", b"1")
        go_offline(mnt)
        os.rename(mnt / "f", mnt / "g")
        os.setxattr(mnt / "g", "user.after", b"2")
        (mnt / "d").mkdir()
        os.setxattr(mnt / "d", "user.d", b"ours")
        (share / "g").write_bytes(b"server g\n")
        (share / "d").write_bytes(b"server d\n")
        if local:
            os.setxattr(share / "g", "user.theirs", b"g")
            os.setxattr(share / "d", "user.theirs", b"d")
        go_online_and_sync(mnt)
        copy_g, copy_d = _conflict_copy(mnt, "g"), _conflict_copy(mnt, "d")
        ours_g = {"user.before": b"1", "user.after": b"2", **({"user.s": b"server"} if local else {})}
        assert (mnt / copy_g).read_bytes() == b"ours\n"
        assert user_xattrs(mnt / copy_g) == ours_g
        assert user_xattrs(mnt / copy_d) == {"user.d": b"ours"}
        assert (mnt / "g").read_bytes() == b"server g\n"
        assert (mnt / "d").read_bytes() == b"server d\n"
        theirs = {"user.theirs": b"g"} if local else {}
        assert user_xattrs(mnt / "g") == theirs
        assert status(mnt)["pending"] == 0
        if local:
            assert user_xattrs(share / copy_g) == ours_g
            assert user_xattrs(share / copy_d) == {"user.d": b"ours"}
            assert user_xattrs(share / "g") == theirs
            assert user_xattrs(share / "d") == {"user.theirs": b"d"}
