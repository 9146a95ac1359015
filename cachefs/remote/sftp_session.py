"""The SFTP protocol on one SSH channel: paramiko's client plus what cachefs needs of it.

Owns: the requests cachefs sends itself (raw-bytes names, the server's extension list,
pipelined reads, small files read or written many at once in a few round trips, uploads
whose WRITEs in flight stay within a per-connection ``WriteWindow``, requests answered by
a STATUS sent all at once, folder listings in two round trips for one folder or many)
and the decoding of their replies.
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
- A request whose answer nobody waits for (a listing's CLOSE) is sent with ``type(None)``
  as its owner, as ``_request`` does: paramiko's ``_read_response`` drops that answer
  whenever a later request of the session reads the channel, and request numbers stay
  paramiko's own.
- paramiko drops the extension list of the SFTP VERSION reply; ``SftpSession`` keeps it.
"""

from __future__ import annotations

import errno
import logging
import math
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple, TypeVar

import paramiko
from paramiko import Message, SFTPAttributes, SFTPError
from paramiko.sftp import int64

from .pacing import Pacer

log = logging.getLogger(__name__)
T = TypeVar("T")

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
CMD_REMOVE = 13
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
READDIR_WINDOW = 4  # READDIRs sent at once for a folder just opened (OpenSSH: 100 names each)
READDIR_MAX_IN_FLIGHT = 32  # per folder: the window doubles while a large folder keeps answering
OPEN_FOLDERS = 64  # folder handles open at once in one listing (a server bounds its handles)
#: ``WriteWindow``: the bytes of WRITE data in flight at first, at least and at most,
#: and the queueing delay an upload may add to the link before the window is cut
WRITE_WINDOW_START = 64 * 1024
WRITE_WINDOW_MIN = 8 * 1024
WRITE_WINDOW_MAX = 8 * 1024 * 1024
WRITE_TARGET_DELAY = 0.05

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


#: failures of the connection itself (socket.timeout is an OSError); a StatusError is not one
_BROKEN = (OSError, EOFError, paramiko.SSHException)

#: Per small file read by ``read_small_files``: (content, attributes) or the server's error.
SmallFile = tuple[bytes, SFTPAttributes] | StatusError


