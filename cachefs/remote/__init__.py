"""Remote backends. ``open_remote`` picks one for a parsed address."""

from __future__ import annotations

from ..address import RemoteAddress
from .base import Remote, RemoteError, RemoteRefused, RemoteStat, RemoteUnreachable, SpaceInfo
from .options import ConnectOptions

__all__ = [
    "ConnectOptions",
    "Remote",
    "RemoteError",
    "RemoteRefused",
    "RemoteStat",
    "RemoteUnreachable",
    "SpaceInfo",
    "open_remote",
]


def open_remote(address: RemoteAddress, options: ConnectOptions) -> Remote:
    """Build (not yet connect) the backend for ``address``."""
    if address.scheme == "file":
        from .local import LocalRemote

        return LocalRemote(address.path, timeout=options.timeout)
    from .sftp import SftpRemote

    return SftpRemote(address, options)
