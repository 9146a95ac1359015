"""cachefs: a FUSE filesystem that keeps a network folder usable offline."""

__version__ = "0.1.0"
