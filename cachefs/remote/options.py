"""Connection options shared by the backends (set from the command line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (paramiko is loaded only where a connection is made)
    from .ssh_secrets import Secrets


@dataclass(frozen=True)
class ConnectOptions:
    timeout: float = 10.0  # seconds one remote operation may take
    identity: Path | None = None  # --identity: private key file
    known_hosts: Path | None = None  # --known-hosts; None means ~/.ssh/known_hosts
    accept_new_host_key: bool = False  # like StrictHostKeyChecking=accept-new
    ssh_config: Path | None = None  # None means ~/.ssh/config when it exists
    connections: int = 4  # SFTP connections in the pool for parallel work
    #: seconds between SSH keepalives on each pooled connection: they only keep a NAT's
    #: mapping (they ask for no answer; the heartbeat finds a dead link); every 5 s on
    #: 4-5 connections they were most of what an idle mount sent a server (0.8 of 0.9
    #: packets/s, docs/performance-wan.md)
    keepalive: float = 60.0
    #: --no-remote-hash turns it off: compare content hashes computed on the server (a
    #: ``sha256sum`` run over an SSH exec channel) before an upload replaces a file
    remote_hash: bool = True
    #: --upload-limit: bytes a second uploads may take of the link, all together (None:
    #: no cap; uploads still keep their queue on the link short, see ``WriteWindow``)
    upload_limit: float | None = None
    #: the secrets a login may need (a password, key passphrases, answers), given ahead
    #: or asked for once before the mount detaches, then remembered in memory only
    secrets: "Secrets | None" = field(default=None, repr=False, compare=False)
