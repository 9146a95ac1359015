"""The ``backend`` fixture: one behavioural test run over every kind of share cachefs mounts.

Owns: per test, one server of the parametrised protocol on 127.0.0.1 (a private sshd, a
private smbd, a WebDAV server; none for a local folder), the folder it serves (``share``:
tests put and check the server's files there directly), the mounts made through
``mount()`` and the TCP relays made through ``proxied()``; every one of them is stopped
after the test, even when it fails. Touches no cachefs internals: only the command line of
tests/fixtures/mount.py's ``Mount``.

What a protocol cannot carry is written down once here (``Caps``), with the protocol's
reason, so that a test skips with that reason (``backend.skip_unless("symlinks")``) instead
of each test knowing a backend's type. When a backend's class declares
``capabilities`` (cachefs.remote.base.Capabilities), that declaration is what is tested;
the table below is the fallback for classes that declare none yet.

The SMB and WebDAV servers (devtools/smbserver.py, devtools/davserver.py) are imported
only when their parameter runs, so that the sftp and local parameters run without them.

    def test_x(backend):
        (backend.share / "f").write_bytes(b"x")
        with backend.mount() as mount:
            ...
            backend.go_offline()    # the server stops (a local share is moved away)
            ...
            backend.come_back()     # started again on the same port
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.mount import Mount
from tests.fixtures.proxy import TcpProxy

BACKENDS = ["sftp", "local", "smb", "webdav"]

# Short timeouts, as conftest's mount_factory: going offline and coming back are quick.
COMMON_ARGS = ("--timeout", "2", "--attr-timeout", "1", "--heartbeat", "1", "-v")

# Log lines a mount may write once its server has gone (stopped, or the relay cut).
SERVER_GONE_LOG = {
    "sftp": [r"(?i)unreachable|offline|timed? ?out|connection|EOF|reset|refused|socket|ssh"],
    "local": [],
    # What smbprotocol / httpx log for a vanished server is theirs to word; any line that
    # says the server went is accepted, as test_mount_read's OFFLINE_LOG does.
    "smb": [r"(?i)unreachable|offline|timed? ?out|connection|EOF|reset|refused|socket|smb"],
    "webdav": [r"(?i)unreachable|offline|timed? ?out|connection|EOF|reset|refused|socket|http"],
}

# Windows' rules for a name, which SMB carries (MS-FSCC 2.1.5.1 and Win32 naming rules):
# Samba refuses or mangles what a Windows client could not create. Written here from the
# protocol, not read from the handler (its name_error is what these tests check).
_SMB_FORBIDDEN = re.compile(rb'[\x00-\x1f\\:*?"<>|]')
_SMB_RESERVED = re.compile(rb"(?i)^(CON|PRN|AUX|NUL|COM[1-9]|LPT[1-9]) *(\..*)?$")


def _smb_refuses(name: bytes) -> tuple[int, str] | None:
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return errno.EILSEQ, "SMB names are UTF-16 text: bytes that are not UTF-8 cannot be sent"
    if _SMB_FORBIDDEN.search(name):
        return errno.EINVAL, 'SMB names may not hold control characters or \\ : * ? " < > |'
    if name.endswith((b".", b" ")):
        return errno.EINVAL, "SMB (Windows) names may not end with a dot or a space"
    if _SMB_RESERVED.match(name):
        return errno.EINVAL, "SMB (Windows) reserves the device names CON, PRN, AUX, NUL, COMn, LPTn"
    if len(text.encode("utf-16-le")) // 2 > 255:
        return errno.ENAMETOOLONG, "SMB names are at most 255 UTF-16 units"
    return None


@dataclasses.dataclass(frozen=True)
class Caps:
    """What a protocol carries; ``why`` holds, for each thing it does not, the reason a
    test's skip states."""

    symlinks: bool
    hard_links: bool
    modes: bool
    why: dict[str, str]
    #: a name -> (the errno its create fails with at once, why), or None: carried
    refuses: Callable[[bytes], tuple[int, str] | None] = lambda name: None

    def reason(self, what: str) -> str:
        return self.why.get(what, f"{what} not carried")


CAPS = {
    "sftp": Caps(symlinks=True, hard_links=True, modes=True, why={}),
    "local": Caps(symlinks=True, hard_links=True, modes=True, why={}),
    "smb": Caps(symlinks=False, hard_links=False, modes=False, refuses=_smb_refuses, why={
        "symlinks": "SMB 2/3 carries no POSIX symlinks by default (Samba's unix extensions "
                    "are SMB1 only, and Windows reparse-point links are off on a Samba share)",
        "hard_links": "SMB 2/3 has no POSIX link call (cachefs's SMB handler does not use "
                      "Windows' FileLinkInformation)",
        "modes": "SMB keeps Windows attributes, not POSIX permission bits",
    }),
    # Any bytes are carried in a name, percent-encoded in the URL (Apache stores them as
    # they are; a server that keeps only UTF-8 would refuse the rest at replay).
    "webdav": Caps(symlinks=False, hard_links=False, modes=False, why={
        "symlinks": "WebDAV (RFC 4918) has no symlinks",
        "hard_links": "WebDAV (RFC 4918) has no hard links (BIND, RFC 5842, is rarely served)",
        "modes": "WebDAV keeps no POSIX permission bits",
    }),
}


