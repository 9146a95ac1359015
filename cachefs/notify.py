"""Desktop notifications: a new conflict, the remote lost and found again, a sync that
fails, told through the freedesktop Notifications interface on the user's session bus.

Owns: which events become a notification and when (``Notices``: gathered, coalesced and
rate-limited on the trio thread), the one thread that sends them (``BusSender``), and a
minimal D-Bus client (``session_bus_address``, ``send_notification``: the SASL EXTERNAL
handshake, ``Hello``, one ``org.freedesktop.Notifications.Notify`` call and its reply,
marshalled here in the D-Bus wire format; no D-Bus library, no child process).
Must not touch: the cache, the store, the remote, FUSE. It is told of events by the
daemon's wiring (callbacks of the sync manager and of the link) and reads nothing else.
Lock/ordering: ``Notices`` runs on the trio thread and never blocks it: a notification
ready to go is put on a bounded queue (``put_nowait``; dropped, with a debug line, when
full); the sender thread alone touches the bus socket, each call bounded by
``SEND_TIMEOUT``, so a slow or stuck bus delays only further notifications, never a
request or the mount's teardown (the thread is a daemon thread).

Why a client of its own: ``notify-send`` is not installed on many desktops and ``gdbus``
not on every one, and a child process per notification from a process that serves FUSE
costs a fork of a large process; the part of D-Bus needed for one method call is ~250
lines with nothing to install (see docs/conflicts.md#notifications).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

log = logging.getLogger(__name__)

SEND_TIMEOUT = 5.0  # the longest one notification may take on the bus (connect to reply)
QUEUE_SIZE = 16  # notifications waiting for the sender; more are dropped
GATHER = 1.0  # conflicts found within this time go in one notification
CONFLICT_GAP = 10.0  # at least this long between two conflict notifications
LINK_SETTLE = 2.0  # a link state must last this long to be told (a blip is not)
LINK_GAP = 5.0  # the first gap between two link notifications; doubles while it flaps
LINK_GAP_MAX = 300.0
LINK_CALM = 600.0  # a link quiet this long starts again from LINK_GAP
FAILURE_GAP = 60.0  # at least this long between two sync-failure notifications
NAMES_SHOWN = 3  # file names in one conflict notification; the rest counted

#: what each conflict kind means, in a notification's words
KIND_TEXT = {
    "changed-both": "changed here and on the server: both kept",
    "deleted-remote-changed-local": "changed here, deleted on the server: put back there",
    "deleted-local-changed-remote": "deleted here, changed on the server: the server's kept",
    "folder-recreated": "its folder was removed on the server: made again",
    "folder-not-empty-remote": "folder deleted here got new files on the server: kept",
    "created-both": "made here and, as something else, on the server: both kept",
    "renamed-onto-new-remote": "renamed here onto a name taken on the server: both kept",
    "renamed-missing-remote": "renamed here, moved or deleted on the server",
    "attributes-of-deleted": "mode or times changed here, deleted on the server",
    "damaged-local": "damaged in the cache: not uploaded",
    "error": "refused by the server: kept here",
}


# -- the D-Bus client ------------------------------------------------------------------------
class BusError(Exception):
    """The bus could not be reached, refused us, or answered with an error."""


def session_bus_address(environ: Mapping[str, str] | None = None) -> str | None:
    """The session bus's address: ``DBUS_SESSION_BUS_ADDRESS``, else the socket
    ``$XDG_RUNTIME_DIR/bus`` (systemd's user bus) when it exists; None when neither."""
    env = os.environ if environ is None else environ
    address = env.get("DBUS_SESSION_BUS_ADDRESS", "").strip()
    if address:
        return address
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.exists(os.path.join(runtime, "bus")):
        return "unix:path=" + os.path.join(runtime, "bus")
    return None


def _unix_socket_path(address: str) -> str:
    """The socket of the first ``unix:`` address with a ``path`` or ``abstract`` key (an
    address may list several, separated by ``;``); abstract names start with NUL."""
    for entry in address.split(";"):
        transport, _, params = entry.partition(":")
        if transport != "unix":
            continue
        keys = dict(p.partition("=")[::2] for p in params.split(",") if p)
        if "path" in keys:
            return _unescape(keys["path"])
        if "abstract" in keys:
            return "\0" + _unescape(keys["abstract"])
    raise BusError(f"no unix socket in the bus address {address!r}")


def _unescape(text: str) -> str:
    out, i = bytearray(), 0
    raw = text.encode()
    while i < len(raw):
        if raw[i] == 0x25 and i + 2 < len(raw):  # %XX
            out.append(int(raw[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


class _Writer:
    """D-Bus marshalling, little-endian, of the few types a Notify call needs."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def align(self, n: int) -> None:
        self.buf += b"\0" * (-len(self.buf) % n)

    def byte(self, v: int) -> None:
        self.buf.append(v)

    def uint32(self, v: int) -> None:
        self.align(4)
        self.buf += struct.pack("<I", v)

    def int32(self, v: int) -> None:
        self.align(4)
        self.buf += struct.pack("<i", v)

    def string(self, v: str) -> None:  # also an object path ('o')
        data = v.encode("utf-8", "replace")
        self.uint32(len(data))
        self.buf += data + b"\0"

    def signature(self, v: str) -> None:
        data = v.encode()
        self.buf += bytes([len(data)]) + data + b"\0"

    def array(self, align: int, items: Iterator[Callable[[], None]]) -> None:
        self.uint32(0)
        at = len(self.buf) - 4
        self.align(align)
        start = len(self.buf)
        for write in items:
            write()
        struct.pack_into("<I", self.buf, at, len(self.buf) - start)

    def variant(self, sig: str, value: Any) -> None:
        self.signature(sig)
        write: dict[str, Callable[[Any], None]] = {
            "s": self.string, "o": self.string, "u": self.uint32, "y": self.byte,
            "g": self.signature, "i": self.int32}
        write[sig](value)


METHOD_CALL, METHOD_RETURN, ERROR = 1, 2, 3


def _message(serial: int, path: str, interface: str, member: str, destination: str,
             signature: str = "", body: bytes = b"") -> bytes:
    """A method call."""
    fields: list[tuple[int, str, Any]] = [(1, "o", path), (2, "s", interface), (3, "s", member),
                                          (6, "s", destination)]
    if signature:
        fields.append((8, "g", signature))
    return message(METHOD_CALL, 0, serial, fields, body)


def message(kind: int, flags: int, serial: int, fields: list[tuple[int, str, Any]],
            body: bytes = b"") -> bytes:
    """A D-Bus message (little-endian): its header fields as (code, signature, value)."""
    w = _Writer()
    w.buf += b"l" + bytes([kind, flags, 1])
    w.uint32(len(body))
    w.uint32(serial)

    def field_writer(code: int, sig: str, value: Any) -> Callable[[], None]:
        def write() -> None:
            w.align(8)
            w.byte(code)
            w.variant(sig, value)
        return write

    w.array(8, iter([field_writer(*f) for f in fields]))
    w.align(8)
    return bytes(w.buf) + body


def _notify_body(app: str, summary: str, body: str, hints: Mapping[str, str | int],
                 expire_ms: int) -> bytes:
    """The arguments of Notify: ``susssasa{sv}i``."""
    w = _Writer()
    w.string(app)
    w.uint32(0)  # replaces_id
    w.string("")  # app_icon
    w.string(summary)
    w.string(body)
    w.array(4, iter([]))  # actions

    def hint(key: str, value: str | int) -> Callable[[], None]:
        def write() -> None:
            w.align(8)
            w.string(key)
            w.variant("y" if isinstance(value, int) else "s", value)
        return write

    w.array(8, iter([hint(k, v) for k, v in hints.items()]))
    w.int32(expire_ms)
    return bytes(w.buf)


def _read_reply(sock: socket.socket, pending: bytearray) -> tuple[int, int, str | None, str | int | None]:
    """One message from the bus: (type, reply serial or 0, error name, the first string of
    an error's body or the number a method returned). Reads from ``sock`` into ``pending`` as needed."""
    def need(n: int) -> None:
        while len(pending) < n:
            data = sock.recv(65536)
            if not data:
                raise BusError("the bus closed the connection")
            pending.extend(data)

    need(16)
    order = "<" if pending[0:1] == b"l" else ">"
    kind = pending[1]
    body_len, _serial, fields_len = struct.unpack_from(order + "III", pending, 4)
    header_end = 16 + fields_len + (-(16 + fields_len) % 8)
    need(header_end + body_len)
    msg = bytes(pending[:header_end + body_len])
    del pending[:header_end + body_len]
    reply_serial, error_name, signature = 0, None, ""
    at = 16
    while at < 16 + fields_len:
        at += -at % 8
        code, sig_len = msg[at], msg[at + 1]
        sig = msg[at + 2:at + 2 + sig_len].decode()
        at += 3 + sig_len
        if sig in ("s", "o"):
            at += -at % 4
            (n,) = struct.unpack_from(order + "I", msg, at)
            value: Any = msg[at + 4:at + 4 + n].decode("utf-8", "replace")
            at += 5 + n
        elif sig == "g":
            n = msg[at]
            value = msg[at + 1:at + 1 + n].decode()
            at += 2 + n
        elif sig == "u":
            at += -at % 4
            (value,) = struct.unpack_from(order + "I", msg, at)
            at += 4
        else:
            raise BusError(f"unexpected header field type {sig!r}")
        if code == 5:
            reply_serial = value
        elif code == 4:
            error_name = value
        elif code == 8:
            signature = value
    text: str | int | None = None
    if kind == ERROR and signature.startswith("s") and body_len >= 4:
        (n,) = struct.unpack_from(order + "I", msg, header_end)
        text = msg[header_end + 4:header_end + 4 + n].decode("utf-8", "replace")
    elif kind == METHOD_RETURN and signature == "u" and body_len >= 4:
        (text,) = struct.unpack_from(order + "I", msg, header_end)
    return kind, reply_serial, error_name, text


def send_notification(address: str, summary: str, body: str, *, app: str = "cachefs",
                      hints: Mapping[str, str | int] | None = None, expire_ms: int = -1,
                      timeout: float = SEND_TIMEOUT) -> int:
    """One ``Notify`` call on the bus at ``address``, waited for at most ``timeout``
    seconds in all; the notification's id. ``BusError`` (or ``OSError``) otherwise."""
    deadline = time.monotonic() + timeout
    path = _unix_socket_path(address)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BusError(f"the bus did not answer within {timeout:g} s")
            return remaining

        sock.settimeout(left())
        try:
            sock.connect(path)
            sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
            line = bytearray()
            while not line.endswith(b"\r\n"):
                sock.settimeout(left())
                data = sock.recv(512)
                if not data:
                    raise BusError("the bus closed the connection while authenticating")
                line += data
            if not line.startswith(b"OK "):
                raise BusError(f"the bus refused us: {bytes(line).strip().decode(errors='replace')}")
            sock.sendall(b"BEGIN\r\n")
            hello = _message(1, "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello",
                             "org.freedesktop.DBus")
            call = _message(2, "/org/freedesktop/Notifications", "org.freedesktop.Notifications",
                            "Notify", "org.freedesktop.Notifications", "susssasa{sv}i",
                            _notify_body(app, summary, body, hints or {}, expire_ms))
            sock.sendall(hello + call)
            pending = bytearray()
            while True:
                sock.settimeout(left())
                kind, reply_to, error, text = _read_reply(sock, pending)
                if reply_to != 2 or kind not in (METHOD_RETURN, ERROR):
                    continue  # Hello's answer, NameAcquired
                if kind == ERROR:
                    raise BusError(f"{error}: {text or ''}".rstrip(": "))
                return text if isinstance(text, int) else 0
        except socket.timeout:
            raise BusError(f"the bus did not answer within {timeout:g} s") from None


# -- the sending thread ------------------------------------------------------------------------
@dataclass(frozen=True)
class Notice:
    summary: str
    body: str
    category: str  # the freedesktop hint: network.disconnected, transfer.error, ...
    urgency: int = 1  # 0 low, 1 normal, 2 critical


class BusSender:
    """Sends notices from a thread of its own, one at a time (started at the first)."""

    def __init__(self, address: str, send: Callable[..., int] = send_notification) -> None:
        self.address = address
        self._send = send
        self._queue: queue.Queue[Notice] = queue.Queue(QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        self.sent = 0  # (for tests and the log)

    def put(self, notice: Notice) -> None:
        """Never blocks: a notice that finds the queue full is dropped."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cachefs-notify", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait(notice)
        except queue.Full:
            log.debug("notification dropped (the bus is slow): %s", notice.summary)

    def _run(self) -> None:
        while True:
            notice = self._queue.get()
            try:
                self._send(self.address, notice.summary, notice.body,
                           hints={"category": notice.category, "urgency": notice.urgency})
                self.sent += 1
            except (BusError, OSError) as exc:
                log.debug("notification not shown (%s): %s", exc, notice.summary)
            except Exception:  # never let the thread die: later notices still go
                log.debug("notification failed", exc_info=True)


# -- which events become notifications, and when ------------------------------------------------
@dataclass
class _Link:
    announced: str  # "online", "offline", "quiet" (offline by request: nothing to tell)
    current: str
    changed: float = 0.0  # monotonic time the current state began
    next_allowed: float = 0.0
    gap: float = LINK_GAP
    last_told: float = field(default=-LINK_CALM)


class Notices:
    """Gathers events on the trio thread and hands the notices to ``put``.

    - conflicts: those recorded within ``GATHER`` s go in one notification (up to three
      names, the rest counted), at least ``CONFLICT_GAP`` s after the last;
    - the link: a state told only once it lasted ``LINK_SETTLE`` s and differs from the
      last told (a flap within it tells nothing); between two link notifications a gap
      that starts at ``LINK_GAP`` s and doubles (up to ``LINK_GAP_MAX``) while the link
      keeps changing, back to the start after ``LINK_CALM`` s of quiet; going offline by
      request, and coming back from it, tell nothing (the user asked);
    - a sync that fails: told once per reason until a pass succeeds again, and at most
      once a minute.

    ``show_names``: False for an encrypted cache (without ``--verbose``): no file name
    then leaves the mount (the count and the kinds only)."""

    def __init__(self, put: Callable[[Notice], None], mountpoint: str, show_names: bool = True,
                 link_state: str = "online", clock: Callable[[], float] = time.monotonic) -> None:
        self._put = put
        self.mountpoint = mountpoint
        self.show_names = show_names
        self._clock = clock
        self._conflicts: list[dict[str, Any]] = []
        self._conflicts_due = 0.0
        self._conflict_next = 0.0
        first = "quiet" if link_state == "offline-by-request" else link_state
        self._link = _Link(announced=first, current=first)
        self._failure: str | None = None
        self._failure_next = 0.0
        self._wake = trio.Event()

    # -- events (trio thread; never block) --------------------------------------------------
    def conflict(self, record: Mapping[str, Any]) -> None:
        if not self._conflicts:
            self._conflicts_due = max(self._clock() + GATHER, self._conflict_next)
        self._conflicts.append(dict(record))
        self._wake.set()

    def link(self, state: str) -> None:
        """The link's new state: ``online``, ``offline`` or ``offline-by-request``."""
        state = "quiet" if state == "offline-by-request" else state
        if state == self._link.current:
            return
        self._link.current, self._link.changed = state, self._clock()
        if state == "quiet":
            self._link.announced = "quiet"  # (its end, back online, is no news either)
        self._wake.set()

    def sync_failed(self, reason: str) -> None:
        now = self._clock()
        if reason == self._failure or now < self._failure_next:
            return
        self._failure, self._failure_next = reason, now + FAILURE_GAP
        self._put(Notice("cachefs: sync failed",
                         f"{self.mountpoint}: {reason if self.show_names else _nameless(reason)}",
                         "transfer.error", urgency=2))

    def sync_ok(self) -> None:
        self._failure = None

    # -- the task --------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            due = self._next_due()
            with trio.move_on_after(max(0.0, due - self._clock()) if due is not None else float("inf")):
                await self._wake.wait()
            self._wake = trio.Event()
            self.flush()

    def _next_due(self) -> float | None:
        times = []
        if self._conflicts:
            times.append(self._conflicts_due)
        link = self._link
        if link.current != link.announced and link.current != "quiet":
            times.append(max(link.changed + LINK_SETTLE, link.next_allowed))
        return min(times) if times else None

    def flush(self) -> None:
        """Hand on what is due now."""
        now = self._clock()
        if self._conflicts and now >= self._conflicts_due:
            found, self._conflicts = self._conflicts, []
            self._conflict_next = now + CONFLICT_GAP
            self._put(self._conflict_notice(found))
        link = self._link
        if link.current != link.announced and link.current != "quiet" \
                and now >= max(link.changed + LINK_SETTLE, link.next_allowed):
            if link.announced == "quiet" and link.current == "online":
                link.announced = "online"  # (back from offline by request: no news)
                return
            link.announced = link.current
            link.gap = LINK_GAP if now - link.last_told >= LINK_CALM else min(LINK_GAP_MAX, link.gap * 2)
            link.last_told, link.next_allowed = now, now + link.gap
            if link.current == "offline":
                self._put(Notice("cachefs: offline", f"{self.mountpoint}: the server does not answer; "
                                 "cached files stay usable, changes wait", "network.disconnected"))
            else:
                self._put(Notice("cachefs: online again", f"{self.mountpoint}: the server answers; "
                                 "changes made meanwhile are sent", "network.connected"))

    def _conflict_notice(self, found: list[dict[str, Any]]) -> Notice:
        count = len(found)
        summary = f"cachefs: {'a new conflict' if count == 1 else f'{count} new conflicts'}"
        if not self.show_names:
            kinds = sorted({str(r.get('kind')) for r in found})
            return Notice(summary, f"{self.mountpoint}: {', '.join(kinds)} (encrypted cache: names "
                          "not shown); see 'cachefs conflicts'", "transfer.error")
        lines = [f"{r.get('path')}: {KIND_TEXT.get(str(r.get('kind')), r.get('kind'))}"
                 for r in found[:NAMES_SHOWN]]
        if count > NAMES_SHOWN:
            lines.append(f"and {count - NAMES_SHOWN} more")
        lines.append(f"in {self.mountpoint}; see 'cachefs conflicts'")
        return Notice(summary, "\n".join(lines), "transfer.error")


def _nameless(reason: str) -> str:
    """A failure told by an encrypted cache: its reason may name a file, so none is
    given (``cachefs status`` shows it, read from the mount, not written anywhere)."""
    return "see 'cachefs status' for the reason (an encrypted cache's notifications name no file)"
