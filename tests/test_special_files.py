"""FIFOs, unix sockets and device nodes in a real mount: local-only objects (issue 23).

They are made, listed, stat'ed, renamed and removed in the mount like any file, kept in the
cache across remounts, online and offline alike, and never sent to the server (SFTP cannot
make them): after every sync the share holds nothing of them. A server object listed under
the name of one takes the name; the local one moves to a conflict-style name. The kernel
serves their I/O itself: a FIFO's reader and writer meet, a socket bound in the mount
accepts a client connecting by path, gpg-agent runs with its GNUPGHOME in the mount.
Every wait is bounded; the mounts are stopped by the fixture.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cachefs.cache.listing import UNLINKED_LOCAL_MOST, apply_listing, hold_unlinked
from cachefs.remote.base import RemoteStat
from cachefs.store.index import LOCAL_ONLY, ROOT_INO, TARGET, Node, Store
from tests.fixtures.mount import run_recover, status
from tests.test_cli import cachefs, ok
from tests.test_writes import control, go_offline, sync_until_done, wait_for, wait_state

STEP_TIMEOUT = 20.0
STATE = "user.cachefs.state"


def fifo_round_trip(folder: Path, name: str = "fifo") -> str:
    """``mkfifo f; cat f & echo hi > f``, in a shell, bounded: what the reader read."""
    script = f"mkfifo {name} && {{ cat {name} & echo hi > {name}; wait; }}"
    return subprocess.run(["sh", "-c", script], cwd=folder, check=True, capture_output=True, text=True,
                          timeout=STEP_TIMEOUT).stdout


def fifo_again(path: Path) -> str:
    """A reader and a writer of an existing FIFO, each in a thread (both open it)."""
    got: list[bytes] = []

    def read() -> None:
        with open(path, "rb") as f:
            got.append(f.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    with open(path, "wb") as f:
        f.write(b"again\n")
    reader.join(STEP_TIMEOUT)
    assert not reader.is_alive(), "the FIFO's reader is still waiting"
    return got[0].decode()


def socket_round_trip(path: Path) -> bytes:
    """A server bound at ``path`` (in the mount) accepts a client connecting by path."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.settimeout(STEP_TIMEOUT)
    try:
        server.bind(str(path))
        server.listen(1)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert path.name in os.listdir(path.parent)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(STEP_TIMEOUT)
            client.connect(str(path))
            conn, _ = server.accept()
            with conn:
                client.sendall(b"ping")
                conn.sendall(conn.recv(4)[::-1])
                return client.recv(4)
    finally:
        server.close()


def state_of(path: Path) -> str:
    """What ``cachefs status PATH`` says of a local-only object. (``user.cachefs.state``
    cannot say it: the kernel lets no ``user.`` attribute reach a FIFO, socket or device
    node, and answers ENODATA itself.)"""
    try:
        os.getxattr(path, STATE, follow_symlinks=False)
        raise AssertionError(f"{path}: the kernel passed a user. attribute of a special file")
    except OSError as exc:
        assert exc.errno == errno.ENODATA, exc
    shown = ok(cachefs("status", str(path))).stdout
    first = shown.splitlines()[0]
    assert first.startswith("path state:"), shown
    return first.split(":", 1)[1].strip()


def server_names(share: Path) -> set[str]:
    found = set()
    for folder, dirs, files in os.walk(share):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(folder, name), share))
    return found


def remount(mount_factory, mount):
    mount.stop()
    again = mount_factory()
    again.start()
    return again


