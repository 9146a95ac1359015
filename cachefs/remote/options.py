"""Connection options shared by the backends (set from the command line)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ConnectOptions:
    timeout: float = 10.0  # seconds one remote operation may take
    identity: Path | None = None  # --identity: private key file
    known_hosts: Path | None = None  # --known-hosts; None means ~/.ssh/known_hosts
    accept_new_host_key: bool = False  # like StrictHostKeyChecking=accept-new
    ssh_config: Path | None = None  # None means ~/.ssh/config when it exists
    connections: int = 4  # SFTP connections in the pool for parallel work
    keepalive: float = 5.0  # seconds between SSH keepalives
    #: --no-remote-hash turns it off: compare content hashes computed on the server (a
    #: ``sha256sum`` run over an SSH exec channel) before an upload replaces a file
    remote_hash: bool = True
    #: --upload-limit: bytes a second uploads may take of the link, all together (None:
    #: no cap; uploads still keep their queue on the link short, see ``WriteWindow``)
    upload_limit: float | None = None
