"""Running a mount: open the cache, reach the remote, mount, serve, tear down.

Owns: the order of start-up and teardown, daemonizing (the parent exits 0 once the mount
is up, or non-zero with the reason), signals, and logging set-up.
Must not touch: request handling (``cachefs.fs``) or remote protocol details.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import fcntl
import logging
import logging.handlers
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import lmdb
import pyfuse3
import trio

from .address import RemoteAddress
from .cache.cache import Cache, CacheConfig, is_index_error
from .cache.hoard import Hoard
from .store.crypto import RecordError
from .store.index import Store, StoreError, index_damaged
from .control import Control
from .fs import KernelNotifier, Operations
from .mounts import (DEFAULT_READAHEAD, DEFAULT_REQUEST_SPIN, LIVE, PROBE_TIMEOUT, STALE, STUCK,
                     mount_type_at, note_unmounted, probe, set_readahead, stale_message, stuck_message)
from .redact import Redactor
from .errors import CommandError, RemoteRefused, RemoteUnreachable, SyncFailed
from .remote import ConnectOptions, handler_for, log_in_ahead, open_remote
from .cache.transfer import FetchPool, Transfers
from .link.connectivity import Connectivity
from .link.netevents import NetworkEvents
from .link.wakeup import Wakeup
from .defaults import DEFAULT_CACHE_SIZE, DEFAULT_WRITEBACK_HOLD
from .sync.manager import SyncManager
from .sync.naming import client_tag, conflict_name
from .notify import BusSender, Notices, session_bus_address
from .owners import Owners

log = logging.getLogger(__name__)


class MountError(Exception):
    """The mount cannot start; the message tells the user why and what to do."""


@dataclass
class MountConfig:
    address: RemoteAddress
    mountpoint: Path
    cache_dir: Path
    connect: ConnectOptions
    foreground: bool = False
    verbose: bool = False
    attr_timeout: float = 3.0
    heartbeat: float = 10.0
    cache_size: int = DEFAULT_CACHE_SIZE
    sync_interval: float = 300.0
    sync_at_mount: bool = False  # a full pass once the mount is up (online)
    sync_at_unmount: float = 30.0  # how long an unmount replays pending changes (0: not at all)
    sync_idle: float | None = None  # a full pass after this long without an open
    pins: list[str] = field(default_factory=list)  # pinned once the mount is up
    write_back_hold: float = DEFAULT_WRITEBACK_HOLD
    readahead: int = DEFAULT_READAHEAD
    passthrough: bool = True  # FUSE passthrough for whole cached files, where it works
    callbacks: str = "auto"  # the server's watcher (cache.callbacks)
    request_spin: float = DEFAULT_REQUEST_SPIN  # µs the FUSE loop reads on before sleeping
    notify: bool = True  # desktop notifications, where a session bus exists (cachefs.notify)
    show_cachefs: bool = False  # .cachefs listed in the root's readdir (reachable by name always)
    fuse_options: list[str] = field(default_factory=list)
    cache_key: bytes | None = field(default=None, repr=False)  # never logged
    nonempty: bool = False  # mount over a folder that has files (hidden while mounted)
    #: whose files the mount shows (--owners, --uid-map, --gid-map); None: local
    owners: Owners | None = None
    #: the cache directory did not exist before this mount: a mount that fails before it
    #: serves removes it (``caches.discard_new``), never one that existed before
    new_cache: bool = False


def setup_logging(verbose: bool, logfile: Path | None, redact: bool = False,
                  known: tuple[str, ...] = ()) -> None:
    """Log to ``logfile`` (a detached mount's ``CACHE_DIR/mount.log``) or to stderr.
    ``redact`` (an encrypted cache without ``--verbose``) puts ``redact.Redactor`` on the
    handler: no line then names a file, a folder or the remote, whichever module logs it;
    ``known`` are texts it also takes out of message templates (``_known_texts``)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if logfile is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.handlers.RotatingFileHandler(logfile, maxBytes=4 << 20, backupCount=2)
        os.chmod(logfile, 0o600)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if redact:
        handler.addFilter(Redactor(known))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("paramiko").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("paramiko.transport").addFilter(_expected_disconnects)
    logging.getLogger("pyfuse3").addFilter(_late_replies)


def _late_replies(record: logging.LogRecord) -> bool:
    """pyfuse3 logs an ERROR when the kernel refuses a reply with ENOENT: the kernel no
    longer waits for that request (the program was interrupted, or the mount is going
    away: a RELEASE answered just after `fusermount -u`, seen in a test that unmounted
    right after a read). Nothing was lost; it is told at DEBUG."""
    if (record.levelno >= logging.ERROR and "fuse_reply_* failed" in str(record.msg)
            and any("No such file or directory" in str(arg) for arg in (record.args or ()))):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)
    return True


