"""The SFTP protocol on one SSH channel: paramiko's client plus what cachefs needs of it.

Owns: the requests cachefs sends itself (raw-bytes names, the server's extension list,
pipelined reads, small files in a few round trips) and the decoding of their replies.
Must not touch: connections, sockets or authentication (``ssh_*``, ``sftp_pool``), paths
of the share (``sftp``), the cache, trio. One session is used by one thread at a time.

paramiko's own API decodes names as UTF-8, drops the extension list of the VERSION reply
and has no way to send an extension request or to pipeline requests of our choosing, so
this class drives paramiko's request engine directly. That engine is private: the names
it uses are declared below under ``TYPE_CHECKING`` (the stubs leave them out), and
``tests/test_remote.py::test_paramiko_private_surface`` checks them against the installed
paramiko. pyproject.toml bounds paramiko to the versions this was tested with. The rest
of the private surface: the ``_async_response`` hook paramiko calls on ``_Collector``, the
``int64`` marker that makes paramiko pack an int as 64 bits, and the packing of
``SFTPAttributes`` inside a request.

The protocol numbers are those of SFTP version 3 (draft-ietf-secsh-filexfer-02), defined
here rather than taken from paramiko's internal ``paramiko.sftp`` module; ATTRS replies are
decoded here too (``decode_attrs``), with paramiko's public ``Message`` getters.

paramiko quirks handled here:
- ``listdir``/``readlink`` decode names as UTF-8 and hand back ``str`` (or bytes, when the
  name is not UTF-8): we send those requests ourselves and keep the raw bytes.
- paramiko drops the extension list of the SFTP VERSION reply; ``SftpSession`` keeps it.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import paramiko
from paramiko import Message, SFTPAttributes, SFTPError
from paramiko.sftp import int64

log = logging.getLogger(__name__)

# SFTP v3 packet types (draft-ietf-secsh-filexfer-02, section 3)
CMD_INIT = 1
CMD_VERSION = 2
CMD_OPEN = 3
CMD_CLOSE = 4
CMD_READ = 5
CMD_WRITE = 6
CMD_LSTAT = 7
CMD_FSTAT = 8
CMD_SETSTAT = 9
CMD_FSETSTAT = 10
CMD_OPENDIR = 11
CMD_READDIR = 12
CMD_REALPATH = 16
CMD_RENAME = 18
CMD_READLINK = 19
CMD_STATUS = 101
CMD_HANDLE = 102
CMD_DATA = 103
CMD_NAME = 104
CMD_ATTRS = 105
CMD_EXTENDED = 200
CMD_EXTENDED_REPLY = 201
# STATUS codes (section 7)
SFTP_OK = 0
SFTP_EOF = 1
SFTP_NO_SUCH_FILE = 2
SFTP_PERMISSION_DENIED = 3
SFTP_FAILURE = 4
SFTP_BAD_MESSAGE = 5
SFTP_NO_CONNECTION = 6
SFTP_CONNECTION_LOST = 7
SFTP_OP_UNSUPPORTED = 8
# OPEN's pflags (section 6.3)
SFTP_FLAG_READ = 0x01
SFTP_FLAG_WRITE = 0x02
SFTP_FLAG_CREATE = 0x08
SFTP_FLAG_TRUNC = 0x10

DEFAULT_READ_SIZE = 32 * 1024  # what every SFTP server accepts
MAX_READ_SIZE = 256 * 1024  # upper bound even if limits@openssh.com offers more
READ_WINDOW_BYTES = 2 * 1024 * 1024  # bytes of read requests in flight (measured: more is no faster)
WRITE_CHUNK = 32 * 1024

_STATUS_ERRNO = {
    SFTP_NO_SUCH_FILE: errno.ENOENT,
    SFTP_PERMISSION_DENIED: errno.EACCES,
    SFTP_FAILURE: errno.EIO,
    SFTP_BAD_MESSAGE: errno.EINVAL,
    SFTP_OP_UNSUPPORTED: errno.ENOTSUP,
}


class StatusError(IOError):
    """An SFTP STATUS reply other than OK/EOF: the server answered with an error."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(_STATUS_ERRNO.get(code, errno.EIO), text or f"SFTP status {code}")
        self.code = code


