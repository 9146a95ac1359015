"""The records of the store and their binary forms: ``Node`` (one file, folder, symlink or
local-only special file: FIFO, socket, device node),
its flags, ``Held`` (a file's size and times while it is written), the checksum records
``ContentSum`` and ``BaseSum``, the key forms, and the store's error and its message.

Owns: what a record means and how it is packed. Must not touch: LMDB, files, the network.
Every value is sealed by the codec with its key when ``index`` writes it (``crypto``); this
module only packs and unpacks the plain bodies.
"""

from __future__ import annotations

import shlex
import stat as stat_mod
import struct
from dataclasses import dataclass
from pathlib import Path

SCHEMA = b"2"
#: beside ``index/``, made with the index (see the layout in ``index``'s docstring)
INDEX_MARK = "index-made"
#: what ``INDEX_MARK`` holds: its first words tell a cache's mark from a file of that name
INDEX_MARK_TEXT = (b"this cache has an index (index/data.mdb): if it is missing or empty, "
                   b"the cache is damaged (see 'cachefs recover')\n")
ROOT_INO = 1
FIRST_INO = 16  # 2..15 are reserved for the virtual .cachefs files

_U64 = struct.Struct(">Q")

# Node flags
LISTED = 1 << 0  # directory: the entries db holds its complete listing
FULL = 1 << 1  # file: the whole content is in data/<ino>
PINNED = 1 << 2  # available offline: fetched whole, never evicted
DIRTY = 1 << 3  # has changes that are not on the remote yet
CONFLICT = 1 << 4
TARGET = 1 << 5  # symlink: ``target`` is known
ORPHAN = 1 << 6  # unlinked here while still open: removed at the last release
ATTR_DIRTY = 1 << 7  # mode or times changed here, not yet on the remote
#: file: the kernel may be writing its content file itself (a passthrough writer is open),
#: so the content file's length and mtime, not the record's, are the truth after a kill
KERNEL_WRITES = 1 << 8
#: file: open for writing through this mount, its size and times held in memory between
#: commits (``Store.held``), so the content file's length and mtime are the truth after a kill
WRITING = 1 << 9
#: file: what was left of a local version whose content failed its checksum at replay: kept
#: here only (never uploaded as it is), kept by listings (it is on no server) and never evicted
DAMAGED = 1 << 10
#: a local version whose change the remote refused for good (permission, quota): kept here
#: as it is, by listings too, until it changes again or its conflict is resolved
KEPT = 1 << 11
#: the owner (uid, gid) was set here (a chown, or a creation with ``--owners remote``): sent
#: to the server with the node's next upload, mkdir or ``setattr`` (with ATTR_DIRTY or
#: DIRTY, which make it local truth); cleared when a ``setattr`` has sent it
OWNER_DIRTY = 1 << 12
#: a FIFO, socket or device node made here: it lives in this cache only, never journaled nor
#: sent (SFTP cannot make one), kept by listings that do not show its name; a server object
#: listed under its name takes the name and it moves to a conflict-style name. A device
#: node's number is kept in ``target`` (``Node.rdev``). The top bit of the 16-bit flags.
LOCAL_ONLY = 1 << 15
#: what a listing or a revalidation of the server's version must not replace: local changes
#: not yet replayed, a damaged copy (on no server), a version the server refused
LOCAL_TRUTH = DIRTY | ATTR_DIRTY | DAMAGED | KEPT


#: a remote version: (size, mtime_ns, kind) (``Node.base``, ``BaseSum``)
Version = tuple[int, int, int]


@dataclass(slots=True)
class Held:
    """A file's size and times while it is being written, ahead of its record (``WRITING``):
    a write changes them here, not in the index, which takes them with its next write of
    the record (any) or at the checkpoint after the last writer's release.
    ``open``: a writer is open and the record is marked (DIRTY, journaled, ``WRITING``)
    since it opened, so writes need no commit."""

    size: int
    mtime_ns: int
    ctime_ns: int
    open: bool = True


@dataclass(frozen=True, slots=True)
class ContentSum:
    """The checksum of a file's changed content, recorded when that content was committed."""

    gen: int  # the node's content generation it is for
    size: int
    digest: bytes  # SHA-256

    _FORMAT = struct.Struct("<BQQ32s")

    def pack(self) -> bytes:
        return self._FORMAT.pack(1, self.gen, self.size, self.digest)

    @classmethod
    def unpack(cls, ino: int, data: bytes) -> "ContentSum":
        if len(data) != cls._FORMAT.size or data[0] != 1:
            raise StoreError(f"node {ino}: content sum record of an unknown form")
        _v, gen, size, digest = cls._FORMAT.unpack(data)
        return cls(gen, size, digest)


@dataclass(frozen=True, slots=True)
class BaseSum:
    """The checksum of the remote version a file last agreed with (its ``base``)."""

    version: tuple[int, int, int]
    digest: bytes  # SHA-256

    _FORMAT = struct.Struct("<BqqI32s")

    def pack(self) -> bytes:
        return self._FORMAT.pack(1, *self.version, self.digest)

    @classmethod
    def unpack(cls, ino: int, data: bytes) -> "BaseSum":
        if len(data) != cls._FORMAT.size or data[0] != 1:
            raise StoreError(f"node {ino}: base sum record of an unknown form")
        _v, size, mtime, kind, digest = cls._FORMAT.unpack(data)
        return cls((size, mtime, kind), digest)


