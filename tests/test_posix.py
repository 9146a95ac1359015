"""POSIX behaviour of a real mount, compared with a local directory (ext4 or tmpfs under
the pytest temp folder) as the reference: the same function runs on both and the results
must be equal. Online and offline (``offline`` written to the control file).

Where cachefs differs on purpose (ownership, chown, RENAME_EXCHANGE, xattrs, special files,
st_blocks of sparse files), the test asserts the documented cachefs behaviour instead:
see docs/posix.md. Every wait is bounded; the mount is stopped by the fixture.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.mount import status
from tests.test_writes import control, go_offline, sync_until_done

NOBODY = 65534
CHILD_TIMEOUT = 30.0
TICK = 0.03  # longer than ext4's timestamp granularity (one jiffy)

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: Path | str, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    times = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def renameat2(src: Path | str, dst: Path | str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src))


def errno_of(action: Callable[[], object]) -> str:
    """The errno name an action fails with, or "ok"."""
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok"


def close_fd(fd: int) -> None:
    os.close(fd)


class Pair:
    """A folder in the mount and the same folder on a local filesystem."""

    def __init__(self, mount, share: Path, local: Path, offline: bool) -> None:
        self.mount = mount
        self.mnt: Path = mount.mountpoint
        self.share = share
        self.offline = offline
        self.local = local
        if offline:
            go_offline(self.mnt)
        self.cfs = self.mnt / "w"
        self.cfs.mkdir()
        self.ref = local / "w"
        self.ref.mkdir()
        os.chmod(self.cfs, 0o755)
        os.chmod(self.ref, 0o755)

    def both(self, function: Callable[[Path], object]) -> tuple[object, object]:
        """(on the mount, on the reference)."""
        return function(self.cfs), function(self.ref)

    def compare(self, function: Callable[[Path], dict]) -> None:
        got, want = self.both(function)
        assert isinstance(got, dict) and isinstance(want, dict)
        diff = {k: (got.get(k), want.get(k)) for k in sorted(set(got) | set(want))
                if got.get(k) != want.get(k)}
        assert not diff, f"(cachefs, local) differ: {diff}"

    def replay(self) -> None:
        if self.offline:
            control(self.mnt, "online")
        sync_until_done(self.mnt, 60)
        st = status(self.mnt)
        assert st["pending"] == 0 and st["conflicts"] == 0, st


@pytest.fixture(params=["online", "offline"])
def pair(request, mount_factory, share: Path, tmp_path: Path):
    local = tmp_path / "local"
    local.mkdir()
    with mount_factory("-o", "allow_other") as mount:
        p = Pair(mount, share, local, request.param == "offline")
        yield p
        p.replay()


def as_user(root: Path, function: Callable[[], Any], uid: int = NOBODY, gid: int | None = None,
            groups: tuple[int, ...] = ()) -> Any:
    """Run ``function`` in a forked child that entered ``root`` and then became ``uid``
    (``gid``, default ``uid``; supplementary ``groups``); its result comes back as JSON."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            os.chdir(root)
            os.setgroups(list(groups))
            os.setgid(uid if gid is None else gid)
            os.setuid(uid)
            os.write(write_end, json.dumps(function()).encode())
            code = 0
        except BaseException as exc:  # reported through the pipe
            try:
                os.write(write_end, json.dumps({"child error": repr(exc)}).encode())
            except BaseException:
                pass
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + CHILD_TIMEOUT
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"the child as uid {uid} did not finish in {CHILD_TIMEOUT} s")
            ready, _, _ = select.select([read_end], [], [], left)
            if ready:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b"{}")
    assert not (isinstance(result, dict) and "child error" in result), result
    return result


# -- error codes -------------------------------------------------------------------------------

LONG = "n" * 256


