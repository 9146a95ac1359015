"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefs.devserver import SshServer

# ---------------------------------------------------------------------------------------
# Remote fixtures: a share folder and a private OpenSSH sshd serving it on 127.0.0.1.
# `share` is a plain folder; `sshd` serves that same folder, so a test can prepare files
# directly on disk and read them through either backend. The server is always stopped.
# ---------------------------------------------------------------------------------------


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
