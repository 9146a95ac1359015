"""Mounting as a newcomer meets it (issue 22, items 4-7 and 14), through the real
``cachefs`` command: a mistyped sub-command is an error, a failed first mount leaves no
cache behind, ``cachefs caches`` lists and removes caches, the remote is the mount's
source (``findmnt``, ``df``) and ``cachefs list`` tells mounts apart, a non-empty mount
point is refused, and FUSE's own refusals (no ``/dev/fuse``, one the user may not open,
``allow_other``, a mount point the user cannot write) reach the user of a detached mount.

Every mount is taken down, every wait bounded. The FUSE refusals are made as ``nobody``
(this suite runs as root); those that need fusermount3 run in a private mount namespace
where a node of the FUSE device that every user may open is bound over ``/dev/fuse``, so
that nothing outside the test's own namespace changes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefs.store.records import INDEX_MARK, INDEX_MARK_TEXT
from tests.fixtures.mount import REPO, fusermount_unmount, is_mounted, status
from tests.test_cli import _alive, _stop_daemon, cachefs, failed_with_reason, ok, this_checkout
from tests.test_control import go_offline, read, wait_for, write


def _env(xdg: Path) -> dict[str, str]:
    """The environment of a user whose caches go to ``xdg``/cachefs."""
    return dict(os.environ, XDG_CACHE_HOME=str(xdg))


def _ssh(sshd) -> list[str]:
    return ["--identity", str(sshd.identity), "--known-hosts", str(sshd.known_hosts)]


def _caches_in(xdg: Path) -> list[str]:
    base = xdg / "cachefs"
    return sorted(os.listdir(base)) if base.exists() else []


# -- 14: unknown sub-commands ----------------------------------------------------------------

def test_unknown_commands_are_usage_errors(tmp_path: Path) -> None:
    """'cachefs unmoutn ~/mnt' was taken as a mount of a remote called 'unmoutn' (a local
    folder that does not exist). A word without ':' or '/' is no remote: exit status 2,
    with the command meant when one is close; the fstab form 'cachefs REMOTE MOUNTPOINT'
    still mounts."""
    xdg, mnt, share = tmp_path / "xdg", tmp_path / "mnt", tmp_path / "papers"
    mnt.mkdir()
    share.mkdir()
    (share / "f.txt").write_bytes(b"shorthand\n")
    for args, words in ((["unmoutn", str(mnt)], ["unknown command 'unmoutn'", "did you mean 'unmount'?"]),
                        (["lsit"], ["unknown command 'lsit'", "did you mean 'list'?"]),
                        (["stauts", str(mnt)], ["did you mean 'status'?"]),
                        (["frobnicate", str(mnt)], ["unknown command 'frobnicate'", "cachefs --help"])):
        result = cachefs(*args, env=_env(xdg))
        assert result.returncode == 2, result
        reason = failed_with_reason(result, *words)
        assert "did you mean" not in reason or args[0] != "frobnicate", reason
    assert not is_mounted(mnt) and _caches_in(xdg) == []
    # A folder of that name in the current folder: said how to name it.
    failed_with_reason(cachefs("papers", str(mnt), cwd=tmp_path, env=_env(xdg)),
                       "unknown command 'papers'", "write ./papers")
    try:
        ok(cachefs("./papers", str(mnt), "--cache-dir", str(tmp_path / "c"), cwd=tmp_path))
        assert read(mnt / "f.txt") == b"shorthand\n"
        ok(cachefs("unmount", str(mnt)))
    finally:
        _stop_daemon(mnt)


# -- 4: failed first mounts, cachefs caches ----------------------------------------------------

def test_failed_first_mounts_leave_no_cache(tmp_path: Path, sshd, share: Path) -> None:
    """Each failed first mount (unknown host key, no usable key; detached or not) left a
    33 MiB cache folder in ~/.cache/cachefs. Now it removes what it made; a cache that
    was there before is kept when a mount of it fails."""
    xdg, mnt = tmp_path / "xdg", tmp_path / "mnt"
    mnt.mkdir()
    (share / "f.txt").write_bytes(b"x")
    empty_hosts = tmp_path / "known_hosts_empty"
    empty_hosts.write_text("")
    other_key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True,
                   timeout=30)
    failures = [
        (["--identity", str(sshd.identity), "--known-hosts", str(empty_hosts)], "authenticity of host"),
        (["--identity", str(sshd.identity), "--known-hosts", str(empty_hosts), "-f"], "authenticity of host"),
        (["--identity", str(other_key), "--known-hosts", str(sshd.known_hosts)], "authentication as"),
        (["--identity", str(other_key), "--known-hosts", str(sshd.known_hosts), "-f"], "authentication as"),
    ]
    for extra, words in failures:
        result = cachefs("mount", sshd.address(), str(mnt), "--timeout", "5", *extra, env=_env(xdg))
        failed_with_reason(result, words)
        assert not is_mounted(mnt)
        assert _caches_in(xdg) == [], f"{extra} left {_caches_in(xdg)}"
        assert not list(xdg.glob("cachefs/.*")), "a cache half removed"

    # A cache that existed is kept, whatever the failure.
    try:
        ok(cachefs("mount", sshd.address(), str(mnt), *_ssh(sshd), env=_env(xdg)))
        assert read(mnt / "f.txt") == b"x"
        ok(cachefs("unmount", str(mnt)))
    finally:
        _stop_daemon(mnt)
    [made] = _caches_in(xdg)
    result = cachefs("mount", sshd.address(), str(mnt), "--identity", str(sshd.identity),
                     "--known-hosts", str(empty_hosts), env=_env(xdg))
    failed_with_reason(result, "authenticity of host")
    assert _caches_in(xdg) == [made] and (xdg / "cachefs" / made / "index" / "data.mdb").exists()


def test_caches_list_and_remove(tmp_path: Path, sshd, share: Path) -> None:
    """'cachefs caches' lists each cache (remote, size, last use, the mount using it,
    pending changes, conflicts); '--remove' refuses a cache a mount uses (even with
    --force) and one holding changes not yet on the server (unless --force, saying what
    is lost), and removes a clean one named by its remote."""
    xdg, mnt, mnt2 = tmp_path / "xdg", tmp_path / "mnt", tmp_path / "mnt2"
    mnt.mkdir()
    mnt2.mkdir()
    (share / "sub").mkdir()
    (share / "f.txt").write_bytes(b"base")
    env = _env(xdg)
    listed = ok(cachefs("caches", env=env)).stdout  # (other mounts' caches are listed too)
    assert not any(line.startswith(str(xdg)) for line in listed.splitlines()), listed
    try:
        ok(cachefs("mount", sshd.address(), str(mnt), *_ssh(sshd), env=env))
        read(mnt / "f.txt")
        go_offline(mnt)
        write(mnt / "f.txt", b"changed offline")
        remote, pid = status(mnt)["remote"], status(mnt)["pid"]
        [name] = _caches_in(xdg)
        cache = xdg / "cachefs" / name

        text = ok(cachefs("caches", env=env)).stdout
        assert str(cache) in text and f"remote:          {remote}" in text, text
        assert f"mounted on {mnt} (process {pid})" in text, text
        assert "pending changes: 1" in text and "size:" in text and "MiB" in text, text
        for force in ([], ["--force"]):
            reason = failed_with_reason(cachefs("caches", "--remove", str(cache), *force, env=env),
                                        "not removed", "in use", "unmount it first")
            assert str(cache) in reason
        assert cache.exists() and status(mnt)["pending"] == 1
        ok(cachefs("unmount", str(mnt)))
    finally:
        _stop_daemon(mnt)

    [entry] = [e for e in json.loads(ok(cachefs("caches", "--json", env=env)).stdout)
               if e["cache_dir"].startswith(str(xdg))]
    assert entry["cache_dir"] == str(cache) and entry["remote"] == remote
    assert entry["pending"] == 1 and entry["conflicts"] == 0 and entry["pid"] is None
    assert entry["mountpoint"] is None and entry["size"] > 0 and entry["last_use"]

    reason = failed_with_reason(cachefs("caches", "--remove", sshd.address(), env=env),
                                "1 change not yet on the server", f"cachefs recover {cache}", "--force")
    assert cache.exists()
    removed = ok(cachefs("caches", "--remove", str(cache), "--force", env=env)).stdout
    assert f"removed {cache}" in removed and "1 change not yet on the server, now lost" in removed
    assert _caches_in(xdg) == []

    # A clean cache, named by its remote (as typed, host:path).
    sub = f"{sshd.address()}/sub" if "://" in sshd.address() else f"{sshd.address().rstrip('/')}/sub"
    try:
        ok(cachefs("mount", sub, str(mnt2), *_ssh(sshd), env=env))
        ok(cachefs("unmount", str(mnt2)))
    finally:
        _stop_daemon(mnt2)
    assert len(_caches_in(xdg)) == 1
    assert "removed" in ok(cachefs("caches", "--remove", sub, env=env)).stdout
    assert _caches_in(xdg) == []
    failed_with_reason(cachefs("caches", "--remove", sub, env=env), "no cache of")

    # A cache whose index is damaged: told, not a traceback; removed only with --force.
    broken = xdg / "cachefs" / "broken-0123456789"
    (broken / "index").mkdir(parents=True)
    (broken / "index" / "data.mdb").write_bytes(os.urandom(64 << 10))
    (broken / "lock").write_bytes(b"")
    (broken / INDEX_MARK).write_bytes(INDEX_MARK_TEXT)  # (as the cache's first mount left it)
    text = ok(cachefs("caches", env=env)).stdout
    assert f"{broken}\n" in text and "problem:         its index does not open" in text, text
    failed_with_reason(cachefs("caches", "--remove", str(broken), env=env), "index does not open", "--force")
    ok(cachefs("caches", "--remove", str(broken), "--force", env=env))
    assert not broken.exists()
    failed_with_reason(cachefs("caches", "--remove", str(tmp_path / "share-nothing"), env=env), "no cache of")


def _tree(folder: Path) -> list[tuple[str, int, int]]:
    """Every name under ``folder`` with its size and mtime: what must not change."""
    return sorted((str(f.relative_to(folder)), f.lstat().st_size, f.lstat().st_mtime_ns)
                  for f in [folder, *folder.rglob("*")])


def test_caches_remove_takes_only_caches(tmp_path: Path) -> None:
    """'cachefs caches --remove ~/proj/.git' printed "removed" and the .git folder was gone:
    any folder holding a 'lock' or an 'index' was taken for a cache, and a local share's
    folder given as REMOTE was taken as such a DIR first; looking at one made a 'lock' file
    in it. Now only a folder with a cache's own marks (its index-made mark, or an index
    that records its remote) is a cache: any other is refused, nothing in it is made or
    removed, and a share's folder names that share's cache."""
    xdg, mnt = tmp_path / "xdg", tmp_path / "mnt"
    mnt.mkdir()
    env = _env(xdg)
    repo = tmp_path / "proj"
    repo.mkdir()
    (repo / "notes.txt").write_text("mine\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "notes.txt"], ["commit", "-q", "-m", "one"]):
        subprocess.run(git + args, check=True, timeout=30, capture_output=True)
    assert (repo / ".git" / "index").exists()
    named = tmp_path / "named"  # a folder whose files are named as a cache's are
    named.mkdir()
    for name in ("lock", "index", INDEX_MARK):
        (named / name).write_bytes(b"my own " + name.encode())
    other = tmp_path / "other"  # another program's LMDB under index/
    import lmdb
    (other / "index").mkdir(parents=True)
    env_db = lmdb.open(str(other / "index"), max_dbs=2)
    with env_db.begin(write=True) as txn:
        txn.put(b"remote", b"x", db=env_db.open_db(b"meta", txn=txn))
    env_db.close()
    (other / "index" / "lock.mdb").unlink()
    share = tmp_path / "share"  # a local share, with a 'lock' and an 'index' of its own
    (share / "index").mkdir(parents=True)
    (share / "lock").write_bytes(b"share's")
    (share / "f.txt").write_bytes(b"shared\n")
    in_base = xdg / "cachefs" / "not-a-cache-0123456789"  # even in the caches' folder
    shutil.copytree(named, in_base)

    for folder in (repo / ".git", named, other, share, in_base):
        before = _tree(folder)
        for force in ([], ["--force"]):
            reason = failed_with_reason(cachefs("caches", "--remove", str(folder), *force, env=env),
                                        "nothing removed")
            assert "no cache of" in reason, reason
            assert f"{folder} is not a cachefs cache directory" in reason, reason
        assert _tree(folder) == before, f"{folder} changed"
    listed = ok(cachefs("caches", "--json", env=env)).stdout
    assert str(in_base) not in listed and _tree(in_base) == before

    # The share's folder as REMOTE: its cache goes, the share stays.
    try:
        ok(cachefs("mount", str(share), str(mnt), env=env))
        assert read(mnt / "f.txt") == b"shared\n"
        ok(cachefs("unmount", str(mnt)))
    finally:
        _stop_daemon(mnt)
    [cache] = [xdg / "cachefs" / n for n in _caches_in(xdg) if n != in_base.name]
    before = _tree(share)
    assert f"removed {cache}" in ok(cachefs("caches", "--remove", str(share), env=env)).stdout
    assert not cache.exists() and _tree(share) == before

    # A cache named by its folder is removed, also one older than the index-made mark
    # (told by the remote its index records).
    try:
        ok(cachefs("mount", str(share), str(mnt), env=env))
        ok(cachefs("unmount", str(mnt)))
    finally:
        _stop_daemon(mnt)
    [cache] = [xdg / "cachefs" / n for n in _caches_in(xdg) if n != in_base.name]
    (cache / INDEX_MARK).unlink()
    assert str(cache) in ok(cachefs("caches", env=env)).stdout
    assert f"removed {cache}" in ok(cachefs("caches", "--remove", str(cache), env=env)).stdout
    assert _caches_in(xdg) == [in_base.name]


#: a foreground mount whose teardown waits at one step (``sys.argv[1]``: the transfer
#: processes' close after the trio loop ended, or the note of what stays pending in it)
#: after leaving a mark, so that a Ctrl-C surely lands in the teardown
_SLOW_TEARDOWN = """
import sys, time
from pathlib import Path
import cachefs.daemon as daemon
owner, name = (daemon.FetchPool, "close") if sys.argv[1] == "pool" else (daemon, "note_unmounted")
step = getattr(owner, name)
def slow_step(*args):
    Path(sys.argv[2]).write_text("tearing down")
    time.sleep(30)
    step(*args)
