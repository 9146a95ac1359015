"""The WebDAV backend (``cachefs.remote.dav``) against a real server: Apache's mod_dav on
loopback (``devtools.davserver``), started by the fixtures; then real mounts of it through
``mount.py``: reads, writes made while the server is stopped and replayed when it is back,
and a conflict that only an ETag can see (same size, same mtime second).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import http.client
import http.server
import os
import subprocess
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cachefs.address import parse_remote
from cachefs.remote import ConnectOptions, handler_for
from cachefs.remote.base import NotExpected, RemoteError, RemoteRefused, RemoteStat, RemoteUnreachable, Upload
from cachefs.remote.dav import DavRemote
from cachefs.remote.http_get import Getter, Request
from cachefs.remote.ssh_secrets import Secrets
from devtools.davserver import DavServer
from tests.fixtures.mount import Mount, status
from tests.fixtures.proxy import TcpProxy
from tests.test_writes import read_all, sync, wait_for, wait_state, write_file

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
        return Upload(path, str(source), 0o644, b"." + path + b".tmp", None, expect)  # (each its own, as the replay names them)

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


def test_a_weak_etag_is_a_condition_too_without_waiting(dav: DavRemote, share: Path,
                                                       tmp_path: Path) -> None:
    """Apache's ETag stays weak while the file's mtime is less than a second old, or in
    the future. A change after the check, same size and mtime second, is still refused
    (no fallback to If-Unmodified-Since, which a same-second change passes, nor to no
    condition), and a weak tag is not waited out."""
    source = tmp_path / "src"
    source.write_bytes(b"over it!")
    target = share / "hot"
    target.write_bytes(b"12345678")
    future = time.time_ns() + 60 * 10**9
    os.utime(target, ns=(future, future))  # (weak as long as it is in the future)
    assert dav.stat(b"hot").tag != 0

    def expect(found: RemoteStat | None) -> bool:
        same_second_rewrite(target, b"theirs!!")
        return True

    start = time.monotonic()
    [outcome] = dav.upload_many([Upload(b"hot", str(source), 0o644, b".hot.tmp", None, expect)])
    assert isinstance(outcome, NotExpected), outcome
    assert target.read_bytes() == b"theirs!!"
    assert sorted(os.listdir(share)) == ["hot"]  # (the temporary file removed)
    # and without a change in between, a weak tag is uploaded over at once
    (share / "fresh").write_bytes(b"just written")
    [outcome] = dav.upload_many([Upload(b"fresh", str(source), 0o644, b".f.tmp", None, lambda f: True)])
    assert isinstance(outcome, RemoteStat), outcome
    assert (share / "fresh").read_bytes() == b"over it!"
    assert time.monotonic() - start < 1.5  # (the old code waited 2.5 s for a strong tag)


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
    log_text = mount.log_text()  # (a -v log, every request in it)
    assert davd.password not in log_text
    assert base64.b64encode(f"{davd.user}:{davd.password}".encode()).decode() not in log_text






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


def test_a_weak_etag_read_gives_its_version_and_tells_a_change_midway(dav: DavRemote,
                                                                      share: Path) -> None:
    """The same without waiting for strong ETags: a file whose mtime is in the future
    keeps a weak one on Apache. The version read is the one the bytes are of, and a
    change between the pieces (If-Match cannot bind them to a weak tag) is told."""
    path = share / "w"
    path.write_bytes(b"a" * (9 << 20))
    future = time.time_ns() + 60 * 10**9
    os.utime(path, ns=(future, future))
    got, version = dav.read_version_into(b"w", 0, 9 << 20, lambda _p, _d: None)
    assert got == 9 << 20 and version.version() == dav.stat(b"w").version()
    calls: list[int] = []

    def sink(pos: int, data: bytes) -> None:
        if not calls:
            same_second_rewrite(path, b"b" * (9 << 20))
        calls.append(pos)

    with pytest.raises(RemoteError) as caught:
        dav.read_into(b"w", 0, 9 << 20, sink)
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


# -- the review's findings (issue 24) ---------------------------------------------------------


def after_request(monkeypatch: pytest.MonkeyPatch, remote: DavRemote, method: str,
                  action: object, before: bool = False) -> list[bytes]:
    """Run ``action(path)`` right after (or before) each ``method`` request ``remote``
    sends to the real server: another writer acting in the window between two requests.
    The paths seen are returned."""
    real = remote._request
    seen: list[bytes] = []

    def spy(m: str, path: bytes, *args: object, **kwargs: object) -> object:
        if m == method and before:
            seen.append(path)
            action(path)  # type: ignore[operator]
        response = real(m, path, *args, **kwargs)  # type: ignore[arg-type]
        if m == method and not before:
            seen.append(path)
            action(path)  # type: ignore[operator]
        return response

    monkeypatch.setattr(remote, "_request", spy)
    return seen


def test_the_version_recorded_after_an_upload_is_that_of_our_bytes(
        dav: DavRemote, share: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding 1: another writer saves right after our PUT. Whatever the outcome,
    a version we record must never be that of their bytes (the sync would take their
    change for ours: never fetched, and overwritten by our next conditional write)."""
    source = tmp_path / "src"
    source.write_bytes(b"ours")
    target = share / "doc"
    target.write_bytes(b"base")
    saves = [b"theirs, longer"]  # (once: a later try of ours is not raced again)
    after_request(monkeypatch, dav, "PUT", lambda _path: saves and target.write_bytes(saves.pop()))

    with pytest.raises(RemoteError) as caught:  # (review 2, finding 4: never retried over theirs)
        dav.upload(b"doc", str(source), 0o644, b".doc.tmp")
    assert caught.value.errno == errno.EEXIST
    assert target.read_bytes() == b"theirs, longer" and sorted(os.listdir(share)) == ["doc"]
    outcome = dav.upload(b"doc", str(source), 0o644, b".doc.tmp")  # (no save meanwhile)
    assert target.read_bytes() == b"ours"
    assert outcome.version() == dav.stat(b"doc").version() == (4, outcome.tag, 0o100000)
    assert outcome.tag != 0

    saves.append(b"theirs, longer")

    target.write_bytes(b"base")
    base = dav.stat(b"doc")
    [result] = dav.upload_many([Upload(b"doc", str(source), 0o644, b".doc.tmp", None,
                                       lambda found: found is not None and found.version() == base.version())])
    now = dav.stat(b"doc")
    if isinstance(result, RemoteStat):
        assert now.version() != result.version() or target.read_bytes() == b"ours"
    else:  # (their save, after our check, refused our write: nothing of theirs lost)
        assert isinstance(result, NotExpected), result
        assert target.read_bytes() == b"theirs, longer"
    assert sorted(os.listdir(share)) == ["doc"]

    (share / "folder").mkdir()  # (a MOVE over a folder would replace it with all it holds)
    (share / "folder" / "inside").write_bytes(b"1")
    with pytest.raises(RemoteError) as caught:
        dav.upload(b"folder", str(source), 0o644, b".folder.tmp")
    assert caught.value.errno == errno.EISDIR and (share / "folder" / "inside").exists()


