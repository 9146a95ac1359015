"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.devserver import SshServer
from tests.backends import backend  # noqa: F401 - the fixture over every protocol

# ---------------------------------------------------------------------------------------
# Remote fixtures: a share folder and a private OpenSSH sshd serving it on 127.0.0.1.
# `share` is a plain folder; `sshd` serves that same folder, so a test can prepare files
# directly on disk and read them through either backend. The server is always stopped.
# ---------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_kerberos_of_your_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees a Kerberos ticket or krb5.conf of whoever runs the suite (with a ticket
    of theirs every SMB login first asked their KDC: 76 s instead of 18 s for the login
    tests where that KDC did not answer); tests/test_smb_kerberos.py gives its own."""
    monkeypatch.setenv("KRB5CCNAME", "FILE:/nonexistent/cachefs-tests-have-no-ticket")
    monkeypatch.setenv("KRB5_CONFIG", "/dev/null")


@pytest.fixture
def share(tmp_path: Path) -> Path:
    """An empty folder used as the remote share."""
    path = tmp_path / "share"
    path.mkdir()
    return path


@pytest.fixture
def sshd(tmp_path: Path, share: Path) -> Iterator[SshServer]:
    """A running sshd (fresh keys, free port) sharing ``share``; stopped afterwards."""
    server = SshServer(tmp_path / "sshd", share=share)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- writes (test_writes) ---
# `mount_factory` makes real mounts of the `sshd` share (or of any remote address given),
# with short timeouts so that going offline and coming back are quick. Every mount made is
# stopped after the test, even when it fails.


@pytest.fixture
def mount_factory(tmp_path: Path, sshd: SshServer) -> Iterator:
    from tests.fixtures.mount import Mount

    made: list[Mount] = []

    def make(*extra: str, remote: str | None = None, known_hosts: Path | None = None,
             name: str = "mnt", cache: str = "cache", allowed_errors=(), check_log: bool = True,
             timeout: str = "2", attr_timeout: str = "1", heartbeat: str = "1",
             env: dict[str, str] | None = None) -> Mount:
        mount = Mount(
            remote or sshd.address(), tmp_path / name, tmp_path / cache,
            "--identity", str(sshd.identity),
            "--known-hosts", str(known_hosts or sshd.known_hosts),
            "--timeout", timeout, "--attr-timeout", attr_timeout, "--heartbeat", heartbeat,
            "-v", *extra,
            allowed_errors=allowed_errors, check_log=check_log, env=env,
        )
        made.append(mount)
        return mount

    yield make
    for mount in made:
        try:
            mount.stop(grace=5)
        except Exception:  # the test's own failure matters more
            pass
