"""The WebDAV backend: a folder on a WebDAV server (``dav://`` over http, ``davs://`` over
https, the GNOME convention), reached with ``httpx``.

Owns: mapping the ``Remote`` contract onto WebDAV requests (PROPFIND, GET with ranges,
PUT, MKCOL, DELETE, MOVE, PROPPATCH), the login (a password from ``options.secrets`` or
``~/.netrc``; basic auth, digest when the server asks for it), and the HTTP status →
``RemoteError`` / ``RemoteUnreachable`` / ``RemoteRefused`` translation.
Must not touch: the cache, LMDB, trio, FUSE.

Versions are ETags: ``RemoteStat.tag`` folds the server's ETag (``fold_tag``; a weak
``W/`` mark is dropped, so that a tag does not change when it turns strong), and
``upload_many`` makes each write conditional on the very ETag its ``expect`` was shown
(``If-Match``; ``If-None-Match: *`` where nothing was there): a change made on the
server between the check and the write fails the PUT with 412 and nothing is
overwritten, whatever size and mtime the change kept. Apache marks an ETag weak while
the file's mtime is less than a second old, and If-Match never matches a weak tag: a
conditional write first waits that second out (``_strong_stat``).

Uploads are one PUT to the target itself, not a PUT to a temporary name then a MOVE:
the servers this was measured on store a PUT's body aside and rename it into place
(Apache's mod_dav_fs; Nextcloud and ownCloud write ``.part`` files), so a reader never
sees half a file and a cut transfer leaves the old content, and the condition then sits
on the request that replaces the file (a MOVE's ``If-Match`` tests its source; the
``If: <dest>`` header that tests its destination was ignored by wsgidav, which
overwrote). The ``X-OC-Mtime`` header asks Nextcloud and ownCloud to keep the file's
mtime; Apache ignores it and lets no client set ``getlastmodified`` (PROPPATCH: 409
read-only), so there times stay in the cache only (``set_attrs`` tries once, then
stops asking). Modes and owners are not kept; symlinks and hard links do not exist
(EPERM).

Names: any byte, percent-encoded in URLs; names in listings are decoded from the hrefs
back to bytes (a server storing non-UTF-8 names, as Apache does, gives them back as
they were).
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import errno
import getpass
import logging
import netrc
import os
import ssl
import stat as stat_mod
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, BinaryIO, TypeVar
from urllib.parse import quote_from_bytes, unquote_to_bytes, urlsplit

import httpx

from ..errors import ContentDamaged
from .base import (Capabilities, NotExpected, Remote, RemoteError, RemoteRefused, RemoteStat,
                   RemoteUnreachable, Source, SpaceInfo, Upload, UploadOutcome, fold_tag,
                   open_source)

if TYPE_CHECKING:
    from ..address import RemoteAddress
    from .options import ConnectOptions
    from .pacing import Pacer
    from .ssh_secrets import Secrets

log = logging.getLogger(__name__)
# httpx logs every request's URL at INFO, and httpcore every step at DEBUG: file names in
# a log that must name none without --verbose (an encrypted cache), and noise with it
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)

T = TypeVar("T")

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
UPLOAD_CHUNK = 1 << 20
#: how long a conditional write waits for a weak ETag (a file changed less than a second
#: ago, on Apache) to turn strong
WEAK_WAIT = 2.5
#: the temporary files Apache's mod_dav_fs writes a PUT's body to, beside the target
SERVER_TEMP_PREFIX = b".davfs.tmp"
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
    tag = fold_tag(_strip_weak(etag).encode("utf-8", "surrogateescape")) if etag else 0
    return RemoteStat(mode=DIR_MODE if is_dir else FILE_MODE, size=0 if is_dir else size,
                      mtime_ns=mtime_ns, atime_ns=mtime_ns, nlink=2 if is_dir else 1, tag=tag)


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


class DavRemote(Remote):
    """A folder on a WebDAV server. Thread-safe: one ``httpx.Client`` (a pool of
    keep-alive connections) shared by every thread; the login is made once, under a lock."""

    capabilities = Capabilities(symlinks=False, hard_links=False, atomic_replace=True,
                                xattrs=False, modes=False, owners=False, notify=False,
                                strong_versions=True)

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
        root = os.fsencode(path or "/")
        self._root = b"/" + root.strip(b"/") if root.strip(b"/") else b""
        host_text = f"[{host}]" if ":" in host else host
        self._origin = f"{'https' if scheme == 'davs' else 'http'}://{host_text}:{self.port}"
        self.description = (f"{scheme}://{self.user}@{host_text}:{self.port}"
                            f"{quote_from_bytes(self._root or b'/', safe='/')}")
        self._client: httpx.Client | None = None
        self._auth: httpx.Auth | None = None
        self._logged_in = False
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._times_settable: bool | None = None  # PROPPATCH getlastmodified: unknown yet

    # -- plumbing -------------------------------------------------------------------
    def _url(self, path: bytes) -> str:
        if path.startswith(b"/") or b"\0" in path:
            raise RemoteError(errno.EINVAL, f"not a share-relative path: {path!r}")
        full = self._root + b"/" + path if path else (self._root or b"/")
        return self._origin + quote_from_bytes(full, safe="/")

    def _client_now(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(
                    timeout=httpx.Timeout(self.timeout, pool=self.timeout * 3),
                    limits=httpx.Limits(max_connections=self.parallelism * 4,
                                        max_keepalive_connections=self.parallelism * 2,
                                        keepalive_expiry=30),
                    verify=self._ssl_context(), follow_redirects=False, trust_env=False,
                    headers={"User-Agent": "cachefs"})
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
              stream: bool = False, answered_500: bool = False) -> httpx.Response:
        """One request; transport failures and 5xx (but 507; and 500 where
        ``answered_500``: an answer about the request) → ``RemoteUnreachable``."""
        client = self._client_now()
        try:
            request = client.build_request(method, url, headers=headers, content=content)
            response = client.send(request, auth=auth or self._auth or httpx.USE_CLIENT_DEFAULT,
                                   stream=stream)
        except httpx.TimeoutException:
            raise RemoteUnreachable(f"{self.description}: no answer within {self.timeout:g} s") from None
        except httpx.TransportError as exc:
            if _certificate_refused(exc):
                raise RemoteRefused(f"{self.description}: the server's certificate is not trusted "
                                    f"({_root_cause(exc)})") from None
            raise RemoteUnreachable(f"{self.description}: {_root_cause(exc)}") from None
        if response.status_code >= 500 and response.status_code != 507 and not (
                answered_500 and response.status_code == 500):
            response.close()
            raise RemoteUnreachable(f"{self.description}: the server answered {response.status_code} "
                                    f"{response.reason_phrase} to {method}")
        return response

    def _request(self, method: str, path: bytes, headers: dict[str, str] | None = None,
                 content: bytes | Iterator[bytes] | None = None, ok: tuple[int, ...] = (200, 201, 204, 207),
                 stream: bool = False, answered_500: bool = False) -> httpx.Response:
        """A request on ``path`` once logged in; an answer not in ``ok`` raised as the
        ``RemoteError`` it means (412 as ``_Status``, for the callers that expect it)."""
        self._ensure_login()
        response = self._send(method, self._url(path), headers, content, stream=stream,
                              answered_500=answered_500)
        if response.status_code in ok:
            return response
        if stream:
            response.read()
        code = response.status_code
        if code == 412:
            raise _Status(code)
        raise RemoteError(_errno_of(code), f"{method} {path!r}: {code} {response.reason_phrase}")

    # -- login ----------------------------------------------------------------------
    def _netrc_entry(self) -> tuple[str | None, str] | None:
        try:
            found = netrc.netrc(self._netrc_file).authenticators(self.host)
        except (OSError, netrc.NetrcParseError) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("cannot read %s: %s", self._netrc_file or "~/.netrc", exc)
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
        """Log in (trying each candidate password) and check the share root is a folder."""
        with self._login_lock:
            if self._logged_in:
                return
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
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if client is not None:
            client.close()

    def _threads(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.parallelism, thread_name_prefix="cachefs-dav")
            return self._pool

    # -- reading --------------------------------------------------------------------
    def _propfind(self, path: bytes, depth: str) -> list[_Entry]:
        response = self._request("PROPFIND", path, {"Depth": depth, **XML_HEADERS}, PROPFIND_BODY,
                                 ok=(207,))
        return _parse_multistatus(response.content)

    def _entry(self, path: bytes) -> _Entry:
        entries = self._propfind(path, "0")
        if not entries:
            raise RemoteError(errno.EIO, f"PROPFIND {path!r}: an empty answer")
        return entries[0]

    def stat(self, path: bytes) -> RemoteStat:
        return self._entry(path).stat()

    def listdir(self, path: bytes) -> list[tuple[bytes, RemoteStat]]:
        entries = self._propfind(path, "1")
        folder = unquote_to_bytes(urlsplit(self._url(path)).path).rstrip(b"/") or b"/"
        out: list[tuple[bytes, RemoteStat]] = []
        own: _Entry | None = None
        for entry in entries:
            if entry.href == folder:
                own = entry
                continue
            parent, _, name = entry.href.rpartition(b"/")
            if (parent or b"/") != folder or not name or name.startswith(SERVER_TEMP_PREFIX):
                continue
            out.append((name, entry.stat()))
        if own is not None and not own.is_dir:
            raise RemoteError(errno.ENOTDIR, f"{path!r} is not a folder")
        return out

    def listdir_many(self, paths: list[bytes]) -> list[list[tuple[bytes, RemoteStat]] | RemoteError]:
        """Several PROPFINDs side by side (``parallelism`` at a time)."""
        def one(path: bytes) -> list[tuple[bytes, RemoteStat]] | RemoteError:
            try:
                return self.listdir(path)
            except RemoteError as exc:
                return exc

        if len(paths) <= 1:
            return [one(p) for p in paths]
        return list(self._threads().map(one, paths))

    def readlink(self, path: bytes) -> bytes:
        raise RemoteError(errno.EINVAL, "WebDAV has no symlinks")

    def _get_range(self, path: bytes, offset: int, length: int,
                   if_match: str | None = None) -> tuple[bytes, httpx.Response]:
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        if if_match:
            headers["If-Match"] = if_match
        response = self._request("GET", path, headers, ok=(200, 206, 416))
        if response.status_code == 416:
            return b"", response
        data = response.content
        if response.status_code == 200:  # the server sent it all: take our part
            data = data[offset:offset + length]
        return data, response

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
        """The version is the one the GETs were bound to (their ETag, strong: every piece
        after the first asked ``If-Match`` it), so no PROPFIND follows; where the server
        gave a weak ETag, or the file changed midway, a PROPFIND after the reads."""
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
        as_read = _stat_of_get(response) if strong else None
        if len(data) < first or length == first:
            return len(data), as_read, False
        # the rest side by side, each bound to the version the first piece came from
        pieces = [(pos, min(READ_PIECE, offset + length - pos))
                  for pos in range(offset + first, offset + length, READ_PIECE)]
        futures = [self._threads().submit(self._get_range, path, pos, size, strong)
                   for pos, size in pieces]
        total = len(data)
        short = False
        try:
            for (pos, size), future in zip(pieces, futures):
                try:
                    piece, _ = future.result()
                except _Status:
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
        """Small files whole, side by side: each GET's headers (ETag, Last-Modified,
        length) give its attributes, so no PROPFIND is needed."""
        def one(path: bytes) -> tuple[bytes, RemoteStat] | RemoteError:
            try:
                response = self._request("GET", path)
            except RemoteError as exc:
                return exc
            except _Status as exc:
                return RemoteError(_errno_of(exc.code), f"GET {path!r}: {exc.code}")
            return response.content, _stat_of_get(response)

        if len(items) <= 1:
            return [one(path) for path, _ in items]
        return list(self._threads().map(one, [path for path, _ in items]))

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
    def _strong_entry(self, path: bytes) -> _Entry | None:
        """The entry at ``path`` (None: nothing there) with a strong ETag: a weak one (a file
        changed less than a second ago, on Apache) is asked again until it turns strong,
        for a condition on it can only be strong."""
        deadline = time.monotonic() + WEAK_WAIT
        while True:
            try:
                entry = self._entry(path)
            except RemoteError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    return None
                raise
            if not (entry.etag or "").startswith("W/") or time.monotonic() > deadline:
                return entry
            time.sleep(0.25)

    def _put(self, path: bytes, source: Source, times: tuple[int, int] | None,
             condition: dict[str, str]) -> None:
        headers = {"Content-Type": "application/octet-stream", **condition}
        if times is not None:
            headers["X-OC-Mtime"] = str(times[1] // 1_000_000_000)
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
            self._request("PUT", path, headers, _chunks(stream))

    def upload(self, path: bytes, source: Source, mode: int, temp_name: bytes,
               times: tuple[int, int] | None = None, owner: tuple[int, int] | None = None) -> RemoteStat:
        """One PUT (the server writes the body aside and renames it into place; see the
        module's docstring): ``temp_name``, ``mode`` and ``owner`` are not used."""
        try:
            self._put(path, source, times, {})
        except _Status as exc:
            raise RemoteError(errno.EIO, f"PUT {path!r}: {exc.code}") from None
        return self.stat(path)

    def upload_many(self, uploads: list[Upload]) -> list[UploadOutcome]:
        """Each upload a PUT conditional on the ETag ``expect`` accepted (``If-Match``), or
        on there being nothing (``If-None-Match: *``); a 412 is ``NotExpected`` with what
        the server has now. Side by side, ``parallelism`` at a time."""
        def one(upload: Upload) -> UploadOutcome:
            try:
                current = self._strong_entry(upload.path)
                found = current.stat() if current is not None else None
                if not upload.expect(found):
                    return NotExpected(found)
                if current is None:
                    condition = {"If-None-Match": "*"}
                elif current.etag and not current.etag.startswith("W/"):
                    condition = {"If-Match": current.etag}
                else:  # (a server without strong ETags: the mtime second is all there is)
                    condition = {"If-Unmodified-Since": email.utils.formatdate(
                        current.mtime_ns // 1_000_000_000, usegmt=True)}
                try:
                    self._put(upload.path, upload.source, upload.times, condition)
                except _Status:
                    now = self._strong_entry(upload.path)
                    return NotExpected(now.stat() if now is not None else None)
                return self.stat(upload.path)
            except (RemoteError, ContentDamaged) as exc:
                return exc

        if len(uploads) <= 1:
            return [one(u) for u in uploads]
        return list(self._threads().map(one, uploads))

    def mkdir(self, path: bytes, mode: int) -> None:
        try:
            self._request("MKCOL", path, ok=(201,))
        except RemoteError as exc:
            if exc.errno == errno.EOPNOTSUPP:  # 405: something is there already
                raise RemoteError(errno.EEXIST, f"{path!r} exists") from None
            raise

    def rmdir(self, path: bytes) -> None:
        """DELETE of an empty folder only (a DELETE of a folder removes all it holds): a
        listing first, then a DELETE conditional on the folder's ETag, so that nothing
        added in between is removed with it."""
        deadline = time.monotonic() + WEAK_WAIT
        while True:
            entries = self._propfind(path, "1")
            folder = unquote_to_bytes(urlsplit(self._url(path)).path).rstrip(b"/") or b"/"
            own = next((e for e in entries if e.href == folder), None)
            if own is None:
                raise RemoteError(errno.ENOENT, f"{path!r} is gone")
            if not own.is_dir:
                raise RemoteError(errno.ENOTDIR, f"{path!r} is not a folder")
            if len(entries) > 1:
                raise RemoteError(errno.ENOTEMPTY, f"{path!r} is not empty")
            if not (own.etag or "").startswith("W/") or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        condition = {"If-Match": own.etag} if own.etag and not own.etag.startswith("W/") else {}
        try:
            self._request("DELETE", path, condition, ok=(200, 204))
        except _Status:
            raise RemoteError(errno.ENOTEMPTY, f"{path!r} changed while it was removed") from None

    def unlink(self, path: bytes) -> None:
        if self._entry(path).is_dir:  # (a DELETE would remove the folder and all it holds)
            raise RemoteError(errno.EISDIR, f"{path!r} is a folder")
        self._request("DELETE", path, ok=(200, 204))

    def _move(self, src: bytes, dst: bytes, overwrite: bool) -> None:
        headers = {"Destination": self._url(dst), "Overwrite": "T" if overwrite else "F"}
        try:
            self._request("MOVE", src, headers, ok=(201, 204), answered_500=True)
        except _Status:
            raise RemoteError(errno.EEXIST, f"{dst!r} exists") from None
        except RemoteError as exc:
            # Apache answers a MOVE into a folder that is not there with 500 ("Could not
            # rename resource"), not 409: an answer about this request, not a server down
            parent = dst.rpartition(b"/")[0]
            if exc.errno == errno.EIO and parent:
                try:
                    if not self._entry(parent).is_dir:
                        raise RemoteError(errno.ENOTDIR, f"{parent!r} is not a folder") from None
                except RemoteError as missing:
                    if missing.errno == errno.ENOENT:
                        raise RemoteError(errno.ENOENT, f"{parent!r} is gone") from None
                    raise
            raise

    def rename(self, src: bytes, dst: bytes) -> None:
        """MOVE with Overwrite: T, after the checks POSIX makes (a MOVE over a folder would
        remove the folder and all it holds): a file over a folder EISDIR, a folder over a
        file ENOTDIR, over a folder with entries ENOTEMPTY."""
        source = self._entry(src)
        if src == dst:
            return  # (POSIX: nothing to do; a MOVE onto itself is refused)
        try:
            entries = self._propfind(dst, "1")
        except RemoteError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
            entries = []
        if entries:
            target = entries[0]
            if target.is_dir and not source.is_dir:
                raise RemoteError(errno.EISDIR, f"{dst!r} is a folder")
            if source.is_dir and not target.is_dir:
                raise RemoteError(errno.ENOTDIR, f"{dst!r} is not a folder")
            if target.is_dir and len(entries) > 1:
                raise RemoteError(errno.ENOTEMPTY, f"{dst!r} is not empty")
        self._move(src, dst, overwrite=True)

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


class _NoAuth(httpx.Auth):
    """No credentials: the first PROPFIND learns what the server asks for."""

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        yield request


def _stat_of_get(response: httpx.Response) -> RemoteStat:
    """A file's attributes from a GET's answer: its whole size (``Content-Range``'s total
    for a part), ``Last-Modified``, ``ETag``."""
    size = -1
    total = response.headers.get("Content-Range", "").rpartition("/")[2].strip()
    if total.isdigit():
        size = int(total)
    elif response.status_code == 200:
        size = len(response.content)
    return _make_stat(False, max(size, 0), _http_time_ns(response.headers.get("Last-Modified")),
                      response.headers.get("ETag"))


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
    try:
        return os.fstat(stream.fileno()).st_size - stream.tell()
    except (OSError, AttributeError, ValueError):
        return None


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    """The stream's bytes; a local read failure stops the PUT (the server then drops
    what it had of the body) as ``ContentDamaged``, not as a fault of the server."""
    while True:
        try:
            chunk = stream.read(UPLOAD_CHUNK)
        except RemoteError:
            raise
        except OSError as exc:
            raise ContentDamaged(f"the content to upload cannot be read: {exc}") from None
        if not chunk:
            return
        yield chunk
