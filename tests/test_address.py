"""parse_remote and RemoteAddress.display: pure logic, no I/O."""

from __future__ import annotations

import os

import pytest

from cachefs.address import RemoteAddress, parse_remote


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sftp://alice@host.example:2222/srv/data", RemoteAddress("sftp", "/srv/data", "host.example", "alice", 2222)),
        ("sftp://host", RemoteAddress("sftp", "", "host")),
        ("sftp://host/", RemoteAddress("sftp", "/", "host")),
        ("sftp://host/~", RemoteAddress("sftp", "", "host")),
        ("sftp://host/~/docs/x", RemoteAddress("sftp", "docs/x", "host")),
        ("sftp://[::1]:22/p", RemoteAddress("sftp", "/p", "::1", None, 22)),
        ("sftp://[fe80::1]/p", RemoteAddress("sftp", "/p", "fe80::1")),
        ("sftp://h/a%20b/caf%C3%A9", RemoteAddress("sftp", "/a b/café", "h")),
        ("sftp://b%40d@h/p", RemoteAddress("sftp", "/p", "h", "b@d")),
        ("SFTP://h/p", RemoteAddress("sftp", "/p", "h")),
        ("alice@host:docs", RemoteAddress("sftp", "docs", "host", "alice")),
        ("host:/abs/path", RemoteAddress("sftp", "/abs/path", "host")),
        ("host:", RemoteAddress("sftp", "", "host")),
        ("host:~/x", RemoteAddress("sftp", "x", "host")),
        ("[::1]:data", RemoteAddress("sftp", "data", "::1")),
        ("bob@[::1]:/d", RemoteAddress("sftp", "/d", "::1", "bob")),
        ("file:///srv/share", RemoteAddress("file", "/srv/share")),
        ("smb://alice@nas.example:4450/team/docs", RemoteAddress("smb", "/team/docs", "nas.example", "alice", 4450)),
        ("smb://nas/team", RemoteAddress("smb", "/team", "nas")),
        ("dav://cloud.example/remote.php/dav/files/bob/", RemoteAddress("dav", "/remote.php/dav/files/bob", "cloud.example")),
        ("davs://bob@cloud.example:8443", RemoteAddress("davs", "/", "cloud.example", "bob", 8443)),
        ("DAVS://h/a%20b", RemoteAddress("davs", "/a b", "h")),
        ("file://localhost/srv/share", RemoteAddress("file", "/srv/share")),
        ("file:///a%20b/", RemoteAddress("file", "/a b")),
        ("/mnt/nfs/share", RemoteAddress("file", "/mnt/nfs/share")),
        ("/mnt/odd:name", RemoteAddress("file", "/mnt/odd:name")),
    ],
)
def test_parse(text: str, expected: RemoteAddress) -> None:
    assert parse_remote(text) == expected


def test_non_utf8_percent_escape_survives() -> None:
    address = parse_remote("sftp://h/caf%E9")
    assert os.fsencode(address.path) == b"/caf\xe9"
    assert parse_remote(address.display()) == address


def test_relative_local_paths_become_absolute(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(str(tmp_path))
    assert parse_remote("share") == RemoteAddress("file", os.path.join(str(tmp_path), "share"))
    assert parse_remote("./a:b") == RemoteAddress("file", os.path.join(str(tmp_path), "a:b"))
    assert parse_remote(".") == RemoteAddress("file", str(tmp_path))


def test_home_is_expanded_for_local_paths() -> None:
    assert parse_remote("~/x").path == os.path.expanduser("~/x")


def test_port_argument_overrides() -> None:
    assert parse_remote("sftp://h:2222/p", port=2200).port == 2200
    assert parse_remote("h:p", port=2200).port == 2200


@pytest.mark.parametrize(
    ("text", "port", "message"),
    [
        ("", None, "empty"),
        ("sftp:///path", None, "no host"),
        ("sftp://user@/p", None, "no host"),
        ("sftp://h:abc/p", None, "invalid port"),
        ("sftp://h:0/p", None, "out of range"),
        ("sftp://h:70000/p", None, "out of range"),
        ("sftp://h/p", 0, "out of range"),
        ("sftp://u:secret@h/p", None, "password"),
        ("sftp://h/p?x", None, "percent-encode"),
        ("sftp://[::1/p", None, "unclosed"),
        ("file://relative/path", None, "absolute path"),
        ("file://", None, "absolute path"),
        (":path", None, "no host"),
        ("@h:p", None, "empty user"),
        ("/local", 22, "--port"),
    ],
)
def test_junk_is_refused_clearly(text: str, port: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_remote(text, port=port)


@pytest.mark.parametrize(
    ("address", "shown"),
    [
        (RemoteAddress("sftp", "/srv/d", "h", "alice", 2222), "sftp://alice@h:2222/srv/d"),
        (RemoteAddress("sftp", "", "h"), "sftp://h"),
        (RemoteAddress("sftp", "docs", "h"), "sftp://h/~/docs"),
        (RemoteAddress("sftp", "/a b", "::1", None, 22), "sftp://[::1]:22/a%20b"),
        (RemoteAddress("file", "/srv/share"), "/srv/share"),
    ],
)
def test_display(address: RemoteAddress, shown: str) -> None:
    assert address.display() == shown
    assert parse_remote(shown) == address


@pytest.mark.parametrize(
    "text",
    ["sftp://u@h:1/x/y", "h:rel/dir", "[::1]:d", "sftp://h/%25%3F%23", "file:///t/a%25b", "/x/y",
     "smb://u@h:4450/share/d%20x", "dav://h/", "davs://[::1]:8443/caf%E9"],
)
def test_display_round_trips(text: str) -> None:
    address = parse_remote(text)
    assert parse_remote(address.display()) == address
