"""Faults a user meets, injected at their edge: a TCP proxy that cuts or stalls, a server
restarted mid-transfer, a full cache disk, a cache from another release or corrupted,
and a hostile or misbehaving server.

The rule for reads under faults: a read returns the right bytes or fails with an errno
(EHOSTDOWN, EIO, ETIMEDOUT), never wrong bytes, and the file reads whole once the server
is back. The rule for uploads: nobody sees half a file under its real name.

A slow link is a ``TcpProxy`` throttled to a trickle: transfers longer than ``--timeout``
must complete, since the timeout bounds progress, not the length of a transfer.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from devtools.devserver import SshServer
from tests.fixtures.mount import MountError, is_mounted, run_recover, run_with_timeout, status, tmpfs
from tests.fixtures.proxy import TcpProxy, proxied
from tests.test_writes import (control, go_offline, no_temp_leftovers, read_all, sync_until_done,
                               wait_for, write_file)

READ_ERRNOS = {errno.EHOSTDOWN, errno.EIO, errno.ETIMEDOUT}
CHUNK = 1 << 20


class ChunkReader(threading.Thread):
    """Reads ``path`` chunk by chunk, comparing each chunk with ``expected``; pauses after
    the first chunk until ``go`` is set. Records wrong bytes and unexpected errnos."""

    def __init__(self, path: Path, expected: bytes) -> None:
        super().__init__(daemon=True, name="chunk-reader")
        self.path = path
        self.expected = expected
        self.first = threading.Event()
        self.go = threading.Event()
        self.wrong: list[str] = []
        self.errnos: list[int] = []
        self.good_chunks = 0

    def run(self) -> None:
        try:
            with open(self.path, "rb", buffering=0) as f:
                offset = 0
                while offset < len(self.expected):
                    try:
                        data = f.read(CHUNK)
                    except OSError as exc:
                        self.errnos.append(exc.errno)
                        offset += CHUNK
                        f.seek(offset)
                        if len(self.errnos) > 3:
                            return
                        continue
                    finally:
                        if not self.first.is_set():
                            self.first.set()
                            self.go.wait(30)
                    if data != self.expected[offset:offset + len(data)]:
                        self.wrong.append(f"wrong bytes at {offset} (+{len(data)})")
                    if not data:
                        self.wrong.append(f"early end of file at {offset}")
                        return
                    self.good_chunks += 1
                    offset += len(data)
        except OSError as exc:
            self.errnos.append(exc.errno)
        finally:
            self.first.set()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_whole_eventually(path: Path, expected: bytes, timeout: float = 30.0) -> None:
    """Once the server is back the whole file reads correctly (retrying while reconnecting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = run_with_timeout(path.read_bytes, 30, f"reading {path}")
            assert sha(data) == sha(expected), f"{path}: {len(data)} bytes, wrong content"
            return
        except OSError as exc:
            assert exc.errno in READ_ERRNOS, f"reading {path}: {exc!r}"
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def check_reader(reader: ChunkReader) -> None:
    reader.join(60)
    assert not reader.is_alive(), "a read hung"
    assert not reader.wrong, reader.wrong
    unexpected = [errno.errorcode.get(e, e) for e in reader.errnos if e not in READ_ERRNOS]
    assert not unexpected, f"reads failed with unexpected errnos {unexpected}"


# -- the network -----------------------------------------------------------------------------

def test_server_restart_mid_read(mount_factory, sshd, share: Path) -> None:
    data = os.urandom(40 << 20)
    (share / "big.bin").write_bytes(data)
    with mount_factory(check_log=False) as mount:
        mnt = mount.mountpoint
        reader = ChunkReader(mnt / "big.bin", data)
        reader.start()
        assert reader.first.wait(30)
        sshd.restart()
        reader.go.set()
        check_reader(reader)
        read_whole_eventually(mnt / "big.bin", data)
        assert "Traceback" not in mount.log_text()


def test_server_restart_mid_upload(mount_factory, sshd, share: Path) -> None:
    data = os.urandom(60 << 20)
    with mount_factory(check_log=False) as mount:
        mnt = mount.mountpoint
        go_offline(mnt)
        write_file(mnt / "big.bin", data)
        control(mnt, "online")
        wait_for(lambda: any(".cachefs-tmp-" in n and (share / n).stat().st_size > 0
                             for n in os.listdir(share)), 15, "the upload to start", interval=0.005)
        sshd.restart()
        if (share / "big.bin").exists():
            assert sha((share / "big.bin").read_bytes()) == sha(data), "a partial big.bin"
        sync_until_done(mnt, 60)
        assert sha((share / "big.bin").read_bytes()) == sha(data)
        assert status(mnt)["pending"] == 0
        assert no_temp_leftovers(share) == []
        assert "Traceback" not in mount.log_text()


# -- a full cache disk -----------------------------------------------------------------------

@pytest.fixture(params=[20, 100], ids=["20MiB", "100MiB"])
def small_tmpfs(tmp_path: Path, request) -> Iterator[Path]:
    """20 MiB: too small for the index's 32 MiB map, which then runs without writemap;
    100 MiB: the map is allocated, and the content fills the rest."""
    with tmpfs(tmp_path / "tmpfs", request.param) as path:
        yield path


def test_full_cache_disk(mount_factory, share: Path, small_tmpfs: Path) -> None:
    mount = mount_factory(cache="tmpfs", check_log=False)  # cache dir = the tmpfs root
    with mount:
        mnt = mount.mountpoint
        go_offline(mnt)
        written: dict[str, bytes] = {}
        failure = None
        for i in range(60):
            data = os.urandom(2 << 20)
            try:
                write_file(mnt / f"fill{i}.bin", data)
            except OSError as exc:
                failure = exc
                break
            written[f"fill{i}.bin"] = data
        assert failure is not None, "60 x 2 MiB fitted in the cache's disk"
        assert failure.errno == errno.ENOSPC, f"a write beyond the space failed with {failure!r}"
        assert written, "nothing fitted at all"
        st_ = status(mnt)
        assert st_["state"] == "offline", st_
        for name, data in written.items():
            assert (mnt / name).read_bytes() == data, f"{name} reads wrong after the disk filled"
        # many small files on a full disk: each fails cleanly or works, the mount stays up
        small_errors = set()
        for i in range(200):
            try:
                write_file(mnt / f"small{i}.txt", b"s" * 100)
            except OSError as exc:
                small_errors.add(exc.errno)
        assert small_errors <= {errno.ENOSPC}, small_errors
        status(mnt)
        for name in list(written)[: max(1, len(written) // 2) + 1]:
            os.unlink(mnt / name)
            del written[name]
        for i in range(200):
            (mnt / f"small{i}.txt").unlink(missing_ok=True)
        again = os.urandom(2 << 20)
        write_file(mnt / "after.bin", again)  # space came back
        assert (mnt / "after.bin").read_bytes() == again
        for name, data in written.items():
            assert (mnt / name).read_bytes() == data
        assert "Traceback" not in mount.log_text(), mount.log_text()[-5000:]
        writemap_off = "runs without writemap" in mount.log_text()
        assert writemap_off == (_tmpfs_mib(small_tmpfs) < 32)


def _tmpfs_mib(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize >> 20


def test_many_small_files_grow_the_index(mount_factory, share: Path, tmp_path: Path) -> None:
    """The index takes thousands of entries through the mount (the growth of its map is
    tested in-process: test_store's ``test_index_map_stays_allocated_...``)."""
    with mount_factory() as mount:
        mnt = mount.mountpoint
        go_offline(mnt)
        os.mkdir(mnt / "many")
        for i in range(3000):
            write_file(mnt / "many" / f"n{i:05d}-{'x' * 150}", b"%d" % i)
        assert len(os.listdir(mnt / "many")) == 3000
        control(mnt, "online")
        sync_until_done(mnt, 90)
        assert len(os.listdir(share / "many")) == 3000


# -- caches the mount must refuse ------------------------------------------------------------

def _prime_cache(mount_factory, share: Path, files: int = 50) -> None:
    for i in range(files):
        (share / f"p{i}.txt").write_bytes(b"%d" % i * 100)
    with mount_factory(name="prime") as mount:
        read_all(mount.mountpoint)


def _refused(mount) -> str:
    with pytest.raises(MountError):
        mount.start()
    code = mount.process.returncode
    text = mount.log_text()
    assert code not in (None, 0), code
    assert code > 0, f"the mount died from signal {-code}"
    assert "Traceback" not in text, text[-5000:]
    return text


def test_cache_of_other_schema_refused(mount_factory, share: Path, tmp_path: Path) -> None:
    _prime_cache(mount_factory, share)
    env = lmdb.open(str(tmp_path / "cache" / "index"), max_dbs=12, subdir=True)
    with env.begin(write=True) as txn:
        txn.put(b"schema", b"999", db=env.open_db(b"meta", txn=txn))
    env.close()
    text = _refused(mount_factory(check_log=False))
    assert "schema" in text and "999" in text, text[-2000:]


@pytest.mark.parametrize("where", ["start", "middle"])
def test_corrupt_index_refused(mount_factory, share: Path, tmp_path: Path, where: str) -> None:
    _prime_cache(mount_factory, share, files=300)
    data_mdb = tmp_path / "cache" / "index" / "data.mdb"
    # The part of the file in use (the store keeps unused space reserved beyond it).
    env = lmdb.open(str(data_mdb.parent), readonly=True, lock=False, max_dbs=12)
    size = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    env.close()
    with open(data_mdb, "r+b") as f:
        if where == "start":
            f.write(b"\xde\xad\xbe\xef" * 1024)
        else:
            f.seek(size // 4)
            f.write(os.urandom(size // 2))
    text = _refused(mount_factory(check_log=False))
    assert "cache" in text.lower() and ("corrupt" in text.lower() or "index" in text.lower()), text[-2000:]


def _index_pages(data_mdb: Path) -> int:
    env = lmdb.open(str(data_mdb.parent), readonly=True, lock=False, max_dbs=12)
    used = env.info()["last_pgno"] + 1
    env.close()
    return used


def test_every_damaged_page_is_a_clear_refusal_or_harmless(mount_factory, share: Path, tmp_path: Path) -> None:
    """Each page of a primed cache's index overwritten in turn (on a copy): the mount
    comes up or is refused with the clear message, never a traceback. Before, a damaged
    page that only a write meets (the one the start-up's first write uses) ended the
    mount in a raw lmdb.CorruptedError traceback."""
    _prime_cache(mount_factory, share, files=300)
    prime = tmp_path / "cache"
    used = _index_pages(prime / "index" / "data.mdb")
    outcomes = {"mounted": 0, "refused": 0}
    for page in range(2, used):  # (pages 0 and 1 are LMDB's meta pages)
        copy = tmp_path / f"copy{page}"
        shutil.copytree(prime, copy)
        with open(copy / "index" / "data.mdb", "r+b") as f:
            f.seek(page * 4096)
            f.write(random.Random(page).randbytes(4096))
        mount = mount_factory(cache=copy.name, name=f"m{page}", check_log=False)
        try:
            mount.start()
        except MountError:
            text = mount.log_text()
            assert mount.process.returncode == 1, (page, mount.process.returncode, text[-3000:])
            assert "damaged" in text and "cachefs recover" in text, (page, text[-3000:])
            outcomes["refused"] += 1
            if "signal" in text or outcomes["refused"] == 1:  # recover copes with it too
                out = tmp_path / f"out{page}"
                result = run_recover(str(copy), "--to", str(out))
                assert result.returncode == 0 and "Traceback" not in result.stderr, result
                if "signal" in text:  # (the index unreadable: every content file by number)
                    outcomes["crashed"] = outcomes.get("crashed", 0) + 1
                    assert len(list((out / "by-inode").iterdir())) == len(list((copy / "data").iterdir()))
        else:
            os.listdir(mount.mountpoint)
            outcomes["mounted"] += 1
            mount.stop()
        assert "Traceback" not in mount.log_text(), (page, mount.log_text()[-5000:])
        shutil.rmtree(copy)
    print("damaged pages:", used - 2, outcomes)
    assert outcomes["refused"] > used // 3 and outcomes["mounted"] > 0, outcomes


def test_index_damaged_while_serving_is_eio_and_one_clear_line(mount_factory, share: Path, tmp_path: Path) -> None:
    """Pages of the index damaged under a running mount (its map is the file): requests
    that meet them get EIO, the log says once what is damaged and how to recover, the
    mount keeps serving what it can and ends without a traceback."""
    for i in range(300):
        (share / f"p{i:03d}.txt").write_bytes(b"%d" % i * 100)
    mount = mount_factory(attr_timeout="0.3", check_log=False)
    with mount:
        mnt = mount.mountpoint
        read_all(mnt)
        data_mdb = mount.cache_dir / "index" / "data.mdb"
        raw = data_mdb.read_bytes()[:_index_pages(data_mdb) * 4096]
        # The leaf pages holding these files' records (entries and node records carry
        # the names) lose their page type (the flags at offset 10 of LMDB's page header):
        # LMDB reports them corrupted when a lookup reaches them.
        pages = sorted({at // 4096 for name in (b"p150.txt", b"p151.txt", b"p299.txt")
                        for at in _find_all(raw, name)} - {0, 1})
        assert pages
        with open(data_mdb, "r+b") as f:
            for page in pages:
                f.seek(page * 4096 + 10)
                f.write(b"\0\0")
        time.sleep(0.5)  # past --attr-timeout: the names are looked up in the index again
        errors = set()
        for name in ("p150.txt", "p151.txt", "p299.txt"):
            try:
                (mnt / name).read_bytes()
            except OSError as exc:
                errors.add(exc.errno)
        assert errors == {errno.EIO}, errors
        time.sleep(1.5)  # a checkpoint, write-back and the listers meet the damage too
        assert is_mounted(mnt) and mount.process.poll() is None  # still serving
    text = mount.log_text()
    assert "Traceback" not in text, text[-5000:]
    damaged = [line for line in text.splitlines() if "is damaged" in line]
    assert damaged and all("cachefs recover" in line for line in damaged), text[-5000:]
    assert len(damaged) <= 8, damaged  # one line per damage, not one per request


def _find_all(data: bytes, needle: bytes) -> list[int]:
    out, at = [], data.find(needle)
    while at >= 0:
        out.append(at)
        at = data.find(needle, at + 1)
    return out


# -- a hostile or misbehaving server --------------------------------------------------------

LINKS = {"abs": "/etc/passwd", "up": "../../..", "loop1": "loop2", "loop2": "loop1",
         "self": "self", "dangling": "no/such/thing", "etcdir": "/etc", "rootdir": "/"}


def test_symlinks_shown_never_followed(mount_factory, share: Path, tmp_path: Path) -> None:
    (share / "links").mkdir()
    for name, target in LINKS.items():
        os.symlink(target, share / "links" / name)
    with mount_factory() as mount:
        mnt = mount.mountpoint
        assert sorted(os.listdir(mnt / "links")) == sorted(LINKS)
        for name, target in LINKS.items():
            assert os.path.islink(mnt / "links" / name), name
            assert os.readlink(mnt / "links" / name) == target, name
        with pytest.raises(OSError) as info:
            (mnt / "links" / "loop1").read_bytes()
        assert info.value.errno == errno.ELOOP
        control(mnt, "pin links")  # a pin walk must not follow the links either
        control(mnt, "pin .")
        st_ = status(mnt)
        assert st_["state"] in ("online", "syncing"), st_
    passwd_head = Path("/etc/passwd").read_bytes()[:40]
    leaked = []
    for folder, _dirs, files in os.walk(tmp_path / "cache"):
        for f in files:
            if passwd_head in Path(folder, f).read_bytes():
                leaked.append(os.path.join(folder, f))
    assert not leaked, f"/etc/passwd content in the cache: {leaked}"


def test_file_growing_while_read_never_mixed(mount_factory, share: Path) -> None:
    old = os.urandom(8 << 20)
    extra = os.urandom(2 << 20)
    (share / "grow.bin").write_bytes(old)
    with mount_factory(check_log=False) as mount:
        mnt = mount.mountpoint
        results = []
        for attempt in range(3):
            (share / "grow.bin").write_bytes(old)
            os.utime(share / "grow.bin", (time.time() - 100 - attempt, time.time() - 100 - attempt))
            time.sleep(1.2)  # past the attribute timeout: the next open revalidates
            got = bytearray()
            try:
                with open(mnt / "grow.bin", "rb", buffering=0) as f:
                    got += f.read(CHUNK)
                    with open(share / "grow.bin", "ab") as w:  # the server appends meanwhile
                        w.write(extra)
                    while True:
                        piece = f.read(CHUNK)
                        if not piece:
                            break
                        got += piece
                        time.sleep(0.01)
            except OSError as exc:
                assert exc.errno in READ_ERRNOS | {errno.ESTALE}, exc
                results.append("error")
                continue
            assert bytes(got) in (old, old + extra), \
                f"a read served {len(got)} bytes that are neither the old nor the new file"
            results.append("old" if bytes(got) == old else "new")
        wait_for(lambda: (mnt / "grow.bin").read_bytes() == old + extra, 10, "the appended file")
        assert "Traceback" not in mount.log_text()


def _sessions(sshd: SshServer) -> list[int]:
    """The processes of ``sshd``'s sessions (its SFTP is internal-sftp, in the session's
    own sshd process), found under the listening sshd on this machine."""
    assert sshd._process is not None
    top = sshd._process.pid
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        ancestor = int(pid)
        try:
            while ancestor > 1 and ancestor != top:
                ancestor = int(Path(f"/proc/{ancestor}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ancestor == top and int(pid) != top:
            found.append(int(pid))
    return found


def _wait_stopped(pids: list[int]) -> None:
    """Until each of ``pids`` is stopped (state T), or gone."""
    deadline = time.monotonic() + 5
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                break
            if state in (b"T", b"t"):
                break
            time.sleep(0.001)


@pytest.mark.xfail(strict=False, reason="known gap (docs/reliability.md): rarely a cold read "
                   "through an in-place rewrite on the server is served mixed; cause not found yet")
def test_file_rewritten_while_read_never_mixed(mount_factory, sshd: SshServer, share: Path) -> None:
    old = os.urandom(8 << 20)
    new = os.urandom(8 << 20)
    (share / "swap.bin").write_bytes(old)
    with mount_factory(check_log=False) as mount:
        mnt = mount.mountpoint
        got = bytearray()
        try:
            with open(mnt / "swap.bin", "rb", buffering=0) as f:
                got += f.read(CHUNK)
                # SFTP gives whole-second mtimes: a same-size rewrite within the second of
                # the original write is invisible to any SFTP client (docs/reliability.md,
                # known gaps). Make the rewrite one the server's attributes can show, and
                # let the server answer nothing between the write and its new mtime (its
                # answer to a fetch's FSTAT there would show the new bytes, old mtime).
                # The listener first, so that no session starts after the others are found
                # (a connection opened meanwhile served a fetch through the gap, 1 run in 6).
                assert sshd._process is not None
                os.kill(sshd._process.pid, signal.SIGSTOP)
                servers = [sshd._process.pid, *_sessions(sshd)]
                assert len(servers) > 1, "no session of the test sshd found"
                for pid in servers[1:]:
                    os.kill(pid, signal.SIGSTOP)
                _wait_stopped(servers)  # (a signal is taken at the next return from a call)
                try:
                    with open(share / "swap.bin", "r+b") as w:  # rewritten in place on the server
                        w.write(new)
                    st = os.stat(share / "swap.bin")
                    os.utime(share / "swap.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
                finally:
                    for pid in servers:
                        os.kill(pid, signal.SIGCONT)
                while True:
                    piece = f.read(CHUNK)
                    if not piece:
                        break
                    got += piece
        except OSError as exc:
            assert exc.errno in READ_ERRNOS | {errno.ESTALE}, exc
        else:
            assert bytes(got) in (old, new), \
                "a read served a mix of the old and the rewritten file as one complete file"


@pytest.fixture
def sshd_without_dac_override(tmp_path: Path, share: Path) -> Iterator[SshServer]:
    """An sshd whose sftp-server runs as root without CAP_DAC_OVERRIDE/READ_SEARCH, so that
    file modes bind it as they would bind an ordinary user's server."""
    server = SshServer(tmp_path / "sshd-nodac", share=share)
    lines = []
    for line in server.config.read_text().splitlines():
        if line.startswith("Subsystem sftp "):
            line = ("Subsystem sftp /usr/bin/setpriv --bounding-set -dac_override,-dac_read_search "
                    "-- " + server._sftp_server)
        lines.append(line)
    server.config.write_text("\n".join(lines) + "\n")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_server_permission_error_is_eacces(mount_factory, sshd_without_dac_override, share: Path,
                                           tmp_path: Path) -> None:
    server = sshd_without_dac_override
    (share / "secret.txt").write_bytes(b"secret")
    (share / "open.txt").write_bytes(b"open")
    os.chmod(share / "secret.txt", 0)
    try:
        with mount_factory("--identity", str(server.identity), remote=server.address(),
                           known_hosts=server.known_hosts, check_log=False) as mount:
            mnt = mount.mountpoint
            assert (mnt / "open.txt").read_bytes() == b"open"
            with pytest.raises(OSError) as info:
                run_with_timeout((mnt / "secret.txt").read_bytes, 20, "reading secret.txt")
            assert info.value.errno == errno.EACCES, info.value
            st_ = status(mnt)
            assert st_["state"] in ("online", "syncing"), f"a permission error took the mount offline: {st_}"
            assert "Traceback" not in mount.log_text()
    finally:
        os.chmod(share / "secret.txt", 0o600)


@pytest.mark.parametrize("verbose", [False, True])
def test_server_closing_during_connect_is_one_warning(tmp_path: Path, verbose: bool) -> None:
    """A server going down resets connections while they are being made: paramiko logs
    that as an ERROR and its traceback line by line; the mount's log tells one warning,
    with --verbose too."""
    import logging
    import socket
    import struct

    import paramiko

    from cachefs.daemon import setup_logging

    listener = socket.create_server(("127.0.0.1", 0))

    def reset_one() -> None:
        conn, _ = listener.accept()
        conn.recv(256)  # the client's banner
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # an RST instead of the server's banner

    server = threading.Thread(target=reset_one, daemon=True)
    server.start()
    log_file = tmp_path / "mount.log"
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging(verbose, log_file)
        sock = socket.create_connection(listener.getsockname())
        transport = paramiko.Transport(sock)
        with pytest.raises(paramiko.SSHException):
            transport.start_client(timeout=10)
        transport.close()
        server.join(10)
        for handler in logging.getLogger().handlers:
            handler.flush()
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        listener.close()
    text = log_file.read_text()
    assert "WARNING paramiko.transport: Exception (client): Error reading SSH protocol banner" in text
    assert " ERROR " not in text, text
    assert "Traceback" not in text, text


def test_a_reply_the_kernel_no_longer_waits_for_is_not_an_error() -> None:
    """pyfuse3's ERROR for a reply refused with ENOENT (a RELEASE answered just after
    `fusermount -u`, an interrupted program's request) is told at DEBUG; its other reply
    failures stay errors. (Pure logic: the records pyfuse3's handlers make.)"""
    import logging

    from cachefs.daemon import _late_replies

    def record(error: str) -> logging.LogRecord:
        return logging.LogRecord("pyfuse3", logging.ERROR, "handlers.pxi", 1,
                                 "fuse_release(): fuse_reply_* failed with %s", (error,), None)

    late = record("No such file or directory")
    assert _late_replies(late) is logging.getLogger().isEnabledFor(logging.DEBUG)
    assert late.levelname == "DEBUG"
    other = record("Invalid argument")
    assert _late_replies(other) and other.levelname == "ERROR"
