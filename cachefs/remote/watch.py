"""Server callbacks: a watcher that runs beside the share and streams the paths that change.

Owns: the command that runs the watcher (``watch_command``: ``inotifywait`` when the
machine has it, else a small script on its ``python3``), the parsing of its output into
share-relative paths (``ChangeStream``), and the watch of a local folder (``ProcessWatch``,
the same command run here). The SFTP backend runs the same command over an SSH exec
channel (``sftp.SftpRemote.watch``).
Must not touch: the cache (which decides what a change means), the network otherwise.

What runs on the server, exactly: ``sh -c`` of ``watch_command``'s text, which starts
either ``inotifywait -m -r`` on the share (inotify-tools) or ``python3 -c SCRIPT`` with the
short script below (ctypes inotify, a watch per folder); it prints each changed path
followed by a NUL byte, says ``Watches established.`` on its error output once every
folder is watched, and ends when its standard input closes (the channel or pipe went
away), so a dropped client leaves no process behind. It reads nothing and writes nothing
in the share. The server's inotify limits bound it (``fs.inotify.max_user_watches``: a
folder each); past them it stops, and the mount goes back to checks by time.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import time
from abc import ABC, abstractmethod

log = logging.getLogger(__name__)

READY = b"Watches established."
STARTED = b"cachefs-watch: started"  # said first: the server runs the command
#: what changes: contents (each write, and the close after them), attributes, names
EVENTS = "modify,attrib,close_write,move,create,delete,delete_self,move_self"
WATCHERS = ("inotifywait", "python3")

# The python3 watcher. No single quote may appear in it (it travels inside one).
# Python 3.4 or later; bytes paths throughout (names need not be UTF-8).
_SCRIPT = r"""
import ctypes, os, select, struct, sys
root = os.fsencode(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
ino = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
if ino < 0:
    sys.stderr.write("cachefs-watch: inotify_init1 failed\n"); sys.exit(3)
MASK = 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800
ONLYDIR, NOFOLLOW, ISDIR, IGNORED, OVERFLOW = 0x1000000, 0x2000000, 0x40000000, 0x8000, 0x4000
path_of = {}
def watch(top):
    todo = [top]
    while todo:
        path = todo.pop()
        wd = libc.inotify_add_watch(ino, path, MASK | ONLYDIR | NOFOLLOW)
        if wd < 0:
            err = ctypes.get_errno()
            if err in (28, 12):
                sys.stderr.write("cachefs-watch: inotify watch limit reached\n"); sys.exit(4)
            continue
        path_of[wd] = path
        try:
            entries = list(os.scandir(path))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)
            except OSError:
                pass
watch(root)
sys.stderr.write("Watches established.\n"); sys.stderr.flush()
out = sys.stdout.buffer
moved = {}
while True:
    ready = select.select([ino, 0], [], [])[0]
    if 0 in ready and not os.read(0, 4096):
        sys.exit(0)
    if ino not in ready:
        continue
    try:
        data = os.read(ino, 1 << 16)
    except BlockingIOError:
        continue
    pos, changed = 0, []
    while pos < len(data):
        wd, mask, cookie, size = struct.unpack_from("iIII", data, pos)
        name = data[pos + 16:pos + 16 + size].rstrip(b"\0")
        pos += 16 + size
        if mask & OVERFLOW:
            changed.append(b"")
            continue
        base = path_of.get(wd)
        if mask & IGNORED:
            path_of.pop(wd, None)
        if base is None:
            continue
        path = base + b"/" + name if name else base
        changed.append(path)
        if mask & ISDIR and mask & 0x40:
            moved[cookie] = path
        elif mask & ISDIR and mask & 0x80:
            old = moved.pop(cookie, None)
            if old is not None:
                for w, p in list(path_of.items()):
                    if p == old or p.startswith(old + b"/"):
                        path_of[w] = path + p[len(old):]
            if path not in path_of.values():
                watch(path)
        elif mask & ISDIR and mask & 0x100:
            watch(path)
    for cookie, old in moved.items():
        for w, p in list(path_of.items()):
            if p == old or p.startswith(old + b"/"):
                libc.inotify_rm_watch(ino, w)
                path_of.pop(w, None)
    moved.clear()
    out.write(b"".join(p + b"\0" for p in changed)); out.flush()
