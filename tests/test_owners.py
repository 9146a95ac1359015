"""``--owners remote``: the server's owners shown (mapped by ``--uid-map``/``--gid-map``),
chown and chgrp applied at once and replayed onto the server (online, offline, across a
remount), new files owned by their creator, the kernel's permission checks against the
real owners (``-o allow_other,default_permissions``) and this mount's own without them,
and a change of owner the server refuses kept and listed. Real mounts of the sshd
fixture's share (the SSH user is root, as the mount); the share's files are looked at
directly on disk. ``--owners local`` (the default) keeps every file the mounting user's.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.mount import REPO, status
from tests.test_posix import as_user as posix_as_user
from tests.test_writes import control, go_offline, sync_until_done


NOBODY = 65534
OTHER = 4321  # a uid and gid no account of this machine has


def as_user(root: Path, function: Callable[[], object], uid: int = NOBODY, gid: int | None = None,
            groups: tuple[int, ...] = ()) -> object:
    """``function()``'s result (JSON) in a forked child that entered ``root`` and then
    became ``uid`` (``gid``, supplementary ``groups``); an OSError there comes back as its
    errno name."""
    def guarded() -> object:
        try:
            return function()
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return posix_as_user(root, guarded, uid, gid, groups)


def errno_of(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def synced(mnt: Path) -> dict:
    sync_until_done(mnt, 60)
    st = status(mnt)
    assert st["pending"] == 0, st
    return st


@pytest.fixture
def remote_owners(mount_factory):
    """A root mount with --owners remote, as a machine of several users would run it."""
    def make(*extra: str, **kw):
        return mount_factory("--owners", "remote", "-o", "allow_other,default_permissions", *extra, **kw)
    return make


def test_stat_shows_the_servers_owners(remote_owners, mount_factory, share: Path) -> None:
    (share / "f").write_bytes(b"f")
    os.chown(share / "f", OTHER, OTHER + 1)
    (share / "d").mkdir()
    os.chown(share / "d", NOBODY, NOBODY)
    os.symlink("f", share / "l")
    os.lchown(share / "l", OTHER, NOBODY)
    with remote_owners() as mount:
        mnt = mount.mountpoint
        assert owner(mnt / "f") == (OTHER, OTHER + 1)
        assert owner(mnt / "d") == (NOBODY, NOBODY)
        assert owner(mnt / "l") == (OTHER, NOBODY)
        assert {e.name: e.stat(follow_symlinks=False).st_uid for e in os.scandir(mnt)
                if e.name != ".cachefs"} == {"f": OTHER, "d": NOBODY, "l": OTHER}
    with mount_factory(name="mnt2", cache="cache2") as mount:  # the default: local
        assert owner(mount.mountpoint / "f") == (os.getuid(), os.getgid())
        assert errno_of(lambda: os.chown(mount.mountpoint / "f", OTHER, OTHER)) == "EPERM"


def test_the_roots_owner_is_the_shares(remote_owners, share: Path) -> None:
    """A share owned by another user with mode 0700: the mount's root is that user's, who
    can list it, and no one else (the root's record held 0:0 and only its mode and times
    were taken from the server: its owner got EACCES on their own share)."""
    (share / "f").write_bytes(b"f")
    os.chown(share, NOBODY, NOBODY)
    os.chmod(share, 0o700)
    os.chmod(share.parent, 0o755)  # (the mount point's folder: for the child's lookup)
    with remote_owners() as mount:
        mnt = mount.mountpoint
        assert owner(mnt) == (NOBODY, NOBODY)
        assert as_user(mnt.parent, lambda: os.listdir(mnt.name)) == ["f"]
        assert as_user(mnt.parent, lambda: os.listdir(mnt.name), uid=OTHER) == "EACCES"


@pytest.mark.parametrize("offline", [False, True], ids=["online", "offline"])
def test_chown_reaches_the_server_and_stays(remote_owners, share: Path, offline: bool) -> None:
    (share / "f").write_bytes(b"first")
    (share / "g").write_bytes(b"g")
    (share / "d").mkdir()
    os.chmod(share / "f", 0o640)
    with remote_owners() as mount:
        mnt = mount.mountpoint
        if offline:
            go_offline(mnt)
        os.chown(mnt / "f", OTHER, OTHER)
        os.chown(mnt / "g", -1, NOBODY)  # chgrp only
        os.chown(mnt / "d", NOBODY, -1)  # chown of the owner only
        assert owner(mnt / "f") == (OTHER, OTHER)
        assert owner(mnt / "g") == (0, NOBODY)
        assert owner(mnt / "d") == (NOBODY, 0)
        assert stat.S_IMODE(os.stat(mnt / "f").st_mode) == 0o640
        if offline:
            assert owner(share / "f") == (0, 0)  # not yet
            control(mnt, "online")
        synced(mnt)
        assert owner(share / "f") == (OTHER, OTHER)
        assert owner(share / "g") == (0, NOBODY)
        assert owner(share / "d") == (NOBODY, 0)
        assert stat.S_IMODE(os.stat(share / "f").st_mode) == 0o640
        assert (share / "f").read_bytes() == b"first"
        # A later change of the content (an upload: a new file renamed over the old one)
        # keeps the owner the file has.
        (mnt / "f").write_bytes(b"second")
        synced(mnt)
        assert (share / "f").read_bytes() == b"second"
        assert owner(share / "f") == (OTHER, OTHER)
    with remote_owners() as mount:  # a remount shows what the server and the cache hold
        assert owner(mount.mountpoint / "f") == (OTHER, OTHER)
        assert owner(mount.mountpoint / "d") == (NOBODY, 0)


def test_an_upload_keeps_a_chown_made_on_the_server(remote_owners, share: Path) -> None:
    """A chown made there changes no version (size, mtime): an upload of a change made
    here gives the file the owner it finds there, not the one the cache last saw (which
    silently undid the chown)."""
    for name, size in (("small", 10), ("large", 300_000)):  # (both upload paths)
        (share / name).write_bytes(b"x" * size)
        os.chown(share / name, OTHER, OTHER)
    with remote_owners() as mount:
        mnt = mount.mountpoint
        for name in ("small", "large"):
            assert owner(mnt / name) == (OTHER, OTHER)
            (mnt / name).read_bytes()  # (cached whole: changed offline)
        go_offline(mnt)  # (so that no listing sees the chown before the upload)
        for name in ("small", "large"):
            os.chown(share / name, NOBODY, NOBODY)
            with open(mnt / name, "ab") as f:
                f.write(b"more")
        control(mnt, "online")
        synced(mnt)
        for name in ("small", "large"):
            assert owner(share / name) == (NOBODY, NOBODY), name
            assert (share / name).read_bytes().endswith(b"more")
            assert owner(mnt / name) == (NOBODY, NOBODY), name  # (the record took it)


def test_an_offline_chown_left_pending_survives_a_remount(remote_owners, share: Path) -> None:
    (share / "f").write_bytes(b"f")
    with remote_owners("--sync-at-unmount", "0") as mount:
        go_offline(mount.mountpoint)
        os.chown(mount.mountpoint / "f", OTHER, NOBODY)
        assert status(mount.mountpoint)["pending"] == 1
    assert owner(share / "f") == (0, 0)
    with remote_owners() as mount:  # shown at once, replayed once online
        assert owner(mount.mountpoint / "f") == (OTHER, NOBODY)
        synced(mount.mountpoint)
        assert owner(share / "f") == (OTHER, NOBODY)


def test_chown_of_a_file_not_yet_uploaded(remote_owners, share: Path) -> None:
    """A chown of a file created offline and written after: the create's upload and the
    owner's setattr both replayed, the file ends with its content and its owner."""
    with remote_owners() as mount:
        mnt = mount.mountpoint
        go_offline(mnt)
        (mnt / "new").write_bytes(b"new")
        os.chown(mnt / "new", OTHER, OTHER)
        with open(mnt / "new", "ab") as f:
            f.write(b" and more")
        control(mnt, "online")
        synced(mnt)
        assert (share / "new").read_bytes() == b"new and more"
        assert owner(share / "new") == (OTHER, OTHER)


