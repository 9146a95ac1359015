"""The WebDAV backend: a folder on a WebDAV server (``dav://`` over http, ``davs://`` over
https, the GNOME convention), reached with ``httpx``.

Owns: mapping the ``Remote`` contract onto WebDAV requests (PROPFIND, GET with ranges,
PUT, MKCOL, DELETE, MOVE, PROPPATCH), the login (a password from ``options.secrets`` or
``~/.netrc``; basic auth, digest when the server asks for it), and the HTTP status →
``RemoteError`` / ``RemoteUnreachable`` / ``RemoteRefused`` translation.
Must not touch: the cache, LMDB, trio, FUSE.

Versions are ETags: ``RemoteStat.tag`` folds the server's ETag (``fold_tag``; a weak
``W/`` mark is dropped, so that a tag does not change when it turns strong). Writes are
conditional on the very ETag the caller's check saw, in an ``If`` header (RFC 4918
10.4: ``If: <url> (["etag"])``), which Apache honours on PUT, MOVE (on the destination
named) and DELETE with a weak comparison, so a weak tag (a file changed less than a
second ago) needs no waiting, and which sabre/dav (Nextcloud, ownCloud) compares as
strings: a change made between the check and the write fails it with 412 and nothing is
overwritten or removed, whatever size and mtime the change kept. ``unlink_if`` and
``rename_over`` find the ETag of the version they are given among those the last stats
and listings saw (a bounded map), else with a PROPFIND.

An upload is a PUT to its temporary name beside the target (no one else writes that
name), always with its ``Content-Length`` (Nextcloud behind PHP-FPM stores a chunked body
as an empty file), the version taken there by a PROPFIND of the temporary file, whose size
must be that of the bytes sent (else it is removed, an error, nothing replaced), then a MOVE over the target conditional on the
version the check saw (``If``; ``Overwrite: F`` where there was nothing). The version
recorded is thus that of our bytes, never that of a writer who saved right after us (a
stat after the write could not tell them apart), and the MOVE is a rename: readers never
see half a file, a cut transfer leaves the old content. Apache keeps a file's ETag across
a MOVE (measured); a server that did not would show the next check a version it does not
know: a conflict copy, nothing lost. A server whose PUT answers give the new ETag
(Nextcloud, ownCloud; learnt from the first one) is written by a PUT in place, conditional
the same way: there a MOVE over a file makes it another file (shares, versions lost).
Plain ``upload``, ``unlink`` and ``rename`` too fail on a change made after their own
check (EEXIST, ESTALE), never acting on what is there then. A server without ETags: the PUT goes to the target
conditional on the mtime second (``If-Unmodified-Since``), with a warning in the log.
The ``X-OC-Mtime`` header asks Nextcloud and ownCloud to keep the file's mtime; Apache
ignores it and lets no client set ``getlastmodified`` (PROPPATCH: 409 read-only), so there
times stay in the cache only (``set_attrs`` tries once, then stops asking). Modes and
owners are not kept; symlinks and hard links do not exist (EPERM).

Names: any byte, percent-encoded in URLs; names in listings are decoded from the hrefs
back to bytes (a server storing non-UTF-8 names, as Apache does, gives them back as
they were).
"""

from __future__ import annotations

import base64
import concurrent.futures
import email.utils
import errno
import getpass
import http.client
import logging
import netrc
import os
import posixpath
import re
import select
import ssl
import stat as stat_mod
import threading
import time
from collections import OrderedDict
import xml.etree.ElementTree as ET
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import quote_from_bytes, unquote_to_bytes, urlsplit

import httpx

from ..errors import ContentDamaged
from .http_get import Answer, Getter, GetterClosed, Request, take
from .pacing import Pacer, unacknowledged
from .base import (Capabilities, NotExpected, Remote, RemoteError, RemoteRefused, RemoteStat,
                   RemoteUnreachable, Source, SpaceInfo, Upload, UploadOutcome, fold_tag,
                   open_source)

if TYPE_CHECKING:
    from ..address import RemoteAddress
    from .options import ConnectOptions
    from .ssh_secrets import Secrets

log = logging.getLogger(__name__)
# httpx logs every request's URL at INFO, and httpcore every step at DEBUG: file names in
# a log that must name none without --verbose (an encrypted cache), and noise with it
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)

T = TypeVar("T")
U = TypeVar("U")

DAV = "{DAV:}"
#: the properties a stat or a listing asks for
PROPFIND_BODY = (b'<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:"><D:prop>'
                 b"<D:resourcetype/><D:getcontentlength/><D:getlastmodified/><D:getetag/>"
                 b"</D:prop></D:propfind>")
QUOTA_BODY = (b'<?xml version="1.0" encoding="utf-8"?><D:propfind xmlns:D="DAV:"><D:prop>'
              b"<D:quota-available-bytes/><D:quota-used-bytes/></D:prop></D:propfind>")
XML_HEADERS = {"Content-Type": 'application/xml; charset="utf-8"'}
#: a read larger than this goes as several ranged GETs side by side
READ_PIECE = 4 << 20
#: requests that share one pipeline at least (``DavRemote._pipelined``)
PIPELINE_LEAST = 8
GET_OK = (200, 206, 416)  # a ranged GET's answers that are answers about the bytes
UPLOAD_CHUNK = 1 << 20
#: the most of a PUT's body that may still be on its way when httpx has handed over its
#: last byte (loopback and LAN socket buffers autotune to a few MiB; measured through the
#: tests' throttling proxy: a 3 MiB PUT at 1 MB/s was all handed over at once, and its
#: answer came 3 s later), and a rate for it: the wait for a PUT's answer is the timeout
#: plus up to 8 MiB / 256 kB/s = 33 s more, for bytes held beyond our socket (a proxy's
#: buffers). On our own socket a slower uplink is seen moving (``_MeteredStream``: the
#: wait goes on while its send queue shrinks), whatever its speed
IN_FLIGHT_MAX = 8 << 20
SLOW_LINK = 256_000
#: the temporary files Apache's mod_dav_fs writes a PUT's body to, beside the target
#: (``.davfs.tmp`` and apr_file_mktemp's six letters or digits): hidden from listings, a
#: user's file of another name that begins so is not
SERVER_TEMP_NAME = re.compile(rb"\.davfs\.tmp[A-Za-z0-9]{6}\Z")
#: how many paths' ETags (as the server sent them) are kept for ``unlink_if`` and
#: ``rename_over``: the replay stats a path just before
ETAGS_KEPT = 4096
FALLBACK_SPACE = SpaceInfo(
    block_size=4096, blocks=1 << 28, blocks_free=1 << 28, blocks_avail=1 << 28,
    files=1 << 24, files_free=1 << 24, name_max=255,
)
DIR_MODE = stat_mod.S_IFDIR | 0o755
FILE_MODE = stat_mod.S_IFREG | 0o644


class _Entry:
    """One PROPFIND response: what a ``RemoteStat`` is made of, and the ETag as sent."""

    __slots__ = ("href", "is_dir", "size", "mtime_ns", "etag")

    def __init__(self, href: bytes, is_dir: bool, size: int, mtime_ns: int, etag: str | None) -> None:
        self.href, self.is_dir, self.size, self.mtime_ns, self.etag = href, is_dir, size, mtime_ns, etag

    def stat(self) -> RemoteStat:
        return _make_stat(self.is_dir, self.size, self.mtime_ns, self.etag)


def _make_stat(is_dir: bool, size: int, mtime_ns: int, etag: str | None) -> RemoteStat:
    tag = _fold(etag) if etag else 0
    return RemoteStat(mode=DIR_MODE if is_dir else FILE_MODE, size=0 if is_dir else size,
                      mtime_ns=mtime_ns, atime_ns=mtime_ns, nlink=2 if is_dir else 1, tag=tag)


def _fold(etag: str) -> int:
    return fold_tag(_strip_weak(etag).encode("utf-8", "surrogateescape"))


def _strip_weak(etag: str) -> str:
    return etag[2:] if etag.startswith("W/") else etag


def _http_time_ns(text: str | None) -> int:
    if not text:
        return 0
    try:
        return int(email.utils.parsedate_to_datetime(text.strip()).timestamp()) * 1_000_000_000
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0