class _ExpectedDisconnects(logging.Filter):
    """paramiko logs a dropped connection, or one the server closed while it was being
    made (a server going down), as an ERROR, the latter followed by its traceback line by
    line; for cachefs that is an outage it handles (offline, then the probe), so it is told
    as one warning, without the traceback."""

    OUTAGES = ("Socket exception", "EOF in transport",
               "Exception (client): Error reading SSH protocol banner")

    def __init__(self) -> None:
        super().__init__()
        self._thread = threading.local()  # one transport thread's lines come in a row

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            self._thread.after_outage = False
            return True
        if str(record.msg).startswith(self.OUTAGES):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            self._thread.after_outage = True
            return True
        # the traceback that follows says nothing the message did not
        return not getattr(self._thread, "after_outage", False)


_expected_disconnects = _ExpectedDisconnects()


def check_mountpoint(path: Path, nonempty: bool = False) -> None:
    # mountinfo first: a stat of a stale mount point fails (ENOTCONN), of a stuck one hangs.
    kind = mount_type_at(path)
    if kind is None:  # named through a symbolic link? (the parent is resolved, not the point)
        kind = mount_type_at(Path(os.path.realpath(path.parent)) / path.name)
    if kind is not None:
        state, status = probe(path) if kind.startswith("fuse") else (None, None)
        if state == STALE:
            raise MountError(stale_message(path, kind))
        if state == STUCK:
            raise MountError(stuck_message(path, PROBE_TIMEOUT))
        if state == LIVE and status is not None:
            raise MountError(f"{path} is already a cachefs mount (of {status.get('remote')}, "
                             f"process {status.get('pid')}); 'cachefs unmount {path}' first")
        raise MountError(f"{path} is already a mount point ({kind}); unmount it first or "
                         "choose another mount point")
    try:
        is_dir = path.is_dir()
    except OSError as exc:
        raise MountError(f"mount point {path}: {exc.strerror}") from None
    if not is_dir:
        raise MountError(f"mount point {path} is not a directory")
    if not nonempty:
        _check_empty(path)


def _check_empty(path: Path) -> None:
    """Refuse a mount point that holds files: the mount would hide them (sshfs and
    libfuse 2 refuse it too; libfuse 3 no longer checks)."""
    try:
        with os.scandir(path) as entries:
            names = [entry.name for entry, _ in zip(entries, range(3))]
    except OSError as exc:
        raise MountError(f"mount point {path}: {exc.strerror}") from None
    if names:
        shown = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
        raise MountError(f"mount point {path} is not empty ({shown}): the mount would hide "
                         "its files; choose an empty folder, or add --nonempty (-o nonempty) "
                         "to mount over them")


#: the source of an encrypted cache's mount (without --verbose): no name of the remote
SEALED_SOURCE = "cachefs"


def fuse_options(config: MountConfig, source: str) -> set[str]:
    """The options given to libfuse: ``default_permissions``, ``source`` (the remote as
    ``cachefs status`` names it) as the source that findmnt, df and mount show
    (``fsname``, unless ``-o fsname=`` names another; ``cachefs`` for an encrypted cache
    without ``--verbose``: every local user reads /proc/*/mountinfo, and such a cache
    names neither the remote's host, user nor path in its log either),
    ``subtype=cachefs`` (type ``fuse.cachefs``, unless ``-o subtype=``), and the
    FUSE options given with ``-o``."""
    opts = set(pyfuse3.default_options)  # default_permissions
    given = [opt for text in config.fuse_options for opt in text.split(",") if opt]
    if config.cache_key is not None and not config.verbose:
        source = SEALED_SOURCE
    if not any(opt.startswith("fsname=") for opt in given):
        opts.add("fsname=" + fuse_escape(ascii_source(source)))
    if not any(opt.startswith("subtype=") for opt in given):
        opts.add("subtype=cachefs")
    opts.update(given)
    return opts