def test_a_change_of_owner_clears_setuid_as_linux_does(remote_owners, share: Path) -> None:
    (share / "x").write_bytes(b"#!/bin/sh\n")
    os.chmod(share / "x", 0o6755)
    with remote_owners() as mount:
        mnt = mount.mountpoint
        os.chown(mnt / "x", OTHER, OTHER)
        # (what a chown on ext4 leaves: the kernel sends the mode without them)
        assert stat.S_IMODE(os.stat(mnt / "x").st_mode) == 0o755
        os.chmod(mnt / "x", 0o4755)  # set again after the chown: kept on the server too
        synced(mnt)
        assert owner(share / "x") == (OTHER, OTHER)
        assert stat.S_IMODE(os.stat(share / "x").st_mode) == 0o4755
        # a change of content (root's write keeps the bit here): the upload carries the
        # owner as well, sent before the mode, which keeps the bit there too
        for size in (10, 300_000):  # (a small file's upload and a large one's)
            with open(mnt / "x", "ab") as f:
                f.write(b"#" * size + b"\n")
            assert stat.S_IMODE(os.stat(mnt / "x").st_mode) == 0o4755
            synced(mnt)
            assert owner(share / "x") == (OTHER, OTHER)
            assert stat.S_IMODE(os.stat(share / "x").st_mode) == 0o4755
            assert (share / "x").read_bytes() == (mnt / "x").read_bytes()


