"""Two clients, one share: two real mounts of the same sshd folder with separate caches.

Both work offline, edit the same file differently and each a file of its own, then come
back one after the other. Every version must survive: the first to replay keeps the name,
the second's edit of the same file becomes a conflict copy, recorded by the mount that
found the conflict.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.fixtures.mount import status
from tests.test_conflicts import conflict_records, copies_of
from tests.test_writes import control, go_offline, no_temp_leftovers, read_all, sync, wait_for, write_file


def test_two_clients_offline_edits_all_survive(mount_factory, share: Path) -> None:
    (share / "same.txt").write_bytes(b"the original text\n")
    (share / "onlyA.txt").write_bytes(b"A's file, original\n")
    (share / "onlyB.txt").write_bytes(b"B's file, original\n")
    a_same = b"edited by client A\n" * 3
    b_same = b"client B wrote this instead\n" * 5
    a_own = b"A changed its own file\n"
    b_own = b"B changed its own file, longer\n" * 2
    with mount_factory(name="mntA", cache="cacheA") as a, \
            mount_factory(name="mntB", cache="cacheB") as b:
        ma, mb = a.mountpoint, b.mountpoint
        read_all(ma)
        read_all(mb)
        go_offline(ma)
        go_offline(mb)
        assert status(ma)["state"] == "offline" and status(mb)["state"] == "offline"
        write_file(ma / "same.txt", a_same)
        write_file(mb / "same.txt", b_same)
        write_file(ma / "onlyA.txt", a_own)
        write_file(mb / "onlyB.txt", b_own)
        write_file(ma / "newA.txt", b"created by A")
        write_file(mb / "newB.txt", b"created by B")
        assert (share / "same.txt").read_bytes() == b"the original text\n"  # nothing yet

        control(ma, "online")
        sync(ma)
        assert status(ma)["pending"] == 0, status(ma)
        assert (share / "same.txt").read_bytes() == a_same
        control(mb, "online")
        sync(mb)
        sb = status(mb)
        assert sb["pending"] == 0, sb

        problems = []
        if (share / "same.txt").read_bytes() != a_same:
            problems.append(f"same.txt on the server: {(share / 'same.txt').read_bytes()!r} (want A's)")
        copies = copies_of(share, "same.txt")
        if len(copies) != 1:
            problems.append(f"expected one conflict copy of same.txt, found {copies} in {os.listdir(share)}")
        elif (share / copies[0]).read_bytes() != b_same:
            problems.append(f"the conflict copy holds {(share / copies[0]).read_bytes()!r}, not B's edit")
        for name, want in (("onlyA.txt", a_own), ("onlyB.txt", b_own),
                           ("newA.txt", b"created by A"), ("newB.txt", b"created by B")):
            got = (share / name).read_bytes() if (share / name).exists() else None
            if got != want:
                problems.append(f"{name} on the server: {got!r}, want {want!r}")
        if sb["conflicts"] < 1:
            problems.append(f"B found the conflict but its status shows none: {sb}")
        records = conflict_records(mb)
        if not any(r.get("path") == "same.txt" for r in records):
            problems.append(f"B's conflicts list has no record for same.txt: {records}")
        if status(ma)["conflicts"] != 0:
            problems.append(f"A recorded a conflict it never met: {conflict_records(ma)}")
        if no_temp_leftovers(share):
            problems.append(f"temporary files left: {no_temp_leftovers(share)}")
        assert not problems, "\n".join(problems)

        # A sees B's changes once its listing is refreshed (attr timeout 1 s).
        wait_for(lambda: (ma / "onlyB.txt").read_bytes() == b_own
                 and "newB.txt" in os.listdir(ma), 10, "A to see B's changes", interval=0.2)
        # B keeps the name for the remote (A's) version and shows its own as the copy.
        wait_for(lambda: (mb / "same.txt").read_bytes() == a_same
                 and len(copies_of(mb, "same.txt")) == 1, 10, "B to show both versions", interval=0.2)


def test_two_clients_sync_at_the_same_moment_keep_every_version(mount_factory, share: Path) -> None:
    """Issue 19, item 1: two mounts of one share on one machine (one host name) edit the
    same files offline, the server's copies change too, and both run ``online`` and
    ``sync`` at the same moment. Each client's version survives in a conflict copy of
    its own (the name carries the host and the cache's id), the server's keeps the name,
    both syncs return, and each mount's record points at its own copy. (Large files:
    the two uploads of the copies overlap.)"""
    import threading

    from tests.test_conflicts import change_on_server

    names = [f"col{i}.txt" for i in range(3)]
    for name in names:
        (share / name).write_bytes(b"original\n")
    versions = {"A": {n: bytes([65 + i]) * ((i + 1) << 20) for i, n in enumerate(names)},
                "B": {n: b"B" + bytes([48 + i]) * ((i + 2) << 20) for i, n in enumerate(names)}}
    with mount_factory(name="mntA", cache="cacheA") as a, mount_factory(name="mntB", cache="cacheB") as b:
        mounts = {"A": a.mountpoint, "B": b.mountpoint}
        for mnt in mounts.values():
            read_all(mnt)
            go_offline(mnt)
        for who, mnt in mounts.items():
            for name, data in versions[who].items():
                write_file(mnt / name, data)
        for name in names:
            change_on_server(share / name, b"the server's " + name.encode())
        said: dict[str, str] = {}

        def online_and_sync(who: str) -> None:
            try:
                control(mounts[who], "online")
                control(mounts[who], "sync", timeout=60)
                said[who] = "ok"
            except OSError as exc:
                said[who] = repr(exc)

        threads = [threading.Thread(target=online_and_sync, args=(who,)) for who in mounts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        problems = [f"{who}: sync {text}" for who, text in said.items() if text != "ok"]
        problems += [f"{who}: sync did not return" for who in mounts if who not in said]
        for name in names:
            if (share / name).read_bytes() != b"the server's " + name.encode():
                problems.append(f"{name} on the server is not the server's version")
            held = sorted((share / c).read_bytes()[:2] for c in copies_of(share, name))
            want = sorted(versions[who][name][:2] for who in mounts)
            if held != want:
                problems.append(f"copies of {name}: {copies_of(share, name)} hold {held}, want {want}")
        for who, mnt in mounts.items():
            client = status(mnt)["client"]
            for record in conflict_records(mnt):
                copy = record.get("conflict_path", "")
                if record["kind"] != "changed-both" or client not in copy:
                    problems.append(f"{who}'s record {record} is not a copy of its own ({client})")
                elif (share / copy).read_bytes() != versions[who][record["path"]]:
                    problems.append(f"{who}'s record points at {copy}, which does not hold its version")
            if len(conflict_records(mnt)) != len(names):
                problems.append(f"{who} recorded {conflict_records(mnt)}")
        if no_temp_leftovers(share):
            problems.append(f"temporary files left: {no_temp_leftovers(share)}")
        assert not problems, "\n".join(problems)
