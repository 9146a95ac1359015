"""Unmodified programs on a real mount: git, sqlite, tar, rsync, cp, editors, make, mmap,
O_APPEND, locks, a sparse file past 4 GiB, awkward names.

Each scenario runs twice, as a user would run it: ``online`` (the mount connected, changes
written back at once) and ``offline`` (``offline`` written to the control file first; then
``online`` + ``sync``). Afterwards the SERVER's copy (the share folder of the sshd fixture)
is checked, because a program that only works against the cache proves little.
Every wait is bounded; every mount is stopped (and its log checked) by the fixture.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.fixtures.mount import status
from tests.test_writes import control, go_offline, sync_until_done, wait_for

RUN_TIMEOUT = 120.0  # for any one program run


def run(*args: str | Path, cwd: Path | None = None, check: bool = True,
        env: dict | None = None, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, **(env or {})))
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} (in {cwd}) exited {result.returncode}:\n"
                             f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}")
    return result


def need(program: str) -> None:
    if shutil.which(program) is None:
        pytest.fail(f"{program} is not installed (scripts/run installs it)")


class Session:
    """One mount, used online or offline; ``replay()`` brings the server up to date."""

    def __init__(self, mount, share: Path, offline: bool) -> None:
        self.mount = mount
        self.mnt: Path = mount.mountpoint
        self.share = share
        self.offline = offline
        if offline:
            go_offline(self.mnt)
            assert status(self.mnt)["state"] == "offline"

    def replay(self, timeout: float = 60.0) -> float:
        """Online again (if offline) and sync; the seconds the replay took."""
        began = time.monotonic()
        if self.offline:
            control(self.mnt, "online")
        sync_until_done(self.mnt, timeout)
        st = status(self.mnt)
        assert st["pending"] == 0 and st["conflicts"] == 0, st
        return time.monotonic() - began


@pytest.fixture(params=["online", "offline"])
def session(request, mount_factory, share: Path):
    with mount_factory() as mount:
        yield Session(mount, share, request.param == "offline")


GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "t@example.org",
    "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent-home", "GIT_CONFIG_GLOBAL": "/dev/null",
}


def git(*args: str | Path, cwd: Path, check: bool = True) -> str:
    return run("git", "-c", "safe.directory=*", "-c", "init.defaultBranch=main", *args,
               cwd=cwd, env=GIT_ENV, check=check).stdout


def fsck_clean(repo: Path) -> None:
    out = run("git", "-c", "safe.directory=*", "fsck", "--full", "--strict", cwd=repo,
              env=GIT_ENV)
    assert "error" not in (out.stdout + out.stderr).lower(), out.stdout + out.stderr


# -- git ------------------------------------------------------------------------------------

def test_git_workflow(session: Session, tmp_path: Path) -> None:
    need("git")
    repo = session.mnt / "repo"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    for i in range(20):
        (repo / f"file{i}.txt").write_text(f"line {i}\n" * (i + 1))
    (repo / "sub").mkdir()
    (repo / "sub" / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(repo / "sub" / "script.sh", 0o755)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "first", cwd=repo)
    git("branch", "feature", cwd=repo)
    git("checkout", "-q", "feature", cwd=repo)
    (repo / "file3.txt").write_text("changed on feature\n")
    os.unlink(repo / "file4.txt")
    git("commit", "-q", "-a", "-m", "on feature", cwd=repo)
    git("checkout", "-q", "main", cwd=repo)
    git("merge", "-q", "--no-edit", "feature", cwd=repo)
    assert git("status", "--porcelain", cwd=repo) == ""
    git("gc", "-q", "--aggressive", "--prune=now", cwd=repo)
    fsck_clean(repo)
    log_mount = git("log", "--all", "--format=%H %s", cwd=repo)
    assert len(log_mount.splitlines()) == 2

    # a clone of a repository made outside the mount (hard links impossible: EXDEV)
    source = tmp_path / "source"
    source.mkdir()
    git("init", "-q", cwd=source)
    for i in range(5):
        (source / f"s{i}").write_text(f"source {i}\n")
        git("add", "-A", cwd=source)
        git("commit", "-q", "-m", f"source {i}", cwd=source)
    git("clone", "-q", source, session.mnt / "clone", cwd=tmp_path)
    fsck_clean(session.mnt / "clone")
    log_clone = git("log", "--format=%H %s", cwd=session.mnt / "clone")
    assert log_clone == git("log", "--format=%H %s", cwd=source)

    session.replay()
    fsck_clean(session.share / "repo")
    assert git("log", "--all", "--format=%H %s", cwd=session.share / "repo") == log_mount
    assert git("status", "--porcelain", cwd=session.share / "repo") == ""
    fsck_clean(session.share / "clone")
    assert git("log", "--format=%H %s", cwd=session.share / "clone") == log_clone


# -- sqlite ---------------------------------------------------------------------------------

def _fill_database(path: Path, journal_mode: str) -> str:
    db = sqlite3.connect(path, timeout=10)
    try:
        got = db.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0]
        assert got.lower() == journal_mode.lower()
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, blob BLOB)")
        for batch in range(10):  # 10 transactions of 100 rows
            with db:
                db.executemany("INSERT INTO t (name, blob) VALUES (?, ?)",
                               [(f"row {batch}-{i}", os.urandom(200)) for i in range(100)])
        with db:
            db.execute("DELETE FROM t WHERE id % 7 = 0")
            db.execute("UPDATE t SET name = name || '!' WHERE id % 5 = 0")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        if journal_mode == "wal":
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return _digest(db)
    finally:
        db.close()


def _digest(db: sqlite3.Connection) -> str:
    h = hashlib.sha256()
    for row in db.execute("SELECT id, name, blob FROM t ORDER BY id"):
        h.update(repr(row).encode())
    return h.hexdigest()


def _check_database(path: Path, want: str) -> None:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 1000 - 142
        assert _digest(db) == want
    finally:
        db.close()


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_sqlite(session: Session, journal_mode: str) -> None:
    path = session.mnt / f"{journal_mode}.db"
    want = _fill_database(path, journal_mode)
    _check_database(path, want)
    if shutil.which("sqlite3"):  # the CLI too, on the same file
        out = run("sqlite3", path, "PRAGMA integrity_check; SELECT count(*) FROM t;").stdout
        assert out.split() == ["ok", str(1000 - 142)]
        run("sqlite3", path, "INSERT INTO t (name) VALUES ('from the cli'); DELETE FROM t WHERE name = 'from the cli';")
    leftovers = sorted(n for n in os.listdir(session.mnt) if n.startswith(path.name + "-"))
    assert leftovers == [] or journal_mode == "wal", leftovers
    session.replay()
    server = session.share / path.name
    _check_database(server, want)
    assert hashlib.sha256(server.read_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest()


# -- tar, rsync, cp -a ------------------------------------------------------------------------

def _make_tree(root: Path) -> None:
    root.mkdir()
    (root / "dir" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir(mode=0o700)
    os.chmod(root / "empty", 0o700)
    (root / "a.txt").write_bytes(b"alpha\n" * 1000)
    (root / "dir" / "b.bin").write_bytes(os.urandom(300_000))
    (root / "dir" / "deeper" / "c").write_bytes(b"")
    (root / "exec.sh").write_text("#!/bin/sh\necho run\n")
    os.chmod(root / "exec.sh", 0o750)
    (root / "ro.txt").write_text("read only\n")
    os.chmod(root / "ro.txt", 0o444)
    (root / "private").write_text("secret\n")
    os.chmod(root / "private", 0o600)
    os.symlink("a.txt", root / "link_rel")
    os.symlink("dir/deeper", root / "link_dir")
    os.symlink("/nonexistent/target", root / "link_dangling")
    os.utime(root / "a.txt", (1_500_000_000, 1_500_000_000))


def _tree_facts(root: Path, times: bool = False) -> dict[str, tuple]:
    """Kind, mode, content digest, link target (and mtime in seconds) of every entry."""
    facts: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".cachefs"]
        for name in dirs + files:
            p = Path(folder) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                facts[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                facts[rel] = ("dir", oct(stat.S_IMODE(st.st_mode)))
            else:
                facts[rel] = ("file", oct(stat.S_IMODE(st.st_mode)),
                              hashlib.sha256(p.read_bytes()).hexdigest())
            if times and not stat.S_ISLNK(st.st_mode) and not stat.S_ISDIR(st.st_mode):
                facts[rel] += (int(st.st_mtime),)
    return facts


def test_tar_in_and_out(session: Session, tmp_path: Path) -> None:
    need("tar")
    src = tmp_path / "src"
    _make_tree(src)
    want = _tree_facts(src, times=True)
    mnt = session.mnt
    run("tar", "-cf", mnt / "archive.tar", "-C", src, ".")
    (mnt / "x").mkdir()
    run("tar", "-xpf", mnt / "archive.tar", "-C", mnt / "x")
    assert _tree_facts(mnt / "x", times=True) == want
    # and out of the mount again
    out = tmp_path / "out"
    out.mkdir()
    run("tar", "-cf", tmp_path / "back.tar", "-C", mnt / "x", ".")
    run("tar", "-xpf", tmp_path / "back.tar", "-C", out)
    assert _tree_facts(out, times=True) == want
    session.replay()
    assert _tree_facts(session.share / "x", times=True) == want
    run("tar", "-tf", session.share / "archive.tar")  # a readable archive on the server
    assert (session.share / "archive.tar").read_bytes() == (mnt / "archive.tar").read_bytes()


def test_rsync_in_and_out(session: Session, tmp_path: Path) -> None:
    need("rsync")
    src = tmp_path / "src"
    _make_tree(src)
    want = _tree_facts(src, times=True)
    mnt = session.mnt
    run("rsync", "-a", f"{src}/", f"{mnt}/r/")
    check = run("rsync", "-a", "-c", "--dry-run", "-i", f"{src}/", f"{mnt}/r/").stdout
    assert check.strip() == "", f"rsync sees differences in the mount:\n{check}"
    assert _tree_facts(mnt / "r", times=True) == want
    # change a file and rsync again: only the delta
    (src / "a.txt").write_bytes(b"changed\n" * 10)
    os.unlink(src / "private")
    run("rsync", "-a", "--delete", f"{src}/", f"{mnt}/r/")
    want = _tree_facts(src, times=True)
    out = tmp_path / "out"
    run("rsync", "-a", f"{mnt}/r/", f"{out}/")
    assert _tree_facts(out, times=True) == want
    session.replay()
    check = run("rsync", "-a", "-c", "--dry-run", "-i", "--modify-window=1",
                f"{src}/", f"{session.share}/r/").stdout
    assert check.strip() == "", f"rsync sees differences on the server:\n{check}"
    assert _tree_facts(session.share / "r", times=True) == want


def _folder_times(root: Path) -> dict[str, int]:
    """The mtime (whole seconds, what SFTP carries) of ``root`` and every folder below it,
    each folder listed first (a listing brings its subfolders' attributes again)."""
    out: dict[str, int] = {}
    for folder, dirs, _files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".cachefs"]
        os.listdir(folder)
        out[str(Path(folder).relative_to(root))] = int(os.lstat(folder).st_mtime)
    return out


