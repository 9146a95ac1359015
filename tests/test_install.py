"""How cachefs is installed and started: ``python mount.py`` with a python that lacks the
dependencies (the system's), the wheel that ``pip install``/``pipx install`` put on a
machine (its command, man page and completions), and the system packages that
docs/install.md names against the list scripts/run installs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from devtools.devserver import SshServer
from tests.fixtures.mount import REPO, fusermount_unmount, is_mounted, status

SYSTEM_PYTHON = "/usr/bin/python3"
RUN_TIMEOUT = 60.0


def _checkout_copy(root: Path, venv: Path | None) -> Path:
    """A checkout as mount.py sees one: mount.py, the package, and ``.venv`` when given
    (here the venv running the tests, which has every dependency)."""
    root.mkdir()
    (root / "mount.py").write_bytes((REPO / "mount.py").read_bytes())
    (root / "cachefs").symlink_to(REPO / "cachefs")
    if venv is not None:
        (root / ".venv").symlink_to(venv)
    return root


def _system_python_lacks_lmdb() -> None:
    result = subprocess.run([SYSTEM_PYTHON, "-c", "import lmdb"], capture_output=True)
    assert result.returncode != 0, (
        f"{SYSTEM_PYTHON} can import lmdb here, so this test cannot show what a python "
        "without cachefs's dependencies does")


def test_mount_py_with_the_system_python_mounts_through_the_venv(tmp_path: Path, sshd: SshServer,
                                                                share: Path) -> None:
    """README's ``python mount.py REMOTE MOUNTPOINT``, run by /usr/bin/python3: mount.py
    runs itself again with the checkout's .venv and the mount works."""
    _system_python_lacks_lmdb()
    (share / "hello.txt").write_text("hello from the share\n")
    checkout = _checkout_copy(tmp_path / "checkout", Path(sys.prefix))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pid = None
    try:
        result = subprocess.run(
            [SYSTEM_PYTHON, "mount.py", sshd.address(), str(mnt), "--cache-dir", str(tmp_path / "cache"),
             "--identity", str(sshd.identity), "--known-hosts", str(sshd.known_hosts)],
            cwd=checkout, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert is_mounted(mnt)
        pid = int(status(mnt)["pid"])
        assert (mnt / "hello.txt").read_text() == "hello from the share\n"
    finally:
        fusermount_unmount(mnt)
        if pid is not None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
                time.sleep(0.05)


def test_mount_py_without_a_venv_says_how_to_run_it(tmp_path: Path) -> None:
    _system_python_lacks_lmdb()
    checkout = _checkout_copy(tmp_path / "checkout", None)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = subprocess.run([SYSTEM_PYTHON, "mount.py", "host:share", str(mnt)], cwd=checkout,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mount.py: {SYSTEM_PYTHON} lacks cachefs's dependencies (")
    assert "lmdb" in lines[0] and "scripts/run setup demo" in lines[0], lines[0]
    assert not is_mounted(mnt)


def test_the_wheel_carries_the_command_man_page_and_completions(tmp_path: Path) -> None:
    """What pip install / pipx install put on a machine: the wheel built from the checkout
    has the ``cachefs`` command and, as data files under share/, the man page and the
    bash and zsh completions (the same bytes as data/)."""
    source = tmp_path / "source"  # a copy: a build leaves build/ and *.egg-info beside it
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "vagrant", "bench"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300)
    assert "invalid command 'bdist_wheel'" not in result.stderr, (
        "this venv's setuptools cannot build a wheel by itself: the [test] extra asks for "
        "setuptools>=70.1 (scripts/run setup installs it)")
    assert result.returncode == 0, result.stdout + result.stderr
    wheel = next(tmp_path.glob("cachefs-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        data = {name.split(".data/data/", 1)[1]: archive.read(name) for name in names if ".data/data/" in name}
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "cachefs = cachefs.cli:main" in entry_points
    assert data == {
        "share/man/man1/cachefs.1": (REPO / "data/cachefs.1").read_bytes(),
        "share/bash-completion/completions/cachefs": (REPO / "data/bash-completion/cachefs").read_bytes(),
        "share/zsh/site-functions/_cachefs": (REPO / "data/zsh/_cachefs").read_bytes(),
    }
    assert not any(name.startswith(("tests/", "devtools/", "bench/")) for name in names)


def _package_list(name: str) -> list[str]:
    text = (REPO / "scripts" / "run").read_text()
    match = re.search(rf"^{name}=\(([^)]*)\)", text, re.MULTILINE)
    assert match, f"scripts/run has no {name}=(...)"
    return match.group(1).split()


def test_install_docs_name_the_runtime_packages_scripts_run_installs() -> None:
    """docs/install.md's apt-get line is scripts/run's RUNTIME_PACKAGES (plus pipx, its
    way to install), so that the two cannot drift apart."""
    runtime = _package_list("RUNTIME_PACKAGES")
    text = (REPO / "docs" / "install.md").read_text()
    lines = re.findall(r"^sudo apt-get install (.*)$", text, re.MULTILINE)
    assert lines, "docs/install.md has no 'sudo apt-get install' line"
    assert lines[0].split() == [*runtime, "pipx"], lines[0]


def test_scripts_run_lists_name_each_package_once() -> None:
    lists = [_package_list(name) for name in
             ("RUNTIME_PACKAGES", "DEMO_PACKAGES", "BUILD_PACKAGES", "TEST_PACKAGES", "SERVER_PACKAGES",
              "BENCH_PACKAGES")]
    every = [package for packages in lists for package in packages]
    assert len(every) == len(set(every)), every
    # the demo installs no test, build or bench tool
    assert not {"vagrant", "ruby", "rclone", "sshfs", "git"} & {*lists[0], *lists[1]}


def _run_function(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``script`` in a bash that sourced scripts/run (which then only defines its functions)."""
    return subprocess.run(["bash", "-c", f'source "{REPO}/scripts/run"; {script}'], capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, env=env)


def test_each_command_sets_up_only_its_packages() -> None:
    runtime_and_demo = _package_list("RUNTIME_PACKAGES") + _package_list("DEMO_PACKAGES")
    build = _package_list("BUILD_PACKAGES")
    wanted = {
        "demo": runtime_and_demo,
        "tests": runtime_and_demo + build + _package_list("TEST_PACKAGES") + _package_list("SERVER_PACKAGES"),
        "bench": runtime_and_demo + build + _package_list("BENCH_PACKAGES") + _package_list("SERVER_PACKAGES"),
    }
    for purpose, packages in wanted.items():
        result = _run_function(f"packages_for {purpose}")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == packages, purpose
    result = subprocess.run([str(REPO / "scripts/run"), "setup", "everything"], capture_output=True, text=True,
                            timeout=RUN_TIMEOUT)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        "[scripts/run] ERROR: unknown set-up: everything (demo, tests or bench)"
    assert "installing" not in result.stderr


def test_the_link_on_path_never_replaces_a_working_cachefs(tmp_path: Path) -> None:
    target = tmp_path / "venv-cachefs"
    target.write_text("#!/bin/sh\n")
    link = tmp_path / "bin" / "cachefs"
    # none there: made (with its folder)
    assert _run_function(f'link_one "{target}" "{link}"').returncode == 0
    assert os.readlink(link) == str(target)
    # ours already: kept
    assert _run_function(f'link_one "{target}" "{link}"').returncode == 0
    # a dangling link (a removed checkout's): replaced
    link.unlink()
    link.symlink_to(tmp_path / "gone")
    assert _run_function(f'link_one "{target}" "{link}"').returncode == 0
    assert os.readlink(link) == str(target)
    # a cachefs that works (a pipx install, another checkout): left alone, and said so
    link.unlink()
    link.write_text("#!/bin/sh\necho pipx's\n")
    assert _run_function(f'link_one "{target}" "{link}"').returncode == 1
    assert link.read_text() == "#!/bin/sh\necho pipx's\n"
