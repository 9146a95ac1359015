"""``Pacer``: the upload bandwidth cap (``--upload-limit``), shared by every process of
a mount that uploads; ``unacknowledged``: how much of what a socket sent has not reached
the other end yet (the SMB and WebDAV backends' measure of an upload still moving).

Owns: one clock of when the next upload bytes may go, in shared memory
(``multiprocessing``), so that the mount process and its transfer processes together
keep under the cap.
Must not touch: the connections (the SFTP session asks before each WRITE), the cache.
Lock/ordering: the shared clock's lock is held only to read and move it, never while
sleeping.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import struct
import termios
import time
from typing import Any


class Pacer:
    """At most ``rate`` bytes a second, with a burst of ``burst`` seconds' worth."""

    def __init__(self, rate: float, burst: float = 0.05) -> None:
        if rate <= 0:
            raise ValueError("the upload limit must be positive")
        self.rate = float(rate)
        self.burst = burst
        # Handed to the transfer processes at their start (forked, or spawned after a
        # broken pool: a spawn-context value may go to either), so that all share it.
        self._next: Any = multiprocessing.get_context("spawn").Value("d", 0.0)

    def wait(self, size: int) -> None:
        """Blocking: until ``size`` more bytes may be sent."""
        with self._next.get_lock():
            now = time.monotonic()
            start = max(now - self.burst, self._next.value)
            self._next.value = start + size / self.rate
        if start > now:
            time.sleep(start - now)


def unacknowledged(sock: Any) -> int:
    """The bytes sent on ``sock`` the other end has not acknowledged yet (Linux
    ``SIOCOUTQ``: queued and in flight); -1 where it cannot be told."""
    try:
        answer = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, AttributeError, ValueError):
        return -1
    return int(struct.unpack("i", answer)[0])