def _later_listings() -> None:
    """Long enough for the mount's listings and attributes to be fetched again (the
    fixture's --attr-timeout is 1 s): a folder time that the server does not have shows
    by then (it did within 3 s)."""
    time.sleep(2.5)


def test_rsync_keeps_folder_times(session: Session, tmp_path: Path) -> None:
    """Issue 19, item 5: ``rsync -a SRC/ mnt/x/dst/`` of nested folders. rsync sets each
    folder's times after filling it; the server ended with the time of the replay on
    every folder (the folder's setattr went before the entries inside it), and the mount
    took it over at its next listing, so a second rsync found them all changed."""
    need("rsync")
    src = tmp_path / "src"
    (src / "a" / "b" / "c").mkdir(parents=True)
    (src / "a" / "empty").mkdir()
    for i, rel in enumerate(["top.txt", "a/one.txt", "a/b/two.txt", "a/b/c/three.txt"]):
        (src / rel).write_text(f"file {i}\n" * (i + 1))
    for i, rel in enumerate(["a/b/c", "a/b", "a/empty", "a", "."]):
        os.utime(src / rel, (1_500_000_000 + i * 86_400, 1_500_000_000 + i * 86_400))
    want = _folder_times(src)
    mnt = session.mnt
    (mnt / "x").mkdir()
    run("rsync", "-a", f"{src}/", f"{mnt}/x/dst/")
    assert _folder_times(mnt / "x" / "dst") == want
    session.replay()
    assert _folder_times(session.share / "x" / "dst") == want, "the server's folder times"
    _later_listings()
    assert _folder_times(mnt / "x" / "dst") == want, "the mount's folder times, listed again"
    again = run("rsync", "-an", "-i", f"{src}/", f"{mnt}/x/dst/").stdout
    assert again.strip() == "", f"a second rsync finds changes:\n{again}"


