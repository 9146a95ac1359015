"""Public key authentication on a started SSH transport.

Owns: the keys offered and their order (OpenSSH's: ``--identity`` alone, else the agent's
keys, then IdentityFile lines, then the default key files), reading key files, and the
message when none is accepted (naming passphrase-protected files the agent lacks).
Must not touch: known_hosts (``ssh_hostkeys``), the ssh config (``ssh_config``), the SFTP
session. Never asks for a passphrase and never puts key material in logs or messages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import paramiko

from .base import RemoteRefused
from .ssh_config import SshTarget

log = logging.getLogger(__name__)

DEFAULT_KEY_FILES = ("id_ed25519", "id_ecdsa", "id_rsa")


def authenticate(transport: paramiko.Transport, target: SshTarget, identity: Path | None,
                 description: str) -> None:
    """Offer the candidate keys until one is accepted; ``RemoteRefused`` if none is, or if
    the server wants more than a public key."""
    locked: list[Path] = []
    tried = 0
    for source, key in _candidate_keys(identity, target.config_identities, locked):
        tried += 1
        try:
            remaining = transport.auth_publickey(target.user, key)
        except paramiko.AuthenticationException:
            log.debug("%s: key from %s (%s) not accepted", description, source, key.get_name())
            continue
        if not remaining and transport.is_authenticated():
            log.debug("%s: authenticated with a key from %s", description, source)
            return
        raise RemoteRefused(
            f"{description}: the server wants more authentication ({', '.join(remaining)}); "
            "cachefs supports public keys only"
        )
    hint = ""
    if locked:
        files = ", ".join(str(p) for p in locked)
        hint = (f" The key file(s) {files} are protected by a passphrase and no ssh-agent "
                f"offers them: run `ssh-add {locked[0]}` first.")
    raise RemoteRefused(
        f"authentication as {target.user} on {target.host_label}:{target.port} failed "
        f"({tried} key(s) offered).{hint}"
    )


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
