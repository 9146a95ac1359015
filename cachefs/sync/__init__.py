"""The synchronization manager: the replay of the journal onto the remote, conflicts,
server hashes and the schedule, behind one façade (``SyncManager``, manager.py). The only
component that changes the remote; changes the store only through named operations
(``cache.reconcile``, the store's journal operations)."""