def test_folder_times_set_after_filling_it_survive_later_edits(session: Session) -> None:
    """``touch -d`` on a folder and its subfolder after files were made in them, then a
    file in each edited (the uploads rename a new file into the folder on the server,
    after the folder's times were set): the server and the mount keep the times set."""
    mnt = session.mnt
    (mnt / "t" / "sub").mkdir(parents=True)
    (mnt / "t" / "f.txt").write_text("first\n")
    (mnt / "t" / "sub" / "g.txt").write_text("first\n")
    session.replay()
    if session.offline:
        go_offline(mnt)
    run("touch", "-d", "2001-02-03 04:05:06", mnt / "t" / "sub", mnt / "t")
    want = _folder_times(mnt / "t")
    assert set(want.values()) == {int(os.stat(mnt / "t").st_mtime)}
    with open(mnt / "t" / "f.txt", "a") as f:
        f.write("appended\n")
    with open(mnt / "t" / "sub" / "g.txt", "a") as f:
        f.write("appended\n")
    session.replay()
    assert (session.share / "t" / "sub" / "g.txt").read_text() == "first\nappended\n"
    assert _folder_times(session.share / "t") == want, "the server's folder times"
    _later_listings()
    assert _folder_times(mnt / "t") == want, "the mount's folder times, listed again"