def _setup_errors(root: Path) -> None:
    (root / "f").write_bytes(b"file")
    (root / "g").write_bytes(b"other file")
    (root / "d").mkdir()
    (root / "e").mkdir()
    (root / "full" / "sub").mkdir(parents=True)
    (root / "full" / "x.txt").write_bytes(b"x")
    os.symlink("f", root / "sym")
    os.symlink("missing", root / "dangling")


def _error_cases(root: Path) -> dict[str, Callable[[], object]]:
    r = root
    return {
        # ENOENT
        "stat missing": lambda: os.stat(r / "missing"),
        "open missing": lambda: open(r / "missing", "rb"),
        "unlink missing": lambda: os.unlink(r / "missing"),
        "rmdir missing": lambda: os.rmdir(r / "missing"),
        "rename missing": lambda: os.rename(r / "missing", r / "x"),
        "link missing": lambda: os.link(r / "missing", r / "x"),
        "chmod missing": lambda: os.chmod(r / "missing", 0o644),
        "utime missing": lambda: os.utime(r / "missing"),
        "truncate missing": lambda: os.truncate(r / "missing", 0),
        "readlink missing": lambda: os.readlink(r / "missing"),
        "listdir missing": lambda: os.listdir(r / "missing"),
        "mkdir in missing": lambda: os.mkdir(r / "missing" / "x"),
        "create in missing": lambda: open(r / "missing" / "x", "wb"),
        "open dangling symlink": lambda: open(r / "dangling", "rb"),
        # EEXIST
        "mkdir existing dir": lambda: os.mkdir(r / "d"),
        "mkdir existing file": lambda: os.mkdir(r / "f"),
        "O_EXCL existing": lambda: close_fd(os.open(r / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
        "O_EXCL dangling symlink": lambda: close_fd(os.open(r / "dangling", os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
        "symlink over existing": lambda: os.symlink("x", r / "f"),
        "link over existing": lambda: os.link(r / "f", r / "g"),
        "rename noreplace existing": lambda: renameat2(r / "f", r / "g", RENAME_NOREPLACE),
        # ENOTDIR
        "listdir file": lambda: os.listdir(r / "f"),
        "open under file": lambda: open(r / "f" / "x", "rb"),
        "create under file": lambda: open(r / "f" / "x", "wb"),
        "mkdir under file": lambda: os.mkdir(r / "f" / "x"),
        "rmdir file": lambda: os.rmdir(r / "f"),
        "rename dir over file": lambda: os.rename(r / "d", r / "f"),
        "O_DIRECTORY on file": lambda: close_fd(os.open(r / "f", os.O_RDONLY | os.O_DIRECTORY)),
        "rmdir symlink": lambda: os.rmdir(r / "sym"),
        # EISDIR
        "open dir for write": lambda: close_fd(os.open(r / "d", os.O_WRONLY)),
        "unlink dir": lambda: os.unlink(r / "d"),
        "rename file over dir": lambda: os.rename(r / "f", r / "d"),
        "truncate dir": lambda: os.truncate(r / "d", 0),
        # ENOTEMPTY
        "rmdir non-empty": lambda: os.rmdir(r / "full"),
        "rename dir over non-empty": lambda: os.rename(r / "d", r / "full"),
        # ENAMETOOLONG (a 256-byte name)
        "create long": lambda: open(r / LONG, "wb"),
        "mkdir long": lambda: os.mkdir(r / LONG),
        "stat long": lambda: os.stat(r / LONG),
        "rename to long": lambda: os.rename(r / "g", r / LONG),
        "symlink long": lambda: os.symlink("f", r / LONG),
        "link long": lambda: os.link(r / "f", r / LONG),
        # EINVAL
        "rename dir into itself": lambda: os.rename(r / "full", r / "full" / "sub" / "x"),
        "rename dir onto own child": lambda: os.rename(r / "full", r / "full" / "sub"),
        "readlink of a file": lambda: os.readlink(r / "f"),
        "rmdir dot": lambda: os.rmdir(os.path.join(r, "d", ".")),
        # ELOOP
        "O_NOFOLLOW on symlink": lambda: close_fd(os.open(r / "sym", os.O_RDONLY | os.O_NOFOLLOW)),
    }


def test_error_codes(pair: Pair) -> None:
    pair.both(_setup_errors)
    got, want = pair.both(lambda root: {k: errno_of(c) for k, c in _error_cases(root).items()})
    assert all(v != "ok" for v in want.values()), want
    diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not diff, f"(cachefs, local) errno differ: {diff}"
    assert sorted(os.listdir(pair.cfs)) == sorted(os.listdir(pair.ref))


def test_exdev_across_filesystems(pair: Pair, tmp_path: Path) -> None:
    """link(2) and rename(2) between the mount and another filesystem fail with EXDEV;
    the reference is the same between the local folder and /dev/shm (tmpfs)."""
    other_for_mount = tmp_path / "outside.txt"  # /tmp: not the mount
    other_for_mount.write_bytes(b"outside")
    shm = Path("/dev/shm") / f"cachefs-test-{os.getpid()}"
    shm.mkdir(exist_ok=True)
    try:
        (shm / "outside.txt").write_bytes(b"outside")
        assert os.stat(shm).st_dev != os.stat(pair.ref).st_dev, \
            "/dev/shm is on the same filesystem as the temp folder: no cross-device reference"

        def cases(root: Path, other: Path) -> dict:
            (root / "inside.txt").write_bytes(b"inside")
            return {
                "link in": errno_of(lambda: os.link(other, root / "in")),
                "link out": errno_of(lambda: os.link(root / "inside.txt", other.parent / "out")),
                "rename in": errno_of(lambda: os.rename(other, root / "in")),
                "rename out": errno_of(lambda: os.rename(root / "inside.txt", other.parent / "out")),
            }

        got = cases(pair.cfs, other_for_mount)
        want = cases(pair.ref, shm / "outside.txt")
        assert got == want == {k: "EXDEV" for k in want}
    finally:
        for p in sorted(shm.iterdir()):
            p.unlink()
        shm.rmdir()


# -- permissions as a non-root user (default_permissions) ------------------------------------

def _setup_permissions(root: Path) -> None:
    (root / "none").write_bytes(b"mode 000")
    os.chmod(root / "none", 0o000)
    (root / "readable").write_bytes(b"mode 644")
    os.chmod(root / "readable", 0o644)
    (root / "open").write_bytes(b"mode 666")
    os.chmod(root / "open", 0o666)
    (root / "private").mkdir()
    os.chmod(root / "private", 0o700)
    (root / "pub").mkdir()
    os.chmod(root / "pub", 0o777)
    (root / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "suid", 0o6777)
    (root / "suid_root").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "suid_root", 0o4755)


def _as_nobody_cases() -> dict:
    def write(path: str) -> None:
        with open(path, "r+b") as f:
            f.write(b"!")

    def create(path: str) -> None:
        with open(path, "wb") as f:
            f.write(b"by nobody")

    results = {
        "read 000": errno_of(lambda: open("none", "rb").close()),
        "read 644": errno_of(lambda: open("readable", "rb").close()),
        "write 644": errno_of(lambda: write("readable")),
        "write 666": errno_of(lambda: write("open")),
        "create in 755 dir": errno_of(lambda: create("new")),
        "unlink in 755 dir": errno_of(lambda: os.unlink("readable")),
        "mkdir in 755 dir": errno_of(lambda: os.mkdir("newdir")),
        "listdir 700": errno_of(lambda: os.listdir("private")),
        "create in 777 dir": errno_of(lambda: create("pub/mine")),
        "chmod not own": errno_of(lambda: os.chmod("readable", 0o777)),
        "utime now, writable": errno_of(lambda: os.utime("open")),
        "utime set, not own": errno_of(lambda: os.utime("open", (1, 1))),
        "write to 6777 file": errno_of(lambda: write("suid")),
    }
    results["mode of 6777 file after write"] = oct(stat.S_IMODE(os.stat("suid").st_mode))
    return results


def test_permissions_as_nobody(pair: Pair) -> None:
    pair.both(_setup_permissions)
    got, want = pair.both(lambda root: as_user(root, _as_nobody_cases))
    diff = {k: (got.get(k), want.get(k)) for k in want if got.get(k) != want.get(k)}
    assert not diff, f"(cachefs, local) differ for uid {NOBODY}: {diff}"
    assert want["read 000"] == "EACCES" and want["read 644"] == "ok"


def test_root_write_keeps_setuid(pair: Pair) -> None:
    """Root (CAP_FSETID) writing to a setuid file: a local filesystem keeps the bits."""
    pair.both(_setup_permissions)

    def write_as_root(root: Path) -> str:
        with open(root / "suid_root", "r+b") as f:
            f.write(b"!")
        return oct(stat.S_IMODE(os.stat(root / "suid_root").st_mode))

    got, want = pair.both(write_as_root)
    assert got == want, f"mode after root's write: cachefs {got}, local {want}"


# -- timestamps -----------------------------------------------------------------------------------

def _write(p: Path) -> None:
    with open(p, "r+b") as f:
        f.write(b"more")


def _times_actions() -> dict[str, Callable[[Path], None]]:
    return {
        "write": lambda r: _write(r / "f"),
        "append": lambda r: open(r / "f", "ab").write(b"+"),
        "truncate down": lambda r: os.truncate(r / "f", 2),
        "truncate up": lambda r: os.truncate(r / "f", 2000),
        "truncate same size": lambda r: os.truncate(r / "f", 8),
        "O_TRUNC open": lambda r: open(r / "f", "wb").close(),
        "open for write, no write": lambda r: open(r / "f", "r+b").close(),
        "read": lambda r: open(r / "f", "rb").read(),
        "chmod": lambda r: os.chmod(r / "f", 0o600),
        "rename": lambda r: os.rename(r / "f", r / "f2"),
        "rename over": lambda r: os.rename(r / "other", r / "f"),
        "create": lambda r: open(r / "new", "wb").close(),
        "unlink": lambda r: os.unlink(r / "other"),
        "link": lambda r: os.link(r / "f", r / "hard"),
        "unlink one of two links": lambda r: os.unlink(r / "f_link"),
        "mkdir": lambda r: os.mkdir(r / "newdir"),
        "rmdir": lambda r: os.rmdir(r / "sub"),
        "symlink": lambda r: os.symlink("f", r / "newsym"),
        "utime now": lambda r: os.utime(r / "f"),
        "utime ns": lambda r: os.utime(r / "f", ns=(1_000_000_000_123_456_789, 1_100_000_000_987_654_321)),
        "utime omit atime": lambda r: utimensat(r / "f", (0, UTIME_OMIT), (1_200_000_000, 5)),
        "utime omit mtime": lambda r: utimensat(r / "f", (1_300_000_000, 7), (0, UTIME_OMIT)),
        "utime now mtime only": lambda r: utimensat(r / "f", (0, UTIME_OMIT), (0, UTIME_NOW)),
    }


def _times_of(action: Callable[[Path], None]) -> Callable[[Path], dict]:
    def measure(root: Path) -> dict:
        case = root / "case"
        if case.exists():
            raise AssertionError("one case at a time")
        case.mkdir()
        (case / "f").write_bytes(b"01234567")
        (case / "other").write_bytes(b"other")
        os.link(case / "f", case / "f_link")
        (case / "sub").mkdir()
        os.utime(case / "f", ns=(1_000_000_000, 1_000_000_000))  # atime before mtime: relatime
        time.sleep(TICK)
        file_before = os.stat(case / "f")
        dir_before = os.stat(case)
        time.sleep(TICK)
        action(case)
        name = "f2" if (case / "f2").exists() else "f"
        file_after = os.stat(case / name)
        dir_after = os.stat(case)
        result = {
            "file mtime": _changed(file_before.st_mtime_ns, file_after.st_mtime_ns),
            "file ctime": _changed(file_before.st_ctime_ns, file_after.st_ctime_ns),
            "file atime": _changed(file_before.st_atime_ns, file_after.st_atime_ns),
            "dir mtime": _changed(dir_before.st_mtime_ns, dir_after.st_mtime_ns),
            "dir ctime": _changed(dir_before.st_ctime_ns, dir_after.st_ctime_ns),
            "file size": file_after.st_size,
        }
        for p in sorted(case.rglob("*"), key=lambda p: -len(p.parts)):
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()
        case.rmdir()
        return result
    return measure


def _changed(before: int, after: int) -> str | int:
    """"same", "now" (changed to the present), or the exact new value when set on purpose."""
    if after == before:
        return "same"
    if abs(after - time.time_ns()) < 5 * 10**9:
        return "now"
    return after


def test_timestamps(pair: Pair) -> None:
    problems = {}
    for name, action in _times_actions().items():
        got, want = pair.both(_times_of(action))
        if name == "read":  # documented: reads never update atime (as with noatime)
            assert got["file atime"] == "same", got
            got["file atime"] = want["file atime"]
        diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        if diff:
            problems[name] = diff
    assert not problems, f"(cachefs, local) differ: {problems}"


# -- modes, link counts, rename, truncate, open flags -----------------------------------------

def test_mode_bits(pair: Pair) -> None:
    def modes(root: Path) -> dict:
        out = {}
        for mode in (0o644, 0o600, 0o755, 0o000, 0o4755, 0o2755, 0o1777, 0o7777, 0o444):
            p = root / f"m{mode:o}"
            p.write_bytes(b"x")
            os.chmod(p, mode)
            out[f"file {mode:o}"] = oct(stat.S_IMODE(os.stat(p).st_mode))
            d = root / f"d{mode:o}"
            os.mkdir(d)
            os.chmod(d, mode)
            out[f"dir {mode:o}"] = oct(stat.S_IMODE(os.stat(d).st_mode))
            os.chmod(d, 0o755)
        old = os.umask(0o027)
        try:
            os.close(os.open(root / "umask", os.O_CREAT | os.O_WRONLY, 0o777))
            os.mkdir(root / "umaskdir", 0o777)
        finally:
            os.umask(old)
        out["create 777 umask 027"] = oct(stat.S_IMODE(os.stat(root / "umask").st_mode))
        out["mkdir 777 umask 027"] = oct(stat.S_IMODE(os.stat(root / "umaskdir").st_mode))
        out["kinds"] = sorted((n, stat.S_IFMT(os.lstat(root / n).st_mode)) for n in os.listdir(root))
        return out

    pair.compare(modes)


def test_link_counts(pair: Pair) -> None:
    def counts(root: Path) -> dict:
        out = {}
        (root / "f").write_bytes(b"f")
        out["file"] = os.stat(root / "f").st_nlink
        os.link(root / "f", root / "f2")
        os.link(root / "f", root / "f3")
        out["file 3 links"] = os.stat(root / "f").st_nlink
        out["same inode"] = os.stat(root / "f").st_ino == os.stat(root / "f3").st_ino
        os.unlink(root / "f2")
        out["file after unlink"] = os.stat(root / "f3").st_nlink
        (root / "f3").write_bytes(b"through another name")
        out["content through the first name"] = (root / "f").read_bytes().decode()
        os.mkdir(root / "d")
        out["new dir"] = os.stat(root / "d").st_nlink
        for name in ("a", "b", "c"):
            os.mkdir(root / "d" / name)
        (root / "d" / "file").write_bytes(b"")
        out["dir with 3 subdirs"] = os.stat(root / "d").st_nlink
        os.rmdir(root / "d" / "a")
        out["after rmdir"] = os.stat(root / "d").st_nlink
        os.rename(root / "d" / "b", root / "b")
        out["after moving one out"] = os.stat(root / "d").st_nlink
        out["parent after moving one in"] = os.stat(root).st_nlink
        os.rename(root / "b", root / "d" / "b2")
        out["after moving it back"] = os.stat(root / "d").st_nlink
        return out

    pair.compare(counts)


def test_rename_semantics(pair: Pair) -> None:
    def renames(root: Path) -> dict:
        out = {}
        (root / "old").write_bytes(b"old content")
        (root / "new").write_bytes(b"new content")
        with open(root / "old", "rb") as held:  # atomic replace: the open file is the old one
            os.rename(root / "new", root / "old")
            out["held reads"] = held.read().decode()
        out["replaced"] = (root / "old").read_bytes().decode()
        out["new gone"] = not (root / "new").exists()
        os.mkdir(root / "src")
        (root / "src" / "inner").write_bytes(b"inner")
        os.mkdir(root / "empty")
        os.rename(root / "src", root / "empty")  # a folder over an empty folder
        out["dir over empty"] = sorted(os.listdir(root / "empty"))
        os.mkdir(root / "other")
        out["dir over non-empty"] = errno_of(lambda: os.rename(root / "other", root / "empty"))
        (root / "a").write_bytes(b"same")
        os.link(root / "a", root / "b")
        os.rename(root / "a", root / "b")  # two names of one file: nothing happens
        out["rename onto own hard link"] = sorted(n for n in os.listdir(root) if n in ("a", "b"))
        os.rename(root / "b", root / "b")
        out["rename onto itself"] = (root / "b").read_bytes().decode()
        os.symlink("old", root / "sl")
        os.rename(root / "sl", root / "sl2")
        out["symlink renamed"] = os.readlink(root / "sl2")
        os.mkdir(root / "deep")
        os.rename(root / "empty", root / "deep" / "moved")
        out["moved tree"] = sorted(str(p.relative_to(root)) for p in (root / "deep").rglob("*"))
        out["listing"] = sorted(os.listdir(root))
        return out

    pair.compare(renames)


def test_truncate_and_open_flags(pair: Pair) -> None:
    def flags(root: Path) -> dict:
        out = {}
        p = root / "t"
        p.write_bytes(b"0123456789")
        os.truncate(p, 4)
        out["down"] = p.read_bytes()
        os.truncate(p, 12)
        out["up"] = p.read_bytes()
        with open(p, "r+b") as f:
            f.truncate(2)
            f.seek(5)
            f.write(b"X")
        out["ftruncate then write past end"] = p.read_bytes()
        out["O_TRUNC"] = (os.close(os.open(p, os.O_WRONLY | os.O_TRUNC)), p.read_bytes())[1]
        fd = os.open(root / "excl", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.write(fd, b"excl")
        os.close(fd)
        out["O_EXCL new"] = (root / "excl").read_bytes()
        fd = os.open(root / "excl", os.O_WRONLY | os.O_APPEND)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"+a1")
        os.lseek(fd, 1, os.SEEK_SET)
        os.write(fd, b"+a2")
        out["O_APPEND after seeks"] = (os.lseek(fd, 0, os.SEEK_CUR), (root / "excl").read_bytes())
        os.close(fd)
        fd = os.open(root / "rw", os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"abcdef")
        out["pread"] = os.pread(fd, 3, 2)
        os.pwrite(fd, b"ZZ", 10)
        out["pwrite past end"] = os.pread(fd, 100, 0)
        out["fstat size"] = os.fstat(fd).st_size
        os.close(fd)
        fd = os.open(root / "ro", os.O_CREAT | os.O_RDONLY, 0o644)
        out["write on O_RDONLY"] = errno_of(lambda: os.write(fd, b"x"))
        os.close(fd)
        fd = os.open(root / "rw", os.O_WRONLY)
        out["read on O_WRONLY"] = errno_of(lambda: os.read(fd, 1))
        os.close(fd)
        return {k: v.hex() if isinstance(v, bytes) else v for k, v in out.items()}

    pair.compare(flags)


def test_unlink_open_file(pair: Pair) -> None:
    def unlinked(root: Path) -> dict:
        out = {}
        with open(root / "u", "w+b") as f:
            f.write(b"hello")
            f.flush()
            os.unlink(root / "u")
            out["listed"] = "u" in os.listdir(root)
            out["nlink"] = os.fstat(f.fileno()).st_nlink
            f.seek(0)
            out["read"] = f.read().decode()
            f.write(b" world")
            f.flush()
            f.seek(0)
            out["read after write"] = f.read().decode()
            out["size"] = os.fstat(f.fileno()).st_size
            os.fchmod(f.fileno(), 0o600)
            out["fchmod"] = oct(stat.S_IMODE(os.fstat(f.fileno()).st_mode))
        out["recreate"] = (root / "u").write_bytes(b"again") and (root / "u").read_bytes().decode()
        return out

    pair.compare(unlinked)


def test_readdir_while_changing(pair: Pair) -> None:
    """An os.scandir iterator interleaved with creates and unlinks: no name twice, every
    name present throughout is seen. Long names, so the listing takes several getdents."""
    count = 400

    def listing(root: Path) -> dict:
        folder = root / "many"
        folder.mkdir()
        stable = [f"stable-{i:04d}-" + "s" * 90 for i in range(count)]
        churn = [f"churn-{i:04d}-" + "c" * 90 for i in range(count // 4)]
        for name in stable + churn:
            (folder / name).write_bytes(b"")
        seen: list[str] = []
        added = 0
        with os.scandir(folder) as it:
            for i, entry in enumerate(it):
                seen.append(entry.name)
                if i % 10 == 0 and churn:
                    os.unlink(folder / churn.pop())
                    (folder / (f"added-{added:04d}-" + "a" * 90)).write_bytes(b"")
                    added += 1
        dupes = sorted({n for n in seen if seen.count(n) > 1})
        return {
            "duplicates": dupes,
            "stable missed": sorted(set(stable) - set(seen)),
            "final count": len(os.listdir(folder)),
        }

    got, want = pair.both(listing)
    assert want["duplicates"] == [] and want["stable missed"] == []
    assert got == want


def test_st_blocks(pair: Pair) -> None:
    def blocks(root: Path) -> dict:
        out = {}
        for size in (0, 1, 4096, 100_000, 1 << 20):
            p = root / f"b{size}"
            p.write_bytes(os.urandom(size))
            st = os.stat(p)
            out[f"{size} covers"] = st.st_blocks * 512 >= size
            out[f"{size} not absurd"] = st.st_blocks * 512 <= size + 64 * 1024
        return out

    pair.compare(blocks)


# -- deliberate differences (docs/posix.md) -----------------------------------------------------

def test_documented_differences(pair: Pair) -> None:
    c, r = pair.cfs, pair.ref
    for root in (c, r):
        (root / "f").write_bytes(b"f")
        (root / "g").write_bytes(b"g")
    # ownership: every file belongs to the mounting user; chown to anyone else: EPERM
    st = os.stat(c / "f")
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert errno_of(lambda: os.chown(r / "f", NOBODY, NOBODY)) == "ok"
    assert errno_of(lambda: os.chown(c / "f", NOBODY, NOBODY)) == "EPERM"
    assert errno_of(lambda: os.chown(c / "f", os.getuid(), os.getgid())) == "ok"
    assert errno_of(lambda: os.chown(c / "f", -1, -1)) == "ok"
    # RENAME_EXCHANGE: no remote offers an atomic exchange
    assert errno_of(lambda: renameat2(r / "f", r / "g", RENAME_EXCHANGE)) == "ok"
    assert errno_of(lambda: renameat2(c / "f", c / "g", RENAME_EXCHANGE)) == "EINVAL"
    assert (c / "f").read_bytes() == b"f"
    # xattrs: user. ones as on ext4 (tests/test_xattrs.py); user.cachefs.state read by
    # name only, never set; other namespaces ENOTSUP
    assert errno_of(lambda: os.setxattr(c / "f", "user.test", b"v")) == "ok"
    assert os.listxattr(c / "f") == ["user.test"]
    assert os.getxattr(c / "f", "user.cachefs.state").split(b",")[0] in (b"dirty", b"cached", b"full")
    assert errno_of(lambda: os.getxattr(c / "f", "user.other")) == "ENODATA"
    assert errno_of(lambda: os.removexattr(c / "f", "user.cachefs.state")) == "EPERM"
    assert errno_of(lambda: os.setxattr(c / "f", "security.test", b"v")) == "ENOTSUP"
    # special files: FIFOs (and sockets, devices) are local-only objects, never on the server
    # (tests/test_special_files.py)
    assert errno_of(lambda: os.mkfifo(r / "fifo")) == "ok"
    assert errno_of(lambda: os.mkfifo(c / "fifo")) == "ok"
    assert stat.S_ISFIFO(os.lstat(c / "fifo").st_mode)
    # (no user. attribute reaches a FIFO: the kernel answers ENODATA; cachefs status says local)
    assert errno_of(lambda: os.getxattr(c / "fifo", "user.cachefs.state")) == "ENODATA"
    # open(O_RDONLY | O_TRUNC): Linux empties the file; a mount refuses it and keeps the file
    # whole, for the kernel too (docs/posix.md)
    assert errno_of(lambda: os.close(os.open(r / "g", os.O_RDONLY | os.O_TRUNC))) == "ok"
    assert errno_of(lambda: os.close(os.open(c / "g", os.O_RDONLY | os.O_TRUNC))) == "EINVAL"
    assert (r / "g").read_bytes() == b"" and (c / "g").read_bytes() == b"g"
    # mknod of a regular file works
    os.mknod(c / "plain", 0o640 | stat.S_IFREG)
    assert stat.S_ISREG(os.stat(c / "plain").st_mode)
    # st_blocks of a sparse file: counted as if all of it were data (it is uploaded whole)
    for root in (c, r):
        with open(root / "sparse", "wb") as f:
            f.truncate(10 << 20)
    assert os.stat(r / "sparse").st_blocks * 512 < 1 << 20
    assert os.stat(c / "sparse").st_blocks * 512 >= 10 << 20
    # symlink times: set locally (utimensat AT_SYMLINK_NOFOLLOW), never sent to the server
    os.symlink("f", c / "sl")
    os.utime(c / "sl", ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000), follow_symlinks=False)
    assert os.lstat(c / "sl").st_mtime_ns == 1_000_000_000_000_000_000
    for p in (c / "sparse", r / "sparse"):
        p.unlink()
    pair.replay()
    server_link = pair.share / "w" / "sl"
    assert os.readlink(server_link) == "f"
    assert os.lstat(server_link).st_mtime_ns != 1_000_000_000_000_000_000
    assert (pair.share / "w" / "f").read_bytes() == b"f"
    assert not (pair.share / "w" / "fifo").exists()


def test_times_on_the_server_whole_seconds(pair: Pair) -> None:
    """SFTP (protocol 3) carries whole seconds: the server's copy loses the fraction,
    the mount keeps it."""
    p = pair.cfs / "t"
    p.write_bytes(b"t")
    os.utime(p, ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    pair.replay()
    assert os.stat(p).st_mtime_ns == 1_600_000_000_987_654_321
    assert os.stat(pair.share / "w" / "t").st_mtime_ns == 1_600_000_000_000_000_000