def ascii_source(text: str) -> str:
    """The mount's source as the kernel shows it, in ASCII (pyfuse3 hands options over
    as ASCII): other bytes of a path are percent-encoded, as in a URL."""
    if text.isascii():
        return text
    return quote_from_bytes(os.fsencode(text), safe="/~!$&'()*+,;=:@-._ ")


def fuse_escape(value: str) -> str:
    """A value for one libfuse ``-o`` option: its commas and backslashes escaped."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def set_request_spin(microseconds: float) -> None:
    """Have pyfuse3 keep reading the FUSE device for ``microseconds`` after each request
    before it sleeps until the next one (where this pyfuse3 can; the log says which).

    A program that waits for each reply (creates, stats, opens one after another, as git,
    tar or a build do) sends its next request a few microseconds after the last reply.
    Asleep by then, this process must be woken, and on this project's machine the two
    wake-ups of a round trip cost more than the request's own work: a socket ping-pong
    between two processes takes 47-60 us, a getattr through a do-nothing pyfuse3
    filesystem 51-71 us, and 19-24 us when that filesystem reads on for 50 us
    (bench/fuse_floor.py). The spin costs CPU only while requests keep coming. Measured
    again on its own for issue 20 (cachefs mounts, 0 vs 50 alternating, medians of 7):
    warm small-file reads 2.3x, creates 1.5x, git init+add+commit+status 1.25x as fast.
    Added by its own patch, scripts/pyfuse3-request-spin.patch.
    """
    setter = getattr(pyfuse3, "set_request_spin", None)
    if setter is None:
        if microseconds:
            log.info("request spin: off (this pyfuse3 cannot; see scripts/build-passthrough)")
        return
    setter(microseconds)
    if microseconds:
        log.info("request spin: %g us (reading on for the next request before sleeping)", microseconds)
    else:
        log.info("request spin: off (--request-spin 0)")


async def _readahead_after_init(ops: Operations, config: MountConfig) -> None:
    # The kernel caps the readahead when it gets the reply to FUSE_INIT: set it after.
    await ops.initialized.wait()
    set_readahead(config.mountpoint, config.readahead)


def run(config: MountConfig) -> int:
    """Mount and serve until unmounted. Returns the process exit status. A new cache
    (``config.new_cache``) of a mount that fails, or is interrupted (Ctrl-C), before it
    serves is removed; once the mount has served, its cache is kept whatever comes after
    (a Ctrl-C during the teardown, an error)."""
    serving = _Serving()
    try:
        return _run(config, serving)
    except BaseException:
        if not serving.served:
            _discard_new_cache(config)
        raise


@dataclass
class _Serving:
    """Whether this process's mount has served (FUSE mounted, the start told "ok"): from
    then on its cache is no new one to remove (``_discard_new_cache``)."""

    served: bool = False


def _discard_new_cache(config: MountConfig) -> None:
    """Remove the cache directory this mount made, if it made it (never one that
    existed before; ``caches.discard_new`` keeps one that a mount holds or that holds
    changes)."""
    if config.new_cache:
        from .caches import discard_new
        discard_new(config.cache_dir)


def _run(config: MountConfig, serving: _Serving) -> int:
    check_mountpoint(config.mountpoint, config.nonempty)
    # Before a password is asked for (and before forking: the error goes to the user, not
    # a log); the store takes the lock itself once the mount serves.
    check_cache_free(config.cache_dir)
    log_in_once(config)
    encrypted = config.cache_key is not None
    redact = encrypted and not config.verbose
    if config.foreground:
        setup_logging(config.verbose, None, redact, _known_texts(config))
        if encrypted and config.verbose:
            log.warning("%s", _verbose_warning("stderr"))
        return _serve(config, None, serving)
    if encrypted and config.verbose:
        print(f"cachefs: warning: {_verbose_warning(str(config.cache_dir / 'mount.log'))}", file=sys.stderr)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:  # the parent reports the outcome and leaves
        os.close(write_fd)
        # One message (written in one go, so it arrives whole); not "until EOF": the
        # daemon's fetch processes may hold the pipe open too.
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            message = pipe.read(4096).decode(errors="replace")
        if message.startswith("ok"):
            return 0
        if not message:
            _, status = os.waitpid(pid, 0)
            message = f"mount process ended unexpectedly (status {status})"
            _discard_new_cache(config)  # (what it made, if nothing holds it)
        print(f"cachefs: {message.strip()}", file=sys.stderr)
        return 1
    os.close(read_fd)
    os.setsid()
    try:
        config.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        setup_logging(config.verbose, config.cache_dir / "mount.log", redact, _known_texts(config))
        if encrypted and config.verbose:
            log.warning("%s", _verbose_warning("this log"))
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.chdir("/")
    except OSError as exc:
        _discard_new_cache(config)
        os.write(write_fd, f"cannot start: {exc}".encode())
        os._exit(1)
    status = _serve(config, write_fd, serving)
    os._exit(status)


def log_in_once(config: MountConfig) -> None:
    """Where a password, a key's passphrase or a keyboard-interactive answer can be asked
    for (a terminal, or askpass), log in once now, before detaching and before the
    transfer processes are forked: what is typed is remembered in memory (``Secrets``)
    and every later connection, theirs included, logs in with it without asking again.
    A refusal ends the mount here; an unreachable server is the mount's to judge."""
    secrets = config.connect.secrets
    if secrets is None or config.address.scheme == "file":
        return
    with secrets.asking() as can_ask:
        if not can_ask:
            return  # nothing to ask with: the mount logs in with what was given
        try:
            log_in_ahead(config.address, config.connect)
        except RemoteRefused as exc:
            raise MountError(str(exc)) from None
        except RemoteUnreachable as exc:
            log.debug("login ahead: %s", exc)


