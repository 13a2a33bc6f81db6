"""Real local servers for tests and the lab.  Each binds to an address given by the caller
(port 0 for an ephemeral port) and exposes the bound port; all are asyncio-based and
stop cleanly via ``close()`` / async context manager."""
