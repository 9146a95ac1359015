"""Security hardening, end to end: host keys, the cache's modes, secrets in logs, who may
reach the mount and its control file, a fuzzed control file, and the encrypted cache.

Tests that act as another user run ``su nobody`` on a mount point in a folder that
``nobody`` may traverse (pytest's own tmp folders are 0700: a refusal there would prove
nothing), and first check that ``nobody`` can reach the bare folder.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.mount import MountError, run_with_timeout, status
from tests.test_writes import control, read_all, sync, wait_for, write_file

SU_TIMEOUT = 15.0
FUZZ_ALLOWED = {errno.EINVAL, errno.ENOENT, errno.EHOSTDOWN}
VERBS = ["sync", "offline", "online", "pin", "unpin", "evict", "resolve"]


def as_nobody(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", command],
                          capture_output=True, text=True, timeout=SU_TIMEOUT, stdin=subprocess.DEVNULL)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder under /tmp that every user may traverse, for mount points."""
    path = Path(tempfile.mkdtemp(prefix="cachefs-sec-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _start_refused(mount) -> str:
    """Start ``mount``, which must refuse; returns its log. Checks: non-zero exit, no traceback."""
    with pytest.raises(MountError):
        mount.start()
    assert mount.process is not None and mount.process.returncode not in (None, 0)
    text = mount.log_text()
    assert "Traceback" not in text, text
    return text


# -- host keys -------------------------------------------------------------------------------

def test_unknown_host_key_refused_unless_accept_new(mount_factory, sshd, share: Path, tmp_path: Path) -> None:
    (share / "hello.txt").write_bytes(b"hello")
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    text = _start_refused(mount_factory(known_hosts=empty, name="m1", cache="c1", check_log=False))
    assert "host key" in text.lower() or "known_hosts" in text, text[-2000:]
    assert empty.read_text() == "", "a refused key was recorded anyway"

    with mount_factory("--accept-new-host-key", known_hosts=empty, name="m2", cache="c2") as mount:
        assert (mount.mountpoint / "hello.txt").read_bytes() == b"hello"
    key_b64 = sshd.host_key_pub.read_text().split()[1]
    assert key_b64 in empty.read_text(), "the accepted key was not recorded in known_hosts"


@pytest.mark.parametrize("accept_new", [False, True], ids=["strict", "accept-new"])
def test_changed_host_key_always_refused(mount_factory, sshd, share: Path, tmp_path: Path,
                                         accept_new: bool) -> None:
    known = tmp_path / "known_hosts_old"
    shutil.copyfile(sshd.known_hosts, known)
    sshd.regenerate_host_key()
    sshd.restart()
    extra = ("--accept-new-host-key",) if accept_new else ()
    text = _start_refused(mount_factory(*extra, known_hosts=known, check_log=False))
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in text, text[-3000:]
    new_b64 = sshd.host_key_pub.read_text().split()[1]
    assert new_b64 not in known.read_text(), "the changed key was written to known_hosts"


# -- the cache directory ---------------------------------------------------------------------

def test_cache_dir_private_after_use(mount_factory, share: Path, tmp_path: Path) -> None:
    (share / "sub").mkdir()
    for i in range(5):
        (share / "sub" / f"r{i}.bin").write_bytes(os.urandom(50_000))
    with mount_factory() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        write_file(mnt / "written.txt", b"local data")
        control(mnt, "pin sub")
        control(mnt, "offline")
        write_file(mnt / "offline.txt", b"journaled")
        control(mnt, "online")
        sync(mnt)
    cache = tmp_path / "cache"
    loose = []
    for folder, dirs, files in os.walk(cache):
        for name in dirs + files + ([] if folder != str(cache) else ["."]):
            path = os.path.join(folder, name)
            st_ = os.lstat(path)
            if st_.st_mode & 0o077:
                loose.append(f"{os.path.relpath(path, cache)} {stat.filemode(st_.st_mode)}")
    assert not loose, f"readable or writable by group/others in the cache: {loose}"
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700


def test_cache_dir_writable_by_others_refused(mount_factory, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chmod(cache, 0o777)
    text = _start_refused(mount_factory(check_log=False))
    assert "writable by group or others" in text, text[-2000:]
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o777  # refused, not silently changed


def test_no_key_material_in_logs(mount_factory, sshd, share: Path) -> None:
    (share / "a.txt").write_bytes(b"a")
    with mount_factory() as mount:  # -v: debug logging
        mnt = mount.mountpoint
        read_all(mnt)
        write_file(mnt / "b.txt", b"b")
        sync(mnt)
        control(mnt, "offline")
        control(mnt, "online")
        sync(mnt)
        text = mount.log_text()
    key_lines = [line for line in sshd.identity.read_text().splitlines()
                 if line and not line.startswith("-----")]
    body = "".join(key_lines)
    assert "PRIVATE KEY" not in text
    leaked = [line for line in key_lines if len(line) >= 16 and line in text]
    assert not leaked, f"private key lines in the log: {leaked}"
    assert body[:40] not in text and body[-40:] not in text
    assert "DEBUG" in text, "the log has no debug lines: -v was not in effect, the check proves little"


# -- who may reach the mount -----------------------------------------------------------------

def test_allow_other_off_by_default(mount_factory, open_dir: Path, share: Path) -> None:
    mnt = open_dir / "mnt"
    mnt.mkdir()
    os.chmod(mnt, 0o755)
    before = as_nobody(f"stat {mnt}")
    assert before.returncode == 0, f"nobody cannot reach the bare folder: {before.stderr}"
    with mount_factory(name=str(mnt)):
        result = as_nobody(f"stat {mnt}")
        assert result.returncode != 0 and "Permission denied" in result.stderr, \
            (result.returncode, result.stdout, result.stderr)
        assert status(mnt)["state"] == "online"


def test_control_file_refuses_other_users(mount_factory, open_dir: Path, share: Path) -> None:
    (share / "x.txt").write_bytes(b"x")
    mnt = open_dir / "mnt"
    mnt.mkdir()
    with mount_factory("-o", "allow_other", name=str(mnt)) as mount:
        reach = as_nobody(f"cat {mnt}/x.txt")
        assert reach.returncode == 0 and reach.stdout == "x", \
            f"with allow_other nobody should read the share: {reach.stderr}"
        for command in ("sync", "offline"):
            result = as_nobody(f"echo {command} > {mnt}/.cachefs/control")
            assert result.returncode != 0, f"nobody could write {command!r} to the control file"
            assert ("Permission denied" in result.stderr
                    or "Operation not permitted" in result.stderr), result.stderr
        assert status(mnt)["state"] == "online", "nobody's 'offline' took effect"
        control(mount.mountpoint, "sync")  # the mounting user still may


# -- fuzzed control file -----------------------------------------------------------------

_text_commands = st.one_of(
    st.tuples(st.sampled_from(VERBS + ["SYNC", "pinn", "", " ", "sync sync"]),
              st.one_of(st.just(""), st.text(max_size=60),
                        st.sampled_from([" x.txt", " ../..", " /etc", " .cachefs", " sub/..", " nope",
                                         " x.txt local", " x.txt bogus", " \x00", "\n", " x.txt\nsync"]))
              ).map(lambda t: (t[0] + t[1]).encode("utf-8", "surrogatepass")),
    st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
)
_payloads = st.one_of(st.binary(min_size=1, max_size=8192), _text_commands.filter(bool))


def _write_control(mnt: Path, payload: bytes) -> int:
    def write() -> int:
        fd = os.open(mnt / ".cachefs" / "control", os.O_WRONLY)
        try:
            os.write(fd, payload)
        except OSError as exc:
            return exc.errno
        finally:
            os.close(fd)
        return 0
    return run_with_timeout(write, 30, f"control write {payload[:40]!r}")


def _is_valid(payload: bytes) -> bool:
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False
    if not text or "\n" in text or "\0" in text:
        return False
    verb = text.split(" ", 1)[0]
    return verb in VERBS


def test_control_file_fuzzed(mount_factory, share: Path) -> None:
    (share / "x.txt").write_bytes(b"x")
    (share / "sub").mkdir()
    with mount_factory(allowed_errors=[r"control command failed"]) as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        seen = {"ok": 0, "failed": 0}

        @settings(max_examples=200, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(payload=_payloads)
        def check(payload: bytes) -> None:
            err = _write_control(mnt, payload)
            st_ = status(mnt)  # the mount still answers
            if err == 0:
                seen["ok"] += 1
                assert _is_valid(payload), f"{payload[:80]!r} was accepted"
            else:
                seen["failed"] += 1
                assert err in FUZZ_ALLOWED, f"{payload[:80]!r}: errno {errno.errorcode.get(err, err)}"
                assert st_["last_error"], f"no last_error after {payload[:80]!r} failed: {st_}"

        check()
        assert seen["failed"] > 50, seen
        control(mnt, "online")
        wait_for(lambda: status(mnt)["state"] in ("online", "syncing"), 15, "online again")
        assert (mnt / "x.txt").read_bytes() == b"x"


# -- encrypted cache at rest ------------------------------------------------------------------

def _found_under(folder: Path, needles: list[bytes]) -> list[str]:
    """Where under ``folder`` (every file, logs included) any of ``needles`` stands."""
    found = []
    for where, _dirs, files in os.walk(folder):
        for f in files:
            data = Path(where, f).read_bytes()
            found += [f"{needle!r} in {os.path.relpath(os.path.join(where, f), folder)}"
                      for needle in needles if needle in data]
    return found


def test_encrypted_cache_at_rest(mount_factory, sshd, share: Path, tmp_path: Path) -> None:
    """Needs ``--encrypt-cache`` / ``--cache-key-file`` (being added): fails until then."""
    help_text = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "mount.py"), "--help"],
                               capture_output=True, text=True, timeout=30).stdout
    assert "--encrypt-cache" in help_text and "--cache-key-file" in help_text, \
        "mount.py has no --encrypt-cache / --cache-key-file yet"
    key = tmp_path / "cache.key"
    key.write_bytes(os.urandom(32))
    os.chmod(key, 0o600)
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    os.chmod(wrong, 0o600)
    name = "zq-unique-name-8c1f3e.txt"
    content = b"zq-unique-content-5d9a0b7e " * 100
    (share / "served-7f2e.txt").write_bytes(b"zq-served-content-41a8 " * 50)
    with mount_factory("--encrypt-cache", "--cache-key-file", str(key)) as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        write_file(mnt / name, content)
        sync(mnt)
        control(mnt, "offline")
    cache = tmp_path / "cache"
    needles = [content[:26], name.encode(), b"zq-served-content-41a8", b"served-7f2e"]
    found = _found_under(cache, needles)
    assert not found, f"plain text in the encrypted cache: {found}"

    text = _start_refused(mount_factory("--encrypt-cache", "--cache-key-file", str(wrong),
                                        name="mnt2", check_log=False))
    assert "key" in text.lower(), text[-2000:]

    sshd.stop()
    with mount_factory("--encrypt-cache", "--cache-key-file", str(key), name="mnt3",
                       allowed_errors=[r"cannot reach", r"offline"]) as again:
        assert (again.mountpoint / name).read_bytes() == content
        assert (again.mountpoint / "served-7f2e.txt").read_bytes() == b"zq-served-content-41a8 " * 50


# -- an encrypted cache's log names nothing ---------------------------------------------------

def test_encrypted_cache_log_names_nothing(sshd, share: Path, tmp_path: Path) -> None:
    """A detached mount of an encrypted cache, without -v, through real sshd: a conflict, an
    offline period (sshd stopped) with a change made then, and a replay the server refuses
    (an immutable folder) all log their events, and no file under the cache dir (mount.log
    above all) names a file, a folder, the remote host or the share path in plain text. The
    old code wrote "conflict (changed-both) on b'...'" and the remote's address there.
    With -v the names are logged, and a warning says so on stderr and in the log."""
    from tests.test_cli import _stop_daemon, cachefs, ok

    names = ["zqconf-9a1b.txt", "zqdir-5e1c", "zqnew-3c4d.txt", "zqlocked-44e1", "zqinner-6b2f.txt"]
    (share / "zqdir-5e1c").mkdir()
    (share / "zqdir-5e1c" / "zqconf-9a1b.txt").write_bytes(b"base")
    (share / "zqlocked-44e1").mkdir()
    key = tmp_path / "cache.key"
    key.write_bytes(os.urandom(32))
    os.chmod(key, 0o600)
    mnt, cache = tmp_path / "encmnt", tmp_path / "enccache"
    mnt.mkdir()
    args = [sshd.address(), str(mnt), "--cache-dir", str(cache), "--identity", str(sshd.identity),
            "--known-hosts", str(sshd.known_hosts), "--cache-key-file", str(key),
            "--timeout", "2", "--heartbeat", "1", "--attr-timeout", "1"]
    locked = share / "zqlocked-44e1"
    try:
        started = ok(cachefs("mount", *args))
        assert "plain text" not in started.stderr
        read_all(mnt)
        # a conflict
        control(mnt, "offline")
        write_file(mnt / "zqdir-5e1c" / "zqconf-9a1b.txt", b"ours")
        (share / "zqdir-5e1c" / "zqconf-9a1b.txt").write_bytes(b"theirs, changed")
        st = (share / "zqdir-5e1c" / "zqconf-9a1b.txt").stat()
        os.utime(share / "zqdir-5e1c" / "zqconf-9a1b.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**11))
        control(mnt, "online")
        wait_for(lambda: status(mnt)["state"] == "online", 15, "online")
        sync(mnt)
        assert status(mnt)["conflicts"] >= 1
        # an offline period: the server goes away, a change is made, the server comes back
        sshd.stop()
        wait_for(lambda: status(mnt)["state"] == "offline", 15, "offline")
        write_file(mnt / "zqnew-3c4d.txt", b"made offline")
        sshd.start()
        wait_for(lambda: status(mnt)["state"] == "online", 30, "online again")
        wait_for(lambda: (share / "zqnew-3c4d.txt").exists(), 30, "the offline change replayed")
        # a replay the server refuses: a folder that even root cannot change
        subprocess.run(["chattr", "+i", str(locked)], check=True, timeout=10)
        write_file(mnt / "zqlocked-44e1" / "zqinner-6b2f.txt", b"refused")
        try:
            sync(mnt)  # the refusal is recorded (a conflict of kind "error"), or fails the sync
        except OSError:
            pass
        subprocess.run(["chattr", "-i", str(locked)], check=True, timeout=10)
        ok(cachefs("unmount", str(mnt)))
    finally:
        subprocess.run(["chattr", "-i", str(locked)], timeout=10)
        _stop_daemon(mnt)

    log_text = (cache / "mount.log").read_text(errors="replace")
    for event in ("conflict (changed-both) on ", "working offline", "reachable: online",
                  "cannot replay create "):
        assert event in log_text, f"no {event!r} line: the test did not make it happen\n{log_text[-3000:]}"
    needles = [n.encode() for n in names] + [b"127.0.0.1", os.fsencode(share), os.fsencode(mnt),
                                             os.fsencode(cache)]
    found = _found_under(cache, needles)
    assert not found, f"names in plain text under the encrypted cache's directory: {found}\n{log_text[-3000:]}"

    # --verbose asks for names: a warning on stderr and in the log, and the names are there
    try:
        started = ok(cachefs("mount", *args, "-v"))
        assert "plain text" in started.stderr and str(cache / "mount.log") in started.stderr, started.stderr
        read_all(mnt)
        ok(cachefs("unmount", str(mnt)))
    finally:
        _stop_daemon(mnt)
    log_text = (cache / "mount.log").read_text(errors="replace")
    assert "--verbose with an encrypted cache: this log names files" in log_text
    assert "127.0.0.1" in log_text


def test_redactor_keeps_templates_numbers_and_errnos(capsys) -> None:
    """In-process: what the filter on an encrypted cache's log handler keeps and replaces,
    for the forms names take (bytes and str arguments, paths, an OSError's file names, a
    RemoteError's text, chained exceptions and exception groups in tracebacks), and that
    ``setup_logging`` puts it on the stderr handler of a foreground mount too."""
    import errno
    import logging

    from cachefs.daemon import setup_logging
    from cachefs.errors import RemoteError
    from cachefs.redact import Redactor

    def render(*args, exc: BaseException | None = None, msg: object = "x %s %r") -> str:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, msg, args,
                                   (type(exc), exc, exc.__traceback__) if exc else None)
        redactor.filter(record)
        return logging.Formatter("%(message)s").format(record)

    redactor = Redactor()
    secret = "zq-secret-31f0"
    line = render(secret, secret.encode())
    assert secret not in line and line.startswith("x [text ") and "[name " in line, line
    tag = redactor.tag("text", secret)
    assert render(secret, secret) == f"x {tag} {tag}", "one name, one tag within one process"
    assert render(7, 2.5) == "x 7 2.5"
    assert render("changed-both", "store") == "x changed-both 'store'"  # the code's own words
    assert render(Path("/srv") / secret, None) == f"x {redactor.tag('path', ('/srv/' + secret).encode())} None"
    line = render("a", RemoteError(errno.EACCES, f"upload {secret}: refused"), msg="%s %s")
    assert secret not in line and "[Errno 13 EACCES] [text " in line, line
    try:
        try:
            open(f"/nonexistent/{secret}")
        except OSError as inner:
            raise ExceptionGroup(f"group {secret}", [ValueError(secret), inner]) from inner
    except ExceptionGroup as exc:
        line = render(secret, exc=exc, msg="failed %s")
    assert secret not in line, line
    assert "FileNotFoundError: [Errno 2 ENOENT] No such file or directory: [text " in line, line
    assert "ValueError: [text " in line and "Traceback (most recent call last)" in line, line
    assert 'line ' in line and "open(" in line, "the frames (code) are kept"
    assert secret not in render(msg=ValueError(secret))
    assert render({"k": secret, "n": 3}, msg="%(k)s %(n)d") == f"{tag} 3"

    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        setup_logging(False, None, redact=True)  # --foreground: the log goes to stderr
        logging.getLogger("cachefs.test").warning("conflict (%s) on %r", "changed-both", secret.encode())
        err = capsys.readouterr().err
        assert "conflict (changed-both) on [name " in err and secret not in err, err
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def test_redactor_takes_known_texts_out_of_templates() -> None:
    """A library that formats its message before logging it (paramiko does) gives the
    filter no argument to replace: the remote's address and the local paths are taken out
    of the message template itself, and of traceback text."""
    import logging

    from cachefs.redact import Redactor

    redactor = Redactor(known=("sftp://alice@zqhost-1f/srv/zqshare", "zqhost-1f", "/srv/zqshare", "/"))
    record = logging.LogRecord("paramiko.transport", logging.WARNING, __file__, 1,
                               "Socket exception on zqhost-1f: /srv/zqshare/x (sftp://alice@zqhost-1f/srv/zqshare)",
                               None, None)
    redactor.filter(record)
    text = record.getMessage()
    assert "zqhost" not in text and "zqshare" not in text, text
    assert text.startswith("Socket exception on [text "), text


def test_log_calls_pass_names_as_arguments() -> None:
    """The redacting filter can replace what a log call passes as an argument; a name
    formatted into the message itself (an f-string, ``%`` or ``.format`` before the call)
    would reach an encrypted cache's log in clear. Every log call in cachefs has a literal
    template (exceptions are passed as arguments, not as the message)."""
    import ast

    levels = {"debug", "info", "warning", "error", "exception", "critical"}
    offenders = []
    for path in sorted((Path(__file__).resolve().parents[1] / "cachefs").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in levels and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in ("log", "logger", "logging")):
                continue
            first = node.args[0] if node.args else None
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:100]}")
    assert not offenders, "log calls without a literal template:\n" + "\n".join(offenders)