def test_an_upload_costs_four_round_trips(dav: DavRemote, share: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """PROPFIND (the check), PUT to the temporary name, PROPFIND of it, MOVE: four."""
    source = tmp_path / "src"
    source.write_bytes(b"x")
    (share / "f").write_bytes(b"y")
    sent: list[str] = []
    real, encode = dav._send, Getter._encode
    monkeypatch.setattr(dav, "_send", lambda m, *a, **k: (sent.append(m), real(m, *a, **k))[1])
    monkeypatch.setattr(Getter, "_encode", lambda g, r: (sent.append(r.method), encode(g, r))[1])
    [outcome] = dav.upload_many([Upload(b"f", str(source), 0o644, b".f.tmp", None, lambda f: True)])
    assert isinstance(outcome, RemoteStat)
    assert sent == ["PROPFIND", "PUT", "PROPFIND", "MOVE"]


def test_removals_and_renames_over_are_conditional_on_the_version_seen(
        dav: DavRemote, share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding 3: a server change (same size, same second) made just before the
    DELETE or the MOVE the replay sends after its check: refused, nothing lost."""
    (share / "gone").write_bytes(b"aaaa")
    (share / "kept").write_bytes(b"aaaa")
    (share / "src").write_bytes(b"mine")
    (share / "dst").write_bytes(b"bbbb")
    seen = {name: dav.stat(name).version() for name in (b"gone", b"kept", b"dst")}

    after_request(monkeypatch, dav, "DELETE",
                  lambda path: same_second_rewrite(share / os.fsdecode(path), b"edit"), before=True)
    with pytest.raises(RemoteError) as caught:
        dav.unlink_if(b"kept", seen[b"kept"])
    assert caught.value.errno == errno.ESTALE
    assert (share / "kept").read_bytes() == b"edit"

    after_request(monkeypatch, dav, "MOVE", lambda path: same_second_rewrite(share / "dst", b"edit"),
                  before=True)
    with pytest.raises(RemoteError) as caught:
        dav.rename_over(b"src", b"dst", seen[b"dst"])
    assert caught.value.errno == errno.EEXIST
    assert (share / "dst").read_bytes() == b"edit" and (share / "src").read_bytes() == b"mine"
    monkeypatch.undo()

    dav.unlink_if(b"gone", seen[b"gone"])  # (unchanged: removed)
    assert not (share / "gone").exists()
    with pytest.raises(RemoteError) as caught:  # (nothing there now: not the version seen)
        dav.unlink_if(b"gone", seen[b"gone"])
    assert caught.value.errno == errno.ESTALE
    with pytest.raises(RemoteError) as caught:  # (a version other than the one there)
        dav.rename_over(b"src", b"dst", seen[b"dst"])
    assert caught.value.errno == errno.EEXIST
    dav.rename_over(b"src", b"dst", dav.stat(b"dst").version())
    assert (share / "dst").read_bytes() == b"mine" and not (share / "src").exists()

    # a folder that gets an entry after the emptiness check is not removed with it
    (share / "empty").mkdir()
    after_request(monkeypatch, dav, "DELETE", lambda path: (share / "empty" / "new").write_bytes(b"1"),
                  before=True)
    with pytest.raises(RemoteError) as caught:
        dav.rmdir(b"empty")
    assert caught.value.errno == errno.ENOTEMPTY
    assert (share / "empty" / "new").read_bytes() == b"1"


def test_a_write_into_a_folder_the_server_cannot_write_is_eacces(dav: DavRemote, share: Path,
                                                                 tmp_path: Path) -> None:
    """Review finding 4: Apache answers 500 to a PUT (and a MOVE) into a folder it
    cannot write: an answer, EACCES, not a server down (which loops as offline)."""
    source = tmp_path / "src"
    source.write_bytes(b"x")
    (share / "ro").mkdir()
    (share / "f").write_bytes(b"y")
    # A folder no one may write (read-only mounted on itself): the server keeps
    # CAP_DAC_OVERRIDE (devtools/davserver.py), so a mode of 0555 would not stop it.
    subprocess.run(["mount", "--bind", str(share / "ro"), str(share / "ro")], check=True, timeout=30)
    subprocess.run(["mount", "-o", "remount,ro,bind", str(share / "ro")], check=True, timeout=30)
    try:
        with pytest.raises(RemoteError) as caught:
            dav.upload(b"ro/f", str(source), 0o644, b".f.tmp")
        assert caught.value.errno == errno.EACCES
        [outcome] = dav.upload_many([Upload(b"ro/g", str(source), 0o644, b".g.tmp", None, lambda f: True)])
        assert isinstance(outcome, RemoteError) and outcome.errno == errno.EACCES
        with pytest.raises(RemoteError) as caught:
            dav.rename(b"f", b"ro/f")
        assert caught.value.errno == errno.EACCES
        assert os.listdir(share / "ro") == []
    finally:
        subprocess.run(["umount", str(share / "ro")], check=True, timeout=30)


def test_an_expired_digest_nonce_does_not_lose_the_upload(tmp_path: Path, share: Path) -> None:
    """Review finding 5: Apache refuses a stale digest nonce; httpx sends the request
    again, its body already used up: the PUT is sent once more with the source opened
    afresh."""
    server = DavServer(tmp_path / "davd", share=share, auth="digest", nonce_lifetime=1)
    server.start()
    remote = remote_of(server)
    try:
        source = tmp_path / "src"
        source.write_bytes(b"after the nonce expired" * 1000)
        remote.upload(b"one", str(source), 0o644, b".one.tmp")
        time.sleep(2.5)
        remote.upload(b"two", str(source), 0o644, b".two.tmp")
        time.sleep(2.5)
        [outcome] = remote.upload_many([Upload(b"three", str(source), 0o644, b".t.tmp", None, lambda f: True)])
        assert isinstance(outcome, RemoteStat), outcome
        for name in ("one", "two", "three"):
            assert (share / name).read_bytes() == source.read_bytes()
    finally:
        remote.close()
        server.stop()


def test_a_damaged_netrc_is_named_by_file_and_line_only(davd: DavServer, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Review finding 6: the netrc parser's message quotes the file's words, another
    host's password among them."""
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine other.example login me password correct horse battery\n")
    netrc_file.chmod(0o600)
    remote = remote_of(davd, password=None, netrc_file=str(netrc_file))
    with caplog.at_level("WARNING", logger="cachefs.remote.dav"), pytest.raises(RemoteRefused):
        remote.connect()
    remote.close()
    text = caplog.text
    assert str(netrc_file) in text and "line 1" in text
    for word in ("correct", "horse", "battery"):
        assert word not in text


def test_a_listing_without_the_folders_own_entry_is_an_error(tmp_path: Path) -> None:
    """Review finding 8: behind a proxy that strips a prefix the hrefs do not start with
    the path asked: an empty listing would be taken for an empty folder. A small server
    answering as such a proxy does."""
    body = (b'<?xml version="1.0"?><D:multistatus xmlns:D="DAV:">'
            + b"".join(b"<D:response><D:href>%s</D:href><D:propstat><D:prop><D:resourcetype>%s"
                       b"</D:resourcetype><D:getetag>\"1\"</D:getetag></D:prop>"
                       b"<D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>" % (href, kind)
                       for href, kind in ((b"/", b"<D:collection/>"), (b"/a.txt", b"")))
            + b"</D:multistatus>")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PROPFIND(self) -> None:  # noqa: N802 (http.server's naming)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(207)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    remote = DavRemote("127.0.0.1", "/dav", port=server.server_address[1], password="x", timeout=2)
    try:
        with pytest.raises(RemoteError) as caught:
            remote.listdir(b"")
        assert caught.value.errno == errno.EIO and "proxy" in str(caught.value)
        # review 2, finding 7: a stat whose answer names another path (here the root, a
        # folder) took the first entry for the file asked
        with pytest.raises(RemoteError) as caught:
            remote.stat(b"a.txt")
        assert caught.value.errno == errno.EIO and "proxy" in str(caught.value)
    finally:
        remote.close()
        server.shutdown()
        server.server_close()
        thread.join()


def test_only_apaches_own_temporary_names_are_hidden(dav: DavRemote, share: Path) -> None:
    """Apache's mod_dav_fs itself leaves out of its listings every name that begins with
    ``.davfs.tmp`` (measured: a user's such files are not listed, but can be read by
    name); the client hides only the exact pattern of its temporary files, so that
    behind another server a user's ``.davfs.tmp-notes`` is listed."""
    for name in (".davfs.tmpAb12Cd", ".davfs.tmp-notes"):
        (share / name).write_bytes(b"x")
    assert dav.listdir(b"") == []
    assert dav.read(b".davfs.tmp-notes", 0, 10) == b"x"
    from cachefs.remote.dav import SERVER_TEMP_NAME
    assert SERVER_TEMP_NAME.match(b".davfs.tmpAb12Cd")
    for name in (b".davfs.tmp-notes", b".davfs.tmp", b".davfs.tmpAb12Cd.txt", b".davfs.tmpAb1"):
        assert not SERVER_TEMP_NAME.match(name), name


def test_close_during_reads_is_unreachable_not_a_crash(dav: DavRemote, share: Path) -> None:
    """Review finding 9: ``close`` while a read's pieces are queued (a mount going away)."""
    (share / "big").write_bytes(os.urandom(40 << 20))
    escaped: list[str] = []
    for i in range(40):
        errors: list[BaseException] = []

        def read() -> None:
            try:
                dav.read(b"big", 0, 40 << 20)
            except BaseException as exc:  # (what escapes is what is tested)
                errors.append(exc)

        thread = threading.Thread(target=read)
        thread.start()
        time.sleep(0.005 * (i % 10))
        dav.close()
        thread.join(10)
        assert not thread.is_alive()
        escaped += [repr(exc) for exc in errors if not isinstance(exc, RemoteUnreachable)]
    assert escaped == []
    assert dav.read(b"big", 0, 3) == (share / "big").read_bytes()[:3]  # (usable again)


def test_read_many_is_pipelined_on_one_connection_through_ended_connections(
        tmp_path: Path, share: Path) -> None:
    """read_many sends its GETs on one connection without waiting for each answer
    (``http_get.Getter.get_many``); Apache ending each connection after 7 requests (its
    ``MaxKeepAliveRequests``: 100 by default) costs new connections, never an answer: every
    file's bytes and version in order, a missing one ENOENT in its place."""
    files = {b"d/f%02d" % i: os.urandom(100 + i) for i in range(40)}
    (share / "d").mkdir()
    for name, data in files.items():
        (share / os.fsdecode(name)).write_bytes(data)
    for limit, most in ((0, 41), (7, 7)):
        server = DavServer(tmp_path / f"davd-{limit}", share=share, keepalive_requests=limit)
        server.start()
        proxy = TcpProxy(server.host, server.port)
        remote = remote_of(server, port=proxy.port, connections=1)  # (one pipeline)
        try:
            remote.connect()
            before = proxy.accepted_connections
            items = [(name, len(data)) for name, data in files.items()]
            items.insert(20, (b"d/gone", 5))
            got = remote.read_many(items)
            made = proxy.accepted_connections - before
            assert isinstance(got[20], RemoteError) and got[20].errno == errno.ENOENT
            del got[20]
            for (name, data), answer in zip(files.items(), got):
                assert not isinstance(answer, RemoteError)
                assert answer[0] == data and answer[1] == remote.stat(name)
            # 41 GETs: on one connection where Apache lets it serve them all, else one per 7
            assert made <= -(-41 // most), made
        finally:
            remote.close()
            proxy.close()
            server.stop()


def test_a_kept_connection_the_server_ended_is_not_an_error(tmp_path: Path, share: Path) -> None:
    """Connections kept for the next GET that the server ended while idle (its keep-alive
    timeout, a restart) are dropped, not failed on: reads right after go through."""
    (share / "f").write_bytes(b"abc")
    server = DavServer(tmp_path / "davd", share=share, keepalive_timeout=1)
    server.start()
    remote = remote_of(server)
    try:
        for pause in ("timeout", "restart"):
            assert remote.read(b"f", 0, 3) == b"abc"
            assert [a[0] for a in remote.read_many([(b"f", 3), (b"f", 3)])] == [b"abc", b"abc"]  # type: ignore[index]
            if pause == "timeout":
                time.sleep(2)  # (Apache ends idle connections after 1 s)
            else:
                server.stop()
                server.start()
            assert remote.read(b"f", 1, 2) == b"bc"
            assert [a[0] for a in remote.read_many([(b"f", 3), (b"f", 3)])] == [b"abc", b"abc"]  # type: ignore[index]
    finally:
        remote.close()
        server.stop()


class Cut(bytes):
    """Bytes ``RawHttp`` sends, then closes the connection."""


class RawHttp:
    """A small HTTP/1.1 server on 127.0.0.1 for what Apache will not do: every request head
    of a connection goes to ``answer(connection_number, request_number, path)``, whose bytes
    are sent back (None: nothing, the connection held open; b"": the connection closed;
    ``Cut``: sent, then the connection closed)."""

    def __init__(self, answer: Callable[[int, int, str], bytes | None], drop_pipelined: bool = False) -> None:
        """``drop_pipelined``: requests that came behind the one being answered are lost."""
        self._answer = answer
        self._drop_pipelined = drop_pipelined
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.connections = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                continue
            self.connections += 1
            self._held.append(sock)
            threading.Thread(target=self._serve, args=(sock, self.connections), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        buf, served = b"", 0
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                if self._drop_pipelined:
                    buf = b""
                served += 1
                reply = self._answer(number, served, head.split(b" ")[1].decode())
                if reply is None:
                    self._stop.wait()
                    return
                if not reply:
                    sock.close()
                    return
                sock.sendall(reply)
                if isinstance(reply, Cut):
                    sock.close()
                    return
        except OSError:
            return

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for sock in self._held:
            sock.close()


def http_answer(body: bytes, status: str = "206 Partial Content", length: int | None = None,
                extra: str = "") -> bytes:
    """An answer with ``body`` (``length``: the Content-Length claimed, the body's own by default)."""
    return (f"HTTP/1.1 {status}\r\nContent-Length: {len(body) if length is None else length}\r\n"
            f"Content-Range: bytes 0-{len(body) - 1}/{len(body)}\r\nETag: \"e\"\r\n{extra}\r\n").encode() + body


def getter_of(server: RawHttp, timeout: float = 1.0) -> Getter:
    return Getter("127.0.0.1", server.port, None, timeout, keep=4)


def request_of(path: str, length: int = 4096) -> Request:
    return Request(path, {"Range": f"bytes=0-{length - 1}"}, 0, length)


def test_a_body_cut_midway_is_an_error_not_a_short_file() -> None:
    """A connection that ends before the Content-Length promised (a Wi-Fi drop, a server
    restart): the read fails as a broken link (the mount goes offline), it never gives
    the bytes that came as the whole file."""
    server = RawHttp(lambda _c, _r, _path: Cut(http_answer(b"x" * 100_000)[:30_000]))
    getter = getter_of(server)
    try:
        with pytest.raises(http.client.IncompleteRead):
            getter.get(request_of("/f", 100_000))
        answers = getter.get_many([request_of("/a", 100_000), request_of("/b", 100_000)])
        assert all(isinstance(a, http.client.IncompleteRead) for a in answers), answers
    finally:
        getter.close()
        server.close()


def test_interim_answers_are_passed_over_and_answers_stay_with_their_requests() -> None:
    """A 102 Processing or 103 Early Hints before each answer (WebDAV servers may send
    them): each file gets its own bytes, pipelined or not, and the connection is reused."""
    bodies = {f"/f{i}": os.urandom(50 + i) for i in range(12)}
    server = RawHttp(lambda _c, _r, path: b"HTTP/1.1 102 Processing\r\n\r\n"
                     b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + http_answer(bodies[path]))
    getter = getter_of(server)
    try:
        answers = getter.get_many([request_of(path) for path in bodies])
        assert [a.body for a in answers] == list(bodies.values())  # type: ignore[union-attr]
        assert getter.get(request_of("/f3")).body == bodies["/f3"]
        assert server.connections == 1
    finally:
        getter.close()
        server.close()


def test_a_connection_ended_before_answering_is_tried_again_on_a_new_one() -> None:
    """A kept connection the server ends when the next request comes, unanswered (as a
    server does whose keep-alive ran out as the request crossed): sent again on a new
    connection, no error."""
    server = RawHttp(lambda _c, request, path: http_answer(path.encode()) if request == 1 else b"")
    getter = getter_of(server)
    try:
        for path in ("/a", "/b", "/c"):
            assert getter.get(request_of(path)).body == path.encode()
        assert server.connections == 3
    finally:
        getter.close()
        server.close()


def test_a_server_that_leaves_pipelined_requests_unanswered_gets_one_at_a_time() -> None:
    """A server (or a box on the way) that loses the requests sent behind the one it is
    answering: one timeout, the rest answered one at a time, and no more pipelining from
    then on (each answer with its own request's bytes)."""
    server = RawHttp(lambda _c, _r, path: http_answer(path.encode()), drop_pipelined=True)
    getter = getter_of(server, timeout=1.0)
    try:
        start = time.monotonic()
        answers = getter.get_many([request_of(f"/f{i}") for i in range(6)])
        assert time.monotonic() - start < 2.5
        assert [a.body for a in answers] == [f"/f{i}".encode() for i in range(6)]  # type: ignore[union-attr]
        assert getter.window == 1
        start = time.monotonic()
        answers = getter.get_many([request_of(f"/g{i}") for i in range(6)])
        assert time.monotonic() - start < 0.5
        assert [a.body for a in answers] == [f"/g{i}".encode() for i in range(6)]  # type: ignore[union-attr]
    finally:
        getter.close()
        server.close()


def timed_read_many(remote: DavRemote, items: list[tuple[bytes, int]]) -> tuple[list[bytes], float]:
    """``remote.read_many(items)``: the bytes of each (none may fail) and the seconds it took."""
    start = time.monotonic()
    got = remote.read_many(items)
    took = time.monotonic() - start
    assert not any(isinstance(answer, RemoteError) for answer in got), got
    return [bytes(answer[0]) for answer in got], took  # type: ignore[index]


def test_gets_are_pipelined_on_a_distant_server(davd: DavServer, share: Path) -> None:
    """40 small files through a 100 ms link: pipelined, a few round trips for them all
    (one after another they would take 40)."""
    from devtools.wanrelay import WanRelay

    for i in range(40):
        (share / f"f{i}").write_bytes(b"%d" % i)
    with WanRelay(target=(davd.host, davd.port), rtt_ms=100, rate_bit=100e6) as relay:
        remote = remote_of(davd, port=relay.port, timeout=5.0)
        try:
            remote.connect()
            remote.read(b"f0", 0, 1)  # (the connection made)
            got, took = timed_read_many(remote, [(b"f%d" % i, len(b"%d" % i)) for i in range(40)])
            assert got == [b"%d" % i for i in range(40)]
            assert took < 1.0, f"{took:.2f} s: 10 round trips or more"
        finally:
            remote.close()


def test_many_files_from_a_server_slow_to_answer_each_go_on_several_connections() -> None:
    """A server that takes 0.2 s over each answer (PHP behind the web server): 32 small
    files in one read_many are pipelined on --connections connections side by side, not
    one pipeline of 32 (6.4 s, past the bound on a call with a short timeout)."""
    root = (b'<?xml version="1.0"?><D:multistatus xmlns:D="DAV:"><D:response><D:href>/</D:href>'
            b"<D:propstat><D:prop><D:resourcetype><D:collection/></D:resourcetype></D:prop>"
            b"<D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response></D:multistatus>")

    def answer(_connection: int, _request: int, path: str) -> bytes:
        if path == "/":
            return (f"HTTP/1.1 207 Multi-Status\r\nContent-Length: {len(root)}\r\n\r\n").encode() + root
        time.sleep(0.2)
        return http_answer(path.encode())

    server = RawHttp(answer)
    remote = DavRemote("127.0.0.1", "/", port=server.port, password="x", timeout=2.0, connections=4)
    try:
        remote.connect()
        got, took = timed_read_many(remote, [(b"f%d" % i, len(b"/f%d" % i)) for i in range(32)])
        assert got == [b"/f%d" % i for i in range(32)]
        assert took < 4.5, f"{took:.1f} s: one pipeline (6.4 s), not four side by side (1.6 s)"
    finally:
        remote.close()
        server.close()


def test_listings_do_not_wait_behind_uploads_and_large_reads(davd: DavServer, share: Path) -> None:
    """Review: the pipelines of a listing went to the pool that uploads and the pieces of
    large reads use, and waited behind them against the bound on a listing. Here the
    pool's workers are held 3 s (as by uploads on a slow link): 16 folders are listed in
    well under that."""
    for i in range(16):
        (share / f"d{i}").mkdir()
        (share / f"d{i}" / "f").write_bytes(b"x")
    remote = remote_of(davd, connections=2)
    try:
        remote.connect()
        held = [remote._threads().submit(time.sleep, 3) for _ in range(2)]  # (the pool's 2 workers)
        start = time.monotonic()
        listings = remote.listdir_many([b"d%d" % i for i in range(16)])
        took = time.monotonic() - start
        assert all(not isinstance(one, RemoteError) and [n for n, _ in one] == [b"f"] for one in listings)
        assert took < 1.5, f"the listing waited {took:.1f} s behind the pool"
        for future in held:
            future.result()
    finally:
        remote.close()


def test_read_many_with_the_server_gone_is_unreachable(davd: DavServer, dav: DavRemote, share: Path) -> None:
    """The server gone between two reads: read_many, like read, says the link is down
    (the mount goes offline), never a bare socket error."""
    (share / "f").write_bytes(b"x")
    dav.read_many([(b"f", 1), (b"f", 1)])
    davd.stop()
    with pytest.raises(RemoteUnreachable):
        dav.read_many([(b"f", 1), (b"f", 1)])
    with pytest.raises(RemoteUnreachable):
        dav.read(b"f", 0, 1)


def test_read_many_reads_the_size_given_and_a_server_ignoring_ranges_is_cut_short(
        tmp_path: Path, share: Path) -> None:
    """Review finding 10: read_many asks the size it was given (a file grown since: that
    much, its whole size in the attributes); a server that ignores Range headers sends the
    whole file, of which only what is asked is read."""
    data = os.urandom(64 << 20)
    (share / "big").write_bytes(data)
    (share / "small").write_bytes(b"12345")
    (share / "empty").write_bytes(b"")
    for ranges in (True, False):
        server = DavServer(tmp_path / f"davd-{ranges}", share=share, ranges=ranges)
        server.start()
        remote = remote_of(server)
        try:
            got = remote.read_many([(b"big", 10), (b"small", 5), (b"empty", 0)])
            assert not isinstance(got[0], RemoteError) and got[0][0] == data[:10]
            assert got[0][1].size == 64 << 20
            assert got[1] == (b"12345", remote.stat(b"small"))
            assert not isinstance(got[2], RemoteError) and got[2][0] == b"" and got[2][1].size == 0
            start = time.monotonic()
            for i in range(20):  # (20 whole 64 MiB files would take seconds)
                assert remote.read(b"big", i << 20, 100) == data[i << 20:(i << 20) + 100]
            if not ranges:
                assert time.monotonic() - start < 3
        finally:
            remote.close()
            server.stop()


def test_a_stopped_server_keeps_the_mount_offline_and_the_log_quiet(davd: DavServer, share: Path,
                                                                     tmp_path: Path) -> None:
    """Review finding 2: once logged in, ``connect`` (the reconnect probe) must reach the
    server, or the mount says "back" at once, fails, and loops (8,140 cycles in 12 s)."""
    (share / "a.txt").write_bytes(b"x")
    with dav_mount(davd, tmp_path) as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        davd.stop()
        wait_state(mnt, "offline")
        time.sleep(1)

        def not_ours() -> list[str]:  # (the lines not about our own reads of the status)
            return [line for line in mount.log_text().splitlines() if " cachefs.fs: " not in line]

        lines_before = len(not_ours())
        states = set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            states.add(status(mnt)["state"])
            time.sleep(0.05)
        grown = not_ours()[lines_before:]
        assert states == {"offline"}, states
        assert len(grown) < 20, "\n".join(grown[-40:])
        davd.start()
        wait_state(mnt, "online")


def test_conditions_hold_for_awkward_names(dav: DavRemote, share: Path, tmp_path: Path) -> None:
    """The ``If`` header names the resource it tests by URL: one Apache did not take for
    the resource asked would not be evaluated at all (the request then unconditional).
    Each name's condition is seen failing: a change after the check, none removed."""
    source = tmp_path / "src"
    source.write_bytes(b"mine")
    names = [b"caf\xc3\xa9", b"lat\xe9", b"sp ace", b"q?x", b"h#x", b"pc%41", b"semi;colon",
             b"+plus&amp", b"a<b>c", b"br(ack)et", b"sq[u]are"]
    for name in names:
        path = os.path.join(os.fsencode(share), name)
        with open(path, "wb") as f:
            f.write(b"aaaa")
        seen = dav.stat(name).version()  # (its ETag kept: unlink_if sends no PROPFIND)
        same_second_rewrite(Path(os.fsdecode(path)), b"bbbb")
        with pytest.raises(RemoteError) as caught:
            dav.unlink_if(name, seen)
        assert caught.value.errno == errno.ESTALE, name

        def expect(_found: RemoteStat | None, path: bytes = path) -> bool:
            same_second_rewrite(Path(os.fsdecode(path)), b"cccc")
            return True

        [outcome] = dav.upload_many([Upload(name, str(source), 0o644, b".t.tmp", None, expect)])
        assert isinstance(outcome, NotExpected), (name, outcome)
        with open(path, "rb") as f:
            assert f.read() == b"cccc", name


def test_an_upload_longer_than_the_timeout_on_a_slow_link_completes(davd: DavServer,
                                                                   tmp_path: Path) -> None:
    """3 MiB through a 1 MB/s link with a 2 s timeout: the body is handed over to socket
    buffers at once and its answer comes 3 s later; the wait for it allows for the bytes
    still on their way (before: 'no answer within 2 s', each try, the mount offline)."""
    from tests.fixtures.proxy import TcpProxy
    proxy = TcpProxy(davd.host, davd.port)
    remote = DavRemote("127.0.0.1", "/", port=proxy.port, user=davd.user, password=davd.password,
                       timeout=2.0)
    try:
        remote.connect()
        source = tmp_path / "src"
        source.write_bytes(os.urandom(3 << 20))
        proxy.throttle(1_000_000)
        start = time.monotonic()
        [outcome] = remote.upload_many([Upload(b"slow", str(source), 0o644, b".s.tmp", None, lambda f: True)])
        assert isinstance(outcome, RemoteStat), outcome
        assert time.monotonic() - start > 2  # (the link was slow)
        assert (davd.share / "slow").read_bytes() == source.read_bytes()
    finally:
        remote.close()
        proxy.close()


class Relay:
    """A small HTTP reverse proxy in front of the test's Apache, on another port (as nginx,
    Caddy or PHP-FPM's front are): it forwards each request and its answer. ``chunked``:
    what it does with a chunked request body ("keep", or "drop": PHP-FPM behind Nextcloud
    receives it as empty, nextcloud/server#7995); ``drop_puts``: every PUT's body replaced
    by nothing (a body lost on the way); ``fix_destination``: a MOVE's Destination
    rewritten to the server's own origin (Apache's documented ``RequestHeader edit
    Destination``; without it Apache refuses a Destination naming another scheme or port
    with 502)."""

    HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
           "proxy-connection", "content-length", "host"}

    def __init__(self, server: DavServer, chunked: str = "keep", drop_puts: bool = False,
                 fix_destination: bool = True, tls: Path | None = None,
                 put_etag: bool = False, fail: object = None) -> None:
        """``tls``: a folder for a self-signed certificate (``cert``): the relay then
        speaks https to its clients, http to the server (a TLS-terminating proxy).
        ``put_etag``: a PUT's answer gets the new file's ETag as Nextcloud's and ownCloud's
        do (Apache's do not): the real one, from a PROPFIND the relay sends right after
        (no other writer in these tests in between). ``fail(method, path, headers)``: True
        answers 500 Internal Server Error itself, the server not asked (a passing fault of
        a server's script)."""
        import html
        import re
        import httpx
        import ssl
        import subprocess
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.answers: list[tuple[str, int, dict[str, str]]] = []
        upstream = f"http://{server.host}:{server.port}"
        client = httpx.Client(timeout=30)
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline().strip():
                                pass
                            break
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(parts) if chunked == "keep" else b""
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _any(self) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in Relay.HOP}
                relay.requests.append((self.command, dict(self.headers.items())))
                body = self._body()
                if fail is not None and fail(self.command, self.path, headers):  # type: ignore[operator]
                    relay.answers.append((self.command, 500, {}))
                    self.send_response(500, "Internal Server Error")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.command == "PUT" and drop_puts:
                    body = b""
                if fix_destination and "Destination" in headers:
                    split = headers["Destination"].split("/", 3)
                    headers["Destination"] = upstream + "/" + (split[3] if len(split) > 3 else "")
                answer = client.request(self.command, upstream + self.path, headers=headers,
                                        content=body)
                extra = {}
                if put_etag and self.command == "PUT" and answer.status_code in (200, 201, 204):
                    found = client.request("PROPFIND", upstream + self.path, headers={
                        "Depth": "0", "Authorization": headers.get("Authorization", "")})
                    match = re.search(rb"getetag>([^<]+)<", found.content)
                    assert match, found.content
                    extra["ETag"] = html.unescape(match.group(1).decode())
                relay.answers.append((self.command, answer.status_code, extra))
                self.send_response(answer.status_code, answer.reason_phrase)
                for key, value in [*answer.headers.multi_items(), *extra.items()]:
                    if key.lower() not in Relay.HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer.content)

            do_GET = do_PUT = do_PROPFIND = do_MOVE = do_DELETE = do_MKCOL = _any  # noqa: N815
            do_PROPPATCH = do_HEAD = _any  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self._client = client
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        if tls is not None:
            self.cert, key = tls / "relay-cert.pem", tls / "relay-key.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                            "-keyout", str(key), "-out", str(self.cert)],
                           check=True, stdin=subprocess.DEVNULL, capture_output=True)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.cert, key)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._client.close()