class Backend:
    """One protocol's server and share for one test (see the module docstring)."""

    def __init__(self, name: str, tmp_path: Path, share: Path,
                 request: pytest.FixtureRequest) -> None:
        self.name = name
        self.tmp_path = tmp_path
        self.share = share
        self.server: Any = None  # SshServer, SmbServer, DavServer; None for a local folder
        self.offline = False
        self._mounts: list[Mount] = []
        self._proxies: list[TcpProxy] = []
        self._mount_names = 0
        if name == "sftp":
            self.server = request.getfixturevalue("sshd")  # conftest's, on ``share``
        elif name == "smb":
            from devtools.smbserver import SmbServer  # H1's: imported only when run
            self.server = SmbServer(tmp_path / "smbd", share)
            self.server.start()
        elif name == "webdav":
            from devtools.davserver import DavServer  # H2's: imported only when run
            self.server = DavServer(tmp_path / "davd", share)
            self.server.start()
        self.caps = self._caps()

    def _caps(self) -> Caps:
        """The table's entry, overridden by the backend class's own declaration."""
        caps = CAPS[self.name]
        module, cls = {"sftp": ("cachefs.remote.sftp", "SftpRemote"),
                       "local": ("cachefs.remote.local", "LocalRemote"),
                       "smb": ("cachefs.remote.smb", "SmbRemote"),
                       "webdav": ("cachefs.remote.dav", "DavRemote")}[self.name]
        try:
            declared = getattr(__import__(module, fromlist=[cls]), cls).capabilities
        except (ImportError, AttributeError):
            return caps
        return dataclasses.replace(caps, **{
            field: bool(getattr(declared, field)) for field in ("symlinks", "hard_links", "modes")
            if hasattr(declared, field)})

    # -- what tests call -------------------------------------------------------------------

    def skip_unless(self, what: str) -> None:
        """Skip the test, with the protocol's reason, when ``what`` is not carried."""
        if not getattr(self.caps, what):
            pytest.skip(f"{self.name}: {self.caps.reason(what)}")

    def address(self, through: TcpProxy | None = None) -> str:
        if self.server is None:
            return str(self.share)
        address = str(self.server.address())
        if through is not None:
            address = address.replace(f":{self.server.port}/", f":{through.port}/", 1)
        return address

    def mount(self, *extra: str, through: TcpProxy | None = None, name: str | None = None,
              cache: str = "cache", allowed_errors: tuple[str, ...] | list[str] = (),
              check_log: bool = True, **kw: Any) -> Mount:
        """A Mount (not started: use it as a context manager, or ``.start()``) of the share,
        through the relay ``through`` if given. A second mount of the same ``cache`` is a
        remount; each gets its own mount point unless ``name`` is given."""
        self._mount_names += 1
        args: list[str] = []
        if self.name == "sftp":
            known_hosts = self.server.known_hosts
            if through is not None:
                known_hosts = self.tmp_path / f"known_hosts_{through.port}"
                key_type, key_b64 = self.server.host_key_pub.read_text().split()[:2]
                known_hosts.write_text(f"[127.0.0.1]:{through.port} {key_type} {key_b64}\n")
            args += ["--identity", str(self.server.identity), "--known-hosts", str(known_hosts)]
        elif self.server is not None:
            args += list(self.server.mount_args())
        allowed = list(allowed_errors)
        if self.offline or through is not None:
            allowed += SERVER_GONE_LOG[self.name]
        mount = Mount(self.address(through), self.tmp_path / (name or f"mnt{self._mount_names}"),
                      self.tmp_path / cache, *args, *COMMON_ARGS, *extra,
                      allowed_errors=allowed, check_log=check_log, **kw)
        self._mounts.append(mount)
        return mount

    def go_offline(self) -> None:
        """The share becomes unreachable: the server stops (its connections reset); a
        local share is moved away, as a disk unplugged."""
        assert not self.offline, "already offline"
        self.offline = True
        for mount in self._mounts:  # their logs may now say the server went
            mount.allowed_errors += tuple(SERVER_GONE_LOG[self.name])
        if self.server is None:
            self.share.rename(self._away())
        else:
            self.server.stop()

    def come_back(self) -> None:
        """The share is reachable again (same port, same files)."""
        assert self.offline, "not offline"
        if self.server is None:
            self._away().rename(self.share)
        else:
            self.server.start()
        self.offline = False

    @property
    def server_side(self) -> Path:
        """Where the server's files are now: ``share``, or where a local share was moved
        while offline (a test changes the server's files meanwhile through this)."""
        return self._away() if self.offline and self.server is None else self.share

    def proxied(self) -> TcpProxy:
        """A TCP relay to the server (``mount(through=relay)``) that a test can cut,
        stall or throttle; closed after the test."""
        if self.server is None:
            pytest.skip(f"{self.name}: a local path has no network to cut")
        proxy = TcpProxy(self.server.host, self.server.port)
        self._proxies.append(proxy)
        return proxy

    def refuses(self, name: bytes) -> tuple[int, str] | None:
        """(errno, why) when the protocol cannot carry ``name``: making it in the mount
        must fail at once with that errno; None when it can."""
        return self.caps.refuses(name)

    # -- teardown ----------------------------------------------------------------------------

    def _away(self) -> Path:
        return self.share.with_name(self.share.name + "-unplugged")

    def close(self) -> None:
        problems: list[BaseException] = []
        for mount in self._mounts:
            try:
                mount.stop(grace=5)
            except Exception as error:  # every mount must still be tried
                problems.append(error)
        for proxy in self._proxies:
            try:
                proxy.close()
            except Exception as error:
                problems.append(error)
        if self.offline and self.server is None:
            self._away().rename(self.share)
        if self.server is not None and self.name != "sftp":  # conftest stops the sshd
            self.server.stop()
        if problems:
            raise problems[0]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path, share: Path) -> Iterator[Backend]:
    """A share served by each protocol in turn (see the module docstring)."""
    made = Backend(request.param, tmp_path, share, request)
    try:
        yield made
    finally:
        made.close()

