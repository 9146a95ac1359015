"""Where and as whom to connect: an sftp address resolved through ``~/.ssh/config``.

Owns: reading the user's ssh config for the address's host (HostName, User, Port,
ConnectTimeout, ProxyCommand, IdentityFile, HostKeyAlias, UserKnownHostsFile) and the
choice of known_hosts files; the result is one immutable ``SshTarget``.
Must not touch: the network, key files, known_hosts contents (``ssh_hostkeys``), the
SFTP session. Reads the config once, when the backend is built.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from pathlib import Path

import paramiko

from ..address import RemoteAddress
from .base import RemoteRefused
from .options import ConnectOptions


@dataclass(frozen=True)
class SshTarget:
    """The server to connect to and the files to check it with, after the ssh config."""

    host: str
    user: str
    port: int
    connect_timeout: float
    proxy_command: str | None
    config_identities: list[Path]  # IdentityFile lines, tried after the agent's keys
    host_key_alias: str
    #: HostKeyAlias was given: OpenSSH then records and looks the key up under the alias
    #: alone, without ``[...]:port`` whatever the port
    host_key_alias_given: bool
    known_hosts_files: list[Path]  # the first is where an accepted new key is recorded
    read_only_known_hosts: list[Path]

    @property
    def host_label(self) -> str:
        """The host as shown in messages (an IPv6 address in brackets)."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def host_key_name(self) -> str:
        """The name under which OpenSSH records this server in known_hosts."""
        if self.host_key_alias_given or self.port == 22:
            return self.host_key_alias
        return f"[{self.host_key_alias}]:{self.port}"


def resolve_target(address: RemoteAddress, options: ConnectOptions) -> SshTarget:
    """``address`` with the ssh config's settings for its host applied (the address wins);
    ``RemoteRefused`` for an unreadable config or a bad Port."""
    assert address.host is not None, "an sftp address has a host"
    config_path = _config_path(options)
    # (the stubs type every value str; "identityfile" is a list of them)
    config: dict[str, str] = _read_config(config_path, address.host) if config_path is not None else {}
    host: str = config.get("hostname", address.host)
    try:
        port = address.port or int(config.get("port", 22))
    except ValueError as exc:
        raise RemoteRefused(f"bad Port in {config_path}: {exc}") from exc
    proxy = config.get("proxycommand")
    known_hosts, read_only = _known_hosts_files(options, config)
    return SshTarget(
        host=host,
        user=address.user or config.get("user") or getpass.getuser(),
        port=port,
        connect_timeout=float(config.get("connecttimeout", options.timeout)),
        proxy_command=None if not proxy or proxy.lower() == "none" else proxy,
        config_identities=[Path(p).expanduser() for p in config.get("identityfile", [])],
        host_key_alias=config.get("hostkeyalias", host),
        host_key_alias_given="hostkeyalias" in config,
        known_hosts_files=known_hosts,
        read_only_known_hosts=read_only,
    )


def _config_path(options: ConnectOptions) -> Path | None:
    """``--ssh-config``, else ``~/.ssh/config`` when it exists."""
    if options.ssh_config is not None:
        return options.ssh_config
    default = Path("~/.ssh/config").expanduser()
    return default if default.exists() else None


def _read_config(path: Path, host: str) -> paramiko.SSHConfigDict:
    try:
        return paramiko.SSHConfig.from_path(str(path)).lookup(host)
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise RemoteRefused(f"cannot read ssh config {path}: {exc}") from exc


def _known_hosts_files(options: ConnectOptions, config: dict[str, str]) -> tuple[list[Path], list[Path]]:
    """The known_hosts files to read and append to, and the system's, read only (not
    read when ``--known-hosts`` names a file: that file alone decides)."""
    if options.known_hosts is not None:
        return [Path(options.known_hosts).expanduser()], []
    if config.get("userknownhostsfile"):
        files = [Path(p).expanduser() for p in str(config["userknownhostsfile"]).split()]
    else:
        files = [Path("~/.ssh/known_hosts").expanduser()]
    return files, [Path("/etc/ssh/ssh_known_hosts")]
