"""Network events: the moments when the remote is worth checking at once.

A link going up or down, an address added or removed, a route changed (a laptop joining a
network, a VPN coming up, a cable pulled), or the machine resuming from suspend: after
each, whether the remote answers may have changed, and waiting for the next heartbeat
(``--heartbeat``, 10 s) or the offline probe's next step (up to 30 s) only costs time.

Owns: a NETLINK_ROUTE socket subscribed to the link, address and route groups (IPv4 and
IPv6), read on the trio thread when readable (never blocking it); a resume detector
(``ResumeDetector``: CLOCK_BOOTTIME runs through a suspension, CLOCK_MONOTONIC does not);
the coalescing of a burst (``Coalescer``: the first event at once, then at most one more
call per ``SETTLE`` seconds, so a link coming up with its addresses and routes costs two
checks, not ten). It calls one callback with a short reason (``Connectivity.check_now``,
wired by the daemon).
Must not touch: the remote, the connectivity state (it only tells), the cache, FUSE.
Where netlink cannot be opened (not Linux, a sandbox without it) it says so once at debug
level and does without; the resume detector needs only the clocks.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import time
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

#: the multicast groups of NETLINK_ROUTE listened to (linux/rtnetlink.h, RTMGRP_*)
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = (RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
          | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)

#: message types (RTM_*) and what they are told as
_KINDS = {16: "link added or changed", 17: "link removed", 20: "address added",
          21: "address removed", 24: "route added", 25: "route removed"}
_RTM_NEWLINK = 16
_IFLA_WIRELESS = 11  # a wireless extension event (a scan result...), not a link change
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port
_IFINFOMSG = struct.Struct("=BxHiII")  # family, (pad), type, index, flags, change
_RTATTR = struct.Struct("=HH")  # length, type

SETTLE = 0.5  # seconds: a burst of events gives one check at once and at most one per this
RESUME_CHECK = 3.0  # seconds between two looks at the clocks
RESUME_JUMP = 2.0  # seconds the clocks must drift apart to count as a suspension


def describe(data: bytes) -> list[str]:
    """What the netlink messages in ``data`` (one datagram) tell, one text per message
    that counts; wireless extension events (sent as RTM_NEWLINK by some Wi-Fi drivers at
    every scan) and anything else not a link, address or route change do not count."""
    kinds: list[str] = []
    offset = 0
    while offset + _NLMSG_HEADER.size <= len(data):
        length, kind, _flags, _seq, _port = _NLMSG_HEADER.unpack_from(data, offset)
        if length < _NLMSG_HEADER.size:
            break  # malformed: stop rather than loop
        body = data[offset + _NLMSG_HEADER.size:offset + length]
        if kind in _KINDS and not (kind == _RTM_NEWLINK and _is_wireless_event(body)):
            kinds.append(_KINDS[kind])
        offset += (length + 3) & ~3
    return kinds


def _is_wireless_event(body: bytes) -> bool:
    offset = _IFINFOMSG.size
    while offset + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, offset)
        if length < _RTATTR.size:
            return False
        if kind == _IFLA_WIRELESS:
            return True
        offset += (length + 3) & ~3
    return False


def open_netlink() -> socket.socket | None:
    """A non-blocking NETLINK_ROUTE socket on ``GROUPS``, or None where there is none."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    except (AttributeError, OSError) as exc:  # AttributeError: no AF_NETLINK (not Linux)
        log.debug("network events: no netlink here (%s); changes are noticed by the "
                  "heartbeat and the probe only", exc)
        return None
    try:
        sock.bind((0, GROUPS))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        log.debug("network events: cannot listen to netlink (%s); changes are noticed by "
                  "the heartbeat and the probe only", exc)
        return None
    return sock


class ResumeDetector:
    """Tells a resume from suspend by the clocks alone.

    CLOCK_BOOTTIME counts the time suspended and CLOCK_MONOTONIC does not, and otherwise
    they run at the same rate: their difference grows by each suspension and stays put
    in between. ``suspended`` takes one reading of both and says how long the machine
    slept since the last reading, when that is more than ``threshold``.
    """

    def __init__(self, boottime: float, monotonic: float, threshold: float = RESUME_JUMP) -> None:
        self.threshold = threshold
        self._offset = boottime - monotonic

    def suspended(self, boottime: float, monotonic: float) -> float | None:
        offset = boottime - monotonic
        slept = offset - self._offset
        self._offset = offset
        return slept if slept > self.threshold else None


class Coalescer:
    """Turns a burst of events into few calls: the first event is passed on at once, and
    later ones at most once per ``settle`` seconds (the reasons gathered meanwhile in
    one call), so the last event of a burst is always followed by a call."""

    def __init__(self, deliver: Callable[[str], None], settle: float = SETTLE) -> None:
        self._deliver = deliver
        self.settle = settle
        self._reasons: list[str] = []
        self._pending = trio.Event()

    def notice(self, reason: str) -> None:
        if reason not in self._reasons:
            self._reasons.append(reason)
        self._pending.set()

    async def run(self) -> None:
        while True:
            await self._pending.wait()
            self._pending = trio.Event()
            reasons, self._reasons = self._reasons, []
            self._deliver(", ".join(reasons))
            await trio.sleep(self.settle)


class NetworkEvents:
    """Calls ``on_change(reason)`` soon after the network changed or the machine resumed.
    ``run`` until cancelled; the socket is closed when it ends."""

    def __init__(self, on_change: Callable[[str], None], *, settle: float = SETTLE,
                 resume_check: float = RESUME_CHECK, resume_jump: float = RESUME_JUMP) -> None:
        self._coalescer = Coalescer(self._tell(on_change), settle)
        self.resume_check = resume_check
        self.resume_jump = resume_jump

    @staticmethod
    def _tell(on_change: Callable[[str], None]) -> Callable[[str], None]:
        def tell(reason: str) -> None:
            log.debug("network event: %s", reason)
            on_change(reason)
        return tell

    async def run(self) -> None:
        sock = open_netlink()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._coalescer.run)
                nursery.start_soon(self._watch_resume)
                if sock is not None:
                    nursery.start_soon(self._watch_netlink, sock)
        finally:
            if sock is not None:
                sock.close()

    async def _watch_netlink(self, sock: socket.socket) -> None:
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                kinds = self._drain(sock)
            except OSError as exc:  # never the mount's end: the heartbeat still works
                log.warning("network events: reading netlink failed (%s); changes are "
                            "noticed by the heartbeat and the probe only from now on", exc)
                return
            for kind in kinds:
                self._coalescer.notice(kind)

    @staticmethod
    def _drain(sock: socket.socket) -> list[str]:
        kinds: list[str] = []
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return kinds
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # messages were dropped: something changed
                    kinds.append("many changes")
                    continue
                raise
            kinds.extend(describe(data))

    async def _watch_resume(self) -> None:
        boottime = getattr(time, "CLOCK_BOOTTIME", None)
        if boottime is None:
            log.debug("network events: no CLOCK_BOOTTIME here; a resume is noticed by the "
                      "heartbeat only")
            return

        def read() -> tuple[float, float]:
            return time.clock_gettime(boottime), time.monotonic()

        detector = ResumeDetector(*read(), threshold=self.resume_jump)
        while True:
            await trio.sleep(self.resume_check)
            slept = detector.suspended(*read())
            if slept is not None:
                self._coalescer.notice(f"resumed after {slept:.0f} s suspended")
