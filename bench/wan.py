#!/usr/bin/env python3
"""cachefs over a modelled WAN: cachefs, sshfs and rclone mount (``--vfs-cache-mode full``)
against a private sshd behind devtools/wanrelay.py, at 50 ms RTT / 100 Mbit/s and 200 ms
RTT / 10 Mbit/s, every peer with its default options.

    .venv/bin/python bench/wan.py [--quick] [--profiles 50ms/100mbit,200ms/10mbit]
        [--peers cachefs,sshfs,rclone] [--only list,read,git,create,big] [--repeats 3]
        [--peer-repeats 1] [--peers-everywhere] [--idle 25] [--no-commands]
    .venv/bin/python bench/wan.py --idle-cost [--idle-mounts 1,2,4] [--idle-window 60]
    .venv/bin/python bench/wan.py --report     (the docs page again from the JSON files)

Owns: one private sshd (``devtools.devserver.SshServer``) and its share in a temporary
work folder, one relay per profile, the mounts it starts (bench/harness.py takes each down
by its PID), bench/results/wan*.json and docs/performance-wan.md (+ .png). Must not touch
anything else; bench/run.py's loopback figures (docs/performance.md) stay as they are.

A session is one fresh mount (empty cache) of one peer at one profile, which runs, in
order: a cold find+stat over 200 files in 10 folders (``list/``), a cold read of 200
files of 4 KiB in 10 other folders (``small/``) and the same again at once, ``git status``
on a fresh copy of a 200-file repository (cold) and again at once, one file changed,
``git status``, then ``git commit -a`` (timed) and how long until the server has the
commit, 100 creates of 4 KiB in 10 new folders and how long until the server's folders
(read on its disk) hold them all, ``--idle`` seconds of nothing, ``git status`` and a
find+stat over the 200 cached files of ``small/``, and last a cold read of a 32 MiB file
(MB/s and the share of the link's rate). Between the writing steps the link is let settle
(no traffic for 2 s), so that one step's write-back does not load the next.

Budget: cachefs runs ``--repeats`` sessions at every profile; sshfs and rclone, whose
figures do not change with cachefs's code, run ``--peer-repeats`` (default 1) at the
first profile only unless ``--peers-everywhere``. Each figure is the median of its
sessions. ``--max-minutes`` skips what is left. The default run took 46 min on cachefs/
as of 37fe9a0 (a cachefs session: 2.4 min at 50 ms, 9.6 min at 200 ms; sshfs 6.8 min and
rclone 3 min at 50 ms, so about 4x that each at 200 ms with ``--peers-everywhere``); once
cachefs's warm figures are near their targets a cachefs session is its idle time plus
the large read, and the default run about 15 min.

``--idle-cost``: N idle cachefs mounts (1, 2, 4) behind one relay, used briefly and then
left alone; the relay's counters over ``--idle-window`` seconds give what each sends the
server (chunks, about one per SSH packet, and bytes a second) and the extrapolation to
1,000 idle clients.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import (Endpoint, Mount, Watchdog, drop_caches, log,  # noqa: E402
                           machine_line, poll_until, read_whole, versions, walk, write_rclone_conf)
from cachefs.cli import read_status  # noqa: E402
from devtools.devserver import SshServer  # noqa: E402
from devtools.wanrelay import WanRelay, parse_duration_ms, parse_rate  # noqa: E402

MiB = 1 << 20
PEERS = ("cachefs", "sshfs", "rclone")
WORKLOADS = ("list", "read", "git", "create", "big")
DEFAULT_PROFILES = "50ms/100mbit,200ms/10mbit"
RESULTS = REPO / "bench" / "results"
JSON_MAIN = RESULTS / "wan.json"
JSON_IDLE = RESULTS / "wan-idle.json"
DOC = REPO / "docs" / "performance-wan.md"
FOLDERS = 10
FILES = 200
CREATES = 100
SETTLE_QUIET = 2.0  # seconds without traffic that count as a settled link
SETTLE_BYTES = 2048  # ... allowing a heartbeat


@dataclass(frozen=True)
class Profile:
    name: str
    rtt_ms: float
    rate_bit: float

    @classmethod
    def parse(cls, text: str) -> Profile:
        rtt, _, rate = text.partition("/")
        rate_bit = parse_rate(rate or "none")
        return cls(text, parse_duration_ms(rtt), rate_bit or 0.0)

    @property
    def label(self) -> str:
        rate = f"{self.rate_bit / 1e6:g} Mbit/s" if self.rate_bit else "no rate cap"
        return f"{self.rtt_ms:g} ms RTT, {rate}"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str  # "s" (lower is better), "MB/s" and "%" (higher is better)


def metric_list(idle: float, big_mb: int) -> list[Metric]:
    """In the order of the issue's table: warm figures first, then cold ones."""
    return [
        Metric("commit", "`git commit -a` of one changed file, right after `git status`", "s"),
        Metric("commit_lag", "  then until the server has the commit", "s"),
        Metric("status_again", "`git status`, run again at once", "s"),
        Metric("status_idle", f"`git status` after {idle:g} s idle", "s"),
        Metric("find_idle", f"find+stat over the 200 cached files after {idle:g} s idle", "s"),
        Metric("read_again", "read the 200 cached files again at once", "s"),
        Metric("create_total", f"{CREATES} creates of 4 KiB: until the server has them all", "s"),
        Metric("create_close", "  of which until the last close", "s"),
        Metric("create_lag", "  of which after the last close", "s"),
        Metric("read_cold", "cold: read the 200 files (4 KiB, 10 folders)", "s"),
        Metric("status_cold", "cold: `git status` (200-file repo)", "s"),
        Metric("list_cold", "cold: find+stat over 200 other files in 10 folders", "s"),
        Metric("big_cold", f"cold: read one {big_mb} MiB file", "MB/s"),
        Metric("big_link", "  share of the link rate", "%"),
        Metric("mount", "mount (until the mount point answers)", "s"),
        Metric("paramiko", f"reference: paramiko alone reads the {big_mb} MiB file (one SFTP "
                           "connection, prefetch), in the cachefs column", "MB/s"),
    ]


