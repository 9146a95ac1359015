"""The SMB 2/3 backend: a folder in a Windows or Samba share (``smb://[user@]host[:port]/share/path``).

Owns: the ``Remote`` contract mapped onto SMB2 requests (``smbprotocol``'s low-level
connection, session and tree; no ``smbclient``; the requests it sends packed here with
``struct`` and sent on a sealed session by ``_FastConnection``: smbprotocol's
``Structure`` of each was most of the mount's CPU), the login (Kerberos where a ticket and
python-gssapi exist, else NTLM with the password from ``options.secrets``), the one table
from NTSTATUS to errno (``STATUS_ERRNO``), SMB's name rules (``name_error``) and the
change notifications of the share (``SmbWatch``: SMB2 CHANGE_NOTIFY with WATCH_TREE).
Must not touch: the cache, LMDB, trio, FUSE. Never puts the password in a log, message or
exception.

Why the low level and not ``smbclient``: ``smbclient`` keeps one global pool of
connections and sessions per process (shared with any other user of it in the process),
waits without a bound in its session setup and in every response, and cannot send
several READs or WRITEs before the first answer. Here each ``SmbRemote`` has its own
connection (``_Link``): requests from several threads are multiplexed on it (SMB2 message
ids and credits), an answer is awaited until nothing has moved on the connection for
``timeout`` seconds (``_Meter``: a transfer on a slow link may take longer, a silent
server counts as gone: the connection is dropped and the next call makes a new one), the
connection and login together are bounded by one ``timeout`` (a watchdog closes the
socket), and related requests travel as one compound (open + query + close: one round
trip for a ``stat``). READs and WRITEs in flight, of all threads, are kept to what the
link answers within a quarter of the timeout at the rate measured (``_Flow``): a call
queued behind a transfer on a slow link is not late.

Versions: ``RemoteStat.tag`` is a 63-bit hash of the file id and the change time (100 ns),
so a rewrite that keeps the size and the mtime second is seen, and so is a file replaced
by another (a new id). Uploads write a temporary name in the same folder and rename it
over the target with FileRenameInformation (ReplaceIfExists); ``upload_many`` checks the
target just before that rename (SMB has no conditional rename: the window is about one
round trip, more behind a busy connection's transfers: docs/handlers-smb.md has the
figures) and, for a target that must not exist, renames with ReplaceIfExists off, which
the server refuses atomically when one appeared.

Locks: ``SmbRemote._lock`` (which link is current) is held while a new connection is
made (bounded by the timeout; other threads wait for that one rather than each making
their own); ``_Link._send_lock`` while message ids are given and credits awaited
(bounded). Neither is taken under the other, and no lock is held while waiting for the
answer to a request.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import socket
import stat as stat_mod
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar, cast

from smbprotocol.change_notify import SMB2ChangeNotifyRequest  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.ciphers import aead
from smbprotocol.connection import (Ciphers, Connection, Dialects, Request,  # type: ignore[import-untyped]
                                    SMB2Echo)
from smbprotocol.exceptions import SMBException  # type: ignore[import-untyped]
from smbprotocol.session import Session  # type: ignore[import-untyped]
from smbprotocol.tree import TreeConnect  # type: ignore[import-untyped]
from spnego import NTLMHash
# (MD4, the NT hash's: not in hashlib where OpenSSL 3 leaves its legacy provider out)
from spnego._ntlm_raw.md4 import md4

from .base import (Capabilities, ContentDamaged, NotExpected, Remote, RemoteError, RemoteRefused, RemoteStat,
                   RemoteUnreachable, Source, SpaceInfo, Upload, UploadOutcome, fold_tag, open_source)
from .options import ConnectOptions
from .pacing import unacknowledged
from .watch import Watch, WatchEnded

if TYPE_CHECKING:
    from ..address import RemoteAddress
    from .pacing import Pacer

log = logging.getLogger(__name__)
T = TypeVar("T")


class _WorkerDeath(logging.Filter):
    """smbprotocol logs the end of its receiver by an error (keep-alives unanswered, an
    answer it cannot read) as an ERROR with a traceback, and a connection reset as a
    WARNING; here either is an outage, told as ``RemoteUnreachable`` (the mount says it
    is offline): kept at DEBUG, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("SMB receive worker died"):
            log.debug("SMB connection ended: %s", record.exc_info[1] if record.exc_info else "")
            return False
        if message.startswith("socket aborted by peer"):
            log.debug("SMB connection ended: %s", message)
            return False
        return True


# smbprotocol and pyspnego log every request at INFO and dump messages (login tokens among
# them) at DEBUG: only their warnings go to a mount's log
logging.getLogger("smbprotocol").setLevel(logging.WARNING)
logging.getLogger("spnego").setLevel(logging.WARNING)
logging.getLogger("smbprotocol.connection").addFilter(_WorkerDeath())
logging.getLogger("smbprotocol.transport").addFilter(_WorkerDeath())

DEFAULT_PORT = 445

# -- SMB2 constants ([MS-SMB2], [MS-FSCC]) ----------------------------------------------------
FILE_READ_DATA = 0x1  # (FILE_LIST_DIRECTORY on a folder)
FILE_WRITE_DATA = 0x2
FILE_READ_ATTRIBUTES = 0x80
FILE_WRITE_ATTRIBUTES = 0x100
DELETE = 0x10000
SYNCHRONIZE = 0x100000
SHARE_ALL = 0x7  # read | write | delete
SHARE_READ = 0x1
OPEN, CREATE, OVERWRITE_IF = 1, 2, 5
DIRECTORY_FILE, NON_DIRECTORY_FILE = 0x1, 0x40
IMPERSONATION = 2
INFO_FILE, INFO_FILESYSTEM = 1, 2
FILE_BASIC_INFORMATION = 4
FILE_INTERNAL_INFORMATION = 6
FILE_RENAME_INFORMATION = 10
FILE_DISPOSITION_INFORMATION = 13
FILE_ID_FULL_DIRECTORY_INFORMATION = 38
FILE_FS_FULL_SIZE_INFORMATION = 7
ATTR_READONLY, ATTR_DIRECTORY, ATTR_NORMAL = 0x1, 0x10, 0x80
CLOSE_POSTQUERY = 0x1
RELATED = b"\xff" * 16  # the file id of the previous request in a related compound
WATCH_TREE = 0x1
#: file name, folder name, attributes, size, last write, creation, security, streams
NOTIFY_FILTER = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x40 | 0x100 | 0x200 | 0x800

FILETIME_EPOCH = 116444736000000000  # 1601-01-01 to 1970-01-01, in 100 ns
CHUNK = 1 << 20  # bytes per READ/WRITE at most (Samba allows 8 MiB; 1 MiB keeps many in flight)
CHUNK_MIN = 64 << 10  # at least (one credit)
IN_FLIGHT = 8  # whole CHUNKs in flight at most (8 MiB: a fast link)
#: bytes of READs or WRITEs in flight before the link's rate is measured, and at least
#: (``_Flow.window``): 1 MiB is answered within 1 s on a 1 MB/s link
WINDOW_START = 1 << 20
WINDOW_MIN = 128 << 10
#: seconds an answer the server said it is working on (an interim STATUS_PENDING) is
#: awaited: an open of a file another client holds an oplock or lease on waits for that
#: client to let go, and the server gives it 30 s (Samba) or 35 s (Windows) before it
#: breaks it itself. Longer, the request alone fails (EBUSY), the connection is kept.
PENDING_WAIT = 45.0
STATUS_CANCELLED = 0xC0000120


def pending_budget(timeout: float) -> tuple[float, float]:
    """(seconds a pending answer is awaited, seconds the answer to its CANCEL is): the
    mount abandons a call after ``2 * timeout + 1`` s (cachefs/link/connectivity.py) and
    goes offline; the two together stay a second under that (at the default 10 s: 17 s
    and 2 s, so an oplock Samba breaks after 30 s is not waited for, and that call alone
    fails), the first at most ``PENDING_WAIT``."""
    grace = min(2.0, timeout / 2)
    return max(0.5, min(PENDING_WAIT, 2 * timeout - 1.0 - grace)), grace
LIST_BUFFER = 256 << 10  # bytes per QUERY_DIRECTORY answer (4 credits)
CREDIT_TARGET = 512  # credits asked for until granted (32 MiB in flight)
STAT_BUFFER = 64
#: an upload of up to this much (and a request's share of the link's write window) is
#: sent in one compound with its temporary file's create and times
#: (``SmbRemote._upload_small``), several at a time: at most ``PIPELINE`` files and
#: ``PIPELINE_BYTES``, and what the link carries in ``GROUP_SECONDS``
SMALL_WRITE = 256 << 10
PIPELINE = 8
PIPELINE_BYTES = 1 << 20
GROUP_SECONDS = 0.05
QUEUED_MOVING = 32 << 10  # bytes queued to send, at least, whose shrinking is progress

_CREATE_RESPONSE = struct.Struct("<HBBIqqqqqqII16sII")
_HEADER = struct.Struct("<4sHHHHHHIIQIIQ16s")  # an SMB2 request header (MS-SMB2 2.2.1.2)
_TRANSFORM_TAIL = struct.Struct("<IHHQ")  # a transform header's size, reserved, flags, session
FLAGS_RELATED = 0x4
FLAGS_DFS = 0x10000000
_CLOSE_RESPONSE = struct.Struct("<HHIqqqqqqI")
_DIR_ENTRY = struct.Struct("<IIqqqqqqIIIIQ")
_FS_FULL_SIZE = struct.Struct("<QQQII")
_BASIC_INFO = struct.Struct("<qqqqII")

# -- NTSTATUS -> errno, in one table ----------------------------------------------------------
STATUS_PENDING = 0x00000103
STATUS_NOTIFY_ENUM_DIR = 0x0000010C
STATUS_NO_MORE_FILES = 0x80000006
STATUS_END_OF_FILE = 0xC0000011
STATUS_OBJECT_NAME_COLLISION = 0xC0000035
STATUS_CANNOT_DELETE = 0xC0000121
STATUS_SHARING_VIOLATION = 0xC0000043
STATUS_ACCESS_DENIED = 0xC0000022
STATUS_ERRNO: dict[int, int] = {
    0xC000000F: errno.ENOENT,  # NO_SUCH_FILE
    0xC0000034: errno.ENOENT,  # OBJECT_NAME_NOT_FOUND
    0xC000003A: errno.ENOENT,  # OBJECT_PATH_NOT_FOUND (Samba: also a file as a parent)
    0xC0000225: errno.ENOENT,  # NOT_FOUND
    0xC0000056: errno.ENOENT,  # DELETE_PENDING (being removed)
    0xC0000035: errno.EEXIST,  # OBJECT_NAME_COLLISION
    0xC0000022: errno.EACCES,  # ACCESS_DENIED
    0xC0000121: errno.EACCES,  # CANNOT_DELETE (read-only)
    0xC0000061: errno.EPERM,  # PRIVILEGE_NOT_HELD
    0xC0000043: errno.EBUSY,  # SHARING_VIOLATION (open elsewhere without sharing)
    0xC0000054: errno.EBUSY,  # FILE_LOCK_CONFLICT
    0xC00000BA: errno.EISDIR,  # FILE_IS_A_DIRECTORY
    0xC0000103: errno.ENOTDIR,  # NOT_A_DIRECTORY
    0xC0000101: errno.ENOTEMPTY,  # DIRECTORY_NOT_EMPTY
    0xC0000161: errno.EILSEQ,  # UNMAPPABLE_CHARACTER (Samba: a name it lists but cannot open)
    0xC0000033: errno.EINVAL,  # OBJECT_NAME_INVALID
    0xC0000039: errno.EINVAL,  # OBJECT_PATH_INVALID
    0xC000003B: errno.EINVAL,  # OBJECT_PATH_SYNTAX_BAD
    0xC000000D: errno.EINVAL,  # INVALID_PARAMETER
    0xC0000106: errno.ENAMETOOLONG,  # NAME_TOO_LONG
    0xC000007F: errno.ENOSPC,  # DISK_FULL
    0xC0000044: errno.EDQUOT,  # QUOTA_EXCEEDED
    0xC00000A2: errno.EROFS,  # MEDIA_WRITE_PROTECTED
    0xC00000D4: errno.EXDEV,  # NOT_SAME_DEVICE
    0xC00000BB: errno.ENOTSUP,  # NOT_SUPPORTED
    0xC0000010: errno.ENOTSUP,  # INVALID_DEVICE_REQUEST
    0xC0000002: errno.ENOTSUP,  # NOT_IMPLEMENTED
    0x8000002D: errno.ELOOP,  # STOPPED_ON_SYMLINK (a server-side link not followed)
    0xC0000011: errno.EIO,  # END_OF_FILE (handled where it is expected)
}
#: statuses that mean the connection, session or share is gone: try later
STATUS_UNREACHABLE = frozenset({
    0xC00000C9,  # NETWORK_NAME_DELETED
    0xC0000203,  # USER_SESSION_DELETED
    0xC000035C,  # NETWORK_SESSION_EXPIRED
    0xC00000B5,  # IO_TIMEOUT
    0xC0000466,  # SERVER_UNAVAILABLE
    0xC0000205,  # INSUFF_SERVER_RESOURCES
    0xC000009A,  # INSUFFICIENT_RESOURCES
    0xC0000128,  # FILE_CLOSED (a handle of a connection made again)
    0xC0000008,  # INVALID_HANDLE
})
#: statuses of a refused login
STATUS_LOGON = {
    0xC000006D: "the user name or password was refused",  # LOGON_FAILURE
    0xC000006A: "the password was refused",  # WRONG_PASSWORD
    0xC0000071: "the password has expired",  # PASSWORD_EXPIRED
    0xC0000224: "the password must be changed",  # PASSWORD_MUST_CHANGE
    0xC0000072: "the account is disabled",  # ACCOUNT_DISABLED
    0xC0000234: "the account is locked out",  # ACCOUNT_LOCKED_OUT
    0xC000006E: "the account may not log in now",  # ACCOUNT_RESTRICTION
}

