"""Authentication on a started SSH transport: keys, keyboard-interactive, password.

Owns: the methods tried and their order (OpenSSH's: public keys, then
keyboard-interactive, then password, each as far as the server allows it, partial
success continuing with what the server still wants); the keys offered and their order
(``--identity`` alone, else the agent's keys, then IdentityFile lines, then the default
key files; passphrase-protected files after the others, unlocked through ``Secrets``);
the message when nothing is accepted (naming what was missing and how to give it).
Must not touch: known_hosts (``ssh_hostkeys``), the ssh config (``ssh_config``), the SFTP
session, where secrets come from (``ssh_secrets``). Never puts a secret or key material
in logs or messages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import paramiko

from .base import RemoteRefused
from .ssh_config import SshTarget
from .ssh_secrets import PROMPTS, Secrets

log = logging.getLogger(__name__)

DEFAULT_KEY_FILES = ("id_ed25519", "id_ecdsa", "id_rsa")
KBD_INTERACTIVE = "keyboard-interactive"


def authenticate(transport: paramiko.Transport, target: SshTarget, identity: Path | None,
                 description: str, secrets: Secrets | None = None) -> None:
    """Log in as ``target.user``; ``RemoteRefused`` with the reason if the server accepts
    nothing we have (or can ask for, within ``Secrets.asking``)."""
    _Login(transport, target, description, secrets or Secrets()).run(identity)


class _Login:
    """One login attempt on one transport: what was tried, what the server allows."""

    def __init__(self, transport: paramiko.Transport, target: SshTarget, description: str,
                 secrets: Secrets) -> None:
        self.transport, self.target, self.description = transport, target, description
        self.secrets = secrets
        self.user = target.user
        self.allowed: list[str] | None = None  # what the server still accepts, once known
        self.locked: list[Path] = []  # passphrase-protected keys we could not unlock
        self.keys_tried = 0
        self.unanswered = False  # a password or prompt was wanted and could not be had
        self.refused_given = False  # the secret given ahead was refused

    def run(self, identity: Path | None) -> None:
        if self._keys(identity):
            return
        allowed = self._allowed()
        if allowed is None:
            return  # "none" was enough
        if KBD_INTERACTIVE in allowed and self._keyboard_interactive():
            return
        if "password" in (self.allowed or allowed) and self._password():
            return
        raise RemoteRefused(self._failure())

    def _done(self, remaining: list[str], how: str) -> bool:
        """Whether the login is complete after an accepted step (partial success goes on
        with the methods the server names)."""
        if not remaining and self.transport.is_authenticated():
            log.debug("%s: authenticated with %s", self.description, how)
            return True
        log.debug("%s: %s accepted; the server wants more (%s)", self.description, how,
                  ", ".join(remaining))
        self.allowed = list(remaining)
        return False

    def _refused(self, exc: paramiko.AuthenticationException) -> None:
        if isinstance(exc, paramiko.BadAuthenticationType):
            self.allowed = list(exc.allowed_types)

    # -- public keys ----------------------------------------------------------------
    def _keys(self, identity: Path | None) -> bool:
        for source, key in _candidate_keys(identity, self.target.config_identities, self.locked):
            if self._offer(source, key):
                return True
            if self.allowed is not None and "publickey" not in self.allowed:
                return False
        if not self.locked:
            return False
        allowed = self._allowed()  # (no passphrase asked for where keys cannot help)
        if allowed is None:
            return True
        if "publickey" not in allowed:
            return False
        for path in list(self.locked):
            unlocked = self.secrets.unlocked_key(path)
            if unlocked is None:
                continue
            self.locked.remove(path)
            if self._offer(str(path), unlocked):
                return True
        return False

    def _offer(self, source: str, key: paramiko.PKey) -> bool:
        self.keys_tried += 1
        try:
            remaining = self.transport.auth_publickey(self.user, key)
        except paramiko.AuthenticationException as exc:
            self._refused(exc)
            log.debug("%s: key from %s (%s) not accepted", self.description, source, key.get_name())
            return False
        return self._done(remaining, f"a key from {source}")

    def _allowed(self) -> list[str] | None:
        """The methods the server accepts (asked with "none", as ssh does, if no failure
        told them yet); None when "none" itself logged us in."""
        if self.allowed is None:
            try:
                remaining = self.transport.auth_none(self.user)
            except paramiko.BadAuthenticationType as exc:
                self.allowed = list(exc.allowed_types)
            except paramiko.AuthenticationException:
                self.allowed = []
            else:
                if self._done(remaining, "no credentials"):
                    return None
        return self.allowed

    # -- keyboard-interactive and password -------------------------------------------
    def _keyboard_interactive(self) -> bool:
        tried: set[str] = set()  # hidden answers refused (a password changed in its file: tried once more)
        for attempt in range(PROMPTS):
            answers: dict[tuple[str, bool], str] = {}
            missing: list[bool] = []

            def handler(title: str, instructions: str, prompts: list[tuple[str, bool]]) -> list[str]:
                # (runs on paramiko's transport thread: it must not raise)
                self.secrets.tell("\n".join(t for t in (title, instructions) if t))
                out = []
                for prompt, echo in prompts:
                    text = None if missing else self.secrets.answer(prompt, echo, fresh=attempt > 0,
                                                                    tried=tried)
                    if text is None:
                        missing.append(True)
                        text = ""
                    answers[(prompt, echo)] = text
                    out.append(text)
                return out

            try:
                remaining = self.transport.auth_interactive(self.user, handler)
            except paramiko.AuthenticationException as exc:
                self._refused(exc)
                self.unanswered |= bool(missing)
                log.debug("%s: keyboard-interactive login refused", self.description)
                tried.update(text for (_prompt, echo), text in answers.items() if not echo)
                if missing or not self.transport.is_active() \
                        or not (self.secrets.can_ask or self.secrets.untried(tried)):
                    self.refused_given |= not missing and not self.secrets.can_ask
                    return False
                continue
            self.secrets.answers_worked(answers)
            if self._done(remaining, "keyboard-interactive answers"):
                return True
            return False
        return False

    def _password(self) -> bool:
        prompt = f"{self.user}@{self.target.host_label}'s password: "
        asked = False
        for password in self.secrets.passwords(prompt):
            asked = True
            try:
                remaining = self.transport.auth_password(self.user, password, fallback=False)
            except paramiko.AuthenticationException as exc:
                self._refused(exc)
                log.debug("%s: password refused", self.description)
                if not self.transport.is_active() or (self.allowed is not None and "password" not in self.allowed):
                    break
                continue
            self.secrets.password_worked(password)
            return self._done(remaining, "a password")
        if not asked:
            self.unanswered = True
        elif not self.secrets.can_ask:
            self.refused_given = True
        return False

    # -- the message ------------------------------------------------------------------
    def _failure(self) -> str:
        target = self.target
        head = f"authentication as {self.user} on {target.host_label}:{target.port} failed"
        allowed = ", ".join(self.allowed or []) or "nothing we offered"
        hints: list[str] = []
        if self.refused_given:
            given = self.secrets.given_by or "the password remembered from the start"
            hints.append(f"the password from {given} was refused")
        elif self.unanswered:
            hints.append("the server asks for a password and there is no terminal to ask on: give "
                         "it with --password-file FILE (-o password_file=FILE), or set SSH_ASKPASS "
                         "(with SSH_ASKPASS_REQUIRE=force where there is no display)")
        if self.locked:
            files = ", ".join(str(p) for p in self.locked)
            if self.secrets.can_ask or self.secrets.given_by:
                hints.append(f"no passphrase given unlocked the key file(s) {files}")
            else:
                hints.append(f"the key file(s) {files} are protected by a passphrase and there "
                             "is no way to ask for it: run on a terminal, give it with "
                             "--password-file FILE or SSH_ASKPASS, or add the key to ssh-agent "
                             f"first (ssh-add {self.locked[0]})")
        hint = ("; " + "; ".join(hints)) if hints else ""
        return f"{head} ({self.keys_tried} key(s) offered; the server accepts: {allowed}){hint}."


def _candidate_keys(identity: Path | None, config_identities: list[Path], locked: list[Path]
                    ) -> Iterator[tuple[str, paramiko.PKey]]:
    """Keys to offer, in OpenSSH's order; passphrase-protected files skipped go to ``locked``."""
    if identity is not None:
        yield from _identity_keys(Path(identity).expanduser(), locked)
        return
    for agent_key in _agent_keys():
        yield "ssh-agent", agent_key
    seen: set[Path] = set()
    defaults = [Path("~/.ssh").expanduser() / name for name in DEFAULT_KEY_FILES]
    for path in config_identities + defaults:
        if path in seen:
            continue
        seen.add(path)
        try:
            key = _load_key(path)
        except paramiko.PasswordRequiredException:
            locked.append(path)
            continue
        if key is not None:
            yield str(path), key


