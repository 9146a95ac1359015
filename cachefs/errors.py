"""Domain errors raised below the FUSE layer; ``cachefs.fs`` maps them to errno in one table.

``RemoteError`` (the remote answered with an errno) and ``Unavailable`` (the remote cannot
be reached now) come from ``cachefs.remote`` and ``cachefs.sync.connectivity``.
"""

from __future__ import annotations

import errno

from .remote.base import RemoteError
from .sync.connectivity import Unavailable

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


__all__ = ["CacheError", "Busy", "NotFound", "NotADirectory", "IsADirectory",
           "InvalidArgument", "Exists", "NotEmpty", "NameTooLong", "PermissionDenied", "RemoteError", "Unavailable", "OFFLINE_ERRNO"]
