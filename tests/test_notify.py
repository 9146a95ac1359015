"""Desktop notifications (cachefs/notify.py): the D-Bus call on a real session bus
(``dbus-daemon``, started here) with ``dbus-monitor`` recording what reaches it; a bus
that never answers holding up nothing; the rules that coalesce events (pure logic, a
clock of the test's); and a real mount that tells a conflict, going offline and coming
back, and tells nothing with ``-o no_notify``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachefs.notify import (CONFLICT_GAP, FAILURE_GAP, LINK_SETTLE, BusError, BusSender, Notice, Notices,
                            send_notification, session_bus_address)
from tests.test_conflicts import change_on_server
from tests.test_writes import control, go_offline, read_all, sync, wait_for, wait_state, write_file

NOTIFY_WAIT = 15.0  # bound on a notification reaching the bus (settle 2 s, gap 5 s, a busy machine)


@dataclass
class Call:
    summary: str
    body: str
    strings: list[str]


class SessionBus:
    """A private session bus and a ``dbus-monitor`` writing every Notify call to a file."""

    def __init__(self, address: str, pid: int, monitor: subprocess.Popen[bytes], log: Path) -> None:
        self.address, self.pid, self.monitor, self.log = address, pid, monitor, log

    def calls(self) -> list[Call]:
        text = self.log.read_text(errors="replace")
        out = []
        for block in re.split(r"^(?=method call )", text, flags=re.M):
            if not block.startswith("method call ") or "member=Notify" not in block.split("\n", 1)[0]:
                continue
            strings = re.findall(r'string "(.*?)"\n', block, flags=re.S)
            out.append(Call(strings[2], strings[3], strings))
        return [c for c in out if c.summary != "probe"]

    def wait_for_call(self, text: str, timeout: float = NOTIFY_WAIT) -> Call:
        def found() -> bool:
            return any(text in c.summary or text in c.body for c in self.calls())

        wait_for(found, timeout, f"a notification with {text!r} (calls: {self.calls()})", interval=0.1)
        return next(c for c in self.calls() if text in c.summary or text in c.body)


@pytest.fixture
def session_bus(tmp_path: Path) -> Iterator[SessionBus]:
    for tool in ("dbus-daemon", "dbus-monitor"):
        if shutil.which(tool) is None:  # (never skipped: the suite installs them)
            pytest.fail(f"{tool} is needed by the notification tests (Debian: apt-get install "
                        "dbus-daemon dbus-bin)")
    started = subprocess.run(["dbus-daemon", "--session", "--fork", "--nosyslog", "--print-address=1",
                              "--print-pid=1"], capture_output=True, text=True, timeout=10, check=True)
    address, pid_text = started.stdout.split()
    pid = int(pid_text)
    log = tmp_path / "notify-calls.txt"
    with open(log, "wb") as out:
        monitor = subprocess.Popen(["dbus-monitor", "--address", address,
                                    "type='method_call',interface='org.freedesktop.Notifications'"],
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    bus = SessionBus(address, pid, monitor, log)
    try:
        # ready once the monitor records a call of ours
        def recorded() -> bool:
            try:
                send_notification(address, "probe", "", timeout=2)
            except BusError:
                pass  # (nobody serves the name: the monitor sees the call all the same)
            return "probe" in log.read_text(errors="replace")

        wait_for(recorded, 10, "dbus-monitor to record", interval=0.2)
        yield bus
    finally:
        monitor.kill()
        monitor.wait(5)
        os.kill(pid, signal.SIGTERM)


# -- the call on the bus ---------------------------------------------------------------------
def test_notify_reaches_a_real_session_bus(session_bus: SessionBus) -> None:
    with pytest.raises(BusError, match="ServiceUnknown"):  # (no notification server runs)
        send_notification(session_bus.address, "cachefs: a new conflict", "report.txt: ü \"quoted\" here\nline two",
                          hints={"category": "transfer.error", "urgency": 1})
    call = session_bus.wait_for_call("a new conflict", 5)
    assert call.body == 'report.txt: ü "quoted" here\nline two'
    assert call.strings[0] == "cachefs"
    assert "transfer.error" in call.strings
    text = session_bus.log.read_text()
    assert "byte 1" in text and "int32 -1" in text  # urgency, expire timeout


def test_a_notification_server_answers(session_bus: SessionBus) -> None:
    """A server on the bus (``FakeServer``: owns org.freedesktop.Notifications and answers
    each Notify with an id) gets the call, and the client returns its answer."""
    with FakeServer(session_bus.address) as server:
        assert send_notification(session_bus.address, "hello", "there") == 1
        assert send_notification(session_bus.address, "again", "") == 2
        assert server.summaries == ["hello", "again"]


def test_a_silent_bus_holds_up_nothing(tmp_path: Path) -> None:
    """A bus that accepts and never answers: the call gives up at its timeout, and the
    sender's ``put`` (what the trio thread calls) returns at once, however many wait."""
    path = tmp_path / "bus"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(64)
    try:
        start = time.monotonic()
        with pytest.raises(BusError, match="did not answer"):
            send_notification(f"unix:path={path}", "x", "y", timeout=0.5)
        assert time.monotonic() - start < 2.0
        sender = BusSender(f"unix:path={path}")
        start = time.monotonic()
        for n in range(100):
            sender.put(Notice(f"n{n}", "", "network"))
        assert time.monotonic() - start < 0.5
    finally:
        server.close()


