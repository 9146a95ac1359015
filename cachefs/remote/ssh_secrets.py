"""The secrets an SSH login may need: key passphrases, a password, keyboard-interactive
answers; where they come from, and keeping them for the mount's life.

Owns: ``Secrets`` (what a mount logs in with: given once, then remembered in memory),
reading ``--password-file``, and asking, OpenSSH's way: on the terminal (``/dev/tty``,
echo off for hidden prompts) or through ``$SSH_ASKPASS`` (used when there is no terminal
or ``$SSH_ASKPASS_REQUIRE`` says so, as ``ssh`` does). Asking happens only inside
``Secrets.asking()``: the mount logs in once that way before it detaches; every later
connection (the pool's, the transfer processes', the watcher's) uses what was remembered
and never asks again.
Must not touch: the network, host keys, which keys are offered (``ssh_auth``). Never
writes a secret to disk, a log, a message, or a child's argv or environment; the
transfer processes get them by inheriting memory (or pickled through their pipe when a
broken pool is started again: ``__getstate__``).
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import paramiko

from .base import RemoteRefused

log = logging.getLogger(__name__)

#: how many times a password or passphrase is asked for (OpenSSH's NumberOfPasswordPrompts)
PROMPTS = 3
ASKPASS_TIMEOUT = 600.0  # seconds an askpass program may take (someone is typing)


class Secrets:
    """What a mount logs in with, kept in memory for its life only.

    ``password``: the secret given ahead (``--password-file``, ``-o password_stdin``), tried
    as the login password, as the answer to hidden keyboard-interactive prompts and as a
    key's passphrase. Whatever worked is remembered: the unlocked key (and its passphrase,
    for a transfer process started afresh), the password, the answers."""

    def __init__(self, password: str | None = None, given_by: str | None = None,
                 given_file: Path | None = None) -> None:
        self._given = password
        self.given_by = given_by  # "--password-file FILE", for messages
        #: the file the password was read from (``--password-file``): read again at each
        #: login, so that a password changed on the server and in the file is taken by the
        #: next reconnection (``cachefs online``) without a remount (``_known``)
        self._given_file = given_file
        self._unreadable: str | None = None  # why the file could not be read last (logged once)
        self._password: str | None = None  # the login password that worked
        self._passphrases: dict[Path, str] = {}
        self._keys: dict[Path, paramiko.PKey] = {}  # unlocked keys (this process only)
        self._answers: dict[tuple[str, bool], str] = {}  # keyboard-interactive
        self._asker: _Asker | None = None

    def __repr__(self) -> str:  # never the secrets themselves
        return f"Secrets(given={'yes' if self._given is not None else 'no'})"

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_keys"] = {}  # key objects stay in this process; the passphrases go along
        state["_asker"] = None
        return state

    # -- asking ---------------------------------------------------------------------
    @contextlib.contextmanager
    def asking(self) -> Iterator[bool]:
        """Within: a missing secret is asked for, on the terminal or with askpass (yields
        whether either can be used). Outside, nothing is ever asked."""
        self._asker = _Asker.find()
        try:
            yield self._asker is not None
        finally:
            self._asker = None

    @property
    def can_ask(self) -> bool:
        return self._asker is not None

    def _ask(self, prompt: str, echo: bool = False) -> str | None:
        return None if self._asker is None else self._asker.ask(prompt, echo)

    def tell(self, text: str) -> None:
        """Show a server's text (keyboard-interactive instructions) where we ask."""
        if self._asker is not None and text.strip():
            self._asker.tell(text)

    # -- keys -----------------------------------------------------------------------
    def unlocked_key(self, path: Path) -> paramiko.PKey | None:
        """The passphrase-protected key in ``path``, unlocked with what is remembered or
        given, else asked for (up to 3 times, an empty answer gives up); None if not."""
        key = self._keys.get(path)
        if key is not None:
            return key
        for passphrase in self._passphrase_candidates(path):
            key = _decrypt(path, passphrase)
            if key is not None:
                self._keys[path] = key
                self._passphrases[path] = passphrase
                return key
        return None

    def _passphrase_candidates(self, path: Path) -> Iterator[str]:
        for known in (self._passphrases.get(path), self._given):
            if known is not None:
                yield known
        prompt = f"Enter passphrase for key '{path}': "
        for _ in range(PROMPTS):
            answer = self._ask(prompt)
            if not answer:
                return
            yield answer
            prompt = f"Bad passphrase, try again for {path}: "

    # -- passwords ------------------------------------------------------------------
    def passwords(self, prompt: str) -> Iterator[str]:
        """Login passwords to try, best first (``_known``), then asked (up to 3 times)."""
        yield from self._known()
        for _ in range(PROMPTS):
            answer = self._ask(prompt)
            if answer is None:
                return
            yield answer
            prompt = "Permission denied, please try again.\n" + prompt

    def password_worked(self, password: str) -> None:
        self._password = password

    def _known(self) -> list[str]:
        """The passwords known ahead, best first: the one that worked; the one given at
        start while nothing else has worked; the password file's line as it is now (read
        again at each login: a password changed on the server and in the file is taken
        by the next one). What worked comes first: a new password written to the file
        before the server takes it must not cost a refused login at each connection, nor
        an outdated one once another worked (reviewed: an account lockout counts them);
        after a change on the server, one refusal per process, then the file's line."""
        out: list[str] = []
        worked = self._password
        for known in (worked, self._given if worked in (None, self._given) else None, self._file_now()):
            if known is not None and known not in out:
                out.append(known)
        return out

    def _file_now(self) -> str | None:
        """The password file's first line as it is now; None without a file, or where it
        cannot be read now (gone, others may read it), said in the log once (reviewed: a
        replaced file left readable by others was passed over without a word, and the
        refusal that followed blamed the password from the file)."""
        if self._given_file is None:
            return None
        try:
            now = read_password_file(self._given_file)
        except RemoteRefused as exc:
            if str(exc) != self._unreadable:
                self._unreadable = str(exc)
                log.warning("%s: not read again", exc)
            return None
        self._unreadable = None
        return now

    def untried(self, tried: set[str]) -> bool:
        """Whether a password known ahead is not among ``tried`` (a login refused with
        what was remembered tries it)."""
        return any(known not in tried for known in self._known())

    def answer(self, prompt: str, echo: bool, fresh: bool,
               tried: set[str] | frozenset[str] = frozenset()) -> str | None:
        """The answer to one keyboard-interactive prompt: remembered, or for a hidden one
        the best password known ahead (``fresh``: the remembered ones failed: the best
        known one not among ``tried``), else asked."""
        if not fresh:
            known = self._answers.get((prompt, echo))
            if known is not None:
                return known
        if not echo:
            for known in self._known():
                if not fresh or known not in tried:
                    return known
        return self._ask(prompt, echo)

    def answers_worked(self, answers: dict[tuple[str, bool], str]) -> None:
        self._answers.update(answers)