def checked_source(tmp_path: Path, data: bytes) -> tuple[object, int]:
    """What the sync uploads: a content file read through its checksum check
    (``cachefs.cache.transfer._Checked``, no file descriptor of its own); and the fd."""
    import hashlib
    from functools import partial
    from cachefs.cache.transfer import _checked_reader
    from cachefs.store.crypto import PlainContent
    path = tmp_path / f"content-{len(data)}"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    return partial(_checked_reader, PlainContent(), fd, len(data), hashlib.sha256(data).digest(),
                   "content"), fd


def test_the_syncs_uploads_tell_their_size(davd: DavServer, share: Path, tmp_path: Path) -> None:
    """Review 2, finding 2: the sync's source (a checked reader, no fileno) went chunked:
    Nextcloud behind PHP-FPM stores a chunked PUT as an empty file, which was then
    recorded as our version. A relay that drops chunked bodies as PHP-FPM does: the bytes
    arrive whole, sent with their Content-Length."""
    relay = Relay(davd, chunked="drop")
    remote = DavRemote("127.0.0.1", "/", port=relay.port, user=davd.user, password=davd.password,
                       timeout=TIMEOUT)
    (share / "f").write_bytes(b"old")
    source, fd = checked_source(tmp_path, b"hello world\n")
    try:
        [outcome] = remote.upload_many([Upload(b"f", source, 0o644, b".f.tmp",  # type: ignore[arg-type]
                                               None, lambda found: True)])
        assert isinstance(outcome, RemoteStat), outcome
        assert (share / "f").read_bytes() == b"hello world\n"
        assert outcome.size == 12
        puts = [headers for method, headers in relay.requests if method == "PUT"]
        assert puts and all(h.get("Content-Length") == "12" for h in puts), puts
    finally:
        os.close(fd)
        remote.close()
        relay.close()


