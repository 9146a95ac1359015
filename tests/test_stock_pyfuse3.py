"""cachefs on the stock pyfuse3: what runs where scripts/build-passthrough could not build.

The suite itself runs on the pyfuse3 that scripts/build-passthrough builds (passthrough
and the request spin). This test mounts with a second venv, ``.venv-stock``
(``tests.fixtures.stock_venv``: pyfuse3 3.5.0 from PyPI on the system's libfuse), and
checks that reads, writes and status work there, and that status and the log say that
passthrough and the request spin are off, and why. The venv is built once and kept
(``scripts/run setup`` builds it); where it cannot be built this test fails, never skips.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from devtools.devserver import SshServer
from tests.fixtures import stock_venv
from tests.fixtures.mount import Mount, status
from tests.test_writes import sync

NO_FORK = "this pyfuse3 cannot ask for it; see scripts/build-passthrough"


@pytest.fixture(scope="session")
def stock_python() -> Path:
    return stock_venv.ensure()  # StockVenvError (a failure) when it cannot be built


class StockMount(Mount):
    """``mount.py`` run by the stock venv's python (``python``, set before ``start``)."""

    python: Path

    @property
    def command(self) -> list[str]:
        return [str(self.python), *super().command[1:]]


def test_reads_writes_and_status_on_the_stock_pyfuse3(stock_python: Path, sshd: SshServer, share: Path,
                                                     tmp_path: Path) -> None:
    check = subprocess.run([str(stock_python), "-c", "import pyfuse3; print(pyfuse3.__version__)"],
                           capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == "3.5.0", check.stderr
    big = os.urandom(3 << 20)  # above the passthrough threshold: the process serves it
    (share / "big.bin").write_bytes(big)
    (share / "doc.txt").write_bytes(b"hello\n")
    mount = StockMount(sshd.address(), tmp_path / "mnt", tmp_path / "cache",
                       "--identity", str(sshd.identity), "--known-hosts", str(sshd.known_hosts),
                       "--timeout", "2", "--attr-timeout", "1", "--heartbeat", "1", "-v")
    mount.python = stock_python
    with mount:
        mnt = mount.mountpoint
        state = status(mnt)
        assert state["state"] == "online"
        assert state["passthrough"] == {"on": False, "open_files": 0, "off": NO_FORK}
        assert (mnt / "doc.txt").read_bytes() == b"hello\n"
        for _ in range(2):  # the second read finds the content whole in the cache
            with open(mnt / "big.bin", "rb") as f:
                assert f.read() == big
                assert status(mnt)["passthrough"]["open_files"] == 0
        (mnt / "new.txt").write_bytes(b"written here\n")
        with open(mnt / "doc.txt", "ab") as f:
            f.write(b"and more\n")
        sync(mnt)
        assert (share / "new.txt").read_bytes() == b"written here\n"
        assert (share / "doc.txt").read_bytes() == b"hello\nand more\n"
        shown = subprocess.run([str(stock_python.parent / "cachefs"), "status", str(mnt)],
                               capture_output=True, text=True, timeout=30)
        assert shown.returncode == 0, shown.stderr
        assert f"passthrough:     off ({NO_FORK}; this process serves every read)" in shown.stdout
    assert mount.log_path is not None
    log = mount.log_path.read_text()
    assert f"kernel passthrough: off ({NO_FORK})" in log
    assert "request spin: off (this pyfuse3 cannot" in log