def _known_texts(config: MountConfig) -> tuple[str, ...]:
    """What names this mount's remote and places, for the redacting filter."""
    address = config.address
    share = address.path.rstrip("/")
    return tuple(t for t in (address.display(), address.host, share, str(config.mountpoint),
                             str(config.cache_dir)) if t)


def _verbose_warning(where: str) -> str:
    return (f"--verbose with an encrypted cache: {where} names files, folders and the remote "
            "in plain text (without --verbose, an encrypted cache's log names none of them)")


def _index_damage(exc: BaseException) -> BaseException | None:
    """The damaged-index error in ``exc`` (one, or one of a group's), if any."""
    if is_index_error(exc):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _index_damage(inner)
            if found is not None:
                return found
    return None


def check_cache_free(cache_dir: Path) -> None:
    """Refuse a cache that another mount holds (its ``lock``), before anything is asked
    for: the cache key's passphrase (``cli.cmd_mount``) or a password (``log_in_once``)."""
    try:
        fd = os.open(cache_dir / "lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # a new cache: nothing holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise MountError(f"cache directory {cache_dir} is in use by another cachefs mount") from None
    finally:
        os.close(fd)


def _serve(config: MountConfig, ready: int | None, serving: _Serving) -> int:
    def report(message: str) -> None:
        if message.startswith("ok"):
            serving.served = True
        elif not serving.served:  # a new cache goes before the user is told (and may mount again)
            _discard_new_cache(config)
        if ready is not None:
            with contextlib.suppress(OSError):
                os.write(ready, message.encode())
                os.close(ready)
        elif not message.startswith("ok"):
            print(f"cachefs: {message}", file=sys.stderr)

    fetch_pool = None
    if handler_for(config.address.scheme).fetch_processes and config.connect.connections > 1:
        # Large reads go to processes of their own (paramiko is GIL-bound in threads),
        # forked now, while this process has a single thread and nothing open.
        fetch_pool = FetchPool(config.address, config.connect, config.cache_key,
                               config.connect.connections - 1)
        fetch_pool.start()
    # What is built by now lives as long as the mount, and a walk of a large tree makes
    # many objects that live long (nodes, kept listings): collected less often, the
    # collector stops walking them again and again (a 300,000-file cold find: the mount's
    # CPU 4.2 -> 3.3 s, measured with bench/scale.py).
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        return trio.run(_main, config, report, fetch_pool)
    except MountError as exc:
        log.error("%s", exc)
        report(str(exc))
        return 1
    except (lmdb.Error, RecordError, BaseExceptionGroup) as exc:
        # A damaged index met at start or by a background task: the clear message and
        # its hint (requests that meet it get EIO, see ``fs.translate``), not a traceback.
        damage = _index_damage(exc)
        if damage is None:
            if isinstance(exc, BaseExceptionGroup) and exc.split(KeyboardInterrupt)[1] is None:
                raise KeyboardInterrupt from None  # (a Ctrl-C met in a task: the command ends as at one)
            raise
        message = index_damaged(config.cache_dir, damage)
        log.error("%s; the mount ends", message)
        report(message)
        return 1
    finally:
        if fetch_pool is not None:
            fetch_pool.close()
        # (an unexpected error or a Ctrl-C goes on to ``run``, which removes a new cache
        # unless the mount served)


def _local_copy_name(cache_id: str) -> Callable[[bytes, int], bytes]:
    """The names a local-only object (FIFO, socket) moves to when the server lists an
    object under its name: a conflict copy's form, ``NAME (conflict DATE HOST-ID N)``."""
    client = client_tag(socket.gethostname().split(".")[0] or "host", cache_id)
    return lambda name, n: conflict_name(name, time.time(), client, n)


async def _main(config: MountConfig, report: Callable[[str], None], fetch_pool: FetchPool | None = None) -> int:
    try:
        store = Store(config.cache_dir, config.address.display(), key=config.cache_key)
    except StoreError as exc:
        raise MountError(str(exc)) from exc
    remote = open_remote(config.address, config.connect)
    try:
        conn = Connectivity(remote, heartbeat=config.heartbeat)
        try:
            await conn.first_connect()
        except RemoteRefused as exc:
            raise MountError(str(exc)) from exc
        if conn.online:
            store.set_meta(b"connected", b"1")
        elif store.get_meta(b"connected") is None:
            raise MountError(
                f"cannot reach {remote.description}: {conn.last_error}; "
                "the cache is empty, so there is nothing to serve offline yet"
            )
        else:
            log.warning("cannot reach %s (%s): mounting offline from the cache",
                        remote.description, conn.last_error)
        kernel = KernelNotifier()
        # The one place objects are built and wired: each gets what it uses as a
        # constructor argument (the jobs run in the transfer processes when there are some;
        # the cache rings the sync manager's doorbell at each change).
        transfers = (Transfers.in_pool(fetch_pool) if fetch_pool is not None
                     else Transfers.in_process(remote, store.content))
        wakeup = Wakeup()
        cache = Cache(store, conn, CacheConfig(attr_timeout=config.attr_timeout,
                                               dir_timeout=config.attr_timeout,
                                               passthrough=config.passthrough,
                                               callbacks=config.callbacks,
                                               owners=config.owners.mode if config.owners else "local"),
                      kernel,
                      transfers=transfers, changed=wakeup.poke,
                      local_copy_name=_local_copy_name(store.cache_id))
        hoard = Hoard(cache, config.cache_size)
        sync = SyncManager(store, cache, conn, hoard, interval=config.sync_interval,
                           writeback_hold=config.write_back_hold, transfers=transfers,
                           wakeup=wakeup, flush_timeout=config.sync_at_unmount)
        controls = Control(cache, sync, hoard, config.mountpoint, config.cache_dir)
        notices = _notices(config, conn, sync)
        ops = Operations(cache, controls, attr_timeout=config.attr_timeout, kernel=kernel,
                         show_control_dir=config.show_cachefs,
                         owners=config.owners)
        sync.schedule.also_at(at_mount=config.sync_at_mount, idle=config.sync_idle,
                              activity=ops.handles_opened)
        said: list[str] = []
        try:
            with _stderr_captured(said):
                pyfuse3.init(ops, str(config.mountpoint), fuse_options(config, remote.description))
        except RuntimeError as exc:
            raise MountError(f"cannot mount on {config.mountpoint}: "
                             f"{fuse_failure(said[0] if said else '', str(exc))}") from exc
        set_request_spin(config.request_spin)
        try:
            log.info("mounted %s on %s (cache %s, %s)", remote.description, config.mountpoint,
                     config.cache_dir, conn.state.value)
            report("ok")
            async with trio.open_nursery() as nursery:
                await nursery.start(kernel.run)
                await nursery.start(cache.run)
                nursery.start_soon(hoard.run)
                if fetch_pool is not None and conn.online:
                    nursery.start_soon(partial(trio.to_thread.run_sync, fetch_pool.warm,
                                               abandon_on_cancel=True))
                nursery.start_soon(conn.run)
                # a link, address or route change, or a resume: check the remote at once
                nursery.start_soon(NetworkEvents(conn.check_now).run)
                nursery.start_soon(sync.run)
                nursery.start_soon(_signals, sync)
                nursery.start_soon(_readahead_after_init, ops, config)
                if config.pins:
                    nursery.start_soon(_pin_at_mount, controls, conn, config.pins)
                if notices is not None:
                    nursery.start_soon(notices.run)
                await pyfuse3.main()
                await sync.flush_at_unmount()
                note_unmounted(config.cache_dir, os.getpid(), sync.pending())
                nursery.cancel_scope.cancel()
        finally:
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=True)
        log.info("unmounted %s", config.mountpoint)
        return 0
    finally:
        try:
            remote.close()
            store.close()
        finally:
            _unmounting_already.remove()  # (once the index is closed: see _UnmountingAlready)


