"""The remote backend interface: what cachefs asks of a share.

Owns: the contract every backend (``sftp``, ``local``) fulfils, the remote attribute
record (``RemoteStat``) and the exceptions that cross the backend boundary.
Must not touch: the cache, LMDB, trio or FUSE. Backends are plain blocking code; the
callers run them in worker threads (see ``cachefs.link.connectivity``), so every method
must be safe to call from several threads at once and must return or raise within the
backend's ``timeout`` (a network that vanishes silently must not hang a thread forever).

Paths are ``bytes`` relative to the share root, components joined by ``b"/"``; the root
itself is ``b""``. File names are bytes end to end: a name need not be UTF-8.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO, NamedTuple, TypeAlias
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..errors import ContentDamaged, RemoteError, RemoteRefused, RemoteUnreachable
from .watch import Watch, WatchEnded

if TYPE_CHECKING:
    from ..address import RemoteAddress
    from .options import ConnectOptions
    from .pacing import Pacer

__all__ = ["Capabilities", "ContentDamaged", "fold_tag", "NotExpected", "RemoteError", "RemoteRefused", "RemoteUnreachable",
           "Remote", "RemoteStat", "SpaceInfo", "Source", "Upload", "UploadOutcome", "open_source"]


class RemoteStat(NamedTuple):
    """Attributes of one remote object, as ``lstat`` gives them (symlinks not followed).

    A named tuple, not a dataclass: a listing makes one per entry, in a transfer process,
    and pickles them back; a tuple is made and unpickled several times as fast (a frozen
    dataclass sets each field through ``object.__setattr__``)."""

    mode: int  # full st_mode, file type bits included
    size: int
    mtime_ns: int
    atime_ns: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1  # SFTP v3 does not report it; the local backend does
    #: a strong version tag folded into 63 bits (0: none): a hash of an ETag, of an SMB
    #: file's id and change time; given by remotes with ``Capabilities.strong_versions``
    tag: int = 0

    @property
    def kind(self) -> int:
        return self.mode & 0o170000  # stat.S_IFMT

    def version(self) -> tuple[int, int, int]:
        """The base version: what identifies this content on the remote.

        Size, mtime (SFTP v3 gives whole seconds; the local backend nanoseconds) and the
        file type; where the remote gives a strong tag (``tag``), the tag in the mtime's
        place, so that a rewrite keeping size and mtime second is seen. Equal versions mean
        the cached copy may be kept.
        """
        return (self.size, self.tag or self.mtime_ns, self.mode & 0o170000)


def fold_tag(text: bytes) -> int:
    """A strong version tag (an ETag, an id and a change time) as ``RemoteStat.tag``: 63
    bits of its SHA-256, never 0 (0 means "no tag")."""
    import hashlib

    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1 or 1


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a remote carries, declared by each handler (``Remote.capabilities``). The
    cache, journal and sync manager decide by these, never by a backend's type: a symlink
    or hard link on a remote without them fails at once (EPERM, as vfat answers), modes
    and owners a remote does not keep stay in the cache, and so do xattrs."""

    symlinks: bool = True  # symlink/readlink
    hard_links: bool = True  # link
    #: ``upload`` replaces a file in one step: a reader there never sees half of it
    atomic_replace: bool = True
    xattrs: bool = False  # ``user.`` extended attributes (list_xattrs, set_xattr, ...)
    modes: bool = True  # permission bits are kept (chmod reaches the server)
    owners: bool = True  # uid and gid are kept (--owners remote)
    notify: bool = False  # ``watch()`` streams the changes made there
    #: ``RemoteStat.tag`` is set: a change is seen whatever size and mtime it keeps
    strong_versions: bool = False
    case_insensitive: bool = False  # "A" and "a" name the same object there
    #: an upload that expects nothing at its target (``Upload.expect(None)``) puts the
    #: file there only while the name is still free, in one step the server refuses
    #: otherwise (SMB's rename without ReplaceIfExists, WebDAV's ``Overwrite: F``): the
    #: journal may then fold "create P, rename P -> D" into one create of D
    #: (``store.journal.optimise``), which elsewhere would lose the rename's no-replace
    exclusive_create: bool = False


@dataclass(frozen=True, slots=True)
class SpaceInfo:
    """What ``statfs`` reports: sizes in blocks of ``block_size`` bytes."""

    block_size: int
    blocks: int
    blocks_free: int
    blocks_avail: int
    files: int
    files_free: int
    name_max: int = 255