def test_session_bus_address(tmp_path: Path) -> None:
    assert session_bus_address({}) is None
    assert session_bus_address({"XDG_RUNTIME_DIR": str(tmp_path)}) is None
    (tmp_path / "bus").touch()
    assert session_bus_address({"XDG_RUNTIME_DIR": str(tmp_path)}) == f"unix:path={tmp_path}/bus"
    assert session_bus_address({"DBUS_SESSION_BUS_ADDRESS": "unix:abstract=/tmp/x,guid=1",
                                "XDG_RUNTIME_DIR": str(tmp_path)}) == "unix:abstract=/tmp/x,guid=1"
    with pytest.raises(BusError, match="no unix socket"):
        send_notification("tcp:host=localhost,port=1", "x", "y")


# -- the rules (a clock of the test's) ---------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def notices(show_names: bool = True, link_state: str = "online") -> tuple[Notices, list[Notice], Clock]:
    sent: list[Notice] = []
    clock = Clock()
    return Notices(sent.append, "/home/u/mnt", show_names, link_state, clock), sent, clock


def run_for(n: Notices, clock: Clock, seconds: float, step: float = 0.1) -> None:
    end = clock.now + seconds
    while clock.now < end:
        clock.now += step
        n.flush()


def test_offline_and_back_are_told_once_each() -> None:
    n, sent, clock = notices()
    n.link("offline")
    run_for(n, clock, LINK_SETTLE + 1)
    n.link("online")
    run_for(n, clock, 20)
    assert [s.summary for s in sent] == ["cachefs: offline", "cachefs: online again"]
    assert sent[0].category == "network.disconnected" and "/home/u/mnt" in sent[0].body


def test_a_flapping_link_is_coalesced() -> None:
    n, sent, clock = notices()
    for _ in range(600):  # 10 minutes of a link up and down every half second
        n.link("offline")
        run_for(n, clock, 0.5)
        n.link("online")
        run_for(n, clock, 0.5)
    assert sent == []  # never offline 2 s on end: nothing to tell
    for _ in range(100):  # now 200 s of 3 s down, 3 s up
        n.link("offline")
        run_for(n, clock, 3)
        n.link("online")
        run_for(n, clock, 3)
    assert 2 <= len(sent) <= 12, [s.summary for s in sent]  # gaps of 5, 10, 20, 40 ... s


def test_offline_by_request_is_no_news() -> None:
    n, sent, clock = notices()
    n.link("offline-by-request")
    run_for(n, clock, 10)
    n.link("offline")  # ('cachefs online': offline until the probe connects)
    run_for(n, clock, 0.3)
    n.link("online")
    run_for(n, clock, 10)
    assert sent == []
    n.link("offline")  # a real loss afterwards is told
    run_for(n, clock, 10)
    assert [s.summary for s in sent] == ["cachefs: offline"]


def test_conflicts_are_gathered() -> None:
    n, sent, clock = notices()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt", "e.txt"):
        n.conflict({"kind": "changed-both", "path": f"docs/{name}"})
        run_for(n, clock, 0.1)
    run_for(n, clock, 2)
    assert len(sent) == 1
    assert sent[0].summary == "cachefs: 5 new conflicts"
    assert "docs/a.txt: changed here and on the server: both kept" in sent[0].body
    assert "and 2 more" in sent[0].body and "d.txt" not in sent[0].body
    n.conflict({"kind": "deleted-local-changed-remote", "path": "f.txt"})
    run_for(n, clock, 2)
    assert len(sent) == 1  # (within CONFLICT_GAP of the last)
    run_for(n, clock, CONFLICT_GAP)
    assert len(sent) == 2 and sent[1].summary == "cachefs: a new conflict" and "f.txt: deleted here" in sent[1].body


