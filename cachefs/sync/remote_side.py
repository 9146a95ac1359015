"""The replay's calls on the server: look, make folders, rename without replacing,
upload, compare content.

Owns: nothing but the ways these calls are made (every one through ``Connectivity.call``,
so that offline they raise ``Unavailable`` and each has its timeout), and the upload jobs
(``Transfers``) the daemon handed over.
Must not touch: the store beyond reading (content paths, recorded checksums), the
journal, the cache.
Lock/ordering: no state of its own; each call awaits the remote, with no transaction open.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat as stat_mod

import trio

from ..cache.transfer import Transfers
from ..errors import ContentDamaged, RemoteError
from ..paths import join
from ..link.connectivity import Connectivity
from ..remote import Remote, RemoteStat
from ..store.crypto import PlainContent
from ..store.index import OWNER_DIRTY, Node, Store
from ..store.xattrs import XattrSet
from .naming import temp_name

log = logging.getLogger(__name__)


class RemoteSide:
    def __init__(self, store: Store, conn: Connectivity, transfers: Transfers, client: str,
                 remote_owners: bool = False) -> None:
        self.store = store
        self.conn = conn
        self.remote: Remote = conn.remote
        self.transfers = transfers
        self.client = client  # what temporary names made by this cache carry
        #: --owners remote: owners set here go to the server, and uploads keep a file's owner
        self.remote_owners = remote_owners

    def owner_of(self, node: Node) -> tuple[int, int] | None:
        """The owner an upload (a new file renamed over the old) gives the file: with
        ``--owners remote``, the node's when it was set here or came from the server (the
        new file would be the SSH user's); else none (the server's default, as before)."""
        if self.remote_owners and (node.flags & OWNER_DIRTY or node.base is not None):
            return node.uid, node.gid
        return None

    def owner_kept(self, node: Node) -> bool:
        """Whether ``owner_of`` is only the owner last seen there (none set here): an upload
        that looks at the file first gives it the owner it finds instead (a chown made on
        the server changes no version)."""
        return self.remote_owners and not node.flags & OWNER_DIRTY

    async def stat(self, path: bytes) -> RemoteStat | None:
        try:
            return await self.conn.call(self.remote.stat, path)
        except RemoteError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise

    async def remove_temporary(self, path: bytes, seq: int) -> None:
        """Remove the temporary file an upload of ``path`` for entry ``seq`` may have left
        beside it (nothing there is fine)."""
        await self.remove_left(join(path.rpartition(b"/")[0], self.temp_name(path, seq)),
                               "the temporary file of a cut upload")

    async def remove_left(self, path: bytes, what: str, found: RemoteStat | None = None) -> None:
        """Remove ``path``, ``what`` an upload cut by a crash left on the server: gone
        already is fine, and a refusal is logged, never a reason to stop the replay.
        ``found``: only while it is still that version (``unlink_if``; a version written
        there since stays)."""
        try:
            if found is None:
                await self.conn.call(self.remote.unlink, path)
            else:
                await self.conn.call(self.remote.unlink_if, path, found.version())
        except RemoteError as exc:
            if exc.errno == errno.ESTALE and found is not None:
                log.info("left %r (%s): it changed on the server since it was looked at", path, what)
            elif exc.errno != errno.ENOENT:
                log.warning("could not remove %r (%s): %s", path, what, exc)

    async def remove_landed(self, path: bytes, found: RemoteStat) -> None:
        """Remove ``found``, our upload that landed at ``path`` before a crash (its file
        deleted here since), only while it is still that version."""
        log.info("removing %r: the upload of a file deleted here since had landed before a crash", path)
        await self.remove_left(path, "the upload of a file deleted here since", found)

    async def make_parents(self, path: bytes) -> bool:
        """Re-create missing folders above ``path``; True if any was missing."""
        parts = path.split(b"/")[:-1]
        made = False
        for i in range(1, len(parts) + 1):
            folder = b"/".join(parts[:i])
            st = await self.stat(folder)
            if st is None:
                try:
                    await self.conn.call(self.remote.mkdir, folder, 0o755)
                except RemoteError:
                    # Made meanwhile by the replay of something else in it (side by side)?
                    st = await self.stat(folder)
                    if st is None or not stat_mod.S_ISDIR(st.mode):
                        raise
                made = True
        return made

    async def rename_exclusive(self, src: bytes, dst: bytes) -> None:
        """Rename ``src`` to ``dst`` unless ``dst`` exists (``RemoteError(EEXIST)``). A
        server whose exclusive rename fails for another reason (OpenSSH's link() on a file
        system without hard links may) gets a plain rename once ``dst`` is seen absent."""
        try:
            await self.conn.call(self.remote.rename_noreplace, src, dst)
            return
        except RemoteError as exc:
            if exc.errno == errno.EEXIST:
                raise
            if await self.stat(dst) is not None:
                raise RemoteError(errno.EEXIST, "rename: the target exists") from exc
            if await self.stat(src) is None:
                raise
            log.debug("exclusive rename of %r refused (%s): a plain rename", src, exc)
        await self.conn.call(self.remote.rename, src, dst)

    def temp_name(self, path: bytes, seq: int, kind: bytes = b"tmp") -> bytes:
        return temp_name(path, seq, self.client, kind)

    def sum_of(self, node: Node) -> bytes | None:
        """The checksum recorded when the node's current content was committed."""
        found = self.store.content_sum(node.ino)
        if found is None or found.gen != node.gen or found.size != node.size:
            return None
        return found.digest

    async def upload(self, node: Node, path: bytes, seq: int, keep_owner: bool = False) -> RemoteStat:
        """The node's content to ``path`` (through a temporary name), checked against its
        recorded checksum as it is read (``ContentDamaged``). ``keep_owner``: the file
        there keeps its owner (``owner_kept``; one STAT more, only then)."""
        temp = self.temp_name(path, seq)
        digest = self.sum_of(node)
        if digest is None:
            raise ContentDamaged(f"no checksum of inode {node.ino}'s content was recorded")
        owner = self.owner_of(node)
        if owner is not None and keep_owner:
            there = await self.stat(path)  # (a chown made there is no new version)
            if there is not None:
                owner = (there.uid, there.gid)
        stat: RemoteStat = await self.conn.call(
            self.transfers.upload, node.size, path, self.store.content_path(node.ino),
            stat_mod.S_IMODE(node.mode), temp, node.atime_ns, node.mtime_ns, digest, owner,
            bulk=True)
        return stat

    async def carry_xattrs(self, ino: int, path: bytes) -> XattrSet | None:
        """The node's ``user.`` extended attributes set on ``path`` (a new file of ours:
        a conflict copy on its way), where the remote keeps them: the record carried, all
        of it set there; None when not (none kept there, or one refused: logged, and the
        attributes stay in this cache with the copy, their entries going to it)."""
        found = self.store.get_xattrs(ino) if self.remote.capabilities.xattrs else None
        if found is None:
            return None
        for name in found.names():
            value = found.get(name)
            if value is None:
                continue
            try:
                await self.conn.call(self.remote.set_xattr, path, name, value)
            except RemoteError as exc:
                log.warning("extended attribute %r not set on %r (kept here): %s", name, path, exc)
                return None
        return found

    async def same_content(self, node: Node, path: bytes, remote: RemoteStat) -> bool:
        """Whether the remote file holds our content: compared with our content's
        checksum as committed (never with bytes read back from a content file that may be
        damaged), by a hash the server computes where it can, else by reading it."""
        if remote.size != node.size or not stat_mod.S_ISREG(remote.mode):
            return False
        ours = self.sum_of(node)
        if ours is not None and self.remote.can_hash is not False:
            try:
                theirs = await self.conn.call(self.remote.hash_files, [path])
            except RemoteError:
                theirs = None
            if theirs and theirs[0] is not None:
                return theirs[0] == ours
        if node.size > 64 << 20:
            return False  # too costly to compare: treat as a conflict (both kept)
        data = await self.conn.call(self.remote.read, path, 0, node.size + 1, bulk=True)
        # (hashes of up to 64 MiB: in a worker thread, never on the trio thread)
        read_sum = await trio.to_thread.run_sync(_sha256, data)
        if ours is None:
            ours = await trio.to_thread.run_sync(_content_sha256, self.store.content,
                                                 self.store.content_path(node.ino), node.size)
        return read_sum == ours


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _content_sha256(content: PlainContent, content_path: str, size: int) -> bytes:
    fd = os.open(content_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with content.reader(fd, size) as stream:
            return _sha256(stream.read(size))
    finally:
        os.close(fd)