def test_a_body_lost_on_the_way_is_never_moved_over_the_file(davd: DavServer, share: Path,
                                                             tmp_path: Path) -> None:
    """Review 2, finding 2: the temporary file's size is checked against the bytes sent
    before the MOVE; an empty one (the body dropped on the way) is removed, an error told,
    the file on the server kept (before: the empty file replaced it, recorded as ours)."""
    relay = Relay(davd, drop_puts=True)
    remote = DavRemote("127.0.0.1", "/", port=relay.port, user=davd.user, password=davd.password,
                       timeout=TIMEOUT)
    (share / "f").write_bytes(b"old")
    source = tmp_path / "src"
    source.write_bytes(b"hello world\n")
    try:
        [outcome] = remote.upload_many([Upload(b"f", str(source), 0o644, b".f.tmp", None,
                                               lambda found: True)])
        assert isinstance(outcome, RemoteError) and outcome.errno == errno.EIO, outcome
        assert "kept 0 of the 12 bytes" in str(outcome)
        assert (share / "f").read_bytes() == b"old"
        assert sorted(os.listdir(share)) == ["f"]
        with pytest.raises(RemoteError):
            remote.upload(b"g", str(source), 0o644, b".g.tmp")
        assert sorted(os.listdir(share)) == ["f"]
    finally:
        remote.close()
        relay.close()


