"""The WebDAV backend's reads (``dav.py``: GETs, and PROPFINDs, which change nothing either)
on plain sockets and the standard library's HTTP answer parser: a small pool of keep-alive
connections, each used by one thread at a time, and several requests pipelined on one
connection (``get_many``).

Why not httpx, which ``DavRemote`` uses for every other request: a 4 KiB GET costs about
0.50 ms of CPU through httpx, 0.10 ms through ``http.client``, 0.04 ms pipelined (measured on
loopback against Apache, 1,000 GETs: 590, 210 and 90 us each, wall clock), and a cold read
of small files is a GET per file. Pipelining (RFC 9112 9.3: a server answers in the order
asked) keeps up to ``WINDOW`` requests on their way; a server that ends the connection
midway (Apache after ``MaxKeepAliveRequests``) gets the rest on a new one; one that leaves
pipelined requests unanswered until the timeout gets no more pipelining (logged once).
An answer is taken only whole: a body shorter than its ``Content-Length`` (a connection cut
midway) is ``http.client.IncompleteRead``, never a short file; interim answers (1xx) are
passed over; a connection with bytes left over after its answers is not used again.

Owns: its connections (at most ``keep`` kept idle, none longer than ``IDLE_MOST``; one the
server closed while idle is dropped before use, and requests whose kept connection turns
out closed before any answer are sent once more on a new one), their socket timeout (every connect, send and receive
bounded by it), the reading of an answer's body.
Must not touch: authentication (the caller gives the header), what a status means (``dav.py``
maps them), anything but its own sockets.
"""
from __future__ import annotations

import http.client
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: an error answer's body is read up to this much (for the connection to be reused), no more
ERROR_BODY_MOST = 64 << 10
CHUNK = 1 << 20
#: requests sent ahead of the answer being read, on one connection
WINDOW = 16
#: a connection idle longer than this is not used again (httpx's keep-alive expiry: a NAT
#: or firewall may have forgotten it without a word)
IDLE_MOST = 30.0
READ_BUFFER = 256 << 10
#: what a kept connection closed by the server meanwhile shows before any answer
_CLOSED_MEANWHILE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                     ConnectionAbortedError)


class Headers(Protocol):
    """An answer's headers, looked up by name in any case (``http.client``'s, httpx's)."""

    def get(self, name: str, /) -> Any: ...


class Answer:
    """An answer as ``dav.py`` reads it: ``status_code``, ``reason_phrase``, ``headers``
    and the bytes taken of its body (``body``)."""

    __slots__ = ("status_code", "reason_phrase", "headers", "body")

    def __init__(self, status_code: int, reason_phrase: str, headers: Headers, body: bytes) -> None:
        self.status_code = status_code
        self.reason_phrase = reason_phrase
        self.headers = headers
        self.body = body


class GetterClosed(Exception):
    """``Getter.close`` was called: no more requests."""


class Request:
    """One GET: its target (path and query, percent-encoded), headers, and the part of the
    file wanted (``offset``, ``length``: see ``Getter.get``); or another request that reads
    (``method``: PROPFIND), with its ``body``, whose answer's body is taken whole."""

    __slots__ = ("target", "headers", "offset", "length", "method", "body")

    def __init__(self, target: str, headers: dict[str, str], offset: int = 0, length: int = 0,
                 method: str = "GET", body: bytes = b"") -> None:
        self.target = target
        self.headers = headers
        self.offset = offset
        self.length = length
        self.method = method
        self.body = body


