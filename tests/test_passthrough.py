"""FUSE passthrough end to end: the kernel reads whole cached files straight from the cache.

A read that did not go through the mount process is told apart from one that did by
stopping the process (SIGSTOP) with a file open: its pages are dropped first, so a read
served by the process hangs until it runs again, and one the kernel serves from the content
file does not. Writers that join the kernel's readers, a kill -9 while such a writer is
open, and a remote change while the file is open are checked against the server.

Passthrough needs root (the kernel's backing files need CAP_SYS_ADMIN), Linux 6.9+ and the
pyfuse3 built by ``scripts/build-passthrough``; ``scripts/run`` builds it, and these tests
fail (not skip) where it is missing, since then the mount serves every read itself.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.mount import status
from tests.test_writes import sync, wait_for

SIZE = 3 << 20  # above PASSTHROUGH_MIN (1 MiB)
STOPPED_READ = 10.0  # a read the kernel serves itself is done well within this


def _passthrough_files(mnt: Path) -> int:
    return status(mnt)["passthrough"]["open_files"]


def _open_through_kernel(path: Path, flags: int = os.O_RDONLY, within: float = 15.0) -> int:
    """Open ``path`` once its content is whole in the cache, so that the kernel reads it
    itself: the first opens after a read may still find the content being saved."""
    deadline = time.monotonic() + within
    while True:
        with open(path, "rb") as f:
            f.read()
        fd = os.open(path, flags)
        if _passthrough_files(path.parent) == 1:
            return fd
        os.close(fd)
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} was never opened in passthrough within {within} s")
        time.sleep(0.2)


def _mount_and_open(mount_factory, share: Path, name: str, data: bytes):
    """A mount with the share's file ``name`` holding ``data``, and that file open in
    passthrough: (the mount, the file's path in it, the open descriptor)."""
    (share / name).write_bytes(data)
    mount = mount_factory().start()
    path = mount.mountpoint / name
    return mount, path, _open_through_kernel(path)


def _read_while_stopped(pid: int, fd: int, size: int, deadline: float) -> tuple[bytes | None, bool]:
    """Read ``fd`` whole with the mount process stopped; (data, whether it was done within
    ``deadline``). The process runs again before this returns, so a late read ends too."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # no page of it in the page cache
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(os.pread(fd, size, 0)), daemon=True)
    os.kill(pid, signal.SIGSTOP)
    try:
        reader.start()
        reader.join(deadline)
        in_time = not reader.is_alive()
    finally:
        os.kill(pid, signal.SIGCONT)
    reader.join(30)
    return (got[0] if got else None), in_time


def test_the_kernel_reads_a_whole_cached_file_itself(mount_factory, share: Path, tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    (share / "big.bin").write_bytes(data)
    (share / "small.txt").write_bytes(b"small\n" * 100)
    mount = mount_factory().start()
    mnt = mount.mountpoint
    assert status(mnt)["passthrough"] == {"on": True, "open_files": 0}, \
        "passthrough is off: is this the pyfuse3 of scripts/build-passthrough, and root?"
    fd = _open_through_kernel(mnt / "big.bin")
    try:
        got, in_time = _read_while_stopped(mount.pid, fd, SIZE, STOPPED_READ)
    finally:
        os.close(fd)
    assert in_time, "a read of a whole cached file waited for the stopped mount process"
    assert got == data
    assert _passthrough_files(mnt) == 0, "the backing file outlived the last close"
    # A small file is served by the process and kept in the page cache, as before.
    with open(mnt / "small.txt", "rb") as f:
        assert f.read() == b"small\n" * 100
        assert _passthrough_files(mnt) == 0


@pytest.mark.parametrize("why", ["--no-passthrough", "--encrypt-cache"])
def test_without_passthrough_the_process_serves_reads(mount_factory, share: Path, tmp_path: Path,
                                                      why: str) -> None:
    """The same read hangs while the process is stopped: the check above can fail."""
    data = os.urandom(SIZE)
    (share / "big.bin").write_bytes(data)
    args = ["--no-passthrough"] if why == "--no-passthrough" else ["--cache-key-file", str(tmp_path / "key")]
    if why == "--encrypt-cache":
        (tmp_path / "key").write_bytes(os.urandom(32).hex().encode())
        os.chmod(tmp_path / "key", 0o600)
    mount = mount_factory(*args).start()
    mnt = mount.mountpoint
    assert status(mnt)["passthrough"] == {"on": False, "open_files": 0, "off": {
        "--no-passthrough": "--no-passthrough", "--encrypt-cache": "the cache is encrypted"}[why]}
    with open(mnt / "big.bin", "rb") as f:
        assert f.read() == data
    time.sleep(1.5)  # the checkpoint marks the content whole
    fd = os.open(mnt / "big.bin", os.O_RDONLY)
    try:
        assert _passthrough_files(mnt) == 0
        got, in_time = _read_while_stopped(mount.pid, fd, SIZE, 2.0)
    finally:
        os.close(fd)
    assert not in_time, "a read went past the mount process with passthrough off"
    assert got == data


def test_a_writer_joins_the_kernels_readers(mount_factory, share: Path) -> None:
    data = bytearray(os.urandom(2 << 20))
    mount, path, reader = _mount_and_open(mount_factory, share, "log.bin", data)
    mnt = mount.mountpoint
    try:
        with open(path, "r+b") as writer:  # the kernel takes only passthrough opens now
            assert _passthrough_files(mnt) == 1
            writer.seek(100)
            writer.write(b"X" * 10)
            writer.seek(0, os.SEEK_END)
            writer.write(b"appended" * 125)
            writer.flush()
            # Sizes and the reader's view come from the content file while it is open.
            assert os.stat(path).st_size == len(data) + 1000
            assert os.pread(reader, 10, 100) == b"X" * 10
    finally:
        os.close(reader)
    data[100:110] = b"X" * 10
    data += b"appended" * 125
    assert os.stat(path).st_size == len(data)
    assert _passthrough_files(mnt) == 0
    sync(mnt)
    assert (share / "log.bin").read_bytes() == bytes(data)
    with open(path, "rb") as f:  # and a new open (not through the kernel: pages) reads it
        assert f.read() == bytes(data)


def test_kill_while_a_writer_writes_through_the_kernel(mount_factory, share: Path) -> None:
    data = bytearray(os.urandom(2 << 20))
    mount, path, reader = _mount_and_open(mount_factory, share, "db.bin", data)
    writer = os.open(path, os.O_RDWR)
    os.pwrite(writer, b"changed", 5000)
    os.pwrite(writer, b"tail", len(data))
    mount.kill9()
    for fd in (reader, writer):
        try:
            os.close(fd)
        except OSError:
            pass
    data[5000:5007] = b"changed"
    data += b"tail"
    again = mount_factory().start()
    wait_for(lambda: status(again.mountpoint)["state"] == "online", 15, "online")
    sync(again.mountpoint)
    assert (share / "db.bin").read_bytes() == bytes(data), "a write through the kernel was lost"


def test_remote_change_while_open(mount_factory, share: Path) -> None:
    old = os.urandom(2 << 20)
    new = os.urandom(3 << 20)
    mount, path, reader = _mount_and_open(mount_factory, share, "doc.bin", old)
    mnt = mount.mountpoint
    try:
        (share / "doc.bin").write_bytes(new)
        os.utime(share / "doc.bin", (1_700_000_000, 1_700_000_000))
        # A listing after the attribute timeout finds the change and drops the content.
        wait_for(lambda: (os.listdir(mnt), os.stat(path).st_size)[1] == len(new), 15,
                 "the mount to see the new size")
        # The open file keeps its version, whole: not cut to nothing, not mixed.
        assert os.pread(reader, len(old) + 10, 0) == old
        # A writer would write into that old version: refused until it is closed.
        with pytest.raises(OSError) as raised:
            os.open(path, os.O_RDWR)
        assert raised.value.errno == errno.EBUSY
    finally:
        os.close(reader)
    with open(path, "rb") as f:
        assert f.read() == new
    with open(path, "r+b") as f:  # and writers are welcome again
        f.write(b"ok")
    sync(mnt)
    assert (share / "doc.bin").read_bytes() == b"ok" + new[2:]


def test_a_conflict_while_open_leaves_the_open_version_whole(mount_factory, share: Path) -> None:
    """Review: a file read by the kernel itself, a writer joined, the server's copy changed
    too; the sync's conflict keeps both, and the handle still open reads the version it
    had, whole: the conflict dropped the content in place and the reader found it empty."""
    from tests.test_conflicts import change_on_server, copies_of
    old = os.urandom(2 << 20)
    (share / "a.bin").write_bytes(old)
    mount = mount_factory("--write-back-hold", "60").start()
    mnt = mount.mountpoint
    reader = _open_through_kernel(mnt / "a.bin")
    try:
        with open(mnt / "a.bin", "r+b") as writer:
            writer.write(b"LOCAL")
        server = b"SERVER" + os.urandom(4000)
        change_on_server(share / "a.bin", server)
        sync(mnt)
        assert os.pread(reader, 3 << 20, 0) == b"LOCAL" + old[5:]
    finally:
        os.close(reader)
    assert (mnt / "a.bin").read_bytes() == server
    [copy] = copies_of(mnt, "a.bin")
    assert (mnt / copy).read_bytes() == b"LOCAL" + old[5:]


def test_a_cache_on_overlayfs(mount_factory, share: Path, tmp_path: Path) -> None:
    """Containers keep their files on overlayfs: a backing file there is one filesystem
    deeper, which the mount must declare at FUSE_INIT or the kernel refuses it (ELOOP)."""
    # The layers on a tmpfs of their own: an overlayfs cannot take its upper layer from
    # another overlayfs (as tmp_path is when the suite itself runs in a container).
    base = tmp_path / "layers"
    base.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(base)], check=True, timeout=30)
    layers = {name: base / name for name in ("lower", "upper", "work", "merged")}
    for folder in layers.values():
        folder.mkdir()
    try:
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={layers['lower']},upperdir={layers['upper']},workdir={layers['work']}",
                        str(layers["merged"])], check=True, timeout=30)
    except BaseException:
        subprocess.run(["umount", str(base)], timeout=30)
        raise
    try:
        data = os.urandom(SIZE)
        (share / "big.bin").write_bytes(data)
        mount = mount_factory("--cache-dir", str(layers["merged"] / "cache")).start()
        fd = _open_through_kernel(mount.mountpoint / "big.bin")
        try:
            assert os.pread(fd, SIZE, 0) == data
        finally:
            os.close(fd)
        mount.stop()
    finally:
        subprocess.run(["umount", str(layers["merged"])], check=True, timeout=30)
        subprocess.run(["umount", str(base)], check=True, timeout=30)


def test_a_refused_backing_file_turns_passthrough_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registering a backing file fails for a mount process without CAP_SYS_ADMIN (EPERM):
    passthrough is then off for the rest of the mount, with the reason, and opens go on as
    before. (The kernel's refusal stood in for: the mounts of this suite run as root.)"""
    from cachefs import fs

    asked: list[int] = []

    def refuse(fd: int) -> int:
        asked.append(fd)
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(fs, "_backing_open", refuse)
    kernel = fs.KernelNotifier()
    kernel.passthrough_granted = True
    assert kernel.passthrough
    assert kernel.backing_open(7) == 0
    assert not kernel.passthrough
    assert kernel.passthrough_off == \
        "the kernel refused a backing file (Operation not permitted: the mount process is not root)"
    assert kernel.backing_open(7) == 0  # not asked again
    assert asked == [7]


def test_backing_files_need_a_request_being_answered() -> None:
    """The fork's backing_open/backing_close call libfuse's fuse_passthrough_open/close,
    which take the request being answered: outside an open, create or release handler
    they refuse, before any ioctl."""
    import pyfuse3

    for call, arg in ((getattr(pyfuse3, "backing_open"), 0), (getattr(pyfuse3, "backing_close"), 1)):
        with pytest.raises(RuntimeError, match="open, create or release handler"):
            call(arg)


def test_a_process_without_cap_sys_admin_knows_it() -> None:
    """``can_register_backing_files`` reads the process's own effective capabilities: true
    for this suite's root, false for a process started without CAP_SYS_ADMIN (as a user's
    mount runs). Real processes, no stand-in."""
    import sys

    from cachefs import fs

    assert os.geteuid() == 0, "this suite runs as root"
    assert fs.can_register_backing_files()
    code = "from cachefs.fs import can_register_backing_files as c; print(c())"
    result = subprocess.run(["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin",
                             sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_status_says_off_from_the_start_without_cap_sys_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel grants passthrough at FUSE_INIT to any mount, then refuses each backing
    file to a process without CAP_SYS_ADMIN: ``init`` turns it off at once with the reason,
    so that ``cachefs status`` does not say ``on`` until the first large file is opened.
    (The grant and the capability stood in for: the kernel's answer at FUSE_INIT cannot be
    had without a mount, and this suite's mounts run as root.)"""
    import trio

    from cachefs import cli, fs

    monkeypatch.setattr(fs, "_passthrough_granted", lambda: True)
    for capable, on in ((True, True), (False, False)):
        monkeypatch.setattr(fs, "can_register_backing_files", lambda: capable)
        ops = fs.Operations.__new__(fs.Operations)  # init uses only these attributes
        ops.enable_passthrough, ops.kernel, ops.initialized = True, fs.KernelNotifier(), trio.Event()
        ops.init()
        assert ops.kernel.passthrough is on
        text = cli._passthrough_text({"on": ops.kernel.passthrough, "off": ops.kernel.passthrough_off,
                                      "open_files": 0})
        assert text.startswith("on (") if on else text == (
            "off (the mount process is not root (backing files need CAP_SYS_ADMIN); "
            "this process serves every read)")
