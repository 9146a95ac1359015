"""The persistent store: the LMDB index (nodes, entries, ranges, journal, conflicts, sums,
meta), the record formats and their checks, the journal entries, and the content files.
Knows nothing of the network, trio or FUSE."""
