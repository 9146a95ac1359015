"""Network events (cachefs/link/netevents.py and ``Connectivity.check_now``): a link, an
address or a route that changes, or a resume, makes the mount check its remote at once.

The pure parts (the resume detector's arithmetic, the coalescing of a burst, the parsing
of netlink messages) run in-process with made-up clocks and bytes. The rest uses real
parts: real netlink messages from an interface made for the test (a ``dummy`` interface
where the kernel has the module, else a ``veth`` pair, else an address on ``lo``; the
fixture says which and always removes what it added), a real sshd stopped and started,
and real mounts (``mount_factory``: --timeout 2) read through ``.cachefs/status`` and
their debug log. Needs root (to add interfaces).
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime

import pytest
import trio
import trio.testing

from cachefs.link.netevents import Coalescer, NetworkEvents, ResumeDetector, describe
from tests.fixtures.mount import Mount, status

#: paramiko logs a reset connection at ERROR when the sshd is stopped under it
SERVER_STOPPED = [r"paramiko\.transport: Socket exception", r"remote refused"]
#: an event to online or to a check, with room for a loaded machine (the backoff the
#: tests beat is 8 s, the heartbeat 60 s)
PROMPT = 2.5


# -- pure logic ------------------------------------------------------------------------------

def test_resume_detector_counts_only_a_jump_between_the_clocks() -> None:
    detector = ResumeDetector(boottime=1000.0, monotonic=900.0, threshold=2.0)
    # both clocks ran on together (3 s, no suspension): nothing, whatever their values
    assert detector.suspended(1003.0, 903.0) is None
    # a little drift between readings is no resume
    assert detector.suspended(1006.5, 905.0) is None  # 1.5 s apart
    # 40 s suspended: the boot clock ran on through it, the monotonic clock did not
    assert detector.suspended(1049.5, 908.0) == pytest.approx(40.0)
    # measured from the last reading, so the same suspension is told once
    assert detector.suspended(1052.5, 911.0) is None
    # a small jump accumulated over readings is not a resume either (each is compared
    # with the one before), and a jump just over the threshold is
    assert detector.suspended(1054.5, 912.0) is None  # +1 s
    assert detector.suspended(1058.0, 913.0) == pytest.approx(2.5)


def test_a_burst_gives_one_call_at_once_and_one_after_it_settles() -> None:
    calls: list[tuple[float, str]] = []

    async def main() -> None:
        def deliver(reason: str) -> None:
            calls.append((trio.current_time(), reason))

        coalescer = Coalescer(deliver, settle=0.5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(coalescer.run)
            await trio.sleep(10)
            for i in range(20):  # 20 events over 0.95 s: a link coming up
                coalescer.notice("link" if i % 2 else "address")
                await trio.sleep(0.05)
            await trio.sleep(5)
            coalescer.notice("route")  # a lone event, later
            await trio.sleep(5)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    times = [round(t, 2) for t, _ in calls]
    # the first at once, then at most one per 0.5 s; the last event (at 10.95) is followed
    # by a call (at 11.0); the lone event later at once again
    assert times == [10.0, 10.5, 11.0, 16.0]
    assert calls[0][1] == "address"
    assert calls[1][1] == "link, address"
    assert calls[3][1] == "route"


def _message(kind: int, body: bytes) -> bytes:
    length = 16 + len(body)
    padding = b"\0" * (-length % 4)
    return struct.pack("=IHHII", length, kind, 0, 0, 0) + body + padding


def _attribute(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def test_describe_reads_every_message_of_a_datagram_and_skips_wireless_events() -> None:
    ifinfo = struct.pack("=BxHiII", 0, 1, 3, 0x1003, 0x1)
    address = struct.pack("=BBBBi", 2, 24, 0, 0, 3) + _attribute(1, bytes([192, 0, 2, 7]))
    data = (_message(16, ifinfo + _attribute(3, b"wlan0\0"))  # a link change
            + _message(16, ifinfo + _attribute(3, b"wlan0\0") + _attribute(11, b"scan"))  # wireless
            + _message(20, address) + _message(25, b"\0" * 12)
            + _message(28, b"\0" * 12))  # a neighbour entry: not ours
    assert describe(data) == ["link added or changed", "address added", "route removed"]
    assert describe(b"") == []
    assert describe(struct.pack("=IHHII", 0, 16, 0, 0, 0)) == []  # a bad length ends it


# -- a real interface ------------------------------------------------------------------------

def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


class ScratchInterface:
    """Something this test may change to make real netlink messages: its own interface (a
    dummy, else a veth pair), else addresses on ``lo``. ``change()`` adds one more
    address to it (a netlink RTM_NEWADDR; the link is left down, so no IPv6 autoconfiguration
    adds events of its own later); everything added goes at ``remove()``."""

    def __init__(self) -> None:
        tag = os.getpid() % 10000
        self.name = f"cfs-ne{tag}"
        self.kind = ""
        self._net = 18 + tag % 2, tag // 2 % 250  # 198.18.0.0/15, kept for benchmarks
        self._added: list[str] = []
        for kind, extra in (("dummy", []), ("veth", ["peer", "name", f"cfs-nf{tag}"])):
            if _ip("link", "add", self.name, "type", kind, *extra, check=False).returncode == 0:
                self.kind = kind  # left down: no IPv6 autoconfiguration trailing its events
                return
        self.name, self.kind = "lo", "lo (addresses)"

    def change(self) -> None:
        a, b = self._net
        address = f"198.{a}.{b}.{len(self._added) + 1}/32"
        _ip("addr", "add", address, "dev", self.name)
        self._added.append(address)

    def remove(self) -> None:
        if self.name != "lo":
            _ip("link", "del", self.name, check=False)  # its addresses and peer go with it
            assert _ip("link", "show", self.name, check=False).returncode != 0, \
                f"{self.name} is still there"
        else:
            for address in self._added:
                _ip("addr", "del", address, "dev", "lo", check=False)
        left = _ip("-o", "addr", "show").stdout
        assert not [a for a in self._added if a.split("/")[0] + "/" in left], \
            f"addresses left behind: {left}"


@pytest.fixture
def interface() -> Iterator[ScratchInterface]:
    # (the suite runs as root, as tests/test_mount_read.py says too: never skipped)
    assert os.geteuid() == 0, "adding an interface or an address needs root: run the suite as root"
    made = ScratchInterface()
    try:
        yield made
    finally:
        made.remove()


def test_real_netlink_messages_reach_the_callback(interface: ScratchInterface) -> None:
    told: list[str] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(NetworkEvents(told.append).run)
            await trio.sleep(0.3)  # subscribed (and the interface's own events are past)
            told.clear()
            await trio.to_thread.run_sync(interface.change)
            with trio.move_on_after(PROMPT):
                while not any("address added" in reason for reason in told):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert any("address added" in reason for reason in told), f"{interface.kind}: told {told}"


# -- real mounts -----------------------------------------------------------------------------

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _logged_at(mount: Mount, text: str, after: int = 0) -> float | None:
    """The wall-clock time of the first log line from offset ``after`` holding ``text``."""
    for line in mount.log_text()[after:].splitlines():
        match = _STAMP.match(line)
        if match and text in line:
            return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Poll until ``predicate()`` is true; the wall-clock time it was first seen true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.time()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def _connectivity(mount: Mount) -> str:
    return str(status(mount.mountpoint)["connectivity"])


def test_an_offline_mount_reconnects_at_a_network_event_not_at_its_backoff(
        mount_factory, sshd, interface: ScratchInterface) -> None:
    with mount_factory(allowed_errors=SERVER_STOPPED) as mount:
        os.listdir(mount.mountpoint)
        sshd.stop()
        _wait(lambda: _connectivity(mount) == "offline", 10, "the heartbeat to notice")
        # the probe backs off: 1, 2, 4, 8 s; once it waits 8 s, the server comes back
        _wait(lambda: _logged_at(mount, "next attempt to connect in 8 s"), 30, "a backoff of 8 s")
        backoff_from = _logged_at(mount, "next attempt to connect in 8 s")
        assert backoff_from is not None
        sshd.start()
        changed = time.time()
        interface.change()
        online = _wait(lambda: _connectivity(mount) == "online", 10, "online again")
        took = online - changed
        assert took < PROMPT, f"online {took:.2f} s after the event ({interface.kind})"
        assert online - backoff_from < 8 - 1, "online only when the backoff ran out"
        assert _logged_at(mount, "trying to connect now") is not None


def test_an_online_mount_checks_its_remote_at_a_network_event(
        mount_factory, sshd, interface: ScratchInterface) -> None:
    with mount_factory(heartbeat="60") as mount:
        os.listdir(mount.mountpoint)
        assert _connectivity(mount) == "online"
        time.sleep(1)  # the start's own events are past
        before = len(mount.log_text())
        changed = time.time()
        interface.change()
        _wait(lambda: _logged_at(mount, "the remote answered the check", before), PROMPT + 1,
              "the check in the log")
        checked = _logged_at(mount, "checking that the remote still answers", before)
        answered = _logged_at(mount, "the remote answered the check", before)
        assert checked is not None and answered is not None
        assert checked - changed < PROMPT, f"checked {checked - changed:.2f} s after the event"
        assert _connectivity(mount) == "online"


def test_a_dead_server_is_noticed_at_a_network_event_not_at_the_heartbeat(
        mount_factory, sshd, interface: ScratchInterface) -> None:
    with mount_factory(heartbeat="60", allowed_errors=SERVER_STOPPED) as mount:
        os.listdir(mount.mountpoint)
        time.sleep(1)
        sshd.stop()  # its sessions are killed: the mount's connections are dead
        time.sleep(1.5)
        assert _connectivity(mount) == "online", "something else noticed: the test shows nothing"
        changed = time.time()
        interface.change()
        offline = _wait(lambda: _connectivity(mount) == "offline", 10, "offline")
        assert offline - changed < PROMPT, f"offline {offline - changed:.2f} s after the event"
