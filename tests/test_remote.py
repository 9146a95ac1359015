"""Both remote backends against real folders and a real OpenSSH sshd (no mocks)."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefs.address import parse_remote
from cachefs.remote import (
    ConnectOptions,
    Remote,
    RemoteError,
    RemoteRefused,
    RemoteUnreachable,
    open_remote,
)
from cachefs.remote.local import LocalRemote
from devtools.devserver import SshServer

TIMEOUT = 3.0


def sftp_options(sshd: SshServer, **overrides: object) -> ConnectOptions:
    """Options that use only the test server's files, never the user's ~/.ssh."""
    empty_config = sshd.workdir / "ssh_config"
    empty_config.touch()
    settings: dict[str, object] = dict(
        timeout=TIMEOUT, identity=sshd.identity, known_hosts=sshd.known_hosts, ssh_config=empty_config
    )
    settings.update(overrides)
    return ConnectOptions(**settings)  # type: ignore[arg-type]


def sftp_remote(sshd: SshServer, **overrides: object) -> Remote:
    return open_remote(parse_remote(sshd.address()), sftp_options(sshd, **overrides))


@pytest.fixture(params=["local", "sftp"])
def remote(request: pytest.FixtureRequest, share: Path) -> Iterator[Remote]:
    """A connected backend over ``share``."""
    backend: Remote
    if request.param == "local":
        backend = open_remote(parse_remote(str(share)), ConnectOptions(timeout=TIMEOUT))
    else:
        backend = sftp_remote(request.getfixturevalue("sshd"))
    backend.connect()
    try:
        yield backend
    finally:
        backend.close()


def bpath(share: Path, name: bytes) -> bytes:
    return os.fsencode(share) + b"/" + name


# -- both backends -----------------------------------------------------------------------
def test_stat_listdir_readlink(remote: Remote, share: Path) -> None:
    (share / "f").write_bytes(b"hello world")
    (share / "d").mkdir()
    (share / "d" / "inner").write_bytes(b"")
    os.symlink("f", share / "l")
    for odd in (b"caf\xe9", b"a\nb"):
        with open(bpath(share, odd), "wb") as f:
            f.write(odd)

    entries = dict(remote.listdir(b""))
    assert set(entries) == {b"f", b"d", b"l", b"caf\xe9", b"a\nb"}
    assert entries[b"f"].kind == stat.S_IFREG and entries[b"f"].size == 11
    assert entries[b"d"].kind == stat.S_IFDIR
    assert entries[b"l"].kind == stat.S_IFLNK  # lstat: links not followed
    assert entries[b"caf\xe9"].size == 4
    assert [name for name, _ in remote.listdir(b"d")] == [b"inner"]

    assert remote.stat(b"").kind == stat.S_IFDIR
    st = remote.stat(b"f")
    assert st.size == 11 and st.mtime_ns // 10**9 == os.stat(share / "f").st_mtime_ns // 10**9
    assert remote.stat(b"caf\xe9").size == 4
    assert remote.readlink(b"l") == b"f"
    assert remote.read(b"a\nb", 0, 100) == b"a\nb"
    assert remote.read(b"f", 6, 3) == b"wor"
    assert remote.read(b"f", 6, 100) == b"world"
    assert remote.read(b"f", 50, 10) == b""


def test_big_read_equals_file(remote: Remote, share: Path) -> None:
    data = os.urandom(10 * 1000 * 1000 + 123)
    (share / "big").write_bytes(data)
    assert remote.read(b"big", 0, len(data) + 4096) == data
    assert remote.read(b"big", 1_000_001, 3_333_333) == data[1_000_001:4_333_334]


def test_read_version_into_gives_the_version_of_what_was_read(remote: Remote, share: Path) -> None:
    """The attributes come with the bytes (SFTP: an FSTAT after the READs, the CLOSE not
    waited for): a change made while the reads go on shows in them, and the connection
    serves the next calls (the CLOSE's late reply is dropped, not taken for theirs)."""
    data = os.urandom(3 * 1000 * 1000)
    (share / "v").write_bytes(data)
    before = remote.stat(b"v").version()
    got: dict[int, bytes] = {}
    count, found = remote.read_version_into(b"v", 0, len(data), got.__setitem__)
    assert count == len(data) and b"".join(got[k] for k in sorted(got)) == data
    assert found.version() == before

    changed: list[int] = []

    def sink(pos: int, piece: bytes) -> None:
        if not changed:  # the first reply: change the file in place, as a server's program would
            changed.append(pos)
            with open(share / "v", "r+b") as f:
                f.write(b"X")
            os.utime(share / "v", ns=(0, 1_000_000_000))
    _count, found = remote.read_version_into(b"v", 0, len(data), sink)
    assert found.version() != before and found.version() == remote.stat(b"v").version()
    for _ in range(20):  # the pool's connections still answer their own calls
        assert remote.stat(b"v").size == len(data)
        assert remote.read(b"v", 1, 4) == data[1:5]
    assert remote.read(b"v", 0, 1) == b"X"


def test_missing_objects_are_enoent(remote: Remote, share: Path) -> None:
    (share / "f").write_bytes(b"x")
    calls = [
        lambda: remote.stat(b"nope"),
        lambda: remote.listdir(b"nope"),
        lambda: remote.read(b"nope", 0, 10),
        lambda: remote.readlink(b"nope"),
        lambda: remote.unlink(b"nope"),
        lambda: remote.stat(b"nope/deeper"),
    ]
    for call in calls:
        with pytest.raises(RemoteError) as info:
            call()
        assert info.value.errno == errno.ENOENT


def test_upload_replaces_atomically(remote: Remote, share: Path, tmp_path: Path) -> None:
    (share / "d").mkdir()
    target = share / "d" / "doc"
    target.write_bytes(b"old content")
    old_inode = target.stat().st_ino
    source = tmp_path / "source"
    source.write_bytes(b"new content, longer than before" * 5000)

    with open(target, "rb") as reader:  # somebody reading the old version meanwhile
        result = remote.upload(b"d/doc", str(source), 0o640, b".doc.cachefs-tmp")
        assert reader.read() == b"old content"  # the old file was replaced, not rewritten

    assert target.read_bytes() == source.read_bytes()
    assert target.stat().st_ino != old_inode
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(os.listdir(share / "d")) == ["doc"]  # no temp file left
    assert result.size == source.stat().st_size and result.kind == stat.S_IFREG

    remote.upload(b"fresh", str(source), 0o600, b".fresh.tmp")
    assert (share / "fresh").read_bytes() == source.read_bytes()


def test_symlink_points_the_right_way(remote: Remote, share: Path) -> None:
    (share / "d").mkdir()
    remote.symlink(b"../some/target", b"d/link")
    assert os.readlink(share / "d" / "link") == "../some/target"
    assert remote.readlink(b"d/link") == b"../some/target"
    remote.symlink(b"caf\xe9", b"l2")
    assert os.readlink(bpath(share, b"l2")) == b"caf\xe9"


def test_hard_link(remote: Remote, share: Path) -> None:
    (share / "f").write_bytes(b"x")
    remote.link(b"f", b"g")
    assert (share / "g").stat().st_ino == (share / "f").stat().st_ino
    with pytest.raises(RemoteError):
        remote.link(b"missing", b"h")


def test_changes(remote: Remote, share: Path) -> None:
    remote.mkdir(b"d", 0o750)
    assert stat.S_IMODE((share / "d").stat().st_mode) == 0o750 & ~_umask()
    (share / "a").write_bytes(b"aaaa")
    (share / "b").write_bytes(b"bb")
    remote.rename(b"a", b"b")  # replaces, POSIX style
    assert (share / "b").read_bytes() == b"aaaa" and not (share / "a").exists()
    remote.set_attrs(b"b", 0o604, 1_000_000_000 * 10**9, 1_500_000_000 * 10**9)
    assert stat.S_IMODE((share / "b").stat().st_mode) == 0o604
    assert (share / "b").stat().st_mtime == 1_500_000_000
    remote.unlink(b"b")
    remote.rmdir(b"d")
    assert os.listdir(share) == []
    space = remote.statvfs()
    assert space.block_size > 0 and space.blocks >= space.blocks_free > 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_rmdir_of_non_empty_folder_is_an_error(remote: Remote, share: Path) -> None:
    (share / "d").mkdir()
    (share / "d" / "x").touch()
    with pytest.raises(RemoteError):
        remote.rmdir(b"d")


# -- local backend -----------------------------------------------------------------------
def test_local_missing_root_is_unreachable_and_file_root_refused(tmp_path: Path) -> None:
    with pytest.raises(RemoteUnreachable):
        LocalRemote(str(tmp_path / "absent"), timeout=TIMEOUT).connect()
    (tmp_path / "file").touch()
    with pytest.raises(RemoteRefused):
        LocalRemote(str(tmp_path / "file"), timeout=TIMEOUT).connect()


def test_local_root_vanishing_is_unreachable(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    remote = LocalRemote(str(root), timeout=TIMEOUT)
    remote.connect()
    root.rmdir()
    with pytest.raises(RemoteUnreachable):
        remote.stat(b"x")
    remote.close()


# -- sftp: host keys -----------------------------------------------------------------------
def test_unknown_host_key_is_refused(sshd: SshServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts_empty"
    empty.touch()
    remote = sftp_remote(sshd, known_hosts=empty)
    with pytest.raises(RemoteRefused) as info:
        remote.connect()
    message = str(info.value)
    assert "--accept-new-host-key" in message
    assert f"[127.0.0.1]:{sshd.port}" in message and "SHA256:" in message and "ssh-ed25519" in message
    assert str(empty) in message
    assert empty.read_text() == ""


def test_accept_new_host_key_records_it(sshd: SshServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "home" / ".ssh" / "known_hosts"
    remote = sftp_remote(sshd, known_hosts=known_hosts, accept_new_host_key=True)
    remote.connect()
    remote.close()
    assert stat.S_IMODE(known_hosts.stat().st_mode) == 0o600
    assert stat.S_IMODE(known_hosts.parent.stat().st_mode) == 0o700
    host_key = sshd.host_key_pub.read_text().split()[:2]
    assert known_hosts.read_text() == f"[127.0.0.1]:{sshd.port} {host_key[0]} {host_key[1]}\n"
    again = sftp_remote(sshd, known_hosts=known_hosts)
    again.connect()
    again.close()


def test_hashed_known_hosts_entry_works(sshd: SshServer, tmp_path: Path) -> None:
    hashed = tmp_path / "known_hosts_hashed"
    hashed.write_text(sshd.known_hosts.read_text())
    subprocess.run(["ssh-keygen", "-H", "-f", str(hashed)], check=True, capture_output=True)
    assert hashed.read_text().startswith("|1|")
    remote = sftp_remote(sshd, known_hosts=hashed)
    remote.connect()
    remote.close()


def test_changed_host_key_is_refused_even_with_accept_new(sshd: SshServer) -> None:
    sshd.regenerate_host_key()
    sshd.restart()
    remote = sftp_remote(sshd, accept_new_host_key=True)
    with pytest.raises(RemoteRefused) as info:
        remote.connect()
    message = str(info.value)
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in message
    assert f"{sshd.known_hosts}:1" in message
    assert len(sshd.known_hosts.read_text().splitlines()) == 1  # nothing added


# -- sftp: authentication and share checks ---------------------------------------------------
def test_unauthorised_key_is_refused(sshd: SshServer, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with pytest.raises(RemoteRefused, match="authentication"):
        sftp_remote(sshd, identity=other).connect()


def test_passphrase_key_without_agent_is_refused(
    sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    locked = tmp_path / "locked_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret phrase", "-f", str(locked)], check=True)
    with pytest.raises(RemoteRefused, match="passphrase") as info:
        sftp_remote(sshd, identity=locked).connect()
    assert "secret phrase" not in str(info.value)


def test_missing_share_folder_is_refused(sshd: SshServer) -> None:
    address = parse_remote(sshd.address() + "/not-there")
    with pytest.raises(RemoteRefused):
        open_remote(address, sftp_options(sshd)).connect()


def test_login_folder_share(sshd: SshServer) -> None:
    address = parse_remote(f"sftp://{sshd.user}@{sshd.host}:{sshd.port}")
    remote = open_remote(address, sftp_options(sshd))
    remote.connect()
    assert remote.stat(b"").kind == stat.S_IFDIR
    assert remote.description == f"sftp://{sshd.user}@127.0.0.1:{sshd.port}/~"
    remote.close()


# -- sftp: connectivity ------------------------------------------------------------------------
def test_stopped_server_is_unreachable_within_timeout(sshd: SshServer) -> None:
    remote = sftp_remote(sshd)
    remote.connect()
    sshd.stop()
    for _ in range(2):  # the dead pooled connection, then a refused reconnection
        started = time.monotonic()
        with pytest.raises(RemoteUnreachable):
            remote.stat(b"")
        assert time.monotonic() - started < TIMEOUT + 1
    remote.close()


def test_restarted_server_is_reconnected(sshd: SshServer, share: Path) -> None:
    (share / "f").write_bytes(b"data")
    remote = sftp_remote(sshd)
    remote.connect()
    sshd.stop()
    with pytest.raises(RemoteUnreachable):
        remote.read(b"f", 0, 4)
    sshd.start()
    assert remote.read(b"f", 0, 4) == b"data"
    sshd.restart()  # a dead pooled connection is replaced without an error
    assert remote.stat(b"f").size == 4
    remote.close()


def test_silent_server_times_out(sshd: SshServer) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        port = silent.getsockname()[1]
        address = parse_remote(f"sftp://{sshd.user}@127.0.0.1:{port}/")
        remote = open_remote(address, sftp_options(sshd, timeout=1.0))
        started = time.monotonic()
        with pytest.raises(RemoteUnreachable):
            remote.connect()
        assert time.monotonic() - started < 2.5


def test_parallel_calls_use_the_pool(sshd: SshServer, share: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    data = os.urandom(3 << 20)
    (share / "f").write_bytes(data)
    remote = sftp_remote(sshd, connections=3)
    remote.connect()
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: remote.read(b"f", i << 18, 1 << 18), range(12)))
    assert b"".join(results) == data
    remote.close()


RELAY = """
import os, socket, sys, threading
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def upstream():
    while data := os.read(0, 65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
threading.Thread(target=upstream, daemon=True).start()
while data := conn.recv(65536):
    os.write(1, data)
"""


@pytest.mark.parametrize("proxy", [False, True], ids=["direct", "proxycommand"])
def test_ssh_config_is_honoured(
    sshd: SshServer, share: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proxy: bool
) -> None:
    import sys

    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    lines = [
        "Host shareserver",
        "    HostName 127.0.0.1",
        f"    Port {sshd.port}",
        f"    User {sshd.user}",
        f"    IdentityFile {sshd.identity}",
        f"    UserKnownHostsFile {sshd.known_hosts}",
    ]
    if proxy:
        lines.append(f"    ProxyCommand {sys.executable} {relay} %h %p")
    config = tmp_path / "ssh_config"
    config.write_text("\n".join(lines) + "\n")
    (share / "f").write_bytes(b"via config")
    options = ConnectOptions(timeout=TIMEOUT, ssh_config=config)
    remote = open_remote(parse_remote(f"shareserver:{share}"), options)
    assert remote.description == f"sftp://{sshd.user}@127.0.0.1:{sshd.port}{share}"
    remote.connect()
    assert remote.read(b"f", 0, 100) == b"via config"
    remote.close()


# -- sftp: what cachefs relies on in paramiko ------------------------------------------------
def test_paramiko_private_surface() -> None:
    """The private parts of paramiko that ``cachefs.remote.sftp_session`` drives (listed in
    its docstring), checked against the installed paramiko: a paramiko release that
    renames or reshapes them fails here, not in a user's mount. And the SFTP protocol
    numbers defined there (from the draft) equal paramiko's."""
    import inspect

    import paramiko
    import paramiko.sftp as psftp
    from paramiko.sftp_client import SFTPClient

    from cachefs.remote import sftp_session

    engine = {
        "_send_packet": ["self", "t", "packet"],
        "_read_packet": ["self"],
        "_request": ["self", "t", "args"],
        "_async_request": ["self", "fileobj", "t", "args"],
        "_read_response": ["self", "waitfor"],
        "_send_version": ["self"],
        "_convert_status": ["self", "msg"],
    }
    for name, params in engine.items():
        assert list(inspect.signature(getattr(SFTPClient, name)).parameters) == params, name
    # replies to pipelined requests go to fileobj._async_response(t, msg, num)
    assert "_async_response(t, msg, num)" in inspect.getsource(SFTPClient._read_response)
    # _async_request packs int64 as 64 bits and SFTPAttributes as an ATTRS structure
    packing = inspect.getsource(SFTPClient._async_request)
    assert "isinstance(item, int64)" in packing and "item._pack(msg)" in packing
    assert sftp_session.int64 is psftp.int64
    for name in dir(sftp_session):
        if name.startswith(("CMD_", "SFTP_")):
            assert getattr(sftp_session, name) == getattr(psftp, name), name
    assert sftp_session.SFTP_FAILURE == paramiko.SFTP_FAILURE


def test_attrs_decoded_as_paramiko_does() -> None:
    """``decode_attrs`` reads every ATTRS field paramiko writes, and stops where it ends."""
    import paramiko

    from cachefs.remote.sftp_session import decode_attrs

    full = paramiko.SFTPAttributes()
    full.st_size, full.st_uid, full.st_gid, full.st_mode = 1 << 40, 1000, 100, 0o100644
    full.st_atime, full.st_mtime = 1_700_000_000, 1_700_000_001
    full.attr = {"x": "y"}
    for attrs in (full, paramiko.SFTPAttributes()):
        msg = paramiko.Message()
        attrs._pack(msg)
        msg.add_int(42)
        reply = paramiko.Message(msg.asbytes())
        decoded = decode_attrs(reply)
        for field in ("st_size", "st_uid", "st_gid", "st_mode", "st_atime", "st_mtime"):
            assert getattr(decoded, field) == getattr(attrs, field), field
        assert reply.get_int() == 42  # what follows the ATTRS (the next entry of a listing)


def test_host_key_alias_is_looked_up_without_the_port(tmp_path: Path) -> None:
    """With HostKeyAlias, OpenSSH records and finds the server's key under the alias alone,
    whatever the port (sshconnect.c); without it, a port other than 22 makes ``[host]:port``.
    (cachefs looked for ``[alias]:port`` and so refused a key that ``ssh`` had recorded.)"""
    from cachefs.remote.ssh_config import resolve_target

    config = tmp_path / "ssh_config"
    config.write_text("Host fileserver\n    HostName 127.0.0.1\n    Port 2222\n    HostKeyAlias fileserver\n"
                      "Host other\n    HostName 127.0.0.1\n    Port 2222\n")
    options = ConnectOptions(timeout=TIMEOUT, ssh_config=config)
    assert resolve_target(parse_remote("fileserver:x"), options).host_key_name == "fileserver"
    assert resolve_target(parse_remote("other:x"), options).host_key_name == "[127.0.0.1]:2222"
    assert resolve_target(parse_remote("sftp://other/x"), options).host_key_name == "[127.0.0.1]:2222"
    assert resolve_target(parse_remote("sftp://other:22/x"), options).host_key_name == "127.0.0.1"
