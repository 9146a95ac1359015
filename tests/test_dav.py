"""The WebDAV backend (``cachefs.remote.dav``) against a real server: Apache's mod_dav on
loopback (``devtools.davserver``), started by the fixtures; then real mounts of it through
``mount.py``: reads, writes made while the server is stopped and replayed when it is back,
and a conflict that only an ETag can see (same size, same mtime second).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefs.address import parse_remote
from cachefs.remote import ConnectOptions, handler_for
from cachefs.remote.base import NotExpected, RemoteError, RemoteRefused, RemoteStat, RemoteUnreachable, Upload
from cachefs.remote.dav import DavRemote
from cachefs.remote.ssh_secrets import Secrets
from devtools.davserver import DavServer
from tests.fixtures.mount import Mount, status
from tests.test_conflicts import assert_recorded, copies_of
from tests.test_writes import control, go_offline, read_all, sync, sync_until_done, wait_for, wait_state, write_file

TIMEOUT = 3.0


@pytest.fixture
def davd(tmp_path: Path, share: Path) -> Iterator[DavServer]:
    """A running Apache WebDAV server (free port, its own password) serving ``share``."""
    server = DavServer(tmp_path / "davd", share=share)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def remote_of(server: DavServer, path: str = "/", **kwargs: object) -> DavRemote:
    options: dict[str, object] = {"port": server.port, "user": server.user, "password": server.password,
                                  "timeout": TIMEOUT}
    options.update(kwargs)
    return DavRemote(server.host, path, **options)  # type: ignore[arg-type]


@pytest.fixture
def dav(davd: DavServer) -> Iterator[DavRemote]:
    remote = remote_of(davd)
    remote.connect()
    try:
        yield remote
    finally:
        remote.close()


def same_second_rewrite(path: Path, data: bytes) -> None:
    """Rewrite ``path`` in place with ``data`` (same size), its mtime kept in the same
    second: what size-and-mtime-second versions cannot see."""
    before = path.stat()
    assert len(data) == before.st_size
    with open(path, "r+b") as f:
        f.write(data)
    second, fraction = divmod(before.st_mtime_ns, 10**9)
    moved = fraction + 1000 if fraction < 10**9 - 1000 else fraction - 1000  # (1 µs)
    os.utime(path, ns=(before.st_atime_ns, second * 10**9 + moved))


def never(_found: RemoteStat | None) -> bool:
    raise AssertionError("expect was not to be asked")


# -- reading ------------------------------------------------------------------------------


def test_stat_and_listdir_give_kinds_sizes_and_strong_tags(dav: DavRemote, share: Path) -> None:
    (share / "a.txt").write_bytes(b"hello")
    (share / "sub").mkdir()
    (share / "sub" / "inner").write_bytes(b"x" * 3000)
    st = dav.stat(b"a.txt")
    assert (st.kind, st.size) == (0o100000, 5)
    assert abs(st.mtime_ns - (share / "a.txt").stat().st_mtime_ns) < 2 * 10**9
    assert st.tag != 0 and st.version() == (5, st.tag, 0o100000)
    assert dav.stat(b"sub").kind == 0o040000
    assert dav.stat(b"").kind == 0o040000
    listed = dict(dav.listdir(b""))
    assert sorted(listed) == [b"a.txt", b"sub"]
    assert listed[b"a.txt"].tag == st.tag and listed[b"sub"].kind == 0o040000
    assert [(n, s.size) for n, s in dav.listdir(b"sub")] == [(b"inner", 3000)]
    with pytest.raises(RemoteError) as caught:
        dav.stat(b"missing")
    assert caught.value.errno == errno.ENOENT
    with pytest.raises(RemoteError) as caught:
        dav.listdir(b"a.txt")
    assert caught.value.errno == errno.ENOTDIR
    with pytest.raises(RemoteError) as caught:
        dav.listdir(b"missing")
    assert caught.value.errno == errno.ENOENT


def test_a_same_size_same_second_rewrite_changes_the_version(dav: DavRemote, share: Path) -> None:
    (share / "f").write_bytes(b"aaaa")
    before = dav.stat(b"f")
    same_second_rewrite(share / "f", b"bbbb")
    after = dav.stat(b"f")
    assert (after.size, after.mtime_ns) == (before.size, before.mtime_ns)
    assert after.version() != before.version()


def test_names_are_bytes_end_to_end(dav: DavRemote, share: Path) -> None:
    names = [b"caf\xc3\xa9", b"lat\xe9", b"sp ace", b"q?x", b"h#x", b"pc%41", b"semi;colon", b"+plus&amp"]
    for name in names:
        with open(os.path.join(os.fsencode(share), name), "wb") as f:
            f.write(name)
    assert sorted(n for n, _ in dav.listdir(b"")) == sorted(names)
    for name in names:
        assert dav.read(name, 0, 100) == name
        assert dav.stat(name).size == len(name)
    dav.rename(b"lat\xe9", b"lat\xe9 2")
    assert os.path.exists(os.path.join(os.fsencode(share), b"lat\xe9 2"))


def test_ranged_reads_in_pieces_side_by_side(dav: DavRemote, share: Path) -> None:
    data = os.urandom(11 << 20)  # (three 4 MiB pieces)
    (share / "big").write_bytes(data)
    assert dav.read(b"big", 0, 10) == data[:10]
    assert dav.read(b"big", 5 << 20, 100) == data[5 << 20:(5 << 20) + 100]
    assert dav.read(b"big", 1000, 9 << 20) == data[1000:1000 + (9 << 20)]
    assert dav.read(b"big", (11 << 20) - 10, 100) == data[-10:]  # short at the end
    assert dav.read(b"big", 12 << 20, 100) == b""  # beyond it
    assert dav.read(b"big", 0, 20 << 20) == data
    seen: dict[int, bytes] = {}
    got = dav.read_into(b"big", 3, 10 << 20, seen.__setitem__)
    assert got == 10 << 20
    assert b"".join(seen[p] for p in sorted(seen)) == data[3:3 + (10 << 20)]
    with pytest.raises(RemoteError) as caught:
        dav.read(b"nothing", 0, 10)
    assert caught.value.errno == errno.ENOENT


def test_read_many_gives_contents_with_their_versions(dav: DavRemote, share: Path) -> None:
    for i in range(6):
        (share / f"s{i}").write_bytes(b"%d" % i * (i + 1))
    got = dav.read_many([(b"s%d" % i, i + 1) for i in range(6)] + [(b"gone", 3)])
    for i, item in enumerate(got[:6]):
        assert not isinstance(item, RemoteError)
        data, st = item
        assert data == b"%d" % i * (i + 1)
        assert st.version() == dav.stat(b"s%d" % i).version()
    assert isinstance(got[6], RemoteError) and got[6].errno == errno.ENOENT


# -- writing ------------------------------------------------------------------------------


def test_upload_replaces_a_file_in_one_step(dav: DavRemote, share: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.write_bytes(b"new content" * 1000)
    (share / "t").write_bytes(b"old")
    st = dav.upload(b"t", str(source), 0o644, b".t.tmp", times=(0, 10**18))
    assert (share / "t").read_bytes() == b"new content" * 1000
    assert st.version() == dav.stat(b"t").version() and st.size == 11000
    assert sorted(os.listdir(share)) == ["t"]  # nothing left beside it
    with pytest.raises(RemoteError) as caught:
        dav.upload(b"no/such/t", str(source), 0o644, b".t.tmp")
    assert caught.value.errno == errno.ENOENT


def test_upload_many_is_conditional_on_what_expect_was_shown(dav: DavRemote, share: Path,
                                                              tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.write_bytes(b"mine")
    (share / "kept").write_bytes(b"theirs")
    (share / "replaced").write_bytes(b"base")
    base = dav.stat(b"replaced")
    shown: dict[bytes, RemoteStat | None] = {}

    def expecting(path: bytes, wanted: RemoteStat | None) -> Upload:
        def expect(found: RemoteStat | None) -> bool:
            shown[path] = found
            return (found is None) == (wanted is None) and (found is None or found.version() == wanted.version())
        return Upload(path, str(source), 0o644, b".tmp", None, expect)

    outcomes = dav.upload_many([expecting(b"new", None), expecting(b"replaced", base),
                                expecting(b"kept", None)])
    assert isinstance(outcomes[0], RemoteStat) and (share / "new").read_bytes() == b"mine"
    assert isinstance(outcomes[1], RemoteStat) and (share / "replaced").read_bytes() == b"mine"
    assert isinstance(outcomes[2], NotExpected) and outcomes[2].found is not None
    assert (share / "kept").read_bytes() == b"theirs"
    assert shown[b"new"] is None and shown[b"kept"] is not None


def test_a_change_after_the_check_is_never_overwritten_even_same_size_same_second(
        dav: DavRemote, share: Path, tmp_path: Path) -> None:
    """The server's file changes between ``expect`` (which accepted it) and the PUT:
    same size, mtime in the same second. The PUT is refused (412), nothing overwritten,
    and the outcome shows what is there now."""
    source = tmp_path / "src"
    source.write_bytes(b"from the cache")
    target = share / "doc"
    target.write_bytes(b"base")
    base = dav.stat(b"doc")

    def expect(found: RemoteStat | None) -> bool:
        assert found is not None and found.version() == base.version()
        same_second_rewrite(target, b"edit")  # (a user on the server, just now)
        return True

    [outcome] = dav.upload_many([Upload(b"doc", str(source), 0o644, b".tmp", None, expect)])
    assert target.read_bytes() == b"edit"
    assert isinstance(outcome, NotExpected), outcome
    assert outcome.found is not None and outcome.found.version() != base.version()
    assert outcome.found.version() == dav.stat(b"doc").version()

    # and a name that appeared after a check that found nothing (If-None-Match: *)
    def appears(found: RemoteStat | None) -> bool:
        assert found is None
        (share / "fresh").write_bytes(b"made there")
        return True

    [outcome] = dav.upload_many([Upload(b"fresh", str(source), 0o644, b".tmp", None, appears)])
    assert isinstance(outcome, NotExpected) and outcome.found is not None
    assert (share / "fresh").read_bytes() == b"made there"


def test_a_recent_change_is_uploaded_over_after_its_weak_etag_turns_strong(
        dav: DavRemote, share: Path, tmp_path: Path) -> None:
    """Apache's ETag is weak for a second after a change; If-Match needs a strong one:
    the upload waits for it rather than failing or going unconditional."""
    source = tmp_path / "src"
    source.write_bytes(b"over it")
    (share / "hot").write_bytes(b"just written")
    start = time.monotonic()
    [outcome] = dav.upload_many([Upload(b"hot", str(source), 0o644, b".tmp", None, lambda found: True)])
    assert isinstance(outcome, RemoteStat), outcome
    assert (share / "hot").read_bytes() == b"over it"
    assert time.monotonic() - start < 4


def test_folders_removals_and_renames_keep_posix_rules(dav: DavRemote, share: Path) -> None:
    dav.mkdir(b"d", 0o755)
    assert (share / "d").is_dir()

    def fails(code: int, call: object, *args: object) -> None:
        with pytest.raises(RemoteError) as caught:
            call(*args)  # type: ignore[operator]
        assert caught.value.errno == code, (call, args, caught.value)

    fails(errno.EEXIST, dav.mkdir, b"d", 0o755)
    fails(errno.ENOENT, dav.mkdir, b"no/such", 0o755)
    (share / "d" / "f").write_bytes(b"1")
    fails(errno.ENOTEMPTY, dav.rmdir, b"d")
    fails(errno.EISDIR, dav.unlink, b"d")
    fails(errno.ENOTDIR, dav.rmdir, b"d/f")
    fails(errno.ENOENT, dav.unlink, b"missing")
    fails(errno.ENOENT, dav.rmdir, b"missing")
    assert (share / "d" / "f").exists()

    (share / "g").write_bytes(b"2")
    fails(errno.EISDIR, dav.rename, b"g", b"d")  # (a MOVE would have removed d and f)
    (share / "e").mkdir()
    (share / "e" / "x").write_bytes(b"3")
    fails(errno.ENOTEMPTY, dav.rename, b"d", b"e")
    fails(errno.ENOTDIR, dav.rename, b"d", b"g")
    fails(errno.EEXIST, dav.rename_noreplace, b"g", b"d/f")
    assert (share / "g").read_bytes() == b"2" and (share / "d" / "f").read_bytes() == b"1"
    fails(errno.ENOENT, dav.rename, b"missing", b"h")
    fails(errno.ENOENT, dav.rename, b"g", b"no/such")

    dav.rename(b"g", b"d/f")  # over a file: replaced
    assert (share / "d" / "f").read_bytes() == b"2" and not (share / "g").exists()
    dav.rename_noreplace(b"d", b"renamed")
    assert (share / "renamed" / "f").exists()
    dav.unlink(b"renamed/f")
    dav.rmdir(b"renamed")
    assert sorted(os.listdir(share)) == ["e"]


def test_what_webdav_cannot_carry(dav: DavRemote, share: Path) -> None:
    caps = DavRemote.capabilities
    assert (caps.symlinks, caps.hard_links, caps.modes, caps.owners, caps.notify) == (False,) * 5
    assert caps.strong_versions and caps.atomic_replace
    (share / "f").write_bytes(b"x")
    for call in (lambda: dav.symlink(b"f", b"l"), lambda: dav.link(b"f", b"h")):
        with pytest.raises(RemoteError) as caught:
            call()
        assert caught.value.errno == errno.EPERM
    with pytest.raises(RemoteError):
        dav.readlink(b"f")
    mtime = (share / "f").stat().st_mtime_ns
    dav.set_attrs(b"f", 0o600, 0, 10**18)  # Apache keeps no client times: kept in the cache
    dav.set_attrs(b"f", 0o600, 0, 10**18)
    assert (share / "f").stat().st_mtime_ns == mtime
    space = dav.statvfs()
    assert space.blocks_avail > 0 and space.name_max == 255


# -- logging in, errors, a server that goes away ---------------------------------------------


def test_a_wrong_or_missing_password_is_refused_clearly(davd: DavServer, tmp_path: Path) -> None:
    wrong = remote_of(davd, password="not-the-password")
    with pytest.raises(RemoteRefused) as caught:
        wrong.connect()
    assert "password refused" in str(caught.value) and "not-the-password" not in str(caught.value)
    none = remote_of(davd, password=None, netrc_file=str(tmp_path / "no-netrc"))
    with pytest.raises(RemoteRefused) as caught:
        none.connect()
    assert "--password-file" in str(caught.value)
    for remote in (wrong, none):
        remote.close()


def test_the_password_comes_from_secrets_or_netrc(davd: DavServer, tmp_path: Path) -> None:
    address = parse_remote(davd.address())
    assert handler_for(address.scheme) is DavRemote
    given = DavRemote.from_address(address, ConnectOptions(timeout=TIMEOUT, secrets=Secrets(davd.password, "test")))
    given.connect()
    assert [n for n, _ in given.listdir(b"")] == []
    given.close()

    netrc_file = tmp_path / "netrc"
    netrc_file.write_text(f"machine {davd.host} login {davd.user} password {davd.password}\n")
    netrc_file.chmod(0o600)
    from_netrc = remote_of(davd, password=None, netrc_file=str(netrc_file), user=None)
    from_netrc.connect()
    assert from_netrc.user == davd.user  # (the login from the entry)
    from_netrc.close()


def test_a_share_folder_that_is_not_there_is_refused(davd: DavServer, share: Path) -> None:
    (share / "file").write_bytes(b"x")
    for path in ("/missing", "/file"):
        remote = remote_of(davd, path)
        with pytest.raises(RemoteRefused):
            remote.connect()
        remote.close()
    (share / "sub").mkdir()
    (share / "sub" / "in").write_bytes(b"inside")
    remote = remote_of(davd, "/sub")
    remote.connect()
    assert remote.read(b"in", 0, 10) == b"inside"
    assert [n for n, _ in remote.listdir(b"")] == [b"in"]
    remote.close()


def test_a_stopped_server_is_unreachable_then_back(davd: DavServer, dav: DavRemote, share: Path) -> None:
    (share / "f").write_bytes(b"x")
    assert dav.stat(b"f").size == 1
    davd.stop()
    start = time.monotonic()
    with pytest.raises(RemoteUnreachable):
        dav.stat(b"f")
    with pytest.raises(RemoteUnreachable):
        dav.read(b"f", 0, 1)
    assert time.monotonic() - start < TIMEOUT
    davd.start()
    assert dav.read(b"f", 0, 1) == b"x"


def test_a_silent_server_is_unreachable_within_the_timeout(tmp_path: Path) -> None:
    """A server that accepts connections and never answers: every call returns within
    the timeout (a silent network must not hang a thread)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    remote = DavRemote("127.0.0.1", "/", port=listener.getsockname()[1], password="x", timeout=1.0)
    try:
        start = time.monotonic()
        with pytest.raises(RemoteUnreachable) as caught:
            remote.connect()
        assert time.monotonic() - start < 2.5
        assert "no answer within 1 s" in str(caught.value)
    finally:
        remote.close()
        stop.set()
        thread.join()
        for sock in held:
            sock.close()
        listener.close()