@pytest.mark.parametrize("local_share", [False, True], ids=["sftp", "local-path"])
def test_a_symlinks_owner_reaches_the_server(remote_owners, share: Path, local_share: bool) -> None:
    """chown -h of a symlink, and a symlink another user makes: their owners go to the
    server (lsetstat@openssh.com, or lchown on a local share: the link, not its target) and
    stay after the folder is listed again (the chown was not journaled, and a new link
    went back to the SSH account's owner)."""
    (share / "d").mkdir()
    os.chmod(share / "d", 0o777)
    (share / "d/t").write_bytes(b"t")
    os.symlink("t", share / "d/l")
    os.chmod(share.parent, 0o755)
    with remote_owners(**({"remote": str(share)} if local_share else {})) as mount:
        mnt = mount.mountpoint
        os.listdir(mnt / "d")
        os.lchown(mnt / "d/l", OTHER, OTHER)
        assert owner(mnt / "d/l") == (OTHER, OTHER)
        assert status(mnt)["pending"] == 1
        assert as_user(mnt, lambda: os.symlink("t", "d/made")) is None
        assert owner(mnt / "d/made") == (NOBODY, NOBODY)
        synced(mnt)
        assert owner(share / "d/l") == (OTHER, OTHER)
        assert owner(share / "d/made") == (NOBODY, NOBODY)
        assert owner(share / "d/t") == (0, 0)  # (the target untouched)
        (share / "d/new").write_bytes(b"n")  # the folder changes there: listed again
        deadline = time.monotonic() + 15
        while "new" not in os.listdir(mnt / "d") and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "new" in os.listdir(mnt / "d")
        assert owner(mnt / "d/l") == (OTHER, OTHER)
        assert owner(mnt / "d/made") == (NOBODY, NOBODY)


