"""The demo: a share served from this machine, mounted, used online and offline.

``python -m devtools.demo`` (or ``scripts/run demo``) starts an OpenSSH server on
127.0.0.1 with a sample share it creates, mounts it with cachefs through ``mount.py`` as a
user would, and narrates each step: reads, the server going away, reads and edits offline,
a remount while the server is still down, the server coming back, the replay of the
offline edits, and a conflict kept as two files. Everything it starts it stops, and it
removes its temporary folder unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .devserver import SshServer

REPO = Path(__file__).resolve().parent.parent
STEP = 0


def step(text: str) -> None:
    global STEP
    STEP += 1
    print(f"\n\033[1m{STEP}. {text}\033[0m" if sys.stdout.isatty() else f"\n{STEP}. {text}", flush=True)


def show(command: str, output: str) -> None:
    print(f"   $ {command}")
    for line in output.rstrip("\n").splitlines():
        print(f"     {line}")


def run(command: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise SystemExit(f"demo: {' '.join(command)} failed:\n{result.stderr}")
    return result


def status(mnt: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((mnt / ".cachefs" / "status").read_text())
    return result


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.2)
    raise SystemExit(f"demo: {what} did not happen within {timeout:g} s")


def make_share(share: Path) -> None:
    (share / "docs").mkdir(parents=True)
    (share / "photos").mkdir()
    (share / "README.txt").write_text("Welcome to the demo share.\nEverything read here stays readable offline.\n")
    (share / "docs" / "notes.txt").write_text("Meeting notes\n- buy milk\n")
    (share / "docs" / "plan.md").write_text("# Plan\n1. write code\n2. test it\n")
    (share / "photos" / "holiday.raw").write_bytes(os.urandom(24 << 20))
    (share / "never-read.txt").write_text("this file is never read before the server goes away\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the demo folder (share, cache, logs)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cachefs-demo-"))
    os.chmod(work, 0o700)
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir()
    server = SshServer(work / "server")
    mount_cmd = [sys.executable, str(REPO / "mount.py"), server.address(), str(mnt),
                 "--cache-dir", str(cache), "--identity", str(server.identity),
                 "--known-hosts", str(server.known_hosts), "--timeout", "3", "--heartbeat", "2",
                 "--attr-timeout", "1"]
    cachefs = [sys.executable, "-m", "cachefs.cli"]
    try:
        step("Start an OpenSSH server on 127.0.0.1 with a sample share")
        make_share(server.share)
        server.start()
        print(f"   sshd listening on 127.0.0.1:{server.port}, sharing {server.share}")

        step("Mount it with cachefs (host key checked against a known_hosts file)")
        show(" ".join(["python mount.py", server.address(), str(mnt), "..."]), run(mount_cmd).stdout or "(mounted)")
        show(f"ls -R {mnt}", run(["ls", "-R", str(mnt)]).stdout)
        show(f"cat {mnt}/README.txt", (mnt / "README.txt").read_text())

        step("Read a 24 MiB file: the first read fetches it, the second comes from the cache")
        for label in ("first read ", "second read"):
            t = time.monotonic()
            data = (mnt / "photos" / "holiday.raw").read_bytes()
            print(f"   {label}: {len(data) >> 20} MiB in {time.monotonic() - t:.2f} s")
        (mnt / "docs" / "notes.txt").read_text()
        (mnt / "docs" / "plan.md").read_text()
        show(f"getfattr -n user.cachefs.state {mnt}/photos/holiday.raw",
             run(["getfattr", "--only-values", "-n", "user.cachefs.state",
                  str(mnt / "photos" / "holiday.raw")], check=False).stdout or "cached")

        step("The server goes away (sshd stopped)")
        server.stop()
        took = wait_for(lambda: status(mnt)["state"] == "offline", 30, "going offline")
        print(f"   status says offline after {took:.1f} s (heartbeat every 2 s, timeout 3 s)")
        same = (mnt / "photos" / "holiday.raw").read_bytes() == (server.share / "photos" / "holiday.raw").read_bytes()
        print(f"   cached 24 MiB file still reads, bytes identical: {same}")
        t = time.monotonic()
        try:
            (mnt / "never-read.txt").read_text()
            print("   never-read.txt: read (unexpected)")
        except OSError as exc:
            print(f"   never-read.txt fails at once ({time.monotonic() - t:.3f} s): {exc.strerror}")

        step("Edit offline: the change goes to the journal")
        with open(mnt / "docs" / "notes.txt", "a") as f:
            f.write("- call Bob (written offline)\n")
        (mnt / "docs" / "todo.txt").write_text("created offline\n")
        print(f"   pending changes: {status(mnt)['pending']}")

        step("Unmount and mount again while the server is still down")
        run(cachefs + ["unmount", str(mnt)])
        run(mount_cmd)
        print(f"   mounted again, state: {status(mnt)['state']}, pending: {status(mnt)['pending']}")
        show(f"cat {mnt}/docs/notes.txt", (mnt / "docs" / "notes.txt").read_text())

        step("Meanwhile someone else edits the same file on the server")
        (server.share / "docs" / "notes.txt").write_text("Meeting notes\n- buy milk\n- changed on the server\n")
        print("   docs/notes.txt changed on the server side")

        step("The server comes back; 'sync' replays the journal")
        server.start()
        wait_for(lambda: status(mnt)["state"] != "offline", 30, "coming back online")
        result = run(cachefs + ["sync", str(mnt)], check=False)
        print(f"   cachefs sync exited {result.returncode}")
        show(f"ls {server.share}/docs   # on the server", run(["ls", str(server.share / "docs")]).stdout)
        print("   docs/todo.txt, created offline, is on the server; notes.txt changed on both sides,")
        print("   so the server's version keeps the name and ours sits beside it:")
        time.sleep(1.2)
        show(f"ls {mnt}/docs   # in the mount", run(["ls", str(mnt / "docs")]).stdout)
        show("cachefs conflicts", run(cachefs + ["conflicts", str(mnt)]).stdout)
        show("cachefs status", run(cachefs + ["status", str(mnt)]).stdout)

        step("Unmount")
        run(cachefs + ["unmount", str(mnt)])
        print("   done. Try it on your own share: python mount.py USER@HOST:PATH MOUNTPOINT")
        return 0
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        server.stop()
        if args.keep:
            print(f"\n(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