"""


def watch_command(root: bytes, using: str = "auto") -> bytes:
    """The ``sh`` command line that watches ``root`` (absolute) and streams its changes.

    ``using``: "inotifywait", "python3", or "auto" (the first the machine has). Exits 127
    when it has neither."""
    quoted = shell_quote(root)
    # inotifywait runs while its input (the channel) is open: a helper reads that input
    # and ends it at EOF; the command ends (and with it the channel) when it ends.
    inotifywait = (b"exec 3<&0; inotifywait -m -r --format %w%f%0 --no-newline -e " + EVENTS.encode()
                   + b" -- " + quoted + b" </dev/null & w=$!; "
                   + b"{ cat <&3 >/dev/null; kill $w; } >/dev/null 2>&1 & c=$!; "
                   + b"exec 3<&-; wait $w; s=$?; kill $c 2>/dev/null; exit $s")
    python = b"exec python3 -c '" + _SCRIPT.encode() + b"' " + quoted
    missing = b"echo 'cachefs-watch: no inotifywait or python3 here' >&2; exit 127"
    # inotify sees the changes made on the machine it runs on only: on a network file
    # system's mount, other machines' changes would never be told (exit 5).
    # (at a lower priority: its first walk of a large share, ~3 s for 300,000 files,
    # would otherwise take the CPU from the sftp-server answering this mount)
    started = (b"echo '" + STARTED + b"' >&2; renice -n 10 -p $$ >/dev/null 2>&1; "
               b"fs=$(stat -f -c %T " + quoted + b" 2>/dev/null); "
               b"case \"$fs\" in nfs*|cifs|smb*|fuse*|9p|v9fs|ceph|afs|gfs*|gluster*|lustre|ocfs2) "
               b"echo \"cachefs-watch: the share is on $fs, where other machines' changes are not seen\" >&2; "
               b"exit 5;; esac; ")
    if using == "inotifywait":
        return started + b"command -v inotifywait >/dev/null 2>&1 || { " + missing + b"; }; " + inotifywait
    if using == "python3":
        return started + b"command -v python3 >/dev/null 2>&1 || { " + missing + b"; }; " + python
    return (started + b"if command -v inotifywait >/dev/null 2>&1; then " + inotifywait
            + b"; elif command -v python3 >/dev/null 2>&1; then " + python + b"; else " + missing + b"; fi")


def shell_quote(word: bytes) -> bytes:
    return b"'" + word.replace(b"'", b"'\\''") + b"'"


class WatchEnded(Exception):
    """The watcher stopped (or never started): its reason, for the log."""

    def __init__(self, reason: str, *, retry: bool = True) -> None:
        super().__init__(reason)
        #: False when starting it again cannot help (no watcher on the server, commands
        #: refused, a watch limit)
        self.retry = retry


class ChangeStream:
    """The watcher's output, as paths relative to the share root (b"" is the root, and
    means "anything may have changed" after an event queue overflow)."""

    def __init__(self, root: bytes) -> None:
        self._prefix = root.rstrip(b"/") + b"/"
        self._root = root.rstrip(b"/") or b"/"
        self._rest = b""

    def feed(self, data: bytes) -> list[bytes]:
        parts = (self._rest + data).split(b"\0")
        self._rest = parts.pop()
        changed = []
        for path in parts:
            path = path.rstrip(b"/") if path != b"/" else path
            if path == self._root or path == b"":
                changed.append(b"")
            elif path.startswith(self._prefix):
                changed.append(path[len(self._prefix):])
        return changed


class Watch(ABC):
    """A running watcher: ``read`` waits for changes; ``started`` once the server said it
    runs it, ``ready`` once every folder is watched."""

    started = False
    ready = False
    #: whether every change there is told (False: some are not, e.g. Samba's disk changes
    #: below the folder watched; the cache then applies what is told and goes on checking
    #: by time)
    complete = True

    @abstractmethod
    def read(self, timeout: float) -> list[bytes]:
        """Changed share-relative paths (maybe none, after ``timeout`` seconds); raises
        ``WatchEnded`` once the watcher has stopped."""

    @abstractmethod
    def close(self) -> None: ...

    def _messages(self, text: bytes) -> None:
        """The watcher's error output: its readiness, or a reason it gives."""
        for line in text.splitlines():
            if line.strip() == STARTED:
                self.started = True
            elif line.strip() == READY:
                self.ready = True
            elif line.strip() and not line.startswith(b"Setting up watches"):
                self.said = line.decode(errors="replace").strip()
                log.debug("watcher: %s", self.said)

    said = ""  # the watcher's last message (why it stopped)


def ended(watch: Watch, status: int | None) -> WatchEnded:
    """Why ``watch`` stopped, from its exit status (127: no watcher; 4: inotify limit)."""
    if not watch.started:
        return WatchEnded("the server runs no commands (the watcher never said a word)", retry=False)
    reason = watch.said or f"exit status {status}"
    return WatchEnded(f"the watcher stopped: {reason}", retry=status not in (127, 5, 4, 3))


class ProcessWatch(Watch):
    """The watcher run here, on a local folder (a local-path remote)."""

    def __init__(self, root: bytes, using: str = "auto") -> None:
        self._stream = ChangeStream(root)
        self._proc = subprocess.Popen([b"/bin/sh", b"-c", watch_command(root, using)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._out = self._proc.stdout.fileno()
        self._err = self._proc.stderr.fileno()
        self._open = {self._out, self._err}

    def read(self, timeout: float) -> list[bytes]:
        deadline = time.monotonic() + timeout
        changed: list[bytes] = []
        while self._open and not changed:
            left = deadline - time.monotonic()
            if left <= 0:
                return changed
            for fd in select.select(list(self._open), [], [], left)[0]:
                data = os.read(fd, 1 << 16)
                if not data:
                    self._open.discard(fd)
                elif fd == self._out:
                    changed += self._stream.feed(data)
                else:
                    self._messages(data)
        if changed:
            return changed
        raise ended(self, self._proc.wait())

    def close(self) -> None:
        self._open = set()
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()