async def _pin_at_mount(controls: Control, conn: Connectivity, pins: list[str]) -> None:
    """A share's pins (``--pin``), in the background once the mount is up: as
    ``cachefs pin`` pins each. Offline, each waits for the link (checked every second);
    one that fails otherwise (no such path, a file or folder the server refuses, anything
    unforeseen) is logged, and the mount goes on: a pin never ends the mount."""
    for path in pins:
        while True:
            try:
                await controls.command(f"pin {path}".encode("utf-8", "surrogateescape"))
                log.info("pinned %s", path)
            except (CommandError, SyncFailed) as exc:
                if exc.errno == errno.EHOSTDOWN:
                    await trio.sleep(1)
                    while not conn.online:
                        await trio.sleep(1)
                    continue
                log.warning("could not pin %s at mount: %s", path, exc)
            except Exception as exc:  # noqa: BLE001 - a pin must never end the mount
                log.warning("could not pin %s at mount: %s: %s", path, type(exc).__name__, exc)
            break


@contextlib.contextmanager
def _stderr_captured(said: list[str]) -> Iterator[None]:
    """Catch what is written to file descriptor 2 meanwhile (libfuse's and fusermount's
    complaints: fusermount3 runs as a child with this process's stderr, which is
    /dev/null once detached) into ``said``; the lines that are not theirs (log lines
    from other threads, in the foreground) go on to stderr, and theirs go to the log."""
    sys.stderr.flush()
    try:
        caught_file = tempfile.TemporaryFile()
    except OSError as exc:  # (no room in the temporary folder: mount without catching)
        log.warning("libfuse's messages are not caught: %s", exc)
        yield
        return
    saved = os.dup(2)
    with caught_file as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            text = caught.read(1 << 16).decode(errors="replace")
            said.append(text)
            theirs = _fuse_lines(text)
            for line in theirs:
                log.warning("%s", line)
            others = "".join(line for line in text.splitlines(keepends=True)
                             if line.strip() not in theirs)
            if others:
                with contextlib.suppress(OSError):
                    os.write(2, others.encode())


