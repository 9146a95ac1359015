"""A node's extended attributes: their record and ext4's limits.

Owns: ``XattrSet`` (the ``user.`` attributes of one node, what ``Store`` keeps in its
``xattrs`` sub-database under the node's number, one record per node) and its binary form;
the limits and errno of ext4 with 4 KiB blocks and 256-byte inodes, without ``ea_inode``
(``place``: where ext4 would put an attribute, or no room: ``ENOSPC``).
Must not touch: LMDB, files, the network (pure logic: ``index`` seals and stores the record).

One record per node, not one per attribute: the key (the node's number) tells nothing of
the attributes' names, encrypted or not, with no keyed hash to compute; every request
that needs one attribute needs the others too (a set checks the room left by all of
them, a list reads them all); and ext4 caps them at about 4 KiB a file, so the record
stays small.

The limits, measured on ext4 here (``tests/test_xattrs.py`` compares ``place`` with a
real ext4 file): an attribute takes ``16 + pad4(len(name without "user.")) +
pad4(len(value))`` bytes, either in the inode (88 bytes: 256 − 128 − 32 extra − 4 magic
− 4 end mark) or in one 4 KiB block (4060 bytes: 4096 − 32 header − 4 end mark). ext4 puts
a set attribute in the inode if it fits there (its old copy taken away), else in the
block; else it is ENOSPC (72 one-byte names with one-byte values is 172 attributes; one
value alone, 4040 bytes). A full name longer than 255 bytes is ERANGE, a value over
65536 bytes E2BIG (the kernel's VFS checks both before a file system sees them).
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field

from ..errors import XattrRefused

USER = b"user."
NAME_MAX = 255  # XATTR_NAME_MAX, the whole name with its namespace
SIZE_MAX = 65536  # XATTR_SIZE_MAX
INODE_SPACE = 88
BLOCK_SPACE = 4060

#: where an attribute is as ext4 would keep it
IN_INODE, IN_BLOCK, BEYOND, REMOVED = 0, 1, 2, 3

_VERSION = 1
_COMPLETE = 1
_HEAD = struct.Struct(">BB")
_ITEM = struct.Struct(">BBI")


def entry_size(name: bytes, value: bytes) -> int:
    """The bytes ext4 uses for one attribute (entry, name without its prefix, value)."""
    short = len(name) - len(USER) if name.startswith(USER) else len(name)
    return 16 + (-(-short // 4) * 4) + (-(-len(value) // 4) * 4)


def check_request(name: bytes, value: bytes | None = None) -> None:
    """ERANGE for a name too long, EINVAL for one empty after its prefix (ext4 gives that
    to set, get and remove alike), E2BIG for a value too large, as the kernel gives them."""
    if len(name) > NAME_MAX:
        raise XattrRefused(errno.ERANGE, "extended attribute name too long")
    if name == USER:
        raise XattrRefused(errno.EINVAL, "extended attribute name empty after user.")
    if value is not None and len(value) > SIZE_MAX:
        raise XattrRefused(errno.E2BIG, "extended attribute value too large")


@dataclass
class XattrSet:
    """The ``user.`` attributes of one node: name -> (where, value). ``complete``: every
    attribute the node has is here (made here, or read from a remote that carries them);
    otherwise those the remote has are still to be read, and ``REMOVED`` marks a name
    removed here meanwhile (value None), so that reading them later does not bring it back."""

    complete: bool = True
    items: dict[bytes, tuple[int, bytes | None]] = field(default_factory=dict)

    def get(self, name: bytes) -> bytes | None:
        found = self.items.get(name)
        return None if found is None else found[1]

    def names(self) -> list[bytes]:
        return [name for name, (area, _value) in self.items.items() if area != REMOVED]

    def __bool__(self) -> bool:
        return any(area != REMOVED for area, _value in self.items.values())

    def set(self, name: bytes, value: bytes) -> None:
        """Set ``name`` where ext4 would put it; ``XattrRefused(ENOSPC)`` if it has no room.
        The same value again changes nothing (ext4 leaves it where it is)."""
        found = self.items.get(name)
        if found is not None and found[0] in (IN_INODE, IN_BLOCK) and found[1] == value:
            return
        area = place(self.items, name, value)
        if area is None:
            raise XattrRefused(errno.ENOSPC, "no room for another extended attribute")
        self.items.pop(name, None)
        self.items[name] = (area, value)

    def remove(self, name: bytes) -> None:
        self.items.pop(name, None)
        if not self.complete:
            self.items[name] = (REMOVED, None)

    def take_remote(self, found: list[tuple[bytes, bytes]]) -> None:
        """The remote's attributes, read once: each one not set or removed here joins
        (where it fits; ``BEYOND`` when ext4 would have no room: the remote has it)."""
        for name, value in found:
            if name not in self.items and name.startswith(USER):
                area = place(self.items, name, value)
                self.items[name] = (BEYOND if area is None else area, value)
        self.items = {n: v for n, v in self.items.items() if v[0] != REMOVED}
        self.complete = True

    def pack(self) -> bytes:
        parts = [_HEAD.pack(_VERSION, _COMPLETE if self.complete else 0)]
        for name, (area, value) in self.items.items():
            data = value or b""
            parts += [_ITEM.pack(area, len(name), len(data)), name, data]
        return b"".join(parts)

    @classmethod
    def unpack(cls, data: bytes) -> "XattrSet":
        version, flags = _HEAD.unpack_from(data)
        if version != _VERSION:
            raise ValueError(f"extended attributes record of an unknown form ({version})")
        items: dict[bytes, tuple[int, bytes | None]] = {}
        at = _HEAD.size
        while at < len(data):
            area, name_len, value_len = _ITEM.unpack_from(data, at)
            at += _ITEM.size
            name, value = bytes(data[at:at + name_len]), bytes(data[at + name_len:at + name_len + value_len])
            at += name_len + value_len
            if at > len(data) or area > REMOVED:
                raise ValueError("extended attributes record cut short")
            items[name] = (area, None if area == REMOVED else value)
        return cls(bool(flags & _COMPLETE), items)


def place(items: dict[bytes, tuple[int, bytes | None]], name: bytes, value: bytes) -> int | None:
    """Where ext4 puts ``name`` set to ``value`` among ``items`` (its old copy replaced):
    the inode if it fits there, else the block, else None (ENOSPC). The rule of
    ``ext4_xattr_set_handle``: the inode body is tried first, the block when it is full."""
    size = entry_size(name, value)
    used = [0, 0]
    for other, (area, old) in items.items():
        if other != name and area in (IN_INODE, IN_BLOCK):
            used[area] += entry_size(other, old or b"")
    if used[IN_INODE] + size <= INODE_SPACE:
        return IN_INODE
    if used[IN_BLOCK] + size <= BLOCK_SPACE:
        return IN_BLOCK
    return None
