#!/usr/bin/env python3
"""Mount a remote share with cachefs: ``python mount.py REMOTE MOUNTPOINT [options]``.

The same as ``cachefs mount``; see ``python mount.py --help``. Any python3 may run it: when
the one running it lacks cachefs's dependencies and the checkout has its ``.venv`` (made
by ``scripts/run``), it runs itself again with the venv's python; without one it says in
one line how to run it.
"""

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv"
#: the modules cachefs imports from its dependencies (pyproject.toml's list)
DEPENDENCIES = ("pyfuse3", "trio", "lmdb", "paramiko", "cryptography")


def _missing() -> list[str]:
    return [name for name in DEPENDENCIES if importlib.util.find_spec(name) is None]


def _in_venv() -> bool:
    try:
        return Path(sys.prefix).resolve() == VENV.resolve()
    except OSError:
        return False


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    missing = _missing()
    if missing:
        venv_python = VENV / "bin" / "python"
        if venv_python.exists() and not _in_venv():
            os.execv(venv_python, [str(venv_python), str(Path(__file__).resolve()), *sys.argv[1:]])
        sys.exit(f"mount.py: {sys.executable} lacks cachefs's dependencies ({', '.join(missing)}): "
                 f"run 'scripts/run setup demo' once (then any python runs mount.py), or install "
                 f"cachefs (docs/install.md) and run 'cachefs mount'")
    from cachefs.cli import mount_main

    sys.exit(mount_main())