def _identity_keys(path: Path, locked: list[Path]) -> Iterator[tuple[str, paramiko.PKey]]:
    """``--identity``: that key alone, or the agent's keys when it is passphrase-protected
    (or unusable: the agent may still hold it)."""
    if not path.exists():
        raise RemoteRefused(f"identity file {path} does not exist")
    try:
        key = _load_key(path)
    except paramiko.PasswordRequiredException:
        locked.append(path)
        key = None
    if key is not None:
        yield str(path), key
        return
    for agent_key in _agent_keys():
        yield "ssh-agent", agent_key


def _agent_keys() -> list[paramiko.AgentKey]:
    try:
        return list(paramiko.Agent().get_keys())
    except (OSError, paramiko.SSHException) as exc:
        log.debug("ssh-agent not usable: %s", exc)
        return []


def _load_key(path: Path) -> paramiko.PKey | None:
    """The key in ``path``; None if missing; PasswordRequiredException passes through."""
    try:
        return paramiko.PKey.from_path(path)
    except FileNotFoundError:
        return None
    except paramiko.PasswordRequiredException:
        raise
    except TypeError as exc:
        # paramiko's from_path lets cryptography's "password was not provided"
        # TypeError through for encrypted keys instead of PasswordRequiredException
        raise paramiko.PasswordRequiredException(f"{path} is encrypted") from exc
    except (OSError, paramiko.SSHException, ValueError) as exc:
        log.warning("cannot use key file %s: %s", path, type(exc).__name__)
        return None
