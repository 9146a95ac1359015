"""Checks the WAN model (devtools/wanrelay.py) against small servers in this process:
the delay and the rate it promises, one link shared by every connection, bounded
buffering, and EOF, reset and refusal passed on.

These tests time the relay itself (its model is a timing promise); they run for about
ten seconds in all.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from devtools.wanrelay import WanRelay, parse_duration_ms, parse_rate
from tests.test_proxy import EchoServer

IO_TIMEOUT = 10.0


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def _connect(relay: WanRelay) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _round_trips(sock: socket.socket, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.monotonic()
        sock.sendall(b"?")
        assert sock.recv(16) == b"?"
        times.append(time.monotonic() - started)
    return times


def _echo_transfer(sock: socket.socket, size: int) -> float:
    """Seconds to send ``size`` bytes through the echo server and have them all back."""
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    received = bytearray()
    sender = threading.Thread(target=sock.sendall, args=(data,))
    started = time.monotonic()
    sender.start()
    while len(received) < len(data):
        chunk = sock.recv(1 << 20)
        assert chunk, "the connection ended early"
        received += chunk
    elapsed = time.monotonic() - started
    sender.join(IO_TIMEOUT)
    assert bytes(received) == data
    return elapsed


def test_round_trip_is_the_rtt_set_and_follows_a_live_change(echo: EchoServer) -> None:
    with WanRelay(("127.0.0.1", echo.port), rtt_ms=50, rate_bit=100e6) as relay:
        with _connect(relay) as sock:
            first, *rest = _round_trips(sock, 11)
            # The handshake: the echo server sees the connection 1.5 RTT after the connect.
            assert 0.08 <= first <= 0.13, first
            assert 0.040 <= statistics.median(rest) <= 0.060, rest
            relay.set(rtt_ms=150)
            again = statistics.median(_round_trips(sock, 5))
            assert 0.120 <= again <= 0.180, again


def test_throughput_is_the_rate_set(echo: EchoServer) -> None:
    size = 2_500_000  # 2 s at 10 Mbit/s, each way (the echo makes one link per direction busy)
    with WanRelay(("127.0.0.1", echo.port), rtt_ms=20, rate_bit=10e6) as relay:
        with _connect(relay) as sock:
            _round_trips(sock, 1)
            elapsed = _echo_transfer(sock, size)
        rate = size * 8 / elapsed
        assert 8.5e6 <= rate <= 11.5e6, f"{rate / 1e6:.2f} Mbit/s"
        counters = relay.counters()
    assert counters.up_bytes == counters.down_bytes == size + 1
    assert counters.connections == 1
    assert counters.up_chunks >= size // (16 * 1024)


def test_two_connections_share_one_link(echo: EchoServer) -> None:
    size = 1_250_000  # each: together 2 s at 10 Mbit/s
    with WanRelay(("127.0.0.1", echo.port), rtt_ms=20, rate_bit=10e6) as relay:
        with _connect(relay) as first, _connect(relay) as second:
            _round_trips(first, 1)
            _round_trips(second, 1)
            elapsed: dict[str, float] = {}
            started = time.monotonic()
            threads = [threading.Thread(target=lambda n=n, s=s: elapsed.__setitem__(n, _echo_transfer(s, size)))
                       for n, s in (("first", first), ("second", second))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(IO_TIMEOUT)
            total = time.monotonic() - started
    together = 2 * size * 8 / total
    assert 8.5e6 <= together <= 11.5e6, f"{together / 1e6:.2f} Mbit/s together"
    # Each had about half the link: alone, each would have taken about 1 s.
    for name, seconds in elapsed.items():
        assert seconds >= 0.8 * 2 * size * 8 / 10e6, (name, seconds)


def test_a_sender_whose_receiver_does_not_read_is_held_back() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with WanRelay(listener.getsockname()[:2], rtt_ms=10, rate_bit=None, buffer=64 * 1024) as relay:
            with _connect(relay) as sock:
                target, _ = listener.accept()  # accepted, never read
                with target:
                    sock.setblocking(False)
                    sent = 0
                    deadline = time.monotonic() + 2.0
                    while time.monotonic() < deadline:
                        try:
                            sent += sock.send(b"\0" * 65536)
                        except BlockingIOError:
                            time.sleep(0.05)
                    # The sender is blocked, and the relay holds at most its buffer.
                    in_relay = relay.counters().up_bytes
                    assert sent < 64 * 1024 * 1024
                    assert in_relay < sent
                    time.sleep(0.3)
                    assert relay.counters().up_bytes == in_relay, "the relay went on reading"


def test_a_half_close_is_passed_on_after_the_data(echo: EchoServer) -> None:
    with WanRelay(("127.0.0.1", echo.port), rtt_ms=40, rate_bit=1e6) as relay:
        with _connect(relay) as sock:
            sock.sendall(b"last words")
            sock.shutdown(socket.SHUT_WR)
            received = bytearray()
            while chunk := sock.recv(4096):
                received += chunk
            assert bytes(received) == b"last words"
        deadline = time.monotonic() + IO_TIMEOUT
        while relay.active_connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.active_connections == 0


def test_a_refused_target_ends_the_client_connection() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connecting is refused
        with WanRelay(("127.0.0.1", port), rtt_ms=10, rate_bit=None) as relay:
            with _connect(relay) as sock:
                try:
                    assert sock.recv(16) == b""
                except ConnectionResetError:
                    pass


def test_a_reset_from_the_target_resets_the_client() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with WanRelay(listener.getsockname()[:2], rtt_ms=10, rate_bit=None) as relay:
            with _connect(relay) as sock:
                target, _ = listener.accept()
                target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                target.close()
                with pytest.raises(ConnectionResetError):
                    sock.recv(16)


def test_close_ends_every_connection(echo: EchoServer) -> None:
    relay = WanRelay(("127.0.0.1", echo.port), rtt_ms=10, rate_bit=None)
    with _connect(relay) as sock:
        _round_trips(sock, 1)
        relay.close()
        relay.close()
        with pytest.raises(ConnectionResetError):
            sock.recv(16)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", relay.port), timeout=1).close()


def test_the_command_line_units() -> None:
    assert parse_rate("100mbit") == 100e6
    assert parse_rate("1.5Mbit") == 1.5e6
    assert parse_rate("500kbit") == 500e3
    assert parse_rate("none") is None
    assert parse_duration_ms("50ms") == 50
    assert parse_duration_ms("0.2s") == 200
    assert parse_duration_ms("200") == 200
    with pytest.raises(ValueError):
        parse_rate("fast")
