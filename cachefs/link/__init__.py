"""The link to the remote: connectivity (online, offline, offline by request), the worker
threads for backend calls, the heartbeat and the probe. Knows nothing of the cache."""