# -- mounts through mount.py --------------------------------------------------------------


def dav_mount(server: DavServer, tmp_path: Path, name: str = "mnt") -> Mount:
    return Mount(server.address(), tmp_path / name, tmp_path / f"cache-{name}", *server.mount_args(),
                 "--timeout", "2", "--attr-timeout", "1", "--heartbeat", "1", "-v")


def test_mount_reads_and_writes_through(davd: DavServer, share: Path, tmp_path: Path) -> None:
    (share / "hello.txt").write_bytes(b"from the server\n")
    (share / "docs").mkdir()
    (share / "docs" / "lat\xe9".encode("latin-1").decode("utf-8", "surrogateescape")).write_bytes(b"1")
    with dav_mount(davd, tmp_path) as mount:
        mnt = mount.mountpoint
        assert (mnt / "hello.txt").read_bytes() == b"from the server\n"
        assert os.listdir(os.fsencode(mnt / "docs")) == [b"lat\xe9"]
        assert status(mnt)["remote"] == davd.address()
        write_file(mnt / "docs" / "new.txt", b"made here\n")
        os.mkdir(mnt / "folder")
        for attempt in (lambda: os.symlink("hello.txt", mnt / "link"),
                        lambda: os.link(mnt / "hello.txt", mnt / "hard")):
            with pytest.raises(OSError) as caught:
                attempt()
            assert caught.value.errno == errno.EPERM
        sync(mnt)
        assert status(mnt)["pending"] == 0
    assert (share / "docs" / "new.txt").read_bytes() == b"made here\n"
    assert (share / "folder").is_dir()
    assert davd.password not in mount.log_text()  # (a -v log, every request in it)


