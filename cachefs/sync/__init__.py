"""The synchronization manager: connectivity, and (next) replay of the journal."""
