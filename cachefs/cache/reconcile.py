"""The cache's side of reconciliation: what the replay of a journal entry changes in the
store, as named operations the sync manager calls (it never writes a node, an entry or a
content file itself).

Owns: the invariant "a node and its content" where the replay makes or changes one: a
copy's content is copied and synced to disk *before* the commit that names it (a kill at
any point leaves the entry to replay again and at most a stray content file, or the copy
whole with its content; never a ``FULL`` node whose file reads empty), a copy nothing
names is removed again, and a name that shows the server's version again holds none of
ours (its ranges forgotten, fetched on use).
Must not touch: the remote, the journal's order (the sync manager deletes and rewrites
entries with the store's journal operations), conflict records, FUSE.

Lock and ordering: each ``Txn`` operation here runs inside the caller's one write
transaction (``Store.transact``), the one that also deletes the journal entry, so the
node's new state and the entry's end commit together. ``copy_content`` runs its copy in a
worker thread (it touches only the two content files) and takes no transaction open
across the await. Nothing here awaits inside a transaction.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import trio

from ..remote.base import RemoteStat
from ..store.crypto import PlainContent
from ..store.index import (ATTR_DIRTY, CONFLICT, DAMAGED, DIRTY, FULL, KEPT, KERNEL_WRITES, OWNER_DIRTY, WRITING, Node,
                           Store, Txn)
from ..store.journal import Op
from ..store.records import Version



class ChangedWhileSent(Exception):
    """The file was written again while its upload read it (or while its conflict copy
    was made): the transaction stops, the entry stays, and the next pass sends the new
    version."""


def damaged_name(name: bytes, when: float, taken: Callable[[bytes], bool]) -> bytes:
    """``NAME (damaged YYYY-MM-DD HHMMSS).EXT``, or ``... HHMMSS 2).EXT`` and on while
    ``taken(name)``: the local name of what was left of a version that failed its checksum
    (on no server, so it needs no host in it). Cut at a character boundary when long."""
    stamp = datetime.fromtimestamp(when).strftime("%Y-%m-%d %H%M%S")
    dot = name.rfind(b".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, b"")
    for number in range(1, 1000):
        tag = f" (damaged {stamp}{'' if number == 1 else f' {number}'})".encode()
        s, e = (stem, ext) if 255 - len(tag) - len(ext) >= 1 else (name, b"")
        cut = s[:255 - len(tag) - len(e)]
        cut = cut.decode("utf-8", "ignore").encode() if cut != s and _utf8(s) else cut
        candidate = cut + tag + e
        if not taken(candidate):
            return candidate
    raise OSError(errno.EEXIST, "no free name for a damaged copy")


def _utf8(name: bytes) -> bool:
    try:
        name.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@dataclass
class ContentCopy:
    """A new inode number and a content file holding ``copied`` of the ``wanted`` bytes
    of another node's content, synced; ``placed`` once a committed node names it."""
    ino: int
    copied: int
    wanted: int
    placed: bool = False