def _fuse_lines(text: str) -> list[str]:
    """The lines libfuse (``fuse: ...``) and fusermount (``fusermount3: ...``) wrote."""
    return [line.strip() for line in text.splitlines() if line.startswith(("fuse:", "fusermount"))]


#: what to do about libfuse's and fusermount's complaints, where a hint helps
_FUSE_HINTS = (
    ("user_allow_other", "as root, add a line 'user_allow_other' to /etc/fuse.conf, or mount "
                         "without -o allow_other"),
    ("failed to open /dev/fuse", "this user may not use /dev/fuse: as root, give it access "
                                 "(e.g. mode 0666, as Debian does), or mount as root"),
    ("device not found", "the fuse kernel module is not loaded ('modprobe fuse' as root), or "
                         "/dev/fuse is missing (in a container: pass --device /dev/fuse)"),
)


def fuse_failure(said: str, error: str) -> str:
    """Why libfuse could not mount, in one line: what libfuse and fusermount said (the
    reason a detached mount lost before), with a hint, else pyfuse3's error."""
    lines = _fuse_lines(said)
    if not lines:
        return error
    reason = "; ".join(lines)
    for words, hint in _FUSE_HINTS:
        if words in reason:
            return f"{reason} ({hint})"
    return reason


def _notices(config: MountConfig, conn: Connectivity, sync: SyncManager) -> Notices | None:
    """Desktop notifications wired to the link and the sync manager, unless turned off
    (``--no-notify``) or there is no session bus to send them on (a debug line says so)."""
    if not config.notify:
        log.debug("desktop notifications: off (--no-notify)")
        return None
    address = session_bus_address()
    if address is None:
        log.debug("desktop notifications: none (no session bus: DBUS_SESSION_BUS_ADDRESS is not "
                  "set and there is no $XDG_RUNTIME_DIR/bus)")
        return None
    log.debug("desktop notifications: on the session bus %s", address)
    encrypted = config.cache_key is not None
    notices = Notices(BusSender(address).put, str(config.mountpoint),
                      show_names=not encrypted or config.verbose, link_state=conn.state.value)
    conn.on_state(lambda state: notices.link(state.value))
    sync.on_conflict(notices.conflict)
    sync.on_failure(lambda reason: notices.sync_ok() if reason is None else notices.sync_failed(reason))
    return notices