def test_mount_works_offline_and_replays_when_the_server_is_back(davd: DavServer, share: Path,
                                                               tmp_path: Path) -> None:
    (share / "a.txt").write_bytes(b"kept offline\n")
    (share / "old.txt").write_bytes(b"to remove\n")
    with dav_mount(davd, tmp_path) as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        davd.stop()
        wait_state(mnt, "offline")
        assert (mnt / "a.txt").read_bytes() == b"kept offline\n"
        write_file(mnt / "b.txt", b"written offline\n")
        os.mkdir(mnt / "dir")
        write_file(mnt / "dir" / "c.txt", b"in a new folder\n")
        os.rename(mnt / "a.txt", mnt / "a2.txt")
        os.unlink(mnt / "old.txt")
        assert status(mnt)["pending"] > 0
        assert (share / "a.txt").exists() and not (share / "b.txt").exists()
        davd.start()
        wait_state(mnt, "online")
        sync_until_done(mnt)
        assert status(mnt)["pending"] == 0
    assert (share / "b.txt").read_bytes() == b"written offline\n"
    assert (share / "dir" / "c.txt").read_bytes() == b"in a new folder\n"
    assert (share / "a2.txt").read_bytes() == b"kept offline\n"
    assert sorted(os.listdir(share)) == ["a2.txt", "b.txt", "dir"]


