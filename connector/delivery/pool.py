"""Many small HTTP connection pools instead of one large one.

httpcore looks at every connection of a pool, and asks the operating system whether each idle one is still
open, whenever a request starts or ends (encode/httpcore#928). With 16 or 32 requests at once through one
pool of as many connections, that bookkeeping cost more CPU than everything else a send does. Here each
request takes the least busy of up to `size` clients of one connection each, so it looks at one
connection; the clients are made when first needed (a `run --once` with nothing to send makes none) and
share one TLS context (loading the CA bundle once).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx


class ClientPool:
    """Up to `size` httpx clients made by `make(verify)`, each used by one request at a time when `size`
    requests or fewer run at once (more share the least busy)."""

    def __init__(self, make: Callable[[ssl.SSLContext | None], httpx.AsyncClient], size: int) -> None:
        self._make = make
        self._size = max(1, size)
        self._clients: list[httpx.AsyncClient] = []
        self._busy: list[int] = []
        self._tls: ssl.SSLContext | None = None

    @asynccontextmanager
    async def client(self) -> AsyncIterator[httpx.AsyncClient]:
        """The least busy client for one request (a new one while every client is busy and fewer than
        `size` exist)."""
        if len(self._clients) < self._size and all(self._busy):
            if self._tls is None:
                self._tls = httpx.create_ssl_context()
            self._clients.append(self._make(self._tls))
            self._busy.append(0)
        index = min(range(len(self._busy)), key=self._busy.__getitem__)
        self._busy[index] += 1
        try:
            yield self._clients[index]
        finally:
            self._busy[index] -= 1

    async def aclose(self) -> None:
        clients, self._clients, self._busy = self._clients, [], []
        for client in clients:
            await client.aclose()