def test_an_encrypted_cache_names_no_file() -> None:
    n, sent, clock = notices(show_names=False)
    n.conflict({"kind": "changed-both", "path": "secret-plans.txt"})
    run_for(n, clock, 2)
    n.sync_failed("replay of b'secret-plans.txt' failed: [Errno 28] No space left on device")
    assert len(sent) == 2
    assert all("secret" not in s.body for s in sent), sent
    assert "changed-both" in sent[0].body


def test_a_failing_sync_is_told_once_per_reason() -> None:
    n, sent, clock = notices()
    for _ in range(5):
        n.sync_failed("the disk is full")
        run_for(n, clock, 1)
    assert len(sent) == 1 and sent[0].category == "transfer.error"
    n.sync_ok()
    run_for(n, clock, FAILURE_GAP)
    n.sync_failed("the disk is full")
    assert len(sent) == 2


# -- a real mount ----------------------------------------------------------------------------
def test_a_mount_tells_a_conflict_and_the_link(mount_factory, sshd, share: Path,
                                               session_bus: SessionBus) -> None:
    (share / "report.txt").write_bytes(b"base version")
    with mount_factory(env={"DBUS_SESSION_BUS_ADDRESS": session_bus.address}) as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        go_offline(mnt)  # (by request: no news)
        write_file(mnt / "report.txt", b"local version")
        change_on_server(share / "report.txt", b"remote version")
        control(mnt, "online")
        sync(mnt)
        call = session_bus.wait_for_call("a new conflict")
        assert "report.txt: changed here and on the server: both kept" in call.body, call
        assert str(mnt) in call.body
        sshd.stop()
        wait_state(mnt, "offline")
        session_bus.wait_for_call("cachefs: offline")
        sshd.start()
        wait_state(mnt, "online")
        session_bus.wait_for_call("cachefs: online again")
        summaries = [c.summary for c in session_bus.calls()]
        assert summaries == ["cachefs: a new conflict", "cachefs: offline", "cachefs: online again"], summaries


def test_no_notify_sends_nothing(mount_factory, sshd, share: Path, session_bus: SessionBus) -> None:
    (share / "report.txt").write_bytes(b"base version")
    with mount_factory("-o", "no_notify", env={"DBUS_SESSION_BUS_ADDRESS": session_bus.address}) as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        go_offline(mnt)
        write_file(mnt / "report.txt", b"local version")
        change_on_server(share / "report.txt", b"remote version")
        control(mnt, "online")
        sync(mnt)
        sshd.stop()
        wait_state(mnt, "offline")
        time.sleep(LINK_SETTLE + 1.5)
        sshd.start()
        wait_state(mnt, "online")
        time.sleep(LINK_SETTLE + 1.5)
        assert (share / "report.txt").read_bytes() == b"remote version"  # (the conflict happened)
        assert session_bus.calls() == []
        assert "desktop notifications: off (--no-notify)" in mount.log_path.read_text()


