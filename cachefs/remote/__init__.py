"""Remote backends. ``open_remote`` picks one for a parsed address.

Owns nothing itself; the modules, each importing only those listed after it:

    local          a directory as the share (LocalRemote)
    sftp           a folder on an SSH server (SftpRemote): the share's root and the operations
    sftp_pool      SSH connections and their pool; failures translated
    ssh_auth       authentication: keys, keyboard-interactive, password
    ssh_secrets    passwords and passphrases: given, asked for once, remembered
    ssh_hostkeys   known_hosts: the verdict on a server's key
    ssh_config     the address through ~/.ssh/config (SshTarget)
    sftp_session   the SFTP protocol on one channel (paramiko's engine)
    pacing         the upload cap (--upload-limit), shared across processes
    base, options  the contract every backend keeps, its errors and options
    watch          the watcher that streams changes on the server (callbacks)

Backends know nothing of the cache, the sync manager, trio or FUSE.
"""

from __future__ import annotations

from ..address import RemoteAddress
from .base import Remote, RemoteError, RemoteRefused, RemoteStat, RemoteUnreachable, SpaceInfo
from .watch import Watch, WatchEnded
from .options import ConnectOptions
from .pacing import Pacer

__all__ = [
    "ConnectOptions",
    "Remote",
    "RemoteError",
    "RemoteRefused",
    "RemoteStat",
    "RemoteUnreachable",
    "SpaceInfo",
    "Watch",
    "WatchEnded",
    "log_in_ahead",
    "open_remote",
]


def open_remote(address: RemoteAddress, options: ConnectOptions, pacer: Pacer | None = None) -> Remote:
    """Build (not yet connect) the backend for ``address``; ``pacer``: the upload cap
    shared with other processes (else the backend makes its own from ``options``)."""
    if address.scheme == "file":
        from .local import LocalRemote

        return LocalRemote(address.path, timeout=options.timeout)
    from .sftp import SftpRemote

    return SftpRemote(address, options, pacer)


def log_in_ahead(address: RemoteAddress, options: ConnectOptions) -> None:
    """For an SSH address: log in once, asking (within ``options.secrets.asking()``) for a
    password or passphrase the login needs, so that later connections need not ask."""
    if address.scheme != "sftp":
        return
    from .sftp import SftpRemote

    remote = SftpRemote(address, options)
    try:
        remote.log_in()
    finally:
        remote.close()