class Remote(ABC):
    """One share. Blocking, thread-safe; every call bounded by ``timeout`` seconds."""

    #: Human description for status and logs, without secrets ("sftp://alice@host:22/p").
    description: str
    #: Seconds a single remote operation may take before it counts as unreachable. For
    #: transfers (``read``, ``upload``) it bounds progress, not the whole transfer: a
    #: large file on a slow link may take long, as long as bytes keep moving.
    timeout: float
    #: How many calls may usefully run at once (connections in the pool).
    parallelism: int = 4
    #: Whether large reads go faster from processes of their own (``FetchPool``): a
    #: client library that holds the GIL while it decrypts (paramiko) does.
    fetch_processes: bool = False
    #: What this remote carries (the defaults: a POSIX server over SFTP).
    capabilities: Capabilities = Capabilities()

    # -- making one ------------------------------------------------------------------
    @classmethod
    def from_address(cls, address: RemoteAddress, options: ConnectOptions,
                     pacer: Pacer | None = None) -> Remote:
        """The remote for a parsed address of this handler's scheme (not yet connected);
        ``pacer``: the upload cap shared with other processes, or None."""
        raise NotImplementedError(f"{cls.__name__} does not say how to open an address")

    def log_in(self) -> None:
        """Log in once, before the mount detaches, where a password may be asked for on a
        terminal: what is typed is remembered (``options.secrets``) for every later
        connection. Raises ``RemoteRefused`` for a refused login. Default: nothing."""

    def allow_login_again(self) -> None:
        """The user asked to go online (``cachefs online``): a login the server refused
        may be tried once more at the next connect. A handler that stops trying a refused
        password (an account lockout policy counts every failed login) forgets that here.
        Must not block (called on the event loop). Default: nothing."""

    def name_error(self, name: bytes) -> int | None:
        """The errno for a file name this remote cannot carry (None: it can). A create or
        rename to such a name fails at once with it, rather than at replay."""
        return None

    # -- connection ----------------------------------------------------------------
    @abstractmethod
    def connect(self) -> None:
        """Reach the remote and check the share root is a directory.

        Raises ``RemoteUnreachable`` (try later) or ``RemoteRefused`` (never works as is).
        Safe to call again after a failure: it reconnects.
        """

    @abstractmethod
    def ping(self) -> None:
        """A cheap round trip (a stat of the root), reconnecting if needed."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and threads. Idempotent."""

    # -- change notification ---------------------------------------------------------
    def watch(self, using: str = "auto") -> Watch:
        """Start a watcher beside the share that streams the paths changing there (see
        ``watch``); raises ``WatchEnded`` when this remote cannot (the default).
        ``using``: which watcher ("auto", "inotifywait", "python3")."""
        raise WatchEnded("this kind of remote tells no changes", retry=False)

    # -- reading -------------------------------------------------------------------
    @abstractmethod
    def stat(self, path: bytes) -> RemoteStat:
        """``lstat`` of ``path``."""

    @abstractmethod
    def listdir(self, path: bytes) -> list[tuple[bytes, RemoteStat]]:
        """Entries of a folder with their ``lstat`` attributes, without ``.`` and ``..``."""

    def listdir_many(self, paths: list[bytes]) -> list[list[tuple[bytes, RemoteStat]] | RemoteError]:
        """Several folders' ``listdir``, each its entries or the ``RemoteError`` it met
        (a folder gone does not fail the others); ``RemoteUnreachable`` fails the lot.
        Backends that can pipeline requests list them all in a few round trips."""
        out: list[list[tuple[bytes, RemoteStat]] | RemoteError] = []
        for path in paths:
            try:
                out.append(self.listdir(path))
            except RemoteError as exc:
                out.append(exc)
        return out

    @abstractmethod
    def readlink(self, path: bytes) -> bytes:
        """Target of a symlink, as stored (not resolved)."""

    @abstractmethod
    def read(self, path: bytes, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; shorter only at end of file.

        Backends pipeline large reads (several requests in flight).
        """

    def read_into(self, path: bytes, offset: int, length: int,
                  sink: Callable[[int, bytes], object]) -> int:
        """``read`` without assembling the bytes: each piece goes to ``sink(position,
        bytes)`` as it arrives (in any order; after an end of file met early, some may
        lie beyond the count returned). The count of bytes from ``offset`` on.
        ``sink`` must not raise: an exception from it would pass for a failed transfer."""
        data = self.read(path, offset, length)
        if data:
            sink(offset, data)
        return len(data)

    def read_version_into(self, path: bytes, offset: int, length: int,
                          sink: Callable[[int, bytes], object]) -> tuple[int, RemoteStat]:
        """``read_into``, and the file's attributes once the bytes were read: their
        version, to compare with the one the reader expects. Backends that can ask for
        both in one exchange do (SFTP: an FSTAT after the READs)."""
        got = self.read_into(path, offset, length, sink)
        return got, self.stat(path)

    def read_many(self, items: list[tuple[bytes, int]]) -> list[tuple[bytes, RemoteStat] | RemoteError]:
        """Several small files whole, for prefetching: for each (path, size) either
        (content, RemoteStat as read) or a ``RemoteError``. Backends that can pipeline
        requests do it in a few round trips for the lot."""
        out: list[tuple[bytes, RemoteStat] | RemoteError] = []
        for path, size in items:
            try:
                out.append((self.read(path, 0, max(1, size)), self.stat(path)))
            except RemoteError as exc:
                out.append(exc)
        return out

    def hash_files(self, paths: list[bytes]) -> list[bytes | None] | None:
        """The SHA-256 of each file's current content on the remote (None for one that
        cannot be read), computed where the files are; None when this remote cannot (the
        default; see ``can_hash``). Used before an upload replaces a file, to see a change
        that kept its size and mtime second."""
        return None

    #: whether ``hash_files`` may answer: True, False, or None while not yet known (the
    #: SFTP backend finds out at its first call)
    can_hash: bool | None = False

    @abstractmethod
    def statvfs(self) -> SpaceInfo:
        """Space on the share (a plausible fixed answer when the protocol cannot tell)."""

    # -- writing (used only by the sync manager's replay) ---------------------------
    @abstractmethod
    def upload(self, path: bytes, source: "Source", mode: int, temp_name: bytes,
               times: tuple[int, int] | None = None, owner: tuple[int, int] | None = None) -> RemoteStat:
        """Atomically replace ``path`` with the content of ``source`` (a local file path,
        or a function returning a readable binary stream; see ``open_source``), with
        ``mode`` and, when given, ``times`` = (atime_ns, mtime_ns) and ``owner`` = (uid,
        gid) set before it appears.

        Writes ``temp_name`` (a name in the same remote folder) first, then renames it
        over ``path`` (posix-rename where available), so nobody sees half a file. Returns
        the new remote attributes.
        """

    def upload_many(self, uploads: list["Upload"]) -> list["UploadOutcome"]:
        """Several ``upload``s, each made only when ``Upload.expect`` accepts what the
        server has at its path just before: per upload the new attributes, or
        ``NotExpected`` (what is there instead; nothing was changed), or the error of that
        upload alone (``RemoteError``, ``ContentDamaged``). A broken connection raises
        for all. Backends that can send them side by side do (SFTP: a few round trips
        for the lot); this default makes them one after another."""
        outcomes: list[UploadOutcome] = []
        for upload in uploads:
            try:
                try:
                    current: RemoteStat | None = self.stat(upload.path)
                except RemoteError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                        raise
                    current = None
                if not upload.expect(current):
                    outcomes.append(NotExpected(current))
                    continue
                # (the owner only when there is one: a subclass's upload may not take it)
                owner = () if upload.owner is None else (upload.owner,)
                if owner and upload.keep_owner and current is not None:
                    owner = ((current.uid, current.gid),)
                outcomes.append(self.upload(upload.path, upload.source, upload.mode,
                                            upload.temp_name, upload.times, *owner))
            except (RemoteError, ContentDamaged) as exc:
                outcomes.append(exc)
        return outcomes

    @abstractmethod
    def mkdir(self, path: bytes, mode: int) -> None: ...

    @abstractmethod
    def rmdir(self, path: bytes) -> None: ...

    @abstractmethod
    def unlink(self, path: bytes) -> None: ...

    @abstractmethod
    def rename(self, src: bytes, dst: bytes) -> None:
        """Rename, replacing ``dst`` if it exists (POSIX semantics)."""

    def unlink_if(self, path: bytes, expect: tuple[int, int, int]) -> None:
        """``unlink`` of a file whose version (``RemoteStat.version()``) is still
        ``expect``; another version there: ``RemoteError(ESTALE)`` and nothing removed.
        A remote with conditional requests makes the removal itself conditional (WebDAV:
        ``If-Match``); this default removes it, the caller having seen ``expect`` one
        round trip before (the window a remote without conditions leaves)."""
        self.unlink(path)

    def rename_over(self, src: bytes, dst: bytes, replaces: tuple[int, int, int]) -> None:
        """``rename`` of ``src`` over ``dst`` where ``dst``'s version is still
        ``replaces``; another version (or nothing) there: ``RemoteError(EEXIST)`` and
        nothing renamed. Conditional where the remote can (WebDAV: ``If`` on the MOVE's
        destination); this default renames, the caller having seen ``replaces`` one round
        trip before."""
        self.rename(src, dst)

    @abstractmethod
    def rename_noreplace(self, src: bytes, dst: bytes) -> None:
        """Rename ``src`` to ``dst`` only where ``dst`` does not exist; when it does,
        ``RemoteError(EEXIST)`` and both are left as they were. Atomic where the remote
        can (a hard link then an unlink of ``src``, or ``renameat2(RENAME_NOREPLACE)``);
        for folders and symlinks on an SFTP server, a check then a rename."""

    @abstractmethod
    def symlink(self, target: bytes, path: bytes) -> None:
        """Create symlink ``path`` pointing at ``target`` (argument order as in os.symlink)."""

    @abstractmethod
    def link(self, src: bytes, dst: bytes) -> None:
        """Hard link; ``RemoteError(EXDEV/ENOTSUP)`` when the server cannot."""

    @abstractmethod
    def set_attrs(self, path: bytes, mode: int, atime_ns: int, mtime_ns: int,
                  owner: tuple[int, int] | None = None) -> None:
        """Permission bits and times at once (in one request where the remote can), and
        the owner (uid, gid) when given, set first (a change of owner clears setuid and
        setgid bits on Linux, even root's)."""

    def set_link_owner(self, path: bytes, owner: tuple[int, int]) -> None:
        """The owner (uid, gid) of symlink ``path`` itself (``lchown``); ``RemoteError(
        ENOTSUP)`` where the remote cannot (this default: SFTP's SETSTAT follows links)."""
        raise RemoteError(errno.ENOTSUP, "cannot change the owner of a symlink there")

    def set_attrs_many(self, items: list[AttrsItem]) -> list[RemoteError | None]:
        """``set_attrs`` of each (path, mode, atime_ns, mtime_ns, owner): per item None or
        its error; a broken connection raises for all. SFTP sends them all at once (one
        round trip); this default, one after another."""
        outcomes: list[RemoteError | None] = []
        for path, mode, atime_ns, mtime_ns, owner in items:
            try:
                if owner is None:
                    self.set_attrs(path, mode, atime_ns, mtime_ns)
                else:
                    self.set_attrs(path, mode, atime_ns, mtime_ns, owner)
                outcomes.append(None)
            except RemoteError as exc:
                outcomes.append(exc)
        return outcomes

    # -- extended attributes (only where ``capabilities.xattrs``; else a mount keeps them
    # in its cache only) --------------------------------------------------------------
    def list_xattrs(self, path: bytes) -> list[tuple[bytes, bytes]]:
        """The ``user.`` extended attributes of ``path`` (not followed), names and values."""
        raise RemoteError(errno.ENOTSUP, "this remote keeps no extended attributes")

    def set_xattr(self, path: bytes, name: bytes, value: bytes) -> None:
        """Set one extended attribute of ``path`` (not followed)."""
        raise RemoteError(errno.ENOTSUP, "this remote keeps no extended attributes")

    def remove_xattr(self, path: bytes, name: bytes) -> None:
        """Remove one extended attribute of ``path`` (not followed); none there is done."""
        raise RemoteError(errno.ENOTSUP, "this remote keeps no extended attributes")



#: one item of ``Remote.set_attrs_many``: (path, mode, atime_ns, mtime_ns, owner or None)
AttrsItem: TypeAlias = "tuple[bytes, int, int, int, tuple[int, int] | None]"

Source: TypeAlias = "str | os.PathLike[str] | Callable[[], BinaryIO]"


@dataclass(frozen=True)
class Upload:
    """One file of ``Remote.upload_many``: ``upload``'s arguments, and ``expect``: given
    what the server has at ``path`` just before (None: nothing), whether to upload."""

    path: bytes
    source: Source
    mode: int
    temp_name: bytes
    times: tuple[int, int] | None
    expect: Callable[[RemoteStat | None], bool]
    owner: tuple[int, int] | None = None  # (uid, gid) given to the file (--owners remote)
    #: ``owner`` is only the one last seen there: the one ``expect`` is shown wins (a chown
    #: made on the server changes no version: an upload must not undo it)
    keep_owner: bool = False


@dataclass(frozen=True)
class NotExpected:
    """An upload of ``upload_many`` not made: the server had ``found`` (None: nothing)."""

    found: RemoteStat | None


UploadOutcome: TypeAlias = "RemoteStat | NotExpected | RemoteError | ContentDamaged"


def open_source(source: Source) -> BinaryIO:
    """A fresh readable stream of an upload's content (a retry opens it again)."""
    if isinstance(source, (str, bytes, os.PathLike)):
        return open(source, "rb")
    stream: BinaryIO = source()
    return stream