def _href_path(href: str) -> bytes:
    """The decoded path of an href (absolute URL or absolute path), without a final '/'."""
    path = urlsplit(href.strip()).path if "://" in href else href.strip()
    raw = unquote_to_bytes(path)
    return raw.rstrip(b"/") or b"/"


def _parse_multistatus(body: bytes) -> list[_Entry]:
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise RemoteError(errno.EIO, f"the server's PROPFIND answer is not XML: {exc}") from None
    entries = []
    for response in root.iter(f"{DAV}response"):
        href = response.findtext(f"{DAV}href")
        if href is None:
            continue
        props: dict[str, ET.Element] = {}
        for propstat in response.iter(f"{DAV}propstat"):
            status = propstat.findtext(f"{DAV}status") or ""
            if " 200 " not in status + " ":
                continue
            prop = propstat.find(f"{DAV}prop")
            if prop is not None:
                for child in prop:
                    props[child.tag] = child
        kind = props.get(f"{DAV}resourcetype")
        is_dir = kind is not None and kind.find(f"{DAV}collection") is not None
        length = props.get(f"{DAV}getcontentlength")
        try:
            size = int((length.text or "0").strip()) if length is not None else 0
        except ValueError:
            size = 0
        modified = props.get(f"{DAV}getlastmodified")
        etag_el = props.get(f"{DAV}getetag")
        etag = (etag_el.text or "").strip() or None if etag_el is not None else None
        entries.append(_Entry(_href_path(href), is_dir, size,
                              _http_time_ns(modified.text if modified is not None else None), etag))
    return entries