def _decrypt(path: Path, passphrase: str) -> paramiko.PKey | None:
    """The key in ``path`` unlocked with ``passphrase``; None when it is the wrong one."""
    try:
        # (typed str, but cryptography wants the bytes: a str is refused as no password)
        return paramiko.PKey.from_path(path, passphrase.encode("utf-8", "surrogateescape"))  # type: ignore[arg-type]
    except (ValueError, TypeError, paramiko.SSHException):
        return None  # a wrong passphrase (cryptography: ValueError; paramiko: SSHException)


def read_password_file(path: Path) -> str:
    """The first line of ``path`` (the password, as ``sshpass -f`` reads it); refused when
    others may read the file (as ssh refuses such a key file) or it is empty."""
    path = path.expanduser()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise RemoteRefused(f"--password-file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise RemoteRefused(f"--password-file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise RemoteRefused(f"--password-file {path} may be read by others (mode "
                                f"{stat.S_IMODE(info.st_mode):04o}): chmod 600 {path}")
        data = f.read(64 << 10)
    text = data.decode("utf-8", "surrogateescape").splitlines()
    if not text or not text[0]:
        raise RemoteRefused(f"--password-file {path} is empty")
    return text[0]


def read_password_stdin() -> str:
    """``-o password_stdin`` (sshfs's): the first line of standard input."""
    line = os.read(0, 64 << 10).decode("utf-8", "surrogateescape").splitlines()
    if not line or not line[0]:
        raise RemoteRefused("-o password_stdin: no password on standard input")
    return line[0]


class _Asker:
    """Where to ask, chosen as OpenSSH's ``read_passphrase`` chooses: askpass when allowed
    ($DISPLAY or $WAYLAND_DISPLAY set, or SSH_ASKPASS_REQUIRE=force; never with =never) and
    either wanted (=force, =prefer) or needed (no terminal); else the terminal."""

    def __init__(self, askpass: str | None) -> None:
        self.askpass = askpass

    @classmethod
    def find(cls) -> _Asker | None:
        require = os.environ.get("SSH_ASKPASS_REQUIRE", "").lower()
        program = os.environ.get("SSH_ASKPASS") or None
        allowed = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
        wanted = False
        if require == "force":
            allowed = wanted = True
        elif require == "prefer":
            wanted = allowed
        elif require == "never":
            allowed = False
        allowed = allowed and program is not None
        if allowed and wanted:
            return cls(program)
        if _terminal_usable():
            return cls(None)
        return cls(program) if allowed else None

    def ask(self, prompt: str, echo: bool) -> str | None:
        if self.askpass is not None:
            return _run_askpass(self.askpass, prompt)
        try:
            if not echo:
                return getpass.getpass(prompt)  # /dev/tty, echo off
            with open("/dev/tty", "r+") as tty:
                tty.write(prompt)
                tty.flush()
                line = tty.readline()
            return line.rstrip("\r\n") if line else None
        except (OSError, EOFError):
            return None

    def tell(self, text: str) -> None:
        if self.askpass is None:
            with contextlib.suppress(OSError), open("/dev/tty", "w") as tty:
                tty.write(text.rstrip("\n") + "\n")


def _terminal_usable() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _run_askpass(program: str, prompt: str) -> str | None:
    """The askpass program's answer (its first output line), None if it fails or is
    cancelled. The prompt is its one argument, as ssh gives it."""
    try:
        result = subprocess.run([program, prompt], stdin=subprocess.DEVNULL, capture_output=True,
                                timeout=ASKPASS_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("askpass program %s failed: %s", program, type(exc).__name__)
        return None
    if result.returncode != 0:
        log.info("askpass program %s ended with status %d (cancelled)", program, result.returncode)
        return None
    lines = result.stdout.decode("utf-8", "surrogateescape").splitlines()
    return lines[0] if lines else ""
