"""The SFTP backend (paramiko): a folder on an SSH server as the share.

Owns: the share's root on the server and the operations of the ``Remote`` contract on it:
share-relative paths, the extensions the server offers (posix-rename, hardlink, statvfs,
fsync, limits), uploads through a temporary name, and hashes computed on the server.
Must not touch: the cache, LMDB, trio, FUSE; sockets, SSH set-up and the connection pool
(``sftp_pool`` with ``ssh_config``, ``ssh_hostkeys``, ``ssh_auth``); the SFTP wire format
(``sftp_session``); key material in logs or messages.

Every operation runs on a connection checked out of the pool for its whole duration
(see ``sftp_pool``); read-only ones may be retried once on a fresh connection.

Quirks handled here:
- OpenSSH's sftp-server takes SYMLINK arguments as (target, linkpath), reversed relative to
  the draft; paramiko's ``symlink(source, dest)`` sends (source, dest), so
  ``symlink(target, path)`` creates ``path -> target`` on OpenSSH.
- SFTP v3 reports mtime in whole seconds and no link count.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat as stat_mod
import threading
from collections.abc import Callable
from typing import BinaryIO, Literal

import paramiko
from paramiko import SFTPAttributes

from ..address import RemoteAddress
from .base import (AttrsItem, Capabilities, ContentDamaged, NotExpected, Remote, RemoteError, RemoteStat, RemoteRefused, Source,
                   SpaceInfo, Upload, UploadOutcome, open_source)
from .options import ConnectOptions
from .sftp_pool import SftpPool
from .pacing import Pacer
from .sftp_session import (CMD_RENAME, CMD_SETSTAT, DEFAULT_READ_SIZE, SFTP_FAILURE, SFTP_NO_SUCH_FILE, Skipped,
                           SftpSession, SmallWrite, StatusError, WriteOutcome)
from .ssh_config import resolve_target
from .watch import ChangeStream, Watch, WatchEnded, ended, watch_command

log = logging.getLogger(__name__)

SMALL_UPLOAD = 256 * 1024  # files up to this size are uploaded in three round trips, many at once
#: Returned when the server lacks statvfs@openssh.com: 1 TiB free, plausible and harmless.
FALLBACK_SPACE = SpaceInfo(
    block_size=4096, blocks=1 << 28, blocks_free=1 << 28, blocks_avail=1 << 28,
    files=1 << 24, files_free=1 << 24, name_max=255,
)


class SftpRemote(Remote):
    """A folder on an SSH server, reached with paramiko."""

    #: modes and owners as the server keeps them; changes streamed by a watcher run over
    #: an exec channel (where the server runs commands); versions by size and mtime second
    capabilities = Capabilities(notify=True)
    fetch_processes = True  # paramiko holds the GIL while it decrypts

    @classmethod
    def from_address(cls, address: RemoteAddress, options: ConnectOptions,
                     pacer: Pacer | None = None) -> SftpRemote:
        return cls(address, options, pacer)

    def __init__(self, address: RemoteAddress, options: ConnectOptions, pacer: Pacer | None = None) -> None:
        if address.scheme != "sftp" or not address.host:
            raise ValueError(f"not an sftp address: {address!r}")
        self.address = address
        self.timeout = options.timeout
        self.parallelism = max(1, options.connections)
        self.target = resolve_target(address, options)
        path = address.path
        shown_path = path if path.startswith("/") else ("/~/" + path if path else "/~")
        self.description = f"sftp://{self.target.user}@{self.target.host_label}:{self.target.port}{shown_path}"
        self._pool = SftpPool(self.target, options, self.description, self._on_open)
        self._root: bytes | None = None
        self._read_size = DEFAULT_READ_SIZE
        self._extensions: dict[bytes, bytes] = {}
        self.can_hash: bool | None = None if options.remote_hash else False
        #: --upload-limit: shared with the transfer processes when they upload
        self._pacer = pacer if pacer is not None else (
            Pacer(options.upload_limit) if options.upload_limit else None)

    def _on_open(self, sftp: SftpSession) -> None:
        if self._root is None:
            self._init_root(sftp)

    def _init_root(self, sftp: SftpSession) -> None:
        """Find the share's absolute path and check it is a folder (first connection)."""
        path = os.fsencode(self.address.path)
        try:
            if path.startswith(b"/"):
                root = path.rstrip(b"/") or b"/"
            else:
                home = sftp.realpath_raw(b".")
                root = home if not path else (home.rstrip(b"/") + b"/" + path.rstrip(b"/"))
            attrs = sftp.lstat_raw(root)
            if attrs.st_mode is not None and stat_mod.S_ISLNK(attrs.st_mode):
                attrs = sftp.stat(root)  # a symlinked share root is fine
        except StatusError as exc:
            raise RemoteRefused(
                f"the share folder {self.description} cannot be used: {os.strerror(exc.errno or errno.EIO)}"
            ) from exc
        if attrs.st_mode is None or not stat_mod.S_ISDIR(attrs.st_mode):
            raise RemoteRefused(f"the share {self.description} is not a directory")
        self._extensions = dict(sftp.extensions)
        self._read_size = sftp.read_limit()
        self._root = root
        log.info("%s: share root %r, read size %d", self.description, root, self._read_size)

    def _path(self, path: bytes) -> bytes:
        root = self._root
        assert root is not None, "connect() first"
        if path.startswith(b"/") or b"\0" in path:
            raise RemoteError(errno.EINVAL, f"not a share-relative path: {path!r}")
        if not path:
            return root
        return (b"" if root == b"/" else root) + b"/" + path

    def _has(self, extension: bytes) -> bool:
        return extension in self._extensions

    # -- connection -----------------------------------------------------------------
    def connect(self) -> None:
        self._pool.reopen()
        self._pool.run("connect", lambda sftp: sftp.lstat_raw(self._path(b"")), retry=True)

    def log_in(self) -> None:
        """Log in once ahead of the mount (``SftpPool.log_in``): asks for what is missing."""
        self._pool.log_in()

    def ping(self) -> None:
        self._pool.run("ping", lambda sftp: sftp.lstat_raw(self._path(b"")), retry=True)

    def close(self) -> None:
        self._pool.close()

    # -- reading --------------------------------------------------------------------
    def _ensure_root(self) -> None:
        if self._root is None:
            self.connect()

    def stat(self, path: bytes) -> RemoteStat:
        self._ensure_root()
        full = self._path(path)
        return self._pool.run("stat", lambda sftp: _to_stat(sftp.lstat_raw(full)), retry=True)

    def listdir(self, path: bytes) -> list[tuple[bytes, RemoteStat]]:
        self._ensure_root()
        full = self._path(path)
        return self._pool.run("listdir", lambda sftp: sftp.listdir_raw(full, _stat_of), retry=True)

    def listdir_many(self, paths: list[bytes]) -> list[list[tuple[bytes, RemoteStat]] | RemoteError]:
        """Every folder at once on one connection (``SftpSession.listdir_many_raw``): two
        round trips for up to 64 small folders."""
        if not paths:
            return []
        self._ensure_root()
        fulls = [self._path(path) for path in paths]
        raw = self._pool.run("listdir", lambda sftp: sftp.listdir_many_raw(fulls, _stat_of), retry=True)
        return [RemoteError(r.errno or errno.EIO, f"listdir: {r.strerror}") if isinstance(r, StatusError)
                else r for r in raw]

    def readlink(self, path: bytes) -> bytes:
        self._ensure_root()
        full = self._path(path)
        return self._pool.run("readlink", lambda sftp: sftp.readlink_raw(full), retry=True)

    def read(self, path: bytes, offset: int, length: int) -> bytes:
        pieces: dict[int, bytes] = {}
        got = self.read_into(path, offset, length, pieces.__setitem__)
        parts: list[bytes] = []
        pos, end = offset, offset + got
        while pos < end:
            parts.append(pieces[pos])
            pos += len(pieces[pos])
        return b"".join(parts)[:got]

    def read_into(self, path: bytes, offset: int, length: int,
                  sink: Callable[[int, bytes], object]) -> int:
        return self._read_range(path, offset, length, sink, attrs=False)[0]

    def read_version_into(self, path: bytes, offset: int, length: int,
                          sink: Callable[[int, bytes], object]) -> tuple[int, RemoteStat]:
        got, attrs = self._read_range(path, offset, length, sink, attrs=True)
        return got, _to_stat(attrs) if attrs is not None else self.stat(path)

    def _read_range(self, path: bytes, offset: int, length: int, sink: Callable[[int, bytes], object],
                    attrs: bool) -> tuple[int, SFTPAttributes | None]:
        self._ensure_root()
        full = self._path(path)
        if length <= 0:
            return 0, None
        size = self._read_size
        return self._pool.run("read", lambda sftp: sftp.read_range(full, offset, length, size, sink, attrs),
                              retry=True)

    def read_many(self, items: list[tuple[bytes, int]]) -> list[tuple[bytes, RemoteStat] | RemoteError]:
        """Small whole files at once; per file (content, RemoteStat) or a RemoteError."""
        self._ensure_root()
        full = [(self._path(path), size) for path, size in items]
        raw = self._pool.run("read_many", lambda sftp: sftp.read_small_files(full))
        return [RemoteError(r.errno or errno.EIO, str(r)) if isinstance(r, Exception)
                else (r[0], _to_stat(r[1])) for r in raw]

    def statvfs(self) -> SpaceInfo:
        self._ensure_root()
        if not self._has(b"statvfs@openssh.com"):
            return FALLBACK_SPACE
        root = self._path(b"")

        def space(sftp: SftpSession) -> SpaceInfo:
            reply = sftp.extended(b"statvfs@openssh.com", root)
            if reply is None:
                return FALLBACK_SPACE
            bsize, frsize, blocks, bfree, bavail, files, ffree = (reply.get_int64() for _ in range(7))
            reply.get_int64()  # favail
            reply.get_int64()  # fsid
            reply.get_int64()  # flag
            namemax = reply.get_int64()
            return SpaceInfo(
                block_size=frsize or bsize, blocks=blocks, blocks_free=bfree, blocks_avail=bavail,
                files=files, files_free=ffree, name_max=namemax or 255,
            )

        return self._pool.run("statvfs", space, retry=True)

    # -- writing --------------------------------------------------------------------
    def _rename_over(self, sftp: SftpSession, src: bytes, dst: bytes) -> None:
        if self._has(b"posix-rename@openssh.com"):
            sftp.extended(b"posix-rename@openssh.com", src, dst)
            return
        try:
            sftp.request(CMD_RENAME, src, dst)
        except StatusError:
            # plain SFTP rename refuses an existing target: not atomic, but the best there is
            try:
                sftp.remove(dst)
            except StatusError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            sftp.request(CMD_RENAME, src, dst)

    def upload(self, path: bytes, source: Source, mode: int, temp_name: bytes,
               times: tuple[int, int] | None = None, owner: tuple[int, int] | None = None) -> RemoteStat:
        [outcome] = self.upload_many([Upload(path, source, mode, temp_name, times, _anything, owner)])
        if isinstance(outcome, Exception):
            raise outcome
        assert isinstance(outcome, RemoteStat)
        return outcome

    def upload_many(self, uploads: list[Upload]) -> list[UploadOutcome]:
        """The small files (up to ``SMALL_UPLOAD``) in three round trips for the lot
        (``write_small_files``), the others one after another, each pipelined within the
        connection's write window; all on one connection."""
        self._ensure_root()
        fsync = self._has(b"fsync@openssh.com")
        pipelined = self._has(b"posix-rename@openssh.com")

        def put(sftp: SftpSession) -> list[UploadOutcome]:
            outcomes: list[UploadOutcome | None] = [None] * len(uploads)
            small: list[tuple[int, SmallWrite]] = []
            large: list[int] = []
            for i, upload in enumerate(uploads):
                full = self._path(upload.path)
                temp = full.rpartition(b"/")[0] + b"/" + upload.temp_name
                try:
                    with open_source(upload.source) as stream:
                        head = _read_upto(stream, SMALL_UPLOAD + 1)
                except ContentDamaged as exc:
                    outcomes[i] = exc
                    continue
                if len(head) <= SMALL_UPLOAD and pipelined:
                    small.append((i, SmallWrite(temp, full, head, _upload_attrs(upload))))
                else:
                    large.append(i)
            def expect(j: int, found: SFTPAttributes | None) -> bool:
                upload = uploads[small[j][0]]
                if not upload.expect(None if found is None else _to_stat(found)):
                    return False
                if upload.keep_owner and found is not None and found.st_uid is not None:  # (the owner there wins)
                    for attrs in small[j][1].attrs:
                        if attrs.st_uid is not None:
                            attrs.st_uid, attrs.st_gid = found.st_uid, found.st_gid
                return True

            if small:
                answers = sftp.write_small_files([item for _i, item in small], fsync, expect, self._pacer)
                for (i, _item), answer in zip(small, answers):
                    outcomes[i] = _outcome(answer)
            for i in large:
                outcomes[i] = self._upload_one(sftp, uploads[i], fsync)
            return [o if o is not None else RemoteError(errno.EIO, "upload: no outcome") for o in outcomes]

        return self._pool.run("upload", put)

    def _upload_one(self, sftp: SftpSession, upload: Upload, fsync: bool) -> UploadOutcome:
        """One file of any size: a look at the target, the content to the temporary name
        (pipelined within the write window), then a rename over the target."""
        full = self._path(upload.path)
        temp = full.rpartition(b"/")[0] + b"/" + upload.temp_name
        try:
            if upload.expect is not _anything:  # (a plain upload needs no look first)
                try:
                    current: RemoteStat | None = _to_stat(sftp.lstat_raw(full))
                except StatusError as exc:
                    if exc.code != SFTP_NO_SUCH_FILE:
                        raise
                    current = None
                if not upload.expect(current):
                    return NotExpected(current)
                if upload.keep_owner and upload.owner is not None and current is not None:
                    upload = dataclasses.replace(upload, owner=(current.uid, current.gid))  # (the owner there wins)
            try:
                with open_source(upload.source) as stream:
                    head = _read_upto(stream, SMALL_UPLOAD + 1)
                    sftp.write_stream(temp, head, stream, _upload_attrs(upload), fsync,
                                      self._pacer)
                self._rename_over(sftp, temp, full)
            except (StatusError, ContentDamaged):
                try:
                    sftp.remove(temp)
                except StatusError as cleanup:
                    log.debug("%s: could not remove %r: %s", self.description, temp, cleanup)
                raise
            return _to_stat(sftp.lstat_raw(full))
        except StatusError as exc:
            return RemoteError(exc.errno or errno.EIO, f"upload: {exc.strerror}")
        except ContentDamaged as exc:
            return exc

    def hash_files(self, paths: list[bytes]) -> list[bytes | None] | None:
        """``sha256sum`` of each file, run on the server over an SSH exec channel of a
        pooled connection: one command for all of ``paths`` (a session costs the server
        5-100 ms; one ``sha256sum`` process for all, since one per file cost 1 ms each).
        ``-z`` ends each answer with a NUL and leaves the name as given, whatever bytes it
        holds; a file that cannot be read has no answer. The command begins with a hash of
        nothing, whose known answer says whether the server runs commands at all (a server
        that forbids them: ``ForceCommand internal-sftp``, a chroot without coreutils, a
        restricted shell, a ``sha256sum`` older than coreutils 8.30 or BusyBox's, without
        ``-z``): if not, ``can_hash`` becomes False, logged once, and the caller does
        without."""
        if self.can_hash is False:
            return None
        if not paths:
            return []
        self._ensure_root()
        fulls = [self._path(p) for p in paths]
        script = (b"sha256sum -z </dev/null; exec sha256sum -z -- "
                  + b" ".join(_shell_quote(f) for f in fulls) + b" 2>/dev/null")
        limit = sum(len(f) + 67 for f in fulls) + 67
        output = self._pool.run("hash", lambda sftp: self._exec(sftp, script, limit))
        if output is False:
            return None
        records = output.split(b"\0") if output is not None else []
        if not records or records[0] != _EMPTY_SHA256 + b"  -":
            self._hashing_unsupported()
            return None
        self.can_hash = True
        found = _sha256sum_answers(records[1:])
        return [found.get(f) for f in fulls]

    def _hashing_unsupported(self) -> None:
        """The server runs no ``sha256sum``: said once (other threads may be here too)."""
        if self.can_hash is not False:
            log.info("%s: the server does not run sha256sum over SSH: a change there that "
                     "keeps a file's size and mtime second is not told from an unchanged file",
                     self.description)
        self.can_hash = False

    def watch(self, using: str = "auto") -> Watch:
        """The watcher (``watch.watch_command``) run on the server over an exec channel of
        a pooled connection; it lives as long as that connection."""
        self._ensure_root()
        root = self._path(b"")
        channel = self._pool.run("watch", lambda sftp: self._open_exec(sftp, watch_command(root, using)))
        if not isinstance(channel, paramiko.Channel):
            raise WatchEnded("the server runs no commands" if channel is None
                             else "no answer to the exec request", retry=channel is not None)
        return ChannelWatch(channel, root)

    def _open_exec(self, sftp: SftpSession, command: bytes) -> paramiko.Channel | None | Literal[False]:
        """A channel running ``command`` on the server; None when the server runs no
        commands; False when it did not answer the request in time."""
        try:
            channel = sftp.sock.get_transport().open_session(timeout=self.timeout)
        except paramiko.ChannelException as exc:  # a session refused: no commands here
            log.debug("%s: session refused: %s", self.description, exc)
            return None
        channel.settimeout(self.timeout)
        # paramiko waits for the exec request's answer without a limit: a watchdog
        # closes the channel when it has not come within the timeout.
        watchdog = threading.Timer(self.timeout, channel.close)
        watchdog.daemon = True
        watchdog.start()
        try:
            channel.exec_command(command)
        except paramiko.SSHException as exc:
            timed_out = channel.closed and not watchdog.is_alive()  # the watchdog closed it
            channel.close()
            if timed_out:
                log.info("%s: no answer to the exec request within %g s", self.description, self.timeout)
                return False
            log.debug("%s: exec refused: %s", self.description, exc)  # no commands here
            return None
        finally:
            watchdog.cancel()
        return channel

    def _exec(self, sftp: SftpSession, script: bytes, limit: int) -> bytes | None | Literal[False]:
        """The output of ``script`` run over an exec channel of this connection (read up to
        just past ``limit`` bytes); None when the server runs no commands; False when it
        did not answer in time (a slow disk there: not a reason to stop asking)."""
        channel = self._open_exec(sftp, script)
        if not isinstance(channel, paramiko.Channel):
            if channel is False:
                log.info("%s: compared by size and mtime this time", self.description)
            return channel
        try:
            channel.shutdown_write()  # (a server that answers with an SFTP session ends)
            out = bytearray()
            while len(out) <= limit:
                try:
                    piece = channel.recv(65536)
                except TimeoutError:  # (hashing is bounded by the timeout too)
                    log.info("%s: no answer from sha256sum within %g s: compared by size and "
                             "mtime this time", self.description, self.timeout)
                    return False
                if not piece:
                    break
                out += piece
            return bytes(out)
        finally:
            channel.close()

    def mkdir(self, path: bytes, mode: int) -> None:
        self._ensure_root()
        full = self._path(path)
        self._pool.run("mkdir", lambda sftp: sftp.mkdir(full, stat_mod.S_IMODE(mode)))

    def rmdir(self, path: bytes) -> None:
        self._ensure_root()
        full = self._path(path)
        self._pool.run("rmdir", lambda sftp: sftp.rmdir(full))

    def unlink(self, path: bytes) -> None:
        self._ensure_root()
        full = self._path(path)
        self._pool.run("unlink", lambda sftp: sftp.remove(full))

    def rename(self, src: bytes, dst: bytes) -> None:
        self._ensure_root()
        full_src, full_dst = self._path(src), self._path(dst)
        self._pool.run("rename", lambda sftp: self._rename_over(sftp, full_src, full_dst))

    def rename_noreplace(self, src: bytes, dst: bytes) -> None:
        """SFTP v3's own RENAME (not posix-rename): the protocol makes an existing target
        an error, and OpenSSH's sftp-server renames a regular file as link() + unlink(),
        so a target that exists, or appears meanwhile, is never replaced (a folder or a
        symlink: lstat then rename, a small window). The refusal comes back as a plain
        SSH_FX_FAILURE: an lstat of the target tells EEXIST from other failures."""
        self._ensure_root()
        full_src, full_dst = self._path(src), self._path(dst)

        def rename(sftp: SftpSession) -> None:
            try:
                sftp.request(CMD_RENAME, full_src, full_dst)
            except StatusError as exc:
                if exc.code != SFTP_FAILURE:  # (a missing source is SSH_FX_NO_SUCH_FILE)
                    raise
                try:
                    sftp.lstat_raw(full_dst)
                except StatusError:
                    raise exc from None
                raise RemoteError(errno.EEXIST, "rename: the target exists") from exc

        self._pool.run("rename", rename)

    def symlink(self, target: bytes, path: bytes) -> None:
        self._ensure_root()
        full = self._path(path)
        # OpenSSH reads (target, linkpath); paramiko sends its arguments in order.
        self._pool.run("symlink", lambda sftp: sftp.symlink(target, full))

    def link(self, src: bytes, dst: bytes) -> None:
        self._ensure_root()
        if not self._has(b"hardlink@openssh.com"):
            raise RemoteError(errno.EXDEV, "the server does not support hard links")
        full_src, full_dst = self._path(src), self._path(dst)
        self._pool.run("link", lambda sftp: sftp.extended(b"hardlink@openssh.com", full_src, full_dst))

    def set_link_owner(self, path: bytes, owner: tuple[int, int]) -> None:
        """``lsetstat@openssh.com`` (OpenSSH 8.0 on) with the owner only; ENOTSUP where the
        server does not offer it."""
        self._ensure_root()
        if not self._has(b"lsetstat@openssh.com"):
            raise RemoteError(errno.ENOTSUP, "the server cannot change the owner of a symlink")
        full = self._path(path)
        self._pool.run("lsetstat", lambda sftp: sftp.extended(b"lsetstat@openssh.com", full, _owner_attrs(owner)))

    def set_attrs(self, path: bytes, mode: int, atime_ns: int, mtime_ns: int,
                  owner: tuple[int, int] | None = None) -> None:
        [error] = self.set_attrs_many([(path, mode, atime_ns, mtime_ns, owner)])
        if error is not None:
            raise error

    def set_attrs_many(self, items: list[AttrsItem]) -> list[RemoteError | None]:
        self._ensure_root()
        # One SETSTAT an item; two when an owner goes with setuid or setgid bits: the
        # server sets the mode before the owner (OpenSSH's order), and Linux clears those
        # bits at a change of owner, so the owner goes first, alone. All in one round trip.
        requests: list[tuple[object, ...]] = []
        last: list[int] = []  # per item, the index of its last request
        for path, mode, atime_ns, mtime_ns, owner in items:
            full = self._path(path)
            if owner is not None and mode & (stat_mod.S_ISUID | stat_mod.S_ISGID):
                requests.append((CMD_SETSTAT, full, _owner_attrs(owner)))
                owner = None
            requests.append((CMD_SETSTAT, full, _attrs(mode, (atime_ns, mtime_ns), owner)))
            last.append(len(requests) - 1)

        def setstat(sftp: SftpSession) -> list[RemoteError | None]:
            errors = sftp.requests_at_once(requests)
            out: list[RemoteError | None] = []
            for i, end in enumerate(last):
                first = next((e for e in errors[last[i - 1] + 1 if i else 0:end + 1] if e is not None), None)
                out.append(None if first is None else RemoteError(first.errno or errno.EIO, f"setstat: {first.strerror}"))
            return out

        return self._pool.run("setstat", setstat)



