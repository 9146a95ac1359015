"""Connectivity: whether the remote may be used now, and the only road to it.

Owns: the connectivity state (online, offline detected, offline by request), the worker
threads that run blocking backend calls, the heartbeat that notices a silently vanished
network, and the probe that brings the mount back online with backoff; both can be run at
once (``check_now``: the network changed, see ``netevents``).
Must not touch: the cache, LMDB, FUSE. Callers get ``Unavailable`` at once while offline,
so nothing that the cache can answer ever waits for the network; and a link that went
silent without a reset (a cable pulled, packets dropped, a server stopped) is *suspect*
once a check of what the cache holds has waited ``grace`` with nothing answered since it
began, not even a ping sent at half the grace (judged once the ping has a connection
slot: one still waiting for a slot, held by long calls, says nothing of the link): what
the cache can answer then answers at
once, without waiting for that call's ``timeout`` to say the link is down (``suspect``,
``unless_suspect``). A long call on a live link (a big listing, the server's hashes)
makes no link suspect: the ping is answered.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import trio

from ..errors import RemoteError, RemoteRefused, RemoteUnreachable, Unavailable
from ..remote import Remote

log = logging.getLogger(__name__)
T = TypeVar("T")

#: a round trip at least this long makes a link "slow": the cache then lists and fetches
#: further ahead of a program (a wasted look costs bytes; a missed one, a round trip).
#: Far above a LAN's (< 5 ms) and a busy machine's own loopback (a few ms, one sample in a
#: hundred near 20 ms); a 50 ms WAN is well past it.
SLOW_RTT = 0.030
RTT_SAMPLES = 8  # the round trip is the least of the last few measured (queues excluded)
#: the link is suspect once a check waited this long with no answer from the remote
#: since it began, not even to a ping sent at half of it (or ``SUSPECT_RTTS`` round
#: trips, if longer; at most ``timeout``): far above a round trip of any usable link, far
#: below the 10 s default ``--timeout`` that says the link is down
SUSPECT_AFTER = 1.0
SUSPECT_RTTS = 5


class State(enum.Enum):
    ONLINE = "online"
    OFFLINE = "offline"  # detected: the remote did not answer
    WORK_OFFLINE = "offline-by-request"  # the user asked (the control file's "offline")


class Connectivity:
    """Runs remote calls in threads, bounded in time, and tracks whether they work."""

    def __init__(self, remote: Remote, *, heartbeat: float = 10.0, max_backoff: float = 30.0) -> None:
        self.remote = remote
        self.timeout = remote.timeout
        self.heartbeat = heartbeat
        self.max_backoff = max_backoff
        parallel = max(1, remote.parallelism)  # (the backend's connections or threads)
        self.limiter = trio.CapacityLimiter(parallel)
        # Transfers get all connections but one, so short calls (lookups, listings)
        # always find one free behind them.
        self.bulk_limiter = trio.CapacityLimiter(max(1, parallel - 1))
        self.state = State.OFFLINE
        self.last_error: str | None = None
        self.last_online: float | None = None  # wall-clock time the remote last answered
        self._wake_probe = trio.Event()
        self._check_reason: str | None = None  # why ``check_now`` was called, until done
        self._went_online: list[Callable[[], None]] = []
        self._state_changed: list[Callable[[State], None]] = []
        self._rtts: list[float] = []  # the last round trips measured (``note_rtt``)
        #: the link's round trip (seconds): the least of the last few measured; None
        #: before the first (set by ``note_rtt``)
        self.rtt: float | None = None
        #: whether round trips cost enough to list and fetch ahead of programs (read on
        #: the lookup path: kept, not computed there)
        self.slow = False
        #: pings on their way -> when each was sent (trio clock), oldest first
        self._owed: dict[object, float] = {}
        self._answered_at = -math.inf  # when the remote last answered a call (trio clock)
        #: a check waited ``grace`` with nothing answered since this time (``suspect``)
        self._silent_since: float | None = None
        self._pinging = False  # a ping sent while a check waits is on its way
        #: the deadlines of the short checks being awaited (``unless_suspect``)
        self._checking: set[trio.CancelScope] = set()
        #: the short calls that only look, on their way: given up when the mount goes offline
        self._looking: set[trio.CancelScope] = set()

    async def measure_rtt(self, samples: int = 3) -> None:
        """A few round trips now, so that ``rtt`` is the least of several (one sample can
        be slow for reasons of this machine's)."""
        for _ in range(samples):
            await self.ping()

    def note_rtt(self, seconds: float) -> None:
        """A call of one round trip took ``seconds`` (a ``ping``)."""
        self._rtts = self._rtts[-(RTT_SAMPLES - 1):] + [seconds]
        self.rtt = min(self._rtts)
        self.slow = self.rtt >= SLOW_RTT

    async def ping(self) -> None:
        """One round trip to the remote now, timed (``rtt``) from when it has its slot
        (a wait for one is no round trip)."""
        def timed() -> float:
            start = time.monotonic()
            self.remote.ping()
            return time.monotonic() - start
        self.note_rtt(await self._run(timed, owed=True))

    @property
    def online(self) -> bool:
        return self.state is State.ONLINE

    # -- a link gone silent -------------------------------------------------------------
    @property
    def grace(self) -> float:
        """How long the remote may say nothing while a check waits before the link is
        suspect."""
        return min(max(SUSPECT_AFTER, SUSPECT_RTTS * (self.rtt or 0.0)), self.timeout)

    @property
    def suspect(self) -> bool:
        """Online, but the link may have gone silent: a check waited ``grace`` with
        nothing answered since it began (not even the ping sent meanwhile), or a ping
        has waited ``grace``; and nothing has answered since (a failed call or the
        heartbeat will say the link is down within ``timeout``). A long call (a big
        listing, the server's hashes of a sync) makes no link suspect: only a ping
        unanswered does (the heartbeat's, or one sent while a check waits)."""
        if self.state is not State.ONLINE:
            return False
        if self._silent_since is not None:
            if self._answered_at <= self._silent_since:
                return True
            self._silent_since = None  # (answered since: it was not silent)
        return bool(self._owed) and trio.current_time() >= \
            max(self._answered_at, next(iter(self._owed.values()))) + self.grace

    async def unless_suspect(self, work: Callable[[], Awaitable[T]], nursery: trio.Nursery, *,
                             short: bool = False) -> T | None:
        """``await work()`` (a check of something the cache holds: a listing, a file's
        attributes), unless the link is or turns suspect first: then None at once, and
        ``work`` goes on in ``nursery`` to its end, applying what it finds itself (its
        errors are then only logged). So a cached answer waits ``grace`` at most on a
        link gone silent, the first time, and not at all afterwards, instead of
        ``timeout``; ``work`` must return something other than None.

        While a check waits with nothing answered for half the grace, a ping goes out:
        a live link answers it, and the check is waited for as long as it takes (a big
        listing); the link turns suspect only once that ping, sent, has gone unanswered
        for half the grace (while it waits for a slot held by long calls, the check is
        waited for: they end within their ``timeout``). ``short``: a check of a round trip or two (a stat): awaited here,
        without a task, and cancelled and started again in ``nursery`` only if nothing
        answered for half the grace (then a ping goes out, as above)."""
        if self.suspect:
            return None
        start = trio.current_time()
        if short:
            scope = trio.CancelScope(deadline=start + self.grace / 2)  # (moved on by answers)
            self._checking.add(scope)
            try:
                with scope:
                    return await work()
            finally:
                self._checking.discard(scope)
        return await self._check_in(work, nursery, start)

    async def _check_in(self, work: Callable[[], Awaitable[T]], nursery: trio.Nursery, start: float) -> T | None:
        """``unless_suspect``'s check as a task of ``nursery``, waited for here while the
        remote answers something (a ping sent at half the grace, if nothing else)."""
        done = trio.Event()
        box: list[T] = []
        failed: list[Exception] = []
        waiting = True

        async def run() -> None:
            try:
                box.append(await work())
            except Exception as exc:  # (a background task must never end the mount)
                if waiting:
                    failed.append(exc)
                else:
                    log.debug("a check answered after the cache did: %r", exc)
            finally:
                done.set()

        nursery.start_soon(run)
        while not done.is_set():
            heard = max(self._answered_at, start)  # (moves on when the remote answers)
            now = trio.current_time()
            grace = self.grace
            if now >= heard + grace / 2:
                self._ping_soon(nursery)
            # Silence is judged only from a ping sent (one still waiting for a slot held
            # by long calls says nothing of the link: waited for, as long as they take):
            # unanswered for half the grace, and nothing else for the whole of it.
            sent = next(iter(self._owed.values()), None)
            silent_at = math.inf if sent is None else max(heard + grace, sent + grace / 2)
            if now >= silent_at or self.state is not State.ONLINE:
                waiting = False
                self._silent_since = heard
                log.debug("the remote has not answered for %g s: answering from the cache", grace)
                return None
            if now < heard + grace / 2:
                wake = heard + grace / 2
            else:  # (a ping queued for a slot: looked at again shortly)
                wake = silent_at if sent is not None else now + grace / 8
            with trio.move_on_at(wake):
                await done.wait()
        if failed:
            raise failed[0]
        return box[0]

    def _ping_soon(self, nursery: trio.Nursery) -> None:
        """A ping in ``nursery``, unless one is on its way or the mount is offline."""
        if self._pinging or self.state is not State.ONLINE:
            return
        self._pinging = True

        async def ping() -> None:
            try:
                await self.ping()
            except Exception as exc:  # (Unavailable: offline now; a background task must not end the mount)
                log.debug("the check of the link failed: %r", exc)
            finally:
                self._pinging = False

        nursery.start_soon(ping)

    def _answered(self) -> None:
        """The remote answered a call: the link works; a short check waits on."""
        self._answered_at = now = trio.current_time()
        for scope in self._checking:
            scope.deadline = max(scope.deadline, now + self.grace / 2)

    def on_online(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the trio thread) each time the remote comes back."""
        self._went_online.append(callback)

    def on_state(self, callback: Callable[[State], None]) -> None:
        """Call ``callback(new_state)`` (on the trio thread) at each change of state."""
        self._state_changed.append(callback)

    def _tell(self) -> None:
        for callback in self._state_changed:
            callback(self.state)

    # -- calls ------------------------------------------------------------------------
    async def call(self, fn: Callable[..., T], *args: object, bulk: bool = False,
                   lane_held: bool = False, looks_only: bool = False) -> T:
        """Run a blocking backend call in a worker thread.

        Raises ``Unavailable`` at once when offline, and when the call fails for
        network reasons (which also moves the mount offline). ``RemoteError`` (the remote
        answered with an errno) passes through. ``bulk``: a transfer, which may take as
        long as it keeps moving (the backend bounds its progress, not its length).
        ``lane_held``: the caller holds a slot of ``bulk_limiter`` already (it chose what
        to transfer once it had one) and the call takes no other. ``looks_only``: a short
        call that changes nothing here or there (a stat, a listing, whose answer the
        caller applies itself): when the mount goes offline its caller gets
        ``Unavailable`` at once instead of waiting for the call's own timeout (its thread
        is abandoned; what it brings is dropped).
        """
        if self.state is not State.ONLINE:
            raise Unavailable(self.last_error or "remote is offline")
        if looks_only and not (bulk or lane_held):
            scope = trio.CancelScope()
            self._looking.add(scope)
            try:
                with scope:
                    return await self._run(fn, *args, online=True)
            finally:
                self._looking.discard(scope)
            raise Unavailable(self.last_error or "remote is offline")  # (cancelled: offline)
        return await self._run(fn, *args, bulk=bulk or lane_held, lane_held=lane_held, online=True)

    async def _run(self, fn: Callable[..., T], *args: object, bulk: bool = False,
                   refusals: bool = False, lane_held: bool = False, online: bool = False,
                   owed: bool = False) -> T:
        # The backend bounds each call by its timeout; for short calls the trio deadline
        # is a second line of defence (the thread is then abandoned, and ends when its
        # socket times out). Waiting for a free slot does not count against it.
        # (``lane_held``: the caller's slot; ``nullcontext`` takes none. ``online``: a
        # call that gets its slot once the mount went offline is not sent: on a link
        # gone silent, the slots were held by calls waiting for their timeout. ``owed``: a
        # ping, whose answer is due within a round trip, see ``suspect``)
        limiter = contextlib.nullcontext() if lane_held else self.bulk_limiter if bulk else self.limiter
        token = object()
        try:
            async with limiter:
                if online and self.state is not State.ONLINE:
                    raise Unavailable(self.last_error or "remote is offline")
                with trio.fail_after(math.inf if bulk else self.timeout * 2 + 1):
                    if owed:
                        self._owed[token] = trio.current_time()
                    result = await trio.to_thread.run_sync(partial(fn, *args), abandon_on_cancel=True)
            self._answered()
            return result
        except RemoteError:
            self._answered()  # (an answer: the link works)
            raise
        except trio.TooSlowError:
            self.report_failure(f"remote did not answer within {self.timeout:g} s")
            raise Unavailable(self.last_error) from None
        except RemoteUnreachable as exc:
            self.report_failure(str(exc) or type(exc).__name__)
            raise Unavailable(self.last_error) from exc
        except RemoteRefused as exc:
            if refusals:  # connecting: the caller decides (a mount refuses to start)
                raise
            # A refusal while reconnecting under way (a server restarting, a key removed):
            # offline, and the probe keeps trying and reports it.
            self.report_failure(str(exc))
            raise Unavailable(self.last_error) from exc
        finally:
            self._owed.pop(token, None)

    def report_failure(self, reason: str) -> None:
        """A network failure seen anywhere: go offline and let the probe work."""
        self.last_error = reason
        if self.state is State.ONLINE:
            log.warning("remote unreachable (%s): working offline", reason)
            self.state = State.OFFLINE
            self._wake_probe.set()
            self._tell()
            for scope in self._looking:  # (their callers: Unavailable now, see ``call``)
                scope.cancel()

    def _connected(self) -> bool:
        """A connection attempt succeeded: online, unless offline was asked for while it
        ran (the user's word wins over an attempt already under way)."""
        if self.state is State.WORK_OFFLINE:
            log.debug("connected, but offline by request meanwhile: staying offline")
            return False
        self._set_online()
        return True

    def _set_online(self) -> None:
        changed = self.state is not State.ONLINE
        if changed:
            log.info("remote %s reachable: online", self.remote.description)
        self.state = State.ONLINE
        if changed:
            self._tell()
        self.last_error = None
        self.last_online = time.time()
        for callback in self._went_online:
            callback()

    # -- work offline on request --------------------------------------------------------
    def work_offline(self) -> None:
        changed = self.state is not State.WORK_OFFLINE
        self.state = State.WORK_OFFLINE
        if changed:
            self._tell()
        self.last_error = None
        log.info("working offline by request")

    def work_online(self) -> None:
        self.remote.allow_login_again()  # (a refused password may be tried once more)
        if self.state is State.WORK_OFFLINE:
            self.state = State.OFFLINE
            self._tell()
        self._wake_probe.set()

    def check_now(self, reason: str) -> None:
        """The network changed (``reason``: a link, an address, a route, a resume): check
        the remote now rather than at the next heartbeat or probe. Online, a ping, so that
        a link that died is noticed at once; offline, a connection attempt, and the
        backoff starts again from 1 s. Nothing while offline by request. An attempt
        already under way is not cut short: the next one follows it at once."""
        if self.state is State.WORK_OFFLINE:
            return
        self._check_reason = reason
        self._wake_probe.set()

    def _woken_by(self) -> str | None:
        """Ends a wait: the event is renewed, and the reason ``check_now`` gave (if it
        was what woke it) taken."""
        self._wake_probe = trio.Event()
        reason, self._check_reason = self._check_reason, None
        return reason

    # -- start-up -----------------------------------------------------------------------
    async def first_connect(self) -> None:
        """Connect at mount time. ``RemoteRefused`` propagates (the mount must fail);
        a network failure leaves the state offline for the probe to retry."""
        try:
            await self._run(self.remote.connect, refusals=True)
        except Unavailable:
            return
        self._connected()

    async def try_connect(self) -> bool:
        """One attempt to (re)connect now, unless offline by request; True if online."""
        if self.state is State.ONLINE:
            return True
        if self.state is State.WORK_OFFLINE:
            return False
        try:
            await self._run(self.remote.connect, refusals=True)
        except Unavailable:
            return False
        except RemoteRefused as exc:
            self.last_error = str(exc)
            return False
        return self._connected()

    # -- background ---------------------------------------------------------------------
    async def run(self) -> None:
        """Heartbeat while online, probe with backoff while offline. Runs until cancelled."""
        backoff = 1.0
        while True:
            if self.state is State.ONLINE:
                backoff = 1.0
                with trio.move_on_after(self.heartbeat):
                    await self._wake_probe.wait()
                reason = self._woken_by()
                if self.state is State.ONLINE:
                    if reason is not None:
                        log.debug("%s: checking that the remote still answers", reason)
                    try:
                        await self.ping()
                        self.last_online = time.time()
                        if reason is not None:
                            log.debug("the remote answered the check")
                    except Unavailable:
                        pass  # report_failure already moved us offline
                    except OSError as exc:  # the remote answered, with an error: still online
                        log.debug("heartbeat answered with %s", exc)
                continue
            if self.state is State.WORK_OFFLINE:
                await self._wake_probe.wait()
                self._woken_by()
                continue
            try:
                await self._run(self.remote.connect, refusals=True)
            except Unavailable:
                pass
            except RemoteRefused as exc:
                # (the same refusal again, each max_backoff while offline, as an expired
                # Kerberos ticket gives until a new kinit: said once, then at DEBUG)
                said = log.debug if self.last_error == str(exc) else log.error
                self.last_error = str(exc)
                said("remote refused: %s", exc)
                backoff = self.max_backoff
            else:
                self._connected()
                continue
            log.debug("offline: next attempt to connect in %g s", backoff)
            with trio.move_on_after(backoff):
                await self._wake_probe.wait()
            reason = self._woken_by()
            if reason is not None:
                log.debug("%s: trying to connect now", reason)
                backoff = 1.0
            else:
                backoff = min(self.max_backoff, backoff * 2 if math.isfinite(backoff) else 1.0)