class SftpSession(paramiko.SFTPClient):
    """paramiko's client plus raw-bytes names, the server's extensions and pipelined reads."""

    extensions: dict[bytes, bytes]
    #: the bytes of WRITE data this session keeps in flight (see ``WriteWindow``)
    write_window: WriteWindow

    if TYPE_CHECKING:
        # paramiko's private request engine (BaseSFTP and SFTPClient), as this module uses it
        def _send_packet(self, t: int, packet: Message) -> None: ...
        def _read_packet(self) -> tuple[int, bytes]: ...
        def _request(self, t: int, *args: object) -> tuple[int, Message]: ...
        def _async_request(self, fileobj: object, t: int, *args: object) -> int: ...
        def _read_response(self, waitfor: int | None = None) -> tuple[int | None, Message | None]: ...

    def _send_version(self) -> int:
        self.extensions = {}
        self.write_window = WriteWindow()
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

    def listdir_raw(self, path: bytes, make: Callable[[int, int, int, int, int, int], T]
                    ) -> list[tuple[bytes, T]]:
        """A folder's entries (without ``.`` and ``..``), each with ``make(mode, size,
        mtime, atime, uid, gid)`` of its attributes, in two round trips for a small folder
        (see ``listdir_many_raw``); a STATUS error raises ``StatusError``."""
        (result,) = self.listdir_many_raw([path], make)
        if isinstance(result, StatusError):
            raise result
        return result

    def listdir_many_raw(self, paths: list[bytes], make: Callable[[int, int, int, int, int, int], T]
                         ) -> list[list[tuple[bytes, T]] | StatusError]:
        """Several folders listed at once, each as ``listdir_raw`` lists it or the error the
        server gave for it (one folder's error does not fail the others).

        The OPENDIRs are sent together (at most ``OPEN_FOLDERS`` handles open at a time),
        and as each handle comes ``READDIR_WINDOW`` READDIRs for it (OpenSSH answers up to
        100 names each, then EOF to every READDIR after the end), twice as many again
        while all had names; at its first EOF the folder's CLOSE goes without waiting for its answer
        (paramiko's engine drops that reply whenever a later request of the session reads
        the channel: sent with ``type(None)`` as its owner, as ``_request`` does). So a
        folder of up to 400 entries costs two round trips, and so do 64 of them."""
        results: list[list[tuple[bytes, T]] | StatusError | None] = [None] * len(paths)
        run = _Listings(self, paths, make, results)
        run.start()
        while run.in_flight:
            while not run.collector.replies:
                self._read_response()
            replies = run.collector.replies
            run.collector.replies = {}
            for num, (t, msg) in replies.items():
                run.take(num, t, msg)
        return [r if r is not None else StatusError(SFTP_FAILURE, "no reply") for r in results]

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
                   sink: Callable[[int, bytes], object],
                   attrs: bool = False) -> tuple[int, SFTPAttributes | None]:
        """Read with many READ requests in flight (one round trip per request is too slow),
        each reply handed to ``sink(position, bytes)`` as it comes: the count of bytes read
        from ``offset`` on without a gap (see ``_read_pipelined``), and (``attrs``) the
        open file's attributes as the reads ended: an FSTAT sent after the last READ,
        which the server answers after them (in order), so its version is that of the
        bytes read. No round trip of its own; nor is the CLOSE waited for (its reply is
        dropped when it comes): a range costs the OPEN's round trip and the reads."""
        t, msg = self._request(CMD_OPEN, path, SFTP_FLAG_READ, SFTPAttributes())
        if t != CMD_HANDLE:
            raise SFTPError("unexpected reply to OPEN")
        handle = msg.get_binary()
        done = False
        try:
            got = self._read_pipelined(handle, offset, length, request_size, sink, attrs)
            done = True
        finally:
            if done:
                self._async_request(type(None), CMD_CLOSE, handle)
            else:
                self._request(CMD_CLOSE, handle)
        return got

    def _read_pipelined(self, handle: bytes, offset: int, length: int, request_size: int,
                        sink: Callable[[int, bytes], object],
                        attrs: bool) -> tuple[int, SFTPAttributes | None]:
        """Replies go to ``sink`` in the order they come, not necessarily in file order,
        and past an end of file met early some may lie beyond the count returned.
        ``attrs``: an FSTAT follows the last READ sent (another follows a READ sent again
        after a short reply); the answer of the last one is returned."""
        collector = _Collector()
        read = _PipelinedRead(offset, length, request_size, sink)
        window = max(2, READ_WINDOW_BYTES // request_size)
        in_flight: dict[int, tuple[int, int]] = {}
        fstats: set[int] = set()  # FSTATs sent, not answered
        last_fstat = -1
        found: SFTPAttributes | None = None
        while read.todo or in_flight or fstats:
            sent = False
            while len(in_flight) < window and (piece := read.next_request()) is not None:
                pos, size = piece
                in_flight[self._async_request(collector, CMD_READ, handle, int64(pos), size)] = piece
                sent = True
            if attrs and (sent or last_fstat < 0) and not read.todo and read.error is None:
                last_fstat = self._async_request(collector, CMD_FSTAT, handle)
                fstats.add(last_fstat)
            if not in_flight and not fstats:
                break
            while not collector.replies:
                self._read_response()
            for num, (t, msg) in list(collector.replies.items()):
                del collector.replies[num]
                if num in fstats:
                    fstats.discard(num)
                    if num == last_fstat and t == CMD_ATTRS:  # (else None: the caller looks)
                        found = decode_attrs(msg)
                else:
                    read.take(t, msg, *in_flight.pop(num))
        if read.error is not None:
            raise read.error
        return read.contiguous(), found

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
    def write_small_files(self, items: list[SmallWrite], fsync: bool,
                          expect: Callable[[int, SFTPAttributes | None], bool],
                          pacer: Pacer | None = None) -> list[WriteOutcome]:
        """Whole small files, each to a temporary name then renamed over its target, in
        three round trips for the lot (the server runs one channel's requests in order):
        an LSTAT of every target and an OPEN of every temporary name; then, for the
        files ``expect(index, what is at the target)`` accepts, their WRITEs, FSETSTATs,
        fsync and CLOSE (the others' temporary files closed and removed); then, for each
        file all of whose requests succeeded, a posix-rename over the target and an
        LSTAT of it. Per file: its attributes at the target, ``Skipped`` (not accepted:
        what was there), or the first error (its temporary file removed)."""
        pipe = _Pipe(self, pacer)
        results: list[WriteOutcome | None] = [None] * len(items)
        stats = [pipe.send(CMD_LSTAT, item.final) for item in items]
        opens = [pipe.send(CMD_OPEN, item.temp, SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC,
                           SFTPAttributes()) for item in items]
        pipe.collect(stats + opens)
        handles: dict[int, bytes] = {}
        found: list[SFTPAttributes | None] = [None] * len(items)
        for i, (stat_num, open_num) in enumerate(zip(stats, opens)):
            t, msg = pipe.replies.pop(stat_num)
            if t == CMD_ATTRS:
                found[i] = decode_attrs(msg)
            else:
                error = self._status_error(t, msg)
                if error.code != SFTP_NO_SUCH_FILE:
                    results[i] = error
            t, msg = pipe.replies.pop(open_num)
            if t == CMD_HANDLE:
                handles[i] = msg.get_binary()
            elif results[i] is None:
                results[i] = self._status_error(t, msg)
        steps: dict[int, list[int]] = {}
        for i, handle in handles.items():
            item = items[i]
            if results[i] is None and expect(i, found[i]):
                steps[i] = pipe.write_all(handle, item.data)
                steps[i] += [pipe.send(CMD_FSETSTAT, handle, attrs) for attrs in item.attrs]
                if fsync:
                    steps[i].append(pipe.send(CMD_EXTENDED, b"fsync@openssh.com", handle))
                steps[i].append(pipe.send(CMD_CLOSE, handle))
            else:
                if results[i] is None:
                    results[i] = Skipped(found[i])
                pipe.send(CMD_CLOSE, handle)
                pipe.send(CMD_REMOVE, item.temp)
        pipe.collect([num for nums in steps.values() for num in nums])
        landing: dict[int, tuple[int, int]] = {}
        for i, nums in steps.items():
            failed = pipe.first_error(nums)
            if failed is not None:
                results[i] = failed
                pipe.send(CMD_REMOVE, items[i].temp)
            else:
                landing[i] = (pipe.send(CMD_EXTENDED, b"posix-rename@openssh.com", items[i].temp, items[i].final),
                              pipe.send(CMD_LSTAT, items[i].final))
        pipe.collect([num for pair in landing.values() for num in pair])
        for i, (rename, lstat) in landing.items():
            failed = pipe.first_error([rename])
            if failed is not None:
                results[i] = failed
                pipe.send(CMD_REMOVE, items[i].temp)
                continue
            t, msg = pipe.replies.pop(lstat)
            results[i] = decode_attrs(msg) if t == CMD_ATTRS else self._status_error(t, msg)
        pipe.finish()
        return [r if r is not None else StatusError(SFTP_FAILURE, "no reply") for r in results]

    def requests_at_once(self, requests: list[tuple[object, ...]]) -> list[StatusError | None]:
        """Requests answered by a STATUS (SETSTAT, MKDIR, REMOVE...), all sent at once: one
        round trip for the lot. Per request None (OK) or the server's error."""
        pipe = _Pipe(self, None)
        nums = [pipe.send(t, *args) for t, *args in requests]  # type: ignore[arg-type]
        pipe.collect(nums)
        return [pipe.first_error([num]) for num in nums]

    def write_stream(self, temp: bytes, head: bytes, stream: BinaryIO, attrs: tuple[SFTPAttributes, ...],
                     fsync: bool, pacer: Pacer | None = None) -> None:
        """A file of any size to ``temp``: ``head`` then the rest of ``stream``, the
        WRITEs pipelined within the session's ``WriteWindow`` (and paced by ``pacer``),
        then an FSETSTAT for each of ``attrs`` (in order), fsync and CLOSE. The first error is raised (the caller removes
        ``temp``); a read of ``stream`` that raises stops the upload (handle closed)."""
        handle = self._open_for_write(temp)
        pipe = _Pipe(self, pacer)
        nums: list[int] = []
        try:
            offset, chunk = 0, head
            while chunk:
                nums += pipe.write_all(handle, chunk, offset)
                offset += len(chunk)
                chunk = stream.read(WRITE_CHUNK * 32)
                if len(nums) > 256:  # (keep the list of what to check short)
                    pipe.collect(nums)
                    self._raise_first(pipe, nums)
                    nums = []
        except BaseException as exc:
            if isinstance(exc, _BROKEN) and not isinstance(exc, StatusError):
                raise  # (the connection is dropped: nothing to tidy on it)
            pipe.send(CMD_CLOSE, handle)  # (a server error, or the source failed)
            pipe.finish()
            raise
        nums += [pipe.send(CMD_FSETSTAT, handle, one) for one in attrs]
        if fsync:
            nums.append(pipe.send(CMD_EXTENDED, b"fsync@openssh.com", handle))
        nums.append(pipe.send(CMD_CLOSE, handle))
        pipe.collect(nums)
        self._raise_first(pipe, nums)

    def _raise_first(self, pipe: "_Pipe", nums: list[int]) -> None:
        error = pipe.first_error(nums)
        if error is not None:
            raise error

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


class SmallWrite(NamedTuple):
    """One file of ``write_small_files``: written to ``temp``, renamed over ``final``."""

    temp: bytes
    final: bytes
    data: bytes
    attrs: tuple[SFTPAttributes, ...]  # one FSETSTAT each, in order


class Skipped(NamedTuple):
    """A file of ``write_small_files`` not written: ``expect`` refused what was there."""

    found: SFTPAttributes | None


#: Per file of ``write_small_files``: its attributes once renamed over its target,
#: ``Skipped``, or the server's error.
WriteOutcome = SFTPAttributes | Skipped | StatusError


class WriteWindow:
    """The bytes of WRITE data one connection keeps in flight (trickle on a weak link).

    A WRITE's reply comes back a round trip plus the time the data waited in queues on
    the way (the link's, the server's): while replies come as fast as the quickest of
    the last minute, the window grows (doubling until the first cut, then one chunk a
    window's worth of replies), and when they come ``WRITE_TARGET_DELAY`` later than
    that, a queue is building up on the link, and the window is halved (at most once a
    round trip). So an upload fills a fast link, and on a slow one leaves a short queue
    in front of the requests of reads (LEDBAT's idea, RFC 6817, with the SFTP reply as
    the acknowledgement). WRITEs are a quarter of the window, at most ``WRITE_CHUNK``:
    on a slow link a smaller request waits less in front of a read's."""

    def __init__(self) -> None:
        self.size = WRITE_WINDOW_START
        self._base = [math.inf, math.inf]  # quickest reply: this period, the one before
        self._period_ends = 0.0
        self._grown_only = True  # (no cut yet: grow fast)
        self._no_cut_before = 0.0

    @property
    def chunk(self) -> int:
        """The largest WRITE: a quarter of the window (a small one on a slow link)."""
        return max(WRITE_WINDOW_MIN // 2, min(WRITE_CHUNK, self.size // 4))

    def sample(self, latency: float, size: int, now: float) -> None:
        if now >= self._period_ends:
            self._base = [math.inf, self._base[0]]
            self._period_ends = now + 60.0
        self._base[0] = min(self._base[0], latency)
        base = min(self._base)
        if latency - base > WRITE_TARGET_DELAY:
            if now >= self._no_cut_before:
                self.size = max(WRITE_WINDOW_MIN, self.size // 2)
                self._no_cut_before = now + latency
                self._grown_only = False
                log.debug("write window cut to %d bytes (a reply after %.0f ms, the quickest %.0f ms)",
                          self.size, latency * 1000, base * 1000)
        elif self._grown_only:
            self.size = min(WRITE_WINDOW_MAX, self.size + size)
        else:  # (about one chunk a round trip)
            self.size = min(WRITE_WINDOW_MAX, self.size + max(1, self.chunk * size // self.size))


class _Pipe:
    """Requests sent ahead of their replies on one session (paramiko's ``fileobj`` hook
    receives the replies): WRITE data in flight is kept within the session's
    ``WriteWindow``, and paced by a ``Pacer`` (``--upload-limit``) when there is one."""

    def __init__(self, session: SftpSession, pacer: Pacer | None) -> None:
        self.session = session
        self.window = session.write_window
        self.pacer = pacer
        self.replies: dict[int, tuple[int, Message]] = {}
        self._writes: dict[int, tuple[float, int]] = {}  # request -> (sent at, bytes)
        self._in_flight = 0
        self._sent: set[int] = set()

    def _async_response(self, t: int, msg: Message, num: int) -> None:
        self.replies[num] = (t, msg)
        self._sent.discard(num)
        sent = self._writes.pop(num, None)
        if sent is not None:
            now = time.monotonic()
            self._in_flight -= sent[1]
            self.window.sample(now - sent[0], sent[1], now)

    def send(self, t: int, *args: object) -> int:
        num = self.session._async_request(self, t, *args)
        self._sent.add(num)
        return num

    def write_all(self, handle: bytes, data: bytes, offset: int = 0) -> list[int]:
        """WRITEs of ``data`` at ``offset``, each sent once the window has room."""
        nums: list[int] = []
        pos = 0
        while pos < len(data):
            piece = data[pos:pos + self.window.chunk]
            if self.pacer is not None:
                self.pacer.wait(len(piece))
            while self.session.sock.recv_ready():  # (replies come in: timed as they came)
                self.session._read_response()
            while self._writes and self._in_flight + len(piece) > self.window.size:
                self.session._read_response()
            num = self.send(CMD_WRITE, handle, int64(offset + pos), piece)
            self._writes[num] = (time.monotonic(), len(piece))
            self._in_flight += len(piece)
            nums.append(num)
            pos += len(piece)
        return nums

    def collect(self, nums: list[int]) -> None:
        for num in nums:
            while num not in self.replies:
                self.session._read_response()

    def first_error(self, nums: list[int]) -> StatusError | None:
        """The first error among these requests' STATUS replies (in sending order); the
        replies are let go."""
        error = None
        for num in nums:
            t, msg = self.replies.pop(num)
            if error is None:
                if t != CMD_STATUS:
                    error = self.session._status_error(t, msg)
                elif (code := msg.get_int()) != SFTP_OK:
                    error = StatusError(code, msg.get_string().decode("utf-8", "replace"))
        return error

    def finish(self) -> None:
        """Read the replies still due (cleanups whose outcome does not matter), so that
        none is left for the session's next request."""
        while self._sent:
            self.session._read_response()


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


class _Folder:
    """One folder of ``listdir_many_raw``: its handle, its pages of names by READDIR
    request number (put together in that order), where it ended, its replies awaited."""

    __slots__ = ("index", "handle", "pages", "eof_at", "error", "outstanding", "window", "done")

    def __init__(self, index: int) -> None:
        self.index = index
        self.handle: bytes | None = None
        self.pages: dict[int, list[tuple[bytes, object]]] = {}
        self.eof_at: int | None = None  # the READDIR that met the end
        self.error: StatusError | None = None
        self.outstanding = 0  # READDIRs sent and not answered yet
        self.window = READDIR_WINDOW  # READDIRs sent last time
        self.done = False  # EOF or an error met: no more READDIRs, CLOSE sent


class _Listings:
    """The bookkeeping of one ``listdir_many_raw``: which request is whose, a window of
    READDIRs per folder that widens while names keep coming, the CLOSE at the first EOF,
    the next folder opened as one finishes. A reply of an unexpected type raises
    ``SFTPError`` (the session is then out of step: the pool drops the connection)."""

    def __init__(self, session: SftpSession, paths: list[bytes],
                 make: Callable[[int, int, int, int, int, int], object],
                 results: list[Any]) -> None:
        self.session = session
        self.pending = deque(enumerate(paths))
        self.make = make
        self.results = results
        self.collector = _Collector()
        self.requests: dict[int, tuple[_Folder, bool]] = {}  # request -> (folder, a READDIR)
        self.open = 0

    @property
    def in_flight(self) -> bool:
        return bool(self.requests)

    def start(self) -> None:
        while self.pending and self.open < OPEN_FOLDERS:
            index, path = self.pending.popleft()
            num = self.session._async_request(self.collector, CMD_OPENDIR, path)
            self.requests[num] = (_Folder(index), False)
            self.open += 1

    def take(self, num: int, t: int, msg: Message) -> None:
        folder, readdir = self.requests.pop(num)
        if not readdir:
            self._opened(folder, t, msg)
        else:
            folder.outstanding -= 1
            self._page(folder, num, t, msg)
        if folder.done and not folder.outstanding:
            self._finish(folder)

    def _opened(self, folder: _Folder, t: int, msg: Message) -> None:
        if t == CMD_HANDLE:
            folder.handle = msg.get_binary()
            self._read_more(folder, READDIR_WINDOW)
        elif t == CMD_STATUS:
            folder.error = SftpSession._status_error(t, msg)
            folder.done = True
        else:
            raise SFTPError(f"unexpected reply {t} to OPENDIR")

    def _page(self, folder: _Folder, num: int, t: int, msg: Message) -> None:
        if t == CMD_NAME:
            folder.pages[num] = _parse_names(msg.get_remainder(), self.make)
            if not folder.done and not folder.outstanding:
                # every READDIR sent had names: twice as many next (more sent while some
                # are out could only come back EOF, and cost a round trip more to await)
                folder.window = min(2 * folder.window, READDIR_MAX_IN_FLIGHT)
                self._read_more(folder, folder.window)
            return
        if t != CMD_STATUS:
            raise SFTPError(f"unexpected reply {t} to READDIR")
        error = SftpSession._status_error(t, msg)
        if error.code == SFTP_EOF:
            folder.eof_at = num if folder.eof_at is None else min(folder.eof_at, num)
        elif folder.error is None:
            folder.error = error
        self._close(folder)

    def _read_more(self, folder: _Folder, count: int) -> None:
        for _ in range(count):
            num = self.session._async_request(self.collector, CMD_READDIR, folder.handle)
            self.requests[num] = (folder, True)
            folder.outstanding += 1

    def _close(self, folder: _Folder) -> None:
        """No READDIR after this one: CLOSE the handle, its answer not awaited (the
        server runs the READDIRs already sent first)."""
        if not folder.done:
            folder.done = True
            self.session._async_request(type(None), CMD_CLOSE, folder.handle)

    def _finish(self, folder: _Folder) -> None:
        if folder.error is not None:
            self.results[folder.index] = folder.error
        else:
            end = folder.eof_at
            entries: list[tuple[bytes, object]] = []
            for num in sorted(folder.pages):
                if end is None or num < end:
                    entries.extend(folder.pages[num])
            self.results[folder.index] = entries
        self.open -= 1
        self.start()


_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_ALL_ATTRS = struct.Struct(">QIIIII")  # size, uid, gid, permissions, atime, mtime
_ALL_FLAGS = (SFTPAttributes.FLAG_SIZE | SFTPAttributes.FLAG_UIDGID | SFTPAttributes.FLAG_PERMISSIONS
              | SFTPAttributes.FLAG_AMTIME)


def _parse_names(data: bytes, make: Callable[[int, int, int, int, int, int], T]) -> list[tuple[bytes, T]]:
    """The entries of a NAME reply (after its request id): (name, ``make(mode, size,
    mtime, atime, uid, gid)``), without ``.`` and ``..``; what the server left out is 0
    (as ``decode_attrs`` and the backend's ``_to_stat`` make it). Read with ``struct``
    straight from the bytes: ``decode_attrs`` through paramiko's ``Message`` took most of
    a large listing's time."""
    out: list[tuple[bytes, T]] = []
    try:
        (count,) = _U32.unpack_from(data, 0)
        pos = 4
        for _ in range(count):
            (size,) = _U32.unpack_from(data, pos)
            name = data[pos + 4:pos + 4 + size]
            pos += 4 + size
            (size,) = _U32.unpack_from(data, pos)  # longname, ls -l style: not needed
            pos += 4 + size
            (flags,) = _U32.unpack_from(data, pos)
            pos += 4
            if flags == _ALL_FLAGS:  # what OpenSSH sends
                length, uid, gid, mode, atime, mtime = _ALL_ATTRS.unpack_from(data, pos)
                pos += 28
            else:
                length, uid, gid, mode, atime, mtime, pos = _attrs_at(data, pos, flags)
            if name != b"." and name != b"..":
                out.append((name, make(mode, length, mtime, atime, uid, gid)))
    except struct.error as exc:
        raise SFTPError("malformed NAME reply") from exc
    if pos > len(data):
        raise SFTPError("malformed NAME reply")
    return out


def _attrs_at(data: bytes, pos: int, flags: int) -> tuple[int, int, int, int, int, int, int]:
    """An ATTRS structure with some fields left out: (size, uid, gid, mode, atime, mtime,
    the position after it)."""
    length = uid = gid = mode = atime = mtime = 0
    if flags & SFTPAttributes.FLAG_SIZE:
        (length,) = _U64.unpack_from(data, pos)
        pos += 8
    if flags & SFTPAttributes.FLAG_UIDGID:
        uid, gid = struct.unpack_from(">II", data, pos)
        pos += 8
    if flags & SFTPAttributes.FLAG_PERMISSIONS:
        (mode,) = _U32.unpack_from(data, pos)
        pos += 4
    if flags & SFTPAttributes.FLAG_AMTIME:
        atime, mtime = struct.unpack_from(">II", data, pos)
        pos += 8
    if flags & SFTPAttributes.FLAG_EXTENDED:
        (pairs,) = _U32.unpack_from(data, pos)
        pos += 4
        for _ in range(2 * pairs):
            (size,) = _U32.unpack_from(data, pos)
            pos += 4 + size
    return length, uid, gid, mode, atime, mtime, pos


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
