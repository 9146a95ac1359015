"""Every conflict case of the replay, end to end: what the server holds afterwards, what the
mount shows (after its listing refresh, ``--attr-timeout 1``), and what status and
``.cachefs/conflicts`` report. The remote keeps the name; the local version is never lost.
Every kind marks the names it concerns: ``user.cachefs.state`` is ``conflict`` for each
name still there that a record names (the original, the copy, a rename's target), and
status counts the records by kind (``conflict_kinds``).

The commonest cases (changed on both sides, deleted on one side and changed on the other,
made on both sides, renamed onto a name made there) are tests/test_any_backend.py's, run
over every protocol; the helpers here serve both files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.fixtures.mount import REPO, _run_with_timeout, status
from tests.test_writes import control, go_offline, read_all, sync, wait_for, write_file

CONFLICT_RE = re.compile(r"^(?P<stem>.*) \(conflict \d{4}-\d\d-\d\d \d{6} [^)]+\)(?P<ext>.*)$")
REFRESH = 6.0  # bound on waiting for the mount's view (attr timeout is 1 s)
LATER = 10**9 * 100  # a remote change also moves the mtime well away from the cached one


def conflict_records(mnt: Path) -> list[dict]:
    path = mnt / ".cachefs" / "conflicts"
    return json.loads(_run_with_timeout(path.read_text, 10, "reading conflicts"))


def copies_of(folder: Path, name: str) -> list[str]:
    stem, dot, ext = name.rpartition(".") if "." in name.lstrip(".") else (name, "", "")
    ext = dot + ext
    out = []
    for entry in os.listdir(folder):
        match = CONFLICT_RE.match(entry)
        if match and match["stem"] == stem and match["ext"] == ext:
            out.append(entry)
    return out


def change_on_server(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + LATER))


def assert_recorded(mnt: Path, path: str, kind: str | None = None) -> dict:
    shown = status(mnt)
    assert shown["conflicts"] >= 1, shown
    records = [r for r in conflict_records(mnt) if r.get("path") == path]
    assert records, f"no conflict recorded for {path}: {conflict_records(mnt)}"
    if kind is not None:
        assert any(r.get("kind") == kind for r in records), records
        assert shown["conflict_kinds"].get(kind, 0) >= 1, shown["conflict_kinds"]
    return records[0]


def state_of(path: Path) -> str:
    return _run_with_timeout(lambda: os.getxattr(path, "user.cachefs.state").decode(), 10,
                             f"the state of {path}")


def path_state_line(path: Path) -> str:
    """The ``path state:`` line of ``cachefs status PATH``."""
    result = subprocess.run([sys.executable, "-m", "cachefs.cli", "status", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return next(line for line in result.stdout.splitlines() if line.startswith("path state:"))


def shows_conflict(*paths: Path) -> None:
    """Wait until each of ``paths`` is in the mount with the state ``conflict``."""
    def ok() -> bool:
        return all(os.path.lexists(p) and state_of(p) == "conflict" for p in paths)

    try:
        wait_for(ok, REFRESH, f"{[p.name for p in paths]} to show 'conflict'", interval=0.2)
    except AssertionError:
        seen = {p.name: state_of(p) if os.path.lexists(p) else "(missing)" for p in paths}
        raise AssertionError(f"states: {seen}") from None


def mount_shows(mnt: Path, expected: dict[str, bytes], folder: str = "") -> None:
    """Wait until the mount lists and reads ``expected`` (name -> bytes) in ``folder``."""
    def ok() -> bool:
        here = mnt / folder
        names = os.listdir(here)
        for name, data in expected.items():
            if name not in names or (here / name).read_bytes() != data:
                return False
        return True

    try:
        wait_for(ok, REFRESH, f"the mount to show {sorted(expected)}", interval=0.2)
    except AssertionError:
        here = mnt / folder
        seen = {n: (here / n).read_bytes()[:60] for n in os.listdir(here)
                if n != ".cachefs" and (here / n).is_file()}
        raise AssertionError(f"the mount shows {seen}, expected {expected}") from None


def test_created_in_folder_removed_there(mount_factory, share: Path) -> None:
    (share / "project" / "old").mkdir(parents=True)
    (share / "project" / "old" / "x.txt").write_bytes(b"x")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        go_offline(mnt)
        write_file(mnt / "project" / "old" / "fresh.txt", b"written offline")
        shutil.rmtree(share / "project")
        control(mnt, "online")
        sync(mnt)
        assert (share / "project" / "old").is_dir()
        assert (share / "project" / "old" / "fresh.txt").read_bytes() == b"written offline"
        assert status(mnt)["pending"] == 0
        mount_shows(mnt, {"fresh.txt": b"written offline"}, folder="project/old")
        assert_recorded(mnt, "project/old/fresh.txt", "folder-recreated")
        shows_conflict(mnt / "project" / "old" / "fresh.txt")


def test_folder_deleted_here_filled_there(mount_factory, share: Path) -> None:
    """A folder removed here that got a new file there: kept, and marked."""
    (share / "old").mkdir()
    (share / "old" / "x.txt").write_bytes(b"x")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        go_offline(mnt)
        shutil.rmtree(mnt / "old")
        (share / "old" / "new.txt").write_bytes(b"new there")
        control(mnt, "online")
        sync(mnt)
        assert sorted(os.listdir(share / "old")) == ["new.txt"]
        assert_recorded(mnt, "old", "folder-not-empty-remote")
        mount_shows(mnt, {"new.txt": b"new there"}, folder="old")
        shows_conflict(mnt / "old")
        control(mnt, "resolve old both")
        assert state_of(mnt / "old") != "conflict"


def test_folder_made_here_file_there(mount_factory, share: Path) -> None:
    """A type change: a folder made here where a file appeared there (created-both)."""
    with mount_factory() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        go_offline(mnt)
        (mnt / "thing").mkdir()
        (share / "thing").write_bytes(b"a file there")
        control(mnt, "online")
        sync(mnt)
        assert (share / "thing").read_bytes() == b"a file there"
        copies = copies_of(share, "thing")
        assert len(copies) == 1 and (share / copies[0]).is_dir(), os.listdir(share)
        assert_recorded(mnt, "thing", "created-both")
        mount_shows(mnt, {"thing": b"a file there"})
        shows_conflict(mnt / "thing", mnt / copies[0])


def test_file_changed_here_folder_there(mount_factory, share: Path) -> None:
    """A type change the other way: a file changed here became a folder there. The
    server's folder keeps the name; our file goes beside it."""
    (share / "item").write_bytes(b"base")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        go_offline(mnt)
        write_file(mnt / "item", b"changed here")
        (share / "item").unlink()
        (share / "item").mkdir()
        (share / "item" / "inside.txt").write_bytes(b"inside")
        control(mnt, "online")
        sync(mnt)
        assert (share / "item" / "inside.txt").read_bytes() == b"inside"
        copies = copies_of(share, "item")
        assert len(copies) == 1 and (share / copies[0]).read_bytes() == b"changed here", os.listdir(share)
        assert_recorded(mnt, "item", "changed-both")
        wait_for(lambda: (mnt / "item").is_dir(), REFRESH, "the server's folder in the mount")
        shows_conflict(mnt / "item", mnt / copies[0])


