"""Bounded HTTP exchanges: what a server sends can cost the connector only so many bytes and so much time.

    client = httpx.AsyncClient(event_hooks={"response": [capped(max_bytes)]})
    reply = await fetch(client, client.build_request("GET", url), max_bytes=…, deadline=…)

- `fetch` reads the body as a stream and stops as soon as it passes `max_bytes` (counted after
  decompression), without buffering more; the whole exchange (connection, headers, body) must finish
  within `deadline` seconds of wall-clock time, however slowly the bytes keep coming.
- `capped` is a response hook that counts the bytes on the wire of every response the client reads,
  including those httpx reads by itself (a 401 before an authorisation retry), and refuses a declared
  Content-Length over the limit before reading anything. A hook rather than a transport, so that the
  client keeps its own transports (proxies from the environment included).

Breaches raise `BodyTooLarge` or `TimeoutError`; callers turn them into a `SourceLimitError` that names the
source, the request and the setting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx

from connector.errors import ConnectorError, SourceError


class SourceLimitError(SourceError):
    """A server went past one of the source's limits; `limit` names the setting (or the rule) broken."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class BodyTooLarge(ConnectorError):
    """A response body passed the size limit (the caller turns it into a SourceLimitError naming it)."""


@dataclass(frozen=True)
class Reply:
    """A response read in full within the limits."""

    status_code: int
    headers: httpx.Headers
    content: bytes | bytearray  # as read: not copied again


class _CappedStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, max_bytes: int) -> None:
        self._inner, self._max_bytes = inner, max_bytes

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        async for chunk in self._inner:
            received += len(chunk)
            if received > self._max_bytes:
                raise BodyTooLarge
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


def capped(max_bytes: int) -> Callable[[httpx.Response], Awaitable[None]]:
    """A response event hook holding every response body of an AsyncClient to `max_bytes` as received."""

    async def cap(response: httpx.Response) -> None:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise BodyTooLarge  # httpx closes the response
        assert isinstance(response.stream, httpx.AsyncByteStream)  # an AsyncClient's responses
        response.stream = _CappedStream(response.stream, max_bytes)

    return cap


async def fetch(client: httpx.AsyncClient, request: httpx.Request, *, max_bytes: int, deadline: float) -> Reply:
    """Send `request` and read its whole body within `deadline` seconds and `max_bytes` decoded bytes.
    Raises BodyTooLarge, TimeoutError, or the client's own errors (httpx.HTTPError)."""
    async with asyncio.timeout(deadline):
        response = await client.send(request, stream=True)
        try:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise BodyTooLarge
        finally:
            await response.aclose()
    return Reply(response.status_code, response.headers, body)
