"""Every shell block of README.md and docs/*.md runs as written, against the demo's share.

Each ```sh / ```bash / ```console block is run by bash (``set -e``) in a world where the
docs' names are real, as a reader's own machine would have them:

- ``fileserver`` is this test's private sshd (127.0.0.1, a free port), through
  ``~/.ssh/config`` (``Host fileserver``: ``HostName``, ``Port``, ``HostKeyAlias``) and a
  ``~/.ssh/known_hosts`` that already has its key (as after a first ``ssh fileserver``);
  ``~/.ssh/id_ed25519`` is a key it takes;
- its SFTP login folder holds ``projects``, the demo's sample share
  (``devtools.demo.make_share``: README.txt, docs/notes.txt, docs/plan.md, photos/, ...),
  its ``/srv/share``;
- the docs' SMB and WebDAV addresses (``smb://``, ``dav://``, ``davs://``, whatever the
  host) are this test's own servers serving that same folder, each started when a block
  first needs it: a private smbd (``devtools.smbserver``), an Apache for ``dav://`` and
  one with TLS for ``davs://`` (``devtools.davserver``), whose certificate
  ``SSL_CERT_FILE`` trusts; their password is in ``CACHEFS_PASSWORD``, and in any
  ``--password-file`` a block names;
- ``~`` is a fresh home (``HOME``) with the empty mount points the docs use;
- ``cachefs`` and ``python`` are on ``PATH`` (the venv's), the working folder is the checkout.

What cannot be made real is replaced in the block's text, and only that: ``SUBSTITUTIONS``
below (the user name, server paths, the port the docs write, placeholder cache folders).

A block runs from the state it needs: a block (or, with ``each line``, a line) with a
``cachefs mount`` / ``python mount.py`` / ``mkdir`` on no mount and no cache; one that
starts with ``cachefs recover`` on an unmounted cache; anything else on ``~/projects`` mounted from
``fileserver:projects``. An HTML comment just before a block says otherwise, visibly in the
markdown:

- ``<!-- not run: REASON -->``: not run here (system set-up, systemd, a VM);
  ``test_blocks_not_run_say_why`` checks each gives its reason and bounds their number;
- ``<!-- run: WORD[, WORD] -->`` with ``offline`` (the mount offline by request),
  ``conflict`` (``docs/notes.txt`` changed on both sides and replayed: a ``changed-both``
  conflict), ``stale`` (the mount's process killed), and ``each line`` (the lines are
  alternatives: each runs alone, from the state); and ``smb``, ``dav``, ``davs`` (the block
  runs once for each named, on ``~/projects`` mounted from that server instead of SFTP).

What a block shows is checked: every command's exit status (``set -e``); a command whose
comment has a double-quoted text shows that text (``# "pending": 1``; a comment with
``fails`` marks a command that must fail, ``# fails at once: "Host is down"``); a
``console`` block's shown output lines are in the command's output (with digits, the
user's name and paths as here; ``label: value`` lines by their label only).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.davserver import DavServer
from devtools.demo import make_share
from devtools.devserver import SshServer
from devtools.smbserver import SmbServer
from tests.fixtures.mount import fusermount_unmount, is_mounted
from tests.test_docs import SHELL_LANGS, code_blocks, markdown_files, shell_lines

REPO = Path(__file__).resolve().parent.parent
BLOCK_TIMEOUT = 60.0
#: the empty mount points the docs use, under ~
MOUNT_POINTS = ("projects", "share", "projects-offline", "documents", "files", "cloud", "dav")

#: (pattern in a block's text, what runs instead, why): the docs' names that cannot be real
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    (r"\b(smb|davs?)://alice@[\w.-]+(?::\d+)?(?:/\S*)?", r"{\1}",
     "the docs' SMB and WebDAV hosts, ports and shares: this test's smbd or Apache (free port)"),
    (r"sftp://alice@fileserver(:2222)?/home/alice/", "sftp://{user}@fileserver{port_part}{server_home}/",
     "an absolute path on the server: its login folder"),
    (r"/srv/share\b", "{server_home}/projects", "an absolute path on the server: the share"),
    (r"\balice@", "{user}@", "the sshd logs in the user running the tests (there is no alice)"),
    (r":2222\b", ":{port}", "the sshd's port is a free one, not 2222"),
    (r"/mnt/nfs/projects\b", "{local_share}", "a local folder standing for an NFS mount"),
    (r"~/\.cache/cachefs/(?:DIR|host_srv_projects-0123456789)\b", "{cache_dir}",
     "a placeholder for a cache folder: the one ~/projects's mount made"),
    (r"/home/alice\b", "{home}", "the user's home, in output shown"),
]

MOUNT_LINE = re.compile(r"^(?:cachefs\s+mount|python3?\s+mount\.py|mkdir)\b")
RECOVER_LINE = re.compile(r"^cachefs\s+recover\b")
MARK = re.compile(r"<!--\s*(not run|run):\s*(.*?)\s*-->")
STATES = {"offline", "conflict", "stale"}
PROTOCOLS = ("smb", "dav", "davs")  # run words: the block runs on ~/projects mounted from each


@dataclass
class Block:
    where: str  # file:line
    lang: str
    lines: list[str]  # logical command lines (console: the $ lines), as written
    outputs: dict[int, list[str]]  # console: index of the command -> the output lines shown
    not_run: str | None
    words: set[str]


def _mark_before(text_lines: list[str], fence_index: int) -> tuple[str | None, str]:
    """The ``<!-- not run|run: ... -->`` comment on the lines just above a fence."""
    i = fence_index - 1
    while i >= 0 and not text_lines[i].strip():
        i -= 1
    if i >= 0:
        m = MARK.search(text_lines[i])
        if m:
            return m.group(1), m.group(2)
    return None, ""


def _console(body: list[str]) -> tuple[list[str], dict[int, list[str]]]:
    commands: list[str] = []
    outputs: dict[int, list[str]] = {}
    for line in body:
        if line.lstrip().startswith("$ "):
            commands.append(line.lstrip()[2:])
            outputs[len(commands) - 1] = []
        elif commands and line.strip():
            outputs[len(commands) - 1].append(line.rstrip())
    return commands, outputs


def doc_blocks() -> list[Block]:
    found = []
    for path in markdown_files():
        text_lines = path.read_text().splitlines()
        for lang, first, body in code_blocks(path):
            if lang not in SHELL_LANGS:
                continue
            kind, arg = _mark_before(text_lines, first - 2)
            if lang == "console":
                lines, outputs = _console(body)
            else:
                lines, outputs = [t for _, t in shell_lines(body, console=False)], {}
            words = {w.strip() for w in arg.split(",")} if kind == "run" else set()
            unknown = words - STATES - set(PROTOCOLS) - {"each line"}
            assert not unknown, f"{path.name}:{first}: unknown words in <!-- run: {arg} -->: {unknown}"
            found.append(Block(f"{path.relative_to(REPO)}:{first}", lang, lines, outputs,
                               arg if kind == "not run" else None, words))
    return found


# -- the world the docs assume ------------------------------------------------------------

class World:
    """The home, the fileserver and the mounts of one test run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.server_home = root / "server-home"
        self.share = self.server_home / "projects"
        self.local_share = root / "nfs" / "projects"
        self.server = SshServer(root / "sshd", share=self.share, sftp_start_dir=self.server_home)
        self.user = getpass.getuser()
        self.password = secrets.token_urlsafe(12)  # the SMB and WebDAV servers'
        self.others: dict[str, SmbServer | DavServer] = {}  # scheme -> server, started when needed
        self.davs_cert = root / "davs" / "cert.pem"
        self.protocol = ""  # what ~/projects was mounted from by ``mounted`` ("" for none)
        self.bin = root / "bin"
        self.ending: list[int] = []  # mount processes unmounted, not yet waited for

    def start(self) -> None:
        ssh = self.home / ".ssh"
        ssh.mkdir(parents=True, mode=0o700)
        shutil.copy(self.server.identity, ssh / "id_ed25519")
        os.chmod(ssh / "id_ed25519", 0o600)
        (ssh / "config").write_text(
            "Host fileserver\n"
            f"    HostName {self.server.host}\n    Port {self.server.port}\n"
            # absolute: ssh expands ~ to the passwd entry's home, cachefs to $HOME
            f"    HostKeyAlias fileserver\n    IdentityFile {ssh / 'id_ed25519'}\n"
            f"    UserKnownHostsFile {ssh / 'known_hosts'}\n    StrictHostKeyChecking yes\n")
        # OpenSSH's ssh reads the passwd entry's home, not $HOME: point it at this one
        self.bin.mkdir()
        (self.bin / "ssh").write_text('#!/bin/sh\nexec /usr/bin/ssh -F "$HOME/.ssh/config" "$@"\n')
        os.chmod(self.bin / "ssh", 0o755)
        self.server.start()
        self.reset()

    def reset(self) -> None:
        """No mount, no cache, the demo's share as it was made, the mount points empty, the
        server's key known (as after a first ``ssh fileserver``: under its HostKeyAlias)."""
        self.unmount_all(wait=False)
        self.protocol = ""  # (a block may mount ~/projects itself)
        key_type, key = self.server.host_key_pub.read_text().split()[:2]
        (self.home / ".ssh" / "known_hosts").write_text(f"fileserver {key_type} {key}\n")
        if (self.home / ".cache").exists():
            # moved away whole: a mount process still ending may write its log there
            trash = self.root / "trash"
            trash.mkdir(exist_ok=True)
            (self.home / ".cache").rename(trash / str(len(list(trash.iterdir()))))
        for share in (self.share, self.local_share):
            shutil.rmtree(share, ignore_errors=True)
            make_share(share)
        target = self.home / "rescued"
        if target.exists():
            shutil.rmtree(target)
        for name in MOUNT_POINTS:
            target = self.home / name
            if target.exists() and not is_mounted(target):
                shutil.rmtree(target)
            target.mkdir(exist_ok=True)
        config = self.home / ".config"
        config.mkdir(exist_ok=True)
        (config / "cachefs.key").write_text("a key file for the docs' encrypted cache\n")
        os.chmod(config / "cachefs.key", 0o600)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("XDG_", "SSH_", "CACHEFS_")) and k not in ("PYTHONPATH",)}
        env.update(HOME=str(self.home), PYTHONPATH=str(REPO), CACHEFS_PASSWORD=self.password,
                   PATH=f"{self.bin}:{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        if self.davs_cert.exists():
            env["SSL_CERT_FILE"] = str(self.davs_cert)
        return env

    def other(self, scheme: str) -> SmbServer | DavServer:
        """The SMB or WebDAV server of ``scheme`` (smb, dav, davs), started at first need:
        the sftp share's folder served as its share, this world's password."""
        if scheme not in self.others:
            workdir = self.root / scheme
            if scheme == "smb":
                server: SmbServer | DavServer = SmbServer(workdir, self.share, password=self.password)
            else:
                server = DavServer(workdir, self.share, user=self.user, password=self.password,
                                   tls=scheme == "davs")
            server.start()
            self.others[scheme] = server
        return self.others[scheme]

    def stop(self) -> None:
        for server in self.others.values():
            server.stop()
        self.server.stop()

    def substitute(self, text: str) -> str:
        values = _Values(self, user=self.user, port=str(self.server.port), port_part=f":{self.server.port}",
                         server_home=str(self.server_home), local_share=str(self.local_share),
                         cache_dir=str(self.cache_dir()), home=str(self.home))
        for pattern, replacement, _why in SUBSTITUTIONS:
            text = re.sub(pattern, lambda m: m.expand(replacement).format_map(values), text)
        return text

    def cache_dir(self) -> Path:
        caches = sorted((self.home / ".cache" / "cachefs").glob("*"))
        return caches[0] if caches else self.home / ".cache" / "cachefs" / "NONE"

    # -- mounts ------------------------------------------------------------------------
    def mounts(self) -> list[Path]:
        found = []
        with open("/proc/self/mountinfo") as mountinfo:
            for line in mountinfo:
                target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
                if target.startswith(str(self.home) + "/"):
                    found.append(Path(target))
        return found

    def cachefs(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "cachefs.cli", *args], cwd=REPO, env=self.env,
                                capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
        assert not check or result.returncode == 0, f"cachefs {' '.join(args)}: {result.stderr}"
        return result

    def status(self, mnt: Path | None = None) -> dict:
        return json.loads((mnt or self.home / "projects").joinpath(".cachefs", "status").read_text())

    def control(self, mnt: Path, command: str) -> None:
        """What ``cachefs offline|online|sync`` do, without starting a Python each time."""
        (mnt / ".cachefs" / "control").write_text(command)

    def unmount_all(self, wait: bool = True) -> None:
        """What ``cachefs unmount`` does (fusermount3 -u, then wait for the process), and
        ``-z`` for a stale or busy mount. ``wait=False``: a process with nothing pending
        (nothing left to send the server) ends while the next block runs, in a cache folder
        that ``reset`` removes; ``finish`` waits for them all (each takes 1-2 s here)."""
        for mnt in self.mounts():
            pid, pending = None, 1
            try:
                state = self.status(mnt)
                pid, pending = state["pid"], state["pending"]
            except (OSError, ValueError, KeyError):
                pass
            if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30).returncode:
                fusermount_unmount(mnt)
            if pid:
                if wait or pending:
                    _end(pid)
                else:
                    self.ending.append(pid)
        if wait:
            self.finish()

    def finish(self) -> None:
        """Wait for the mount processes left ending."""
        for pid in self.ending:
            _end(pid)
        self.ending = []
        shutil.rmtree(self.root / "trash", ignore_errors=True)

    def mounted(self, protocol: str = "sftp") -> Path:
        """~/projects mounted from fileserver:projects (or the ``protocol``'s server),
        online, nothing pending."""
        mnt = self.home / "projects"
        if mnt in self.mounts() and self.protocol == protocol:
            try:
                s = self.status(mnt)
                if s["state"] == "online" and s["pending"] and not s["conflicts"]:
                    self.control(mnt, "sync")  # a resolve's change, say
                    s = self.status(mnt)
                if s["state"] == "online" and not s["pending"] and not s["conflicts"]:
                    return mnt
            except (OSError, ValueError):
                pass
        self.reset()
        if protocol == "sftp":
            self.cachefs("mount", f"{self.user}@fileserver:projects", str(mnt))
        else:
            server = self.other(protocol)
            self.cachefs("mount", server.address(), str(mnt), *server.mount_args())
        self.protocol = protocol
        return mnt

    def prepare(self, state: str, protocol: str = "sftp") -> None:
        if state == "fresh":
            self.reset()
        elif state == "unmounted":
            self.mounted(protocol)
            self.unmount_all()
        else:
            mnt = self.mounted(protocol)
            if state == "offline":
                self.control(mnt, "offline")
            elif state == "conflict":
                notes = mnt / "docs" / "notes.txt"
                notes.read_text()
                self.control(mnt, "offline")
                with open(notes, "a") as f:
                    f.write("- written here\n")
                with open(self.share / "docs" / "notes.txt", "a") as f:
                    f.write("- written on the server\n")
                self.control(mnt, "online")
                self.control(mnt, "sync")
                assert self.status(mnt)["conflicts"] == 1, self.status(mnt)
            elif state == "stale":
                pid = self.status(mnt)["pid"]
                os.kill(pid, signal.SIGKILL)
                _end(pid)


