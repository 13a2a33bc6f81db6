"""Real local servers for tests and the lab.  Each binds to an address given by the caller
(port 0 for an ephemeral port) and exposes the bound port; all are asyncio-based and
stop cleanly via ``close()`` / async context manager (`AsyncServer`)."""

from __future__ import annotations

from typing import Self


class AsyncServer:
    """``async with server:`` runs `start` on entry and `close` on exit, for every server.

    Subclasses implement both; `start` returns the server so ``async with X(...) as s``
    binds the started object.
    """

    async def start(self) -> Self:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
