#!/usr/bin/env python3
"""How the listing path scales: a cold ``find`` over a tree of N one-byte files (folders of
1,000), cachefs against sshfs, on loopback.

    .venv/bin/python bench/scale.py [--files 10k,100k,300k] [--peers cachefs,sshfs,floor]
                                    [--reps 3] [--workdir DIR] [--profile]

For each size: the tree is made once in the share of a private sshd (kept in ``--workdir``
when one is given, so a second run skips it: 300k files take ~40 s to make and 1.2 GiB of
inodes on ext4; 1M ~2.5 min), then for each repetition and peer a fresh mount (empty
cache), the page cache dropped, and:

- ``find MNT -type f | wc -l`` (cold; its count checked),
- ``find MNT -type f -printf '%s'`` (every file's stat; the entries are cached now),
- the cachefs index's size on disk (``du`` of ``index/``) and the peak RSS of the cachefs
  process (``VmHWM``; the transfer processes apart, summed in ``rss_workers``).

Peer ``floor`` is ``bench/tree_floor.py``: the same tree served by pyfuse3 from memory, the
least any pyfuse3 filesystem takes for the walk (cachefs also lists the remote and keeps
what it lists).

``--profile`` runs the cachefs daemon under cProfile (its trio thread) and prints the top
of the profile after the first cachefs repetition of each size. Mounts use the defaults
and are taken down by ``bench/run.py``'s ``Mount`` (``fusermount3 -u -z``, the process
ended by its PID).
"""

from __future__ import annotations

import argparse
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from harness import Endpoint  # noqa: E402
from run import MiB, Mount, descendants, drop_caches, du_bytes, log, proc_status  # noqa: E402

from devtools.devserver import SshServer  # noqa: E402

PER_FOLDER = 1000
FIND_TIMEOUT = 900


def parse_count(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("km")) * scale)