class Getter:
    """Requests that read (GET, PROPFIND) on keep-alive connections to one server
    (``context``: https with it)."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None, timeout: float,
                 keep: int) -> None:
        self._host = host
        self._port = port
        self._context = context
        self._timeout = timeout
        self._keep = max(1, keep)
        self._host_header = (f"[{host}]" if ":" in host else host) + f":{port}"
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._closed = False
        #: requests sent ahead on a connection (1 once the server left some unanswered)
        self.window = WINDOW

    def get(self, request: Request) -> Answer:
        """One request. Of a GET's 206 answer the body (at most ``length`` bytes); of a 200 answer
        (the whole file: a server that ignores ``Range``) the ``length`` bytes from
        ``offset``; of another request's 2xx the whole body; of any other the body up to
        ``ERROR_BODY_MOST``. What is not read of a
        body is not drained: the connection is closed instead. Raises ``OSError``
        (``TimeoutError``: no byte within the timeout; ``ssl.SSLError``),
        ``http.client.HTTPException`` or ``GetterClosed``."""
        answer = self.get_many([request])[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def get_many(self, requests: list[Request]) -> list[Answer | BaseException]:
        """Requests pipelined on one connection, their answers in order (each as ``get`` gives
        it). Those the server ends the connection before (``Connection: close``, or closed
        without a word): sent again on a new one. Answers that stop coming midway (no byte
        within the timeout): the rest sent again one at a time on a new connection, and if
        that one answers, the server is taken to leave pipelined requests unanswered (one
        at a time from then on, logged once). A failure with nothing answered is that
        request's and the rest's: not tried again (a silent link costs one timeout, or two
        where it fell silent midway through a pipeline). ``GetterClosed`` is raised."""
        out: list[Answer | BaseException] = []
        window = self.window
        doubted = False  # (answers stopped midway: the rest go one at a time)
        while len(out) < len(requests):
            before = len(out)
            try:
                conn, reused = self._take()
            except (OSError, http.client.HTTPException) as exc:
                out.extend(exc for _ in requests[before:])
                break
            failed: OSError | http.client.HTTPException | None = None
            try:
                self._pipeline(conn, requests[before:], out, window)
            except (OSError, http.client.HTTPException) as exc:
                failed = exc
            finally:  # (whatever escapes: the connection is dropped)
                self._give_back(conn, reusable=failed is None and conn.clean and len(out) == len(requests))
            if doubted and len(out) > before and self.window > 1:
                self.window = 1
                log.warning("the server leaves pipelined requests unanswered: one request at a "
                            "time from now on")
            if failed is None:
                continue
            if isinstance(failed, TimeoutError):
                if len(out) > before and window > 1:
                    window, doubted = 1, True
                    continue
            elif len(out) > before or (reused and isinstance(failed, _CLOSED_MEANWHILE)):
                continue  # (ended midway, or an idle connection the server had ended)
            out.extend(failed for _ in requests[len(out):])
            break
        return out

    def _pipeline(self, conn: _Connection, requests: list[Request], out: list[Answer | BaseException],
                  window: int) -> None:
        """Answers of ``requests`` sent on ``conn`` (``window`` ahead), appended to ``out``
        as they come; stops early (``conn.clean`` False) where the server says it closes
        the connection."""
        sent = min(window, len(requests))
        conn.send(b"".join(self._encode(r) for r in requests[:sent]))
        for request in requests:
            out.append(conn.answer(request))
            if not conn.clean:
                return
            if sent < len(requests):
                conn.send(self._encode(requests[sent]))
                sent += 1
        if conn.reader.buffered():  # (answers no request was for: never used again)
            conn.clean = False

    def _encode(self, request: Request) -> bytes:
        lines = [f"{request.method} {request.target} HTTP/1.1", f"Host: {self._host_header}"]
        if request.body:
            lines.append(f"Content-Length: {len(request.body)}")
        for name, value in request.headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise http.client.InvalidURL(f"a line break in the header {name!r}")
            lines.append(f"{name}: {value}")
        if any(c in request.target for c in " \r\n"):
            raise http.client.InvalidURL("a space or line break in the target")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body

    def _take(self) -> tuple[_Connection, bool]:
        with self._lock:
            if self._closed:
                raise GetterClosed()
            now = time.monotonic()
            while self._idle:
                conn = self._idle.pop()
                if now - conn.idle_since < IDLE_MOST and conn.still_open():
                    self._busy.add(conn)
                    return conn, True
                conn.close()
        conn = _Connection(self._host, self._port, self._context, self._timeout)  # (outside the lock)
        with self._lock:
            if self._closed:
                conn.close()
                raise GetterClosed()
            self._busy.add(conn)
        return conn, False

    def _give_back(self, conn: _Connection, reusable: bool) -> None:
        with self._lock:
            self._busy.discard(conn)
            if reusable and not self._closed and len(self._idle) < self._keep:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """No more requests; idle connections closed, those in use shut down (their
        requests fail at once rather than wait out their timeout)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = list(self._busy)
        for conn in idle:
            conn.close()
        for conn in busy:
            conn.shut_down()