def test_cp_a_tree(session: Session, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_tree(src)
    want = _tree_facts(src, times=True)
    mnt = session.mnt
    run("cp", "-a", src, mnt / "copy")
    assert _tree_facts(mnt / "copy", times=True) == want
    run("cp", "-a", mnt / "copy", mnt / "copy2")  # within the mount
    assert _tree_facts(mnt / "copy2", times=True) == want
    run("cp", "-a", mnt / "copy", tmp_path / "back")
    assert _tree_facts(tmp_path / "back", times=True) == want
    session.replay()
    assert _tree_facts(session.share / "copy", times=True) == want
    assert _tree_facts(session.share / "copy2", times=True) == want


# -- editors --------------------------------------------------------------------------------

def test_editor_saves(session: Session) -> None:
    mnt = session.mnt
    doc = mnt / "doc.txt"
    doc.write_bytes(b"version 1\n")
    os.chmod(doc, 0o640)
    # emacs/gedit style: write file.tmp, fsync, rename over file
    for version in range(2, 6):
        tmp = mnt / "doc.txt.tmp"
        with open(tmp, "wb") as f:
            f.write(f"version {version}\n".encode() * version)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o640)
        os.rename(tmp, doc)
        dir_fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        assert doc.read_bytes() == f"version {version}\n".encode() * version
    # vim style (backupcopy=no): rename original to backup~, write new, unlink backup~
    old = doc.read_bytes()
    os.rename(doc, mnt / "doc.txt~")
    with open(doc, "wb") as f:
        f.write(b"vim version\n")
        os.fsync(f.fileno())
    os.chmod(doc, 0o640)
    assert (mnt / "doc.txt~").read_bytes() == old
    os.unlink(mnt / "doc.txt~")
    # and real vim (scripts/run installs vim-tiny), with the same strategy
    vim = shutil.which("vim") or shutil.which("vim.tiny")
    assert vim is not None, "no vim: scripts/run setup installs vim-tiny"
    if vim:
        (mnt / "v.txt").write_text("aaa\nbbb\n")
        run(vim, "-u", "NONE", "-N", "-n", "-es", "-c", "set backup backupcopy=no writebackup",
            "-c", "%s/a/z/g", "-c", "wq", mnt / "v.txt", timeout=30)
        assert (mnt / "v.txt").read_text() == "zzz\nbbb\n"
        assert not (mnt / "v.txt~").exists() or (mnt / "v.txt~").read_text() == "aaa\nbbb\n"
    session.replay()
    names = sorted(n for n in os.listdir(session.share))
    assert (session.share / "doc.txt").read_bytes() == b"vim version\n"
    assert stat.S_IMODE(os.stat(session.share / "doc.txt").st_mode) == 0o640
    assert "doc.txt~" not in names and "doc.txt.tmp" not in names, names
    if shutil.which("vim"):
        assert (session.share / "v.txt").read_text() == "zzz\nbbb\n"