def test_a_small_upload_over_a_stalled_link_gives_up_within_its_timeout(
        davd: DavServer, tmp_path: Path) -> None:
    """Review 2, finding 2: a 12-byte upload of the sync's over a link stalled mid-PUT,
    --timeout 2: its size known, the wait for its answer is the timeout, not 2 + 8 MiB
    at 256 kB/s (34.8 s measured before)."""
    from tests.fixtures.proxy import TcpProxy
    proxy = TcpProxy(davd.host, davd.port)
    remote = DavRemote("127.0.0.1", "/", port=proxy.port, user=davd.user, password=davd.password,
                       timeout=2.0)
    source, fd = checked_source(tmp_path, b"hello world\n")
    try:
        remote.connect()
        real = remote._send

        def stall_at_put(method: str, *args: object, **kwargs: object) -> object:
            if method == "PUT":
                proxy.stall()
            return real(method, *args, **kwargs)  # type: ignore[arg-type]

        remote._send = stall_at_put  # type: ignore[method-assign,assignment]
        start = time.monotonic()
        with pytest.raises(RemoteUnreachable) as caught:
            remote.upload_many([Upload(b"f", source, 0o644, b".f.tmp",  # type: ignore[arg-type]
                                       None, lambda found: True)])
        assert time.monotonic() - start < 8
        assert "no answer within 2" in str(caught.value)
    finally:
        os.close(fd)
        remote.close()
        proxy.close()