class _Reader:
    """A connection's buffered reader, shared by its answers (``http.client.HTTPResponse``
    reads a status line and headers by ``readline``, a body by ``read`` or ``readinto``):
    unlike ``io.BufferedReader`` it tells how many bytes it holds (``buffered``), and an
    answer read to its end does not close it (``close``: nothing; ``really_close``)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()

    def buffered(self) -> int:
        return len(self._buf)

    def _fill(self) -> bool:
        data = self._sock.recv(READ_BUFFER)
        if not data:
            return False
        self._buf += data
        return True

    def readline(self, limit: int = -1) -> bytes:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0 or (0 <= limit <= len(self._buf)) or not self._fill():
                break
        if end < 0:
            end = len(self._buf) - 1
        end = end + 1 if limit < 0 else min(end + 1, limit)
        line = bytes(self._buf[:end])
        del self._buf[:end]
        return line

    def read(self, size: int | None = -1) -> bytearray:
        """Up to ``size`` bytes (all until the end: None or negative), as one ``bytearray``
        copied once: from the buffer, or a large body received straight into it."""
        if size is None or size < 0:
            while self._fill():
                pass
            size = len(self._buf)
        if len(self._buf) >= size:
            data = self._buf[:size]
            del self._buf[:size]
            return data
        out = bytearray(size)
        with memoryview(out) as view:
            got = len(self._buf)
            view[:got] = self._buf
            self._buf.clear()
            while got < size:
                n = self._sock.recv_into(view[got:])
                if not n:
                    break
                got += n
        del out[got:]
        return out

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def peek(self, size: int = 0) -> bytes:
        if not self._buf:
            self._fill()
        return bytes(self._buf)

    def read1(self, size: int = -1) -> bytearray:
        if not self._buf:
            self._fill()
        size = len(self._buf) if size < 0 else min(size, len(self._buf))
        return self.read(size)

    def close(self) -> None:
        pass

    def really_close(self) -> None:
        self._buf = bytearray()


class _Source:
    """What ``http.client.HTTPResponse`` reads from: the connection's one reader."""

    def __init__(self, reader: _Reader) -> None:
        self._reader = reader

    def makefile(self, *_args: Any, **_kwargs: Any) -> _Reader:
        return self._reader


class _Connection:
    """One TCP (TLS) connection: requests written to it, answers parsed from its reader."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None, timeout: float) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.reader = _Reader(sock)
        self.source = _Source(self.reader)
        #: every answer so far read to its end, and none said it closes the connection
        self.clean = True
        self.idle_since = 0.0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self, request: Request) -> Answer:
        """The answer to ``request``, the next on this connection (interim ones passed
        over); its body as ``Getter.get`` says, whole or ``IncompleteRead``."""
        while True:
            response = http.client.HTTPResponse(self.source, method=request.method)  # type: ignore[arg-type]
            response.begin()
            if not 100 <= response.status < 200:
                break
            if response.status == 101:  # (no protocol switch was asked for)
                raise http.client.HTTPException("the server switched protocols unasked")
        status = response.status
        promised = response.length  # (None: chunked, or until the connection ends)
        if request.method != "GET" and 200 <= status < 300:
            want = promised or 0
            body = response.read()  # (chunked: a cut one is IncompleteRead)
        elif status == 206:
            want = request.length if promised is None else min(request.length, promised)
            body = response.read(want)
        elif status == 200:
            want = request.length if promised is None else max(0, min(request.length, promised - request.offset))
            body = take(iter(lambda: response.read(CHUNK), b""), request.offset, request.length)
        else:
            want = 0
            body = response.read(ERROR_BODY_MOST)
        if len(body) < want and promised is not None:
            raise http.client.IncompleteRead(body, want - len(body))  # (cut midway: not the end)
        if not response.isclosed() or response.will_close:
            self.clean = False
        return Answer(status, response.reason, response.msg, body)

    def still_open(self) -> bool:
        """An idle connection readable (the server closed it, or sent what was not asked
        for) is not reused."""
        if self.reader.buffered():
            return False
        try:
            readable, _w, _x = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def shut_down(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # (wakes a thread blocked in recv)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.reader.really_close()
        finally:
            self.sock.close()


def take(chunks: Iterator[bytes], skip: int, length: int) -> bytes:
    """``length`` bytes after the first ``skip`` of the stream ``chunks``: what a whole-file
    answer to a ranged GET gives of the range (the rest of the stream is not read)."""
    pieces: list[bytes] = []
    left = length
    for chunk in chunks:
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        piece = chunk[skip:skip + left]
        skip = 0
        pieces.append(piece)
        left -= len(piece)
        if left <= 0:
            break
    return b"".join(pieces)