@pytest.mark.parametrize("offline", [False, True], ids=["online", "offline"])
def test_what_another_user_creates_is_theirs(remote_owners, share: Path, offline: bool) -> None:
    (share / "pub").mkdir()
    os.chmod(share / "pub", 0o777)
    (share / "team").mkdir()
    os.chown(share / "team", 0, OTHER)
    os.chmod(share / "team", 0o2777)  # setgid: what is made in it takes its group
    with remote_owners() as mount:
        mnt = mount.mountpoint
        os.listdir(mnt / "pub"), os.listdir(mnt / "team")
        if offline:
            go_offline(mnt)

        def make() -> dict:
            Path("pub/file").write_bytes(b"mine")
            os.mkdir("pub/dir")
            os.symlink("file", "pub/link")
            os.link("pub/file", "pub/hard")
            Path("team/file").write_bytes(b"ours")
            os.mkdir("team/dir")
            return {name: list(owner(Path(name))) for name in
                    ("pub/file", "pub/dir", "pub/link", "pub/hard", "team/file", "team/dir")} | \
                {"team/dir mode": stat.S_IMODE(os.stat("team/dir").st_mode)}

        seen = as_user(mnt, make)
        assert seen == {"pub/file": [NOBODY, NOBODY], "pub/dir": [NOBODY, NOBODY],
                        "pub/link": [NOBODY, NOBODY], "pub/hard": [NOBODY, NOBODY],
                        "team/file": [NOBODY, OTHER], "team/dir": [NOBODY, OTHER],
                        "team/dir mode": 0o2755}
        if offline:
            control(mnt, "online")
        synced(mnt)
        assert owner(share / "pub/file") == (NOBODY, NOBODY)
        assert owner(share / "pub/hard") == (NOBODY, NOBODY)
        assert owner(share / "pub/dir") == (NOBODY, NOBODY)
        assert owner(share / "team/file") == (NOBODY, OTHER)
        assert owner(share / "team/dir") == (NOBODY, OTHER)
        assert stat.S_IMODE(os.stat(share / "team/dir").st_mode) == 0o2755
        assert (share / "pub/file").read_bytes() == b"mine"


def test_the_kernel_checks_the_real_owners(remote_owners, share: Path) -> None:
    (share / "root-only").write_bytes(b"secret")
    os.chmod(share / "root-only", 0o600)
    (share / "theirs").write_bytes(b"theirs")
    os.chown(share / "theirs", NOBODY, NOBODY)
    os.chmod(share / "theirs", 0o600)
    (share / "tmp").mkdir()
    os.chmod(share / "tmp", 0o1777)  # sticky, as /tmp
    (share / "tmp/roots").write_bytes(b"r")
    os.chmod(share / "tmp/roots", 0o666)
    with remote_owners() as mount:
        mnt = mount.mountpoint

        def try_all() -> dict:
            return {
                "read root-only": errno_of(lambda: Path("root-only").read_bytes()),
                "chmod root-only": errno_of(lambda: os.chmod("root-only", 0o644)),
                "chown root-only": errno_of(lambda: os.chown("root-only", NOBODY, NOBODY)),
                "read theirs": errno_of(lambda: Path("theirs").read_bytes()),
                "chown theirs to another": errno_of(lambda: os.chown("theirs", OTHER, -1)),
                "chgrp theirs to a group not theirs": errno_of(lambda: os.chown("theirs", -1, OTHER)),
                "unlink in sticky": errno_of(lambda: os.unlink("tmp/roots")),
                "rename in sticky": errno_of(lambda: os.rename("tmp/roots", "tmp/moved")),
                "write in sticky": errno_of(lambda: Path("tmp/roots").write_bytes(b"w")),
                "create in sticky": errno_of(lambda: Path("tmp/own").write_bytes(b"o")),
                "unlink own in sticky": errno_of(lambda: os.unlink("tmp/own")),
            }

        assert as_user(mnt, try_all) == {
            "read root-only": "EACCES", "chmod root-only": "EPERM", "chown root-only": "EPERM",
            "read theirs": "ok", "chown theirs to another": "EPERM",
            "chgrp theirs to a group not theirs": "EPERM",
            "unlink in sticky": "EPERM", "rename in sticky": "EPERM", "write in sticky": "ok",
            "create in sticky": "ok", "unlink own in sticky": "ok"}
        # the owner may give the file to a group of its own
        assert as_user(mnt, lambda: os.chown("theirs", -1, OTHER), groups=(OTHER,)) is None
        synced(mnt)
        assert owner(share / "theirs") == (NOBODY, OTHER)
        assert (share / "tmp/roots").read_bytes() == b"w"


