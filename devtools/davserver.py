"""A real WebDAV server on 127.0.0.1 for tests, the demo and benchmarks: Debian's Apache
httpd with ``mod_dav`` and ``mod_dav_fs``, basic authentication, one share folder.

Owns: one private ``apache2`` (its configuration, password file, lock database, logs
and pid file, all inside ``workdir``) and the process that runs it.
Must not touch: the system's Apache (``/etc/apache2``, ``/var/www``, its service), any
process it did not start (stopped by PID only), the share's files beyond serving them.

Why Apache and not wsgidav (both were measured here, December 2026, Apache 2.4.71 and
wsgidav 4.4.0, against what cachefs needs of a server):

- It is what users run: Apache's ``mod_dav`` is the WebDAV server of most Linux
  distributions, NAS firmwares and hosting panels; wsgidav is a Python library that
  few people serve a share with.
- ETags: Apache's are "size-mtime in microseconds", so a same-size rewrite within the
  same second changes them (measured: a 100-byte in-place rewrite with the mtime kept
  in the same second got a new ETag). wsgidav's are "inode-mtime in whole seconds-size":
  the same rewrite kept its ETag, the very gap ETags are meant to close.
- Atomic PUT: mod_dav_fs writes the body to a temporary file and renames it over the
  target; a reader looping on the file during three slow 32 MiB PUTs saw only the old
  and the new content whole. wsgidav truncates the file and writes in place: the same
  reader saw 120 different sizes (0 bytes, half files).
- Conditions: both honour ``If-Match`` / ``If-None-Match: *`` on PUT (412), and
  ``Overwrite: F`` on MOVE (412). A MOVE's ``If-Match`` applies to its source; the
  condition on its destination is the ``If: <dest> (["etag"])`` header, which Apache
  honours (412, nothing moved) and wsgidav ignored (the target was overwritten).
- Names: Apache stores any byte (a Latin-1 ``lat\\xe9`` PUT gave 201, listed as
  ``lat%e9``); wsgidav answered 500.
- Both serve ranged GETs (206) and PROPFIND depth 1; neither lets a client set
  ``getlastmodified`` (PROPPATCH: Apache 409 "read-only", wsgidav 403). Only wsgidav
  reports RFC 4331 quota properties.
- One caveat of Apache's: an ETag is *weak* (``W/"..."``) while the file's mtime is
  less than a second before the request (Apache's rule: the file might change again
  within the same second), and If-Match never matches a weak tag; the client waits out
  that second before a conditional write (``cachefs.remote.dav``).

Apache will not serve as root: started as root it switches to its ``User``, whose files
the share would then have to be, while the tests write the share as root. So as root the
server is started as nobody (``setpriv``) keeping two capabilities, CAP_DAC_OVERRIDE and
CAP_FOWNER, so that it reads and writes the share's files whoever owns them; the files it
makes are nobody's. (A user namespace, tried first, is refused inside a chroot, e.g.
scripts/fresh-machine-check, and by container runtimes' seccomp filters.) Started by
another user it runs as is.

``stop()`` ends the server and its worker processes (their connections are cut, as when
a server goes away); ``start()`` again serves on the same port.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote_from_bytes

from .devserver import ServerProcess, _free_port, write_private

log = logging.getLogger(__name__)

APACHE = "/usr/sbin/apache2"
MODULES = "/usr/lib/apache2/modules"
SETPRIV = "/usr/bin/setpriv"  # (util-linux)
#: the user id Apache runs as when started by root (nobody's: any but 0 will do), and the
#: capabilities it keeps so as to read and write the share's files whoever owns them
SERVER_UID = 65534
CAPS = "+dac_override,+fowner"
USER = "cachefs"
REALM = "cachefs"


class DavServer(ServerProcess):
    """A throw-away Apache WebDAV server sharing ``share`` to one user (basic auth)."""

    def __init__(self, workdir: Path, share: Path | None = None, port: int = 0,
                 user: str = USER, password: str | None = None, auth: str = "basic",
                 tls: bool = False, nonce_lifetime: int | None = None, ranges: bool = True,
                 keepalive_requests: int = 100, keepalive_timeout: int = 5) -> None:
        """``auth``: "basic" or "digest" (RFC 7616, MD5). ``tls``: serve https with a
        self-signed certificate (``cert``, for ``davs://``; clients must be given it).
        ``nonce_lifetime``: seconds a digest nonce lasts (Apache's default: 300), for
        tests of its expiry. ``ranges=False``: Range headers ignored (``MaxRanges none``:
        every GET answers the whole file, as some servers and proxies do).
        ``keepalive_requests``, ``keepalive_timeout``: how many requests a connection serves
        and how long it may stay idle before Apache ends it (0: no limit); the defaults are
        those of Debian's apache2.conf."""
        if auth not in ("basic", "digest"):
            raise ValueError(f"auth must be basic or digest, not {auth!r}")
        self.auth = auth
        self.tls = tls
        self.nonce_lifetime = nonce_lifetime
        self.ranges = ranges
        self.keepalive_requests = keepalive_requests
        self.keepalive_timeout = keepalive_timeout
        if not os.path.exists(APACHE):
            raise RuntimeError(f"{APACHE} is missing: install the Debian package apache2")
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.share = Path(share).absolute() if share is not None else self.workdir / "share"
        self.share.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or _free_port()
        self.user = user
        self.password = password or secrets.token_urlsafe(12)
        self.password_file = self.workdir / "password"
        self.htpasswd = self.workdir / "htpasswd"
        self.config = self.workdir / "httpd.conf"
        self.pid_file = self.workdir / "httpd.pid"
        self.log_file = self.workdir / "error.log"
        self.cert = self.workdir / "cert.pem"
        self.cert_key = self.workdir / "key.pem"
        self._process: subprocess.Popen[bytes] | None = None
        (self.workdir / "lock").mkdir(exist_ok=True)
        self._write_password()
        if tls and not self.cert.exists():
            self._make_certificate()
        self._write_config()

    # -- setup ----------------------------------------------------------------------
    def _write_password(self) -> None:
        write_private(self.password_file, self.password + "\n")
        # {SHA}: cheap to check on every request (a bcrypt hash would cost each request a
        # few milliseconds of CPU, and the benchmarks measure requests); a test password
        if self.auth == "digest":  # (htdigest's format)
            secret = hashlib.md5(f"{self.user}:{REALM}:{self.password}".encode()).hexdigest()
            line = f"{self.user}:{REALM}:{secret}\n"
        else:
            digest = base64.b64encode(hashlib.sha1(self.password.encode()).digest()).decode()
            line = f"{self.user}:{{SHA}}{digest}\n"
        fd = os.open(self.htpasswd, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(line)

    def _make_certificate(self) -> None:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
             "-subj", f"/CN={self.host}", "-addext", f"subjectAltName=IP:{self.host}",
             "-keyout", str(self.cert_key), "-out", str(self.cert)],
            check=True, stdin=subprocess.DEVNULL, capture_output=True)

    def _write_config(self) -> None:
        modules = ["mpm_event", "authn_core", "authz_core", f"auth_{self.auth}", "authn_file",
                   "authz_user", "dav", "dav_fs"]
        if self.tls:
            modules += ["socache_shmcb", "ssl"]
        lines = [f"ServerRoot {self.workdir}", f"PidFile {self.pid_file}",
                 f"Listen {self.host}:{self.port}", f"ServerName {self.host}",
                 f"ErrorLog {self.log_file}", "LogLevel warn"]
        lines += [f"LoadModule {m}_module {MODULES}/mod_{m}.so" for m in modules]
        lines += [
            "StartServers 1", "ServerLimit 4", "ThreadsPerChild 16", "MaxRequestWorkers 64",
            "MinSpareThreads 4", "MaxSpareThreads 32",
            "KeepAlive On", f"MaxKeepAliveRequests {self.keepalive_requests}",
            f"KeepAliveTimeout {self.keepalive_timeout}",
            f"DavLockDB {self.workdir}/lock/DavLock",
            *(["SSLEngine on", f"SSLCertificateFile {self.cert}",
               f"SSLCertificateKeyFile {self.cert_key}",
               f"SSLSessionCache shmcb:{self.workdir}/ssl_scache(512000)"] if self.tls else []),
            f"DocumentRoot {self.share}",
            f'<Directory "{self.share}">',
            "  Dav On",
            f"  AuthType {self.auth.capitalize()}",
            f"  AuthName {REALM}",
            *(["  AuthDigestDomain /"] if self.auth == "digest" else []),
            *([f"  AuthDigestNonceLifetime {self.nonce_lifetime}"]
              if self.auth == "digest" and self.nonce_lifetime is not None else []),
            *(["  MaxRanges none"] if not self.ranges else []),
            f"  AuthUserFile {self.htpasswd}",
            "  Require valid-user",
            "  Options None",
            "  AllowOverride None",
            "  LimitRequestBody 0",
            "</Directory>",
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        apache = [APACHE, "-f", str(self.config), "-DFOREGROUND"]
        if os.geteuid() != 0:
            return apache
        return [SETPRIV, f"--reuid={SERVER_UID}", f"--regid={SERVER_UID}", "--clear-groups",
                f"--inh-caps={CAPS}", f"--ambient-caps={CAPS}", "--", *apache]

    # -- life cycle (``ServerProcess``) ---------------------------------------------
    name = "apache2"

    def _before_start(self) -> None:
        self.pid_file.unlink(missing_ok=True)

    def _launch(self) -> "subprocess.Popen[bytes]":
        with open(self.log_file, "ab") as log_handle:
            return subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=log_handle,
                                    stderr=log_handle, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"})

    def _after_stop(self) -> None:
        self.pid_file.unlink(missing_ok=True)

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:].strip() or "(no output)"
        except OSError:
            return "(no output)"

    # -- helpers for tests, the demo and benchmarks ----------------------------------
    def url(self, path: str | bytes = "") -> str:
        """The http URL of ``path`` (relative to the share) on this server."""
        raw = os.fsencode(path).lstrip(b"/")
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}/" + quote_from_bytes(raw, safe="/")

    def address(self, path: str | bytes = "") -> str:
        """The cachefs address of ``path`` in the share: dav://USER@127.0.0.1:PORT/path."""
        raw = os.fsencode(path).lstrip(b"/")
        scheme = "davs" if self.tls else "dav"
        return f"{scheme}://{self.user}@{self.host}:{self.port}/" + quote_from_bytes(raw, safe="/")

    def mount_args(self) -> list[str]:
        """The cachefs options a mount of this server needs."""
        return ["--password-file", str(self.password_file)]

    def remove(self) -> None:
        """Stop, and remove ``workdir`` (the share too, when it lies inside)."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