# -- make -----------------------------------------------------------------------------------

MAKEFILE = textwrap.dedent("""\
    hello: main.o greet.o
    \tgcc -o hello main.o greet.o

    %.o: %.c greet.h
    \tgcc -c -o $@ $<
    """)


def test_make_build(session: Session) -> None:
    need("make")
    need("gcc")
    proj = session.mnt / "proj"
    proj.mkdir()
    (proj / "Makefile").write_text(MAKEFILE)
    (proj / "greet.h").write_text("void greet(const char *who);\n")
    (proj / "main.c").write_text('#include "greet.h"\nint main(void) { greet("mount"); return 0; }\n')
    (proj / "greet.c").write_text('#include <stdio.h>\n#include "greet.h"\n'
                                  'void greet(const char *who) { printf("hello %s\\n", who); }\n')
    out = run("make", cwd=proj).stdout
    assert out.count("gcc -c") == 2, out
    assert run(proj / "hello").stdout == "hello mount\n"
    assert "up to date" in run("make", cwd=proj).stdout
    time.sleep(0.05)
    (proj / "greet.c").write_text('#include <stdio.h>\n#include "greet.h"\n'
                                  'void greet(const char *who) { printf("bye %s\\n", who); }\n')
    out = run("make", cwd=proj).stdout
    assert "greet.c" in out and "main.c" not in out, out  # only the touched source rebuilt
    assert run(proj / "hello").stdout == "bye mount\n"
    time.sleep(0.05)
    os.utime(proj / "main.c")  # touch
    out = run("make", cwd=proj).stdout
    assert "main.c" in out and "greet.c" not in out, out
    assert "up to date" in run("make", cwd=proj).stdout
    binary = (proj / "hello").read_bytes()
    session.replay()
    assert (session.share / "proj" / "hello").read_bytes() == binary
    assert os.stat(session.share / "proj" / "hello").st_mode & 0o111
    assert run(session.share / "proj" / "hello").stdout == "bye mount\n"


# -- mmap -------------------------------------------------------------------------------------

def test_mmap_read_and_shared_write(session: Session) -> None:
    path = session.mnt / "mapped.bin"
    data = bytearray(os.urandom(3 * mmap.PAGESIZE + 100))
    path.write_bytes(data)
    with open(path, "r+b") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            assert m[:] == data
        with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[10:20] = b"0123456789"
            m[2 * mmap.PAGESIZE:2 * mmap.PAGESIZE + 5] = b"MMAP!"
            m.flush()
    data[10:20] = b"0123456789"
    data[2 * mmap.PAGESIZE:2 * mmap.PAGESIZE + 5] = b"MMAP!"
    assert path.read_bytes() == bytes(data)
    session.replay()
    assert (session.share / "mapped.bin").read_bytes() == bytes(data)


# -- O_APPEND from two processes --------------------------------------------------------------

APPENDER = textwrap.dedent("""\
    import os, sys
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for i in range(500):
        os.write(fd, f"{sys.argv[2]} line {i:04d} ".encode() + b"x" * 40 + b"\\n")
    os.close(fd)
    """)


def test_two_appenders(session: Session) -> None:
    path = session.mnt / "log.txt"
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(path), who])
             for who in ("A", "B")]
    for p in procs:
        assert p.wait(60) == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    lines = lines[:-1]
    assert len(lines) == 1000
    for who in (b"A", b"B"):
        mine = [line for line in lines if line.startswith(who + b" ")]
        assert mine == [who + f" line {i:04d} ".encode() + b"x" * 40 for i in range(500)]
    session.replay()
    assert (session.share / "log.txt").read_bytes() == path.read_bytes()


# -- locks --------------------------------------------------------------------------------------

LOCKER = textwrap.dedent("""\
    import fcntl, sys
    kind, path = sys.argv[1], sys.argv[2]
    with open(path, "r+b") as f:
        try:
            if kind == "flock":
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        except OSError as e:
            print("busy", e.errno)
        else:
            print("locked")
    """)