#: what ``sha256sum`` says of empty input
_EMPTY_SHA256 = b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def _shell_quote(word: bytes) -> bytes:
    """``word`` as one word of a POSIX shell command line, whatever bytes it holds."""
    return b"'" + word.replace(b"'", b"'\\''") + b"'"


def _sha256sum_answers(records: list[bytes]) -> dict[bytes, bytes]:
    """The digests ``sha256sum -z`` printed, by file name (its lines: 64 hex digits, two
    spaces, the name as given)."""
    found: dict[bytes, bytes] = {}
    for record in records:
        if len(record) > 66 and record[64:66] == b"  ":
            try:
                found[record[66:]] = bytes.fromhex(record[:64].decode())
            except ValueError:
                pass
    return found


def _read_upto(stream: BinaryIO, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``stream``: fewer only at its end."""
    parts, got = [], 0
    while got < limit and (chunk := stream.read(limit - got)):
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)



def _anything(_found: RemoteStat | None) -> bool:
    return True


def _outcome(answer: WriteOutcome) -> UploadOutcome:
    """An answer of ``write_small_files`` as ``upload_many`` gives it."""
    if isinstance(answer, Skipped):
        return NotExpected(None if answer.found is None else _to_stat(answer.found))
    if isinstance(answer, StatusError):
        return RemoteError(answer.errno or errno.EIO, f"upload: {answer.strerror}")
    return _to_stat(answer)


def _attrs(mode: int, times: tuple[int, int] | None, owner: tuple[int, int] | None = None) -> SFTPAttributes:
    """Permission bits, and (atime, mtime) in ns and the owner (uid, gid) when given, for
    one SETSTAT/FSETSTAT (SFTP v3 carries whole seconds)."""
    attrs = SFTPAttributes()
    attrs.st_mode = stat_mod.S_IMODE(mode)
    if times is not None:
        attrs.st_atime, attrs.st_mtime = (t // 1_000_000_000 for t in times)
    if owner is not None:
        attrs.st_uid, attrs.st_gid = owner
    return attrs


def _upload_attrs(upload: Upload) -> tuple[SFTPAttributes, ...]:
    """The FSETSTATs of an upload: one, or the owner alone first when it goes with setuid
    or setgid bits (as ``set_attrs_many``: the server sets the mode before the owner, and
    Linux clears those bits at a change of owner). Pipelined: no round trip more."""
    mode, owner = upload.mode, upload.owner
    if owner is not None and mode & (stat_mod.S_ISUID | stat_mod.S_ISGID):
        return _owner_attrs(owner), _attrs(mode, upload.times)
    return (_attrs(mode, upload.times, owner),)


def _owner_attrs(owner: tuple[int, int]) -> SFTPAttributes:
    attrs = SFTPAttributes()
    attrs.st_uid, attrs.st_gid = owner
    return attrs


def _stat_of(mode: int, size: int, mtime: int, atime: int, uid: int, gid: int) -> RemoteStat:
    """A listed entry's attributes (``SftpSession.listdir_raw``; whole seconds)."""
    return RemoteStat(mode, size, mtime * 1_000_000_000, atime * 1_000_000_000, uid, gid)


def _to_stat(attrs: SFTPAttributes) -> RemoteStat:
    mtime = attrs.st_mtime or 0
    atime = attrs.st_atime if attrs.st_atime is not None else mtime
    return RemoteStat(
        mode=attrs.st_mode or 0,
        size=attrs.st_size or 0,
        mtime_ns=int(mtime) * 1_000_000_000,
        atime_ns=int(atime) * 1_000_000_000,
        uid=attrs.st_uid or 0,
        gid=attrs.st_gid or 0,
    )


class ChannelWatch(Watch):
    """The watcher's exec channel: its output is the changed paths, its error output
    the readiness and reasons; closing the channel ends it on the server."""

    def __init__(self, channel: paramiko.Channel, root: bytes) -> None:
        self._channel = channel
        self._stream = ChangeStream(root)

    def read(self, timeout: float) -> list[bytes]:
        channel = self._channel
        channel.settimeout(min(timeout, 0.25))  # (the error output is looked at between)
        end = timeout
        changed: list[bytes] = []
        while not changed:
            if channel.recv_stderr_ready():
                self._messages(channel.recv_stderr(65536))
            try:
                data = channel.recv(1 << 16)
            except TimeoutError:
                end -= 0.25
                if end <= 0:
                    return changed
                continue
            except (OSError, EOFError, paramiko.SSHException) as exc:
                raise WatchEnded(f"the watcher's channel failed: {exc}") from exc
            if not data:
                while channel.recv_stderr_ready():
                    self._messages(channel.recv_stderr(65536))
                status = channel.recv_exit_status() if channel.exit_status_ready() else None
                raise ended(self, status)
            changed += self._stream.feed(data)
        return changed

    def close(self) -> None:
        self._channel.close()
