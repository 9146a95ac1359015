"""Parsing REMOTE arguments: sftp://[user@]host[:port]/path, [user@]host:path, file:///path, DIR,
smb://, dav://, davs:// and any scheme://[user@]host[:port]/path of a handler.

Owns: turning what a user types into a ``RemoteAddress`` and back (``display``).
Must not touch: the network, the filesystem (beyond making a local path absolute) and
``~/.ssh/config`` — the sftp backend resolves host aliases, users and ports later.

Rules, as scp/sshfs and URL users expect them:

- ``sftp://[user@]host[:port]/abs/path`` — the path is absolute on the server and
  percent-decoded (so any byte can be written, ``%E9``); ``sftp://host`` and
  ``sftp://host/~`` mean the login folder, ``sftp://host/~/x`` the folder ``x`` in it.
  IPv6 hosts go in brackets. A password in the URL is refused (use keys).
- ``[user@]host:path`` (sshfs style) — a relative path is taken from the login folder,
  an empty one is the login folder; ``[::1]:path`` for IPv6.
- ``file:///abs/path`` (or ``file://localhost/abs/path``), percent-decoded.
- any other ``scheme://[user@]host[:port]/path`` (``smb://host/share/dir``,
  ``dav://host/dir``, ``davs://``, a third-party handler's): the path absolute on the
  server, percent-decoded; the registry says whether a handler serves the scheme.
- anything else with no ``:``, or starting with ``/`` or ``.``, is a local directory
  (made absolute; ``~`` expanded). Write ``./a:b`` for a local name with a colon.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from urllib.parse import quote_from_bytes, unquote_to_bytes

log = logging.getLogger(__name__)

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# [user@]host:path where host is a bracketed IPv6 literal or has no ':' '/' '[' ']'
_SSHFS_RE = re.compile(r"^(?:(?P<user>[^@/:\[\]]*)@)?(?P<host>\[[^\]]*\]|[^:/\[\]@]*):(?P<path>.*)$", re.S)
_URL_PATH_SAFE = "/~!$&'()*+,;=:@-._"
_HOST_BAD_CHARS = re.compile(r"[\s/\\@?#%]")


@dataclass(frozen=True)
class RemoteAddress:
    scheme: str  # "sftp", "file", or a handler's ("smb", "dav", "davs", ...)
    #: sftp: path on the server ("" = login folder; relative = from login folder); file: an
    #: absolute local path; any other scheme: an absolute path on the server ("/share/dir"
    #: for smb, "/dir" for dav)
    path: str
    host: str | None = None
    user: str | None = None
    port: int | None = None  # None: from ~/.ssh/config or 22

    def display(self) -> str:
        """The address as a user would type it, normalised (no secrets are ever in it).

        ``parse_remote(a.display()) == a`` for every address ``parse_remote`` returns.
        """
        if self.scheme == "file":
            return self.path
        host = self.host or ""
        if ":" in host:
            host = f"[{host}]"
        text = f"{self.scheme}://"
        if self.user:
            text += quote_from_bytes(self.user.encode("utf-8", "surrogateescape"), safe="") + "@"
        text += host
        if self.port is not None:
            text += f":{self.port}"
        if self.path.startswith("/"):
            text += _quote_path(self.path)
        elif self.path and self.scheme == "sftp":
            text += "/~/" + _quote_path(self.path)
        return text


def _quote_path(path: str) -> str:
    return quote_from_bytes(os.fsencode(path), safe=_URL_PATH_SAFE)


def _unquote_path(path: str) -> str:
    # surrogateescape keeps non-UTF-8 bytes (%E9) intact through str
    return os.fsdecode(unquote_to_bytes(path))


def _check_port(port: int | None) -> int | None:
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range (1-65535)")
    return port


def _check_host(host: str, text: str) -> str:
    if not host:
        raise ValueError(f"no host name in {text!r}")
    if _HOST_BAD_CHARS.search(host):
        raise ValueError(f"invalid host name {host!r} in {text!r}")
    return host


def _strip_brackets(host: str, text: str) -> str:
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"invalid bracketed host in {text!r}")
        return host[1:-1]
    return host


def _parse_sftp_url(text: str, port: int | None) -> RemoteAddress:
    url = _parse_server_url("sftp", text, port)
    # (the path as typed: "" and "/~" name the login folder, "/~/x" a folder in it)
    return RemoteAddress(scheme="sftp", path=_home_relative(url.path, "/~"), host=url.host,
                         user=url.user, port=url.port)


def _url_user(netloc: str, text: str) -> tuple[str | None, str]:
    """The user named before '@' (None if none) and what follows it."""
    if "@" not in netloc:
        return None, netloc
    userinfo, _, host_port = netloc.rpartition("@")
    if ":" in userinfo:
        raise ValueError("a password in the address is not supported; use an SSH key or ssh-agent")
    user = os.fsdecode(unquote_to_bytes(userinfo))
    if not user:
        raise ValueError(f"empty user name in {text!r}")
    return user, host_port


def _url_host_port(netloc: str, text: str) -> tuple[str, int | None]:
    """Host and port of a URL's ``host[:port]``, with IPv6 in brackets."""
    if netloc.startswith("["):
        close = netloc.find("]")
        if close < 0:
            raise ValueError(f"unclosed '[' in the host of {text!r}")
        host = netloc[1:close]
        rest = netloc[close + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"junk after ']' in {text!r}")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text_or_empty = netloc.partition(":")
        port_text = port_text_or_empty if sep else None
    if port_text is None:
        return host, None
    if not port_text.isdigit():
        raise ValueError(f"invalid port {port_text!r} in {text!r}")
    return host, int(port_text)