@pytest.mark.parametrize("offline", [False, True], ids=["online", "offline"])
def test_fifo_reader_writer_and_remount(mount_factory, share: Path, offline: bool) -> None:
    (share / "w").mkdir()
    (share / "w" / "plain").write_bytes(b"plain")
    mount = mount_factory()
    mount.start()
    mnt = mount.mountpoint
    os.listdir(mnt / "w")
    if offline:
        go_offline(mnt)
    w = mnt / "w"
    assert fifo_round_trip(w) == "hi\n"
    st = os.lstat(w / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and st.st_size == 0
    assert state_of(w / "fifo") == "local"
    assert sorted(os.listdir(w)) == ["fifo", "plain"]
    assert fifo_again(w / "fifo") == "again\n"
    os.chmod(w / "fifo", 0o600)
    os.utime(w / "fifo", ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    assert stat.S_IMODE(os.lstat(w / "fifo").st_mode) == 0o600
    assert os.lstat(w / "fifo").st_mtime_ns == 1_000_000_000_000_000_000
    assert status(mnt)["pending"] == 0  # (nothing journaled)
    if offline:
        control(mnt, "online")
    sync_until_done(mnt)
    assert server_names(share) == {"w", "w/plain"}
    mount = remount(mount_factory, mount)
    w = mount.mountpoint / "w"
    if offline:
        go_offline(mount.mountpoint)
    time.sleep(1.2)  # (past --attr-timeout: the folder is listed again from the server)
    assert sorted(os.listdir(w)) == ["fifo", "plain"]
    assert stat.S_ISFIFO(os.lstat(w / "fifo").st_mode)
    assert stat.S_IMODE(os.lstat(w / "fifo").st_mode) == 0o600
    assert fifo_again(w / "fifo") == "again\n"
    os.unlink(w / "fifo")
    assert os.listdir(w) == ["plain"]
    if offline:
        control(mount.mountpoint, "online")
    sync_until_done(mount.mountpoint)
    assert server_names(share) == {"w", "w/plain"}
    assert (share / "w" / "plain").read_bytes() == b"plain"


def test_a_fifo_unlinked_while_open_works_on(mount_factory) -> None:
    """As on a local filesystem: the open FIFO carries data, fstat and fchmod work (link
    count 0) after its name went, past the attribute timeout."""
    mount = mount_factory()
    mount.start()
    path = mount.mountpoint / "ff"
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR)
    try:
        path.unlink()
        assert os.listdir(mount.mountpoint) == []
        os.write(fd, b"x")
        assert os.read(fd, 1) == b"x"
        time.sleep(1.5)  # (past --attr-timeout: the kernel asks the mount)
        st = os.fstat(fd)
        assert stat.S_ISFIFO(st.st_mode) and st.st_nlink == 0
        os.fchmod(fd, 0o600)
        time.sleep(1.5)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
    finally:
        os.close(fd)
    assert status(mount.mountpoint)["pending"] == 0


@pytest.mark.parametrize("offline", [False, True], ids=["online", "offline"])
def test_unix_socket_bound_connected_listed_removed(mount_factory, share: Path, offline: bool) -> None:
    mount = mount_factory()
    mount.start()
    mnt = mount.mountpoint
    (mnt / "run").mkdir()
    if offline:
        go_offline(mnt)
    sock = mnt / "run" / "s.sock"
    assert socket_round_trip(sock) == b"gnip"
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    assert state_of(sock) == "local"
    assert os.listdir(mnt / "run") == ["s.sock"]
    # a stale socket left by a program that ended: removed, and bound again
    sock.unlink()
    assert os.listdir(mnt / "run") == []
    assert socket_round_trip(sock) == b"gnip"
    if offline:
        control(mnt, "online")
    sync_until_done(mnt)
    assert server_names(share) == {"run"}
    sock.unlink()
    sync_until_done(mnt)
    assert os.listdir(mnt / "run") == [] and server_names(share) == {"run"}


def test_gpg_agent_with_gnupghome_in_the_mount(mount_factory, share: Path) -> None:
    mount = mount_factory()
    mount.start()
    home = mount.mountpoint / "gnupg"
    home.mkdir(mode=0o700)
    env = dict(os.environ, GNUPGHOME=str(home))
    env.pop("GPG_AGENT_INFO", None)

    def gpg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT)

    socket_path = gpg("gpgconf", "--list-dirs", "agent-socket").stdout.strip()
    assert socket_path == str(home / "S.gpg-agent"), socket_path  # (no /run/user/UID here)
    try:
        launched = gpg("gpgconf", "--launch", "gpg-agent")
        assert launched.returncode == 0, launched.stderr
        talked = gpg("gpg-connect-agent", "GETINFO version", "/bye")
        assert talked.returncode == 0 and talked.stdout.startswith("D "), talked.stdout + talked.stderr
        assert stat.S_ISSOCK(os.lstat(home / "S.gpg-agent").st_mode)
        assert state_of(home / "S.gpg-agent") == "local"
        sync_until_done(mount.mountpoint)
        assert not any(name.startswith("gnupg/S.") for name in server_names(share)), server_names(share)
    finally:
        gpg("gpgconf", "--kill", "gpg-agent")
    wait_for(lambda: not (home / "S.gpg-agent").exists(), STEP_TIMEOUT, "gpg-agent removing its socket")