class _Values(dict[str, str]):
    """A substitution's values; ``smb``, ``dav``, ``davs``: that server's address (of its
    share's top), the server started at first need."""

    def __init__(self, world: World, **values: str) -> None:
        super().__init__(**values)
        self.world = world

    def __missing__(self, key: str) -> str:
        if key not in PROTOCOLS:
            raise KeyError(key)
        return self.world.other(key).address()


def _end(pid: int, within: float = 20.0) -> None:
    """Wait for a mount process (that this test started) to end; kill it if it does not."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    world = World(tmp_path_factory.mktemp("docs-run"))
    world.start()
    try:
        yield world
    finally:
        try:
            world.unmount_all()
        finally:
            world.stop()


# -- running a block ----------------------------------------------------------------------

def _expectation(line: str) -> tuple[bool, str | None]:
    """(must fail, text the output shows) from a command's trailing comment."""
    m = re.search(r"\s#\s(.*)$", line)
    if not m or '"' not in m.group(1):
        return False, None
    comment = m.group(1)
    shown = comment[comment.index('"'):].strip()
    if re.fullmatch(r'"[^"]*"', shown):
        shown = shown[1:-1]
    return bool(re.search(r"\bfails\b", comment[:comment.index('"')])), shown


def _state_of(block: Block, lines: list[str]) -> str:
    for word in ("stale", "conflict", "offline"):
        if word in block.words:
            return word
    if any(MOUNT_LINE.match(line) for line in lines):
        return "fresh"
    if RECOVER_LINE.match(lines[0]):
        return "unmounted"
    return "mounted"


