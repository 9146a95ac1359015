"""A user-space TCP relay that models a WAN link: delay and a rate cap, shared by every
connection, for benchmarks and tests on a kernel without netem.

Owns: one listening socket on 127.0.0.1, per accepted connection a client socket and an
upstream socket to the target, and one thread that moves every byte (a selector loop).
Must not touch: anything else; it runs inside the process that made it and stops at
``close()``.

The model (payload bytes only: no per-packet headers, no loss, no slow start):

- Two links, one per direction (``up``: client to target, ``down``: target to client),
  each shared by ALL connections. A chunk read from a socket at ``now`` leaves at
  ``departure = max(now, link_free_at) + len(chunk) * 8 / rate`` (the link is then busy
  until ``departure``) and arrives ``rtt / 2`` later. Chunks queue on a link in the order
  they were read, whatever their connection: a bulk transfer delays another connection's
  small request as a router's queue would.
- Per connection and direction, chunks are delivered in order, none before its arrival.
- Bounded buffering: a socket is not read while this connection already has ``buffer``
  bytes of that direction in the relay (in the queue or "on the wire"), so the sender's
  TCP back-pressure works. The default ``buffer`` is one bandwidth-delay product
  (``rate * rtt``, what a TCP window needs to fill the link) and at least 256 KiB; the
  part of it beyond ``rate * rtt / 2`` sits queued before the link (a modest bufferbloat).
- The TCP handshake: the target sees the connection 1.5 RTT after the client connected
  (SYN, SYN-ACK, ACK), so a client's first bytes reach it no sooner, and the target's
  first bytes (an SSH banner) reach the client 2 RTT after its connect, as on a real link.
- A half-close (EOF) travels like a zero-length chunk and is passed on with
  ``shutdown(SHUT_WR)`` once everything before it was delivered; a reset (an error on
  either socket) resets both sides at once.

``set(rtt_ms=, rate_bit=)`` changes the link live (chunks already scheduled keep their
times). ``counters()`` returns, per direction, the bytes and chunks (successful
``recv`` calls: about one per write of the sender when the link is idle) that went onto
the link, and the connections accepted: what a benchmark reads to tell a server's cost.

    with WanRelay(target=("127.0.0.1", 2222), rtt_ms=50, rate_bit=100e6) as relay:
        ... connect to 127.0.0.1:relay.port ...

    python -m devtools.wanrelay --to 127.0.0.1:2222 --rtt 50ms --rate 100mbit [--port 2223]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import errno
import logging
import re
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Set as AbstractSet
from types import TracebackType

log = logging.getLogger(__name__)

UP = "up"  # client -> target
DOWN = "down"  # target -> client
CHUNK = 16 * 1024  # the largest chunk one recv takes: the link's scheduling grain
MIN_BUFFER = 256 * 1024
_READS_PER_WAKE = 16  # chunks read from one socket before the loop looks at the others
_CONNECT_TIMEOUT = 5.0
_JOIN_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True)
class Counters:
    """What went onto the links since the relay started (or since ``reset_counters``)."""

    up_bytes: int = 0
    up_chunks: int = 0
    down_bytes: int = 0
    down_chunks: int = 0
    connections: int = 0

    def __sub__(self, other: Counters) -> Counters:
        return Counters(*(a - b for a, b in zip(dataclasses.astuple(self),
                                                  dataclasses.astuple(other))))


class _Link:
    """One direction's shared link: when it is free again, and what went onto it."""

    def __init__(self) -> None:
        self.free_at = 0.0
        self.bytes = 0
        self.chunks = 0

    def schedule(self, now: float, size: int, rate_bit: float | None, delay: float) -> float:
        """The arrival time of ``size`` bytes put on the link at ``now``."""
        start = max(now, self.free_at)
        departure = start + (size * 8 / rate_bit if rate_bit else 0.0)
        self.free_at = departure
        return departure + delay


