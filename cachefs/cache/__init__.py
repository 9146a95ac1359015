"""The cache: what is read is kept and served from here, and every local change is made
here with its journal entry. ``Cache`` (cache.py) is the one façade over parts that each own
their state: listings, content, open files, the write path, names; ``reconcile`` holds the
replay's named store changes, ``hoard`` pins and eviction, ``transfer`` the blocking jobs.
Below it: store/, link/, remote/. Never imports FUSE or sync/."""
