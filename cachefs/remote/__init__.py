"""Remote backends (handlers). ``open_remote`` picks one for a parsed address by its scheme:
the built-ins (``BUILTIN_HANDLERS``) and third-party handlers registered in the
``cachefs.remotes`` entry point group (docs/handlers.md: the contract they keep).

Owns nothing itself; the modules, each importing only those listed after it:

    local          a directory as the share (LocalRemote)
    smb            a folder of an SMB 2/3 share (SmbRemote, smbprotocol)
    dav            a WebDAV folder (DavRemote, httpx)
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
from .base import Capabilities, Remote, RemoteError, RemoteRefused, RemoteStat, RemoteUnreachable, SpaceInfo
from .watch import Watch, WatchEnded
from .options import ConnectOptions
from .pacing import Pacer

__all__ = [
    "BUILTIN_HANDLERS",
    "Capabilities",
    "ConnectOptions",
    "Remote",
    "RemoteError",
    "RemoteRefused",
    "RemoteStat",
    "RemoteUnreachable",
    "SpaceInfo",
    "Watch",
    "WatchEnded",
    "handler_for",
    "handlers",
    "log_in_ahead",
    "open_remote",
]


#: the handlers that come with cachefs, by scheme: "module:Class" (imported only when used)
BUILTIN_HANDLERS = {
    "file": "cachefs.remote.local:LocalRemote",
    "sftp": "cachefs.remote.sftp:SftpRemote",
    "smb": "cachefs.remote.smb:SmbRemote",
    "dav": "cachefs.remote.dav:DavRemote",
    "davs": "cachefs.remote.dav:DavRemote",
}
#: the Python entry point group third-party handlers register in (name: the scheme)
ENTRY_POINT_GROUP = "cachefs.remotes"


def handlers() -> dict[str, str]:
    """Every scheme a handler serves, and its "module:Class": the built-ins, then those
    registered in the ``cachefs.remotes`` entry point group (a built-in scheme cannot be
    taken over: what ``sftp://`` means does not depend on what else is installed)."""
    from importlib.metadata import entry_points

    found = dict(BUILTIN_HANDLERS)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(point.name.lower(), point.value)
    return found


def handler_for(scheme: str) -> type[Remote]:
    """The ``Remote`` subclass serving ``scheme``; ``ValueError`` (a one-line reason) when
    none does or its module cannot be loaded."""
    from importlib import import_module

    known = handlers()
    target = known.get(scheme)
    if target is None:
        raise ValueError(f"no handler for {scheme}:// (known: {', '.join(sorted(known))}; a "
                         f"third-party handler registers in the {ENTRY_POINT_GROUP!r} entry point group)")
    module_name, _, attribute = target.partition(":")
    try:
        handler = getattr(import_module(module_name), attribute)
    except Exception as exc:  # (a third party's module: any error it raises on import)
        raise ValueError(f"the handler of {scheme}:// ({target}) cannot be loaded: "
                         f"{type(exc).__name__}: {exc}") from None
    if not (isinstance(handler, type) and issubclass(handler, Remote)):
        raise ValueError(f"the handler of {scheme}:// ({target}) is not a cachefs.remote.Remote")
    return handler


def open_remote(address: RemoteAddress, options: ConnectOptions, pacer: Pacer | None = None) -> Remote:
    """Build (not yet connect) the backend for ``address``; ``pacer``: the upload cap
    shared with other processes (else the backend makes its own from ``options``)."""
    try:
        handler = handler_for(address.scheme)
    except ValueError as exc:
        raise RemoteRefused(str(exc)) from None
    return handler.from_address(address, options, pacer)


def log_in_ahead(address: RemoteAddress, options: ConnectOptions) -> None:
    """Log in once, asking (within ``options.secrets.asking()``) for a password or
    passphrase the login needs, so that later connections need not ask."""
    remote = open_remote(address, options)
    try:
        remote.log_in()
    finally:
        remote.close()