def _reset_and_close(sock: socket.socket) -> None:
    """Close ``sock`` so that its peer gets an RST instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Direction:
    """One direction of one connection: the chunks on their way and where they go."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()  # None: EOF
        self.queued = 0  # bytes in the queue
        self.sent_head = 0  # bytes of the queue's first chunk already written
        self.last_arrival = 0.0
        self.eof_read = False  # the source said EOF (queued as a None chunk)
        self.eof_passed = False  # ... and it was passed on

    def next_arrival(self) -> float | None:
        return self.queue[0][0] if self.queue else None


class _Connection:
    """A client socket, its upstream socket (dialled after the modelled handshake), and
    the two directions between them. Driven only by the relay's loop thread."""

    def __init__(self, client: socket.socket, dial_at: float, number: int) -> None:
        self.number = number
        self.client = client
        self.upstream: socket.socket | None = None
        self.dial_at = dial_at
        self.directions = {UP: _Direction(UP), DOWN: _Direction(DOWN)}
        self.closed = False

    def source(self, direction: str) -> socket.socket | None:
        return self.client if direction == UP else self.upstream

    def destination(self, direction: str) -> socket.socket | None:
        return self.upstream if direction == UP else self.client

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.upstream) if s is not None]


class WanRelay:
    """Forwards 127.0.0.1:``port`` to ``target`` through a modelled WAN link (see the
    module docstring). ``rate_bit`` None or 0: no rate cap; ``buffer``: bytes one
    connection may have in the relay per direction (None: from the link, see above)."""

    def __init__(self, target: tuple[str, int], rtt_ms: float = 50.0,
                 rate_bit: float | None = 100e6, port: int = 0,
                 buffer: int | None = None) -> None:
        self.target = target
        self._lock = threading.Lock()  # guards the settings and the counters
        self._rtt = 0.0
        self._rate_bit: float | None = None
        self._fixed_buffer = buffer
        self._buffer = MIN_BUFFER
        self._set_locked(rtt_ms, rate_bit)
        self._links = {UP: _Link(), DOWN: _Link()}
        self._accepted = 0
        self._connections: list[_Connection] = []
        self._closing = False
        self._selector = selectors.DefaultSelector()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name=f"WanRelay-{self.port}",
                                        daemon=True)
        self._thread.start()

    # -- the public surface --------------------------------------------------------------

    @property
    def rtt_ms(self) -> float:
        return self._rtt * 1000

    @property
    def rate_bit(self) -> float | None:
        return self._rate_bit

    def set(self, rtt_ms: float | None = None, rate_bit: float | None = None,
            unlimited: bool = False) -> None:
        """Change the link live. ``rate_bit`` None keeps the rate; ``unlimited`` lifts it."""
        with self._lock:
            self._set_locked(self.rtt_ms if rtt_ms is None else rtt_ms,
                             None if unlimited else (self._rate_bit if rate_bit is None else rate_bit))
        self._wake()

    def counters(self) -> Counters:
        with self._lock:
            return Counters(self._links[UP].bytes, self._links[UP].chunks,
                            self._links[DOWN].bytes, self._links[DOWN].chunks, self._accepted)

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def close(self) -> None:
        """Stop listening, reset every connection and end the thread. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._wake()
        self._thread.join(_JOIN_TIMEOUT)
        if self._thread.is_alive():
            raise RuntimeError(f"the WanRelay thread did not end within {_JOIN_TIMEOUT} s")

    def __enter__(self) -> WanRelay:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        rate = f"{self._rate_bit / 1e6:g} Mbit/s" if self._rate_bit else "no rate cap"
        return (f"WanRelay(127.0.0.1:{self.port} -> {self.target[0]}:{self.target[1]}, "
                f"{self.rtt_ms:g} ms RTT, {rate})")

    # -- internals -----------------------------------------------------------------------

    def _set_locked(self, rtt_ms: float, rate_bit: float | None) -> None:
        if rtt_ms < 0 or (rate_bit is not None and rate_bit < 0):
            raise ValueError("the RTT and the rate cannot be negative")
        self._rtt = rtt_ms / 1000
        self._rate_bit = rate_bit or None
        if self._fixed_buffer is not None:
            self._buffer = self._fixed_buffer
        elif self._rate_bit:
            self._buffer = max(MIN_BUFFER, int(self._rate_bit / 8 * self._rtt))
        else:
            self._buffer = 4 * MIN_BUFFER

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def _run(self) -> None:
        try:
            while not self._closing:
                self._step()
        except Exception:  # a bug here must show, and must not leave sockets behind
            log.exception("WanRelay loop failed")
        finally:
            self._shut_down()

    def _step(self) -> None:
        now = time.monotonic()
        wake_at: float | None = None
        for connection in self._connections:
            for when in self._wake_times(connection, now):
                wake_at = when if wake_at is None else min(wake_at, when)
            self._register(connection)
        timeout = None if wake_at is None else max(0.0, wake_at - now)
        ready = self._selector.select(timeout)
        readable: set[socket.socket] = set()
        for key, events in ready:
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is self._wake_r:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
            elif sock is self._listener:
                self._accept()
            elif events & selectors.EVENT_READ:
                readable.add(sock)
        now = time.monotonic()
        for connection in list(self._connections):
            self._service(connection, now, readable)

    def _wake_times(self, connection: _Connection, now: float) -> list[float]:
        """When the loop must look at ``connection`` again without a socket event."""
        times = []
        if connection.upstream is None:
            times.append(connection.dial_at)
            return times
        for direction in connection.directions.values():
            arrival = direction.next_arrival()
            if arrival is not None and arrival > now:
                times.append(arrival)
        return times

    def _register(self, connection: _Connection) -> None:
        """Ask the selector for exactly the events this connection can act on now."""
        now = time.monotonic()
        masks = {sock: 0 for sock in connection.sockets()}
        for name, direction in connection.directions.items():
            source = connection.source(name)
            if source is not None and not direction.eof_read and direction.queued < self._buffer:
                masks[source] |= selectors.EVENT_READ
            destination = connection.destination(name)
            arrival = direction.next_arrival()
            if destination is not None and arrival is not None and arrival <= now:
                masks[destination] |= selectors.EVENT_WRITE
        for sock, mask in masks.items():
            try:
                events: int | None = self._selector.get_key(sock).events
            except KeyError:
                events = None
            if events == mask or (events is None and not mask):
                continue
            if events is None:
                self._selector.register(sock, mask)
            elif mask:
                self._selector.modify(sock, mask)
            else:
                self._selector.unregister(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.debug("WanRelay accept failed: %s", error)
                return
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._accepted += 1
                number = self._accepted
                connection = _Connection(client, time.monotonic() + 1.5 * self._rtt, number)
                self._connections.append(connection)

    def _dial(self, connection: _Connection) -> bool:
        try:
            upstream = socket.create_connection(self.target, timeout=_CONNECT_TIMEOUT)
        except OSError as error:
            log.debug("WanRelay: the target refused connection %d (%s)", connection.number, error)
            self._drop(connection, reset=True)
            return False
        upstream.setblocking(False)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.upstream = upstream
        return True

    def _service(self, connection: _Connection, now: float, readable: AbstractSet[socket.socket]) -> None:
        if connection.upstream is None:
            if now < connection.dial_at or not self._dial(connection):
                # Not dialled yet: still take the client's first bytes (they wait for it).
                if connection.upstream is None and not connection.closed and connection.client in readable:
                    self._read(connection, UP, now)
                return
        for name in (UP, DOWN):
            source = connection.source(name)
            if source is not None and source in readable and not self._read(connection, name, now):
                return
        for name in (UP, DOWN):
            if not self._deliver(connection, name, time.monotonic()):
                return
        up, down = connection.directions[UP], connection.directions[DOWN]
        if up.eof_passed and down.eof_passed:
            self._drop(connection, reset=False)

    def _read(self, connection: _Connection, name: str, now: float) -> bool:
        """Take what the source has (up to the buffer); False when the connection ended."""
        direction = connection.directions[name]
        source = connection.source(name)
        assert source is not None
        link = self._links[name]
        for _ in range(_READS_PER_WAKE):
            if direction.eof_read or direction.queued >= self._buffer:
                return True
            try:
                data = source.recv(CHUNK)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as error:
                log.debug("WanRelay connection %d: %s side failed (%s)", connection.number,
                          "client" if name == UP else "target", error)
                self._drop(connection, reset=True)
                return False
            with self._lock:
                arrival = link.schedule(now, len(data), self._rate_bit, self._rtt / 2)
                if data:
                    link.bytes += len(data)
                    link.chunks += 1
            arrival = max(arrival, direction.last_arrival)  # in order even after a set()
            direction.last_arrival = arrival
            if not data:
                direction.eof_read = True
                direction.queue.append((arrival, None))
                return True
            direction.queue.append((arrival, data))
            direction.queued += len(data)
        return True

    def _deliver(self, connection: _Connection, name: str, now: float) -> bool:
        """Write what has arrived; False when the connection ended."""
        direction = connection.directions[name]
        destination = connection.destination(name)
        if destination is None:
            return True
        while direction.queue and direction.queue[0][0] <= now:
            data = direction.queue[0][1]
            if data is None:
                try:
                    destination.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                direction.queue.popleft()
                direction.eof_passed = True
                continue
            try:
                sent = destination.send(memoryview(data)[direction.sent_head:])
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as error:
                if error.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    log.debug("WanRelay connection %d: write failed (%s)", connection.number, error)
                self._drop(connection, reset=True)
                return False
            direction.sent_head += sent
            if direction.sent_head < len(data):
                return True
            direction.queue.popleft()
            direction.queued -= len(data)
            direction.sent_head = 0
        return True

    def _drop(self, connection: _Connection, reset: bool) -> None:
        if connection.closed:
            return
        connection.closed = True
        for sock in connection.sockets():
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            if reset:
                _reset_and_close(sock)
            else:
                sock.close()
        with self._lock:
            self._connections.remove(connection)

    def _shut_down(self) -> None:
        for connection in list(self._connections):
            self._drop(connection, reset=True)
        for sock in (self._listener, self._wake_r, self._wake_w):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        self._selector.close()


# -- the command line ------------------------------------------------------------------------

_RATE_UNITS = {"": 1.0, "bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9,
               "bps": 1.0, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}


def parse_rate(text: str) -> float | None:
    """'100mbit', '10Mbit', '500kbit', '1.5gbit', '0' or 'none' (no cap): bits a second."""
    lowered = text.strip().lower()
    if lowered in ("0", "none", "unlimited"):
        return None
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", lowered)
    if not match or match.group(2) not in _RATE_UNITS:
        raise ValueError(f"not a rate: {text!r} (say e.g. 100mbit, 500kbit)")
    return float(match.group(1)) * _RATE_UNITS[match.group(2)]


def parse_duration_ms(text: str) -> float:
    """'50ms', '0.2s', '200' (milliseconds): milliseconds."""
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(ms|s|)", text.strip().lower())
    if not match:
        raise ValueError(f"not a duration: {text!r} (say e.g. 50ms, 0.2s)")
    value = float(match.group(1))
    return value * 1000 if match.group(2) == "s" else value


def _parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.wanrelay",
                                     description="A delaying, rate-capped TCP relay (a WAN model).")
    parser.add_argument("--to", required=True, help="the target, HOST:PORT")
    parser.add_argument("--rtt", default="50ms", help="round-trip time (default 50ms)")
    parser.add_argument("--rate", default="100mbit", help="rate per direction (default 100mbit; 0: none)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any free one)")
    parser.add_argument("--every", type=float, default=0.0,
                        help="print the counters every this many seconds (default: only at the end)")
    args = parser.parse_args(argv)
    try:
        target = _parse_target(args.to)
        rtt_ms, rate = parse_duration_ms(args.rtt), parse_rate(args.rate)
    except ValueError as error:
        parser.error(str(error))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    with WanRelay(target, rtt_ms=rtt_ms, rate_bit=rate, port=args.port) as relay:
        print(f"{relay}: listening on 127.0.0.1:{relay.port}", flush=True)
        printed = time.monotonic()
        while not stop.wait(0.5):
            if args.every and time.monotonic() - printed >= args.every:
                printed = time.monotonic()
                print(relay.counters(), flush=True)
        print(relay.counters(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
