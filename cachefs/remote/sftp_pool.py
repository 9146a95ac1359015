"""SSH connections to one server, each with its SFTP session, in a small pool.

Owns: opening a connection (socket or ProxyCommand, the SSH handshake with the preferred
algorithms, host key check, authentication, the SFTP subsystem), the pool of them, and the
translation of a failed call into ``RemoteError``/``RemoteUnreachable``.
Must not touch: share paths and the requests themselves (``sftp``, ``sftp_session``), the
cache, trio.

Threading: up to ``options.connections`` connections, each its own TCP socket,
``Transport`` and ``SftpSession``. A call checks one connection out for its whole duration,
so no session is ever used by two threads at once (paramiko's client is not safe for
that). Any transport failure (socket error, EOF, SSH error, timeout) closes that connection
and every idle one (they are probably dead too) and raises ``RemoteUnreachable``; the next
call reconnects. A read-only call that found a pooled connection already dead (reset or
EOF, not a timeout) is retried once on a fresh one, so that a server restart costs no
spurious "offline". One lock (a ``Condition``) guards the pool's counts and idle list; it
is never held while talking to the server.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import paramiko

from .base import ContentDamaged, RemoteError, RemoteRefused, RemoteUnreachable
from .options import ConnectOptions
from .sftp_session import SftpSession, StatusError
from .ssh_auth import authenticate
from .ssh_config import SshTarget
from .ssh_hostkeys import check_host_key, known_keys, prefer_known_key_types

log = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL_WINDOW = 8 * 1024 * 1024  # SSH channel window: must exceed the read window in flight
CHANNEL_MAX_PACKET = 32768  # largest SSH data packet we ask the server to send
#: Ciphers and MACs put first, best first; the rest of paramiko's list stays acceptable
#: after them. AES-GCM needs no separate MAC, which paramiko computes in Python per
#: packet (measured: a quarter faster than aes128-ctr with hmac-sha2-256); where the
#: server has no GCM, encrypt-then-MAC (also the safer construction).
PREFERRED_CIPHERS: tuple[str, ...] = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
PREFERRED_MACS: tuple[str, ...] = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com")

#: how long a login made ahead (``log_in``) may wait for someone to type (sshd's own
#: LoginGraceTime, 2 minutes by default, ends it sooner)
LOGIN_WAIT = 600.0
# Exceptions that mean the connection is broken (socket.timeout is an OSError).
TRANSPORT_ERRORS = (OSError, EOFError, paramiko.SSHException, paramiko.SFTPError)


@dataclass
class Connection:
    transport: paramiko.Transport
    sftp: SftpSession
    number: int

    def alive(self) -> bool:
        return self.transport.is_active() and not self.sftp.sock.closed

    def close(self) -> None:
        try:
            self.sftp.close()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            log.debug("closing sftp session %d: %s", self.number, exc)
        self.transport.close()


def _prefer_algorithms(transport: paramiko.Transport) -> None:
    """Put the fast ciphers and MACs first; what else paramiko offers stays acceptable."""
    options = transport.get_security_options()
    ciphers = _put_first(PREFERRED_CIPHERS, options.ciphers)
    if ciphers is not None:
        options.ciphers = ciphers
    digests = _put_first(PREFERRED_MACS, options.digests)
    if digests is not None:
        options.digests = digests


def _put_first(preferred: tuple[str, ...], offered: Sequence[str]) -> list[str] | None:
    """``offered`` with those of ``preferred`` it has put first, in that order; None if none."""
    first = [name for name in preferred if name in offered]
    if not first:
        return None
    return first + [name for name in offered if name not in first]


class SftpPool:
    """Connections to ``target``, opened on demand and kept while they work.

    ``on_open`` runs on each new session before its first use (the backend finds the
    share's root with the first one); what it raises fails that checkout."""

    def __init__(self, target: SshTarget, options: ConnectOptions, description: str,
                 on_open: Callable[[SftpSession], None]) -> None:
        self.target = target
        self.options = options
        self.timeout = options.timeout
        self.description = description
        self._on_open = on_open
        self._lock = threading.Condition()
        self._idle: list[Connection] = []
        self._open = 0
        self._numbers = 0
        self._closed = False

    # -- opening a connection -------------------------------------------------------
    def _open_socket(self) -> socket.socket | paramiko.ProxyCommand:
        target = self.target
        if target.proxy_command:
            try:
                proxy = paramiko.ProxyCommand(target.proxy_command)
            except (OSError, paramiko.SSHException) as exc:
                raise RemoteUnreachable(f"{self.description}: ProxyCommand failed: {exc}") from exc
            proxy.settimeout(self.timeout)
            return proxy
        try:
            sock = socket.create_connection((target.host, target.port), timeout=target.connect_timeout)
        except OSError as exc:
            raise RemoteUnreachable(f"cannot connect to {target.host_label}:{target.port}: {exc}") from exc
        # Pipelined reads send many small READ requests: with Nagle's algorithm each waits
        # for the ACK of the one before (a delayed ACK), which cut reads to a third.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            log.debug("%s: TCP_NODELAY not set: %s", self.description, exc)
        return sock

    def log_in(self) -> None:
        """Connect and log in once, then close: within ``Secrets.asking`` what is missing
        is asked for (someone types: the login may take minutes), and remembered for every
        connection after. ``RemoteRefused``/``RemoteUnreachable`` as for any connection."""
        transport = self._open_transport(LOGIN_WAIT)
        try:
            self._log_in(transport)
        except TRANSPORT_ERRORS as exc:
            raise RemoteUnreachable(f"{self.description}: connection failed: {exc or type(exc).__name__}") from exc
        finally:
            transport.close()

    def _open_transport(self, auth_wait: float) -> paramiko.Transport:
        transport = paramiko.Transport(self._open_socket())
        transport.banner_timeout = self.timeout
        transport.handshake_timeout = self.timeout
        transport.auth_timeout = auth_wait
        return transport

    def _open_connection(self) -> Connection:
        transport = self._open_transport(self.timeout)
        # paramiko waits without limit in a few places (subsystem start): a watchdog
        # closes the transport if setting up takes longer than the timeout.
        watchdog = threading.Timer(max(self.timeout, self.target.connect_timeout), transport.close)
        watchdog.daemon = True
        watchdog.start()
        try:
            sftp = self._start_session(transport)
        except (RemoteRefused, RemoteUnreachable):
            transport.close()
            raise
        except TRANSPORT_ERRORS as exc:
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
        return Connection(transport, sftp, number)

    def _log_in(self, transport: paramiko.Transport) -> None:
        """Handshake, host key, authentication."""
        target = self.target
        known = known_keys(target.known_hosts_files + target.read_only_known_hosts, target.host_key_name)
        prefer_known_key_types(transport, known)
        _prefer_algorithms(transport)
        transport.start_client(timeout=self.timeout)
        check_host_key(transport.get_remote_server_key(), known, target.host_key_name,
                       target.known_hosts_files[0], self.options.accept_new_host_key)
        authenticate(transport, target, self.options.identity, self.description, self.options.secrets)

    def _start_session(self, transport: paramiko.Transport) -> SftpSession:
        """The login, then the SFTP subsystem on a channel."""
        self._log_in(transport)
        transport.set_keepalive(max(1, int(self.options.keepalive)))
        channel = transport.open_session(
            window_size=CHANNEL_WINDOW, max_packet_size=CHANNEL_MAX_PACKET, timeout=self.timeout
        )
        channel.settimeout(self.timeout)
        channel.invoke_subsystem("sftp")
        return SftpSession(channel)

    # -- the pool -------------------------------------------------------------------
    def reopen(self) -> None:
        """Allow checkouts again after ``close``."""
        with self._lock:
            self._closed = False

    def close(self) -> None:
        """Close the idle connections; those in use close when checked in."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for conn in idle:
            conn.close()

    def _checkout(self) -> tuple[Connection, bool]:
        """A connection for this thread alone, and whether it was reused from the pool."""
        reused = self._take_idle_or_slot()
        if reused is not None:
            return reused, True
        conn: Connection | None = None
        try:
            conn = self._open_connection()
            self._on_open(conn.sftp)
        except BaseException:
            with self._lock:
                self._open -= 1
                self._lock.notify()
            if conn is not None:
                conn.close()
            raise
        return conn, False

    def _take_idle_or_slot(self) -> Connection | None:
        """A live idle connection, or None once a slot for a new one is reserved.

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
                        return conn
                    self._open -= 1
                    conn.close()
                if self._open < max(1, self.options.connections):
                    self._open += 1
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RemoteUnreachable(f"{self.description}: no connection came free")
                self._lock.wait(remaining)

    def _checkin(self, conn: Connection) -> None:
        with self._lock:
            if self._closed:
                self._open -= 1
                conn.close()
            else:
                self._idle.append(conn)
            self._lock.notify()

    def _discard(self, conn: Connection) -> None:
        """Drop a broken connection and the idle ones (most likely broken as well)."""
        with self._lock:
            doomed = [conn, *self._idle]
            self._idle.clear()
            self._open -= len(doomed)
            self._lock.notify_all()
        for each in doomed:
            each.close()

    def run(self, what: str, operation: Callable[[SftpSession], T], *, retry: bool = False) -> T:
        """Run ``operation`` on a checked-out connection, translating failures: a STATUS
        error to ``RemoteError``, a broken connection to ``RemoteUnreachable`` (retried
        once on a fresh connection when ``retry`` and the dead one came from the pool)."""
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            conn, reused = self._checkout()
            try:
                result = operation(conn.sftp)
            except StatusError as exc:
                self._checkin(conn)
                raise RemoteError(exc.errno or errno.EIO, f"{what}: {exc.strerror}") from exc
            except (RemoteError, ContentDamaged):
                self._checkin(conn)
                raise
            except TRANSPORT_ERRORS as exc:
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
