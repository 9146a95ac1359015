#!/usr/bin/env python3
"""Mount a remote share with cachefs: ``python mount.py REMOTE MOUNTPOINT [options]``.

The same as ``cachefs mount``; see ``python mount.py --help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cachefs.cli import mount_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(mount_main())