def test_mount_sees_a_same_size_same_second_server_change_as_a_conflict(
        davd: DavServer, share: Path, tmp_path: Path) -> None:
    """Changed here offline and on the server, the server's change keeping size and mtime
    second: the ETag tells, the replay does not overwrite it, and a conflict copy keeps
    this side's version (as on SFTP with a change it can see)."""
    (share / "report.txt").write_bytes(b"base version")
    with dav_mount(davd, tmp_path) as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        go_offline(mnt)
        write_file(mnt / "report.txt", b"local version, longer")
        same_second_rewrite(share / "report.txt", b"server edit!")
        control(mnt, "online")
        sync(mnt)
        assert (share / "report.txt").read_bytes() == b"server edit!"
        copies = copies_of(share, "report.txt")
        assert len(copies) == 1, os.listdir(share)
        assert (share / copies[0]).read_bytes() == b"local version, longer"
        assert_recorded(mnt, "report.txt", "changed-both")
        wait_for(lambda: (mnt / "report.txt").read_bytes() == b"server edit!", 6,
                 "the server's version in the mount")


def test_digest_auth_when_the_server_asks_for_it(tmp_path: Path, share: Path) -> None:
    server = DavServer(tmp_path / "digest", share=share, auth="digest")
    server.start()
    try:
        (share / "f").write_bytes(b"behind digest")
        remote = remote_of(server)
        remote.connect()
        assert remote.read(b"f", 0, 100) == b"behind digest"
        remote.close()
        wrong = remote_of(server, password="wrong")
        with pytest.raises(RemoteRefused, match="password refused"):
            wrong.connect()
        wrong.close()
    finally:
        server.stop()