def run_lines(world: World, block: Block, indexes: list[int], protocol: str = "sftp") -> None:
    lines = [block.lines[i] for i in indexes]
    where = block.where if protocol == "sftp" else f"{block.where} (on {protocol})"
    world.prepare(_state_of(block, lines), protocol)
    out = world.root / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    script = ["set -e"]
    for n, line in enumerate(lines):
        command = world.substitute(line)
        for password_file in re.findall(r"--password-file[= ](\S+)", command):
            # a reader's own password file, holding the SMB and WebDAV servers' password
            path = world.home / password_file[2:] if password_file.startswith("~/") else Path(password_file)
            if not path.exists() and path.is_relative_to(world.home):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(world.password + "\n")
                path.chmod(0o600)
        if re.match(r"^cachefs\s+mount\b.*\s(--foreground|-f)\b", command):
            # stays attached until unmounted: run it as a reader would in another terminal
            command = (f"{command} & for i in $(seq 100); do grep -q ' {world.home}/' /proc/self/mountinfo "
                       "&& break; sleep 0.1; done; sleep 0.5")
        fails, _ = _expectation(line)
        if block.lang == "console":
            # a transcript that shows an error (every failure starts with "cachefs:") is of
            # a command that fails
            fails = any(out_line.startswith("cachefs:") for out_line in block.outputs.get(indexes[n], []))
        if fails:
            command = f"if {command}\nthen echo 'succeeded, but the docs say it fails'; exit 97; fi"
        script += [f'exec >"{out}/{n}" 2>&1', command]
    result = subprocess.run(["bash", "-c", "\n".join(script)], cwd=REPO, env=world.env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    shown = {n: (out / str(n)).read_text(errors="replace") for n in range(len(lines)) if (out / str(n)).exists()}
    last = max(shown) if shown else 0
    assert result.returncode == 0, (
        f"{where}: exit status {result.returncode} at {lines[last]!r}\n"
        f"ran: {world.substitute(lines[last])}\noutput:\n{shown.get(last, '')}{result.stderr}")
    for n, (index, line) in enumerate(zip(indexes, lines)):
        _, expected = _expectation(line)
        if expected is not None:
            assert expected in shown[n], f"{where}: {line!r} should show {expected!r}; it showed:\n{shown[n]}"
        for want in block.outputs.get(index, []):
            _check_console_line(world, block, line, world.substitute(want), shown[n])


def _normal(text: str) -> str:
    """Times, sizes and counts as digits, and the client's HOST-ID, as they vary."""
    return re.sub(r"\d+", "0", re.sub(r"\b[\w.-]+-[0-9a-f]{6}\)", "HOST-ID)", text))


def _check_console_line(world: World, block: Block, command: str, want: str, got: str) -> None:
    label = re.match(r"^([a-z][a-z ]{0,20}):\s", want)
    if label:
        labels = {m.group(1) for m in re.finditer(r"^([a-z][a-z ]{0,20}):\s", got, re.M)}
        assert label.group(1) in labels, f"{block.where}: {command!r} shows no {label.group(1)!r} line:\n{got}"
        return
    assert _normal(want) in _normal(got), f"{block.where}: {command!r} should show\n  {want}\nit showed:\n{got}"


BLOCKS = doc_blocks()


def test_blocks_are_found() -> None:
    where = {b.where.split(":")[0] for b in BLOCKS}
    assert "README.md" in where and "docs/usage.md" in where
    assert any(b.not_run is None for b in BLOCKS)


def test_the_substitutions_are_few() -> None:
    """The table stays a short list of names that cannot be real on a test machine."""
    assert len(SUBSTITUTIONS) <= 8
    assert _expectation('cat x   # "pending": 1') == (False, '"pending": 1')
    assert _expectation('cat y   # fails at once: "Host is down"') == (True, "Host is down")
    assert _expectation("cat z   # read: now cached") == (False, None)


#: blocks that cannot run on a test machine (apt, systemd units, a VM, another machine's
#: output): each says why in the markdown; their command lines are still checked by
#: tests/test_docs.py. The bound keeps the list from growing unseen.
NOT_RUN_AT_MOST = 17


def test_blocks_not_run_say_why() -> None:
    """Every block marked ``<!-- not run: -->`` gives its reason, and they stay few."""
    not_run = [b for b in BLOCKS if b.not_run is not None]
    for block in not_run:
        assert block.not_run and block.not_run.strip(), f"{block.where}: <!-- not run: --> needs its reason"
        assert block.lines, f"{block.where}: a shell block with no command"
    assert len(not_run) <= NOT_RUN_AT_MOST, [f"{b.where}: {b.not_run}" for b in not_run]


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.not_run is None], ids=lambda b: b.where)
def test_block_runs_as_written(world: World, block: Block) -> None:
    assert block.lines, f"{block.where}: a shell block with no command"
    for protocol in [p for p in PROTOCOLS if p in block.words] or ["sftp"]:
        if "each line" in block.words:
            for i in range(len(block.lines)):
                run_lines(world, block, [i], protocol)
        else:
            run_lines(world, block, list(range(len(block.lines))), protocol)