setattr(owner, name, slow_step)
from cachefs.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("step", ["pool", "note"])
def test_a_served_cache_outlives_a_ctrl_c_in_its_teardown(tmp_path: Path, sshd, share: Path, step: str) -> None:
    """A Ctrl-C during the teardown of a foreground mount that had served (its first one,
    e.g. while its transfer processes were closed) removed its cache as if the mount had
    failed before serving: what was cached, and pinned, was lost. Now only a mount that
    never served removes the cache it made; a Ctrl-C met inside the trio loop ends the
    command as one does, not with a traceback."""
    xdg, mnt, mark = tmp_path / "xdg", tmp_path / "mnt", tmp_path / "mark"
    mnt.mkdir()
    (share / "f.txt").write_bytes(b"served\n")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_TEARDOWN, step, str(mark), "mount", sshd.address(),
                             str(mnt), *_ssh(sshd), "-f", "--no-notify"], cwd=REPO,
                            env=this_checkout(_env(xdg)), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: is_mounted(mnt), 30, "the mount")
        assert read(mnt / "f.txt") == b"served\n"
        [name] = _caches_in(xdg)
        proc.send_signal(signal.SIGINT)  # unmount...
        wait_for(mark.exists, 20, "the teardown")
        proc.send_signal(signal.SIGINT)  # ... and Ctrl-C again while it is taken down
        _out, err = proc.communicate(timeout=30)
        assert _caches_in(xdg) == [name], err
        assert (xdg / "cachefs" / name / INDEX_MARK).exists()
        assert "removed the new cache" not in err and "Traceback" not in err, err
        if proc.returncode == 0 and step == "pool":  # (shown in every report: docs/reliability.md)
            pytest.xfail("known gap: a second Ctrl-C while the transfer processes close sometimes ends "
                         "the command with status 0 instead of 130 (the cache kept, as asserted)")
        assert proc.returncode == 130, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        fusermount_unmount(mnt)


