"""The local cache: LMDB index and content files."""