@pytest.mark.parametrize("kind", ["flock", "fcntl"])
def test_locks_between_processes(session: Session, kind: str) -> None:
    path = session.mnt / "lockme"
    path.write_bytes(b"0123456789" * 10)

    def other() -> str:
        return run(sys.executable, "-c", LOCKER, kind, path, timeout=30).stdout.strip()

    assert other() == "locked"
    with open(path, "r+b") as f:
        if kind == "flock":
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        assert other().startswith("busy"), "a second process got a lock the first holds"
        if kind == "flock":
            fcntl.flock(f, fcntl.LOCK_UN)
        else:
            fcntl.lockf(f, fcntl.LOCK_UN, 10, 0)
        assert other() == "locked"
    session.replay()


# -- a sparse file past 4 GiB ------------------------------------------------------------------

FOUR_GIB = 4 << 30
SPARSE_REPLAY_LIMIT = 90.0  # seconds; a healthy upload takes well under this here


def test_sparse_file_past_4gib(mount_factory, share: Path) -> None:
    """Online only: the replay uploads the whole 4 GiB (sparse files are sent whole), which
    takes tens of seconds; the mount runs with the default --timeout (10 s)."""
    offset = FOUR_GIB + (1 << 20)
    tail = os.urandom(4096)
    mount = mount_factory(timeout="10", check_log=False)
    try:
        with mount:
            mnt = mount.mountpoint
            with open(mnt / "sparse.bin", "wb") as f:
                f.seek(offset)
                f.write(tail)
            assert os.stat(mnt / "sparse.bin").st_size == offset + 4096
            with open(mnt / "sparse.bin", "rb") as f:
                f.seek(offset)
                assert f.read() == tail
                for where in (0, 1 << 30, FOUR_GIB - 4096, offset - 4096):
                    f.seek(where)
                    assert f.read(4096) == bytes(4096), where
            began = time.monotonic()
            wait_for(lambda: status(mnt)["pending"] == 0 or status(mnt)["conflicts"] > 0,
                     SPARSE_REPLAY_LIMIT, "the upload of the sparse file", interval=0.5)
            took = time.monotonic() - began
            print(f"replay of a {offset + 4096} byte sparse file took {took:.1f} s")
            st = status(mnt)
            on_server = sorted(os.listdir(share))
            assert st["conflicts"] == 0 and on_server == ["sparse.bin"], (st, on_server)
            server = share / "sparse.bin"
            assert os.stat(server).st_size == offset + 4096
            with open(server, "rb") as f:
                f.seek(offset)
                assert f.read() == tail
                for where in (0, FOUR_GIB - 4096, offset - 4096):
                    f.seek(where)
                    assert f.read(4096) == bytes(4096), where
        mount.assert_clean_log()
    finally:  # do not leave gigabytes behind in the pytest temp folders
        for name in os.listdir(share):
            if os.path.isfile(share / name):  # the file, partial uploads, conflict copies
                os.unlink(share / name)


# -- awkward names ------------------------------------------------------------------------------

AWKWARD = [
    b"new\nline",
    b"latin1-\xe9t\xe9",
    b"\xff\xfe not utf-8",
    b"x" * 255,
    b"\xc3" + b"y" * 254,  # 255 bytes, starting with half a UTF-8 character
    b" leading and trailing space ",
    b"tab\there",
]


def test_awkward_names(session: Session) -> None:
    mnt = os.fsencode(session.mnt)
    folder = mnt + b"/" + b"dir-\xfe\n"
    os.mkdir(folder)
    for i, name in enumerate(AWKWARD):
        with open(folder + b"/" + name, "wb") as f:
            f.write(b"content %d\n" % i)
    renamed = {name: name[:-1] + b"\xfd" if len(name) >= 255 else name + b".\xfd" for name in AWKWARD}
    for name in AWKWARD[::2]:
        os.rename(folder + b"/" + name, folder + b"/" + renamed[name])
    want = {renamed[n] if i % 2 == 0 else n: b"content %d\n" % i for i, n in enumerate(AWKWARD)}
    listed = os.listdir(folder)
    assert sorted(listed) == sorted(want)
    for name, content in want.items():
        with open(folder + b"/" + name, "rb") as f:
            assert f.read() == content
    session.replay()
    server = os.fsencode(session.share) + b"/" + b"dir-\xfe\n"
    assert sorted(os.listdir(server)) == sorted(want)
    for name, content in want.items():
        with open(server + b"/" + name, "rb") as f:
            assert f.read() == content