#: characters Windows (and Samba) refuse in a name
_BAD_CHARS = frozenset(b'\\:*?"<>|') | frozenset(range(32))
#: Windows' device names (with any extension): COM and LPT with 0-9 and the superscripts
#: ¹ ² ³ (Windows 10 and later refuse those too), CONIN$ and CONOUT$
_RESERVED = frozenset(["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
                      + [f"{port}{digit}" for port in ("COM", "LPT") for digit in "0123456789\u00b9\u00b2\u00b3"])
NAME_MAX_UNITS = 255  # UTF-16 code units in one name


def smb_name_error(name: bytes) -> int | None:
    """The errno for a name an SMB share cannot carry: EILSEQ for bytes that are not
    UTF-8 (SMB names are UTF-16), EINVAL for ``\\ : * ? " < > |``, control characters, a
    trailing dot or space and the reserved device names (CON, NUL, COM0-9, COM¹²³,
    LPT likewise, CONIN$, ... with any extension), ENAMETOOLONG past 255 UTF-16 units.
    Unicode normalisation is not looked at: Samba keeps the bytes it is given."""
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return errno.EILSEQ
    if not name or any(byte in _BAD_CHARS for byte in name) or name[-1:] in (b".", b" "):
        return errno.EINVAL
    if text.split(".", 1)[0].rstrip(" ").upper() in _RESERVED:
        return errno.EINVAL
    if len(text.encode("utf-16-le")) // 2 > NAME_MAX_UNITS:
        return errno.ENAMETOOLONG
    return None


def _ns(filetime: int) -> int:
    return (filetime - FILETIME_EPOCH) * 100 if filetime > 0 else 0


def _filetime(ns: int) -> int:
    return ns // 100 + FILETIME_EPOCH


def _tag(file_id: int, change_time: int) -> int:
    """(file id, change time in 100 ns) folded into 63 bits, never 0."""
    return fold_tag(struct.pack("<Qq", file_id & (2**64 - 1), change_time))


def _make_stat(attributes: int, size: int, atime: int, mtime: int, ctime: int, file_id: int) -> RemoteStat:
    if attributes & ATTR_DIRECTORY:
        mode = stat_mod.S_IFDIR | 0o755  # (read-only on a folder means something else on Windows)
        size = 0
    else:
        mode = stat_mod.S_IFREG | (0o444 if attributes & ATTR_READONLY else 0o644)
    return RemoteStat(mode=mode, size=size, mtime_ns=_ns(mtime), atime_ns=_ns(atime), tag=_tag(file_id, ctime))


class _Closed(Exception):
    """The connection ended, or a server answer did not come in time. ``unsent``: found
    before the calling operation had sent anything (see ``SmbRemote._call``)."""

    def __init__(self, reason: str, unsent: bool = False) -> None:
        super().__init__(reason)
        self.unsent = unsent


class _Busy(Exception):
    """An answer the server said was pending did not come within ``pending_budget``: the
    request was cancelled, the connection is fine."""


class _LoginFailed(Exception):
    """A session setup or tree connect refused (``status``: its NTSTATUS, if any)."""

    def __init__(self, status: int | None, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class _ShareDenied(RemoteRefused):
    """The server refused the logged-in user the share (``why``: who, which share)."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message)
        self.why = why


class _TicketAsk:
    """One request for a server's service ticket, in a thread of its own (``outcome``:
    [None] when the ticket is in the cache, [why not]; empty while the KDC is asked)."""

    def __init__(self, principal: str | None, host: str, deadline: float) -> None:
        self.outcome: list[str | None] = []
        self.deadline = deadline  # (monotonic: no connect waits for it longer)
        self.thread = threading.Thread(target=self._ask, args=(principal, host), name="kerberos", daemon=True)

    def _ask(self, principal: str | None, host: str) -> None:
        try:
            import spnego

            spnego.client(principal, None, hostname=host, service="cifs", protocol="kerberos").step()
            self.outcome.append(None)
        except Exception as exc:  # (pyspnego's, GSSAPI's: any is a Kerberos login that failed)
            self.outcome.append(_reason(exc))


#: GSSAPI's words for a KDC that does not answer: the mount waits for it as for a server
#: that cannot be reached. ("Cannot find KDC for realm" is left out: it is also what a
#: realm with no KDC configured gets, which no waiting mends.)
_KDC_UNREACHABLE = re.compile(r"Cannot contact any KDC")
KDC_UNREACHABLE = "the Kerberos server (KDC) cannot be reached"


def _session(connection: Any, user: str | None, password: str | None, protocol: str) -> Any:
    """A session set up: with ``password`` by NTLM, as its hash (pyspnego's negotiate with
    a plain password first asks a KDC for a ticket wherever python-gssapi is installed, 27
    s when that KDC does not answer; a hash is NTLM's only, and a password written like
    "LMHEX:NTHEX" stays a password); without, by Kerberos as ``user`` (None: the
    credential cache's principal)."""
    credential: Any = user
    if password is not None:
        nt_hash = md4(password.encode("utf-16-le", "surrogatepass")).hex()
        credential = NTLMHash(username=user or "", nt_hash=nt_hash)
    session = Session(connection, credential, None, auth_protocol=protocol)
    session.connect()
    return session


class _Status(Exception):
    """A server answer with an error status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"NTSTATUS 0x{status:08X}")
        self.status = status


def _check(response: Any) -> bytes:
    """The body of an answer; raises ``_Status`` for an error status."""
    status = response["status"].get_value()
    if status != 0:
        raise _Status(status)
    body: bytes = response["data"].get_value()
    return body


class _Meter:
    """The connection's socket (smbprotocol's transport reads and writes through it),
    noting when bytes last moved (``moved``, monotonic): received, or taken by the other
    end from our send queue (``progress`` looks at it: Linux SIOCOUTQ shrinking). A send
    is not progress: it lands in our own kernel's buffer whether or not the link moves
    (with a stalled relay and a new call every second, each call's send kept every
    waiting call alive: the first waited 13 s). A wait for an answer is bounded by how
    long nothing moved, not by how long the answer takes (on a 1 MB/s link eight 1 MiB
    READs in flight take 8 s to answer, and none is late)."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.moved = time.monotonic()
        self._queued = -1  # the send queue at the last look (-1: not known)

    def recv(self, size: int) -> bytes:
        data: bytes = self._sock.recv(size)
        if data:
            self.moved = time.monotonic()
        return data

    def send(self, data: bytes) -> int:
        sent: int = self._sock.send(data)
        return sent

    def progress(self) -> float:
        """``moved``, after looking whether the send queue shrank since the last look
        (our bytes reaching the other end: a large WRITE on a slow uplink). Only a queue
        longer than ``QUEUED_MOVING`` counts: a call's small request is taken at once by
        a stalled relay's kernel, and seen queued then gone it would count as progress."""
        queued = unacknowledged(self._sock)
        if 0 <= queued < self._queued and self._queued > QUEUED_MOVING:
            self.moved = time.monotonic()
        self._queued = queued
        return self.moved

    def fileno(self) -> int:  # (select)
        return int(self._sock.fileno())

    def __getattr__(self, name: str) -> Any:  # settimeout, shutdown, close
        return getattr(self._sock, name)


class _Flow:
    """One direction of a link's transfers (READ data coming, WRITE data going): the
    bytes in flight, of every thread's transfer, and the rate the link carries them (an
    average over the last second or so of answers while requests were in flight; 0
    before any). What is in flight is kept to what the link answers within a quarter of
    the timeout: a request queued behind it (a ping, a stat) is not late."""

    def __init__(self) -> None:
        self.rate = 0.0
        self.in_flight = 0
        self.done = 0  # bytes answered
        self._lock = threading.Lock()

    def window(self, timeout: float) -> tuple[int, int]:
        """(bytes in flight, bytes a request): ``rate * timeout / 4``, at least
        ``WINDOW_MIN``, at most ``IN_FLIGHT`` whole chunks; before any measure
        ``WINDOW_START``. A request is a quarter of the window (several in flight: the
        link stays busy while one is answered), a multiple of ``CHUNK_MIN``."""
        if not self.rate:
            window = WINDOW_START
        else:
            window = int(min(IN_FLIGHT * CHUNK, max(WINDOW_MIN, self.rate * timeout / 4)))
        chunk = max(CHUNK_MIN, min(CHUNK, window // 4) // CHUNK_MIN * CHUNK_MIN)
        return window, chunk

    def take(self, size: int, window: int, first: bool) -> bool:
        """Whether ``size`` more bytes may be sent now (counted in flight if so);
        ``first``: the transfer has nothing in flight (it may always send one)."""
        with self._lock:
            if not first and self.in_flight + size > window:
                return False
            self.in_flight += size
            return True

    def give(self, size: int, answered: bool = True) -> None:
        with self._lock:
            self.in_flight -= size
            if answered:
                self.done += size

    def sample(self, since: tuple[float, int]) -> tuple[float, int]:
        """The rate since ``since`` (the time and ``done`` at a previous answer of a
        transfer that had requests in flight all along); the new mark."""
        now, done = time.monotonic(), self.done
        seconds = now - since[0]
        if seconds > 0.001:
            rate = (done - since[1]) / seconds
            weight = min(1.0, seconds)  # (a long sample says more than a short one)
            self.rate = rate if not self.rate else (1 - weight) * self.rate + weight * rate
        return now, done


class _Sent:
    """A request's header as smbprotocol's receiver and ``Request`` read it back
    (``message["message_id"].get_value()``; the receiver's ``reserved`` mark)."""

    __slots__ = ("values",)

    def __init__(self, **values: Any) -> None:
        self.values = values

    def __getitem__(self, name: str) -> _Value:
        return _Value(self.values[name])

    def __setitem__(self, name: str, value: Any) -> None:
        self.values[name] = value


class _FastConnection(Connection):  # type: ignore[misc]
    """smbprotocol's ``Connection``, sending this module's requests (``_Packed``) on an
    encrypted session itself: the 64-byte headers, the transform header and the TCP
    framing packed with ``struct`` (smbprotocol builds a ``Structure`` for each: 37 us a
    header, about as much for the transform header and the framing), the message ids,
    credits and pending requests kept as ``Connection._send`` keeps them. Anything else
    (a negotiate, a session setup, a signed rather than sealed session or one whose tree
    alone is sealed, smbprotocol's own requests, an async CANCEL) goes through
    ``Connection._send``. tests/test_smb.py checks that both send the same bytes."""

    def _send(self, messages: list[Any], session_id: int | None = None, tree_id: int | None = None,
              message_id: int | None = None, credit_request: int | None = None, related: bool = False,
              async_id: Any = None, force_signature: bool = False) -> list[Any]:
        session = self.session_table.get(session_id, None) if session_id else None
        tree = session.tree_connect_table.get(tree_id) if session is not None and tree_id else None
        if (message_id is not None or async_id is not None or force_signature or session is None
                or (tree_id and tree is None) or not session.encrypt_data
                or not all(type(message) is _Packed for message in messages)):
            return list(super()._send(messages, session_id=session_id, tree_id=tree_id, message_id=message_id,
                                      credit_request=credit_request, related=related, async_id=async_id,
                                      force_signature=force_signature))
        dfs = FLAGS_DFS if tree is not None and tree.is_dfs_share else 0
        parts: list[bytes] = []
        requests: list[Any] = []
        last = len(messages) - 1
        for i, message in enumerate(messages):
            body = message.body
            padding = 0 if i == last else -(64 + len(body)) % 8  # (each of a compound on 8 bytes)
            with self.sequence_lock:
                low, high = self.sequence_window["low"], self.sequence_window["high"]
                charge = self._calculate_credit_charge(message)
                if charge > high - low:
                    raise SMBException(f"Request requires {charge} credits but only {high - low} credits are "
                                       "available")
                self.sequence_window["low"] += charge if charge > 0 else 1
            flags = dfs | (FLAGS_RELATED if i and related else 0)
            parts.append(_HEADER.pack(b"\xfeSMB", 64, charge, 0, 0, message.COMMAND, credit_request or charge, flags,
                                      0 if i == last else 64 + len(body) + padding, low, 0, tree_id or 0,
                                      session_id, bytes(16)))
            parts.append(body)
            if padding:
                parts.append(bytes(padding))
            request = Request(_Sent(message_id=low, command=message.COMMAND, tree_id=tree_id or 0, reserved=0,
                                    flags=flags, data=body), _Packed, self, session_id=session_id)
            self.outstanding_requests[low] = request
            requests.append(request)
        if related:
            requests[0].related_ids = [request.message["message_id"].get_value() for request in requests[1:]]
        sealed = self._seal(b"".join(parts), session)
        if len(sealed) > self.transport.MAX_SIZE:
            raise ValueError(f"Data to be sent over Direct TCP size {len(sealed)} exceeds the max length allowed "
                             f"{self.transport.MAX_SIZE}")
        self._check_worker_running()
        data = memoryview(struct.pack(">I", len(sealed)) + sealed)
        transport = self.transport
        with transport._sock_lock:
            while data:
                data = data[transport._sock.send(data):]
        return requests

    def _seal(self, data: bytes, session: Any) -> bytes:
        """``data`` encrypted in an SMB2 TRANSFORM_HEADER for ``session`` (MS-SMB2 3.1.4.3:
        the header from its nonce on is the associated data, the tag its signature)."""
        cipher_id = self.cipher_id if self.dialect >= Dialects.SMB_3_1_1 else Ciphers.AES_128_CCM
        if cipher_id in (Ciphers.AES_128_GCM, Ciphers.AES_256_GCM):
            cipher: Any = aead.AESGCM
            nonce = os.urandom(12)
        else:
            cipher = aead.AESCCM
            nonce = os.urandom(11)
        associated = nonce.ljust(16, b"\x00") + _TRANSFORM_TAIL.pack(len(data), 0, 1, session.session_id)
        sealed: bytes = cipher(session.encryption_key).encrypt(nonce, data, associated)
        return b"\xfdSMB" + sealed[-16:] + associated + sealed[:-16]


class _Link:
    """One SMB connection with its session and tree connect, shared by threads.

    ``send`` gives message ids and waits for credits under ``_send_lock``; ``wait`` waits
    for one answer without a lock, until nothing moved on the connection for ``timeout``
    seconds (``_Meter``)."""

    def __init__(self, connection: Any, session: Any, tree: Any, timeout: float) -> None:
        self.connection = connection
        self.session = session
        self.tree = tree
        self.timeout = timeout
        self.meter: _Meter = connection.transport._sock
        self.reads = _Flow()
        self.writes = _Flow()
        self.dead = False
        #: ended because an answer did not come in time (not by the server: a call that
        #: finds it so does not try a new connection, see ``SmbRemote._call``)
        self.timed_out = False
        self.sent = 0  # sends made on it, all threads
        self.calls = threading.local()  # .sent: sends made by the current operation
        self._send_lock = threading.Lock()
        self.max_read = min(CHUNK, int(connection.max_read_size))
        self.max_write = min(CHUNK, int(connection.max_write_size))

    def send(self, messages: list[Any], related: bool = False) -> list[Any]:
        """Send ``messages`` (one compound when several), waiting for credits."""
        connection = self.connection
        start = time.monotonic()
        with self._send_lock:
            while True:
                if not self.alive():  # (the server closed it, maybe while idle: nothing sent)
                    self.dead = True
                    if self.timed_out:  # (another call's answer did not come: the network)
                        raise _Closed(f"no answer from the server within {self.timeout:g} s")
                    raise _Closed("the server closed the connection",
                                  unsent=getattr(self.calls, "sent", 1) == 0)
                window = connection.sequence_window
                available = window["high"] - window["low"]
                needed = sum(max(1, connection._calculate_credit_charge(m)) for m in messages)
                if available >= needed:
                    break
                if self.dead or time.monotonic() > max(start, self.meter.progress()) + self.timeout:
                    self.timed_out = True
                    raise _Closed(f"no credits from the server within {self.timeout:g} s")
                time.sleep(0.001)  # (answers grant credits: the receiver thread adds them)
            # (each request asks for more credits until the window is wide enough)
            want = needed + 64 if available < CREDIT_TARGET else None
            sid, tid = self.session.session_id, self.tree.tree_connect_id
            try:
                if len(messages) == 1:
                    return [connection.send(messages[0], sid=sid, tid=tid, credit_request=want)]
                return list(connection._send(messages, session_id=sid, tree_id=tid, related=related,
                                             credit_request=want))
            except (SMBException, OSError, ValueError) as exc:
                self.dead = True
                raise _Closed(_reason(exc)) from exc
            finally:
                self.sent += 1
                self.calls.sent = getattr(self.calls, "sent", 0) + 1

    def alive(self) -> bool:
        """Whether smbprotocol's receiver thread still reads the connection (it ends at
        the server's close; a request sent after that would never be answered)."""
        worker = self.connection._t_worker
        return (not self.dead and worker is not None and worker.is_alive()
                and self.connection._t_exc is None and self.connection.transport.connected)

    def wait(self, request: Any) -> Any:
        """The final answer to ``request``, waited for while bytes keep coming: until
        nothing moved on the connection for ``timeout`` seconds since the wait began (then
        the link is dead: a silent network). After an interim STATUS_PENDING (the server
        works on it: an open waiting for another client to give up its oplock) the answer
        is awaited up to ``pending_budget`` (below the mount's cap on a call), the
        connection checked meanwhile by an ECHO when it is silent for ``timeout``; then
        the request is cancelled and alone fails (``_Busy``, see ``_cancelled``)."""
        start = time.monotonic()
        pending_since: float | None = None
        echo: Any = None
        echo_sent = 0.0
        while True:
            now = time.monotonic()
            if pending_since is None:
                left = max(start, self.meter.progress()) + self.timeout - now
                if left <= 0 or now - start > 2 * self.timeout:
                    # (bytes of other requests moving, this one not answered in twice the
                    # timeout: the mount abandons such a call at 2 x timeout + 1 s)
                    self.dead = self.timed_out = True
                    raise _Closed(f"no answer from the server within {self.timeout:g} s")
                left = min(0.5, left)  # (the send queue looked at meanwhile)
            else:
                if self.dead:
                    raise _Closed("the connection was closed")
                if echo is not None and echo.response_event.is_set():
                    self.connection.outstanding_requests.pop(echo.message["message_id"].get_value(), None)
                    echo = None
                if echo is not None and now - echo_sent > self.timeout:
                    self.dead = self.timed_out = True
                    raise _Closed(f"no answer from the server within {self.timeout:g} s")
                if echo is None and now - max(pending_since, self.meter.progress()) > self.timeout:
                    echo, echo_sent = self.send([SMB2Echo()])[0], now
                budget, grace = pending_budget(self.timeout)
                if now - pending_since > budget:
                    return self._cancelled(request, budget, grace)
                left = min(1.0, budget + 0.01 - (now - pending_since))
            if not request.response_event.wait(left):
                continue  # (bytes may have moved meanwhile: the deadline is looked at again)
            with request.response_event_lock:
                response = request.response
                if response is None or self.connection._t_exc is not None:
                    self.dead = True
                    raise _Closed("the connection was closed")
                if response["status"].get_value() == STATUS_PENDING:
                    request.response_event.clear()
                    if pending_since is None:
                        pending_since = time.monotonic()
                    continue
                self.connection.outstanding_requests.pop(request.message["message_id"].get_value(), None)
                return response

    def _cancelled(self, request: Any, budget: float, grace: float) -> Any:
        """A pending request given up on: a CANCEL sent, and its final answer awaited
        ``grace`` s. A CANCEL is a request, not a guarantee (MS-SMB2 3.3.5.16: a server
        may finish the operation all the same, when it was under way), so what the answer
        says is what happened: STATUS_CANCELLED, nothing was done (``_Busy``); any other
        answer is the operation's own, returned as if it had come in time. No answer: the
        connection is closed (the server drops a closed connection's pending opens, Samba
        with the process serving it), so that the operation cannot happen later, after
        this call said it failed; this call fails (``_Busy``), the next one reconnects."""
        try:
            with self._send_lock:
                request.cancel()
        except Exception as exc:
            log.debug("SMB cancel: %s", exc)
        held = f"the server did not answer within {budget:g} s (the file is held by another client)"
        if request.response_event.wait(grace):
            with request.response_event_lock:
                response = request.response
                if response is not None and response["status"].get_value() != STATUS_PENDING:
                    self.connection.outstanding_requests.pop(request.message["message_id"].get_value(), None)
                    if response["status"].get_value() == STATUS_CANCELLED:
                        raise _Busy(held)
                    return response
        log.info("SMB: a cancelled request was not answered within %g s: its connection is closed "
                 "so that it cannot complete later", grace)
        self.close()
        raise _Busy(held)

    def exchange(self, messages: list[Any], related: bool = True) -> list[Any]:
        """Send ``messages`` as one compound and wait for every answer (error statuses
        included: the caller checks them in order)."""
        requests = self.send(messages, related)
        return [self.wait(request) for request in requests]

    def close(self) -> None:
        """Close the socket, without a logoff (smbprotocol waits for the answers to a
        logoff without a bound; the server ends the session with the connection)."""
        self.dead = True
        try:  # (at once: a send blocked on a silent network ends, as does the receiver)
            self.meter.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.connection.disconnect(False)
        except Exception as exc:
            log.debug("SMB disconnect: %s", exc)
            _close_quietly(self.connection)


# -- request builders -----------------------------------------------------------------------
# Each request's body is packed once with ``struct`` (MS-SMB2 2.2: offsets count from the
# 64-byte header). smbprotocol's ``Structure`` of the same request cost 20-65 us to build
# and pack, about a third of the mount's CPU time while the replay uploaded small files;
# these take 1-3 us. tests/test_smb.py checks each against smbprotocol's packing.
SMB2_CREATE, SMB2_CLOSE, SMB2_READ, SMB2_WRITE = 5, 6, 8, 9  # (commands)
SMB2_QUERY_DIRECTORY, SMB2_QUERY_INFO, SMB2_SET_INFO = 0x0E, 0x10, 0x11
_CREATE_REQUEST = struct.Struct("<HBBIQQIIIIIHHII")
_CLOSE_REQUEST = struct.Struct("<HHI16s")
_QUERY_INFO_REQUEST = struct.Struct("<HBBIHHIII16s")
_SET_INFO_REQUEST = struct.Struct("<HBBIHHI16s")
_QUERY_DIRECTORY_REQUEST = struct.Struct("<HBBI16sHHI")
_READ_REQUEST = struct.Struct("<HBBIQ16sIIIHHB")
_WRITE_REQUEST = struct.Struct("<HHIQ16sIIHHI")


class _Value:
    """A field as smbprotocol's ``Connection`` reads one of a request (``get_value``)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def get_value(self) -> Any:
        return self.value

    def __len__(self) -> int:
        return len(self.value)


class _Packed:
    """A request body packed already, as ``Connection._send`` takes a message: its
    ``COMMAND``, ``pack()`` and length, and the fields its credit charge is made of."""

    __slots__ = ("COMMAND", "body", "fields")

    def __init__(self, command: int, body: bytes, **fields: Any) -> None:
        self.COMMAND = command
        self.body = body
        self.fields = fields

    def pack(self) -> bytes:
        return self.body

    def __len__(self) -> int:
        return len(self.body)

    def __getitem__(self, name: str) -> _Value:
        return _Value(self.fields[name])


def _create(name: str, access: int, disposition: int = OPEN, options: int = 0, attributes: int = 0,
            share: int = SHARE_ALL, oplock: int = 0) -> _Packed:
    path = name.encode("utf-16-le", "surrogatepass") if name else b""
    return _Packed(SMB2_CREATE, _CREATE_REQUEST.pack(57, 0, oplock, IMPERSONATION, 0, 0, access, attributes, share,
                                                disposition, options, 120, len(path), 0, 0) + (path or b"\x00\x00"))


def _close(file_id: bytes = RELATED, postquery: bool = False) -> _Packed:
    return _Packed(SMB2_CLOSE, _CLOSE_REQUEST.pack(24, CLOSE_POSTQUERY if postquery else 0, 0, file_id))


def _query_info(info_type: int, info_class: int, size: int, file_id: bytes = RELATED) -> _Packed:
    return _Packed(SMB2_QUERY_INFO, _QUERY_INFO_REQUEST.pack(41, info_type, info_class, size, 0, 0, 0, 0, 0, file_id))


def _set_info(info_class: int, buffer: bytes, file_id: bytes = RELATED) -> _Packed:
    return _Packed(SMB2_SET_INFO, _SET_INFO_REQUEST.pack(33, INFO_FILE, info_class, len(buffer), 96, 0, 0, file_id)
                   + buffer)


def _query_directory(file_id: bytes, restart: bool) -> _Packed:
    pattern = "*".encode("utf-16-le")
    return _Packed(SMB2_QUERY_DIRECTORY, _QUERY_DIRECTORY_REQUEST.pack(
        33, FILE_ID_FULL_DIRECTORY_INFORMATION, 0x1 if restart else 0, 0, file_id, 96, len(pattern),  # RESTART_SCANS
        LIST_BUFFER) + pattern, buffer=pattern, output_buffer_length=LIST_BUFFER)


def _read_request(file_id: bytes, offset: int, length: int) -> _Packed:
    return _Packed(SMB2_READ, _READ_REQUEST.pack(49, 0x50, 0, length, offset, file_id, 0, 0, 0, 0, 0, 0),
                   length=length, read_channel_info_length=0)


def _write_request(file_id: bytes, offset: int, data: bytes) -> _Packed:
    return _Packed(SMB2_WRITE, _WRITE_REQUEST.pack(49, 112, len(data), offset, file_id, 0, 0, 0, 0, 0) + data,
                   length=len(data), write_channel_info_length=0)


def _rename_info(target: str, replace: bool) -> bytes:
    name = target.encode("utf-16-le", "surrogatepass")
    return struct.pack("<B7xQI", 1 if replace else 0, 0, len(name)) + name


def _basic_info(atime_ns: int = 0, mtime_ns: int = 0, attributes: int = 0) -> bytes:
    """FileBasicInformation: 0 leaves a time (or the attributes) as they are."""
    return _BASIC_INFO.pack(0, _filetime(atime_ns) if atime_ns else 0, _filetime(mtime_ns) if mtime_ns else 0,
                            0, attributes, 0)


def _read_data(body: bytes) -> bytes:
    """The bytes of a READ answer (the offset counts from the SMB2 header, 64 bytes)."""
    data_offset = body[2]
    length = struct.unpack_from("<I", body, 4)[0]
    start = data_offset - 64
    return body[start:start + length]


def _parse_create(body: bytes) -> tuple[int, int, int, int, int, int, bytes]:
    """(attributes, size, atime, mtime, ctime, creation, handle) of a CREATE answer."""
    (_size, _oplock, _flags, _action, creation, atime, mtime, ctime, _alloc, eof, attributes, _r,
     handle, _co, _cl) = _CREATE_RESPONSE.unpack_from(body)
    return attributes, eof, atime, mtime, ctime, creation, handle


def _parse_close(body: bytes) -> tuple[int, int, int, int, int]:
    """(attributes, size, atime, mtime, ctime) of a CLOSE answer asked with POSTQUERY."""
    _size, _flags, _r, _creation, atime, mtime, ctime, _alloc, eof, attributes = _CLOSE_RESPONSE.unpack_from(body)
    return attributes, eof, atime, mtime, ctime


def _query_body(body: bytes) -> bytes:
    """The buffer of a QUERY_INFO answer."""
    offset, length = struct.unpack_from("<HI", body, 2)
    return body[offset - 64:offset - 64 + length]


def _name_bytes(name: str) -> bytes:
    """A name from the server (UTF-16, decoded with its unpaired surrogates kept) as the
    bytes of a local name: UTF-8, an unpaired surrogate as its 3 bytes (as Python's
    "surrogatepass" and WTF-8 write it), which ``SmbRemote._name`` reads back into the
    same UTF-16: a Windows server may hold such names, and opens them by it; Samba
    shows a disk name holding these bytes so, but refuses to open it (EILSEQ). Such
    names are not created here (``smb_name_error``)."""
    return name.encode("utf-8", "surrogatepass")


def _parse_listing(buffer: bytes, out: list[tuple[bytes, RemoteStat]]) -> None:
    position = 0
    size = _DIR_ENTRY.size
    while True:
        (next_entry, _index, _creation, atime, mtime, ctime, eof, _alloc, attributes, name_length,
         _ea, _reserved, file_id) = _DIR_ENTRY.unpack_from(buffer, position)
        name = buffer[position + size:position + size + name_length].decode("utf-16-le", "surrogatepass")
        if name not in (".", ".."):
            out.append((_name_bytes(name),
                        _make_stat(attributes, eof, atime, mtime, ctime, file_id)))
        if not next_entry:
            return
        position += next_entry


class SmbRemote(Remote):
    """A folder in an SMB share. Thread-safe: one connection, requests multiplexed."""

    capabilities = Capabilities(symlinks=False, hard_links=False, atomic_replace=True, xattrs=False,
                                modes=False, owners=False, notify=True, strong_versions=True,
                                case_insensitive=True, exclusive_create=True)

    def __init__(self, host: str, share: str, path: str = "", user: str | None = None,
                 port: int | None = None, options: ConnectOptions | None = None) -> None:
        """``share``: the share's name; ``path``: the folder in it ("" or "a/b")."""
        import getpass

        self.options = options or ConnectOptions()
        self.host = host
        self.port = port or DEFAULT_PORT
        self.share = share
        self.user = user or getpass.getuser()
        self.timeout = self.options.timeout
        self.parallelism = max(4, self.options.connections)
        parts = [p for p in path.replace("\\", "/").split("/") if p]
        self._root = "\\".join(parts)
        shown = self.host if ":" not in self.host else f"[{self.host}]"
        self.description = (f"smb://{self.user}@{shown}:{self.port}/{share}"
                            + ("/" + "/".join(parts) if parts else ""))
        self._lock = threading.Lock()
        self._link: _Link | None = None
        self._tried = 0  # tries to connect that ended (under ``_lock``)
        self._failure: RemoteUnreachable | None = None  # why the last one could not be made
        #: passwords the server refused (salted hashes -> why): not tried again until
        #: ``allow_login_again`` (an account lockout policy counts every failed login:
        #: Windows' 10 in 10 minutes, AD's; the probe's retries would lock the account)
        self._refused: dict[bytes, str] = {}
        self._salt = os.urandom(16)
        #: the address's user, None where it names none (Kerberos then logs in as the
        #: credential cache's own principal, whatever the local user's name)
        self._named_user = user
        self._kerberos_ask: _TicketAsk | None = None  # (a service ticket asked for)
        self._kerberos_lock = threading.Lock()  # (``watch`` connects without ``_lock``)

    @classmethod
    def from_address(cls, address: "RemoteAddress", options: ConnectOptions,
                     pacer: "Pacer | None" = None) -> "SmbRemote":
        """``smb://[user@]host[:port]/share/path``: the first component is the share."""
        parts = [p for p in address.path.split("/") if p]
        if not parts:
            raise RemoteRefused(f"smb://{address.host}: no share named in the address "
                                "(smb://host/SHARE/folder)")
        if not address.host:
            raise RemoteRefused("an smb:// address needs a host")
        for part in parts:
            try:
                part.encode("utf-8")
            except UnicodeEncodeError:
                raise RemoteRefused(f"{address.path!r}: SMB names are Unicode; this path is not UTF-8") from None
        return cls(address.host, parts[0], "/".join(parts[1:]), address.user, address.port, options)

    # -- paths ----------------------------------------------------------------------
    def name_error(self, name: bytes) -> int | None:
        return smb_name_error(name)

    def _name(self, path: bytes) -> str:
        """The share-relative SMB name (backslashes) of a path relative to our folder."""
        if path.startswith(b"/") or b"\0" in path or b"\\" in path:
            raise RemoteError(errno.EINVAL, f"not a name this share can carry: {path!r}")
        try:
            text = path.decode("utf-8", "surrogatepass")  # (a name from the server: see _name_bytes)
        except UnicodeDecodeError:
            raise RemoteError(errno.EILSEQ, "SMB names are Unicode: this name is not UTF-8") from None
        text = text.replace("/", "\\")
        if not self._root:
            return text
        return self._root + "\\" + text if text else self._root

    def _new_name(self, path: bytes) -> str:
        """``_name`` of a path about to be created: its last name must pass SMB's rules."""
        code = smb_name_error(path.rsplit(b"/", 1)[-1])
        if code is not None:
            raise RemoteError(code, f"a name this share cannot carry: {path!r}")
        return self._name(path)

    def _target_name(self, path: bytes) -> str:
        """``_name`` of a path written or renamed onto: a name SMB's rules refuse passes
        when it is there already (a Windows server holds names with an unpaired
        surrogate, which ``listdir`` gave; writing the file back must work): the rules
        are for names being created. Such a name costs a listing of its folder."""
        last = path.rsplit(b"/", 1)[-1]
        code = smb_name_error(last)
        if code is None:
            return self._name(path)
        name = self._name(path)  # (EINVAL, EILSEQ for what no SMB name can be)
        folder = path.rsplit(b"/", 1)[0] if b"/" in path else b""
        try:
            there = any(found == last for found, _stat in self.listdir(folder))
        except RemoteError as exc:
            if isinstance(exc, RemoteUnreachable):
                raise
            there = False
        if not there:
            raise RemoteError(code, f"a name this share cannot carry: {path!r}")
        return name

    # -- connection -----------------------------------------------------------------
    def _connect_link(self) -> _Link:
        """A new connection, logged in, with the share connected: Kerberos first where it
        can work, then each password in turn (a password asked for on the terminal is
        asked before a connection is opened for it: no server waits on someone typing)."""
        kerberos_failed: str | None = None
        kerberos_unreachable = False  # (the KDC could not be asked: the mount waits for it)
        cache_principal = _kerberos_cache_principal()
        if cache_principal is not None:
            principal = _kerberos_principal(self._named_user, cache_principal)
            deadline = time.monotonic() + self.timeout
            # (the server first: one that cannot be reached leaves the mount offline, as
            # with a password, whatever the KDC says)
            connection = self._open(deadline)
            try:
                # (the KDC's wait inside the one timeout, half of what is left at most: the
                # session and the share's connect get the rest)
                wait = min(KERBEROS_WAIT, max(0.0, deadline - time.monotonic()) / 2)
                kerberos_failed, kerberos_unreachable = self._service_ticket(principal, wait)
                if kerberos_failed is None:
                    session = self._bounded(connection, deadline,
                                            lambda: _session(connection, principal, None, "kerberos"))
                    link = self._tree(connection, session, deadline, principal or cache_principal)
                    _KERBEROS_SAID.pop(self.description, None)
                    return link
            except _LoginFailed as exc:
                kerberos_failed = str(exc)
            except _ShareDenied as exc:  # (the ticket's user may not; the password's may)
                kerberos_failed = exc.why
            except BaseException:
                _close_quietly(connection)
                raise
            _close_quietly(connection)
            # (someone with a ticket finds out why the password is used instead; said once
            # for each reason, not by each of the mount's connections and retries)
            if _KERBEROS_SAID.get(self.description) != kerberos_failed:
                log.info("%s: Kerberos login failed (%s)", self.description, kerberos_failed)
            _KERBEROS_SAID[self.description] = kerberos_failed
        refused = "no password was given (--password-file, CACHEFS_PASSWORD, or a terminal to ask on)"
        secrets = self.options.secrets
        passwords: Iterator[str] = iter(()) if secrets is None else secrets.passwords(
            f"Password for {self.user} on {self.host} (SMB): ")
        tried = False
        refused_before: str | None = None
        for password in passwords:
            key = hashlib.sha256(self._salt + password.encode("utf-8", "surrogatepass")).digest()
            if key in self._refused:
                refused_before = self._refused[key]
                continue
            tried = True
            for protocol in ("negotiate", "ntlm"):
                deadline = time.monotonic() + self.timeout
                connection = self._open(deadline)
                try:
                    session = self._bounded(connection, deadline,
                                            lambda: _session(connection, self.user, password, protocol))
                except _LoginFailed as exc:
                    _close_quietly(connection)
                    if exc.status in STATUS_LOGON:
                        refused = self._refused[key] = STATUS_LOGON[exc.status]
                        break  # (the next password)
                    if protocol == "ntlm":
                        raise RemoteRefused(f"{self.description}: login failed: {exc}") from None
                    log.debug("SMB negotiate login failed (%s): trying NTLM", exc)
                    continue
                except BaseException:
                    _close_quietly(connection)
                    raise
                if secrets is not None:
                    secrets.password_worked(password)
                try:
                    return self._tree(connection, session, deadline)
                except BaseException:
                    _close_quietly(connection)
                    raise
        if refused_before is not None and not tried:
            raise RemoteRefused(f"{self.description}: {refused_before} (SMB login as {self.user}); not tried "
                                "again with the same password, as each failed login counts towards "
                                "locking the account: give the right one and run `cachefs online`, or "
                                "mount again")
        if not tried and kerberos_unreachable:
            raise RemoteUnreachable(f"{self.description}: no password was given, and the Kerberos login "
                                    f"could not be made: {kerberos_failed}")
        if not tried and kerberos_failed is not None:
            refused += f"; the Kerberos login failed: {kerberos_failed}"
        elif not tried and _kerberos_installed() and cache_principal is None:
            refused += "; no Kerberos ticket either (kinit)"
        raise RemoteRefused(f"{self.description}: {refused} (SMB login as {self.user})")

    def allow_login_again(self) -> None:
        """Forget the passwords the server refused: the user says the matter is mended
        (``cachefs online``; a new mount starts with nothing refused)."""
        self._refused = {}  # (one assignment, no lock: called on the event loop, and the
        # lock may be held by a connect under way)

    def _service_ticket(self, principal: str | None, wait: float) -> tuple[str | None, bool]:
        """Ask for the service ticket of this server (``cifs/HOST``); (None, False) when
        there is one, else (why not, whether the KDC could not be asked). The KDC is
        asked from a thread of its own, waited for ``wait`` seconds: GSSAPI's own retries
        to a KDC that does not answer took 27 s (a session setup's watchdog, closing the
        socket, does not stop them). A connect that finds an ask under way waits for
        that one. The ticket lands in the credential cache, where the session setup
        finds it without asking the KDC again."""
        with self._kerberos_lock:
            ask = self._kerberos_ask
            if ask is None or not ask.thread.is_alive():  # (a finished one's answer is old)
                ask = self._kerberos_ask = _TicketAsk(principal, self.host, time.monotonic() + wait)
                ask.thread.start()
        # (an ask under way is waited for until its own end: connects one after another
        # to a silent KDC each waited a whole `wait` on the one request)
        ask.thread.join(max(0.0, ask.deadline - time.monotonic()))
        why = ask.outcome[0] if ask.outcome else KDC_UNREACHABLE
        if why is not None and _KDC_UNREACHABLE.search(why):
            return KDC_UNREACHABLE, True  # (one wording for one cause: said once)
        return why, False

    def _open(self, deadline: float) -> Any:
        """A TCP connection with the dialect negotiated (by ``deadline``: the connection,
        the login (with a Kerberos service ticket asked for) and the share's connect
        together take at most one ``timeout``)."""
        connection = _FastConnection(uuid.uuid4(), self.host, self.port)
        try:
            connection.connect(timeout=max(0.1, deadline - time.monotonic()))
        except (ValueError, OSError, SMBException) as exc:
            _close_quietly(connection)
            reason = _reason(exc)
            if reason.startswith("Failed to connect to ") and "': " in reason:  # (smbprotocol's words)
                reason = reason.split("': ", 1)[1]
            shown = self.host if ":" not in self.host else f"[{self.host}]"
            raise RemoteUnreachable(f"cannot connect to {shown}:{self.port}: {reason}") from None
        # (smbprotocol's receiver looks the socket up at each recv: from now on it is metered)
        connection.transport._sock = _Meter(connection.transport._sock)
        return connection

    def _bounded(self, connection: Any, deadline: float, work: Callable[[], T]) -> T:
        """``work`` (a session setup, a tree connect: smbprotocol waits for their answers
        without a bound) with a watchdog that closes the socket after the timeout."""
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), lambda: _close_quietly(connection))
        watchdog.daemon = True
        watchdog.start()
        try:
            return work()
        except Exception as exc:  # (smbprotocol's, the socket's, pyspnego's own)
            if not connection.transport.connected or isinstance(exc, (OSError, ValueError)):
                late = not watchdog.is_alive()
                raise RemoteUnreachable(f"{self.description}: " + (f"no answer within {self.timeout:g} s"
                                                                   if late else _reason(exc))) from None
            raise _LoginFailed(getattr(exc, "status", None), _reason(exc)) from None
        finally:
            watchdog.cancel()

    def _tree(self, connection: Any, session: Any, deadline: float, who: str | None = None) -> _Link:
        """The share connected: the link (``who``: the user logged in, if not ``user``)."""
        tree = TreeConnect(session, rf"\\{self.host}\{self.share}")
        try:
            self._bounded(connection, deadline, tree.connect)
        except _LoginFailed as exc:
            if exc.status == 0xC00000CC:  # BAD_NETWORK_NAME
                raise RemoteRefused(f"{self.description}: the server has no share named "
                                    f"{self.share!r}") from None
            if exc.status == 0xC0000022:  # ACCESS_DENIED
                why = f"{who or self.user} may not use the share {self.share!r}"
                raise _ShareDenied(f"{self.description}: {why}", why) from None
            raise RemoteUnreachable(f"{self.description}: {exc}") from None
        sock = getattr(connection.transport, "_sock", None)
        if sock is not None:  # (a send that cannot go out blocks at most this long)
            sock.settimeout(self.timeout)
        return _Link(connection, session, tree, self.timeout)

    def log_in(self) -> None:
        """Connect once now (a password is asked for here, if it must be)."""
        self.connect()

    def _get_link(self) -> _Link:
        """The current link, or a new one. A call that waited while another thread tried
        to connect, and failed, fails with it rather than try again after it: on a silent
        network calls queued here would otherwise each wait a ``timeout`` in turn."""
        tried = self._tried  # (read before waiting for the lock)
        with self._lock:
            link = self._link
            if link is not None and not link.dead:
                return link
            if link is not None:
                link.close()
            self._link = None
            if self._tried != tried and self._failure is not None:  # (one ended while this call waited)
                raise RemoteUnreachable(str(self._failure))
            try:
                link = self._connect_link()
            except RemoteUnreachable as exc:
                self._failure = exc
                raise
            except BaseException:
                self._failure = None  # (a refusal: each call finds out for itself)
                raise
            finally:
                self._tried += 1
            self._failure = None
            self._link = link
            return link

    def _call(self, work: Callable[[_Link], T]) -> T:
        """``work`` on the current link; answers and failures translated. A link found
        closed before anything of ``work`` went out (the server dropped it while idle)
        is replaced and ``work`` tried once more."""
        for attempt in (1, 2):
            link = self._get_link()
            worked = link.sent > 0
            link.calls.sent = 0
            try:
                return work(link)
            except _Status as exc:
                raise self._error(exc, link) from None
            except _Busy as exc:
                raise RemoteError(errno.EBUSY, f"{_os_strerror(errno.EBUSY)}: {exc}") from None
            except _Closed as exc:
                link.dead = True
                with self._lock:
                    if self._link is link:
                        self._link = None
                link.close()
                # (a connection that had worked, found closed before this operation sent
                # anything: safe to send it on a new one)
                if attempt == 1 and worked and exc.unsent and not link.timed_out:
                    log.debug("SMB connection found closed: a new one")
                    continue
                raise RemoteUnreachable(f"{self.description}: {exc}") from None
        raise AssertionError("unreachable")

    def _error(self, exc: _Status, link: _Link | None = None) -> RemoteError:
        """The ``RemoteError`` for an error status (``RemoteUnreachable`` for one that means
        the session is gone: raised, for every item of a batch)."""
        if exc.status in STATUS_UNREACHABLE:
            if link is not None:
                link.dead = True
            raise RemoteUnreachable(f"{self.description}: the server ended the session "
                                    f"(0x{exc.status:08X})") from None
        code = STATUS_ERRNO.get(exc.status, errno.EIO)
        return RemoteError(code, f"{_os_strerror(code)} (SMB status 0x{exc.status:08X})")

    def connect(self) -> None:
        with self._lock:
            if self._link is not None and not self._link.alive():
                self._link.close()
                self._link = None
        try:
            found = self.stat(b"")
        except RemoteError as exc:
            if isinstance(exc, RemoteUnreachable):
                raise
            raise RemoteRefused(f"{self.description}: the folder cannot be used: "
                                f"{exc.strerror or exc}") from None
        if not stat_mod.S_ISDIR(found.mode):
            raise RemoteRefused(f"{self.description} is not a folder")

    def ping(self) -> None:
        self.stat(b"")

    def close(self) -> None:
        with self._lock:
            link, self._link = self._link, None
        if link is not None:
            link.close()

    # -- reading --------------------------------------------------------------------
    def stat(self, path: bytes) -> RemoteStat:
        name = self._name(path)

        def work(link: _Link) -> RemoteStat:
            answers = link.exchange([_create(name, FILE_READ_ATTRIBUTES | SYNCHRONIZE),
                                     _query_info(INFO_FILE, FILE_INTERNAL_INFORMATION, 8), _close()])
            attributes, size, atime, mtime, ctime, _creation, _h = _parse_create(_check(answers[0]))
            file_id = struct.unpack_from("<Q", _query_body(_check(answers[1])))[0]
            return _make_stat(attributes, size, atime, mtime, ctime, file_id)

        return self._call(work)

    def listdir(self, path: bytes) -> list[tuple[bytes, RemoteStat]]:
        [found] = self.listdir_many([path])
        if isinstance(found, RemoteError):
            raise found
        return found

    def listdir_many(self, paths: list[bytes]) -> list[list[tuple[bytes, RemoteStat]] | RemoteError]:
        """Every folder's open and first QUERY_DIRECTORY sent before the first answer is
        awaited (one compound each): a few round trips for the lot."""
        names = [self._name(path) for path in paths]

        def work(link: _Link) -> list[list[tuple[bytes, RemoteStat]] | RemoteError]:
            sent = [link.send([_create(name, FILE_READ_DATA | FILE_READ_ATTRIBUTES | SYNCHRONIZE,
                                       options=DIRECTORY_FILE), _query_directory(RELATED, True)], related=True)
                    for name in names]
            out: list[list[tuple[bytes, RemoteStat]] | RemoteError] = []
            closing = []
            for requests in sent:
                answers = [link.wait(request) for request in requests]
                try:
                    handle = _parse_create(_check(answers[0]))[6]
                except _Status as exc:
                    out.append(self._error(exc, link))
                    continue
                entries: list[tuple[bytes, RemoteStat]] = []
                answer = answers[1]
                try:
                    while answer["status"].get_value() != STATUS_NO_MORE_FILES:
                        _parse_listing(_query_body(_check(answer)), entries)
                        answer = link.exchange([_query_directory(handle, False)])[0]
                    out.append(entries)
                except _Status as exc:
                    out.append(self._error(exc, link))
                except (struct.error, ValueError) as exc:  # (not as [MS-FSCC] says)
                    out.append(RemoteError(errno.EIO, f"a listing from the server could not be read: {exc}"))
                closing.append(link.send([_close(handle)])[0])
            for request in closing:
                link.wait(request)
            return out

        return self._call(work)

    def readlink(self, path: bytes) -> bytes:
        self.stat(path)  # (ENOENT where nothing is there)
        raise RemoteError(errno.EINVAL, "an SMB share shows no symlinks")

    def read(self, path: bytes, offset: int, length: int) -> bytes:
        pieces: dict[int, bytes] = {}
        got = self.read_into(path, offset, length, lambda at, data: pieces.__setitem__(at, data))
        out = b"".join(pieces[at] for at in sorted(pieces))
        return out[:got]

    def read_into(self, path: bytes, offset: int, length: int,
                  sink: Callable[[int, bytes], object]) -> int:
        return self._read(path, offset, length, sink, want_stat=False)[0]

    def read_version_into(self, path: bytes, offset: int, length: int,
                          sink: Callable[[int, bytes], object]) -> tuple[int, RemoteStat]:
        got, found = self._read(path, offset, length, sink, want_stat=True)
        assert found is not None
        return got, found

    def _read(self, path: bytes, offset: int, length: int, sink: Callable[[int, bytes], object],
              want_stat: bool) -> tuple[int, RemoteStat | None]:
        name = self._name(path)

        def work(link: _Link) -> tuple[int, RemoteStat | None]:
            answers = link.exchange([_create(name, FILE_READ_DATA | FILE_READ_ATTRIBUTES | SYNCHRONIZE,
                                             options=NON_DIRECTORY_FILE),
                                     _query_info(INFO_FILE, FILE_INTERNAL_INFORMATION, 8)])
            handle = _parse_create(_check(answers[0]))[6]
            try:
                file_id = struct.unpack_from("<Q", _query_body(_check(answers[1])))[0]
                got = _read_range(link, handle, offset, length, sink)
            except BaseException:
                try:
                    link.exchange([_close(handle)])
                except Exception:
                    pass
                raise
            closed = _check(link.exchange([_close(handle, postquery=want_stat)])[0])
            if not want_stat:
                return got, None
            attributes, size, atime, mtime, ctime = _parse_close(closed)
            return got, _make_stat(attributes, size, atime, mtime, ctime, file_id)

        return self._call(work)

    def read_many(self, items: list[tuple[bytes, int]]) -> list[tuple[bytes, RemoteStat] | RemoteError]:
        """Small files whole: per file one compound (open, file id, READ, close with its
        attributes), all sent before the first answer is awaited."""
        names = [self._name(path) for path, _size in items]

        def work(link: _Link) -> list[tuple[bytes, RemoteStat] | RemoteError]:
            sent: list[list[Any] | None] = []
            for name, (_path, size) in zip(names, items):
                if size > link.max_read:
                    sent.append(None)  # (read the ordinary way below)
                    continue
                sent.append(link.send([_create(name, FILE_READ_DATA | FILE_READ_ATTRIBUTES | SYNCHRONIZE,
                                               options=NON_DIRECTORY_FILE),
                                       _query_info(INFO_FILE, FILE_INTERNAL_INFORMATION, 8),
                                       _read_request(RELATED, 0, max(1, size)), _close(postquery=True)],
                                      related=True))
            out: list[tuple[bytes, RemoteStat] | RemoteError] = []
            for requests, (path, size) in zip(sent, items):
                if requests is None:
                    try:
                        data = self.read(path, 0, size)
                        out.append((data, self.stat(path)))
                    except RemoteError as exc:
                        if isinstance(exc, RemoteUnreachable):
                            raise
                        out.append(exc)
                    continue
                answers = [link.wait(request) for request in requests]
                try:
                    _check(answers[0])
                    file_id = struct.unpack_from("<Q", _query_body(_check(answers[1])))[0]
                    read = answers[2]
                    data = b"" if read["status"].get_value() == STATUS_END_OF_FILE else _read_data(_check(read))
                    attributes, eof, atime, mtime, ctime = _parse_close(_check(answers[3]))
                except _Status as exc:
                    out.append(self._error(exc, link))
                    continue
                out.append((data, _make_stat(attributes, eof, atime, mtime, ctime, file_id)))
            return out

        return self._call(work)

    def statvfs(self) -> SpaceInfo:
        name = self._name(b"")

        def work(link: _Link) -> SpaceInfo:
            answers = link.exchange([_create(name, FILE_READ_ATTRIBUTES | SYNCHRONIZE, options=DIRECTORY_FILE),
                                     _query_info(INFO_FILESYSTEM, FILE_FS_FULL_SIZE_INFORMATION, 32), _close()])
            _check(answers[0])
            total, caller_free, free, per_unit, sector = _FS_FULL_SIZE.unpack_from(_query_body(_check(answers[1])))
            # (SMB tells no file counts: a plausible fixed answer)
            return SpaceInfo(block_size=max(1, per_unit * sector), blocks=total, blocks_free=free,
                             blocks_avail=caller_free, files=1 << 24, files_free=1 << 23,
                             name_max=NAME_MAX_UNITS)

        return self._call(work)

    # -- writing --------------------------------------------------------------------
    def _write_temp(self, link: _Link, temp: str, source: Source, mode: int,
                    times: tuple[int, int] | None) -> bytes:
        """Create ``temp``, write the content, set times and the read-only attribute;
        the open handle (DELETE access: the caller renames or removes it)."""
        create = [_temp_create(temp)]
        answers = link.exchange(create)
        if answers[0]["status"].get_value() == STATUS_ACCESS_DENIED:
            # (a read-only temporary file an upload cut short left there: ours alone)
            _remove_temp(link, temp)
            answers = link.exchange(create)
        handle = _parse_create(_check(answers[0]))[6]
        try:
            with _opened(source) as stream:
                _write_all(link, handle, stream)
            _check(link.exchange([_dated(mode, times, handle)])[0])
        except BaseException:
            _discard(link, handle)
            raise
        return handle

    def _finish(self, link: _Link, handle: bytes, temp: str, target: str, replace: bool) -> RemoteStat:
        """Rename the open temporary file ``temp`` over ``target`` and close it: its new
        stat (see ``_renamed``)."""
        return _renamed(link, link.exchange(_rename_compound(handle, target, replace), related=False), handle, temp)

    def upload(self, path: bytes, source: Source, mode: int, temp_name: bytes,
               times: tuple[int, int] | None = None, owner: tuple[int, int] | None = None) -> RemoteStat:
        target = self._target_name(path)
        temp = self._name(_sibling(path, temp_name))

        def work(link: _Link) -> RemoteStat:
            handle = self._write_temp(link, temp, source, mode, times)
            return self._finish(link, handle, temp, target, replace=True)

        return self._call(work)

    def upload_many(self, uploads: list[Upload]) -> list[UploadOutcome]:
        """Each upload written to its temporary name first, then the target checked just
        before the rename: the window where a server change can be overwritten is about
        one round trip (none for a target that must not exist: that rename does not
        replace).

        Small files go several at a time, in two round trips for the lot
        (``_upload_small``), as many as ``_group_limits`` allows; a larger one alone, its
        target looked at before its content is sent (``_upload_checked``). The uploads
        are made in the order given; the outcomes in that order."""
        outcomes: list[UploadOutcome | None] = [None] * len(uploads)
        group: list[_Small] = []

        def flush() -> None:
            if group:
                self._upload_small(list(group), outcomes)
                group.clear()

        file_most, group_most = self._group_limits()
        for i, upload in enumerate(uploads):
            try:
                data = _small_content(upload, file_most)
                small = None if data is None else _Small(
                    i, upload, data, self._name(_sibling(upload.path, upload.temp_name)),
                    self._target_name(upload.path))
            except (RemoteError, ContentDamaged) as exc:
                if isinstance(exc, RemoteUnreachable):
                    raise
                outcomes[i] = exc
                continue
            if small is None:
                flush()
                outcomes[i] = self._upload_alone(upload)
                file_most, group_most = self._group_limits()
                continue
            if group and (len(group) >= PIPELINE or sum(len(g.data) for g in group) + len(small.data) > group_most
                          or small.target.casefold() in {g.target.casefold() for g in group}):
                flush()
                file_most, group_most = self._group_limits()
            group.append(small)
        flush()
        assert all(outcome is not None for outcome in outcomes)
        return cast(list[UploadOutcome], outcomes)

    def _group_limits(self) -> tuple[int, int]:
        """(the most bytes of a file sent whole in a group, the most bytes of a group):
        what the link's writes allow now (``_Flow``). A file is at most a request's
        share of the write window (on a slow link, a larger one is sent as the window
        allows, ``_upload_checked``); a group at most what the link carries in
        ``GROUP_SECONDS`` at the rate measured, or, before any measure, one such file's
        worth (whatever waits behind a group, a ``stat`` or a rename of the same
        group, waits that long at most)."""
        link = self._link
        flow = link.writes if link is not None else _Flow()
        _window, chunk = flow.window(self.timeout)
        file_most = min(SMALL_WRITE, chunk)
        group_most = min(PIPELINE_BYTES, int(flow.rate * GROUP_SECONDS)) if flow.rate else file_most
        return file_most, group_most

    def _upload_alone(self, upload: Upload) -> UploadOutcome:
        try:
            return self._upload_checked(upload)
        except (RemoteError, ContentDamaged) as exc:
            if isinstance(exc, RemoteUnreachable):
                raise
            return exc

    def _upload_small(self, group: list["_Small"], outcomes: list[UploadOutcome | None]) -> None:
        """Small uploads pipelined, in two round trips for the lot: for each file one
        compound creates its temporary file, writes it and sets its times and
        attributes, and one looks at its target, sent right behind it; as the answers
        come, file by file, the rename of one still expected is sent. Each file's
        outcome, its error status too, into ``outcomes``; a lost connection or session
        is raised. (The window between a look and its rename is a round trip plus the
        reading of the answers before it: ``PIPELINE`` bounds it.)"""
        again: list[_Small] = []

        def work(link: _Link) -> None:
            flow = link.writes
            size = sum(len(small.data) for small in group)
            window, _chunk = flow.window(link.timeout)
            flow.take(size, window, first=True)
            given = 0
            mark: tuple[float, int] | None = None
            try:
                sent = [(small, link.send(_write_compound(small.temp, small.data, small.upload, link.max_write),
                                          related=True),
                         link.send(_look_compound(small.target), related=True)) for small in group]
                renames = []
                for small, written, looked in sent:
                    written, looked = _answers(link, written), _answers(link, looked)
                    flow.give(len(small.data))
                    given += len(small.data)
                    # (the link's rate from the answers after the first, as ``_write_all``
                    # measures it: the group's size follows it, ``_group_limits``)
                    mark = flow.sample(mark) if mark is not None else (time.monotonic(), flow.done)
                    outcome = self._small_written(link, small, written, looked)
                    if outcome is _AGAIN:
                        again.append(small)
                    elif outcome is not None:
                        outcomes[small.index] = cast(UploadOutcome, outcome)
                    else:
                        assert small.handle is not None
                        renames.append((small, link.send(_rename_compound(small.handle, small.target,
                                                                          replace=small.found is not None))))
            finally:
                if given < size:
                    flow.give(size - given, answered=False)
            for small, requests in renames:
                outcomes[small.index] = self._small_renamed(link, small, _answers(link, requests))

        self._call(work)
        for small in again:  # (alone: a read-only temporary file left there is removed first)
            outcomes[small.index] = self._upload_alone(small.upload)

    def _small_written(self, link: _Link, small: "_Small", written: list[Any],
                       looked: list[Any]) -> UploadOutcome | object | None:
        """After the temporary file's compound and the look at the target: None when the
        upload goes on (``small.handle``, ``small.found`` set), ``_AGAIN`` when its
        temporary file could not be opened for writing (to be sent alone), else its
        outcome (the temporary file removed)."""
        first = written[0]
        if not isinstance(first, _Busy) and first["status"].get_value() == STATUS_ACCESS_DENIED:
            return _AGAIN
        try:
            small.handle = _parse_create(_check(_answer(first)))[6]
            for answer in written[1:]:
                _check(_answer(answer))
            small.found = _looked_at(looked)
        except (_Status, _Busy) as exc:
            if small.handle is not None:
                _discard(link, small.handle)
            return self._failed(exc, link)
        if not small.upload.expect(small.found):
            _discard(link, small.handle)
            return NotExpected(small.found)
        return None

    def _small_renamed(self, link: _Link, small: "_Small", answers: list[Any]) -> UploadOutcome:
        assert small.handle is not None
        try:
            return _renamed(link, answers, small.handle, small.temp)
        except (_Status, _Busy) as exc:
            if not (isinstance(exc, _Status) and exc.status == STATUS_OBJECT_NAME_COLLISION):
                return self._failed(exc, link)
        # (one appeared between the check and the rename: not replaced)
        try:
            return NotExpected(self.stat(small.upload.path))
        except RemoteError as exc:
            if isinstance(exc, RemoteUnreachable):
                raise
            return exc

    def _failed(self, exc: "_Status | _Busy", link: _Link) -> RemoteError:
        """An error answer to one upload of a group, as ``_call`` gives it for one call."""
        if isinstance(exc, _Busy):
            return RemoteError(errno.EBUSY, f"{_os_strerror(errno.EBUSY)}: {exc}")
        return self._error(exc, link)

    def _upload_checked(self, upload: Upload) -> UploadOutcome:
        target = self._target_name(upload.path)
        temp = self._name(_sibling(upload.path, upload.temp_name))
        try:
            current: RemoteStat | None = self.stat(upload.path)
        except RemoteError as exc:
            if isinstance(exc, RemoteUnreachable) or exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
            current = None
        if not upload.expect(current):  # (nothing written when it is already refused)
            return NotExpected(current)

        def work(link: _Link) -> UploadOutcome:
            handle = self._write_temp(link, temp, upload.source, upload.mode, upload.times)
            try:
                now = _looked_at(link.exchange(_look_compound(target)))
                if not upload.expect(now):
                    _discard(link, handle)
                    return NotExpected(now)
            except BaseException:
                _discard(link, handle)
                raise
            try:
                return self._finish(link, handle, temp, target, replace=now is not None)
            except _Status as exc:
                if exc.status != STATUS_OBJECT_NAME_COLLISION:
                    raise
            # (one appeared between the check and the rename: not replaced)
            return NotExpected(self.stat(upload.path))

        return self._call(work)

    def mkdir(self, path: bytes, mode: int) -> None:
        name = self._new_name(path)
        self._call(lambda link: _all_ok(link.exchange([
            _create(name, FILE_READ_ATTRIBUTES | SYNCHRONIZE, CREATE, DIRECTORY_FILE, ATTR_DIRECTORY), _close()])))

    def unlink_if(self, path: bytes, expect: tuple[int, int, int]) -> None:
        """The file is opened denying others write access, its version checked on that
        handle, and removed through it: no SMB client can change it in between (a
        program on the server's own disk still can). Where another client has it open
        for writing, that open cannot be had: the check is then one round trip before
        the removal, as the contract's default."""
        name = self._name(path)
        access = DELETE | FILE_READ_ATTRIBUTES | FILE_WRITE_ATTRIBUTES | SYNCHRONIZE

        def work(link: _Link) -> None:
            for share in (SHARE_READ, SHARE_ALL):
                answers = link.exchange([_create(name, access, options=NON_DIRECTORY_FILE, share=share),
                                         _query_info(INFO_FILE, FILE_INTERNAL_INFORMATION, 8)])
                if answers[0]["status"].get_value() != STATUS_SHARING_VIOLATION or share == SHARE_ALL:
                    break
            attributes, size, atime, mtime, ctime, _c, handle = _parse_create(_check(answers[0]))
            try:
                file_id = struct.unpack_from("<Q", _query_body(_check(answers[1])))[0]
                if _make_stat(attributes, size, atime, mtime, ctime, file_id).version() != expect:
                    raise RemoteError(errno.ESTALE, "the file changed on the server: not removed")
                answers = link.exchange([_set_info(FILE_DISPOSITION_INFORMATION, b"\x01", handle)], related=False)
                if answers[0]["status"].get_value() == STATUS_CANNOT_DELETE:  # (read-only)
                    _check(link.exchange([_set_info(FILE_BASIC_INFORMATION, _basic_info(attributes=ATTR_NORMAL),
                                                    handle),
                                          _set_info(FILE_DISPOSITION_INFORMATION, b"\x01", handle)],
                                         related=False)[1])
                else:
                    _check(answers[0])
            finally:
                link.exchange([_close(handle)])

        self._call(work)

    def rmdir(self, path: bytes) -> None:
        if not path:
            raise RemoteError(errno.EBUSY, "the share's root cannot be removed")
        self._remove(path, DIRECTORY_FILE)

    def unlink(self, path: bytes) -> None:
        self._remove(path, NON_DIRECTORY_FILE)

    def _remove(self, path: bytes, kind: int) -> None:
        name = self._name(path)

        def work(link: _Link) -> None:
            messages = [_create(name, DELETE | FILE_READ_ATTRIBUTES | FILE_WRITE_ATTRIBUTES | SYNCHRONIZE,
                                options=kind),
                        _set_info(FILE_DISPOSITION_INFORMATION, b"\x01"), _close()]
            answers = link.exchange(messages)
            if answers[1]["status"].get_value() == STATUS_CANNOT_DELETE:
                # read-only: POSIX removes it all the same (the folder's permission decides)
                messages.insert(1, _set_info(FILE_BASIC_INFORMATION,
                                             _basic_info(attributes=ATTR_DIRECTORY if kind == DIRECTORY_FILE
                                                         else ATTR_NORMAL)))
                answers = link.exchange(messages)
            _all_ok(answers)

        self._call(work)

    def _rename(self, src: bytes, dst: bytes, replace: bool) -> None:
        source = self._name(src)
        target = self._target_name(dst) if replace else self._new_name(dst)
        if not src:
            raise RemoteError(errno.EBUSY, "the share's root cannot be renamed")

        def work(link: _Link) -> None:
            _all_ok(link.exchange([_create(source, DELETE | FILE_READ_ATTRIBUTES | SYNCHRONIZE),
                                   _set_info(FILE_RENAME_INFORMATION, _rename_info(target, replace)), _close()]))

        try:
            self._call(work)
        except RemoteError as exc:
            if not replace or exc.errno != errno.EEXIST or isinstance(exc, RemoteUnreachable):
                raise
            # (SMB refuses a file over a folder and the other way round as a collision:
            # POSIX says which)
            if stat_mod.S_ISDIR(self.stat(dst).mode):
                if not stat_mod.S_ISDIR(self.stat(src).mode):
                    raise RemoteError(errno.EISDIR, "a file cannot replace a folder") from None
                raise RemoteError(errno.ENOTEMPTY, "the folder to replace is not empty") from None
            raise RemoteError(errno.ENOTDIR, "a folder cannot replace a file") from None

    def rename(self, src: bytes, dst: bytes) -> None:
        self._rename(src, dst, True)

    def rename_noreplace(self, src: bytes, dst: bytes) -> None:
        """ReplaceIfExists off: the server refuses atomically when ``dst`` exists."""
        self._rename(src, dst, False)

    def symlink(self, target: bytes, path: bytes) -> None:
        raise RemoteError(errno.EPERM, "an SMB share keeps no symlinks")

    def link(self, src: bytes, dst: bytes) -> None:
        raise RemoteError(errno.EPERM, "an SMB share keeps no hard links here")

    def set_attrs(self, path: bytes, mode: int, atime_ns: int, mtime_ns: int,
                  owner: tuple[int, int] | None = None) -> None:
        """Times, and of the mode only whether the owner may write (SMB's read-only
        attribute, files only); owners are not kept."""
        name = self._name(path)

        def work(link: _Link) -> None:
            answers = link.exchange([_create(name, FILE_READ_ATTRIBUTES | FILE_WRITE_ATTRIBUTES | SYNCHRONIZE)])
            attributes, _s, _a, _m, _c, _cr, handle = _parse_create(_check(answers[0]))
            wanted = 0
            if not attributes & ATTR_DIRECTORY:
                wanted = attributes | ATTR_READONLY if not mode & 0o200 else attributes & ~ATTR_READONLY
                wanted = wanted or ATTR_NORMAL
            _all_ok(link.exchange([_set_info(FILE_BASIC_INFORMATION, _basic_info(atime_ns, mtime_ns, wanted), handle),
                                   _close(handle)], related=False))

        self._call(work)

    # -- change notification ---------------------------------------------------------
    def watch(self, using: str = "auto") -> Watch:
        """SMB2 CHANGE_NOTIFY on our folder with WATCH_TREE, on a connection of its own."""
        try:
            link = self._connect_link()
        except (RemoteUnreachable, RemoteRefused) as exc:
            raise WatchEnded(f"cannot connect for change notifications: {exc}") from exc
        try:
            return SmbWatch(link, self._name(b""))
        except (_Status, _Closed) as exc:
            link.close()
            raise WatchEnded(f"the server refused change notifications: {exc}") from exc


class SmbWatch(Watch):
    """Paths changing in the share, as the server tells them (CHANGE_NOTIFY, re-armed
    after each answer; the server keeps the changes made in between for the open
    folder). A path b"" means "anything may have changed" (the server's list overflowed).

    ``complete`` is False: what is told is applied at once, but the cache must go on
    checking by time. Samba (4.17, measured; ``kernel change notify`` and
    ``notify:inotify`` on, their defaults) tells every change made through SMB anywhere
    in the tree, but a change made on its own disk only when it is in the watched folder
    itself: its inotify watch is not recursive, WATCH_TREE or not. (A CHANGE_NOTIFY held
    on each folder would see them: one open handle, one inotify watch and one credit per
    folder of the share, a cost this backend does not take.) A Windows server tells
    everything, but cannot be told from Samba here."""

    #: every change in the tree is told (see the class's docstring)
    complete = False
    #: seconds without a byte on the watch's connection before an ECHO asks whether the
    #: server is still there (unanswered within the timeout: the watch ends, to be made
    #: again). A NAT or a firewall that drops the idle connection, or a server that went
    #: away without a reset, would otherwise leave the watch silent, its listings trusted,
    #: for as long as TCP takes to notice (smbprotocol's own echo: after 10 minutes).
    echo_after = 25.0

    def __init__(self, link: _Link, root: str) -> None:
        self._link = link
        self._echo: Any = None  # the ECHO awaiting its answer
        self._echo_sent = 0.0
        self._request_type = SMB2ChangeNotifyRequest
        answers = link.exchange([_create(root, FILE_READ_DATA | FILE_READ_ATTRIBUTES | SYNCHRONIZE,
                                         options=DIRECTORY_FILE)])
        self._handle = _parse_create(_check(answers[0]))[6]
        self.started = True
        self._pending = self._arm()
        self._ended: WatchEnded | None = None

    def _arm(self) -> Any:
        request = self._request_type()
        request["flags"] = WATCH_TREE
        request["output_buffer_length"] = 65536
        request["file_id"] = self._handle
        request["completion_filter"] = NOTIFY_FILTER
        return self._link.send([request])[0]

    def _end(self, reason: str) -> WatchEnded:
        self._ended = WatchEnded(reason)
        self._link.close()
        return self._ended

    def _still_there(self) -> None:
        """Raise ``WatchEnded`` when the connection ended, or was silent for
        ``echo_after`` and then did not answer an ECHO within the timeout."""
        link = self._link
        now = time.monotonic()
        if not link.alive():
            raise self._end("the SMB connection for change notifications ended")
        if self._echo is not None:
            if self._echo.response_event.is_set():
                link.connection.outstanding_requests.pop(self._echo.message["message_id"].get_value(), None)
                self._echo = None
            elif now - self._echo_sent > link.timeout:
                raise self._end(f"the server did not answer on the connection for change notifications "
                                f"within {link.timeout:g} s")
        elif now - link.meter.moved > self.echo_after:
            try:
                self._echo = link.send([SMB2Echo()])[0]
            except _Closed as exc:
                raise self._end(f"the SMB connection for change notifications ended: {exc}") from None
            self._echo_sent = now

    def read(self, timeout: float) -> list[bytes]:
        if self._ended is not None:
            raise self._ended
        request = self._pending
        deadline = time.monotonic() + timeout
        while True:
            self._still_there()
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            if not request.response_event.wait(min(left, 1.0)):
                continue
            with request.response_event_lock:
                response = request.response
                if response is None or self._link.connection._t_exc is not None \
                        or not self._link.connection.transport.connected:
                    self._ended = WatchEnded("the SMB connection for change notifications ended")
                    raise self._ended
                status = response["status"].get_value()
                if status == STATUS_PENDING:  # (the server holds it: every folder is watched)
                    self.ready = True
                    request.response_event.clear()
                    continue
                self._link.connection.outstanding_requests.pop(request.message["message_id"].get_value(), None)
                break
        self.ready = True
        try:
            self._pending = self._arm()
        except _Closed as exc:
            self._ended = WatchEnded(f"the SMB connection for change notifications ended: {exc}")
        if status == STATUS_NOTIFY_ENUM_DIR:
            return [b""]
        if status != 0:
            self._ended = WatchEnded(f"the server stopped change notifications (0x{status:08X})",
                                     retry=status not in STATUS_ERRNO)
            raise self._ended
        try:
            return _parse_notify(_query_body(response["data"].get_value()))
        except (struct.error, ValueError) as exc:  # (an answer not as [MS-FSCC] says: anything may have changed)
            log.debug("an SMB change notification could not be read: %s", exc)
            return [b""]

    def close(self) -> None:
        self._ended = WatchEnded("closed", retry=False)
        try:
            self._pending.cancel()
        except Exception:
            pass
        self._link.close()


def _parse_notify(buffer: bytes) -> list[bytes]:
    """FILE_NOTIFY_INFORMATION entries: share-relative paths (our folder's), as bytes."""
    out: list[bytes] = []
    position = 0
    while position + 12 <= len(buffer):
        next_entry, _action, length = struct.unpack_from("<III", buffer, position)
        name = buffer[position + 12:position + 12 + length].decode("utf-16-le", "surrogatepass")
        out.append(_name_bytes(name.replace("\\", "/")))
        if not next_entry:
            break
        position += next_entry
    return out or [b""]


# -- helpers ----------------------------------------------------------------------------------
def _read_range(link: _Link, handle: bytes, offset: int, length: int,
                sink: Callable[[int, bytes], object]) -> int:
    """READs of ``length`` bytes at ``offset``, sent ahead as the link's read window
    allows (``_Flow``); each piece to ``sink``. The count of bytes up to the first short
    answer (end of file)."""
    flow = link.reads
    pending: list[tuple[int, int, Any]] = []
    position, end, got, at_end = offset, offset + length, 0, False
    mark: tuple[float, int] | None = None  # (time, flow.done) at the previous answer
    try:
        while pending or (position < end and not at_end):
            window, chunk = flow.window(link.timeout)
            while not at_end and position < end:
                size = min(chunk, link.max_read, end - position)
                if not flow.take(size, window, first=not pending):
                    break
                try:
                    pending.append((position, size, link.send([_read_request(handle, position, size)])[0]))
                except BaseException:
                    flow.give(size, answered=False)
                    raise
                position += size
            start, size, request = pending[0]
            answer = link.wait(request)
            pending.pop(0)
            flow.give(size)
            if mark is not None and pending:  # (requests in flight since the previous answer)
                mark = flow.sample(mark)
            else:
                mark = (time.monotonic(), flow.done)
            if answer["status"].get_value() == STATUS_END_OF_FILE:
                at_end = True
                continue
            data = _read_data(_check(answer))
            if data:
                sink(start, data)
            if not at_end and start == offset + got:
                got += len(data)
            if len(data) < size:
                at_end = True
    finally:
        for _start, size, _request in pending:  # (a failure: their answers are not awaited)
            flow.give(size, answered=False)
    return got


def _write_all(link: _Link, handle: bytes, stream: Any) -> None:
    """WRITEs of the whole stream, sent ahead as the link's write window allows (see
    ``_read_range``)."""
    flow = link.writes
    pending: list[tuple[int, Any]] = []
    position = 0
    mark: tuple[float, int] | None = None
    try:
        while True:
            window, chunk = flow.window(link.timeout)
            try:
                data = stream.read(min(chunk, link.max_write))
            except OSError as exc:  # (the local content, not the server: that upload alone fails)
                raise ContentDamaged(f"the content to upload cannot be read: {exc}") from None
            while pending and (not data or not flow.take(len(data), window, first=False)):
                size, request = pending[0]
                answer = link.wait(request)
                pending.pop(0)
                flow.give(size)
                if mark is not None and pending:
                    mark = flow.sample(mark)
                else:
                    mark = (time.monotonic(), flow.done)
                _check(answer)
            if not data:
                return
            if not pending:
                flow.take(len(data), window, first=True)  # (a first request is always taken)
            try:
                pending.append((len(data), link.send([_write_request(handle, position, data)])[0]))
            except BaseException:
                flow.give(len(data), answered=False)
                raise
            position += len(data)
    finally:
        for size, _request in pending:
            flow.give(size, answered=False)


_AGAIN = object()  # (``SmbRemote._small_written``: that file is sent again alone)


@dataclass
class _Small:
    """One small upload of ``SmbRemote._upload_small``: its place in the batch, its
    content, temporary and target names; once written, the temporary file's handle and
    what the target was."""

    index: int
    upload: Upload
    data: bytes
    temp: str
    target: str
    handle: bytes | None = None
    found: RemoteStat | None = None


def _small_content(upload: Upload, most: int) -> bytes | None:
    """The whole content of ``upload`` when it is at most ``most`` bytes (read to its end,
    so that its checksum is checked: ``ContentDamaged``), else None (the upload reads
    it again as it sends it)."""
    with _opened(upload.source) as stream:
        try:
            data = stream.read(most)
            while len(data) < most and (more := stream.read(most - len(data))):
                data += more  # (a stream may give less than asked before its end)
            if len(data) == most and stream.read(1):
                return None
        except OSError as exc:
            raise ContentDamaged(f"the content to upload cannot be read: {exc}") from None
    return data


def _opened(source: Source) -> BinaryIO:
    """A fresh stream of an upload's content; one that cannot be opened is damage of the
    local content (``ContentDamaged``), not the server's."""
    try:
        return open_source(source)
    except OSError as exc:
        raise ContentDamaged(f"the content to upload cannot be read: {exc}") from None


def _temp_create(temp: str) -> _Packed:
    """Create (or empty) the temporary file ``temp``, its handle kept (DELETE access:
    renamed or removed next)."""
    return _create(temp, FILE_WRITE_DATA | FILE_READ_ATTRIBUTES | FILE_WRITE_ATTRIBUTES | DELETE | SYNCHRONIZE,
                   OVERWRITE_IF, NON_DIRECTORY_FILE, ATTR_NORMAL)


def _dated(mode: int, times: tuple[int, int] | None, file_id: bytes = RELATED) -> _Packed:
    """Set an uploaded file's times (none given: left) and read-only attribute."""
    atime, mtime = times if times is not None else (0, 0)
    return _set_info(FILE_BASIC_INFORMATION, _basic_info(atime, mtime, ATTR_READONLY if not mode & 0o200
                                                          else ATTR_NORMAL), file_id)


def _write_compound(temp: str, data: bytes, upload: Upload, max_write: int) -> list[Any]:
    """Create (or empty) ``temp``, write ``data`` into it and set the upload's times and
    read-only attribute, as one related compound: its handle stays open."""
    return [_temp_create(temp),
            *(_write_request(RELATED, pos, data[pos:pos + max_write]) for pos in range(0, len(data), max_write)),
            _dated(upload.mode, upload.times)]


def _look_compound(target: str) -> list[Any]:
    """Open ``target``, ask its file id, close it (one related compound): ``_looked_at``."""
    return [_create(target, FILE_READ_ATTRIBUTES | SYNCHRONIZE), _query_info(INFO_FILE, FILE_INTERNAL_INFORMATION, 8),
            _close()]


def _looked_at(answers: list[Any]) -> RemoteStat | None:
    """What the answers to ``_look_compound`` say is at the target (None: nothing)."""
    first = _answer(answers[0])
    if first["status"].get_value() in (0xC0000034, 0xC000003A, 0xC000000F):
        return None
    attributes, size, atime, mtime, ctime, _c, _h = _parse_create(_check(first))
    file_id = struct.unpack_from("<Q", _query_body(_check(_answer(answers[1]))))[0]
    return _make_stat(attributes, size, atime, mtime, ctime, file_id)


def _rename_compound(handle: bytes, target: str, replace: bool) -> list[Any]:
    """Rename the open file over ``target``, ask its file id, close it (sent unrelated:
    each names the handle): ``_renamed``."""
    return [_set_info(FILE_RENAME_INFORMATION, _rename_info(target, replace), handle),
            _query_info(INFO_FILE, FILE_INTERNAL_INFORMATION, 8, handle), _close(handle, postquery=True)]


def _renamed(link: _Link, answers: list[Any], handle: bytes, temp: str) -> RemoteStat:
    """The new stat of a file renamed by ``_rename_compound``. A refused rename (a name
    the server refuses, a file appeared or held open elsewhere) removes the temporary
    file: the same compound has closed its handle, so it is removed by its name (ours
    alone); its error raised."""
    try:
        _check(_answer(answers[0]))
    except (_Status, _Busy):
        closed = answers[2]
        if not isinstance(closed, _Busy) and closed["status"].get_value() == 0:
            _remove_temp(link, temp)
        else:
            _discard(link, handle)
        raise
    file_id = struct.unpack_from("<Q", _query_body(_check(_answer(answers[1]))))[0]
    attributes, size, atime, mtime, ctime = _parse_close(_check(_answer(answers[2])))
    return _make_stat(attributes, size, atime, mtime, ctime, file_id)


def _answers(link: _Link, requests: list[Any]) -> list[Any]:
    """The answers to ``requests`` (one compound), each waited for; one given up on
    (``_Busy``) is in its place, so that the others are still waited for."""
    out: list[Any] = []
    for request in requests:
        try:
            out.append(link.wait(request))
        except _Busy as exc:
            out.append(exc)
    return out


def _answer(answer: Any) -> Any:
    """An answer of ``_answers``; raises the ``_Busy`` in its place."""
    if isinstance(answer, _Busy):
        raise answer
    return answer


def _discard(link: _Link, handle: bytes) -> None:
    """Remove an open temporary file (best effort: a broken link leaves it behind, as an
    interrupted SFTP upload does)."""
    try:  # (its read-only attribute cleared first: the server refuses to delete such a file)
        link.exchange([_set_info(FILE_BASIC_INFORMATION, _basic_info(attributes=ATTR_NORMAL), handle),
                       _set_info(FILE_DISPOSITION_INFORMATION, b"\x01", handle), _close(handle)], related=False)
    except Exception as exc:
        log.debug("could not remove a temporary file: %s", exc)


def _remove_temp(link: _Link, temp: str) -> None:
    """Remove a closed temporary file by its name (best effort, as ``_discard``)."""
    try:
        _all_ok(link.exchange([_create(temp, DELETE | FILE_READ_ATTRIBUTES | FILE_WRITE_ATTRIBUTES | SYNCHRONIZE,
                                       options=NON_DIRECTORY_FILE),
                               _set_info(FILE_BASIC_INFORMATION, _basic_info(attributes=ATTR_NORMAL)),
                               _set_info(FILE_DISPOSITION_INFORMATION, b"\x01"), _close()]))
    except Exception as exc:
        log.debug("could not remove a temporary file: %s", exc)


def _all_ok(answers: list[Any]) -> None:
    for answer in answers:
        _check(answer)


def _sibling(path: bytes, name: bytes) -> bytes:
    parent = path.rsplit(b"/", 1)[0] if b"/" in path else b""
    return parent + b"/" + name if parent else name


def _close_quietly(connection: Any) -> None:
    try:
        connection.transport.close()
    except Exception:
        pass


def _reason(exc: BaseException) -> str:
    """An exception's text for a message, without smbprotocol's multi-line dumps (and of a
    Kerberos failure, GSSAPI's own words only: "Server cifs/host@REALM not found in
    Kerberos database", not the two status codes and context around them)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    gss = _GSS_TEXT.search(text)
    if gss:
        major, minor = gss.group(1), gss.group(2)
        # (an expired ticket: "Major (720896): The referenced credential has expired,
        # Minor (100001): Success")
        text = major if minor in ("Success", "Unknown error") or minor.startswith("Unknown code") else minor
    return text[:200]


_GSS_TEXT = re.compile(r"Major \(\d+\): (.+?), Minor \(\d+\): (.+?)(?:, Context: .*)?$")


def _os_strerror(code: int) -> str:
    return os.strerror(code)


_kerberos: bool | None = None
KERBEROS_WAIT = 5.0  # seconds a KDC has to give a service ticket before the password is tried
# Why a Kerberos login to each address last failed, as logged: the mount's connections
# (the main one, the listing's, the watch's) say it once between them, not each.
_KERBEROS_SAID: dict[str, str] = {}


def _kerberos_installed() -> bool:
    """Whether python-gssapi and pykrb5 are there (pyspnego does the Kerberos exchange
    through both: the extra ``cachefs[kerberos]``). Looked for, never imported here; with
    gssapi alone each login first failed on pyspnego's ImportError."""
    global _kerberos
    if _kerberos is None:
        import importlib.util

        _kerberos = all(importlib.util.find_spec(name) is not None for name in ("gssapi", "krb5"))
    return _kerberos


def _kerberos_cache_principal() -> str | None:
    """Whose tickets the default credential cache holds (``KRB5CCNAME``, else krb5.conf's
    ``default_ccache_name``: a FILE, KEYRING or KCM cache), if the Kerberos libraries are
    there and it holds any: None says a Kerberos login cannot be tried."""
    if not _kerberos_installed():
        return None
    # (no cache, an empty or unreadable one: None)
    return _krb5_name(lambda krb5, context: krb5.cc_get_principal(context, krb5.cc_default(context)))


def _krb5_name(principal_of: Callable[[Any, Any], Any]) -> str | None:
    """The principal ``principal_of(krb5, context)`` gives, as Kerberos writes it; None
    where the libraries cannot say (``krb5.Krb5Error``)."""
    import krb5

    try:
        context = krb5.init_context()
        name: bytes = krb5.unparse_name_flags(context, principal_of(krb5, context))
    except Exception:
        return None
    return name.decode("utf-8", "replace")


def _kerberos_principal(named: str | None, cached: str | None = None) -> str | None:
    """Who a Kerberos login is for: the address's user (``alice``, ``alice@REALM``, its
    realm in capitals), but not as ``DOMAIN\\alice`` (a NetBIOS domain is no realm, and
    GSSAPI reads the backslash as an escape: ``DOMAINalice``); None (the cache's own
    principal) where the address names nobody. The cache's principal ``cached`` as it is
    spelt there where the address's user is that one but for case (``Alice`` with a ticket
    for ``alice@AD.EXAMPLE``: AD's names know no case, and Windows takes any; GSSAPI looks
    the name up as written and found no ticket)."""
    if named is None:
        return None
    name = named.rsplit("\\", 1)[-1]
    if "@" in name:  # (a realm is written in capitals, AD's its DNS domain's: alice@corp.example)
        user, realm = name.rsplit("@", 1)
        name = f"{user}@{realm.upper()}"
    if cached is not None and name != cached:
        full = _full_principal(name)
        if full != cached and _same_but_case(full, cached):
            return cached
    return name


def _same_but_case(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` differ in the case of letters only, one letter for one
    letter as AD compares names (``Alice``, ``alice``; ``Müller``, ``MÜLLER``): never by
    ``str.casefold``'s full folding, which makes other users' names one (``straße`` and
    ``strasse``, the Kelvin sign and ``k``, ``ſ`` and ``s``: each pair two accounts)."""
    return len(a) == len(b) and all(x == y or (x.lower() == y.lower() and x.upper() == y.upper())
                                    for x, y in zip(a, b))


def _full_principal(name: str) -> str:
    """``name`` with its realm (the default realm where it has none), as Kerberos writes
    it; ``name`` itself where the libraries cannot say (no default realm, a name they
    cannot parse)."""
    return _krb5_name(lambda krb5, context: krb5.parse_name_flags(context, name.encode("utf-8"))) or name