class Reconcile:
    """Named store changes of the replay. ``writing(ino)``: whether a handle holds the
    file open for writing (its content is not final: close-to-open)."""

    def __init__(self, store: Store, writing: Callable[[int], bool]) -> None:
        self.store = store
        self.writing = writing

    # -- checks ----------------------------------------------------------------------------
    def unchanged(self, t: Txn, op: Op, gen: int, doing: str) -> Node | None:
        """The node of ``op`` in ``t`` (None if gone), if it was not written since its
        version ``gen`` was looked at; else ``ChangedWhileSent`` stops the transaction
        (the entry stays)."""
        n = t.node(op.ino)
        if n is not None and (n.gen != gen or self.writing(op.ino)):
            raise ChangedWhileSent(f"{op.path!r} was written while {doing}: sent at its release")
        return n

    # -- agreement -------------------------------------------------------------------------
    @staticmethod
    def agree(t: Txn, ino: int, version: Version, gen: int | None, owner: tuple[int, int] | None = None,
              sent: tuple[int, int] | None = None) -> None:
        """The server holds ``version`` of the node (produced by the replay): its new base.
        ``gen``: the version of our content that is now there (None: not a content
        change), whose checksum becomes the base version's (what ``sync.sums`` compares
        the server's hash with); a file written again during the upload gets one more
        ``store`` entry. ``owner``: that version's there, taken (the owner a later upload
        keeps) unless an owner set here is still to go (``OWNER_DIRTY``, other than the
        ``sent`` one, which is then on the server: no longer to send)."""
        t.set_produced(ino, version)
        n = t.node(ino)
        if n is None:
            return
        n.base = version
        if owner is not None and (not n.flags & OWNER_DIRTY or (n.uid, n.gid) == sent):
            n.uid, n.gid = owner
            n.flags &= ~OWNER_DIRTY
        if gen is not None:
            found = t.content_sum(ino)
            if found is not None and found.gen == gen:
                t.set_base_sum(ino, n.base, found.digest)
            else:
                t.drop_base_sum(ino)
            n.synced_gen = gen
            if n.gen == gen:
                n.flags &= ~(DIRTY | KEPT)
            else:  # written again during the upload: one more upload to come
                t.append(Op("store", ino, t.path_of(ino), base=n.base, parent=n.parent))
        t.put(n)

    @staticmethod
    def attributes_sent(t: Txn, op: Op, sent: tuple[int, int, int],
                        owner: tuple[int, int] | None = None, owner_sent: bool = False) -> None:
        """The node's (mode, atime, mtime) ``sent`` (and ``owner``, when ``owner_sent``) are
        on the server: clean, unless they changed again meanwhile (``ATTR_DIRTY`` is not
        journaled): then a new entry. ``owner``: the node's owner when they were read
        (``--owners remote``), sent or not: a chown made while they were on the way is
        not journaled either (``ATTR_DIRTY`` was set), so it too needs the new entry."""
        n = t.node(op.ino)
        if n is None:
            return
        owner_same = owner is None or (n.uid, n.gid) == owner
        if (stat_mod.S_IMODE(n.mode), n.atime_ns, n.mtime_ns) == sent and owner_same:
            n.flags &= ~(ATTR_DIRTY | KEPT | (OWNER_DIRTY if owner_sent else 0))
            t.put(n)
        else:
            t.append(Op("setattr", op.ino, t.path_of(op.ino), base=n.base, parent=n.parent))

    @staticmethod
    def owner_pending(t: Txn, ino: int) -> None:
        """The owner set here (``OWNER_DIRTY``) did not go with the node's creation: one
        ``setattr`` entry sends it (a refusal is then recorded as any setattr's)."""
        n = t.node(ino)
        if n is None or n.flags & ATTR_DIRTY or not n.flags & OWNER_DIRTY:
            return
        n.flags |= ATTR_DIRTY
        t.put(n)
        t.append(Op("setattr", ino, t.path_of(ino), base=n.base, parent=n.parent))

    @staticmethod
    def refused(t: Txn, ino: int) -> None:
        """The remote refused the change for good: the local version stays cached, marked
        as a conflict (never evicted) and ``KEPT`` (a listing of the server's version does
        not replace it), and later changes are journaled anew."""
        n = t.node(ino)
        if n is not None:
            n.flags = (n.flags & ~(DIRTY | ATTR_DIRTY)) | CONFLICT | KEPT
            t.put(n)

    # -- copies ----------------------------------------------------------------------------
    async def copy_content(self, ino: int, size: int) -> ContentCopy:
        """A new inode number and a copy of what can be read of ``ino``'s content (at most
        ``size`` bytes) in its content file, synced: made before the commit that names the
        copy. (The content file was renamed after that commit once: a kill in between left
        a ``FULL`` copy that read empty, never fetched again.) ``discard`` it unless a
        committed node names it."""
        new = self.store.transact(lambda t: t.new_ino())
        copied = await trio.to_thread.run_sync(_copy_left, self.store.content, self.store.content_path(ino),
                                               self.store.content_path(new), size)
        return ContentCopy(new, copied, size)

    def discard(self, copy: ContentCopy) -> None:
        """The copy's content file, unless a committed node names it."""
        if not copy.placed:
            self.store.remove_content_file(copy.ino)

    @staticmethod
    def keep_conflict_copy(t: Txn, copy: ContentCopy, n: Node, parent: int, name: bytes,
                           base: Version, gen: int) -> None:
        """Our version ``gen`` of ``n``, uploaded as the server's ``base`` under ``name``,
        stays cached there whole: only when the copy holds all of it, the folder is still
        here and the name free (else the server's copy is fetched on use)."""
        if copy.copied != copy.wanted or t.node(parent) is None or t.child_ino(parent, name) is not None:
            return
        t.put(Node(ino=copy.ino, parent=parent, name=name, mode=n.mode, size=n.size,
                   mtime_ns=n.mtime_ns, atime_ns=n.atime_ns, ctime_ns=n.ctime_ns,
                   uid=n.uid, gid=n.gid, flags=FULL, base=base, gen=gen, synced_gen=gen))
        t.set_entry(parent, name, copy.ino)
        copy.placed = True

    @staticmethod
    def move_xattrs(t: Txn, copy: ContentCopy, ino: int, carried: bool) -> None:
        """The extended attributes of node ``ino`` go with our version, now the conflict
        copy ``copy``: its record, when the copy is placed; the name shows the server's
        version, whose attributes are read again (none of ours on it; the caller drops
        ``ino``'s ``xattr`` entries still pending: the copy's upload carried their values).
        Over a remote that keeps none, with no copy placed here, the record stays on
        ``ino``: the only copy."""
        found = t.xattrs(ino)
        if copy.placed and found is not None:
            t.set_xattrs(copy.ino, found)
        if copy.placed or carried:
            t.delete_xattrs(ino)

    @staticmethod
    def rehome(t: Txn, ino: int, parent: int, name: bytes, new_name: bytes) -> bool:
        """The server moved our node ``ino`` (at ``name`` in ``parent``) aside to
        ``new_name``, its name there now another's: it keeps its number, content and
        extended attributes under ``new_name`` here too. False (nothing changed) when that
        name is taken here, the node is gone, or it has other names (hard links)."""
        n = t.node(ino)
        if n is None or (n.is_file and n.nlink > 1) or n.parent != parent or n.name != name \
                or t.child_ino(parent, name) != ino or t.child_ino(parent, new_name) is not None:
            return False
        t.delete_entry(parent, name)
        t.set_entry(parent, new_name, ino)
        n.name = new_name
        t.put(n)
        return True

    @staticmethod
    def keep_damaged_copy(t: Txn, copy: ContentCopy, n: Node, when: float) -> bytes | None:
        """What was left of our damaged version of ``n`` (``copy``, when any) stays here
        only, under ``NAME (damaged ...)``: ``DAMAGED``, kept by listings, never evicted,
        never uploaded as it is. Its name, or None when nothing was kept."""
        if not copy.copied or t.node(n.parent) is None:
            return None
        name = damaged_name(n.name, when, lambda c: t.child_ino(n.parent, c) is not None)
        t.put(Node(ino=copy.ino, parent=n.parent, name=name, mode=n.mode, size=copy.copied,
                   mtime_ns=n.mtime_ns, atime_ns=n.atime_ns, ctime_ns=n.ctime_ns,
                   flags=FULL | CONFLICT | DAMAGED, gen=n.gen, synced_gen=n.gen))
        t.set_entry(n.parent, name, copy.ino)
        copy.placed = True
        return name

    @staticmethod
    def show_server_version(t: Txn, n: Node, remote: RemoteStat, gen: int) -> None:
        """Changed on both sides, ours kept beside: the name shows the server's version
        ``remote``, fetched on next use (none of what the node held is the server's)."""
        n.base = remote.version()
        n.flags &= ~(DIRTY | FULL | ATTR_DIRTY)
        n.flags |= CONFLICT
        n.size, n.mtime_ns, n.mode = remote.size, remote.mtime_ns, remote.mode
        n.synced_gen = n.gen = gen
        t.forget_ranges(n.ino)
        t.put(n)

    @staticmethod
    def drop_damaged(t: Txn, n: Node, remote: RemoteStat) -> None:
        """Our version failed its checksum and is not uploaded: the name shows the
        server's version ``remote`` from now on, fetched on use, with no write pending."""
        n.base = remote.version()
        n.flags &= ~(DIRTY | FULL | ATTR_DIRTY | WRITING | KERNEL_WRITES)
        n.flags |= CONFLICT
        n.size, n.mtime_ns, n.mode = remote.size, remote.mtime_ns, remote.mode
        n.synced_gen = n.gen
        t.drop_base_sum(n.ino)
        t.forget_ranges(n.ino)
        t.put(n)


def _copy_left(content: PlainContent, content_path: str, copy_path: str, size: int) -> int:
    """Copy what can still be read of a content file from its start, at most ``size``
    bytes (up to its end, or to the first sealed block that does not open), into a new
    content file, synced to disk; how many bytes (0 when it is gone)."""
    try:
        fd = os.open(content_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    out = os.open(copy_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        end = min(size, content.length(fd))
        done = 0
        while done < end:
            step = min(end - done, 1 << 16)
            try:
                data = content.pread(fd, step, done)
            except OSError:
                break
            if not data:
                break
            content.pwrite(out, data, done)
            done += len(data)
        os.fsync(out)
        return done
    finally:
        os.close(fd)
        os.close(out)