def _sum_key(ino: int, kind: bytes) -> bytes:
    return _U64.pack(ino) + kind


class StoreError(Exception):
    """The cache directory cannot be used (locked, corrupt, other schema, unsafe mode)."""


def index_damaged(cache_dir: Path, what: object) -> str:
    """The one message for a damaged cache index, at start-up and while serving: what is
    damaged, and how to save the changes it held."""
    where = shlex.quote(str(cache_dir))
    return (f"the cache index in {cache_dir} is damaged ({what}); changes not yet on the server "
            f"can be saved with 'cachefs recover {where} --to DIR', then move {where} away "
            "(or mount with another --cache-dir)")


@dataclass(slots=True)
class Node:
    ino: int
    parent: int
    name: bytes
    mode: int
    size: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    flags: int = 0
    base: tuple[int, int, int] | None = None  # remote (size, mtime_ns, kind) we agree with
    last_use: float = 0.0
    target: bytes = b""  # a symlink's target; a local-only device node's number (``rdev``)
    gen: int = 0  # content generation: +1 at each local change of content
    synced_gen: int = 0  # the generation last uploaded to the remote

    _HEAD = struct.Struct("<BHIIIIQqqqQqqIdHIQQ")
    _VERSION = 1

    @property
    def is_dir(self) -> bool:
        return stat_mod.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat_mod.S_ISLNK(self.mode)

    @property
    def is_file(self) -> bool:
        return stat_mod.S_ISREG(self.mode)

    @property
    def rdev(self) -> int:
        """A device node's number (``st_rdev``), kept in ``target`` (a record of the same
        version as before: caches written by earlier releases read as they were)."""
        if self.flags & LOCAL_ONLY and len(self.target) == 8:
            return int(_U64.unpack(self.target)[0])
        return 0

    @staticmethod
    def rdev_target(rdev: int) -> bytes:
        """What ``target`` holds for a device node of number ``rdev``."""
        return _U64.pack(rdev) if rdev else b""

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    def pack(self) -> bytes:
        base = self.base or (-1, 0, 0)
        head = self._HEAD.pack(
            self._VERSION, self.flags, self.mode, self.uid, self.gid, self.nlink,
            self.size, self.mtime_ns, self.atime_ns, self.ctime_ns, self.parent,
            base[0], base[1], base[2], self.last_use, len(self.name), len(self.target),
            self.gen, self.synced_gen,
        )
        return head + self.name + self.target

    @classmethod
    def parent_and_name(cls, ino: int, data: bytes) -> tuple[int, bytes]:
        """Only the parent and the name of a packed record: a path walk needs no more, and
        building a whole ``Node`` per step cost a path of five steps ~20 us."""
        if not data or data[0] != cls._VERSION:
            raise StoreError(f"node {ino}: record version {data[:1]!r} is not one this release reads")
        parent = _PARENT.unpack_from(data, _PARENT_AT)[0]
        name_len = _NAME_LEN.unpack_from(data, _NAME_LEN_AT)[0]
        name = bytes(data[cls._HEAD.size:cls._HEAD.size + name_len])
        if len(name) != name_len:
            raise StoreError(f"node {ino}: truncated record")
        return parent, name

    @classmethod
    def unpack(cls, ino: int, data: bytes) -> "Node":
        if not data or data[0] != cls._VERSION:
            raise StoreError(f"node {ino}: record version {data[:1]!r} is not one this release reads")
        (_v, flags, mode, uid, gid, nlink, size, mtime, atime, ctime, parent,
         bsize, bmtime, bkind, last_use, name_len, target_len, gen, synced_gen) = cls._HEAD.unpack_from(data)
        off = cls._HEAD.size
        name = bytes(data[off:off + name_len])
        target = bytes(data[off + name_len:off + name_len + target_len])
        if len(name) != name_len or len(target) != target_len:
            raise StoreError(f"node {ino}: truncated record")
        # (positional: a folder's listing reads a thousand of these at a time)
        return cls(ino, parent, name, mode, size, mtime, atime, ctime, uid, gid, nlink, flags,
                   None if bsize < 0 else (bsize, bmtime, bkind), last_use, target, gen, synced_gen)


# Where ``Node.parent_and_name`` finds them in a packed record: the sizes of the fields
# before them (``_HEAD`` is unaligned), parent being the 11th field and name_len the 16th.
_FIELDS = Node._HEAD.format.lstrip("<")
_PARENT, _PARENT_AT = struct.Struct("<Q"), struct.calcsize("<" + _FIELDS[:10])
_NAME_LEN, _NAME_LEN_AT = struct.Struct("<H"), struct.calcsize("<" + _FIELDS[:15])
assert (_FIELDS[10], _FIELDS[15]) == ("Q", "H")


def _key(ino: int) -> bytes:
    return _U64.pack(ino)