# -- 5: the remote as the mount's source; cachefs list ------------------------------------------

def _source(mnt: Path) -> tuple[str, str]:
    """(SOURCE, FSTYPE) of the mount on ``mnt``, as findmnt shows them."""
    result = subprocess.run(["findmnt", "-n", "-r", "-o", "SOURCE,FSTYPE", "--mountpoint", str(mnt)],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result
    source, kind = result.stdout.split()
    # -r escapes blanks and backslashes as \xHH
    return source.encode().decode("unicode_escape"), kind


def test_source_fsname_and_list(tmp_path: Path, sshd, share: Path) -> None:
    """findmnt, df and mount showed every source as 'cachefs' and -o fsname= was
    ignored. The source is now the remote as 'cachefs status' names it (commas and
    backslashes in it escaped for libfuse), or -o fsname=; 'cachefs list' gives each
    mount's remote, state, pending changes and conflicts, and a mount that does not
    answer costs it its --timeout, not a hang."""
    odd = share / "a, b\\c"
    odd.mkdir()
    (odd / "f.txt").write_bytes(b"odd")
    mnt1, mnt2 = tmp_path / "mnt1", tmp_path / "mnt2"
    mnt1.mkdir()
    mnt2.mkdir()
    base = sshd.address()
    remote1 = f"{base}/{odd.name}" if "://" in base else f"{base.rstrip('/')}/{odd.name}"
    try:
        ok(cachefs("mount", remote1, str(mnt1), "--cache-dir", str(tmp_path / "c1"), *_ssh(sshd)))
        ok(cachefs("mount", base, str(mnt2), "--cache-dir", str(tmp_path / "c2"), "-o", "fsname=projects",
                   *_ssh(sshd)))
        assert read(mnt1 / "f.txt") == b"odd"
        source1 = status(mnt1)["remote"]
        assert source1.startswith("sftp://") and source1.endswith("/a, b\\c"), source1
        assert _source(mnt1) == (source1, "fuse.cachefs")
        assert _source(mnt2) == ("projects", "fuse.cachefs")
        df = subprocess.run(["df", str(mnt2)], capture_output=True, text=True, timeout=10).stdout
        assert df.splitlines()[1].startswith("projects "), df

        text = ok(cachefs("list")).stdout
        lines = {line.split()[0]: line for line in text.splitlines()[1:]}
        assert text.splitlines()[0].split() == ["MOUNT", "POINT", "REMOTE", "STATE", "PENDING", "CONFLICTS"]
        assert f" {source1} " in lines[str(mnt1)], text
        assert lines[str(mnt1)].split()[-3:] == ["online", "0", "0"], text
        assert lines[str(mnt2)].split()[1:] == [status(mnt2)["remote"], "online", "0", "0"], text
        rows = {r["mountpoint"]: r for r in json.loads(ok(cachefs("list", "--json")).stdout)}
        assert rows[str(mnt2)]["pid"] == status(mnt2)["pid"] and rows[str(mnt2)]["cache_dir"] == str(tmp_path / "c2")

        go_offline(mnt2)
        write(mnt2 / "new.txt", b"offline")
        pid1, pid2 = status(mnt1)["pid"], status(mnt2)["pid"]
        rows = {r["mountpoint"]: r for r in json.loads(ok(cachefs("list", "--json")).stdout)}
        assert rows[str(mnt2)]["state"] == "offline" and rows[str(mnt2)]["pending"] == 1

        os.kill(pid2, signal.SIGSTOP)  # stuck: alive, not answering
        try:
            started = time.monotonic()
            rows = {r["mountpoint"]: r for r in json.loads(ok(cachefs("list", "--json", "--timeout", "1")).stdout)}
            assert time.monotonic() - started < 8
            assert rows[str(mnt2)]["state"] == "not answering" and rows[str(mnt2)]["remote"] == "projects"
            assert rows[str(mnt1)]["state"] == "online"
        finally:
            os.kill(pid2, signal.SIGCONT)
        os.kill(pid1, signal.SIGKILL)  # stale
        wait_for(lambda: not _alive(pid1), 10, "the killed mount to end")
        time.sleep(1.5)
        rows = {r["mountpoint"]: r for r in json.loads(ok(cachefs("list", "--json")).stdout)}
        assert rows[str(mnt1)]["state"] == "stale" and rows[str(mnt1)]["remote"] == source1
    finally:
        _stop_daemon(mnt1)
        _stop_daemon(mnt2)


def test_fsname_of_a_local_folder_with_other_bytes(tmp_path: Path) -> None:
    """A local folder's name that is not ASCII (pyfuse3 hands options over as ASCII and
    failed with UnicodeEncodeError) is percent-encoded in the source."""
    share, mnt = tmp_path / "Käse", tmp_path / "mnt"
    share.mkdir()
    mnt.mkdir()
    try:
        ok(cachefs("mount", str(share), str(mnt), "--cache-dir", str(tmp_path / "c")))
        assert status(mnt)["remote"] == f"file://{share}"
        assert _source(mnt) == (f"file://{share}".replace("Käse", "K%C3%A4se"), "fuse.cachefs")
        ok(cachefs("unmount", str(mnt)))
    finally:
        _stop_daemon(mnt)
    result = cachefs("mount", str(share), str(mnt), "-o", "fsname=Käse", "--cache-dir", str(tmp_path / "c"))
    assert result.returncode == 2 and "-o fsname=Käse: fsname must be printable ASCII" in result.stderr


# -- 6: a mount point that is not empty --------------------------------------------------------

def test_nonempty_mount_point_is_refused(tmp_path: Path) -> None:
    """A mount point with files was mounted over silently (its files hidden), although
    usage.md and --help say 'an existing empty directory'. Refused now, as sshfs does,
    unless --nonempty or -o nonempty; nothing mounted, no cache made."""
    share, mnt, cache = tmp_path / "share", tmp_path / "mnt", tmp_path / "c"
    share.mkdir()
    mnt.mkdir()
    (share / "remote.txt").write_bytes(b"remote")
    (mnt / "mine.txt").write_bytes(b"mine")
    for form in (["mount", str(share), str(mnt), "--cache-dir", str(cache)],
                 ["mount", str(share), str(mnt), "--cache-dir", str(cache), "-f"],
                 [str(share), str(mnt), "-o", f"cache_dir={cache}"]):
        reason = failed_with_reason(cachefs(*form), f"mount point {mnt} is not empty (mine.txt)",
                                    "--nonempty", "-o nonempty")
        assert reason.count("\n") == 0
        assert not is_mounted(mnt) and not cache.exists()
    for form in (["mount", str(share), str(mnt), "--cache-dir", str(cache), "--nonempty"],
                 [str(share), str(mnt), "-o", f"nonempty,cache_dir={cache}"]):
        try:
            ok(cachefs(*form))
            names = os.listdir(mnt)
            assert "remote.txt" in names and "mine.txt" not in names, names
            ok(cachefs("unmount", str(mnt)))
        finally:
            _stop_daemon(mnt)
        assert (mnt / "mine.txt").read_bytes() == b"mine"


# -- 7: FUSE's own refusals, detached -------------------------------------------------------------

NOBODY_TIMEOUT = 60.0


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder under /tmp that every user may traverse, with a share in it and a folder
    ``nb`` that belongs to nobody (for nobody's mount points and caches)."""
    if os.geteuid() != 0:
        pytest.fail("these tests act as nobody: run the suite as root, as scripts/run does")
    path = Path(tempfile.mkdtemp(prefix="cachefs-fuse-"))
    os.chmod(path, 0o755)
    (path / "share").mkdir()
    (path / "share" / "f.txt").write_bytes(b"x")
    (path / "nb").mkdir()
    shutil.chown(path / "nb", "nobody")
    try:
        yield path
    finally:
        for mnt in (path / "nb" / "mnt", path / "rootmnt"):
            _stop_daemon(mnt)
        shutil.rmtree(path, ignore_errors=True)


def _python_for_nobody() -> list[str]:
    """nobody's python: the venv's interpreter may lie in root's home; the system one of
    the same version reads the venv's packages from PYTHONPATH."""
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    assert Path(system).exists(), f"no {system} for nobody to run (the venv's python is root's)"
    return [system]


def _as_nobody(open_dir: Path, mount_args: list[str], fuse_mode: int | None = 0o666,
               fuse_conf: str | None = None) -> subprocess.CompletedProcess[str]:
    """``cachefs mount SHARE ...`` run by nobody, in a private mount namespace where a FUSE
    device node of ``fuse_mode`` is bound over /dev/fuse (0666 as Debian has it, so that
    libfuse gets past opening it to fusermount3's own checks; 0600: nobody may open it;
    None: the machine's own), and, given ``fuse_conf``, a file of that text over
    /etc/fuse.conf (fusermount3 reads it): the cases are made here, whatever the machine."""
    paths = sysconfig.get_paths()
    pythonpath = ":".join(dict.fromkeys([str(REPO), paths["purelib"], paths["platlib"]]))
    command = " ".join([
        "cd", str(REPO), "&&", f"PYTHONPATH={pythonpath}", "PYTHONDONTWRITEBYTECODE=1",
        *_python_for_nobody(), "-m", "cachefs.cli", "mount", str(open_dir / "share"),
        *mount_args, "--cache-dir", str(open_dir / "nb" / "cache")])
    su = ["su", "nobody", "-s", "/bin/sh", "-c", command]
    binds = []
    if fuse_mode is not None:
        node = open_dir / f"fuse-{fuse_mode:o}"
        if not node.exists():
            os.mknod(node, fuse_mode | 0o020000, os.makedev(10, 229))
            os.chmod(node, fuse_mode)
        binds.append(f"mount --bind {node} /dev/fuse || exit 99")
    if fuse_conf is not None and Path("/etc/fuse.conf").exists():  # (none: fusermount3's defaults)
        conf = open_dir / "fuse.conf"
        conf.write_text(fuse_conf)
        binds.append(f"mount --bind {conf} /etc/fuse.conf || exit 99")
    if binds:
        script = "\n".join([*binds, 'exec "$@"']) + "\n"
        args = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *su]
    else:
        args = su
    result = subprocess.run(args, capture_output=True, text=True, timeout=NOBODY_TIMEOUT,
                            stdin=subprocess.DEVNULL)
    assert result.returncode != 99, f"could not bind the FUSE node or fuse.conf: {result.stderr}"
    return result


def _refused_with(result: subprocess.CompletedProcess[str], open_dir: Path, mnt: Path, *words: str) -> None:
    reason = failed_with_reason(result, f"cannot mount on {mnt}", *words)
    assert "see the log above" not in reason and "fuse_session_mount failed" not in reason, reason
    assert not is_mounted(mnt)
    assert not (open_dir / "nb" / "cache").exists(), "the failed first mount left its cache"


def test_dev_fuse_refused_is_told(open_dir: Path) -> None:
    """/dev/fuse that the user may not open (mode 0600 here): libfuse's 'fuse: failed to
    open /dev/fuse: Permission denied' went to a detached mount's /dev/null."""
    mnt = open_dir / "nb" / "mnt"
    subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", f"mkdir {mnt}"], check=True, timeout=15)
    for detach in ([], ["-f"]):
        result = _as_nobody(open_dir, [str(mnt), *detach], fuse_mode=0o600)
        _refused_with(result, open_dir, mnt, "fuse: failed to open /dev/fuse: Permission denied",
                      "mount as root")


def test_fusermount_refusals_are_told(open_dir: Path) -> None:
    """fusermount3's refusals, which a detached mount lost: allow_other without
    user_allow_other in /etc/fuse.conf, and a mount point the user may not write."""
    mnt = open_dir / "nb" / "mnt"
    subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", f"mkdir {mnt}"], check=True, timeout=15)
    # (a fuse.conf without user_allow_other, whatever this machine's says)
    result = _as_nobody(open_dir, [str(mnt), "-o", "allow_other"], fuse_conf="# mount_max = 1000\n")
    _refused_with(result, open_dir, mnt, "fusermount3: option allow_other only allowed if "
                  "'user_allow_other' is set in /etc/fuse.conf", "add a line 'user_allow_other'")
    rootmnt = open_dir / "rootmnt"  # root's, mode 0755
    rootmnt.mkdir()
    for detach in ([], ["-f"]):
        result = _as_nobody(open_dir, [str(rootmnt), *detach])
        _refused_with(result, open_dir, rootmnt, "fusermount3: user has no write access to mountpoint")


def test_missing_fuse_device_is_told(open_dir: Path) -> None:
    """No /dev/fuse (a container without the device, the module not loaded): libfuse's
    'device not found' reaches the user of a detached mount, with what to do. Made as
    root in a private mount namespace whose /dev is a tmpfs without the FUSE node."""
    mnt, cache = open_dir / "rootmnt", open_dir / "cache"
    mnt.mkdir()
    script = ("mount -t tmpfs -o mode=755 tmpfs /dev || exit 99\n"
              "for node in 'null c 1 3' 'zero c 1 5' 'random c 1 8' 'urandom c 1 9'; do\n"
              "  mknod -m 666 /dev/$node || exit 99\n"
              "done\n"
              'exec "$@"\n')
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                             sys.executable, "-m", "cachefs.cli", "mount", str(open_dir / "share"), str(mnt),
                             "--cache-dir", str(cache)],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                            text=True, timeout=NOBODY_TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode != 99, f"could not make the namespace: {result.stderr}"
    reason = failed_with_reason(result, f"cannot mount on {mnt}", "fuse: device not found",
                                "modprobe fuse", "--device /dev/fuse")
    assert "see the log above" not in reason
    assert not is_mounted(mnt) and not cache.exists()
