"""Checks the test proxy itself (tests/fixtures/proxy.py) against a tiny echo server.

Each test is quick: the longest waits are the short "nothing arrives" windows.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.fixtures.proxy import TcpProxy

QUIET_WINDOW = 0.3  # how long "no byte arrives" is watched for
IO_TIMEOUT = 3.0


class EchoServer:
    """Echoes every byte back on each connection; ends its threads at close()."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._clients: list[socket.socket] = []
        self.connections = 0
        accept_thread = threading.Thread(target=self._accept_loop, name="echo-accept")
        accept_thread.start()
        self._threads.append(accept_thread)

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            client.settimeout(0.05)
            self._clients.append(client)
            thread = threading.Thread(target=self._echo, args=(client,), name="echo-conn")
            thread.start()
            self._threads.append(thread)

    def _echo(self, client: socket.socket) -> None:
        with client:
            while not self._closing.is_set():
                try:
                    data = client.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                try:
                    client.sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(5)
        assert not any(t.is_alive() for t in self._threads), "echo server threads did not end"


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", echo.port) as tcp_proxy:
        yield tcp_proxy


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    return sock


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        data = sock.recv(size - len(chunks))
        if not data:
            raise AssertionError(f"connection closed after {len(chunks)} of {size} bytes")
        chunks += data
    return bytes(chunks)


def assert_nothing_arrives(sock: socket.socket) -> None:
    sock.settimeout(QUIET_WINDOW)
    with pytest.raises(TimeoutError):
        data = sock.recv(100)
        raise AssertionError(f"expected silence, received {data!r}")
    sock.settimeout(IO_TIMEOUT)


def wait_until(condition: object, timeout: float = IO_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def proxy_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("TcpProxy-")]


def test_forwards_both_ways(proxy: TcpProxy) -> None:
    with connect(proxy.port) as sock:
        sock.sendall(b"hello")
        assert receive_exactly(sock, 5) == b"hello"


def test_forwards_a_large_transfer_intact(proxy: TcpProxy) -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB: more than every buffer on the way
    with connect(proxy.port) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        echoed = receive_exactly(sock, len(payload))
        sender.join(IO_TIMEOUT)
    assert echoed == payload


def test_passes_half_close_on(proxy: TcpProxy) -> None:
    with connect(proxy.port) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert receive_exactly(sock, 10) == b"last words"
        assert sock.recv(100) == b""  # the echo server closed after our FIN reached it


def test_stall_holds_bytes_on_open_connections_until_resume(proxy: TcpProxy) -> None:
    with connect(proxy.port) as sock:
        sock.sendall(b"before")
        assert receive_exactly(sock, 6) == b"before"
        proxy.stall()
        sock.sendall(b"during")
        assert_nothing_arrives(sock)
        assert proxy.active_connections == 1  # still open: no FIN, no RST
        proxy.resume()
        assert receive_exactly(sock, 6) == b"during"


def test_stall_lets_new_connections_in_but_carries_no_data(
    proxy: TcpProxy, echo: EchoServer
) -> None:
    proxy.stall()
    with connect(proxy.port) as sock:
        sock.sendall(b"knock")
        assert_nothing_arrives(sock)
        assert echo.connections == 0  # nothing reached the server
        proxy.resume()
        assert receive_exactly(sock, 5) == b"knock"


def test_cut_resets_connections_and_refuses_new_ones_until_resume(proxy: TcpProxy) -> None:
    with connect(proxy.port) as sock:
        sock.sendall(b"ping")
        assert receive_exactly(sock, 4) == b"ping"
        proxy.cut()
        with pytest.raises(ConnectionResetError):
            sock.recv(100)
    with pytest.raises(ConnectionRefusedError):
        connect(proxy.port)
    wait_until(lambda: proxy.active_connections == 0)
    proxy.resume()
    with connect(proxy.port) as sock:
        sock.sendall(b"again")
        assert receive_exactly(sock, 5) == b"again"


def test_cut_while_stalled_resets_too(proxy: TcpProxy) -> None:
    with connect(proxy.port) as sock:
        proxy.stall()
        sock.sendall(b"lost")
        proxy.cut()
        with pytest.raises(ConnectionResetError):
            sock.recv(100)


def test_unreachable_target_resets_the_client(echo: EchoServer) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        dead_port = placeholder.getsockname()[1]  # bound, never listening: refused
        with TcpProxy("127.0.0.1", dead_port) as tcp_proxy:
            # The reset may beat the end of connect() or come at the first read.
            with pytest.raises(ConnectionResetError):
                with connect(tcp_proxy.port) as sock:
                    data = sock.recv(100)
                    raise AssertionError(f"expected a reset, got {data!r}")


def test_close_ends_every_thread_and_connection(echo: EchoServer) -> None:
    assert proxy_threads() == []
    tcp_proxy = TcpProxy("127.0.0.1", echo.port)
    open_socket = connect(tcp_proxy.port)
    open_socket.sendall(b"x")
    assert receive_exactly(open_socket, 1) == b"x"
    tcp_proxy.stall()
    stalled_socket = connect(tcp_proxy.port)
    wait_until(lambda: tcp_proxy.accepted_connections == 2)
    tcp_proxy.close()
    tcp_proxy.close()  # idempotent
    assert proxy_threads() == []
    for sock in (open_socket, stalled_socket):
        with sock, pytest.raises(ConnectionResetError):
            sock.recv(100)
    with pytest.raises(RuntimeError):
        tcp_proxy.resume()