def test_davs_checks_the_certificate(tmp_path: Path, share: Path) -> None:
    """davs:// is https with the certificate verified: a self-signed one is refused
    (a RemoteRefused, not an outage) unless its CA is given."""
    server = DavServer(tmp_path / "tls", share=share, tls=True)
    server.start()
    try:
        (share / "f").write_bytes(b"over tls")
        assert server.address().startswith("davs://")
        untrusted = remote_of(server, scheme="davs")
        with pytest.raises(RemoteRefused, match="certificate"):
            untrusted.connect()
        untrusted.close()
        trusted = remote_of(server, scheme="davs", verify=str(server.cert))
        trusted.connect()
        assert trusted.read(b"f", 0, 100) == b"over tls"
        trusted.close()
    finally:
        server.stop()


def test_a_damaged_source_stops_the_upload_and_leaves_the_old_content(
        dav: DavRemote, share: Path) -> None:
    from cachefs.errors import ContentDamaged
    import io

    (share / "f").write_bytes(b"old content")

    class Damaged(io.RawIOBase):
        def __init__(self) -> None:
            self.sent = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
            if self.sent >= 3 << 20:
                raise ContentDamaged("checksum mismatch")
            n = min(len(buffer), 1 << 20)
            buffer[:n] = b"n" * n
            self.sent += n
            return n

    [outcome] = dav.upload_many([Upload(b"f", lambda: io.BufferedReader(Damaged()), 0o644, b".tmp",
                                        None, lambda found: True)])
    assert isinstance(outcome, ContentDamaged), outcome
    assert (share / "f").read_bytes() == b"old content"
    wait_for(lambda: sorted(os.listdir(share)) == ["f"], 5, "the server's temporary file removed")