UNMOUNT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def _signals(sync: SyncManager) -> None:
    """The first SIGINT, SIGTERM or SIGHUP unmounts; see ``_UnmountingAlready`` for the
    ones after it."""
    _unmounting_already.install(sync.cut_flush_short)  # (what the receiver puts back at its end)
    with trio.open_signal_receiver(*UNMOUNT_SIGNALS) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


class _UnmountingAlready:
    """The handler of the unmount signals outside ``_signals``' receiver, while the mount
    ends: after the first signal, or once the unmount began (``fusermount -u``), until the
    index is closed. A SIGTERM or SIGHUP then ends the replay of pending changes at unmount
    (``--sync-at-unmount``; they stay journaled for the next mount), but not the process:
    a ``kill`` right after ``fusermount -u`` (a session or a service being stopped) ended
    it in its last checkpoint, before the index recorded the content fetched since the one
    before, which the next mount had to fetch again (or had not at all, offline). A Ctrl-C
    (SIGINT) still ends it at once, as a second Ctrl-C is meant to (KeyboardInterrupt, as
    before: a storm of them can still cut the checkpoint short), and SIGKILL too; neither
    loses a change (the journal and the index are transactional). The receiver hands the
    signals pending at its end to this handler. A Python function, not SIG_IGN, which
    programs started meanwhile would inherit; what it does goes to the trio thread
    (``run_sync_soon``: logging from the handler could meet the log's own lock)."""

    def __init__(self) -> None:
        self._before: dict[int, Any] = {}  # (the handlers it replaced)
        self._token: trio.lowlevel.TrioToken | None = None
        self._cut_short: Callable[[], None] = _nothing

    def install(self, cut_short: Callable[[], None]) -> None:
        """In the trio thread: ``cut_short`` ends the replay at unmount."""
        self._token = trio.lowlevel.current_trio_token()
        self._cut_short = cut_short
        self._before = {signum: signal.signal(signum, self._handle) for signum in UNMOUNT_SIGNALS}

    def remove(self) -> None:
        for signum, before in self._before.items():
            signal.signal(signum, before)
        self._before = {}

    def _handle(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._later, signum)

    def _later(self, signum: int) -> None:
        log.info("signal %d: unmounting already (the cache is saved first; changes not "
                 "replayed yet are left for the next mount)", signum)
        self._cut_short()


def _nothing() -> None:
    pass


_unmounting_already = _UnmountingAlready()