def test_the_mounts_own_checks(share: Path, tmp_path: Path) -> None:
    """The rules the kernel applies with default_permissions (which cachefs always asks
    for), kept by the mount too for a kernel that does not (in-process: the Operations
    object over a local share, requests with the caller's uid, gid and pid): only root
    gives a file away; its owner may give it to a group of its own; access() answers for
    the owner, the group (the caller's supplementary groups too) and the others."""
    import trio
    from types import SimpleNamespace

    from cachefs.cache.cache import Cache, CacheConfig
    from cachefs.fs import Operations
    from cachefs.link.connectivity import Connectivity
    from cachefs.owners import Owners
    from cachefs.remote.local import LocalRemote
    from cachefs.store.index import ROOT_INO, Store
    from pyfuse3 import FUSEError

    (share / "theirs").write_bytes(b"theirs")
    os.chown(share / "theirs", NOBODY, NOBODY)
    os.chmod(share / "theirs", 0o640)
    (share / "grouped").write_bytes(b"g")
    os.chown(share / "grouped", 0, OTHER)
    os.chmod(share / "grouped", 0o640)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    # a process of nobody's with OTHER among its supplementary groups: its groups are read
    # from /proc (a request carries only the primary gid)
    member = subprocess.Popen(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                               "--groups", str(OTHER), "sleep", "60"])

    def ctx(uid: int, gid: int, pid: int = 0) -> SimpleNamespace:
        return SimpleNamespace(uid=uid, gid=gid, pid=pid, umask=0o022)

    def chown(uid: int = -1, gid: int = -1) -> tuple[SimpleNamespace, SimpleNamespace]:
        attr = SimpleNamespace(st_uid=uid, st_gid=gid)
        fields = SimpleNamespace(update_uid=uid != -1, update_gid=gid != -1, update_mode=False,
                                 update_size=False, update_atime=False, update_mtime=False)
        return attr, fields

    async def main() -> dict:
        store = Store(cache_dir, f"file://{share}")
        conn = Connectivity(LocalRemote(str(share), 10.0))
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig(owners="remote"))
        ops = Operations(cache, None, attr_timeout=1.0,  # type: ignore[arg-type]
                         owners=Owners("remote", 0, 0))
        theirs = (await cache.lookup(ROOT_INO, b"theirs")).ino
        grouped = (await cache.lookup(ROOT_INO, b"grouped")).ino
        out: dict = {}

        async def outcome(name: str, call) -> None:
            try:
                got = await call
                out[name] = got if isinstance(got, bool) else "ok"
            except FUSEError as exc:
                out[name] = errno.errorcode[exc.errno]

        nobody = ctx(NOBODY, NOBODY)
        await outcome("chown by its owner to another", ops.setattr(theirs, *chown(OTHER), None, nobody))
        await outcome("chgrp by its owner to a group not its", ops.setattr(theirs, *chown(-1, OTHER), None, nobody))
        await outcome("chown by another", ops.setattr(theirs, *chown(-1, NOBODY), None, ctx(OTHER, OTHER)))
        await outcome("access owner rw", ops.access(theirs, os.R_OK | os.W_OK, nobody))
        await outcome("access group r", ops.access(grouped, os.R_OK, ctx(NOBODY, OTHER)))
        await outcome("access group w", ops.access(grouped, os.W_OK, ctx(NOBODY, OTHER)))
        await outcome("access other r", ops.access(grouped, os.R_OK, nobody))
        await outcome("access by supplementary group", ops.access(grouped, os.R_OK,
                                                                  ctx(NOBODY, NOBODY, member.pid)))
        await outcome("chgrp by its owner to its group", ops.setattr(theirs, *chown(-1, OTHER), None,
                                                                      ctx(NOBODY, NOBODY, member.pid)))
        await outcome("chown by root", ops.setattr(grouped, *chown(OTHER, OTHER), None, ctx(0, 0)))
        out["theirs here"] = [ops._attrs(cache.node(theirs)).st_uid, ops._attrs(cache.node(theirs)).st_gid]
        out["grouped here"] = [ops._attrs(cache.node(grouped)).st_uid, ops._attrs(cache.node(grouped)).st_gid]
        store.close()
        return out

    try:
        found = trio.run(main)
    finally:
        member.kill()
        member.wait()
    assert found == {
        "chown by its owner to another": "EPERM", "chgrp by its owner to a group not its": "EPERM",
        "chown by another": "EPERM", "access owner rw": True, "access group r": True,
        "access group w": False, "access other r": False,
        "access by supplementary group": True,
        "chgrp by its owner to its group": "ok", "chown by root": "ok",
        "theirs here": [NOBODY, OTHER], "grouped here": [OTHER, OTHER]}