STEP_KEYS = {
    "list": ["list_cold", "find_idle"],
    "read": ["read_cold", "read_again"],
    "git": ["status_cold", "status_again", "commit", "commit_lag", "status_idle"],
    "create": ["create_total", "create_close", "create_lag"],
    "big": ["big_cold", "big_link"],
}


GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}


def git(repo: Path, home: Path, *args: str, timeout: float = 1200) -> str:
    env = dict(os.environ, HOME=str(home), **GIT_ENV)
    result = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed ({result.returncode}): "
                           f"{result.stderr.strip()[:400]}")
    return result.stdout


# -- the benchmark ------------------------------------------------------------------------
@dataclass
class WanBench:
    args: argparse.Namespace
    workdir: Path
    server: SshServer
    endpoint: Endpoint
    rclone_conf: Path | None = None
    cachefs_options: list[str] = field(default_factory=list)
    live_mounts: list[Mount] = field(default_factory=list)
    relay: WanRelay | None = None
    profile: Profile | None = None
    # samples[profile][metric][peer] = [values]; errors likewise with messages
    samples: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    errors: dict[str, dict[str, dict[str, list[str]]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    deadline: float = 0.0
    counter: int = 0

    # -- bookkeeping ----------------------------------------------------------------------
    def add(self, key: str, peer: str, value: float) -> None:
        assert self.profile is not None
        self.samples.setdefault(self.profile.name, {}).setdefault(key, {}).setdefault(peer, []).append(value)

    def error(self, key: str, peer: str, msg: str) -> None:
        assert self.profile is not None
        self.errors.setdefault(self.profile.name, {}).setdefault(key, {}).setdefault(peer, []).append(msg)

    # -- the share ------------------------------------------------------------------------
    def fill_share(self) -> None:
        share = self.server.share
        rnd = random.Random(21)
        for tree in ("list", "small"):
            for d in range(FOLDERS):
                folder = share / tree / f"d{d:02d}"
                folder.mkdir(parents=True)
                for i in range(FILES // FOLDERS):
                    (folder / f"f{i:03d}").write_bytes(rnd.randbytes(4096))
        with open(share / "big.bin", "wb") as f:
            for _ in range(self.args.big_mb):
                f.write(rnd.randbytes(MiB))
        # A 200-file repository (three levels of folders, as a source tree), committed on
        # the server's disk; each session works on a fresh copy of it.
        words = ("alpha beta gamma delta cache journal remote node replay conflict pin "
                 "offline online sync fetch range inode lookup readdir").split()
        template = self.workdir / "repo-template"
        for n in range(FILES):
            path = template / f"pkg{n // 25}" / f"mod{(n // 5) % 5}" / f"file{n % 5}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12)))
                     for _ in range(rnd.randint(5, 80))]
            path.write_text("# " + "\n# ".join(lines) + "\n")
        git(template, self.workdir, "init", "-q")
        git(template, self.workdir, "config", "gc.auto", "0")
        git(template, self.workdir, "add", "-A")
        git(template, self.workdir, "commit", "-q", "-m", "the template")
        (share / "repos").mkdir()
        (share / "w").mkdir()
        os.sync()

    # -- the link -------------------------------------------------------------------------
    def settle(self, limit: float = 180.0) -> float:
        """Waits until the link carried next to nothing for SETTLE_QUIET s; the wait."""
        assert self.relay is not None
        started = time.monotonic()
        before = self.relay.counters()
        quiet_since = time.monotonic()
        while time.monotonic() - started < limit:
            time.sleep(0.25)
            now = self.relay.counters()
            moved = (now.up_bytes - before.up_bytes) + (now.down_bytes - before.down_bytes)
            if moved > SETTLE_BYTES:
                before, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since >= SETTLE_QUIET:
                break
        return time.monotonic() - started

    # -- one session ----------------------------------------------------------------------
    def session(self, peer: str, rep: int) -> None:
        assert self.profile is not None
        keys = ["mount"] + [k for w in self.args.workloads for k in STEP_KEYS[w]]
        if time.monotonic() > self.deadline:
            for key in keys:
                self.error(key, peer, "skipped: --max-minutes budget used up")
            return
        self.counter += 1
        tag = f"{self.counter:03d}-{peer}-{self.profile.rtt_ms:g}ms"
        share = self.server.share
        repo_rel = f"repos/{tag}"
        if "git" in self.args.workloads:
            shutil.copytree(self.workdir / "repo-template", share / repo_rel, symlinks=True)
        self.settle(30)
        log(f"  session {tag} (rep {rep + 1})")
        started = time.perf_counter()
        mount = Mount(self, peer, tag)
        guard = 900 + (3000 if self.profile.rtt_ms >= 100 else 0)
        dog = Watchdog(mount, guard, f"session {tag}")
        results: dict[str, float] = {}
        try:
            t0 = time.perf_counter()
            with mount, dog:
                results["mount"] = time.perf_counter() - t0
                self.steps(mount, peer, tag, repo_rel, results, keys)
        except Exception as exc:  # noqa: BLE001 - a session that fails is reported, the run goes on
            msg = f"{type(exc).__name__}: {exc}"
            if dog.fired:
                msg = f"timed out after {guard:.0f} s (watchdog killed the mount): {msg}"
            msg = msg[:1500]
            log(f"    ERROR {msg}")
            if self.args.verbose:
                traceback.print_exc()
            for key in keys:
                if key not in results:
                    self.error(key, peer, msg)
        for key, value in results.items():
            self.add(key, peer, value)
        shown = ", ".join(f"{k}={v:.3g}" for k, v in results.items())
        log(f"    {shown}  ({time.perf_counter() - started:.0f} s)")
        if mount.log_path.exists():
            text = mount.log_path.read_text(errors="replace")
            if "Traceback" in text or " ERROR " in text:
                first = next((ln for ln in text.splitlines() if "Traceback" in ln or " ERROR " in ln), "")
                self.notes.append(f"{tag}: the {peer} log has errors, e.g. `{first.strip()[:200]}`")

    def steps(self, mount: Mount, peer: str, tag: str, repo_rel: str,
              results: dict[str, float], keys: list[str]) -> None:
        """The session's workloads, in order; a failing step costs only its own figures."""
        assert self.profile is not None
        root = mount.path
        workloads = self.args.workloads
        buf = bytearray(1 << 20)
        repo = root / repo_rel

        def step(keys_of_step: list[str], fn: Callable[[], dict[str, float]]) -> None:
            try:
                got = fn()
            except Exception as exc:  # noqa: BLE001
                msg = f"{type(exc).__name__}: {exc}"[:800]
                log(f"    {'/'.join(keys_of_step)}: ERROR {msg}")
                if mount.killed:
                    raise
                for key in keys_of_step:
                    self.error(key, peer, msg)
                return
            results.update(got)

        def timed(fn: Callable[[], object]) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        def read_tree(tree: str) -> None:
            count = 0
            for d in sorted(os.listdir(root / tree)):
                for name in sorted(os.listdir(root / tree / d)):
                    if read_whole(root / tree / d / name, buf) != 4096:
                        raise RuntimeError(f"{tree}/{d}/{name} is not 4096 bytes")
                    count += 1
            if count != FILES:
                raise RuntimeError(f"read {count} files of {tree}/, expected {FILES}")

        def find(tree: str) -> None:
            n = walk(root / tree)
            if n != FILES + FOLDERS:
                raise RuntimeError(f"find found {n} entries in {tree}/, expected {FILES + FOLDERS}")

        drop_caches()
        if "list" in workloads:
            step(["list_cold"], lambda: {"list_cold": timed(lambda: find("list"))})
        if "read" in workloads:
            step(["read_cold"], lambda: {"read_cold": timed(lambda: read_tree("small"))})
            step(["read_again"], lambda: {"read_again": timed(lambda: read_tree("small"))})
        if "git" in workloads:
            home = self.workdir
            step(["status_cold"], lambda: {"status_cold": timed(lambda: self.status(repo))})
            step(["status_again"], lambda: {"status_again": timed(lambda: self.status(repo))})
            step(["commit", "commit_lag"], lambda: self.commit(repo, share_repo=self.server.share / repo_rel,
                                                               home=home, peer=peer, mount=mount))
            self.settle()
        if "create" in workloads:
            step(["create_total", "create_close", "create_lag"], lambda: self.creates(root, tag))
            self.settle()
        if ("list" in workloads or "git" in workloads) and self.args.idle > 0:
            time.sleep(self.args.idle)
            if "git" in workloads:
                step(["status_idle"], lambda: {"status_idle": timed(lambda: self.status(repo))})
            if "list" in workloads:
                # the 200 files read before when "read" ran: cached content and listing
                tree = "small" if "read" in workloads else "list"
                step(["find_idle"], lambda: {"find_idle": timed(lambda: find(tree))})
        if "big" in workloads:
            step(["big_cold", "big_link"], lambda: self.big_read(root))

    def status(self, repo: Path) -> None:
        out = git(repo, self.workdir, "status", "--porcelain")
        if out.strip() and not out.startswith(" M"):
            raise RuntimeError(f"unexpected git status: {out[:300]}")

    def commit(self, repo: Path, share_repo: Path, home: Path, peer: str, mount: Mount) -> dict[str, float]:
        target = repo / "pkg3" / "mod2" / "file1.py"
        with open(target, "a") as f:
            f.write("# one more line\n")
        git(repo, home, "status", "--porcelain")
        t0 = time.perf_counter()
        git(repo, home, "commit", "-a", "-q", "-m", "one change")
        took = time.perf_counter() - t0
        head = (repo / ".git" / "HEAD").read_text().strip()
        ref = head.split(": ", 1)[1] if head.startswith("ref: ") else "HEAD"
        commit_id = (repo / ".git" / ref).read_text().strip()
        server_ref = share_repo / ".git" / ref
        lag = poll_until(lambda: server_ref.read_text().strip() == commit_id, timeout=600, interval=0.1)
        out = {"commit": took}
        if lag is None:
            self.error("commit_lag", peer, "the server's branch did not show the commit within 600 s")
        else:
            out["commit_lag"] = lag
        if peer == "cachefs":  # let its replay finish before the next step loads the link
            poll_until(lambda: not read_status(mount.path).get("pending"), timeout=600, interval=0.2)
        return out

    def creates(self, root: Path, tag: str) -> dict[str, float]:
        rel = f"w/{tag}"
        payload = os.urandom(4096)
        base = root / rel
        t0 = time.perf_counter()
        base.mkdir()
        for d in range(FOLDERS):
            (base / f"d{d:02d}").mkdir()
        for i in range(CREATES):
            with open(base / f"d{i % FOLDERS:02d}" / f"f{i:03d}", "wb") as f:
                f.write(payload)
        closed = time.perf_counter() - t0
        server = self.server.share / rel
        seen: set[str] = set()

        def complete() -> bool:
            for d in range(FOLDERS):
                folder = server / f"d{d:02d}"
                if not folder.is_dir():
                    return False
                with os.scandir(folder) as entries:
                    for entry in entries:
                        if entry.name.startswith("f") and entry.stat().st_size == 4096:
                            seen.add(entry.name)
            return len(seen) >= CREATES

        lag = poll_until(complete, timeout=600, interval=0.05)
        if lag is None:
            raise RuntimeError(f"the server had {len(seen)}/{CREATES} files 600 s after the last close")
        return {"create_close": closed, "create_lag": lag, "create_total": closed + lag}

    def big_read(self, root: Path) -> dict[str, float]:
        assert self.profile is not None
        drop_caches()
        buf = bytearray(1 << 20)
        t0 = time.perf_counter()
        n = read_whole(root / "big.bin", buf)
        took = time.perf_counter() - t0
        if n != self.args.big_mb * MiB:
            raise RuntimeError(f"read {n} bytes of big.bin, expected {self.args.big_mb * MiB}")
        out = {"big_cold": n / 1e6 / took}
        if self.profile.rate_bit:
            out["big_link"] = 100 * n * 8 / took / self.profile.rate_bit
        return out

    def paramiko_reference(self) -> None:
        """What one paramiko SFTP connection with prefetch reads through the relay: the
        bound of the link, the relay and ssh together, beside which the peers' cold reads
        are seen. Kept in the cachefs column."""
        import paramiko
        import socket

        endpoint = self.endpoint
        client = paramiko.SSHClient()
        try:
            client.load_host_keys(str(endpoint.known_hosts))
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            client.connect(endpoint.host, port=endpoint.port, username=endpoint.user,
                           key_filename=str(endpoint.identity), look_for_keys=False,
                           allow_agent=False, timeout=30)
            transport = client.get_transport()
            assert transport is not None
            transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sftp = client.open_sftp()
            sftp.get_channel().settimeout(120)
            path = str(self.server.share / "big.bin")
            size = sftp.stat(path).st_size or 0
            t0 = time.perf_counter()
            total = 0
            with sftp.open(path, "rb") as f:
                f.prefetch(size)
                while data := f.read(MiB):
                    total += len(data)
            took = time.perf_counter() - t0
            if total != size:
                raise RuntimeError(f"read {total} bytes of {size}")
            self.add("paramiko", "cachefs", total / 1e6 / took)
            log(f"  reference: paramiko alone {total / 1e6 / took:.2f} MB/s")
        except Exception as exc:  # noqa: BLE001
            self.error("paramiko", "cachefs", f"{type(exc).__name__}: {exc}")
        finally:
            client.close()

    # -- a profile ------------------------------------------------------------------------
    def run_profile(self, profile: Profile, first: bool) -> None:
        self.profile = profile
        with WanRelay((self.server.host, self.server.port), rtt_ms=profile.rtt_ms,
                      rate_bit=profile.rate_bit or None) as relay:
            self.relay = relay
            self.endpoint = Endpoint.through(self.server, relay.port, self.workdir)
            self.rclone_conf = write_rclone_conf(self.workdir / f"rclone-{relay.port}.conf", self.endpoint)
            log(f"profile {profile.label}: {relay}")
            if "big" in self.args.workloads:
                self.paramiko_reference()
            peers_here = [p for p in self.args.peer_list
                          if p == "cachefs" or first or self.args.peers_everywhere]
            for rep in range(max(self.args.repeats, self.args.peer_repeats)):
                for peer in peers_here:
                    wanted = self.args.repeats if peer == "cachefs" else self.args.peer_repeats
                    if rep < wanted:
                        self.session(peer, rep)
            self.relay = None


# -- idle cost ------------------------------------------------------------------------------
def idle_cost(args: argparse.Namespace, bench: WanBench) -> dict[str, Any]:
    """N idle mounts behind one relay: what each sends and receives over the window."""
    profile = args.profile_list[0]
    bench.profile = profile
    out: dict[str, Any] = {"profile": profile.name, "window_s": args.idle_window,
                           "settle_s": args.idle_settle, "runs": []}
    with WanRelay((bench.server.host, bench.server.port), rtt_ms=profile.rtt_ms,
                  rate_bit=profile.rate_bit or None) as relay:
        bench.relay = relay
        bench.endpoint = Endpoint.through(bench.server, relay.port, bench.workdir)
        bench.rclone_conf = write_rclone_conf(bench.workdir / f"rclone-{relay.port}.conf", bench.endpoint)
        plan = [("cachefs", n) for n in args.idle_mount_counts if "cachefs" in args.peer_list]
        plan += [(p, 1) for p in args.peer_list if p != "cachefs"]
        for peer, count in plan:
            mounts = []
            try:
                for i in range(count):
                    bench.counter += 1
                    mount = Mount(bench, peer, f"{bench.counter:03d}-idle-{peer}-{count}-{i}")
                    mount.start()
                    mounts.append(mount)
                for mount in mounts:  # used a little, as a mount in use is, then left idle
                    walk(mount.path / "small")
                    for name in sorted(os.listdir(mount.path / "small" / "d00"))[:5]:
                        read_whole(mount.path / "small" / "d00" / name, bytearray(65536))
                time.sleep(args.idle_settle)
                before, t0 = relay.counters(), time.monotonic()
                time.sleep(args.idle_window)
                delta, seconds = relay.counters() - before, time.monotonic() - t0
                open_connections = relay.active_connections
                alive = all(m.proc is not None and m.proc.poll() is None for m in mounts)
                run = {"peer": peer, "mounts": count, "seconds": seconds, "alive": alive,
                       "up_bytes": delta.up_bytes, "up_chunks": delta.up_chunks,
                       "down_bytes": delta.down_bytes, "down_chunks": delta.down_chunks,
                       "connections": delta.connections, "open_connections": open_connections,
                       "up_chunks_per_s_per_mount": delta.up_chunks / seconds / count,
                       "up_bytes_per_s_per_mount": delta.up_bytes / seconds / count,
                       "down_bytes_per_s_per_mount": delta.down_bytes / seconds / count,
                       "down_chunks_per_s_per_mount": delta.down_chunks / seconds / count}
                out["runs"].append(run)
                log(f"  idle {peer} x{count}: {delta} in {seconds:.0f} s: "
                    f"{run['up_chunks_per_s_per_mount']:.3f} chunks/s and "
                    f"{run['up_bytes_per_s_per_mount']:.1f} B/s up per mount")
            except Exception as exc:  # noqa: BLE001
                log(f"  idle {peer} x{count}: ERROR {type(exc).__name__}: {exc}")
                out["runs"].append({"peer": peer, "mounts": count, "error": f"{type(exc).__name__}: {exc}"})
            finally:
                for mount in mounts:
                    mount.stop()
        bench.relay = None
    return out


# -- reporting ------------------------------------------------------------------------------
def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "%":
        return f"{value:.0f} %"
    if unit == "MB/s":
        return f"{value:.3g}"
    if value < 0.001:
        return "<0.001"
    if value < 10:
        return f"{value:.3g}"
    return f"{value:.1f}"


def median_of(data: dict[str, Any], profile: str, key: str, peer: str) -> tuple[float | None, int]:
    values = data.get("samples", {}).get(profile, {}).get(key, {}).get(peer) or []
    return (statistics.median(values) if values else None), len(values)


def table(data: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    metrics = [Metric(**m) for m in data["metrics"]]
    profiles = data["profiles"]
    peers = [p for p in PEERS if p in data["peers"]]
    head = ["workload"]
    columns: list[tuple[dict[str, Any], str, str, bool]] = []
    for profile in profiles:
        short = f"{profile['rtt_ms']:g} ms"
        if baseline is not None:
            head.append(f"cachefs before, {short}")
            columns.append((profile, "cachefs", short, True))
        for peer in peers:
            if any(data.get("samples", {}).get(profile["name"], {}).get(m.key, {}).get(peer)
                   or data.get("errors", {}).get(profile["name"], {}).get(m.key, {}).get(peer)
                   for m in metrics):
                head.append(f"{peer}, {short}")
                columns.append((profile, peer, short, False))
    rows = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for m in metrics:
        cells = [f"{m.label} ({m.unit})"]
        shown = False
        for profile, peer, _short, before in columns:
            source = baseline if before and baseline is not None else data
            value, count = median_of(source, profile["name"], m.key, peer)
            cell = fmt(value, m.unit)
            if value is None and source.get("errors", {}).get(profile["name"], {}).get(m.key, {}).get(peer):
                cell = "error"
            elif count == 1 and peer == "cachefs" and m.key != "paramiko" and source.get("repeats", 1) > 1:
                cell += " (1 run)"
            shown = shown or value is not None
            cells.append(cell)
        if shown:
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def chart(data: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("matplotlib is not importable here: no chart was drawn (`bench/wan.py --report` "
                "with a Python that has it draws it from the JSON).")
    metrics = [Metric(**m) for m in data["metrics"] if m["unit"] == "s" and m["key"] != "mount"
               and not m["label"].startswith("  ")]
    peers = [p for p in PEERS if p in data["peers"]]
    profiles = data["profiles"]
    fig, axes = plt.subplots(1, len(profiles), figsize=(7 * len(profiles), 5.5), squeeze=False,
                             sharey=True)
    colours = {"cachefs": "#1f77b4", "sshfs": "#ff7f0e", "rclone": "#2ca02c"}
    for ax, profile in zip(axes[0], profiles):
        width = 0.8 / len(peers)
        for j, peer in enumerate(peers):
            values = [median_of(data, profile["name"], m.key, peer)[0] for m in metrics]
            xs = [i + j * width for i, v in enumerate(values) if v is not None]
            ys = [max(v, 0.001) for v in values if v is not None]
            if ys:
                ax.bar(xs, ys, width, label=peer, color=colours.get(peer))
        ax.axhline(0.1, color="black", linewidth=0.8, linestyle="--", label="0.1 s")
        ax.set_yscale("log")
        ax.set_ylabel("seconds (log scale; lower is faster)")
        ax.set_title(profile["label"])
        ax.set_xticks([i + width * (len(peers) - 1) / 2 for i in range(len(metrics))])
        ax.set_xticklabels([m.key for m in metrics], rotation=35, ha="right")
        ax.grid(axis="y", which="major", alpha=0.3)
        ax.legend()
    fig.suptitle("cachefs, sshfs and rclone over a modelled WAN (medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"![chart](performance-wan.png)\n\n`docs/{path.name}`: seconds on a log scale, per profile; lower is faster."


def idle_section(idle: dict[str, Any] | None) -> str:
    if not idle:
        return "Not measured yet: `bench/wan.py --idle-cost`."
    rows = ["| peer | idle mounts | TCP connections open | seconds counted | to the server: chunks/s per mount "
            "| bytes/s per mount | from the server: chunks/s per mount | bytes/s per mount | connections opened |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in idle["runs"]:
        if "error" in run:
            rows.append(f"| {run['peer']} | {run['mounts']} | error: {run['error'][:200]} | | | | | | |")
            continue
        down_chunks = run.get("down_chunks_per_s_per_mount", run["down_chunks"] / run["seconds"] / run["mounts"])
        rows.append(f"| {run['peer']} | {run['mounts']} | {run.get('open_connections', '?')} | {run['seconds']:.0f} "
                    f"| {run['up_chunks_per_s_per_mount']:.3f} | {run['up_bytes_per_s_per_mount']:.1f} "
                    f"| {down_chunks:.3f} | {run['down_bytes_per_s_per_mount']:.1f} | {run['connections']} |")
    cachefs = [r for r in idle["runs"] if r["peer"] == "cachefs" and "error" not in r]
    text = "\n".join(rows)
    if cachefs:
        def per_mount(key: str) -> float:
            return statistics.median(r[key] for r in cachefs)

        def down_chunks(r: dict[str, Any]) -> float:
            return float(r.get("down_chunks_per_s_per_mount", r["down_chunks"] / r["seconds"] / r["mounts"]))

        up = per_mount("up_chunks_per_s_per_mount")
        answered = statistics.median(down_chunks(r) for r in cachefs)
        with_open = [r for r in cachefs if "open_connections" in r]
        connections = (statistics.median(r["open_connections"] / r["mounts"] for r in with_open)
                       if with_open else None)
        text += (f"\n\n1,000 idle cachefs clients, extrapolated from the median per mount above: "
                 f"**{up * 1000:.0f} packets/s** reaching the server, of which about "
                 f"**{answered * 1000:.0f}/s are requests it answers** (chunks coming back; the rest "
                 f"are SSH keepalives, which it reads and drops), "
                 f"{per_mount('up_bytes_per_s_per_mount'):.0f} kB/s in and "
                 f"{per_mount('down_bytes_per_s_per_mount'):.0f} kB/s out"
                 + (f", and {connections * 1000:,.0f} SSH connections held open (an sshd process "
                    f"each)" if connections else "") + ".")
    return text


def write_doc(data: dict[str, Any] | None, idle: dict[str, Any] | None,
              baseline: dict[str, Any] | None) -> str:
    parts = ["# cachefs over a slow, distant link\n"]
    if data:
        chart_note = chart(data, DOC.with_suffix(".png"))
        errors = []
        for profile, per_key in data.get("errors", {}).items():
            for key, per_peer in per_key.items():
                for peer, msgs in per_peer.items():
                    uniq = list(dict.fromkeys(msgs))
                    errors.append(f"- {profile} `{key}` / {peer} ({len(msgs)}×): "
                                  + " ‖ ".join(u.replace("|", "\\|") for u in uniq[:2]))
        notes = "\n".join(f"- {n}" for n in data.get("notes", []))
        parts.append(f"""Produced by `{data['command']}` on {data['date']} in {data['minutes']:.0f} min
(the raw figures: `bench/results/{JSON_MAIN.name}`).
Machine: {data['machine']}. Shared with other work: treat differences under ~20 % as noise.
Peers: {data['versions']}. cachefs/ as of commit {data.get('commit', '?')}{', ' + data['cachefs_note'] if data.get('cachefs_note') else ''}.
Loopback figures (no relay): [performance.md](performance.md).

## The link model
No netem on this kernel: `devtools/wanrelay.py`, a TCP relay in user space, sits between every
mount and a private OpenSSH sshd on 127.0.0.1 (`devtools.devserver.SshServer`). It models one
link per direction shared by every connection: a chunk read at `now` leaves at
`max(now, link free) + bytes / rate` and arrives RTT/2 later; chunks of one connection arrive
in order; a connection has at most about one bandwidth-delay product (at least 256 KiB) of
each direction in the relay, so TCP back-pressure works and a bulk transfer queues ahead of
other connections' requests as in a router; the target sees a connection 1.5 RTT after the
connect (the handshake). It models no loss, no slow start and no per-packet headers (a cold
read can reach 100 % of the rate, a real link about 95 %). `python -m devtools.wanrelay --to
HOST:PORT --rtt 50ms --rate 100mbit` runs it by hand; tests/test_wanrelay.py checks it.

## Method
- The share: `list/` and `small/`, each 200 files of 4 KiB in 10 folders; `big.bin`
  ({data['big_mb']} MiB); a 200-file git repository committed on the server, copied afresh for
  every session.
- A session mounts one peer afresh with an empty cache and defaults everywhere (cachefs
  `mount.py sftp://… --foreground`; `sshfs -f`; `rclone mount --vfs-cache-mode full`), drops
  the page cache, then in order: cold find+stat over `list/`; cold read of `small/`, then
  again at once; cold `git status` on its copy of the repository, then again at once; one
  file changed, `git status`, then `git commit -a` (timed), and how long until the server's
  branch names the commit; {CREATES} creates of 4 KiB in 10 new folders, timed to the last
  close and then until the server's folders (read on its disk) hold them all; {data['idle']:g} s
  of nothing; `git status` and find+stat over `small/` (its 200 files cached); last, a cold
  read of `big.bin`. The link is let settle (2 s without traffic) after the writing steps.
- The repository is committed on the server's disk, so on every peer the first `git status`
  finds the index's stat data (inode, ctime) unlike what the mount shows and reads all 200
  files again, as with a repository made on another machine; it then rewrites the index, and
  the next runs compare stat data only (one lookup per file and folder).
- "find+stat" walks the tree with `scandir` and an `lstat` of every entry.
- The paramiko line is the reference for the large read: one SFTP connection with
  paramiko's prefetch through the same relay, what the link, the relay and ssh allow together.
- Each figure is the median of its sessions: cachefs {data['repeats']} per profile, sshfs and
  rclone {data['peer_repeats']} (at {'every profile' if data['peers_everywhere'] else 'the first profile only'}):
  their figures do not depend on cachefs's code, and at 200 ms a session of sshfs takes
  about half an hour (`--peers-everywhere` runs them there). A cell marked "(1 run)" had
  one good session of several.

## Results

{table(data, baseline)}

{chart_note}

## Errors
{chr(10).join(errors) or '- none'}

## Notes from the run
{notes or '- none'}
""")
    parts.append(f"""## Server cost of idle clients

{('Produced by `' + idle['command'] + '` on ' + idle['date'] + ', at ' + idle['profile'] + ': ') if idle else ''}{'each mount is used a little (a find and five reads), left ' + format(idle['settle_s'], 'g') + ' s to settle, then the relay counts what passes for ' + format(idle['window_s'], 'g') + ' s. A chunk is one read of the relay from a socket: when a link is idle, about one SSH packet (a request, an answer, a keepalive). These are counts, not times: this part may run beside the timed one. cachefs/ as of commit ' + idle.get('commit', '?') + '.' if idle else ''}

{idle_section(idle)}
""")
    text = "\n".join(parts)
    DOC.write_text(text)
    return text


def commit_id() -> str:
    """The last commit that changed cachefs/ (and whether the work tree changes it)."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h", "--", "cachefs"], cwd=REPO,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "cachefs"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out + (" (with uncommitted changes in cachefs/)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def load(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


# -- main -----------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", default=DEFAULT_PROFILES,
                   help=f"RTT/RATE, comma separated (default {DEFAULT_PROFILES})")
    p.add_argument("--peers", default=",".join(PEERS), help="comma separated (default: all)")
    p.add_argument("--only", nargs="+", metavar="NAMES",
                   help=f"workloads (comma or space separated): {' '.join(WORKLOADS)}")
    p.add_argument("--repeats", type=int, default=3, help="cachefs sessions per profile (default 3)")
    p.add_argument("--peer-repeats", type=int, default=1, help="sshfs and rclone sessions (default 1)")
    p.add_argument("--peers-everywhere", action="store_true",
                   help="run sshfs and rclone at every profile, not only the first")
    p.add_argument("--idle", type=float, default=25.0, help="seconds of idle before the warm figures (default 25)")
    p.add_argument("--big-mb", type=int, default=32, help="the large file (default 32 MiB)")
    p.add_argument("--quick", action="store_true",
                   help="the first profile only, one session each, 5 s idle, an 8 MiB large file")
    p.add_argument("--no-commands", action="store_true",
                   help="a server that runs no commands (ForceCommand internal-sftp)")
    p.add_argument("--cachefs-args", default="", help="extra options for cachefs's mount.py (one string)")
    p.add_argument("--max-minutes", type=float, default=90.0, help="skip what is left after this (default 90)")
    p.add_argument("--idle-cost", action="store_true", help="measure idle mounts instead (see above)")
    p.add_argument("--idle-mounts", default="1,2,4", help="idle cachefs mounts per run (default 1,2,4)")
    p.add_argument("--idle-window", type=float, default=60.0, help="seconds counted (default 60)")
    p.add_argument("--idle-settle", type=float, default=15.0, help="seconds before counting (default 15)")
    p.add_argument("--report", action="store_true", help="only write the docs page again from the JSON files")
    p.add_argument("--baseline", type=Path, help="a former wan.json: adds a 'cachefs before' column")
    p.add_argument("--json", type=Path, help=f"where the figures go (default {JSON_MAIN.relative_to(REPO)}, "
                                             f"--idle-cost: {JSON_IDLE.relative_to(REPO)})")
    p.add_argument("--no-docs", action="store_true", help=f"do not write {DOC.relative_to(REPO)}")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, caches)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    names = [n for item in (args.only or []) for n in item.split(",") if n]
    bad = [n for n in names if n not in WORKLOADS]
    if bad:
        p.error(f"unknown workload(s): {', '.join(bad)}; known: {', '.join(WORKLOADS)}")
    args.workloads = [w for w in WORKLOADS if not names or w in names]
    args.peer_list = [x for x in args.peers.split(",") if x]
    if any(x not in PEERS for x in args.peer_list):
        p.error(f"peers are {', '.join(PEERS)}")
    try:
        args.profile_list = [Profile.parse(x) for x in args.profiles.split(",") if x]
        args.idle_mount_counts = [int(x) for x in args.idle_mounts.split(",") if x]
    except ValueError as exc:
        p.error(str(exc))
    if args.quick:
        args.profile_list = args.profile_list[:1]
        args.repeats = args.peer_repeats = 1
        args.idle = min(args.idle, 5.0)
        args.big_mb = min(args.big_mb, 8)
    if args.repeats < 1 or args.peer_repeats < 1:
        p.error("--repeats and --peer-repeats must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    json_path = args.json or (JSON_IDLE if args.idle_cost else JSON_MAIN)
    if args.report:
        data, idle = load(JSON_MAIN), load(JSON_IDLE)
        write_doc(data, idle, load(args.baseline))
        print(f"written to {DOC}")
        return 0
    started = time.monotonic()
    sys.setswitchinterval(0.0005)  # the relay's thread shares this process: wake it on time

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="cachefs-wan-"))
    os.chmod(workdir, 0o755)
    log(f"work folder {workdir}")
    server = SshServer(workdir / "sshd", force_internal_sftp=args.no_commands)
    bench = WanBench(args, workdir, server, Endpoint.of(server),
                     cachefs_options=shlex.split(args.cachefs_args),
                     deadline=started + args.max_minutes * 60)
    for peer in list(args.peer_list):
        if peer != "cachefs" and shutil.which(peer) is None:
            bench.notes.append(f"{peer} is not installed: skipped")
            args.peer_list.remove(peer)
    rc = 0
    idle: dict[str, Any] | None = None
    try:
        server.start()
        log(f"sshd on {server.host}:{server.port}{' (runs no commands)' if args.no_commands else ''}")
        bench.fill_share()
        if args.idle_cost:
            idle = idle_cost(args, bench)
        else:
            for i, profile in enumerate(args.profile_list):
                bench.run_profile(profile, first=(i == 0))
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}): reporting what was measured")
        bench.notes.append("the run was interrupted; figures are partial")
        rc = 130
    finally:
        for mount in list(bench.live_mounts):
            try:
                mount.stop()
            except Exception as exc:  # noqa: BLE001
                log(f"stopping {mount.tag} failed: {exc}")
        server.stop()
    exe = sys.executable
    if Path(exe).is_relative_to(REPO):
        exe = os.path.relpath(exe, REPO)
    common = {"command": shlex.join([exe, "bench/wan.py", *sys.argv[1:]]),
              "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "minutes": (time.monotonic() - started) / 60, "machine": machine_line(),
              "versions": versions(), "commit": commit_id(),
              "cachefs_note": ("server runs no commands" if args.no_commands else "")
              + (f"; cachefs options {args.cachefs_args}" if args.cachefs_args else "")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.idle_cost:
        assert idle is not None
        idle.update(common)
        json_path.write_text(json.dumps(idle, indent=1) + "\n")
        print(idle_section(idle))
    else:
        data = dict(common, profiles=[dict(name=p.name, rtt_ms=p.rtt_ms, rate_bit=p.rate_bit, label=p.label)
                                      for p in args.profile_list],
                    peers=args.peer_list, repeats=args.repeats, peer_repeats=args.peer_repeats,
                    peers_everywhere=args.peers_everywhere, idle=args.idle, big_mb=args.big_mb,
                    workloads=args.workloads,
                    metrics=[vars(m) for m in metric_list(args.idle, args.big_mb)],
                    samples=bench.samples, errors=bench.errors, notes=list(dict.fromkeys(bench.notes)))
        json_path.write_text(json.dumps(data, indent=1) + "\n")
        print(table(data, load(args.baseline)))
    print(f"figures in {json_path}")
    if not args.no_docs:
        write_doc(load(JSON_MAIN), load(JSON_IDLE), load(args.baseline))
        print(f"written to {DOC}")
    if args.keep:
        log(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