def make_tree(root: Path, files: int) -> None:
    """``files`` one-byte files in folders of ``PER_FOLDER``; made once (a marker says so)."""
    marker = root.parent / f".{root.name}.complete"
    if marker.exists():
        return
    if root.exists():
        shutil.rmtree(root)
    started = time.perf_counter()
    root.mkdir(parents=True)
    for d in range((files + PER_FOLDER - 1) // PER_FOLDER):
        folder = root / f"d{d:04d}"
        folder.mkdir()
        base = os.fsencode(folder)
        for f in range(min(PER_FOLDER, files - d * PER_FOLDER)):
            fd = os.open(base + b"/f%04d" % f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"x")
            os.close(fd)
    marker.touch()
    log(f"made {files} files in {time.perf_counter() - started:.1f} s")


@dataclass
class ScaleBench:
    """What ``run.Mount`` needs of a bench: the server, a work folder, the live mounts."""

    server: SshServer
    workdir: Path
    endpoint: Endpoint
    profile: bool = False
    cachefs_options: list[str] = field(default_factory=list)
    live_mounts: list[Mount] = field(default_factory=list)
    rclone_conf: Path | None = None


class ScaleMount(Mount):
    """A mount with the options of ``--cachefs-options``; cachefs's daemon under cProfile
    (written when it exits) when ``profile`` is given."""

    def __init__(self, bench: ScaleBench, peer: str, tag: str, profile: Path | None) -> None:
        super().__init__(bench, peer, tag)  # type: ignore[arg-type]
        self.profile = profile

    def command(self) -> list[str]:
        cmd = super().command()  # (with ``--cachefs-options`` for cachefs)
        if self.peer != "cachefs" or self.profile is None:
            return cmd
        return [cmd[0], "-m", "cProfile", "-o", str(self.profile), *cmd[1:]]


class FloorMount:
    """``bench/tree_floor.py`` mounted: the tree's shape from memory (the floor of a
    pyfuse3 filesystem under any cold find of cachefs's), taken down by its PID."""

    def __init__(self, bench: ScaleBench, files: int, tag: str) -> None:
        self.path = bench.workdir / "mnt" / tag
        self.files = files
        self.pid: int | None = None
        self.cache_dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> FloorMount:
        self.path.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen([sys.executable, str(REPO / "bench" / "tree_floor.py"),
                                          str(self.path), str(self.files)])
        self.pid = self._process.pid
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.path):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the floor filesystem did not mount")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], check=False)
        if self._process is not None:
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_find(args: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(args, capture_output=True, timeout=FIND_TIMEOUT, check=True).stdout
    return time.perf_counter() - started, out.decode()


def measure(bench: ScaleBench, peer: str, files: int, rep: int) -> dict[str, float]:
    tag = f"{files}-{peer}-{rep}"
    profile = bench.workdir / "profiles" / f"{tag}.prof"
    profiled = bench.profile and peer == "cachefs" and rep == 0
    if profiled:
        profile.parent.mkdir(parents=True, exist_ok=True)
    mount: ScaleMount | FloorMount = FloorMount(bench, files, tag) if peer == "floor" else \
        ScaleMount(bench, peer, tag, profile if profiled else None)
    out: dict[str, float] = {}
    with mount:
        tree = mount.path / f"t{files}"
        drop_caches()
        pids = [mount.pid, *descendants(mount.pid)] if mount.pid is not None else []
        cpu_before = [cpu_seconds(pid) for pid in pids]
        assert bench.server._process is not None
        server_pids = descendants(bench.server._process.pid)
        server_before = sum(cpu_seconds(pid) for pid in server_pids)
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        took, text = run_find(["sh", "-c", f"find '{tree}' -type f | wc -l"])
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        out["cpu_find"] = (children.ru_utime + children.ru_stime
                           - children_before.ru_utime - children_before.ru_stime)
        out["cpu_server"] = sum(cpu_seconds(pid) for pid in server_pids) - server_before
        if pids:
            out["cpu_main"] = cpu_seconds(pids[0]) - cpu_before[0]
            out["cpu_workers"] = sum(cpu_seconds(p) - c for p, c in zip(pids[1:], cpu_before[1:]))
        if int(text) != files:
            raise RuntimeError(f"{peer}: find counted {text.strip()} files, expected {files}")
        out["find_cold"] = took
        took, text = run_find(["find", str(tree), "-type", "f", "-printf", "%s\n"])
        if text.count("\n") != files:
            raise RuntimeError(f"{peer}: the stat walk counted {text.count(chr(10))} files")
        out["stat_walk"] = took
        if mount.pid is not None:
            hwm = proc_status(mount.pid, "VmHWM")
            if hwm:
                out["rss_peak_mib"] = hwm / MiB
            workers = [proc_status(pid, "VmHWM") or 0 for pid in descendants(mount.pid)]
            if workers:
                out["rss_workers_mib"] = sum(workers) / MiB
        if peer == "cachefs" and mount.cache_dir is not None:
            out["index_mib"] = du_bytes(mount.cache_dir / "index") / MiB
    if profile.exists():
        log(f"profile of {tag}: {profile}")
        stats = pstats.Stats(str(profile))
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", default="10k,100k,300k", help="tree sizes, comma-separated (10k, 1M, ...)")
    parser.add_argument("--peers", default="cachefs,sshfs,floor",
                        help="cachefs, sshfs, floor (bench/tree_floor.py: the shape from memory)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="kept between runs (the trees are made once)")
    parser.add_argument("--profile", action="store_true", help="cProfile the first cachefs mount of each size")
    parser.add_argument("--cachefs-options", default="", help="more options for cachefs's mount (for experiments)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cachefs-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    share = workdir / "share"
    share.mkdir(exist_ok=True)
    sizes = [parse_count(s) for s in args.files.split(",")]
    for files in sizes:
        make_tree(share / f"t{files}", files)
    server = SshServer(workdir / "sshd", share=share)
    server.start()
    bench = ScaleBench(server, workdir / time.strftime("run-%Y%m%d-%H%M%S"), Endpoint.of(server),
                       args.profile, args.cachefs_options.split())
    results: dict[tuple[int, str], dict[str, list[float]]] = {}
    try:
        for files in sizes:
            for rep in range(args.reps):
                for peer in args.peers.split(","):
                    figures = measure(bench, peer, files, rep)
                    log(f"{files} {peer} #{rep}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
                    for key, value in figures.items():
                        results.setdefault((files, peer), {}).setdefault(key, []).append(value)
    finally:
        for mount in list(bench.live_mounts):
            mount.stop()
        server.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n| files | peer | find cold s | its CPU s: mount, workers | find's own CPU s | server CPU s "
          "| stat walk s | peak RSS MiB | workers' RSS MiB | index MiB |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (files, peer), figures in results.items():
        cells = [f"{statistics.median(figures[k]):.2f}" if k in figures else ""
                 for k in ("find_cold", "cpu_main", "cpu_find", "cpu_server", "stat_walk", "rss_peak_mib",
                           "rss_workers_mib", "index_mib")]
        if "cpu_workers" in figures:
            cells[1] += f", {statistics.median(figures['cpu_workers']):.2f}"
        print(f"| {files:,} | {peer} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