# -- a notification server for the test ----------------------------------------------------------
class FakeServer:
    """Owns org.freedesktop.Notifications on the bus and answers each Notify with the next
    id (1, 2, ...), recording the summaries: a thread with its own connection, speaking
    the wire format with the module's writer (the bus checks every message it relays)."""

    def __init__(self, address: str) -> None:
        from cachefs.notify import _unix_socket_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(_unix_socket_path(address))
        self.summaries: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeServer:
        from cachefs.notify import _message, _Writer
        s = self.sock
        s.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
        assert s.recv(512).startswith(b"OK ")
        s.sendall(b"BEGIN\r\n")
        w = _Writer()
        w.string("org.freedesktop.Notifications")
        w.uint32(4)  # DBUS_NAME_FLAG_DO_NOT_QUEUE
        s.sendall(_message(1, "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello", "org.freedesktop.DBus")
                  + _message(2, "/org/freedesktop/DBus", "org.freedesktop.DBus", "RequestName",
                             "org.freedesktop.DBus", "su", bytes(w.buf)))
        self.pending = bytearray()
        while True:  # until RequestName is answered: the name is ours
            header, body = self._next()
            if header.get(5) == 2:
                assert header["type"] == 2, header
                break
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self.sock.close()

    def _next(self) -> tuple[dict, bytes]:
        import struct
        while len(self.pending) < 16:
            self.pending += self.sock.recv(65536)
        body_len, serial, fields_len = struct.unpack_from("<III", self.pending, 4)
        end = 16 + fields_len + (-(16 + fields_len) % 8)
        while len(self.pending) < end + body_len:
            self.pending += self.sock.recv(65536)
        msg = bytes(self.pending[:end + body_len])
        del self.pending[:end + body_len]
        header: dict = {"type": msg[1], "serial": serial}
        at = 16
        while at < 16 + fields_len:
            at += -at % 8
            code, n = msg[at], msg[at + 1]
            sig = msg[at + 2:at + 2 + n].decode()
            at += 3 + n
            if sig in "so":
                at += -at % 4
                (length,) = struct.unpack_from("<I", msg, at)
                header[code] = msg[at + 4:at + 4 + length].decode()
                at += 5 + length
            elif sig == "g":
                header[code] = msg[at + 1:at + 1 + msg[at]].decode()
                at += 2 + msg[at]
            else:
                at += -at % 4
                (header[code],) = struct.unpack_from("<I", msg, at)
                at += 4
        return header, msg[end:]

    def _serve(self) -> None:
        import struct
        from cachefs.notify import METHOD_RETURN, message
        served = 0
        try:
            while not self._stop:
                header, body = self._next()
                if header["type"] != 1 or header.get(3) != "Notify":
                    continue
                # the body: s app, u id, s icon, s summary, ...
                at = 0
                strings = []
                for kind in "susss":
                    at += -at % 4
                    (value,) = struct.unpack_from("<I", body, at)
                    at += 4
                    if kind == "s":
                        strings.append(body[at:at + value].decode())
                        at += value + 1
                self.summaries.append(strings[2])
                served += 1
                fields = [(5, "u", header["serial"]), (6, "s", header[7]), (8, "g", "u")]
                # a method return (no reply expected), its body the notification's id
                self.sock.sendall(message(METHOD_RETURN, 1, 100 + served, fields, struct.pack("<I", served)))
        except OSError:
            pass


# -- the sync manager's hooks (in process: a real store and a local share) -----------------------
def test_the_sync_manager_tells_a_failure_and_a_conflict(tmp_path: Path, share: Path) -> None:
    """A journal entry damaged on disk (a bit flipped through LMDB, as a disk would) stops
    the pass: a failure, told with its reason; a pass that completes tells ``None``; a
    conflict is told once committed (its record already in the store)."""
    import trio

    from tests.test_damage import Side, _cache_dir, _local

    (share / "f.txt").write_bytes(b"base")
    text, remote = _local(share)
    told: list[str | None] = []
    records: list[tuple[dict, int]] = []

    async def main(nursery: trio.Nursery) -> None:
        side = await Side(_cache_dir(tmp_path), text, remote).start(nursery)
        side.sync.on_failure(told.append)
        side.sync.on_conflict(lambda r: records.append((r, side.store.count(side.store.conflicts))))
        await side.read(b"f.txt")
        await side.write(b"g.txt", b"new")
        with side.store.env.begin(write=True) as txn:
            key, value = next(iter(txn.cursor(db=side.store.journal)))
            txn.put(key, bytes([value[0] ^ 1]) + value[1:], db=side.store.journal)
        result = await side.sync.reintegrate()
        assert not result.complete and result.failed
        assert len(told) == 1 and told[0] and "journal" in told[0], told
        with side.store.env.begin(write=True) as txn:  # the entry dropped: the pass completes
            txn.delete(key, db=side.store.journal)
        await side.write(b"f.txt", b"changed here")
        (share / "f.txt").write_bytes(b"changed there, longer")
        os.utime(share / "f.txt", (1, 1))
        result = await side.sync.reintegrate()
        assert result.complete
        assert told[-1] is None
        assert [(r["kind"], r["path"], count) for r, count in records] == [("changed-both", "f.txt", 1)]
        await side.close()

    async def in_nursery() -> None:
        async with trio.open_nursery() as nursery:
            await main(nursery)

    trio.run(in_nursery)