def test_a_mount_with_a_wrong_password_fails_in_one_line(davd: DavServer, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.fixtures.mount import MOUNT_SCRIPT, REPO

    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    (tmp_path / "mnt").mkdir()
    result = subprocess.run([sys.executable, str(MOUNT_SCRIPT), davd.address(), str(tmp_path / "mnt"),
                             "--cache-dir", str(tmp_path / "cache"), "--password-file", str(wrong),
                             "--timeout", "3"],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=REPO)
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cachefs: ") and "password refused" in lines[0], lines
    assert "not-the-password" not in result.stderr + result.stdout


def test_a_read_gives_the_version_its_bytes_are_of(dav: DavRemote, share: Path) -> None:
    data = os.urandom(9 << 20)
    (share / "v").write_bytes(data)
    time.sleep(1.1)  # (Apache's ETag turns strong a second after a change)
    seen: dict[int, bytes] = {}
    got, version = dav.read_version_into(b"v", 0, 9 << 20, seen.__setitem__)
    assert got == 9 << 20 and b"".join(seen[p] for p in sorted(seen)) == data
    assert version.version() == dav.stat(b"v").version() and version.size == 9 << 20
    got, version = dav.read_version_into(b"v", 100, 10, lambda _p, _d: None)
    assert (got, version.version()) == (10, dav.stat(b"v").version())
    assert [len(x) if isinstance(x, list) else x.errno for x in dav.listdir_many([b"", b"gone", b""])] \
        == [1, errno.ENOENT, 1]
    dav.rename(b"v", b"v")
    assert (share / "v").exists()


def test_a_file_changed_midway_through_a_read_is_told(dav: DavRemote, share: Path) -> None:
    """The pieces after the first are bound to the first's ETag (If-Match): a change on
    the server between them is never mixed in unnoticed, whatever size and time it keeps."""
    (share / "m").write_bytes(b"a" * (9 << 20))
    time.sleep(1.1)
    before = dav.stat(b"m")
    calls = []

    def sink(pos: int, data: bytes) -> None:
        if not calls:
            same_second_rewrite(share / "m", b"b" * (9 << 20))
        calls.append(pos)

    _got, version = dav.read_version_into(b"m", 0, 9 << 20, sink)
    assert version.version() != before.version()
    assert version.version() == dav.stat(b"m").version()
    calls.clear()  # (the rewrite kept the old mtime second: the ETag is strong again)
    with pytest.raises(RemoteError) as caught:
        dav.read_into(b"m", 0, 9 << 20, sink)
    assert caught.value.errno == errno.EIO


def test_a_full_server_disk_is_enospc(tmp_path: Path) -> None:
    from tests.fixtures.mount import tmpfs

    with tmpfs(tmp_path / "small", 1) as small:
        server = DavServer(tmp_path / "full", share=small)
        server.start()
        try:
            remote = remote_of(server)
            source = tmp_path / "big"
            source.write_bytes(b"x" * (3 << 20))
            with pytest.raises(RemoteError) as caught:
                remote.upload(b"big", str(source), 0o644, b".tmp")
            assert caught.value.errno == errno.ENOSPC
            assert not any(n != "lost+found" for n in os.listdir(small))
            remote.close()
        finally:
            server.stop()


def test_a_source_gone_is_content_damaged_for_that_upload_only(dav: DavRemote, share: Path,
                                                              tmp_path: Path) -> None:
    from cachefs.errors import ContentDamaged

    good = tmp_path / "good"
    good.write_bytes(b"fine")
    outcomes = dav.upload_many([Upload(b"a", str(tmp_path / "gone"), 0o644, b".t", None, lambda f: True),
                                Upload(b"b", str(good), 0o644, b".t", None, lambda f: True)])
    assert isinstance(outcomes[0], ContentDamaged) and isinstance(outcomes[1], RemoteStat)
    assert sorted(os.listdir(share)) == ["b"]
