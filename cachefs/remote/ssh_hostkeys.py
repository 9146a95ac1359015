"""Host key checking against OpenSSH's known_hosts files.

Owns: reading known_hosts (plain and hashed names, ``@revoked`` markers), the choice of
host key types to ask for, the verdict on the key a server shows (OpenSSH's messages), and
appending a key accepted with ``--accept-new-host-key`` to the user's file.
Must not touch: any other file of ``~/.ssh``; authentication; the SFTP session. Never
writes a key the user did not ask to accept, and never replaces or removes a line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import paramiko

from .base import RemoteRefused

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownKey:
    """A key recorded for a host, with where it was found (for the messages)."""

    path: Path
    line: int
    key: paramiko.PKey
    revoked: bool


def _host_matches(pattern_list: str, host_name: str) -> bool:
    for pattern in pattern_list.split(","):
        if pattern.startswith("|1|"):
            if paramiko.HostKeys.hash_host(host_name, pattern) == pattern:
                return True
        elif pattern == host_name:
            return True
    return False


def known_keys(files: list[Path], host_name: str) -> list[KnownKey]:
    """Keys recorded for ``host_name`` in ``files`` (missing files are skipped)."""
    found: list[KnownKey] = []
    for path in files:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot read known hosts file %s: %s", path, exc)
            continue
        for number, raw_line in enumerate(lines, 1):
            known = _known_key(path, number, raw_line, host_name)
            if known is not None:
                found.append(known)
    return found


def _known_key(path: Path, number: int, raw_line: str, host_name: str) -> KnownKey | None:
    """The key on this known_hosts line if the line names ``host_name``."""
    line = raw_line.strip()
    if not line or line.startswith("#"):
        return None
    revoked = False
    if line.startswith("@"):
        marker, _, line = line.partition(" ")
        if marker != "@revoked":
            return None  # @cert-authority: certificates are not supported
        revoked = True
    try:
        entry = paramiko.hostkeys.HostKeyEntry.from_line(line.strip(), number)
    except (paramiko.SSHException, ValueError) as exc:
        log.debug("%s:%d: unreadable known_hosts line: %s", path, number, exc)
        return None
    if entry is None or entry.key is None:
        return None
    if not _host_matches(",".join(entry.hostnames), host_name):
        return None
    return KnownKey(path, number, entry.key, revoked)


def _base_key_type(name: str) -> str:
    return "ssh-rsa" if name.startswith("rsa-sha2-") else name


def prefer_known_key_types(transport: paramiko.Transport, known: list[KnownKey]) -> None:
    """Ask for a host key type we already know, as OpenSSH does."""
    known_types = {k.key.get_name() for k in known if not k.revoked}
    if not known_types:
        return
    options = transport.get_security_options()
    types = list(options.key_types)
    preferred = [t for t in types if _base_key_type(t) in known_types]
    options.key_types = preferred + [t for t in types if t not in preferred]


def check_host_key(key: paramiko.PKey, known: list[KnownKey], name: str, target: Path,
                   accept_new: bool) -> None:
    """Accept ``key`` for the host recorded as ``name`` or raise ``RemoteRefused``. An
    unknown key is appended to ``target`` when ``accept_new`` (never a changed one)."""
    key_type = key.get_name()
    for entry in known:
        if entry.revoked and entry.key == key:
            raise RemoteRefused(
                f"the {key_type} host key of {name} is marked as revoked in "
                f"{entry.path}:{entry.line}; refusing to connect"
            )
    valid = [k for k in known if not k.revoked]
    if any(k.key == key for k in valid):
        return
    if valid:
        offending = next((k for k in valid if k.key.get_name() == key_type), valid[0])
        raise RemoteRefused(
            "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
            "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n"
            "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
            "IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n"
            "Someone could be eavesdropping on you right now (man-in-the-middle attack)!\n"
            "It is also possible that a host key has just been changed.\n"
            f"The fingerprint for the {key_type} key sent by the remote host {name} is\n"
            f"{key.fingerprint}.\n"
            f"Offending {offending.key.get_name()} key in {offending.path}:{offending.line}\n"
            f"If the change is expected, remove the old key (ssh-keygen -R '{name}' "
            f"-f {offending.path}) and connect again.\n"
            "cachefs refuses to connect; --accept-new-host-key does not override this."
        )
    if not accept_new:
        raise RemoteRefused(
            f"the authenticity of host {name} can't be established: its {key_type} key "
            f"fingerprint is {key.fingerprint}, which is not in {target}. Check the "
            "fingerprint with the server's administrator, then run again with "
            "--accept-new-host-key to record it (or connect once with ssh)."
        )
    _record_host_key(target, name, key)


def _record_host_key(target: Path, name: str, key: paramiko.PKey) -> None:
    line = f"{name} {key.get_name()} {key.get_base64()}\n"
    try:
        if not target.parent.exists():
            target.parent.mkdir(parents=True, mode=0o700)
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "a") as f:
            # keep the file line-structured even if its last line lacks a newline
            if f.tell() > 0:
                with open(target, "rb") as existing:
                    existing.seek(-1, os.SEEK_END)
                    if existing.read(1) != b"\n":
                        f.write("\n")
            f.write(line)
    except OSError as exc:
        raise RemoteRefused(f"cannot record the host key of {name} in {target}: {exc}") from exc
    log.warning("permanently added %s (%s %s) to %s", name, key.get_name(), key.fingerprint, target)