class _Collector:
    """Receives the asynchronous replies of pipelined requests (paramiko's ``fileobj`` hook).

    paramiko keeps these in a WeakValueDictionary, so the caller holds a reference.
    """

    def __init__(self) -> None:
        self.replies: dict[int, tuple[int, Message]] = {}

    def _async_response(self, t: int, msg: Message, num: int) -> None:
        self.replies[num] = (t, msg)


#: Per small file read by ``read_small_files``: (content, attributes) or the server's error.
SmallFile = tuple[bytes, SFTPAttributes] | StatusError


class SftpSession(paramiko.SFTPClient):
    """paramiko's client plus raw-bytes names, the server's extensions and pipelined reads."""

    extensions: dict[bytes, bytes]

    if TYPE_CHECKING:
        # paramiko's private request engine (BaseSFTP and SFTPClient), as this module uses it
        def _send_packet(self, t: int, packet: Message) -> None: ...
        def _read_packet(self) -> tuple[int, bytes]: ...
        def _request(self, t: int, *args: object) -> tuple[int, Message]: ...
        def _async_request(self, fileobj: object, t: int, *args: object) -> int: ...
        def _read_response(self, waitfor: int | None = None) -> tuple[int | None, Message | None]: ...

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
        raise StatusError(code, text)

    # -- raw requests ---------------------------------------------------------------
    def request(self, t: int, *args: object) -> tuple[int, Message]:
        """One request and its reply (a STATUS other than OK raises, see ``_convert_status``)."""
        return self._request(t, *args)

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
        return decode_attrs(msg)

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
                    attrs = decode_attrs(msg)
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

    def extended(self, name: bytes, *args: object) -> Message | None:
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

    # -- reading --------------------------------------------------------------------
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

    def _read_pipelined(self, handle: bytes, offset: int, length: int, request_size: int,
                        sink: Callable[[int, bytes], object]) -> int:
        """Replies go to ``sink`` in the order they come, not necessarily in file order,
        and past an end of file met early some may lie beyond the count returned."""
        collector = _Collector()
        read = _PipelinedRead(offset, length, request_size, sink)
        window = max(2, READ_WINDOW_BYTES // request_size)
        in_flight: dict[int, tuple[int, int]] = {}
        while read.todo or in_flight:
            while len(in_flight) < window and (piece := read.next_request()) is not None:
                pos, size = piece
                in_flight[self._async_request(collector, CMD_READ, handle, int64(pos), size)] = piece
            if not in_flight:
                break
            while not collector.replies:
                self._read_response()
            for num, (t, msg) in list(collector.replies.items()):
                del collector.replies[num]
                read.take(t, msg, *in_flight.pop(num))
        if read.error is not None:
            raise read.error
        return read.contiguous()

    def read_small_files(self, items: list[tuple[bytes, int]]) -> list[SmallFile]:
        """Whole small files in two round trips for the lot: every OPEN is sent at once,
        then for each handle a READ, an FSTAT and a CLOSE. Per file: (content, attributes
        when read) or the error the server gave."""
        results: list[SmallFile | None] = [None] * len(items)
        handles = self._open_all([path for path, _size in items], results)
        data, attrs = self._read_and_close(handles, [size for _path, size in items], results)
        for i in handles:
            if results[i] is None:
                if i in data and i in attrs:
                    results[i] = (data[i], attrs[i])
                else:
                    results[i] = StatusError(SFTP_FAILURE, "incomplete reply")
        return [r if r is not None else StatusError(SFTP_FAILURE, "no reply") for r in results]

    def _open_all(self, paths: list[bytes], results: list[SmallFile | None]) -> dict[int, bytes]:
        """OPEN every path at once: the handles by index; a refusal goes to ``results``."""
        collector = _Collector()
        opens = {self._async_request(collector, CMD_OPEN, path, SFTP_FLAG_READ, SFTPAttributes()): i
                 for i, path in enumerate(paths)}
        self._collect(collector, len(opens))
        handles: dict[int, bytes] = {}
        for num, (t, msg) in collector.replies.items():
            i = opens[num]
            if t == CMD_HANDLE:
                handles[i] = msg.get_binary()
            else:
                results[i] = self._status_error(t, msg)
        return handles

    def _read_and_close(self, handles: dict[int, bytes], sizes: list[int], results: list[SmallFile | None]
                        ) -> tuple[dict[int, bytes], dict[int, SFTPAttributes]]:
        """READ, FSTAT and CLOSE each handle, all at once: content and attributes by index;
        a failed READ goes to ``results``."""
        collector = _Collector()
        reads, stats = {}, {}
        for i, handle in handles.items():
            reads[self._async_request(collector, CMD_READ, handle, int64(0), max(1, sizes[i]))] = i
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
                    continue
                error = self._status_error(t, msg)
                if error.code == SFTP_EOF:
                    data[i] = b""  # an empty file
                else:
                    results[i] = error
            elif num in stats and t == CMD_ATTRS:
                attrs[stats[num]] = decode_attrs(msg)
        return data, attrs

    # -- writing --------------------------------------------------------------------
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
        return decode_attrs(msg)

    def _check_statuses(self, collector: _Collector, nums: list[int]) -> None:
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

    def _collect(self, collector: _Collector, count: int) -> None:
        while len(collector.replies) < count:
            self._read_response()

    @staticmethod
    def _status_error(t: int, msg: Message) -> StatusError:
        if t != CMD_STATUS:
            return StatusError(SFTP_FAILURE, "unexpected reply")
        code = msg.get_int()
        return StatusError(code, msg.get_string().decode("utf-8", "replace"))


class _PipelinedRead:
    """The bookkeeping of one pipelined read: the pieces still to ask for, where the file
    ended, the bytes received by position, and the first error."""

    def __init__(self, offset: int, length: int, request_size: int,
                 sink: Callable[[int, bytes], object]) -> None:
        self.offset, self.length, self.sink = offset, length, sink
        self.todo: deque[tuple[int, int]] = deque(
            (pos, min(request_size, offset + length - pos))
            for pos in range(offset, offset + length, request_size)
        )
        self.received: dict[int, int] = {}  # position -> bytes
        self.eof_at = offset + length
        self.error: BaseException | None = None

    def next_request(self) -> tuple[int, int] | None:
        """The next (position, size) to ask for; None when nothing is left or after an error
        (pieces past an end of file already met are dropped)."""
        while self.todo and self.error is None:
            pos, size = self.todo.popleft()
            if pos < self.eof_at:
                return pos, size
        return None

    def take(self, t: int, msg: Message, pos: int, size: int) -> None:
        """One reply to the READ of ``size`` bytes at ``pos``."""
        if t == CMD_DATA:
            data = bytes(msg.get_string())
            if not data:
                self.eof_at = min(self.eof_at, pos)
                return
            self.sink(pos, data)
            self.received[pos] = len(data)
            if len(data) < size:  # a short read: ask again for the rest
                self.todo.appendleft((pos + len(data), size - len(data)))
        elif t == CMD_STATUS:
            code = msg.get_int()
            text = msg.get_string().decode("utf-8", "replace")
            if code == SFTP_EOF:
                self.eof_at = min(self.eof_at, pos)
            elif self.error is None:
                self.error = StatusError(code, text)
        elif self.error is None:
            self.error = SFTPError(f"unexpected reply {t} to READ")

    def contiguous(self) -> int:
        """The count of bytes received from the offset on without a gap."""
        pos = self.offset
        while pos < self.eof_at and pos in self.received:
            pos += self.received[pos]
        return min(pos, self.offset + self.length) - self.offset


def decode_attrs(msg: Message) -> SFTPAttributes:
    """An SFTP v3 ATTRS structure (draft-ietf-secsh-filexfer-02, section 5), read from
    ``msg`` into the ``st_*`` fields paramiko's own (private) decoder fills."""
    attrs = SFTPAttributes()
    flags = msg.get_int()
    if flags & SFTPAttributes.FLAG_SIZE:
        attrs.st_size = msg.get_int64()
    if flags & SFTPAttributes.FLAG_UIDGID:
        attrs.st_uid = msg.get_int()
        attrs.st_gid = msg.get_int()
    if flags & SFTPAttributes.FLAG_PERMISSIONS:
        attrs.st_mode = msg.get_int()
    if flags & SFTPAttributes.FLAG_AMTIME:
        attrs.st_atime = msg.get_int()
        attrs.st_mtime = msg.get_int()
    if flags & SFTPAttributes.FLAG_EXTENDED:
        for _ in range(2 * msg.get_int()):
            msg.get_string()  # extended attribute pairs: read past, none is used
    return attrs


def _unpack_string(data: bytes, pos: int) -> tuple[bytes, int]:
    (size,) = struct.unpack(">I", data[pos : pos + 4])
    end = pos + 4 + size
    if end > len(data):
        raise struct.error("truncated string")
    return data[pos + 4 : end], end