def test_uid_and_gid_maps(remote_owners, share: Path, tmp_path: Path) -> None:
    """The server's 1234 is this machine's nobody, its 2345 nogroup (sshfs's idmap=file
    format): shown mapped, and a chown to nobody sends 1234; ids not mapped as they are."""
    uids, gids = tmp_path / "uids", tmp_path / "gids"
    uids.write_text("# local:remote\nnobody:1234\n1234:65534\n")
    gids.write_text("nogroup:2345\n\n2345:65534\n")
    (share / "f").write_bytes(b"f")
    os.chown(share / "f", 1234, 2345)
    (share / "g").write_bytes(b"g")
    os.chown(share / "g", OTHER, OTHER)
    with remote_owners("--uid-map", str(uids), "-o", f"gid_map={gids}") as mount:
        mnt = mount.mountpoint
        assert owner(mnt / "f") == (NOBODY, NOBODY)
        assert owner(mnt / "g") == (OTHER, OTHER)
        os.chown(mnt / "g", NOBODY, NOBODY)
        assert owner(mnt / "g") == (NOBODY, NOBODY)
        synced(mnt)
        assert owner(share / "g") == (1234, 2345)


def test_a_map_never_shows_one_id_for_two(remote_owners, share: Path, tmp_path: Path) -> None:
    """Local 4321 is the server's 1000, so local 1000 must be the server's 4321: the
    server's ids are shown one-to-one (the server's 4321 never as local 4321, whose files
    they are not), and local 1000 owns what it creates there as the server's 4321."""
    uids, gids = tmp_path / "uids", tmp_path / "gids"
    uids.write_text(f"{OTHER}:1000\n1000:{OTHER}\n")
    gids.write_text(f"{OTHER}:1000\n1000:{OTHER}\n")
    for name, server_id in (("mine", 1000), ("bobs", OTHER), ("plain", 77)):
        (share / name).write_bytes(name.encode())
        os.chown(share / name, server_id, server_id)
    os.chmod(share, 0o777)
    os.chmod(share.parent, 0o755)
    with remote_owners("--uid-map", str(uids), "--gid-map", str(gids)) as mount:
        mnt = mount.mountpoint
        assert owner(mnt / "mine") == (OTHER, OTHER)
        assert owner(mnt / "bobs") == (1000, 1000)
        assert owner(mnt / "plain") == (77, 77)
        os.chown(mnt / "plain", 1000, 1000)
        assert owner(mnt / "plain") == (1000, 1000)
        assert as_user(mnt, lambda: os.mkdir("newdir"), uid=1000, gid=1000) is None
        assert owner(mnt / "newdir") == (1000, 1000)
        synced(mnt)
        assert owner(share / "plain") == (OTHER, OTHER)
        assert owner(share / "newdir") == (OTHER, OTHER)


@pytest.mark.parametrize("what", ["uid", "gid"])
def test_a_map_that_would_show_a_server_id_as_a_mapped_user_is_refused(share: Path, tmp_path: Path,
                                                                        what: str) -> None:
    """``4321:1000`` alone: the server's 4321 (not mapped) would be shown as local 4321,
    which with default_permissions would own its files (and a chown to it would give them
    to the server's 4321): refused at mount, in one line naming that id."""
    ids = tmp_path / "ids"
    ids.write_text(f"# ours\n{OTHER}:1000\n")
    (tmp_path / "mnt").mkdir()
    done = subprocess.run([sys.executable, "-m", "cachefs.cli", "mount", str(share), str(tmp_path / "mnt"),
                           "--cache-dir", str(tmp_path / "cache"), "--owners", "remote", f"--{what}-map", str(ids)],
                          cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if done.returncode == 0:  # (mounted all the same: not left behind)
        subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "mnt")], check=False)
    assert done.returncode != 0
    assert done.stderr.strip() == (f"cachefs: {ids} line 2: the server's {what} {OTHER}, not in the map, would be "
                                   f"shown as {OTHER} (local {what} {OTHER}): map it too (e.g. '1000:{OTHER}')"), \
        done.stderr
    assert not (tmp_path / "cache").exists()


