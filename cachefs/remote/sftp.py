"""The SFTP backend (paramiko): a folder on an SSH server as the share.

Owns: SSH connections (a small pool), host key checking against known_hosts, public key
authentication, ``~/.ssh/config`` resolution, and the SFTP requests themselves, including
the OpenSSH extensions (posix-rename, hardlink, statvfs, fsync, limits).
Must not touch: the cache, LMDB, trio, FUSE; the user's known_hosts except to append a
key accepted with ``--accept-new-host-key``; key material in logs or messages.

Threading: a pool of up to ``options.connections`` connections, each its own TCP socket,
``Transport`` and ``SFTPClient``. A call checks one connection out for its whole duration,
so no ``SFTPClient`` is ever used by two threads at once (paramiko's client is not safe for
that). Any transport failure (socket error, EOF, SSH error, timeout) closes that connection
and every idle one (they are probably dead too) and raises ``RemoteUnreachable``; the next
call reconnects. A read-only call that found a pooled connection already dead (reset or
EOF, not a timeout) is retried once on a fresh one, so that a server restart costs no
spurious "offline".

paramiko quirks handled here:
- ``listdir``/``readlink`` decode names as UTF-8 and hand back ``str`` (or bytes, when the
  name is not UTF-8): we send those requests ourselves and keep the raw bytes.
- paramiko drops the extension list of the SFTP VERSION reply; ``_SftpSession`` keeps it.
- OpenSSH's sftp-server takes SYMLINK arguments as (target, linkpath), reversed relative to
  the draft; paramiko's ``symlink(source, dest)`` sends (source, dest), so
  ``symlink(target, path)`` creates ``path -> target`` on OpenSSH.
- SFTP v3 reports mtime in whole seconds and no link count.
"""

from __future__ import annotations

import errno
import getpass
import logging
import os
import socket
import stat as stat_mod
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import paramiko
from paramiko.message import Message
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_FSETSTAT,
    CMD_FSTAT,
    CMD_HANDLE,
    CMD_INIT,
    CMD_LSTAT,
    CMD_NAME,
    CMD_OPEN,
    CMD_OPENDIR,
    CMD_READ,
    CMD_READDIR,
    CMD_READLINK,
    CMD_REALPATH,
    CMD_RENAME,
    CMD_SETSTAT,
    CMD_STATUS,
    CMD_VERSION,
    CMD_WRITE,
    SFTP_BAD_MESSAGE,
    SFTP_CONNECTION_LOST,
    SFTP_EOF,
    SFTP_FAILURE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_READ,
    SFTP_FLAG_TRUNC,
    SFTP_FLAG_WRITE,
    SFTP_NO_CONNECTION,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED,
    SFTPError,
    int64,
)
from paramiko.sftp_attr import SFTPAttributes

from ..address import RemoteAddress
from .base import (ContentDamaged, Remote, RemoteError, RemoteRefused, RemoteStat, RemoteUnreachable,
                   Source, SpaceInfo, open_source)
from .options import ConnectOptions

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_READ_SIZE = 32 * 1024  # what every SFTP server accepts
MAX_READ_SIZE = 256 * 1024  # upper bound even if limits@openssh.com offers more
READ_WINDOW_BYTES = 2 * 1024 * 1024  # bytes of read requests in flight (measured: more is no faster)
CHANNEL_WINDOW = 8 * 1024 * 1024  # SSH channel window: must exceed READ_WINDOW_BYTES
CHANNEL_MAX_PACKET = 32768  # largest SSH data packet we ask the server to send
#: Ciphers and MACs put first, best first; the rest of paramiko's list stays acceptable
#: after them. AES-GCM needs no separate MAC, which paramiko computes in Python per
#: packet (measured: a quarter faster than aes128-ctr with hmac-sha2-256); where the
#: server has no GCM, encrypt-then-MAC (also the safer construction).
PREFERRED_CIPHERS: tuple[str, ...] = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
PREFERRED_MACS: tuple[str, ...] = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com")
WRITE_CHUNK = 32 * 1024
SMALL_UPLOAD = 256 * 1024  # files up to this size are uploaded in three round trips
DEFAULT_KEY_FILES = ("id_ed25519", "id_ecdsa", "id_rsa")
#: Returned when the server lacks statvfs@openssh.com: 1 TiB free, plausible and harmless.
FALLBACK_SPACE = SpaceInfo(
    block_size=4096, blocks=1 << 28, blocks_free=1 << 28, blocks_avail=1 << 28,
    files=1 << 24, files_free=1 << 24, name_max=255,
)

_STATUS_ERRNO = {
    SFTP_NO_SUCH_FILE: errno.ENOENT,
    SFTP_PERMISSION_DENIED: errno.EACCES,
    SFTP_FAILURE: errno.EIO,
    SFTP_BAD_MESSAGE: errno.EINVAL,
    SFTP_OP_UNSUPPORTED: errno.ENOTSUP,
}

# Exceptions that mean the connection is broken (socket.timeout is an OSError).
_TRANSPORT_ERRORS = (OSError, EOFError, paramiko.SSHException, SFTPError)