def test_rename_and_unlink_offline_then_online(mount_factory, share: Path) -> None:
    (share / "w").mkdir()
    (share / "w" / "server-file").write_bytes(b"on the server")
    (share / "w" / "kept").write_bytes(b"kept")
    (share / "w" / "gone").write_bytes(b"removed here, then a FIFO of its name made")
    mount = mount_factory()
    mount.start()
    mnt = mount.mountpoint
    w = mnt / "w"
    os.listdir(w)
    go_offline(mnt)
    os.mkfifo(w / "a")
    os.rename(w / "a", w / "b")  # a local-only object renamed: nothing for the server
    os.mkfifo(w / "c")
    os.unlink(w / "c")
    os.mkfifo(w / "over")
    os.rename(w / "over", w / "server-file")  # replaces a server file: its removal is replayed
    (w / "new").write_bytes(b"new")
    os.mkfifo(w / "replaced")
    os.rename(w / "new", w / "replaced")  # a file over a local-only object: a plain rename there
    os.unlink(w / "gone")
    os.mkfifo(w / "gone")  # (the unlink is replayed; the FIFO stays here)
    (mnt / "d").mkdir()
    os.mkfifo(mnt / "d" / "inner")
    assert errno.ENOTEMPTY == _errno(lambda: os.rmdir(mnt / "d"))
    os.rename(mnt / "d", mnt / "d2")  # a folder carries its local-only objects along
    assert sorted(os.listdir(w)) == ["b", "gone", "kept", "replaced", "server-file"]
    assert stat.S_ISFIFO(os.lstat(w / "server-file").st_mode)
    control(mnt, "online")
    sync_until_done(mnt)
    assert server_names(share) == {"w", "w/kept", "w/replaced", "d2"}
    assert (share / "w" / "replaced").read_bytes() == b"new"
    time.sleep(1.2)  # (past --attr-timeout: listed again from the server)
    assert sorted(os.listdir(w)) == ["b", "gone", "kept", "replaced", "server-file"]
    assert stat.S_ISFIFO(os.lstat(w / "gone").st_mode)
    assert os.listdir(mnt / "d2") == ["inner"] and stat.S_ISFIFO(os.lstat(mnt / "d2" / "inner").st_mode)
    # online now: rename and unlink again
    os.rename(w / "b", w / "b2")
    os.unlink(w / "server-file")
    os.unlink(mnt / "d2" / "inner")
    os.unlink(w / "gone")
    os.rmdir(mnt / "d2")
    sync_until_done(mnt)
    assert sorted(os.listdir(w)) == ["b2", "kept", "replaced"]
    assert server_names(share) == {"w", "w/kept", "w/replaced"}


def test_server_object_under_the_same_name_wins(mount_factory, share: Path) -> None:
    (share / "w").mkdir()
    mount = mount_factory()
    mount.start()
    w = mount.mountpoint / "w"
    os.mkfifo(w / "name.txt")
    (share / "w" / "name.txt").write_bytes(b"from the server")
    time.sleep(1.2)  # (past --attr-timeout)

    def settled() -> bool:
        return len(os.listdir(w)) == 2

    wait_for(settled, STEP_TIMEOUT, "the listing to show both objects")
    names = sorted(os.listdir(w))
    assert "name.txt" in names, names
    [copy] = [n for n in names if n != "name.txt"]
    assert copy.startswith("name (conflict ") and copy.endswith(").txt"), copy
    assert (w / "name.txt").read_bytes() == b"from the server"
    assert stat.S_ISFIFO(os.lstat(w / copy).st_mode)
    assert state_of(w / copy) == "local"
    assert "takes the name; the local-only FIFO there is kept as" in mount.log_text()
    # a socket a server listens on, moved aside the same way: still reached, by its new name
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.settimeout(STEP_TIMEOUT)
    folder = -1
    try:
        listener.bind(str(w / "agent.sock"))
        listener.listen(1)
        (share / "w" / "agent.sock").write_bytes(b"a file")
        time.sleep(1.2)
        wait_for(lambda: len(os.listdir(w)) == 4, STEP_TIMEOUT, "the socket moved aside")
        [moved] = [n for n in os.listdir(w) if n.startswith("agent (conflict ")]
        assert (w / "agent.sock").read_bytes() == b"a file"
        folder = os.open(w, os.O_PATH)  # (the full path is longer than sun_path's 108 bytes)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(STEP_TIMEOUT)
            client.connect(f"/proc/self/fd/{folder}/{moved}")
            listener.accept()[0].close()
    finally:
        listener.close()
        if folder >= 0:
            os.close(folder)
    sync_until_done(mount.mountpoint)
    assert server_names(share) == {"w", "w/name.txt", "w/agent.sock"}