def test_sshfs_idmap_spelling(remote_owners, share: Path, tmp_path: Path) -> None:
    uids = tmp_path / "uids"
    uids.write_text("nobody:1234\n1234:65534\n")
    (share / "f").write_bytes(b"f")
    os.chown(share / "f", 1234, 0)
    with remote_owners("-o", f"idmap=file,uidfile={uids}") as mount:
        assert owner(mount.mountpoint / "f") == (NOBODY, 0)


@pytest.mark.parametrize("line, says", [
    ("nobody", "line 2: expected localname:remoteid, found 'nobody'"),
    ("nobody:x", "line 2: expected localname:remoteid, found 'nobody:x'"),
    ("no-such-user-here:5", "line 2: no user 'no-such-user-here' on this machine"),
    ("root:7", "line 2: 7 is mapped twice"),
    ("nobody:8", "line 2: nobody is mapped twice"),
    ("root:\u00b2", "line 2: expected localname:remoteid, found 'root:\u00b2'"),  # (isdigit() says yes)
    ("\u00b2:5", "line 2: no user '\u00b2' on this machine"),
    ("root:4294967296", "line 2: 4294967296 is not an id (0 to 4294967294)"),
    ("root:4294967295", "line 2: 4294967295 is not an id (0 to 4294967294)"),
    ("4294967296:5", "line 2: 4294967296 is not an id (0 to 4294967294)"),
])
def test_a_bad_map_is_a_one_line_error(share: Path, tmp_path: Path, line: str, says: str) -> None:
    uids = tmp_path / "uids"
    uids.write_text(f"nobody:7\n{line}\n")
    (tmp_path / "mnt").mkdir()
    done = subprocess.run([sys.executable, "-m", "cachefs.cli", "mount", str(share), str(tmp_path / "mnt"),
                           "--cache-dir", str(tmp_path / "cache"), "--owners", "remote", "--uid-map", str(uids)],
                          cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if done.returncode == 0:  # (mounted all the same: not left behind)
        subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "mnt")], check=False)
    assert done.returncode != 0
    assert done.stderr.strip() == f"cachefs: {uids} {says}", done.stderr
    assert not (tmp_path / "cache").exists()


def test_a_refused_chown_is_kept_and_listed(remote_owners, share: Path) -> None:
    """The server refuses (the share's file immutable): a clear line in the log, an
    ``error`` conflict, the owner the user set still shown, nothing lost; once the server
    allows it, resolving with ``local`` sends it again."""
    (share / "f").write_bytes(b"f")
    with remote_owners(allowed_errors=[r"refused|Permission denied"]) as mount:
        mnt = mount.mountpoint
        os.stat(mnt / "f")
        subprocess.run(["chattr", "+i", str(share / "f")], check=True)
        try:
            os.chown(mnt / "f", OTHER, OTHER)
            with pytest.raises(OSError):
                control(mnt, "sync")
            st = status(mnt)
            assert st["conflicts"] == 1 and st["pending"] == 0, st
            assert owner(share / "f") == (0, 0)
            assert owner(mnt / "f") == (OTHER, OTHER)
            listed = subprocess.run([sys.executable, "-m", "cachefs.cli", "conflicts", str(mnt), "--json"],
                                    cwd=REPO, capture_output=True, text=True, timeout=60)
            records = json.loads(listed.stdout)
            assert [(r["kind"], r.get("refused"), r["path"]) for r in records] == [("error", "setattr", "f")], records
            assert "setstat: Permission denied" in records[0]["error"]
            time.sleep(1.2)  # a listing after the attribute timeout keeps what the user set
            os.listdir(mnt)
            assert owner(mnt / "f") == (OTHER, OTHER)
        finally:
            subprocess.run(["chattr", "-i", str(share / "f")], check=True)
        subprocess.run([sys.executable, "-m", "cachefs.cli", "resolve", str(mnt / "f"), "--keep", "local"],
                       cwd=REPO, check=True, capture_output=True, timeout=60)
        synced(mnt)
        assert owner(share / "f") == (OTHER, OTHER)
