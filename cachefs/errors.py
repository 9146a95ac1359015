"""Every exception that carries an errno or crosses a layer, in one module at the bottom.

``cachefs.fs`` maps them to errno in one table (``fs._errno_of``); the command line and the
control file map ``SyncFailed`` and ``CommandError`` to their messages. Owns no state and
imports nothing of cachefs: every layer may raise these.

- ``CacheError`` and its kinds: a request the cache refuses, as a local filesystem would.
- ``RemoteError``: the remote answered with an errno. ``RemoteUnreachable``: it could not be
  reached (transient). ``RemoteRefused``: it must not be used until the user acts.
- ``Unavailable``: the link layer will not call the remote now (offline).
- ``ContentDamaged``: local content failed its checksum while being uploaded.
- ``SyncFailed``: a requested reconciliation did not complete. ``CommandError``: a control
  file command was malformed or refused.
"""

from __future__ import annotations

import errno

#: The errno a program sees when it needs content that was never cached while offline.
OFFLINE_ERRNO = errno.EHOSTDOWN


class CacheError(Exception):
    """A request the cache refuses, with the errno a local filesystem would give."""

    errno: int = errno.EIO

    def __init__(self, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(self.errno, ""))


class NotFound(CacheError):
    errno = errno.ENOENT


class NotADirectory(CacheError):
    errno = errno.ENOTDIR


class IsADirectory(CacheError):
    errno = errno.EISDIR


class InvalidArgument(CacheError):
    errno = errno.EINVAL


class Exists(CacheError):
    errno = errno.EEXIST


class NotEmpty(CacheError):
    errno = errno.ENOTEMPTY


class NameTooLong(CacheError):
    errno = errno.ENAMETOOLONG


class PermissionDenied(CacheError):
    errno = errno.EPERM


class Busy(CacheError):
    errno = errno.EBUSY


class CodedError(CacheError):
    """A refusal whose errno is the instance's (its kinds below say which)."""

    def __init__(self, code: int, message: str = "") -> None:
        self.errno = code
        super().__init__(message)


class NotCarried(CodedError):
    """A name or an object the remote cannot carry (``Remote.name_error``, a symlink or a
    hard link where ``Capabilities`` say none), refused at once (EPERM for links, as vfat
    answers; EINVAL, EILSEQ for names)."""


class XattrRefused(CodedError):
    """An extended attribute request refused as ext4 refuses it (ERANGE, E2BIG, ENOSPC,
    EEXIST, ENODATA, ENOTSUP, EPERM)."""


class RemoteError(OSError):
    """The remote answered, with an error that maps to ``errno`` (ENOENT, EACCES, ...)."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(err, message or errno.errorcode.get(err, "remote error"))


class RemoteUnreachable(Exception):
    """The remote could not be reached or stopped answering (refused, reset, timeout).

    Transient: the caller moves the mount offline and probes until it comes back.
    """


class RemoteRefused(Exception):
    """The remote must not be used: unknown or changed host key, failed authentication,
    a share path that does not exist or is not a directory. Permanent until the user acts;
    the message says what to do.
    """


class ContentDamaged(Exception):
    """The local content an upload was reading failed its checksum (cut short, gone, or
    other bytes than were committed): the upload stopped before its temporary file was
    renamed over the target, so the remote keeps what it had. Not an ``OSError``: it is
    no fault of the connection or of the remote."""


class Unavailable(Exception):
    """The remote cannot be used now (offline, or it just failed)."""


class SyncFailed(Exception):
    """A requested reconciliation did not complete; the message says why."""

    def __init__(self, message: str, err: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = err


class CommandError(Exception):
    """A malformed, unknown or refused command: the write fails with ``errno``."""

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = err


__all__ = ["OFFLINE_ERRNO", "CacheError", "Busy", "NotFound", "NotADirectory", "IsADirectory",
           "InvalidArgument", "Exists", "NotEmpty", "NameTooLong", "PermissionDenied",
           "RemoteError", "RemoteUnreachable", "RemoteRefused", "ContentDamaged", "Unavailable",
           "SyncFailed", "CommandError"]