def test_plain_unlink_and_rename_never_act_on_a_change_they_did_not_see(
        dav: DavRemote, share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review 2, finding 4: after a 412 (a change between their check and their request)
    unlink() deleted a same-second edit and rename() overwrote a target rewritten just
    before the MOVE (they checked again and acted on what was there then). Now: ESTALE /
    EEXIST, nothing removed or overwritten; the sync still calls them."""
    (share / "u").write_bytes(b"aaaa")
    (share / "src").write_bytes(b"mine")
    (share / "dst").write_bytes(b"bbbb")
    edits = [b"edit"]
    after_request(monkeypatch, dav, "DELETE",
                  lambda path: edits and same_second_rewrite(share / "u", edits.pop()), before=True)
    with pytest.raises(RemoteError) as caught:
        dav.unlink(b"u")
    assert caught.value.errno == errno.ESTALE
    assert (share / "u").read_bytes() == b"edit"
    monkeypatch.undo()

    edits.append(b"edit")
    after_request(monkeypatch, dav, "MOVE",
                  lambda path: edits and same_second_rewrite(share / "dst", edits.pop()), before=True)
    with pytest.raises(RemoteError) as caught:
        dav.rename(b"src", b"dst")
    assert caught.value.errno == errno.EEXIST
    assert (share / "dst").read_bytes() == b"edit" and (share / "src").read_bytes() == b"mine"
    monkeypatch.undo()

    # nothing at the target when checked, a file saved there before the MOVE: kept
    made = [b"new one"]
    after_request(monkeypatch, dav, "MOVE",
                  lambda path: made and (share / "fresh").write_bytes(made.pop()), before=True)
    with pytest.raises(RemoteError) as caught:
        dav.rename(b"src", b"fresh")
    assert caught.value.errno == errno.EEXIST
    assert (share / "fresh").read_bytes() == b"new one" and (share / "src").read_bytes() == b"mine"
    monkeypatch.undo()

    dav.unlink(b"u")  # (unchanged since its check: removed, renamed)
    dav.rename(b"src", b"dst")
    assert sorted(os.listdir(share)) == ["dst", "fresh"] and (share / "dst").read_bytes() == b"mine"


def test_a_tls_proxy_that_apache_refuses_moves_behind_is_a_clear_error(
        davd: DavServer, share: Path, tmp_path: Path) -> None:
    """Review 2, finding 1: behind a TLS-terminating proxy (https outside, http inside)
    Apache refuses a MOVE whose Destination is https: 502 "Destination URI refers to
    different scheme". Taken for an outage, the mount went offline, came back, met it
    again: nothing ever landed. Now an error naming the fix, the mount online, the
    temporary file removed, the server's file kept. Through a real https relay."""
    relay = Relay(davd, fix_destination=False, tls=tmp_path)
    remote = DavRemote("127.0.0.1", "/", scheme="davs", port=relay.port, user=davd.user,
                       password=davd.password, timeout=TIMEOUT, verify=str(relay.cert))
    (share / "f").write_bytes(b"old")
    source = tmp_path / "src"
    source.write_bytes(b"new")
    try:
        [outcome] = remote.upload_many([Upload(b"f", str(source), 0o644, b".f.tmp", None,
                                               lambda found: True)])
        assert isinstance(outcome, RemoteError), outcome  # (an outage would raise RemoteUnreachable)
        text = str(outcome)
        assert "RequestHeader edit Destination ^https: http: early" in text and "\n" not in text
        assert (share / "f").read_bytes() == b"old" and sorted(os.listdir(share)) == ["f"]
        with pytest.raises(RemoteError, match="RequestHeader"):
            remote.rename(b"f", b"g")
        assert (share / "f").exists()
        (tmp_path / "fixed").mkdir()
        fixed = Relay(davd, fix_destination=True, tls=tmp_path / "fixed")
        healed = DavRemote("127.0.0.1", "/", scheme="davs", port=fixed.port, user=davd.user,
                           password=davd.password, timeout=TIMEOUT, verify=str(fixed.cert))
        try:  # (with the header edited, as the error says: it lands)
            healed.rename(b"f", b"g")
            assert (share / "g").read_bytes() == b"old"
        finally:
            healed.close()
            fixed.close()
    finally:
        remote.close()
        relay.close()


@pytest.mark.parametrize("path", ["/sub//inner", "/sub/./inner", "/sub/x/../inner", "//sub/inner/"])
def test_an_address_with_empty_or_dot_segments_keeps_its_conditions(
        davd: DavServer, share: Path, path: str) -> None:
    """Review 2, finding 5: Apache evaluates an ``If`` header only for the resource its
    URL maps to, and ignores it otherwise (the request then unconditional): with the share
    path as written in the address ('//' or '.' inside), a DELETE conditional on a stale
    ETag removed the file. The share path is normalised when the remote is made."""
    (share / "sub" / "inner").mkdir(parents=True)
    (share / "sub" / "inner" / "kept").write_bytes(b"aaaa")
    remote = remote_of(davd, path)
    try:
        seen = remote.stat(b"kept").version()
        same_second_rewrite(share / "sub" / "inner" / "kept", b"bbbb")
        with pytest.raises(RemoteError) as caught:
            remote.unlink_if(b"kept", seen)
        assert caught.value.errno == errno.ESTALE
        assert (share / "sub" / "inner" / "kept").read_bytes() == b"bbbb"
        assert remote.description.endswith(":%d/sub/inner" % davd.port), remote.description
    finally:
        remote.close()


def test_a_server_whose_put_answers_give_the_etag_is_written_in_place(
        davd: DavServer, share: Path, tmp_path: Path) -> None:
    """Review 2, finding 6: on Nextcloud and ownCloud a MOVE over a file replaces it by
    another (new file id: its shares, versions, comments lost on every edit). Their PUT
    answers give the new ETag: once the first (temporary) PUT's answer has shown one,
    uploads are a PUT in place, conditional on the version seen (``If``; nothing there:
    ``If-None-Match: *``), the version recorded that of the answer. Emulated by a relay
    that adds Apache's real ETag to its PUT answers; a server without them (Apache
    itself) keeps temporary names and MOVEs (test_an_upload_costs_four_round_trips)."""
    relay = Relay(davd, put_etag=True)
    remote = DavRemote("127.0.0.1", "/", port=relay.port, user=davd.user, password=davd.password,
                       timeout=TIMEOUT)
    source = tmp_path / "src"
    source.write_bytes(b"mine")
    (share / "f").write_bytes(b"old")
    try:
        [first] = remote.upload_many([Upload(b"f", str(source), 0o644, b".f.tmp", None, lambda f: True)])
        assert isinstance(first, RemoteStat) and (share / "f").read_bytes() == b"mine"
        assert [m for m, _h in relay.requests][-4:] == ["PROPFIND", "PUT", "PROPFIND", "MOVE"]

        del relay.requests[:]
        [first_etag] = [extra["ETag"] for m, _c, extra in relay.answers if m == "PUT"]
        source.write_bytes(b"mine, again")
        [second] = remote.upload_many([Upload(b"f", str(source), 0o644, b".f.tmp", None,
                                              lambda f: f is not None and f.version() == first.version())])
        assert isinstance(second, RemoteStat), second
        assert [m for m, _h in relay.requests] == ["PROPFIND", "PUT"]
        assert relay.requests[1][1]["If"].endswith(f"/f> ([{first_etag}])")
        assert (share / "f").read_bytes() == b"mine, again"
        assert second.version() == remote.stat(b"f").version()  # (the answer's ETag: the real one)
        assert sorted(os.listdir(share)) == ["f"]

        # a change after the check (same size, same second): refused, theirs kept
        seen = remote.stat(b"f").version()

        def changed_meanwhile(found: RemoteStat | None) -> bool:
            same_second_rewrite(share / "f", b"THEIRS SAME")
            return found is not None and found.version() == seen

        [third] = remote.upload_many([Upload(b"f", str(source), 0o644, b".f.tmp", None, changed_meanwhile)])
        assert isinstance(third, NotExpected) and third.found is not None, third
        assert (share / "f").read_bytes() == b"THEIRS SAME"

        # a new file: in place too, refused where one appeared after the check
        [fourth] = remote.upload_many([Upload(b"g", str(source), 0o644, b".g.tmp", None,
                                              lambda f: f is None)])
        assert isinstance(fourth, RemoteStat) and fourth.version() == remote.stat(b"g").version()

        def appeared(found: RemoteStat | None) -> bool:
            (share / "h").write_bytes(b"someone else's")
            return found is None

        [fifth] = remote.upload_many([Upload(b"h", str(source), 0o644, b".h.tmp", None, appeared)])
        assert isinstance(fifth, NotExpected), fifth
        assert (share / "h").read_bytes() == b"someone else's"
        assert sorted(os.listdir(share)) == ["f", "g", "h"]
    finally:
        remote.close()
        relay.close()


def test_a_passing_500_to_a_write_is_tried_again_later_once(davd: DavServer, share: Path,
                                                           tmp_path: Path) -> None:
    """Review 2, finding 7: a 500 to a PUT or a MOVE was EACCES (refused for good) since
    Apache answers 500 to a write into a folder it cannot write. Now the folder is tried
    with a new empty file (removed): it takes one, so the 500 was a passing fault, the
    server unreachable for now (tried again later); a second 500 in a row for the same
    path is an error (EIO), not an endless offline/online loop. A read-only folder stays
    EACCES (test_a_write_into_a_folder_the_server_cannot_write_is_eacces)."""
    failed: list[str] = []

    def fail(method: str, path: str, headers: dict[str, str]) -> bool:
        if method == "PUT" and path == "/.f.tmp" and "/.f.tmp" not in failed:
            failed.append(path)  # (once)
            return True
        return method == "MOVE" and headers.get("Destination", "").endswith("/stuck")

    relay = Relay(davd, fail=fail)
    remote = DavRemote("127.0.0.1", "/", port=relay.port, user=davd.user, password=davd.password,
                       timeout=TIMEOUT)
    source = tmp_path / "src"
    source.write_bytes(b"new")
    (share / "f").write_bytes(b"old")
    (share / "stuck").write_bytes(b"old")
    try:
        upload = Upload(b"f", str(source), 0o644, b".f.tmp", None, lambda found: True)
        with pytest.raises(RemoteUnreachable, match="500"):
            remote.upload_many([upload])
        assert (share / "f").read_bytes() == b"old"
        [outcome] = remote.upload_many([upload])  # (later: it lands)
        assert isinstance(outcome, RemoteStat) and (share / "f").read_bytes() == b"new"

        stuck = Upload(b"stuck", str(source), 0o644, b".stuck.tmp", None, lambda found: True)
        with pytest.raises(RemoteUnreachable, match="500"):
            remote.upload_many([stuck])
        [outcome] = remote.upload_many([stuck])
        assert isinstance(outcome, RemoteError) and outcome.errno == errno.EIO, outcome
        assert "twice" in str(outcome)
        assert (share / "stuck").read_bytes() == b"old"
        assert sorted(os.listdir(share)) == ["f", "stuck"]  # (no temporary file, no probe left)
    finally:
        remote.close()
        relay.close()


class SlowUplink:
    """A TCP relay to the test's Apache whose client side is a slow uplink as the client
    sees it: a small receive window (the relay's own buffers do not swallow the body) read
    at ``rate`` bytes a second; answers come back at full speed."""

    def __init__(self, server: DavServer, rate: int) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before listen)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.target, self.rate = (server.host, server.port), rate
        self._start(self._accept)

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self.threads.append(thread)

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                client = self.listener.accept()[0]
            except OSError:
                continue
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            self._start(self._pump, client, upstream, self.rate)
            self._start(self._pump, upstream, client, None)

    def _pump(self, source: socket.socket, sink: socket.socket, rate: int | None) -> None:
        source.settimeout(0.2)
        piece = max(1, rate // 20) if rate else 1 << 16
        while not self.stop.is_set():
            try:
                data = source.recv(piece)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:  # (the end passed on, as a TCP path does: the other side sees it)
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            try:
                sink.sendall(data)
            except OSError:
                return
            if rate:
                time.sleep(len(data) / rate)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(2)
        for sock in self.sockets:
            sock.close()
        self.listener.close()


def test_an_upload_on_an_uplink_slower_than_the_allowance_completes(davd: DavServer,
                                                                   tmp_path: Path) -> None:
    """Review 2, finding 7: the wait for a PUT's answer allowed the timeout plus the body
    at 256 kB/s: an uplink at 40 kB/s failed an upload of 240 KiB with --timeout 2 (all of
    it handed to the kernel at once, 'no answer within 2.96 s' while it still moved). The
    wait now goes on while the socket's send queue shrinks: the timeout bounds how long
    nothing moves."""
    link = SlowUplink(davd, 40_000)
    remote = DavRemote("127.0.0.1", "/", port=link.port, user=davd.user, password=davd.password,
                       timeout=2.0)
    source = tmp_path / "src"
    source.write_bytes(os.urandom(240 << 10))
    try:
        remote.connect()
        start = time.monotonic()
        [outcome] = remote.upload_many([Upload(b"slow", str(source), 0o644, b".s.tmp", None,
                                               lambda f: True)])
        assert isinstance(outcome, RemoteStat), outcome
        assert time.monotonic() - start > 4  # (the link was that slow)
        assert (davd.share / "slow").read_bytes() == source.read_bytes()
    finally:
        remote.close()
        link.close()