def test_renamed_here_deleted_there(mount_factory, share: Path) -> None:
    """The deletion there wins; the record names both names (none is left to mark)."""
    (share / "a.txt").write_bytes(b"a")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        go_offline(mnt)
        os.rename(mnt / "a.txt", mnt / "c.txt")
        (share / "a.txt").unlink()
        control(mnt, "online")
        sync(mnt)
        assert sorted(os.listdir(share)) == []
        record = assert_recorded(mnt, "a.txt", "renamed-missing-remote")
        assert record.get("target") == "c.txt", record
        wait_for(lambda: "c.txt" not in os.listdir(mnt), REFRESH, "c.txt gone from the mount")


def test_mode_changed_here_deleted_there(mount_factory, share: Path) -> None:
    (share / "f.txt").write_bytes(b"f")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        go_offline(mnt)
        os.chmod(mnt / "f.txt", 0o600)
        (share / "f.txt").unlink()
        control(mnt, "online")
        sync(mnt)
        assert_recorded(mnt, "f.txt", "attributes-of-deleted")
        wait_for(lambda: "f.txt" not in os.listdir(mnt), REFRESH, "f.txt gone from the mount")


def test_identical_content_is_no_conflict(mount_factory, share: Path) -> None:
    (share / "same.txt").write_bytes(b"base")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        go_offline(mnt)
        write_file(mnt / "same.txt", b"the same new bytes")
        write_file(mnt / "twin.txt", b"twin")
        change_on_server(share / "same.txt", b"the same new bytes")
        (share / "twin.txt").write_bytes(b"twin")
        control(mnt, "online")
        sync(mnt)
        assert status(mnt)["conflicts"] == 0, conflict_records(mnt)
        assert conflict_records(mnt) == []
        assert sorted(os.listdir(share)) == ["same.txt", "twin.txt"]
        assert (share / "same.txt").read_bytes() == b"the same new bytes"
        mount_shows(mnt, {"same.txt": b"the same new bytes", "twin.txt": b"twin"})


def test_conflict_copy_of_a_255_byte_utf8_name_can_be_resolved(mount_factory, share: Path) -> None:
    """Issue 19, item 8: the copy of a 255-byte name of 3-byte characters is cut between
    two characters (four endings, so that the cut falls at every place in a character
    whatever the host name's length), and ``resolve`` takes it by that name."""
    names = []
    for ext in ("", ".a", ".ab", ".abc"):
        stem = "€" * ((255 - len(ext)) // 3)
        names.append(stem + ext)
    for name in names:
        (share / name).write_bytes(b"base")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        go_offline(mnt)
        for name in names:
            write_file(mnt / name, b"ours")
            change_on_server(share / name, b"theirs")
        control(mnt, "online")
        sync(mnt)
        copies = [n for n in os.listdir(os.fsencode(share)) if b"(conflict " in n]
        assert len(copies) == len(names), copies
        for copy in copies:
            assert len(copy) <= 255
            text = copy.decode("utf-8")  # (fails for a name cut inside a character)
            assert (share / text).read_bytes() == b"ours"
            assert any(r.get("conflict_path") == text for r in conflict_records(mnt))
            control(mnt, f"resolve {text} both")
        assert conflict_records(mnt) == []
        assert all((share / name).read_bytes() == b"theirs" for name in names)