class _Status(Exception):
    """An HTTP answer a caller may want to tell apart (412 on a conditional write)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _HttpError(RemoteError):
    """A ``RemoteError`` from an HTTP status, which it keeps (``code``)."""

    def __init__(self, err: int, message: str, code: int) -> None:
        super().__init__(err, message)
        self.code = code


class DavRemote(Remote):
    """A folder on a WebDAV server. Thread-safe: one ``httpx.Client`` (a pool of
    keep-alive connections) shared by every thread; the login is made once, under a lock."""

    capabilities = Capabilities(symlinks=False, hard_links=False, atomic_replace=True,
                                xattrs=False, modes=False, owners=False, notify=False,
                                strong_versions=True, exclusive_create=True)

    @classmethod
    def from_address(cls, address: RemoteAddress, options: ConnectOptions,
                     pacer: Pacer | None = None) -> DavRemote:
        if address.scheme not in ("dav", "davs") or not address.host:
            raise RemoteRefused(f"not a WebDAV address: {address.display()}")
        return cls(address.host, address.path, scheme=address.scheme, port=address.port,
                   user=address.user, timeout=options.timeout, secrets=options.secrets,
                   connections=options.connections)

    def __init__(self, host: str, path: str = "/", *, scheme: str = "dav", port: int | None = None,
                 user: str | None = None, timeout: float = 10.0, secrets: Secrets | None = None,
                 password: str | None = None, connections: int = 4, verify: bool | str = True,
                 netrc_file: str | None = None) -> None:
        """``password``: a password given directly (tests); else ``secrets``, else the
        ``netrc_file`` (default ``~/.netrc``) entry of ``host``."""
        self.scheme = scheme
        self.host = host
        self.port = port or (443 if scheme == "davs" else 80)
        self._user_given = user
        self.user = user or getpass.getuser()
        self.timeout = timeout
        self.parallelism = max(1, connections)
        self._secrets = secrets
        self._password = password
        self._netrc_file = netrc_file
        self._verify = verify
        # normalised ('//', '.' and '..' segments gone): Apache evaluates an ``If`` header
        # only for the resource its URL maps to, and ignores one naming '/a//b' (the
        # request then unconditional: measured, a DELETE with a stale ETag removed the file)
        root = posixpath.normpath(b"//" + os.fsencode(path or "/"))  # ('///': one '/')
        self._root = b"" if root == b"/" else root
        host_text = f"[{host}]" if ":" in host else host
        self._origin = f"{'https' if scheme == 'davs' else 'http'}://{host_text}:{self.port}"
        self.description = (f"{scheme}://{self.user}@{host_text}:{self.port}"
                            f"{quote_from_bytes(self._root or b'/', safe='/')}")
        self._client: httpx.Client | None = None
        self._auth: httpx.Auth | None = None
        self._logged_in = False
        #: GETs go through ``http_get.Getter`` (a quarter of httpx's CPU per request) where
        #: every request carries the same header: this one (basic auth), or none (no
        #: password asked); None where they cannot (digest: httpx computes each)
        self._get_headers: dict[str, str] | None = None
        self._getter: Getter | None = None
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pipes: concurrent.futures.ThreadPoolExecutor | None = None  # (``_pipelined``)
        self._times_settable: bool | None = None  # PROPPATCH getlastmodified: unknown yet
        #: path -> (ETag as sent, (size, kind)) of what a stat or a listing saw last
        self._etags: OrderedDict[bytes, tuple[str, tuple[int, int]]] = OrderedDict()
        self._warned_no_etags = False
        #: the paths whose last write got a 500 with their folder writable (``_server_500``)
        self._failed_500: OrderedDict[bytes, None] = OrderedDict()
        #: whether the server's PUT answers give the new file's ETag (None: not known yet)
        self._put_tells_etag: bool | None = None

    # -- plumbing -------------------------------------------------------------------
    def _url(self, path: bytes) -> str:
        if path.startswith(b"/") or b"\0" in path:
            raise RemoteError(errno.EINVAL, f"not a share-relative path: {path!r}")
        full = self._root + b"/" + path if path else (self._root or b"/")
        return self._origin + quote_from_bytes(full, safe="/")

    def _href_of(self, path: bytes) -> bytes:
        """``path``'s href as ``_parse_multistatus`` gives it (decoded, no final '/')."""
        return unquote_to_bytes(urlsplit(self._url(path)).path).rstrip(b"/") or b"/"

    def _remember(self, path: bytes, entry: _Entry) -> None:
        if not entry.etag:
            return
        kind = stat_mod.S_IFDIR if entry.is_dir else stat_mod.S_IFREG
        with self._lock:
            self._etags[path] = (entry.etag, (0 if entry.is_dir else entry.size, kind))
            self._etags.move_to_end(path)
            while len(self._etags) > ETAGS_KEPT:
                self._etags.popitem(last=False)

    def _side_by_side(self, one: Callable[[T], U], items: list[T]) -> list[U]:
        """``one`` of each item, ``parallelism`` at a time; a pool shut down by ``close``
        meanwhile: ``RemoteUnreachable``."""
        if len(items) <= 1:
            return [one(item) for item in items]
        try:
            return list(self._threads().map(one, items))
        except (concurrent.futures.CancelledError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "shutdown" not in str(exc):
                raise
            raise RemoteUnreachable(f"{self.description}: closed") from None

    def _client_now(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                transport = httpx.HTTPTransport(
                    verify=self._ssl_context(),
                    limits=httpx.Limits(max_connections=self.parallelism * 4,
                                        max_keepalive_connections=self.parallelism * 2,
                                        keepalive_expiry=30))
                pool = getattr(transport, "_pool", None)  # (httpcore's ConnectionPool)
                backend = getattr(pool, "_network_backend", None)
                if backend is not None and hasattr(backend, "connect_tcp"):
                    setattr(pool, "_network_backend", _MeteredBackend(backend))
                else:  # (another httpx inside: the fixed allowance alone)
                    log.debug("httpx's connection pool not as known: no send-queue metering")
                self._client = httpx.Client(
                    timeout=httpx.Timeout(self.timeout, pool=self.timeout * 3), transport=transport,
                    follow_redirects=False, trust_env=False, headers={"User-Agent": "cachefs"})
            return self._client

    def _ssl_context(self) -> ssl.SSLContext | bool:
        """Certificates checked against the system's store (``SSL_CERT_FILE`` and
        ``SSL_CERT_DIR`` honoured), or the CA file given; ``verify=False`` checks none."""
        if self._verify is False or self.scheme != "davs":
            return False if self._verify is False else True
        if isinstance(self._verify, str):
            return ssl.create_default_context(cafile=self._verify)
        return ssl.create_default_context()

    def _send(self, method: str, url: str, headers: dict[str, str] | None = None,
              content: bytes | Iterator[bytes] | None = None, auth: httpx.Auth | None = None,
              stream: bool = False, answered_500: bool = False, in_flight: int = 0) -> httpx.Response:
        """One request; transport failures and 5xx (but 507; and 500 where
        ``answered_500``: an answer about the request) → ``RemoteUnreachable``.
        ``in_flight``: the size of the body sent, of which up to ``IN_FLIGHT_MAX`` may still
        sit in buffers along the way when the last byte is handed over (socket buffers grow
        to megabytes): the wait for the answer is longer by their time at ``SLOW_LINK``."""
        client = self._client_now()
        wait = self.timeout + min(in_flight, IN_FLIGHT_MAX) / SLOW_LINK
        try:
            request = client.build_request(
                method, url, headers=headers, content=content,
                timeout=httpx.Timeout(self.timeout, read=wait, pool=self.timeout * 3) if in_flight
                else httpx.USE_CLIENT_DEFAULT)
            response = client.send(request, auth=auth or self._auth or httpx.USE_CLIENT_DEFAULT,
                                   stream=stream)
        except httpx.TimeoutException:
            raise RemoteUnreachable(f"{self.description}: no answer within {wait:g} s") from None
        except RuntimeError as exc:  # (httpx: "the client has been closed": ``close`` meanwhile)
            if "closed" not in str(exc):
                raise
            raise RemoteUnreachable(f"{self.description}: closed") from None
        except httpx.TransportError as exc:
            if _certificate_refused(exc):
                raise RemoteRefused(f"{self.description}: the server's certificate is not trusted "
                                    f"({_root_cause(exc)})") from None
            raise RemoteUnreachable(f"{self.description}: {_root_cause(exc)}") from None
        if response.status_code == 502 and method == "MOVE" and not stream \
                and "Destination" in response.text:
            # Apache's answer to a Destination of another scheme (https from the client,
            # http where it listens: a TLS-terminating proxy in front): an answer, not an
            # outage (as one the mount went offline, came back, met it again: nothing landed)
            response.close()
            raise RemoteError(errno.EIO, f"{self.description}: the server refuses to MOVE: its "
                              "Destination names another scheme than the one it listens on (a TLS "
                              "proxy in front of Apache? give Apache 'RequestHeader edit "
                              "Destination ^https: http: early')")
        if response.status_code >= 500 and response.status_code != 507 and not (
                answered_500 and response.status_code == 500):
            response.close()
            raise RemoteUnreachable(f"{self.description}: the server answered {response.status_code} "
                                    f"{response.reason_phrase} to {method}")
        return response

    def _request(self, method: str, path: bytes, headers: dict[str, str] | None = None,
                 content: bytes | Iterator[bytes] | None = None, ok: tuple[int, ...] = (200, 201, 204, 207),
                 stream: bool = False, answered_500: bool = False, in_flight: int = 0) -> httpx.Response:
        """A request on ``path`` once logged in; an answer not in ``ok`` raised as the
        ``RemoteError`` it means (412 as ``_Status``, for the callers that expect it)."""
        self._ensure_login()
        response = self._send(method, self._url(path), headers, content, stream=stream,
                              answered_500=answered_500, in_flight=in_flight)
        if response.status_code in ok:
            return response
        if stream:
            response.read()
        code = response.status_code
        if code == 412:
            raise _Status(code)
        raise _HttpError(_errno_of(code), f"{method} {path!r}: {code} {response.reason_phrase}", code)

    # -- login ----------------------------------------------------------------------
    def _netrc_entry(self) -> tuple[str | None, str] | None:
        try:
            found = netrc.netrc(self._netrc_file).authenticators(self.host)
        except netrc.NetrcParseError as exc:
            # (the file and line only: the parser's message quotes the file's words, a
            # password among them)
            log.warning("cannot read %s: a syntax error at line %s", exc.filename or self._netrc_file
                        or "~/.netrc", exc.lineno)
            return None
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("cannot read %s: %s", self._netrc_file or "~/.netrc",
                            exc.strerror or type(exc).__name__)
            return None
        if found is None or not found[2]:
            return None
        login, _account, password = found
        if self._user_given and login and login != self._user_given:
            return None  # an entry for another user of this host
        return (login or None, password)

    def _candidates(self) -> Iterator[tuple[str, str]]:
        """(user, password) to try: the one given, the secrets' given one, ~/.netrc's, then
        what is asked on a terminal (within ``Secrets.asking``)."""
        if self._password is not None:
            yield self.user, self._password
            return
        secrets = self._secrets
        if secrets is not None and secrets.given_by:
            for password in secrets.passwords(self._prompt()):
                yield self.user, password
            return
        entry = self._netrc_entry()
        if entry is not None:
            yield entry[0] or self.user, entry[1]
        if secrets is not None:
            for password in secrets.passwords(self._prompt()):
                yield self.user, password

    def _prompt(self) -> str:
        return f"Password for {self.user} at {self._origin}: "

    def _ensure_login(self) -> None:
        if not self._logged_in:
            self.connect()

    def connect(self) -> None:
        """Log in (trying each candidate password) and check the share root is a folder: a
        depth-0 PROPFIND of the root every time, logged in or not (the reconnect probe
        calls this: it must not say "back" without the server having answered)."""
        with self._login_lock:
            url = self._url(b"")
            response = self._send("PROPFIND", url, {"Depth": "0", **XML_HEADERS}, PROPFIND_BODY,
                                  auth=None if self._auth else _NoAuth())
            tried = 0
            if response.status_code == 401:
                digest = _wants_digest(response)
                for user, password in self._candidates():
                    tried += 1
                    auth: httpx.Auth = (httpx.DigestAuth(user, password) if digest
                                        else httpx.BasicAuth(user, password))
                    response = self._send("PROPFIND", url, {"Depth": "0", **XML_HEADERS},
                                          PROPFIND_BODY, auth=auth)
                    if response.status_code != 401:
                        self._auth = auth
                        self.user = user
                        self._get_headers = None if digest else {"Authorization": _basic(user, password)}
                        if self._secrets is not None and self._password is None:
                            self._secrets.password_worked(password)
                        break
            code = response.status_code
            if code == 401:
                if tried:
                    raise RemoteRefused(f"{self.description}: password refused for {self.user}")
                raise RemoteRefused(f"{self.description}: the server asks for a password: give "
                                    "--password-file FILE, CACHEFS_PASSWORD or a ~/.netrc entry")
            if code == 403:
                raise RemoteRefused(f"{self.description}: access refused (403) for {self.user}")
            if code in (404, 409):
                raise RemoteRefused(f"{self.description}: no such folder on the server")
            if code in (405, 501):
                raise RemoteRefused(f"{self.description}: not a WebDAV folder (PROPFIND: {code})")
            if code != 207:
                raise RemoteRefused(f"{self.description}: unexpected answer {code} "
                                    f"{response.reason_phrase} to PROPFIND")
            entries = _parse_multistatus(response.content)
            if not entries or not entries[0].is_dir:
                raise RemoteRefused(f"{self.description} is not a folder")
            if self._auth is None:
                self._get_headers = {}
            self._logged_in = True
            log.debug("WebDAV share %s ready", self.description)

    _login_lock = threading.Lock()  # (a class-wide lock is enough: logins are rare)

    def log_in(self) -> None:
        self.connect()

    def ping(self) -> None:
        self.stat(b"")

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            pool, self._pool = self._pool, None
            pipes, self._pipes = self._pipes, None
            getter, self._getter = self._getter, None
        for executor in (pool, pipes):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        if client is not None:
            client.close()
        if getter is not None:
            getter.close()

    def _threads(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.parallelism, thread_name_prefix="cachefs-dav")
            return self._pool

    # -- reading --------------------------------------------------------------------
    def _propfind(self, path: bytes, depth: str) -> list[_Entry]:
        self._ensure_login()
        getter = self._getter_now()
        if getter is None:
            response = self._request("PROPFIND", path, {"Depth": depth, **XML_HEADERS}, PROPFIND_BODY,
                                     ok=(207,))
            return _parse_multistatus(response.content)
        return _parse_multistatus(self._ask(getter, path, self._propfind_request(path, depth), (207,)).body)

    def _ask(self, getter: Getter, path: bytes, request: Request, ok: tuple[int, ...]) -> Answer:
        """One request through ``getter`` (built by the caller: a bad path's EINVAL is the
        path's, not the link's): its answer where its status is in ``ok``, else the error
        the status or the failure means."""
        try:
            answer = getter.get(request)
        except GetterClosed:
            raise RemoteUnreachable(f"{self.description}: closed") from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._get_failed(exc) from None
        return self._answered(path, answer, request.method, ok)

    def _pipelined(self, getter: Getter, requests: list[Request]) -> list[Answer | BaseException]:
        """``requests`` pipelined, their answers in order: on up to ``parallelism``
        connections side by side, ``PIPELINE_LEAST`` requests at least on each (a server
        slow to answer each, as PHP ones are, must not make one pipeline of many outlast
        the caller's bound on a call). The first group on the calling thread, the others
        on threads of their own (``_pipe_threads``): not behind uploads and large reads in
        the pool they use, whose wait would count against a listing's bound (reviewed)."""
        groups = max(1, min(self.parallelism, len(requests) // PIPELINE_LEAST))
        size = -(-len(requests) // groups)
        chunks = [requests[i:i + size] for i in range(0, len(requests), size)]
        try:
            futures = [self._pipe_threads().submit(getter.get_many, chunk) for chunk in chunks[1:]]
        except RuntimeError:  # (the pool shut down by ``close`` meanwhile)
            raise RemoteUnreachable(f"{self.description}: closed") from None
        try:
            answers = getter.get_many(chunks[0])
            for future in futures:
                answers += future.result()
        except (GetterClosed, concurrent.futures.CancelledError):  # (``close`` meanwhile)
            raise RemoteUnreachable(f"{self.description}: closed") from None
        return answers

    def _each(self, getter: Getter, paths: list[bytes], requests: list[Request], ok: tuple[int, ...],
              taken: Callable[[bytes, Answer], T]) -> list[T | RemoteError]:
        """``requests`` (one about each of ``paths``) pipelined, and of each answer in ``ok``
        what ``taken`` makes of it; an answer about the path (404, 412, ``taken``'s own
        ``RemoteError``) is that path's; no answer at all (the link) raises."""
        out: list[T | RemoteError] = []
        for path, request, answer in zip(paths, requests, self._pipelined(getter, requests)):
            if isinstance(answer, (OSError, http.client.HTTPException)):
                raise self._get_failed(answer)  # (no answer: the link, not the path)
            if isinstance(answer, BaseException):
                raise answer
            try:
                out.append(taken(path, self._answered(path, answer, request.method, ok)))
            except RemoteError as exc:
                out.append(exc)
            except _Status as exc:
                out.append(RemoteError(_errno_of(exc.code), f"{request.method} {path!r}: {exc.code}"))
        return out

    def _pipe_threads(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pipes is None:
                self._pipes = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.parallelism * 2, thread_name_prefix="cachefs-dav-pipe")
            return self._pipes

    def _propfind_request(self, path: bytes, depth: str) -> Request:
        return self._lean_request(path, {"Depth": depth, **XML_HEADERS}, method="PROPFIND",
                                  body=PROPFIND_BODY)

    def _lean_request(self, path: bytes, headers: dict[str, str], **kwargs: Any) -> Request:
        """A ``Request`` for ``path`` with ``headers`` and the login's (``_get_headers``)."""
        return Request(self._url(path)[len(self._origin):],
                       {**headers, **(self._get_headers or {}), "User-Agent": "cachefs"}, **kwargs)

    def _entry(self, path: bytes) -> _Entry:
        entries = self._propfind(path, "0")
        if not entries:
            raise RemoteError(errno.EIO, f"PROPFIND {path!r}: an empty answer")
        href = self._href_of(path)
        entry = next((e for e in entries if e.href == href), None)
        if entry is None:  # (another resource's entry is not this one's: never taken for it)
            raise self._no_own_entry(path)
        self._remember(path, entry)
        return entry

    def stat(self, path: bytes) -> RemoteStat:
        return self._entry(path).stat()

    def listdir(self, path: bytes) -> list[tuple[bytes, RemoteStat]]:
        return self._children_of(path, self._propfind(path, "1"))

    def _children_of(self, path: bytes, entries: list[_Entry]) -> list[tuple[bytes, RemoteStat]]:
        """The folder ``path``'s children from its depth-1 PROPFIND's ``entries``."""
        folder = self._href_of(path)
        out: list[tuple[bytes, RemoteStat]] = []
        own: _Entry | None = None
        for entry in entries:
            if entry.href == folder:
                own = entry
                continue
            parent, _, name = entry.href.rpartition(b"/")
            if (parent or b"/") != folder or not name or SERVER_TEMP_NAME.match(name):
                continue
            self._remember(path + b"/" + name if path else name, entry)
            out.append((name, entry.stat()))
        if own is None:
            if len(entries) == 1 and not entries[0].is_dir:
                raise RemoteError(errno.ENOTDIR, f"{path!r} is not a folder")
            raise self._no_own_entry(path)
        if not own.is_dir:
            raise RemoteError(errno.ENOTDIR, f"{path!r} is not a folder")
        self._remember(path, own)
        return out

    def listdir_many(self, paths: list[bytes]) -> list[list[tuple[bytes, RemoteStat]] | RemoteError]:
        """Several PROPFINDs pipelined (``_pipelined``; side by side, ``parallelism`` at a
        time, through httpx where requests cannot go so: digest)."""
        def one(path: bytes) -> list[tuple[bytes, RemoteStat]] | RemoteError:
            try:
                return self.listdir(path)
            except RemoteError as exc:
                return exc

        self._ensure_login()
        getter = self._getter_now()
        if getter is None or len(paths) <= 1:
            return self._side_by_side(one, paths)
        return self._each(getter, paths, [self._propfind_request(path, "1") for path in paths], (207,),
                          lambda path, answer: self._children_of(path, _parse_multistatus(answer.body)))

    def readlink(self, path: bytes) -> bytes:
        raise RemoteError(errno.EINVAL, "WebDAV has no symlinks")

    def _get_range(self, path: bytes, offset: int, length: int,
                   if_match: str | None = None) -> tuple[bytes, Answer]:
        """``length`` bytes of ``path`` from ``offset`` (fewer at its end; none past it: a
        416) and the answer they came in (its status and headers)."""
        headers = _range_of(offset, length)
        if if_match:
            headers["If-Match"] = if_match
        self._ensure_login()
        getter = self._getter_now()
        if getter is not None:
            answered = self._ask(getter, path, self._lean_request(path, headers, offset=offset, length=length),
                                 GET_OK)
            return _range_bytes(answered), answered
        response = self._request("GET", path, headers, ok=GET_OK, stream=True)
        try:
            if response.status_code == 416:
                data = b""
            elif response.status_code == 206:
                data = response.read()[:length]
            else:  # the server ignored the Range and sends it all: the part asked is taken,
                # and the rest not read (the connection is dropped rather than drained)
                data = take(response.iter_bytes(UPLOAD_CHUNK), offset, length)
            return data, Answer(response.status_code, response.reason_phrase, response.headers, data)
        except httpx.TimeoutException:
            raise RemoteUnreachable(f"{self.description}: no answer within {self.timeout:g} s") from None
        except httpx.TransportError as exc:
            raise RemoteUnreachable(f"{self.description}: {_root_cause(exc)}") from None
        finally:
            response.close()

    def _getter_now(self) -> Getter | None:
        """The ``Getter`` where requests may go through it (``_get_headers``), made at
        first use."""
        if self._get_headers is None:
            return None
        with self._lock:
            if self._getter is None:
                context: ssl.SSLContext | None = None
                if self.scheme == "davs":
                    checked = self._ssl_context()  # (False: nothing checked, ``verify=False``)
                    context = checked if isinstance(checked, ssl.SSLContext) else _unverified()
                self._getter = Getter(self.host, self.port, context, self.timeout, keep=self.parallelism * 2)
            return self._getter

    def _get_failed(self, exc: OSError | http.client.HTTPException) -> RemoteUnreachable | RemoteRefused:
        """What a request that got no answer (``Getter``'s exception) means."""
        if isinstance(exc, TimeoutError):
            return RemoteUnreachable(f"{self.description}: no answer within {self.timeout:g} s")
        if isinstance(exc, ssl.SSLCertVerificationError):
            return RemoteRefused(f"{self.description}: the server's certificate is not trusted "
                                 f"({exc.verify_message or exc})")
        return RemoteUnreachable(f"{self.description}: {exc or type(exc).__name__}")

    def _answered(self, path: bytes, answer: Answer, method: str, ok: tuple[int, ...]) -> Answer:
        """An answer in ``ok``, or the error its status means (as ``_request`` and ``_send``
        give them)."""
        code = answer.status_code
        if code in ok:
            return answer
        if code >= 500 and code != 507:
            raise RemoteUnreachable(f"{self.description}: the server answered {code} "
                                    f"{answer.reason_phrase} to {method}")
        if code == 412:
            raise _Status(code)
        raise _HttpError(_errno_of(code), f"{method} {path!r}: {code} {answer.reason_phrase}", code)

    def read(self, path: bytes, offset: int, length: int) -> bytes:
        parts: dict[int, bytes] = {}
        got = self.read_into(path, offset, length, lambda pos, data: parts.__setitem__(pos, data))
        return b"".join(parts[p] for p in sorted(parts))[:got]

    def read_into(self, path: bytes, offset: int, length: int,
                  sink: Callable[[int, bytes], object]) -> int:
        got, _as_read, changed = self._read(path, offset, length, sink)
        if changed:
            raise RemoteError(errno.EIO, f"{path!r} changed on the server while it was read")
        return got

    def read_version_into(self, path: bytes, offset: int, length: int,
                          sink: Callable[[int, bytes], object]) -> tuple[int, RemoteStat]:
        """The version is the one the GETs were bound to (their ETag: every piece after the
        first asked ``If-Match`` it where it is strong, and answered with the same one
        where it is weak), so no PROPFIND follows; where the answers gave no ETag or size,
        or the file changed midway, a PROPFIND after the reads."""
        got, as_read, changed = self._read(path, offset, length, sink)
        if as_read is None or changed:
            return got, self.stat(path)
        return got, as_read

    def _read(self, path: bytes, offset: int, length: int,
              sink: Callable[[int, bytes], object]) -> tuple[int, RemoteStat | None, bool]:
        """The bytes to ``sink``; their count, the version they are of (None: not known
        for sure) and whether the file changed on the server midway."""
        if length <= 0:
            return 0, None, False
        first = min(length, READ_PIECE)
        data, response = self._get_range(path, offset, first)
        if data:
            sink(offset, data)
        etag = response.headers.get("ETag")
        strong = etag if etag and not etag.startswith("W/") else None
        # (a weak ETag, Apache's during the second after a change, names the version as
        # well: its value is the strong one to come; the pieces then compare theirs)
        as_read = _stat_of_get(response) if etag else None
        if len(data) < first or length == first:
            return len(data), as_read, False
        # the rest side by side, each bound to the version the first piece came from
        pieces = [(pos, min(READ_PIECE, offset + length - pos))
                  for pos in range(offset + first, offset + length, READ_PIECE)]
        try:
            futures = [self._threads().submit(self._get_range, path, pos, size, strong)
                       for pos, size in pieces]
        except RuntimeError:  # (the pool shut down by ``close`` meanwhile)
            raise RemoteUnreachable(f"{self.description}: closed") from None
        total = len(data)
        short = False
        try:
            for (pos, size), future in zip(pieces, futures):
                try:
                    piece, answer = future.result()
                except _Status:
                    return total, None, True
                except concurrent.futures.CancelledError:  # (``close`` meanwhile)
                    raise RemoteUnreachable(f"{self.description}: closed") from None
                theirs = answer.headers.get("ETag")
                if etag and theirs and _strip_weak(theirs) != _strip_weak(etag):
                    return total, None, True
                if piece:
                    sink(pos, piece)
                if not short:
                    total += len(piece)
                    short = len(piece) < size
        finally:
            for future in futures:
                future.cancel()
        return total, as_read, False

    def read_many(self, items: list[tuple[bytes, int]]) -> list[tuple[bytes, RemoteStat] | RemoteError]:
        """Small files, each a GET of the size given (a Range: a file grown since gives
        that much, and its whole size in the attributes), pipelined (``_pipelined``; side
        by side through httpx where GETs cannot go so: digest);
        each GET's headers (ETag, Last-Modified, Content-Range) give its attributes, so no
        PROPFIND is needed (but for an empty file: Apache answers 416 without them)."""
        def done(path: bytes, got: tuple[bytes, Answer]) -> tuple[bytes, RemoteStat] | RemoteError:
            data, response = got
            as_read = _stat_of_get(response) if response.status_code != 416 else None
            if as_read is None:  # (Apache answers 416, without them, for an empty file)
                return data, self.stat(path)
            return data, as_read

        def one(item: tuple[bytes, int]) -> tuple[bytes, RemoteStat] | RemoteError:
            path, size = item
            try:
                return done(path, self._get_range(path, 0, max(1, size)))
            except RemoteError as exc:
                return exc
            except _Status as exc:
                return RemoteError(_errno_of(exc.code), f"GET {path!r}: {exc.code}")

        self._ensure_login()
        getter = self._getter_now()
        if getter is None or len(items) <= 1:
            return self._side_by_side(one, items)
        requests = [self._lean_request(path, _range_of(0, max(1, size)), offset=0, length=max(1, size))
                    for path, size in items]
        return self._each(getter, [path for path, _size in items], requests, GET_OK,
                          lambda path, answer: done(path, (_range_bytes(answer), answer)))

    def statvfs(self) -> SpaceInfo:
        """RFC 4331 quota properties of the share root where the server gives them (Apache
        does not): free = available bytes; else a fixed plausible answer."""
        response = self._request("PROPFIND", b"", {"Depth": "0", **XML_HEADERS}, QUOTA_BODY, ok=(207,))
        try:
            root = ET.fromstring(response.content)
        except ET.ParseError:
            return FALLBACK_SPACE
        values: dict[str, int] = {}
        for propstat in root.iter(f"{DAV}propstat"):
            if " 200 " not in (propstat.findtext(f"{DAV}status") or "") + " ":
                continue
            for name in ("quota-available-bytes", "quota-used-bytes"):
                text = propstat.findtext(f"{DAV}prop/{DAV}{name}")
                try:
                    values[name] = int((text or "").strip())
                except ValueError:
                    pass
        if "quota-available-bytes" not in values or values["quota-available-bytes"] < 0:
            return FALLBACK_SPACE
        block = 4096
        free = values["quota-available-bytes"] // block
        used = max(0, values.get("quota-used-bytes", 0)) // block
        return SpaceInfo(block_size=block, blocks=free + used, blocks_free=free, blocks_avail=free,
                         files=1 << 24, files_free=1 << 24, name_max=255)

    # -- writing --------------------------------------------------------------------
    def _entry_or_none(self, path: bytes) -> _Entry | None:
        try:
            return self._entry(path)
        except RemoteError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise

    def _if_tag(self, path: bytes, etag: str) -> dict[str, str]:
        """A condition on ``path``'s ETag in an ``If`` header (RFC 4918 10.4): a tagged
        list naming ``path``, so that on a MOVE it tests the destination, not the source.
        The ETag goes as the server gave it: Apache compares it weakly there (a weak tag,
        a file changed less than a second ago, needs no waiting: measured), sabre/dav
        (Nextcloud, ownCloud) compares the strings."""
        return {"If": f"<{self._url(path)}> ([{etag}])"}

    def _unchanged_since(self, path: bytes, entry: _Entry, what: str) -> dict[str, str]:
        """The condition of a request about ``entry`` as seen: its ETag (``If``), or, on a
        server that gives none, its mtime second (``If-Unmodified-Since``, logged once)."""
        if entry.etag:
            return self._if_tag(path, entry.etag)
        self._no_etags(what)
        return {"If-Unmodified-Since": email.utils.formatdate(entry.mtime_ns // 1_000_000_000, usegmt=True)}

    def _no_etags(self, what: str) -> None:
        if not self._warned_no_etags:
            self._warned_no_etags = True
            log.warning("%s: the server gives no ETags: %s is conditional on the mtime second "
                        "only (a same-second change made meanwhile is not seen)",
                        self.description, what)

    def _server_500(self, path: bytes, exc: RemoteError) -> RemoteError | RemoteUnreachable:
        """What a 500 to a write means. Apache answers 500 to a PUT or a MOVE into a folder
        it cannot write, or into one that is not there: the parent's state says (gone:
        ENOENT; a file: ENOTDIR; refusing a new empty file of ours: EACCES). A folder that
        takes that file (removed at once) had no such reason: a passing fault (a server
        script's error, a database busy), ``RemoteUnreachable`` to be tried again later,
        once: a second 500 in a row for the same path is an error (EIO, recorded by the
        sync), so that a write the server keeps failing does not take the mount offline
        again and again."""
        parent = path.rpartition(b"/")[0]
        try:
            entry = self._entry(parent)
        except RemoteError as missing:
            if missing.errno in (errno.ENOENT, errno.ENOTDIR):
                return RemoteError(missing.errno, f"{parent!r} is gone")
            return missing
        if not entry.is_dir:
            return RemoteError(errno.ENOTDIR, f"{parent!r} is not a folder")
        if not self._takes_a_file(parent):
            return RemoteError(errno.EACCES, f"the server could not write {path!r} ({exc})")
        with self._lock:
            again = path in self._failed_500
            if again:
                del self._failed_500[path]
            else:
                self._failed_500[path] = None
                while len(self._failed_500) > ETAGS_KEPT:
                    self._failed_500.popitem(last=False)
        if again:
            return RemoteError(errno.EIO, f"the server failed to write {path!r} twice in a row "
                               f"({exc}; its folder is writable)")
        return RemoteUnreachable(f"{self.description}: {exc} (its folder is writable: tried "
                                 "again later)")

    def _takes_a_file(self, folder: bytes) -> bool:
        """Whether the server creates a new empty file in ``folder`` (removed at once)."""
        probe = (folder + b"/" if folder else b"") + b".cachefs-probe-" + os.urandom(6).hex().encode()
        try:
            self._request("PUT", probe, {"If-None-Match": "*"}, b"", ok=(200, 201, 204),
                          answered_500=True)
        except (RemoteError, _Status):
            return False
        self._remove_quietly(probe)
        return True

    def _wrote(self, path: bytes) -> None:
        """A write of ``path`` succeeded: a 500 before it was a passing one."""
        if self._failed_500:
            with self._lock:
                self._failed_500.pop(path, None)

    def _put(self, path: bytes, source: Source, times: tuple[int, int] | None,
             condition: dict[str, str]) -> tuple[httpx.Response, int]:
        """One PUT of ``source``, its size in ``Content-Length`` (a chunked body arrives as
        an empty file on Nextcloud and ownCloud behind PHP-FPM, and the wait for the answer
        is sized to it); opened again and sent once more where httpx found its body used up
        (digest auth with an expired nonce re-sends the request). The answer and the number
        of bytes sent."""
        headers = {"Content-Type": "application/octet-stream", **condition}
        if times is not None:
            headers["X-OC-Mtime"] = str(times[1] // 1_000_000_000)
        for attempt in (1, 2):
            try:
                stream = open_source(source)
            except RemoteError:
                raise
            except OSError as exc:
                raise ContentDamaged(f"the content to upload cannot be read: {exc}") from None
            with stream:
                size = _stream_size(stream)
                if size is not None:
                    headers["Content-Length"] = str(size)
                sent = [0]
                try:
                    response = self._request("PUT", path, headers, _chunks(stream, sent),
                                             answered_500=True,
                                             in_flight=IN_FLIGHT_MAX if size is None else size)
                    self._wrote(path)
                    return response, sent[0]
                except httpx.StreamError:
                    if attempt == 2:
                        raise RemoteError(errno.EIO, f"PUT {path!r}: the request could not be "
                                          "sent again (its body was used up twice)") from None
                    log.debug("%s: PUT sent again with its body read afresh", self.description)
                except RemoteError as exc:
                    if isinstance(exc, _HttpError) and exc.code == 500:
                        raise self._server_500(path, exc) from None
                    raise
        raise AssertionError("not reached")

    def _replace(self, path: bytes, source: Source, times: tuple[int, int] | None,
                 temp_name: bytes, current: _Entry | None) -> UploadOutcome:
        """``path`` replaced by ``source``: a PUT to ``temp_name`` beside it (a name no one
        else writes), its version taken there (the PUT's ETag or a PROPFIND of the temporary
        file: our bytes' version, not whatever a writer may have put at ``path`` since), then
        a MOVE over ``path`` (a rename: atomic; Apache keeps the ETag across it, measured),
        conditional on ``current``, the entry the caller's check saw: its ETag in an ``If``
        header, or ``Overwrite: F`` where nothing was there. A failed condition: ``NotExpected`` with
        what is there now, the temporary file removed.

        A server whose PUT answers gave an ETag (Nextcloud, ownCloud: ``OC-ETag``/``ETag``;
        Apache gives none), learnt from the first temporary PUT, gets a PUT to ``path``
        itself instead (``_put_in_place``): there a MOVE over a file replaces it by another
        (a new file id: shares, versions and comments of the old one lost on every edit)."""
        if current is not None and not current.etag:
            return self._replace_by_date(path, source, times, current)
        if self._put_tells_etag:
            return self._put_in_place(path, source, times, current)
        parent = path.rpartition(b"/")[0]
        temp = parent + b"/" + temp_name if parent else temp_name
        response, sent = self._put(temp, source, times, {})
        if self._put_tells_etag is None:
            self._put_tells_etag = _put_etag(response) is not None
            log.debug("%s: PUT answers %s an ETag", self.description,
                      "give" if self._put_tells_etag else "do not give")
        try:
            landed = self._entry(temp)
            if landed.size != sent:  # (never renamed over the file: remove, try later)
                raise self._short(temp, landed.size, sent)
            ours = landed.stat()
            headers = {"Destination": self._url(path)}
            if current is None:
                headers["Overwrite"] = "F"
            else:
                assert current.etag is not None
                headers.update({"Overwrite": "T", **self._if_tag(path, current.etag)})
            try:
                self._request("MOVE", temp, headers, ok=(201, 204), answered_500=True)
            except RemoteError as exc:
                if isinstance(exc, _HttpError) and exc.code == 500:
                    raise self._server_500(path, exc) from None
                raise
            self._wrote(path)
        except _Status:
            self._remove_quietly(temp)
            now = self._entry_or_none(path)
            return NotExpected(now.stat() if now is not None else None)
        except BaseException:
            self._remove_quietly(temp)
            raise
        return ours

    def _put_in_place(self, path: bytes, source: Source, times: tuple[int, int] | None,
                      current: _Entry | None) -> UploadOutcome:
        """A PUT to ``path`` conditional on ``current`` (its ETag in an ``If`` header;
        ``If-None-Match: *`` where nothing was there), the version that of the PUT's answer
        (its ETag, the bytes sent): the server's own write is atomic and its answer names
        our bytes' version. An answer without an ETag after all: a PROPFIND, and temporary
        names again from then on."""
        if current is None:
            condition = {"If-None-Match": "*"}
        else:
            assert current.etag is not None
            condition = self._if_tag(path, current.etag)
        try:
            response, sent = self._put(path, source, times, condition)
        except _Status:
            now = self._entry_or_none(path)
            return NotExpected(now.stat() if now is not None else None)
        etag = _put_etag(response)
        if etag is None:
            self._put_tells_etag = False
            landed = self._entry(path)
            if landed.size != sent:
                raise self._short(path, landed.size, sent)
            return landed.stat()
        mtime = _http_time_ns(response.headers.get("Last-Modified")) or (
            times[1] // 1_000_000_000 * 1_000_000_000 if times is not None else time.time_ns())
        ours = _make_stat(False, sent, mtime, etag)
        self._remember(path, _Entry(self._href_of(path), False, sent, mtime, etag))
        return ours

    def _replace_by_date(self, path: bytes, source: Source, times: tuple[int, int] | None,
                         current: _Entry) -> UploadOutcome:
        """A server that gives no ETag: a PUT to ``path`` itself, conditional on its mtime
        second (``If-Unmodified-Since``), the version a PROPFIND after it."""
        condition = self._unchanged_since(path, current, "an upload")  # (no ETag: by the date)
        try:
            _response, sent = self._put(path, source, times, condition)
        except _Status:
            now = self._entry_or_none(path)
            return NotExpected(now.stat() if now is not None else None)
        landed = self._entry(path)
        if landed.size != sent:
            raise self._short(path, landed.size, sent)
        return landed.stat()

    def _short(self, path: bytes, kept: int, sent: int) -> RemoteError:
        return RemoteError(errno.EIO, f"PUT {path!r}: the server kept {kept} of the {sent} bytes "
                           "sent (a proxy or server that dropped the body?)")

    def _remove_quietly(self, temp: bytes) -> None:
        try:
            self._send("DELETE", self._url(temp)).close()
        except (RemoteError, RemoteUnreachable):
            pass  # (left behind: the sync removes a temporary file left on its next try)

    def upload(self, path: bytes, source: Source, mode: int, temp_name: bytes,
               times: tuple[int, int] | None = None, owner: tuple[int, int] | None = None) -> RemoteStat:
        """A PUT to ``temp_name``, then a MOVE over ``path`` (see ``_replace``), conditional
        on what a PROPFIND just before found there (a folder: EISDIR, never replaced with
        all it holds): the version returned is that of the bytes sent. A change made in
        between (a save during our PUT) is EEXIST, never tried again over what is there
        now: the caller decided on what it had seen. ``mode`` and ``owner`` are not kept."""
        current = self._entry_or_none(path)
        if current is not None and current.is_dir:
            raise RemoteError(errno.EISDIR, f"{path!r} is a folder")
        outcome = self._replace(path, source, times, temp_name, current)
        if isinstance(outcome, NotExpected):
            raise RemoteError(errno.EEXIST, f"{path!r} changed on the server while it was uploaded")
        assert isinstance(outcome, RemoteStat)
        return outcome

    def upload_many(self, uploads: list[Upload]) -> list[UploadOutcome]:
        """Each upload made only over the version ``expect`` accepted (see ``_replace``: an
        ``If`` on its ETag, or ``Overwrite: F`` where there was nothing); a failed condition
        is ``NotExpected`` with what the server has now. Side by side, ``parallelism`` at a
        time."""
        def one(upload: Upload) -> UploadOutcome:
            try:
                current = self._entry_or_none(upload.path)
                found = current.stat() if current is not None else None
                if not upload.expect(found):
                    return NotExpected(found)
                if current is not None and current.is_dir:  # (a MOVE would replace it all)
                    return RemoteError(errno.EISDIR, f"{upload.path!r} is a folder")
                return self._replace(upload.path, upload.source, upload.times, upload.temp_name,
                                     current)
            except (RemoteError, ContentDamaged) as exc:
                return exc

        return self._side_by_side(one, uploads)

    def mkdir(self, path: bytes, mode: int) -> None:
        try:
            self._request("MKCOL", path, ok=(201,))
        except RemoteError as exc:
            if exc.errno == errno.EOPNOTSUPP:  # 405: something is there already
                raise RemoteError(errno.EEXIST, f"{path!r} exists") from None
            raise

    def _listing(self, path: bytes) -> tuple[_Entry | None, list[_Entry]]:
        """A depth-1 PROPFIND: the folder's own entry (by its href; None: not a folder or
        gone) and its children's."""
        try:
            entries = self._propfind(path, "1")
        except RemoteError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return None, []
            raise
        href = self._href_of(path)
        own = next((e for e in entries if e.href == href), None)
        if own is None:
            if len(entries) == 1:  # (a file: only itself, under whatever href)
                return entries[0], []
            raise self._no_own_entry(path)
        return own, [e for e in entries if e is not own]

    def _no_own_entry(self, path: bytes) -> RemoteError:
        return RemoteError(errno.EIO, f"PROPFIND {path!r}: the server's answer names no entry "
                           f"for the path asked (a proxy that rewrites paths? give the "
                           f"address the server itself uses)")

    def rmdir(self, path: bytes) -> None:
        """DELETE of an empty folder only (a DELETE of a folder removes all it holds): a
        listing first, then a DELETE conditional on the folder's ETag (``If``; adding an
        entry changes it), so that nothing added in between is removed with it."""
        own, children = self._listing(path)
        if own is None:
            raise RemoteError(errno.ENOENT, f"{path!r} is gone")
        if not own.is_dir:
            raise RemoteError(errno.ENOTDIR, f"{path!r} is not a folder")
        if children:
            raise RemoteError(errno.ENOTEMPTY, f"{path!r} is not empty")
        try:
            self._request("DELETE", path, self._unchanged_since(path, own, "removing a folder"), ok=(200, 204))
        except _Status:
            raise RemoteError(errno.ENOTEMPTY, f"{path!r} changed while it was removed") from None

    def unlink(self, path: bytes) -> None:
        """DELETE of a file, conditional on the ETag its check saw: had a folder replaced it
        meanwhile, an unconditional DELETE would remove the folder and all it holds. A
        change meanwhile (an edit just saved) is ESTALE, nothing removed: never checked
        again and removed as it is now."""
        entry = self._entry(path)
        if entry.is_dir:
            raise RemoteError(errno.EISDIR, f"{path!r} is a folder")
        condition = self._if_tag(path, entry.etag) if entry.etag else {}
        try:
            self._request("DELETE", path, condition, ok=(200, 204))
        except _Status:
            raise RemoteError(errno.ESTALE, f"{path!r} changed on the server while it was "
                              "removed") from None

    def _known_etag(self, path: bytes, version: tuple[int, int, int], code: int) -> _Entry:
        """The entry at ``path`` whose version is ``version``, with its ETag as the server
        sent it: the one a stat or listing just saw (no round trip), else a PROPFIND. Any
        other version (or nothing) there: ``RemoteError(code)``."""
        size, tag, kind = version
        with self._lock:
            known = self._etags.get(path)
        if known is not None and tag and _fold(known[0]) == tag and known[1] == (size, kind):
            return _Entry(self._href_of(path), kind == stat_mod.S_IFDIR, size, 0, known[0])
        entry = self._entry_or_none(path)
        if entry is None or entry.stat().version() != version:
            raise RemoteError(code, f"{path!r} is no longer the version seen")
        return entry

    def unlink_if(self, path: bytes, expect: tuple[int, int, int]) -> None:
        """DELETE conditional on the ETag of version ``expect`` (``If``; a 412: ESTALE,
        nothing removed)."""
        entry = self._known_etag(path, expect, errno.ESTALE)
        if entry.is_dir:
            raise RemoteError(errno.EISDIR, f"{path!r} is a folder")
        try:
            self._request("DELETE", path, self._unchanged_since(path, entry, "a removal"), ok=(200, 204))
        except _Status:
            raise RemoteError(errno.ESTALE, f"{path!r} changed on the server") from None
        except RemoteError as exc:
            if exc.errno == errno.ENOENT:
                raise RemoteError(errno.ESTALE, f"{path!r} is gone") from None
            raise

    def _move(self, src: bytes, dst: bytes, overwrite: bool,
              condition: dict[str, str] | None = None) -> None:
        headers = {"Destination": self._url(dst), "Overwrite": "T" if overwrite else "F",
                   **(condition or {})}
        try:
            self._request("MOVE", src, headers, ok=(201, 204), answered_500=True)
            self._wrote(dst)
        except _Status:
            raise RemoteError(errno.EEXIST, f"{dst!r} exists") from None
        except RemoteError as exc:
            # Apache answers a MOVE into a folder that is not there, or that it cannot
            # write, with 500 ("Could not rename resource"), not 409 or 403: an answer
            # about this request, not a server down
            if isinstance(exc, _HttpError) and exc.code == 500:
                raise self._server_500(dst, exc) from None
            raise

    def _check_target(self, src: bytes, dst: bytes) -> tuple[_Entry, _Entry | None]:
        """The POSIX checks of a rename (a MOVE over a folder would remove the folder and all
        it holds): a file over a folder EISDIR, a folder over a file ENOTDIR, over a folder
        with entries ENOTEMPTY. The source's entry and the target's (None: nothing)."""
        source = self._entry(src)
        target, children = self._listing(dst)
        if target is not None:
            if target.is_dir and not source.is_dir:
                raise RemoteError(errno.EISDIR, f"{dst!r} is a folder")
            if source.is_dir and not target.is_dir:
                raise RemoteError(errno.ENOTDIR, f"{dst!r} is not a folder")
            if target.is_dir and children:
                raise RemoteError(errno.ENOTEMPTY, f"{dst!r} is not empty")
        return source, target

    def rename(self, src: bytes, dst: bytes) -> None:
        """MOVE after ``_check_target``'s checks, conditional on the target they saw: its
        ETag (``If``; a folder that got an entry since is not removed, a file rewritten
        since is not overwritten), or ``Overwrite: F`` where nothing was there. A change
        meanwhile is EEXIST, nothing renamed: never checked again and moved over what is
        there now."""
        if src == dst:
            self._entry(src)
            return  # (POSIX: nothing to do; a MOVE onto itself is refused)
        _source, target = self._check_target(src, dst)
        if target is None:
            self._move(src, dst, overwrite=False)
            return
        if target.etag:
            condition: dict[str, str] | None = self._if_tag(dst, target.etag)
        else:
            self._no_etags("a rename over a file")
            condition = None
        self._move(src, dst, overwrite=True, condition=condition)

    def rename_over(self, src: bytes, dst: bytes, replaces: tuple[int, int, int]) -> None:
        """MOVE over ``dst`` conditional on the ETag of version ``replaces`` (``If`` on the
        destination; a 412, or another version there: EEXIST, nothing renamed)."""
        target = self._known_etag(dst, replaces, errno.EEXIST)
        source = self._entry(src)
        if target.is_dir and not source.is_dir:
            raise RemoteError(errno.EISDIR, f"{dst!r} is a folder")
        if source.is_dir and not target.is_dir:
            raise RemoteError(errno.ENOTDIR, f"{dst!r} is not a folder")
        if target.is_dir:
            _own, children = self._listing(dst)
            if children:
                raise RemoteError(errno.ENOTEMPTY, f"{dst!r} is not empty")
        if not target.etag:
            self._no_etags("a rename over a file")
            self._move(src, dst, overwrite=True)
            return
        self._move(src, dst, overwrite=True, condition=self._if_tag(dst, target.etag))

    def rename_noreplace(self, src: bytes, dst: bytes) -> None:
        self._move(src, dst, overwrite=False)

    def symlink(self, target: bytes, path: bytes) -> None:
        raise RemoteError(errno.EPERM, "WebDAV has no symlinks")

    def link(self, src: bytes, dst: bytes) -> None:
        raise RemoteError(errno.EPERM, "WebDAV has no hard links")

    def set_attrs(self, path: bytes, mode: int, atime_ns: int, mtime_ns: int,
                  owner: tuple[int, int] | None = None) -> None:
        """Modes and owners are not kept. The mtime through a PROPPATCH of
        ``getlastmodified`` where the server lets a client set it; the first refusal (Apache:
        409, read-only) stops the asking and times stay in the cache only."""
        if self._times_settable is False:
            return
        date = email.utils.formatdate(mtime_ns // 1_000_000_000, usegmt=True)
        body = ('<?xml version="1.0" encoding="utf-8"?><D:propertyupdate xmlns:D="DAV:"><D:set>'
                f"<D:prop><D:getlastmodified>{date}</D:getlastmodified></D:prop>"
                "</D:set></D:propertyupdate>").encode()
        try:
            response = self._request("PROPPATCH", path, XML_HEADERS, body, ok=(200, 207))
        except RemoteError as exc:
            if exc.errno in (errno.ENOENT, errno.EACCES):
                raise
            self._times_settable = False
            return
        except _Status:
            self._times_settable = False
            return
        settable = b" 200 " in response.content or response.status_code == 200
        if self._times_settable is None:
            log.debug("%s: the server %s getlastmodified", self.description,
                      "sets" if settable else "does not set")
        self._times_settable = settable


class _MeteredStream:
    """A connection of httpcore's (duck-typed: httpcore is httpx's, not imported here)
    whose reads wait as long as the bytes we sent are still moving: while the socket's
    send queue (``pacing.unacknowledged``) shrinks, the wait for an answer goes on, so the
    timeout bounds how long nothing moves, on any uplink (a PUT's body handed to the
    kernel at once sits there for as long as the link takes), not how long an answer
    takes. Nothing moving for the timeout: the inner read's own timeout error."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        sock = self._inner.get_extra_info("socket")
        queued = unacknowledged(sock) if timeout is not None and sock is not None else -1
        if queued > 0:
            assert timeout is not None
            moved = time.monotonic()
            while not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                left = moved + timeout - time.monotonic()
                if left <= 0:
                    timeout = 0.001  # (the inner read times out as it would have)
                    break
                try:
                    readable, _w, _x = select.select([sock], [], [], min(0.5, left))
                except (OSError, ValueError):
                    break
                if readable:
                    break
                now = unacknowledged(sock)
                if 0 <= now < queued:
                    moved = time.monotonic()
                queued = now
        data: bytes = self._inner.read(max_bytes, timeout)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> _MeteredStream:
        return _MeteredStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _MeteredBackend:
    """httpcore's network backend (duck-typed), each TCP connection metered."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def connect_tcp(self, *args: Any, **kwargs: Any) -> _MeteredStream:
        return _MeteredStream(self._inner.connect_tcp(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:  # (connect_unix_socket, sleep)
        return getattr(self._inner, name)


class _NoAuth(httpx.Auth):
    """No credentials: the first PROPFIND learns what the server asks for."""

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        yield request


def _stat_of_get(response: Answer) -> RemoteStat | None:
    """A file's attributes from a GET's answer: its whole size (``Content-Range``'s total
    for a part, ``Content-Length`` for the whole), ``Last-Modified``, ``ETag``; None where
    the answer does not tell the size (a whole file sent in chunks)."""
    size = -1
    total = (response.headers.get("Content-Range") or "").rpartition("/")[2].strip()
    whole = (response.headers.get("Content-Length") or "").strip()
    if total.isdigit():
        size = int(total)
    elif whole.isdigit() and response.status_code == 200:
        size = int(whole)
    if size < 0:
        return None
    return _make_stat(False, size, _http_time_ns(response.headers.get("Last-Modified")),
                      response.headers.get("ETag"))


def _range_of(offset: int, length: int) -> dict[str, str]:
    return {"Range": f"bytes={offset}-{offset + length - 1}"}


def _range_bytes(answer: Answer) -> bytes:
    """The bytes of a ranged GET's answer (none for a 416: the range is past the end)."""
    return b"" if answer.status_code == 416 else answer.body


def _basic(user: str, password: str) -> str:
    """The ``Authorization`` header of basic auth (UTF-8, as httpx's ``BasicAuth``)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode("utf-8")).decode("ascii")


def _unverified() -> ssl.SSLContext:
    """https without a check of the server's certificate (``verify=False``: tests only)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _put_etag(response: httpx.Response) -> str | None:
    """The new file's ETag in a PUT's answer (ownCloud's and Nextcloud's ``OC-ETag``, or
    ``ETag``), None where it gives none (Apache)."""
    return response.headers.get("OC-ETag") or response.headers.get("ETag") or None


def _wants_digest(response: httpx.Response) -> bool:
    offers = [h.split(None, 1)[0].lower() for h in response.headers.get_list("WWW-Authenticate") if h]
    return "digest" in offers and "basic" not in offers


def _errno_of(code: int) -> int:
    if code in (401, 403):
        return errno.EACCES
    if code in (404, 409, 410):
        return errno.ENOENT
    if code == 412:
        return errno.EEXIST
    if code == 405:
        return errno.EOPNOTSUPP
    if code == 423:
        return errno.EBUSY
    if code == 413:
        return errno.EFBIG
    if code == 414:
        return errno.ENAMETOOLONG
    if code == 507:
        return errno.ENOSPC
    return errno.EIO


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        nxt = exc.__cause__ or exc.__context__
        assert nxt is not None
        exc = nxt
    return str(exc) or type(exc).__name__


def _certificate_refused(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


def _stream_size(stream: BinaryIO) -> int | None:
    """The bytes left to read: a stream's ``length`` where it tells it (the sync's checked
    reader of a content file, read from its start), else its file's size past its position."""
    length = getattr(stream, "length", None)
    if isinstance(length, int):
        return length
    try:
        return os.fstat(stream.fileno()).st_size - stream.tell()
    except (OSError, AttributeError, ValueError):
        return None


def _chunks(stream: BinaryIO, sent: list[int]) -> Iterator[bytes]:
    """The stream's bytes (counted in ``sent[0]``); a local read failure stops the PUT (the
    server then drops what it had of the body) as ``ContentDamaged``, not as a fault of the
    server."""
    while True:
        try:
            chunk = stream.read(UPLOAD_CHUNK)
        except RemoteError:
            raise
        except OSError as exc:
            raise ContentDamaged(f"the content to upload cannot be read: {exc}") from None
        if not chunk:
            return
        sent[0] += len(chunk)
        yield chunk