def _home_relative(path: str, home: str) -> str:
    """A path under the login folder (written ``home`` or ``home/...``) as a relative one
    ("" for the login folder itself); any other path as it is."""
    if path in (home, home + "/"):
        return ""
    if path.startswith(home + "/"):
        return path[len(home) + 1 :]
    return path


def _parse_file_url(text: str) -> RemoteAddress:
    rest = text[len("file://") :]
    if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]
    if not rest.startswith("/"):
        raise ValueError(f"a file URL needs an absolute path: file:///abs/path, not {text!r}")
    if "?" in rest or "#" in rest:
        raise ValueError(f"'?' and '#' are not allowed in {text!r}; percent-encode them")
    path = _unquote_path(rest)
    return RemoteAddress(scheme="file", path=os.path.normpath(path))


def parse_remote(text: str, port: int | None = None) -> RemoteAddress:
    """Parse REMOTE; ``port`` (from --port) overrides a port in the text. ValueError on junk."""
    _check_port(port)
    if not text or not text.strip():
        raise ValueError("the remote address is empty")
    if "\0" in text:
        raise ValueError("the remote address contains a NUL character")
    scheme_match = _SCHEME_RE.match(text)
    if scheme_match:
        return _parse_url(scheme_match.group(1).lower(), text, port)
    if ":" not in text or text.startswith(("/", ".", "~")):
        if port is not None:
            raise ValueError("--port makes no sense for a local directory")
        return RemoteAddress(scheme="file", path=os.path.abspath(os.path.expanduser(text)))
    return _parse_sshfs_style(text, port)


def _parse_url(scheme: str, text: str, port: int | None) -> RemoteAddress:
    if scheme == "sftp":
        return _parse_sftp_url(text, port)
    if scheme == "file":
        if port is not None:
            raise ValueError("--port makes no sense for a local directory")
        return _parse_file_url(text)
    return _parse_generic_url(scheme, text, port)


def _parse_generic_url(scheme: str, text: str, port: int | None) -> RemoteAddress:
    """``scheme://[user@]host[:port]/path`` of any other handler (smb, dav, davs and those
    of third-party handlers): the path absolute on the server, percent-decoded. Whether a
    handler serves ``scheme`` is the registry's to say (``cachefs.remote.handler_for``)."""
    url = _parse_server_url(scheme, text, port)
    path = url.path or "/"
    return RemoteAddress(scheme=scheme, path=os.path.normpath(path) if path != "/" else "/",
                         host=url.host, user=url.user, port=url.port)


def _parse_server_url(scheme: str, text: str, port: int | None) -> RemoteAddress:
    """The parts of ``scheme://[user@]host[:port][/path]``, the path percent-decoded as
    typed ("" when there is none); ``port`` (from --port) overrides the URL's."""
    rest = text[len(scheme) + 3 :]
    if "?" in rest or "#" in rest:
        raise ValueError(f"'?' and '#' are not allowed in {text!r}; percent-encode them (%3F, %23)")
    slash = rest.find("/")
    netloc, url_path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    user, netloc = _url_user(netloc, text)
    host, url_port = _url_host_port(netloc, text)
    _check_host(host, text)
    return RemoteAddress(scheme=scheme, path=_unquote_path(url_path), host=host, user=user,
                         port=_check_port(port if port is not None else url_port))


def _parse_sshfs_style(text: str, port: int | None) -> RemoteAddress:
    """``[user@]host:path``, as sshfs and scp write it."""
    match = _SSHFS_RE.match(text)
    if not match:
        raise ValueError(
            f"cannot parse {text!r}: expected sftp://[user@]host[:port]/path, [user@]host:path, "
            "file:///path or a directory (write ./NAME for a local name containing ':')"
        )
    user = match.group("user")
    if user is not None and not user:
        raise ValueError(f"empty user name in {text!r}")
    host = _check_host(_strip_brackets(match.group("host"), text), text)
    path = _home_relative(match.group("path"), "~")
    return RemoteAddress(scheme="sftp", path=path, host=host, user=user, port=port)