class _StatusError(IOError):
    """An SFTP STATUS reply other than OK/EOF: the server answered with an error."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(_STATUS_ERRNO.get(code, errno.EIO), text or f"SFTP status {code}")
        self.code = code


class _Collector:
    """Receives the asynchronous replies of a pipelined read (paramiko's ``fileobj`` hook).

    paramiko keeps these in a WeakValueDictionary, so the caller holds a reference.
    """

    def __init__(self) -> None:
        self.replies: dict[int, tuple[int, Message]] = {}

    def _async_response(self, t: int, msg: Message, num: int) -> None:
        self.replies[num] = (t, msg)


class _SftpSession(paramiko.SFTPClient):
    """paramiko's client plus raw-bytes names, the server's extensions and pipelined reads."""

    extensions: dict[bytes, bytes]

    def _send_version(self) -> int:
        self.extensions = {}
        msg = Message()
        msg.add_int(3)
        self._send_packet(CMD_INIT, msg)
        t, data = self._read_packet()
        if t != CMD_VERSION:
            raise SFTPError("Incompatible sftp protocol")
        (version,) = struct.unpack(">I", data[:4])
        pos = 4
        try:
            while pos < len(data):
                name, pos = _unpack_string(data, pos)
                value, pos = _unpack_string(data, pos)
                self.extensions[name] = value
        except struct.error:
            log.debug("malformed extension list in the SFTP VERSION reply; ignoring the rest")
        return int(version)

    def _convert_status(self, msg: Message) -> None:
        code = msg.get_int()
        text = msg.get_string().decode("utf-8", "replace")
        if code == SFTP_OK:
            return
        if code == SFTP_EOF:
            raise EOFError(text)
        if code in (SFTP_NO_CONNECTION, SFTP_CONNECTION_LOST):
            raise SFTPError(f"server reports lost connection: {text}")
        raise _StatusError(code, text)

    # -- raw requests ---------------------------------------------------------------
    def has_extension(self, name: bytes, version: bytes = b"1") -> bool:
        return self.extensions.get(name) == version

    def realpath_raw(self, path: bytes) -> bytes:
        t, msg = self._request(CMD_REALPATH, path)
        if t != CMD_NAME or msg.get_int() != 1:
            raise SFTPError("unexpected reply to REALPATH")
        return bytes(msg.get_string())

    def lstat_raw(self, path: bytes) -> SFTPAttributes:
        t, msg = self._request(CMD_LSTAT, path)
        if t != CMD_ATTRS:
            raise SFTPError("unexpected reply to LSTAT")
        return SFTPAttributes._from_msg(msg)

    def listdir_raw(self, path: bytes) -> list[tuple[bytes, SFTPAttributes]]:
        t, msg = self._request(CMD_OPENDIR, path)
        if t != CMD_HANDLE:
            raise SFTPError("unexpected reply to OPENDIR")
        handle = msg.get_binary()
        entries: list[tuple[bytes, SFTPAttributes]] = []
        try:
            while True:
                try:
                    t, msg = self._request(CMD_READDIR, handle)
                except EOFError:
                    break
                if t != CMD_NAME:
                    raise SFTPError("unexpected reply to READDIR")
                for _ in range(msg.get_int()):
                    name = bytes(msg.get_string())
                    msg.get_string()  # longname, ls -l style: not needed
                    attrs = SFTPAttributes._from_msg(msg)
                    if name not in (b".", b".."):
                        entries.append((name, attrs))
        finally:
            self._request(CMD_CLOSE, handle)
        return entries

    def readlink_raw(self, path: bytes) -> bytes:
        t, msg = self._request(CMD_READLINK, path)
        if t != CMD_NAME or msg.get_int() != 1:
            raise SFTPError("unexpected reply to READLINK")
        return bytes(msg.get_string())

    def extended(self, name: bytes, *args: Any) -> Message | None:
        """An extended request; the EXTENDED_REPLY message, or None for a plain OK."""
        t, msg = self._request(CMD_EXTENDED, name, *args)
        if t == CMD_EXTENDED_REPLY:
            return msg
        return None

    def read_limit(self) -> int:
        """The largest READ the server serves in one reply (limits@openssh.com)."""
        if not self.has_extension(b"limits@openssh.com"):
            return DEFAULT_READ_SIZE
        reply = self.extended(b"limits@openssh.com")
        if reply is None:
            return DEFAULT_READ_SIZE
        reply.get_int64()  # max packet length
        max_read = reply.get_int64()
        if max_read <= 0:
            return DEFAULT_READ_SIZE
        return max(DEFAULT_READ_SIZE, min(MAX_READ_SIZE, max_read))

    def read_range(self, path: bytes, offset: int, length: int, request_size: int,
                   sink: Callable[[int, bytes], object]) -> int:
        """Read with many READ requests in flight (one round trip per request is too slow),
        each reply handed to ``sink(position, bytes)`` as it comes; the count of bytes
        read from ``offset`` on without a gap (see ``_read_pipelined``)."""
        t, msg = self._request(CMD_OPEN, path, SFTP_FLAG_READ, SFTPAttributes())
        if t != CMD_HANDLE:
            raise SFTPError("unexpected reply to OPEN")
        handle = msg.get_binary()
        try:
            return self._read_pipelined(handle, offset, length, request_size, sink)
        finally:
            self._request(CMD_CLOSE, handle)

    def read_small_files(self, items: list[tuple[bytes, int]]) -> list[tuple[bytes, SFTPAttributes] | _StatusError]:
        """Whole small files in two round trips for the lot: every OPEN is sent at once,
        then for each handle a READ, an FSTAT and a CLOSE. Per file: (content, attributes
        when read) or the error the server gave."""
        collector = _Collector()
        opens = {self._async_request(collector, CMD_OPEN, path, SFTP_FLAG_READ, SFTPAttributes()): i
                 for i, (path, _size) in enumerate(items)}
        results: list = [None] * len(items)
        handles: dict[int, bytes] = {}
        self._collect(collector, len(opens))
        for num, (t, msg) in collector.replies.items():
            i = opens[num]
            if t == CMD_HANDLE:
                handles[i] = msg.get_binary()
            else:
                results[i] = self._status_error(t, msg)
        collector.replies.clear()
        reads, stats = {}, {}
        for i, handle in handles.items():
            size = max(1, items[i][1])
            reads[self._async_request(collector, CMD_READ, handle, int64(0), size)] = i
            stats[self._async_request(collector, CMD_FSTAT, handle)] = i
            self._async_request(collector, CMD_CLOSE, handle)
        self._collect(collector, 3 * len(handles))
        data: dict[int, bytes] = {}
        attrs: dict[int, SFTPAttributes] = {}
        for num, (t, msg) in collector.replies.items():
            if num in reads:
                i = reads[num]
                if t == CMD_DATA:
                    data[i] = bytes(msg.get_string())
                else:
                    error = self._status_error(t, msg)
                    if error.code == SFTP_EOF:
                        data[i] = b""  # an empty file
                    else:
                        results[i] = error
            elif num in stats and t == CMD_ATTRS:
                attrs[stats[num]] = SFTPAttributes._from_msg(msg)
        for i in handles:
            if results[i] is None:
                if i in data and i in attrs:
                    results[i] = (data[i], attrs[i])
                else:
                    results[i] = _StatusError(SFTP_FAILURE, "incomplete reply")
        return results

    def write_small_file(self, temp: bytes, final: bytes, data: bytes, attrs: SFTPAttributes,
                         fsync: bool) -> SFTPAttributes:
        """A whole small file in three round trips: OPEN; then the WRITEs, FSETSTAT, the
        fsync and CLOSE sent at once (the server runs one channel's requests in order);
        then, only if all of them succeeded, a posix-rename of ``temp`` over ``final`` with
        an LSTAT of it. The first error is raised; the caller removes ``temp``."""
        handle = self._open_for_write(temp)
        collector = _Collector()
        steps = [self._async_request(collector, CMD_WRITE, handle, int64(off), data[off:off + WRITE_CHUNK])
                 for off in range(0, len(data), WRITE_CHUNK)]
        steps.append(self._async_request(collector, CMD_FSETSTAT, handle, attrs))
        if fsync:
            steps.append(self._async_request(collector, CMD_EXTENDED, b"fsync@openssh.com", handle))
        steps.append(self._async_request(collector, CMD_CLOSE, handle))
        self._collect(collector, len(steps))
        self._check_statuses(collector, steps)
        collector.replies.clear()
        rename = self._async_request(collector, CMD_EXTENDED, b"posix-rename@openssh.com", temp, final)
        lstat = self._async_request(collector, CMD_LSTAT, final)
        self._collect(collector, 2)
        self._check_statuses(collector, [rename])
        t, msg = collector.replies[lstat]
        if t != CMD_ATTRS:
            raise self._status_error(t, msg)
        return SFTPAttributes._from_msg(msg)

    def _check_statuses(self, collector: "_Collector", nums: list[int]) -> None:
        """Raise the first error among these requests' STATUS replies (in sending order),
        as every other request's reply is turned into one (``_convert_status``)."""
        for num in nums:
            t, msg = collector.replies[num]
            if t != CMD_STATUS:
                raise self._status_error(t, msg)
            self._convert_status(msg)

    def _open_for_write(self, path: bytes) -> bytes:
        t, msg = self._request(CMD_OPEN, path, SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC,
                               SFTPAttributes())
        if t != CMD_HANDLE:
            raise SFTPError("expected a handle")
        return msg.get_binary()

    def _collect(self, collector: "_Collector", count: int) -> None:
        while len(collector.replies) < count:
            self._read_response()

    @staticmethod
    def _status_error(t: int, msg: Message) -> "_StatusError":
        if t != CMD_STATUS:
            return _StatusError(SFTP_FAILURE, "unexpected reply")
        code = msg.get_int()
        return _StatusError(code, msg.get_string().decode("utf-8", "replace"))

    def _read_pipelined(self, handle: bytes, offset: int, length: int, request_size: int,
                        sink: Callable[[int, bytes], object]) -> int:
        """Replies go to ``sink`` in the order they come, not necessarily in file order,
        and past an end of file met early some may lie beyond the count returned."""
        collector = _Collector()
        todo: deque[tuple[int, int]] = deque(
            (pos, min(request_size, offset + length - pos))
            for pos in range(offset, offset + length, request_size)
        )
        window = max(2, READ_WINDOW_BYTES // request_size)
        in_flight: dict[int, tuple[int, int]] = {}
        received: dict[int, int] = {}  # position -> bytes
        eof_at = offset + length
        error: BaseException | None = None
        while todo or in_flight:
            while todo and len(in_flight) < window and error is None:
                pos, size = todo.popleft()
                if pos >= eof_at:
                    continue
                num = self._async_request(collector, CMD_READ, handle, int64(pos), size)
                in_flight[num] = (pos, size)
            if not in_flight:
                break
            while not collector.replies:
                self._read_response()
            for num, (t, msg) in list(collector.replies.items()):
                del collector.replies[num]
                pos, size = in_flight.pop(num)
                if t == CMD_DATA:
                    data = bytes(msg.get_string())
                    if not data:
                        eof_at = min(eof_at, pos)
                        continue
                    sink(pos, data)
                    received[pos] = len(data)
                    if len(data) < size:  # a short read: ask again for the rest
                        todo.appendleft((pos + len(data), size - len(data)))
                elif t == CMD_STATUS:
                    code = msg.get_int()
                    text = msg.get_string().decode("utf-8", "replace")
                    if code == SFTP_EOF:
                        eof_at = min(eof_at, pos)
                    elif error is None:
                        error = _StatusError(code, text)
                elif error is None:
                    error = SFTPError(f"unexpected reply {t} to READ")
        if error is not None:
            raise error
        pos = offset
        while pos < eof_at and pos in received:
            pos += received[pos]
        return min(pos, offset + length) - offset


#: what ``sha256sum`` says of empty input
_EMPTY_SHA256 = b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def _shell_quote(word: bytes) -> bytes:
    """``word`` as one word of a POSIX shell command line, whatever bytes it holds."""
    return b"'" + word.replace(b"'", b"'\\''") + b"'"


def _read_upto(stream: Any, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``stream``: fewer only at its end."""
    parts, got = [], 0
    while got < limit and (chunk := stream.read(limit - got)):
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _unpack_string(data: bytes, pos: int) -> tuple[bytes, int]:
    (size,) = struct.unpack(">I", data[pos : pos + 4])
    end = pos + 4 + size
    if end > len(data):
        raise struct.error("truncated string")
    return data[pos + 4 : end], end


def _attrs(mode: int, times: tuple[int, int] | None) -> SFTPAttributes:
    """Permission bits, and (atime, mtime) in ns when given, for one SETSTAT/FSETSTAT
    (SFTP v3 carries whole seconds)."""
    attrs = SFTPAttributes()
    attrs.st_mode = stat_mod.S_IMODE(mode)
    if times is not None:
        attrs.st_atime, attrs.st_mtime = (t // 1_000_000_000 for t in times)
    return attrs


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


# -- host keys -----------------------------------------------------------------------
@dataclass(frozen=True)
class _KnownKey:
    path: Path
    line: int
    key: paramiko.PKey
    revoked: bool


def _host_matches(pattern_list: str, host_name: str) -> bool:
    for pattern in pattern_list.split(","):
        if pattern.startswith("|1|"):
            if paramiko.HostKeys.hash_host(host_name, pattern) == pattern:
                return True
        elif pattern == host_name:
            return True
    return False


def _known_keys(files: list[Path], host_name: str) -> list[_KnownKey]:
    """Keys recorded for ``host_name`` with where they were found (for the messages)."""
    found: list[_KnownKey] = []
    for path in files:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot read known hosts file %s: %s", path, exc)
            continue
        for number, raw_line in enumerate(lines, 1):
            line = raw_line.strip()
            if not line or line.startswith("#"):
                continue
            revoked = False
            if line.startswith("@"):
                marker, _, line = line.partition(" ")
                if marker != "@revoked":
                    continue  # @cert-authority: certificates are not supported
                revoked = True
            try:
                entry = paramiko.hostkeys.HostKeyEntry.from_line(line.strip(), number)
            except (paramiko.SSHException, ValueError) as exc:
                log.debug("%s:%d: unreadable known_hosts line: %s", path, number, exc)
                continue
            if entry is None or entry.key is None:
                continue
            if _host_matches(",".join(entry.hostnames), host_name):
                found.append(_KnownKey(path, number, entry.key, revoked))
    return found


def _base_key_type(name: str) -> str:
    return "ssh-rsa" if name.startswith("rsa-sha2-") else name


def _prefer_algorithms(transport: paramiko.Transport) -> None:
    """Put the fast ciphers and MACs first; what else paramiko offers stays acceptable."""
    options = transport.get_security_options()
    for attr, preferred in (("ciphers", PREFERRED_CIPHERS), ("digests", PREFERRED_MACS)):
        offered = list(getattr(options, attr))
        first = [name for name in preferred if name in offered]
        if first:
            setattr(options, attr, first + [name for name in offered if name not in first])


# -- the backend ---------------------------------------------------------------------
@dataclass
class _Connection:
    transport: paramiko.Transport
    sftp: _SftpSession
    number: int

    def alive(self) -> bool:
        return self.transport.is_active() and not self.sftp.sock.closed

    def close(self) -> None:
        try:
            self.sftp.close()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            log.debug("closing sftp session %d: %s", self.number, exc)
        self.transport.close()


class SftpRemote(Remote):
    """A folder on an SSH server, reached with paramiko."""

    def __init__(self, address: RemoteAddress, options: ConnectOptions) -> None:
        if address.scheme != "sftp" or not address.host:
            raise ValueError(f"not an sftp address: {address!r}")
        self.address = address
        self.options = options
        self.timeout = options.timeout
        self.parallelism = max(1, options.connections)
        self._resolve_config()
        path = address.path
        shown_path = path if path.startswith("/") else ("/~/" + path if path else "/~")
        self.description = f"sftp://{self.user}@{self.host_label}:{self.port}{shown_path}"
        self._lock = threading.Condition()
        self._idle: list[_Connection] = []
        self._open = 0
        self._numbers = 0
        self._closed = False
        self._root: bytes | None = None
        self._read_size = DEFAULT_READ_SIZE
        self._extensions: dict[bytes, bytes] = {}
        self.can_hash = None if options.remote_hash else False

    # -- configuration --------------------------------------------------------------
    def _resolve_config(self) -> None:
        address, options = self.address, self.options
        assert address.host is not None
        config_path = options.ssh_config
        if config_path is None:
            default = Path("~/.ssh/config").expanduser()
            config_path = default if default.exists() else None
        config: dict[str, Any] = {}
        if config_path is not None:
            try:
                config = dict(paramiko.SSHConfig.from_path(str(config_path)).lookup(address.host))
            except (OSError, paramiko.SSHException, ValueError) as exc:
                raise RemoteRefused(f"cannot read ssh config {config_path}: {exc}") from exc
        self.host: str = config.get("hostname", address.host)
        self.host_label = f"[{self.host}]" if ":" in self.host else self.host
        self.user: str = address.user or config.get("user") or getpass.getuser()
        try:
            self.port: int = address.port or int(config.get("port", 22))
        except ValueError as exc:
            raise RemoteRefused(f"bad Port in {config_path}: {exc}") from exc
        self.connect_timeout = float(config.get("connecttimeout", self.timeout))
        proxy = config.get("proxycommand")
        self.proxy_command: str | None = None if not proxy or proxy.lower() == "none" else proxy
        self.config_identities = [Path(p).expanduser() for p in config.get("identityfile", [])]
        self.host_key_alias: str = config.get("hostkeyalias", self.host)
        if options.known_hosts is not None:
            self.known_hosts_files = [Path(options.known_hosts).expanduser()]
        elif config.get("userknownhostsfile"):
            self.known_hosts_files = [
                Path(p).expanduser() for p in str(config["userknownhostsfile"]).split()
            ]
        else:
            self.known_hosts_files = [Path("~/.ssh/known_hosts").expanduser()]
        self.read_only_known_hosts: list[Path] = []
        if options.known_hosts is None:
            self.read_only_known_hosts.append(Path("/etc/ssh/ssh_known_hosts"))

    @property
    def host_key_name(self) -> str:
        """The name under which OpenSSH records this server in known_hosts."""
        return self.host_key_alias if self.port == 22 else f"[{self.host_key_alias}]:{self.port}"

    # -- opening a connection -------------------------------------------------------
    def _open_socket(self) -> Any:
        if self.proxy_command:
            try:
                proxy = paramiko.ProxyCommand(self.proxy_command)
            except (OSError, paramiko.SSHException) as exc:
                raise RemoteUnreachable(f"{self.description}: ProxyCommand failed: {exc}") from exc
            proxy.settimeout(self.timeout)
            return proxy
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise RemoteUnreachable(f"cannot connect to {self.host_label}:{self.port}: {exc}") from exc
        # Pipelined reads send many small READ requests: with Nagle's algorithm each waits
        # for the ACK of the one before (a delayed ACK), which cut reads to a third.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            log.debug("%s: TCP_NODELAY not set: %s", self.description, exc)
        return sock

    def _open_connection(self) -> _Connection:
        sock = self._open_socket()
        transport = paramiko.Transport(sock)
        transport.banner_timeout = self.timeout
        transport.handshake_timeout = self.timeout
        transport.auth_timeout = self.timeout
        # paramiko waits without limit in a few places (subsystem start): a watchdog
        # closes the transport if setting up takes longer than the timeout.
        watchdog = threading.Timer(max(self.timeout, self.connect_timeout), transport.close)
        watchdog.daemon = True
        watchdog.start()
        try:
            known = _known_keys(self.known_hosts_files + self.read_only_known_hosts, self.host_key_name)
            self._prefer_known_key_types(transport, known)
            _prefer_algorithms(transport)
            transport.start_client(timeout=self.timeout)
            self._check_host_key(transport.get_remote_server_key(), known)
            self._authenticate(transport)
            transport.set_keepalive(max(1, int(self.options.keepalive)))
            channel = transport.open_session(
                window_size=CHANNEL_WINDOW, max_packet_size=CHANNEL_MAX_PACKET, timeout=self.timeout
            )
            channel.settimeout(self.timeout)
            channel.invoke_subsystem("sftp")
            sftp = _SftpSession(channel)
        except (RemoteRefused, RemoteUnreachable):
            transport.close()
            raise
        except _TRANSPORT_ERRORS as exc:
            transport.close()
            raise RemoteUnreachable(f"{self.description}: connection failed: {exc or type(exc).__name__}") from exc
        except BaseException:
            transport.close()
            raise
        finally:
            watchdog.cancel()
        with self._lock:
            self._numbers += 1
            number = self._numbers
        log.debug("%s: connection %d open (extensions: %s)", self.description, number,
                  b",".join(sftp.extensions).decode("ascii", "replace"))
        return _Connection(transport, sftp, number)

    @staticmethod
    def _prefer_known_key_types(transport: paramiko.Transport, known: list[_KnownKey]) -> None:
        """Ask for a host key type we already know, as OpenSSH does."""
        known_types = {k.key.get_name() for k in known if not k.revoked}
        if not known_types:
            return
        options = transport.get_security_options()
        types = list(options.key_types)
        preferred = [t for t in types if _base_key_type(t) in known_types]
        options.key_types = preferred + [t for t in types if t not in preferred]

    def _check_host_key(self, key: paramiko.PKey, known: list[_KnownKey]) -> None:
        name = self.host_key_name
        key_type = key.get_name()
        for entry in known:
            if entry.revoked and entry.key == key:
                raise RemoteRefused(
                    f"the {key_type} host key of {name} is marked as revoked in "
                    f"{entry.path}:{entry.line}; refusing to connect"
                )
        valid = [k for k in known if not k.revoked]
        if any(k.key == key for k in valid):
            return
        if valid:
            offending = next((k for k in valid if k.key.get_name() == key_type), valid[0])
            raise RemoteRefused(
                "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
                "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n"
                "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
                "IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n"
                "Someone could be eavesdropping on you right now (man-in-the-middle attack)!\n"
                "It is also possible that a host key has just been changed.\n"
                f"The fingerprint for the {key_type} key sent by the remote host {name} is\n"
                f"{key.fingerprint}.\n"
                f"Offending {offending.key.get_name()} key in {offending.path}:{offending.line}\n"
                f"If the change is expected, remove the old key (ssh-keygen -R '{name}' "
                f"-f {offending.path}) and connect again.\n"
                "cachefs refuses to connect; --accept-new-host-key does not override this."
            )
        target = self.known_hosts_files[0]
        if not self.options.accept_new_host_key:
            raise RemoteRefused(
                f"the authenticity of host {name} can't be established: its {key_type} key "
                f"fingerprint is {key.fingerprint}, which is not in {target}. Check the "
                "fingerprint with the server's administrator, then run again with "
                "--accept-new-host-key to record it (or connect once with ssh)."
            )
        self._record_host_key(target, name, key)

    def _record_host_key(self, target: Path, name: str, key: paramiko.PKey) -> None:
        line = f"{name} {key.get_name()} {key.get_base64()}\n"
        try:
            if not target.parent.exists():
                target.parent.mkdir(parents=True, mode=0o700)
            fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "a") as f:
                # keep the file line-structured even if its last line lacks a newline
                if f.tell() > 0:
                    with open(target, "rb") as existing:
                        existing.seek(-1, os.SEEK_END)
                        if existing.read(1) != b"\n":
                            f.write("\n")
                f.write(line)
        except OSError as exc:
            raise RemoteRefused(f"cannot record the host key of {name} in {target}: {exc}") from exc
        log.warning("permanently added %s (%s %s) to %s", name, key.get_name(), key.fingerprint, target)

    # -- authentication -------------------------------------------------------------
    def _agent_keys(self) -> list[paramiko.PKey]:
        try:
            return list(paramiko.Agent().get_keys())
        except (OSError, paramiko.SSHException) as exc:
            log.debug("ssh-agent not usable: %s", exc)
            return []

    def _load_key(self, path: Path) -> paramiko.PKey | None:
        """The key in ``path``; None if missing; PasswordRequiredException passes through."""
        try:
            return paramiko.PKey.from_path(path)
        except FileNotFoundError:
            return None
        except paramiko.PasswordRequiredException:
            raise
        except TypeError as exc:
            # paramiko's from_path lets cryptography's "password was not provided"
            # TypeError through for encrypted keys instead of PasswordRequiredException
            raise paramiko.PasswordRequiredException(f"{path} is encrypted") from exc
        except (OSError, paramiko.SSHException, ValueError) as exc:
            log.warning("cannot use key file %s: %s", path, type(exc).__name__)
            return None

    def _candidate_keys(self) -> Iterator[tuple[str, paramiko.PKey]]:
        """Keys to offer, in OpenSSH's order; notes passphrase-protected files skipped."""
        self._locked_keys: list[Path] = []
        if self.options.identity is not None:
            path = Path(self.options.identity).expanduser()
            if not path.exists():
                raise RemoteRefused(f"identity file {path} does not exist")
            try:
                key = self._load_key(path)
            except paramiko.PasswordRequiredException:
                self._locked_keys.append(path)
                key = None
            if key is not None:
                yield str(path), key
                return
            # a protected key can still be used through the agent
            for agent_key in self._agent_keys():
                yield "ssh-agent", agent_key
            return
        for agent_key in self._agent_keys():
            yield "ssh-agent", agent_key
        seen: set[Path] = set()
        defaults = [Path("~/.ssh").expanduser() / name for name in DEFAULT_KEY_FILES]
        for path in self.config_identities + defaults:
            if path in seen:
                continue
            seen.add(path)
            try:
                key = self._load_key(path)
            except paramiko.PasswordRequiredException:
                self._locked_keys.append(path)
                continue
            if key is not None:
                yield str(path), key

    def _authenticate(self, transport: paramiko.Transport) -> None:
        tried = 0
        for source, key in self._candidate_keys():
            tried += 1
            try:
                remaining = transport.auth_publickey(self.user, key)
            except paramiko.AuthenticationException:
                log.debug("%s: key from %s (%s) not accepted", self.description, source, key.get_name())
                continue
            if not remaining and transport.is_authenticated():
                log.debug("%s: authenticated with a key from %s", self.description, source)
                return
            raise RemoteRefused(
                f"{self.description}: the server wants more authentication ({', '.join(remaining)}); "
                "cachefs supports public keys only"
            )
        hint = ""
        if self._locked_keys:
            files = ", ".join(str(p) for p in self._locked_keys)
            hint = (f" The key file(s) {files} are protected by a passphrase and no ssh-agent "
                    f"offers them: run `ssh-add {self._locked_keys[0]}` first.")
        raise RemoteRefused(
            f"authentication as {self.user} on {self.host_label}:{self.port} failed "
            f"({tried} key(s) offered).{hint}"
        )

    # -- the pool -------------------------------------------------------------------
    def _checkout(self) -> tuple[_Connection, bool]:
        """A connection for this thread alone, and whether it was reused from the pool.

        Waiting for a busy pool is not a sign of a dead network (the busy connections
        are bounded by their own timeouts), so the wait here is long."""
        deadline = time.monotonic() + max(300.0, self.timeout * 30)
        with self._lock:
            while True:
                if self._closed:
                    raise RemoteUnreachable(f"{self.description}: closed")
                while self._idle:
                    conn = self._idle.pop()
                    if conn.alive():
                        return conn, True
                    self._open -= 1
                    conn.close()
                if self._open < max(1, self.options.connections):
                    self._open += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RemoteUnreachable(f"{self.description}: no connection came free")
                self._lock.wait(remaining)
        conn: _Connection | None = None
        try:
            conn = self._open_connection()
            if self._root is None:
                self._init_root(conn.sftp)
        except BaseException:
            with self._lock:
                self._open -= 1
                self._lock.notify()
            if conn is not None:
                conn.close()
            raise
        return conn, False

    def _checkin(self, conn: _Connection) -> None:
        with self._lock:
            if self._closed:
                self._open -= 1
                conn.close()
            else:
                self._idle.append(conn)
            self._lock.notify()

    def _discard(self, conn: _Connection) -> None:
        """Drop a broken connection and the idle ones (most likely broken as well)."""
        with self._lock:
            doomed = [conn, *self._idle]
            self._idle.clear()
            self._open -= len(doomed)
            self._lock.notify_all()
        for each in doomed:
            each.close()

    def _run(self, what: str, operation: Callable[[_SftpSession], T], *, retry: bool = False) -> T:
        """Run ``operation`` on a checked-out connection, translating failures."""
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            conn, reused = self._checkout()
            try:
                result = operation(conn.sftp)
            except _StatusError as exc:
                self._checkin(conn)
                raise RemoteError(exc.errno or errno.EIO, f"{what}: {exc.strerror}") from exc
            except (RemoteError, ContentDamaged):
                self._checkin(conn)
                raise
            except _TRANSPORT_ERRORS as exc:
                self._discard(conn)
                timed_out = isinstance(exc, TimeoutError)
                if reused and not timed_out and attempt + 1 < attempts:
                    log.debug("%s: pooled connection was dead (%r); retrying %s", self.description, exc, what)
                    continue
                reason = f"no answer within {self.timeout:g} s" if timed_out else (str(exc) or type(exc).__name__)
                raise RemoteUnreachable(f"{self.description}: {what}: {reason}") from exc
            except BaseException:
                self._discard(conn)
                raise
            self._checkin(conn)
            return result
        raise AssertionError("unreachable")

    def _init_root(self, sftp: _SftpSession) -> None:
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
        except _StatusError as exc:
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
        with self._lock:
            self._closed = False
        self._run("connect", lambda sftp: sftp.lstat_raw(self._path(b"")), retry=True)

    def ping(self) -> None:
        self._run("ping", lambda sftp: sftp.lstat_raw(self._path(b"")), retry=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for conn in idle:
            conn.close()

    # -- reading --------------------------------------------------------------------
    def _ensure_root(self) -> None:
        if self._root is None:
            self.connect()

    def stat(self, path: bytes) -> RemoteStat:
        self._ensure_root()
        full = self._path(path)
        return self._run("stat", lambda sftp: _to_stat(sftp.lstat_raw(full)), retry=True)

    def listdir(self, path: bytes) -> list[tuple[bytes, RemoteStat]]:
        self._ensure_root()
        full = self._path(path)

        def listing(sftp: _SftpSession) -> list[tuple[bytes, RemoteStat]]:
            return [(name, _to_stat(attrs)) for name, attrs in sftp.listdir_raw(full)]

        return self._run("listdir", listing, retry=True)

    def readlink(self, path: bytes) -> bytes:
        self._ensure_root()
        full = self._path(path)
        return self._run("readlink", lambda sftp: sftp.readlink_raw(full), retry=True)

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
        self._ensure_root()
        full = self._path(path)
        if length <= 0:
            return 0
        size = self._read_size
        return self._run("read", lambda sftp: sftp.read_range(full, offset, length, size, sink), retry=True)

    def read_many(self, items: list[tuple[bytes, int]]) -> list:
        """Small whole files at once; per file (content, RemoteStat) or a RemoteError."""
        self._ensure_root()
        full = [(self._path(path), size) for path, size in items]
        raw = self._run("read_many", lambda sftp: sftp.read_small_files(full))
        return [RemoteError(r.errno or errno.EIO, str(r)) if isinstance(r, Exception)
                else (r[0], _to_stat(r[1])) for r in raw]

    def statvfs(self) -> SpaceInfo:
        self._ensure_root()
        if not self._has(b"statvfs@openssh.com"):
            return FALLBACK_SPACE
        root = self._path(b"")

        def space(sftp: _SftpSession) -> SpaceInfo:
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

        return self._run("statvfs", space, retry=True)

    # -- writing --------------------------------------------------------------------
    def _rename_over(self, sftp: _SftpSession, src: bytes, dst: bytes) -> None:
        if self._has(b"posix-rename@openssh.com"):
            sftp.extended(b"posix-rename@openssh.com", src, dst)
            return
        try:
            sftp._request(CMD_RENAME, src, dst)
        except _StatusError:
            # plain SFTP rename refuses an existing target: not atomic, but the best there is
            try:
                sftp.remove(dst)
            except _StatusError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            sftp._request(CMD_RENAME, src, dst)

    def upload(self, path: bytes, source: Source, mode: int, temp_name: bytes,
               times: tuple[int, int] | None = None) -> RemoteStat:
        self._ensure_root()
        full = self._path(path)
        parent, _, _ = full.rpartition(b"/")
        temp = parent + b"/" + temp_name
        fsync = self._has(b"fsync@openssh.com")

        def put(sftp: _SftpSession) -> RemoteStat:
            try:
                attrs = _attrs(mode, times)
                with open_source(source) as stream:
                    head = _read_upto(stream, SMALL_UPLOAD + 1)
                    if len(head) <= SMALL_UPLOAD and self._has(b"posix-rename@openssh.com"):
                        return _to_stat(sftp.write_small_file(temp, full, head, attrs, fsync))
                    with sftp.open(temp, "wb") as out:
                        out.set_pipelined(True)
                        chunk = head
                        while chunk:
                            out.write(chunk)
                            chunk = stream.read(WRITE_CHUNK * 32)
                        out.flush()
                        sftp._request(CMD_FSETSTAT, out.handle, attrs)
                        if fsync:
                            sftp.extended(b"fsync@openssh.com", out.handle)
                self._rename_over(sftp, temp, full)
            except (_StatusError, ContentDamaged):
                try:
                    sftp.remove(temp)
                except _StatusError as cleanup:
                    log.debug("%s: could not remove %r: %s", self.description, temp, cleanup)
                raise
            return _to_stat(sftp.lstat_raw(full))

        return self._run("upload", put)

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

        def run(sftp: _SftpSession) -> bytes | None | bool:
            """The command's output; None when the server runs no commands; False when it
            did not answer in time (a slow disk there: not a reason to stop asking)."""
            try:
                channel = sftp.sock.get_transport().open_session(timeout=self.timeout)
            except paramiko.ChannelException as exc:  # a session refused: no commands here
                log.debug("%s: session refused: %s", self.description, exc)
                return None
            try:
                channel.settimeout(self.timeout)
                try:
                    channel.exec_command(script)
                except paramiko.SSHException as exc:  # the server refused to run it
                    log.debug("%s: exec refused: %s", self.description, exc)
                    return None
                channel.shutdown_write()  # (a server that answers with an SFTP session ends)
                out = bytearray()
                limit = sum(len(f) + 67 for f in fulls) + 67
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

        output = self._run("hash", run)
        if output is False:
            return None
        records = output.split(b"\0") if output is not None else []
        if not records or records[0] != _EMPTY_SHA256 + b"  -":
            if self.can_hash is not False:
                log.info("%s: the server does not run sha256sum over SSH: a change there that "
                         "keeps a file's size and mtime second is not told from an unchanged file",
                         self.description)
            self.can_hash = False
            return None
        self.can_hash = True
        found: dict[bytes, bytes] = {}
        for record in records[1:]:
            if len(record) > 66 and record[64:66] == b"  ":
                try:
                    found[record[66:]] = bytes.fromhex(record[:64].decode())
                except ValueError:
                    pass
        return [found.get(f) for f in fulls]

    def mkdir(self, path: bytes, mode: int) -> None:
        self._ensure_root()
        full = self._path(path)
        self._run("mkdir", lambda sftp: sftp.mkdir(full, stat_mod.S_IMODE(mode)))

    def rmdir(self, path: bytes) -> None:
        self._ensure_root()
        full = self._path(path)
        self._run("rmdir", lambda sftp: sftp.rmdir(full))

    def unlink(self, path: bytes) -> None:
        self._ensure_root()
        full = self._path(path)
        self._run("unlink", lambda sftp: sftp.remove(full))

    def rename(self, src: bytes, dst: bytes) -> None:
        self._ensure_root()
        full_src, full_dst = self._path(src), self._path(dst)
        self._run("rename", lambda sftp: self._rename_over(sftp, full_src, full_dst))

    def rename_noreplace(self, src: bytes, dst: bytes) -> None:
        """SFTP v3's own RENAME (not posix-rename): the protocol makes an existing target
        an error, and OpenSSH's sftp-server renames a regular file as link() + unlink(),
        so a target that exists, or appears meanwhile, is never replaced (a folder or a
        symlink: lstat then rename, a small window). The refusal comes back as a plain
        SSH_FX_FAILURE: an lstat of the target tells EEXIST from other failures."""
        self._ensure_root()
        full_src, full_dst = self._path(src), self._path(dst)

        def rename(sftp: _SftpSession) -> None:
            try:
                sftp._request(CMD_RENAME, full_src, full_dst)
            except _StatusError as exc:
                if exc.code != SFTP_FAILURE:  # (a missing source is SSH_FX_NO_SUCH_FILE)
                    raise
                try:
                    sftp.lstat_raw(full_dst)
                except _StatusError:
                    raise exc from None
                raise RemoteError(errno.EEXIST, "rename: the target exists") from exc

        self._run("rename", rename)

    def symlink(self, target: bytes, path: bytes) -> None:
        self._ensure_root()
        full = self._path(path)
        # OpenSSH reads (target, linkpath); paramiko sends its arguments in order.
        self._run("symlink", lambda sftp: sftp.symlink(target, full))

    def link(self, src: bytes, dst: bytes) -> None:
        self._ensure_root()
        if not self._has(b"hardlink@openssh.com"):
            raise RemoteError(errno.EXDEV, "the server does not support hard links")
        full_src, full_dst = self._path(src), self._path(dst)
        self._run("link", lambda sftp: sftp.extended(b"hardlink@openssh.com", full_src, full_dst))

    def set_attrs(self, path: bytes, mode: int, atime_ns: int, mtime_ns: int) -> None:
        self._ensure_root()
        full = self._path(path)
        attrs = _attrs(mode, (atime_ns, mtime_ns))
        self._run("setstat", lambda sftp: sftp._request(CMD_SETSTAT, full, attrs))

    def truncate(self, path: bytes, size: int) -> None:
        self._ensure_root()
        full = self._path(path)
        self._run("truncate", lambda sftp: sftp.truncate(full, size))