@pytest.mark.parametrize("remote", ["sftp", "local-path"])
def test_device_node_by_root(mount_factory, share: Path, remote: str) -> None:
    """Local-only on every remote: a local-path share, whose filesystem could hold a
    device node or a FIFO, gets none either (docs/posix.md, Special files)."""
    if os.geteuid() != 0:
        pytest.fail("this test makes a device node: run it as root (the kernel asks CAP_MKNOD)")
    on = {"remote": str(share)} if remote == "local-path" else {}
    mount = mount_factory(**on)
    mount.start()
    mnt = mount.mountpoint
    os.mkfifo(mnt / "fifo")
    os.mknod(mnt / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(mnt / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    st = os.lstat(mnt / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(os.lstat(mnt / "blk").st_mode) and os.lstat(mnt / "blk").st_rdev == os.makedev(7, 200)
    assert state_of(mnt / "null") == "local"
    listed = subprocess.run(["stat", "-c", "%F %t:%T", str(mnt / "null")], capture_output=True, text=True,
                            check=True, timeout=STEP_TIMEOUT).stdout.strip()
    assert listed == "character special file 1:3", listed
    os.link(mnt / "null", mnt / "null2")  # hard links of local-only objects stay local too
    assert os.lstat(mnt / "null").st_nlink == 2
    sync_until_done(mnt)
    assert server_names(share) == set()
    mount.stop()
    mount = mount_factory(name="mnt2", **on)
    mount.start()
    assert os.lstat(mount.mountpoint / "null").st_rdev == os.makedev(1, 3)
    assert sorted(os.listdir(mount.mountpoint)) == ["blk", "fifo", "null", "null2"]
    sync_until_done(mount.mountpoint)
    assert server_names(share) == set()


def test_status_pin_recover_and_caches_with_local_only_objects(mount_factory, share: Path, tmp_path: Path) -> None:
    mount = mount_factory()
    mount.start()
    mnt = mount.mountpoint
    os.mkfifo(mnt / "fifo")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(mnt / "sock"))
    (mnt / "f").write_bytes(b"f")
    sync_until_done(mnt)
    ok(cachefs("pin", str(mnt)))  # (the pin walk and eviction pass them by)
    ok(cachefs("evict", str(mnt)))
    ok(cachefs("unpin", str(mnt)))
    go_offline(mnt)
    (mnt / "f").write_bytes(b"changed offline")
    assert state_of(mnt / "fifo") == "local" and state_of(mnt / "sock") == "local"
    assert "pending changes: 1\n" in ok(cachefs("status", str(mnt))).stdout
    ok(cachefs("conflicts", str(mnt)))
    mount.stop()
    saved = tmp_path / "saved"
    result = run_recover(str(mount.cache_dir), "--to", str(saved))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert (saved / "files" / "f").read_bytes() == b"changed offline"
    assert not (saved / "files" / "fifo").exists() and not (saved / "files" / "sock").exists()
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    ok(cachefs("caches", env=env))
    mount = mount_factory()
    mount.start()
    assert sorted(os.listdir(mount.mountpoint)) == ["f", "fifo", "sock"]
    sync_until_done(mount.mountpoint)
    assert server_names(share) == {"f"}
    shutil.rmtree(saved)


# -- in-process: the record and the listing rules ------------------------------------------------

def _special(store: Store, name: bytes, kind: int, rdev: int = 0) -> Node:
    def build(t) -> Node:
        ino = t.new_ino()
        node = Node(ino=ino, parent=ROOT_INO, name=name, mode=kind | 0o644, size=0, mtime_ns=1, atime_ns=1,
                    ctime_ns=1, flags=LOCAL_ONLY, target=Node.rdev_target(rdev))
        t.put(node)
        t.set_entry(ROOT_INO, name, ino)
        return node
    return store.transact(build)


def _rstat(kind: int, size: int = 0) -> RemoteStat:
    return RemoteStat(mode=kind | 0o644, size=size, mtime_ns=10**9, atime_ns=0)


def test_a_device_number_is_kept_in_the_record_and_read_only_from_local_only_nodes() -> None:
    dev = Node(ino=20, parent=ROOT_INO, name=b"null", mode=stat.S_IFCHR | 0o666, size=0, mtime_ns=1,
               atime_ns=1, ctime_ns=1, flags=LOCAL_ONLY, target=Node.rdev_target(os.makedev(1, 3)))
    back = Node.unpack(20, dev.pack())
    assert back == dev and back.rdev == os.makedev(1, 3)
    # a symlink's 8-byte target is a target, not a device number (the flag says which)
    link = Node(ino=21, parent=ROOT_INO, name=b"l", mode=stat.S_IFLNK | 0o777, size=8, mtime_ns=1,
                atime_ns=1, ctime_ns=1, flags=TARGET, target=b"12345678")
    assert Node.unpack(21, link.pack()).rdev == 0
    assert Node.rdev_target(0) == b"" and Node(ino=22, parent=1, name=b"f", mode=stat.S_IFIFO, size=0,
                                               mtime_ns=1, atime_ns=1, ctime_ns=1, flags=LOCAL_ONLY).rdev == 0


@pytest.mark.parametrize("key", [None, b"k" * 32], ids=["plain", "sealed"])
def test_a_listing_keeps_local_only_objects_and_gives_their_name_to_the_server(tmp_path: Path, key) -> None:
    store = Store(tmp_path / "c", "file:///x", key=key)
    apply_listing(store, ROOT_INO, [(b"a", _rstat(stat.S_IFREG, 5))])
    fifo = _special(store, b"p", stat.S_IFIFO)
    sock = _special(store, b"s", stat.S_IFSOCK)
    # not listed by the server: kept, and the fast path (nothing new) keeps them too
    delta = apply_listing(store, ROOT_INO, [(b"a", _rstat(stat.S_IFREG, 5))])
    assert sorted(n.name for n in store.children(ROOT_INO)) == [b"a", b"p", b"s"] and not delta.removed
    # the server now has "p" and "s": each takes its name, the local one moves aside
    taken = b"s (local 1)"
    _special(store, taken, stat.S_IFIFO)  # (the first choice for "s" is taken: the second)
    names = lambda name, n: name + f" (local {n})".encode()  # noqa: E731
    delta = apply_listing(store, ROOT_INO, [(b"a", _rstat(stat.S_IFREG, 5)), (b"p", _rstat(stat.S_IFREG, 3)),
                                            (b"s", _rstat(stat.S_IFDIR))], copy_name=names)
    assert sorted(delta.names_gone) == [b"p", b"s"] and not delta.removed  # (the kernel forgets those names)
    by_name = {n.name: n for n in store.children(ROOT_INO)}
    assert sorted(by_name) == [b"a", b"p", b"p (local 1)", b"s", b"s (local 1)", b"s (local 2)"]
    assert by_name[b"p (local 1)"].ino == fifo.ino and by_name[b"p (local 1)"].has(LOCAL_ONLY)
    assert store.get(fifo.ino).name == b"p (local 1)"
    assert by_name[b"s (local 2)"].ino == sock.ino and stat.S_ISSOCK(by_name[b"s (local 2)"].mode)
    assert stat.S_ISREG(by_name[b"p"].mode) and by_name[b"p"].size == 3 and not by_name[b"p"].has(LOCAL_ONLY)
    assert by_name[b"s"].is_dir and by_name[b"s"].base is not None
    store.close()


def _errno(action) -> int:
    try:
        action()
    except OSError as exc:
        return exc.errno or 0
    return 0


def test_resolve_local_of_a_deletion_where_a_fifo_took_the_name(mount_factory, share: Path) -> None:
    """``rm P; mkfifo P`` offline while the server changes P: the replay keeps the server's
    P (deleted-local-changed-remote). ``resolve P local`` made offline, before the folder
    is listed again, removes the server's P (journaled) and leaves the FIFO alone."""
    (share / "w").mkdir()
    (share / "w" / "P").write_bytes(b"server version 1")
    mount = mount_factory(attr_timeout="60")  # (w's listing stays fresh: no listing moves the FIFO aside)
    mount.start()
    mnt = mount.mountpoint
    w = mnt / "w"
    assert (w / "P").read_bytes() == b"server version 1"
    go_offline(mnt)
    os.unlink(w / "P")
    os.mkfifo(w / "P")
    (share / "w" / "P").write_bytes(b"server version 2, changed there")
    control(mnt, "online")
    wait_state(mnt, "online")  # (the probe's connection made: none in flight to undo the offline below)
    sync_until_done(mnt)
    control(mnt, "offline")  # (before the folder is listed again: the FIFO still holds P)
    [found] = json_conflicts(mnt)
    assert found["kind"] == "deleted-local-changed-remote" and found["path"] == "w/P", found
    assert found["version"][0] == len(b"server version 2, changed there"), found  # (what the resolve expects there)
    assert stat.S_ISFIFO(os.lstat(w / "P").st_mode)
    ok(cachefs("resolve", str(w / "P"), "--keep", "local"))
    assert stat.S_ISFIFO(os.lstat(w / "P").st_mode)
    assert status(mnt)["pending"] == 1  # (the server's P is to go)
    assert json_conflicts(mnt) == []
    control(mnt, "online")
    sync_until_done(mnt)
    assert server_names(share) == {"w"}
    assert json_conflicts(mnt) == []
    mount = remount(mount_factory, mount)  # (w listed again from the server)
    w = mount.mountpoint / "w"
    assert os.listdir(w) == ["P"] and stat.S_ISFIFO(os.lstat(w / "P").st_mode)
    assert fifo_again(w / "P") == "again\n"


def json_conflicts(mnt: Path) -> list[dict]:
    return json.loads(ok(cachefs("conflicts", "--json", str(mnt))).stdout)


def _link_special(store: Store, parent: int, name: bytes, kind: int, *more: tuple[int, bytes]) -> Node:
    """A local-only object at ``parent/name``, hard-linked at each of ``more`` too."""
    def build(t) -> Node:
        ino = t.new_ino()
        node = Node(ino=ino, parent=parent, name=name, mode=kind | 0o644, size=0, mtime_ns=1, atime_ns=1,
                    ctime_ns=1, nlink=1 + len(more), flags=LOCAL_ONLY)
        t.put(node)
        for p, n in ((parent, name), *more):
            t.set_entry(p, n, ino)
            if more:
                t.add_link_name(ino, p, n)
        return node
    return store.transact(build)


@pytest.mark.parametrize("key", [None, b"k" * 32], ids=["plain", "sealed"])
def test_a_hard_linked_fifo_outlives_a_folder_the_server_removed(tmp_path: Path, key) -> None:
    """a/p linked as b/q: the server removes a, b/q stays (link count 1, its name now b/q).
    Both names under the removed folder: the object goes with it."""
    store = Store(tmp_path / "c", "file:///x", key=key)
    dirs = [(b"a", _rstat(stat.S_IFDIR)), (b"b", _rstat(stat.S_IFDIR))]
    apply_listing(store, ROOT_INO, dirs)
    a, b = store.child(ROOT_INO, b"a").ino, store.child(ROOT_INO, b"b").ino
    server_linked = RemoteStat(mode=stat.S_IFREG | 0o644, size=1, mtime_ns=10**9, atime_ns=0, nlink=2)
    apply_listing(store, a, [(b"sub", _rstat(stat.S_IFDIR)), (b"hl", server_linked)])
    apply_listing(store, b, [])
    sub, hl = store.child(a, b"sub").ino, store.child(a, b"hl").ino
    assert store.get(hl).nlink == 2  # (a local share's link count: its one name here)
    kept = _link_special(store, a, b"p", stat.S_IFIFO, (b, b"q"))
    inner = _link_special(store, a, b"x", stat.S_IFSOCK, (sub, b"y"), (a, b"z"))
    generation = store.generation
    apply_listing(store, ROOT_INO, dirs[1:])  # (the server removed a)
    assert store.generation == generation + 1  # (every kept listing counts as changed: b's too)
    left = store.child(b, b"q")
    assert left is not None and left.ino == kept.ino and left.has(LOCAL_ONLY), left
    assert (left.parent, left.name, left.nlink) == (b, b"q", 1)
    assert store.get(kept.ino) == left and store.get(inner.ino) is None
    assert store.get(a) is None and store.get(sub) is None and store.get(hl) is None
    apply_listing(store, b, [])  # (listed again: still kept, as any local-only object)
    assert [n.name for n in store.children(b)] == [b"q"]
    assert store.path_of(kept.ino) == b"b/q"
    store.close()


def test_the_kernel_forgets_the_listed_name_of_a_hard_linked_object_moved_aside(tmp_path: Path) -> None:
    """A FIFO whose main name is b/q, linked as c/p: the server lists a p in c. The name
    the kernel is told to forget is c's p (the node's own name is q, in b)."""
    store = Store(tmp_path / "c", "file:///x")
    dirs = [(b"b", _rstat(stat.S_IFDIR)), (b"c", _rstat(stat.S_IFDIR))]
    apply_listing(store, ROOT_INO, dirs)
    b, c = store.child(ROOT_INO, b"b").ino, store.child(ROOT_INO, b"c").ino
    apply_listing(store, b, [])
    apply_listing(store, c, [])
    fifo = _link_special(store, b, b"q", stat.S_IFIFO, (c, b"p"))
    delta = apply_listing(store, c, [(b"p", _rstat(stat.S_IFREG, 4))])
    assert delta.names_gone == [b"p"] and not delta.removed
    moved = store.get(fifo.ino)
    assert (moved.parent, moved.name, moved.nlink) == (b, b"q", 2)
    assert sorted(n.name for n in store.children(c)) == [b"p", b"p (local 1)"]
    # a name of a hard-linked object the server no longer lists (a file's link made here):
    # the node stays, the kernel forgets the name
    linked = store.child(c, b"p")
    store.transact(lambda t: (t.set_entry(b, b"r", linked.ino), t.add_link_name(linked.ino, b, b"r"),
                              t.add_link_name(linked.ino, c, b"p"), t.put(dataclasses.replace(linked, nlink=2))))
    delta = apply_listing(store, b, [])
    assert delta.names_gone == [b"r"] and not delta.removed and store.get(linked.ino).nlink == 1
    store.close()


def test_a_fifo_linked_into_another_folder_outlives_the_first(mount_factory, share: Path) -> None:
    (share / "a").mkdir()
    (share / "b").mkdir()
    mount = mount_factory()
    mount.start()
    mnt = mount.mountpoint
    os.mkfifo(mnt / "a" / "p")
    os.link(mnt / "a" / "p", mnt / "b" / "q")
    assert os.lstat(mnt / "b" / "q").st_nlink == 2
    (share / "a").rmdir()  # (removed on the server by someone else: p was never there)
    time.sleep(1.2)  # (past --attr-timeout)
    wait_for(lambda: sorted(os.listdir(mnt)) == ["b"], STEP_TIMEOUT, "a listing without a")
    time.sleep(1.2)
    assert os.listdir(mnt / "b") == ["q"]
    st = os.lstat(mnt / "b" / "q")
    assert stat.S_ISFIFO(st.st_mode) and st.st_nlink == 1
    assert fifo_again(mnt / "b" / "q") == "again\n"
    mount = remount(mount_factory, mount)
    assert os.listdir(mount.mountpoint / "b") == ["q"]
    assert stat.S_ISFIFO(os.lstat(mount.mountpoint / "b" / "q").st_mode)
    sync_until_done(mount.mountpoint)
    assert server_names(share) == {"b"}


def test_unlinked_local_only_objects_held_for_the_kernel_are_bounded() -> None:
    """Those unlinked through the control file may be held by no kernel (never forgotten):
    past the bound the oldest go; one held again moves to the end."""
    held: dict[int, Node] = {}
    nodes = [Node(ino=100 + i, parent=0, name=b"p", mode=stat.S_IFIFO | 0o644, size=0, mtime_ns=1, atime_ns=1,
                  ctime_ns=1, nlink=0, flags=LOCAL_ONLY) for i in range(UNLINKED_LOCAL_MOST + 5)]
    for node in nodes:
        hold_unlinked(held, node)
        if len(held) == UNLINKED_LOCAL_MOST and node.ino == 100 + UNLINKED_LOCAL_MOST - 1:
            hold_unlinked(held, nodes[0])  # (100, the oldest, again: now the latest)
    assert len(held) == UNLINKED_LOCAL_MOST
    assert 100 in held and not any(ino in held for ino in range(101, 106)) and 106 in held
    assert list(held)[-1] == nodes[-1].ino


def _aside(folder: Path, name: str) -> str:
    [copy] = [n for n in os.listdir(folder) if n.startswith(f"{name} (conflict ")]
    return copy


def test_a_folder_renamed_onto_a_new_server_folder_keeps_its_fifo(mount_factory, share: Path) -> None:
    """Review finding 1 (a): D renamed to E offline while the server got its own E: the
    server keeps ours as ``E (conflict ...)``, and with it here the file and the FIFO."""
    (share / "D").mkdir()
    (share / "D" / "f").write_bytes(b"f")
    mount = mount_factory()
    mount.start()
    mnt = mount.mountpoint
    os.listdir(mnt / "D")
    os.mkfifo(mnt / "D" / "p")
    go_offline(mnt)
    os.rename(mnt / "D", mnt / "E")
    (share / "E").mkdir()
    (share / "E" / "theirs").write_bytes(b"theirs")
    control(mnt, "online")
    sync_until_done(mnt)
    time.sleep(1.2)  # (past --attr-timeout)
    wait_for(lambda: any(n.startswith("E (conflict ") for n in os.listdir(mnt)), STEP_TIMEOUT, "the copy")
    copy = mnt / _aside(mnt, "E")
    assert sorted(os.listdir(copy)) == ["f", "p"], os.listdir(copy)
    assert stat.S_ISFIFO(os.lstat(copy / "p").st_mode)
    assert os.listdir(mnt / "E") == ["theirs"]


def test_a_folder_made_where_the_server_made_a_file_keeps_its_fifo(mount_factory, share: Path) -> None:
    """Review finding 1 (b): D made offline with a file and a FIFO in it while the server
    got a file D: the server keeps ours as ``D (conflict ...)``, with both in it here."""
    mount = mount_factory()
    mount.start()
    mnt = mount.mountpoint
    go_offline(mnt)
    (mnt / "D").mkdir()
    (mnt / "D" / "f").write_bytes(b"f")
    os.mkfifo(mnt / "D" / "p")
    (share / "D").write_bytes(b"the server's file")
    control(mnt, "online")
    sync_until_done(mnt)
    time.sleep(1.2)
    wait_for(lambda: any(n.startswith("D (conflict ") for n in os.listdir(mnt)), STEP_TIMEOUT, "the copy")
    copy = mnt / _aside(mnt, "D")
    assert (mnt / "D").read_bytes() == b"the server's file"
    assert "p" in os.listdir(copy) and stat.S_ISFIFO(os.lstat(copy / "p").st_mode), os.listdir(copy)
    # (the review's pre-existing part: D/f, left as an error conflict, is not visible either)
    assert (copy / "f").read_bytes() == b"f", os.listdir(copy)


def test_a_folder_set_aside_follows_a_later_rename_of_its_parent(mount_factory, share: Path) -> None:
    """Offline: X renamed to A/D (the server made a folder A/D meanwhile), then A renamed
    to B, then B/D/x and a FIFO made: the server keeps ours as ``A/D (conflict ...)``, and
    what was made after A's rename goes into that copy (now under B), never into the
    server's folder D."""
    (share / "X").mkdir()
    (share / "A").mkdir()
    mount = mount_factory()
    mount.start()
    mnt = mount.mountpoint
    assert os.listdir(mnt / "A") == [] and os.listdir(mnt / "X") == []
    go_offline(mnt)
    os.rename(mnt / "X", mnt / "A" / "D")
    os.rename(mnt / "A", mnt / "B")
    (mnt / "B" / "D" / "x").write_bytes(b"ours")
    (mnt / "B" / "D" / "sub").mkdir()
    (mnt / "B" / "D" / "sub" / "y").write_bytes(b"deeper")
    os.mkfifo(mnt / "B" / "D" / "p")
    (share / "A" / "D").mkdir()
    (share / "A" / "D" / "theirs").write_bytes(b"theirs")
    control(mnt, "online")
    sync_until_done(mnt)
    copy = _aside(share / "B", "D")
    assert sorted(os.listdir(share / "B" / "D")) == ["theirs"]
    assert sorted(os.listdir(share / "B" / copy)) == ["sub", "x"]
    assert (share / "B" / copy / "sub" / "y").read_bytes() == b"deeper"
    time.sleep(1.2)
    assert sorted(os.listdir(mnt / "B" / copy)) == ["p", "sub", "x"]
    assert stat.S_ISFIFO(os.lstat(mnt / "B" / copy / "p").st_mode)
    assert sorted(os.listdir(mnt / "B" / "D")) == ["theirs"]
    assert status(mnt)["pending"] == 0
