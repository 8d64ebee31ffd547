"""The mailer's small connection pools (connector.delivery.pool) against the real Paubox sandbox: one
connection per request in flight, reused; no more clients than requests at once; all closed at the end."""

from __future__ import annotations

import asyncio
import ssl

import httpx

from connector.delivery.pool import ClientPool
from connector.sandbox.paubox import SandboxState
from connector.testing import USERNAME
from tests.conftest import API_KEY, Server


def pool_for(server: Server, size: int, made: list[httpx.AsyncClient]) -> ClientPool:
    def make(tls: ssl.SSLContext | None) -> httpx.AsyncClient:
        assert tls is not None  # one context, made once, for every client
        client = httpx.AsyncClient(
            base_url=f"{server.url}/v1/{USERNAME}/",
            headers={"Authorization": f"Token token={API_KEY}"},
            verify=tls,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )
        made.append(client)
        return client

    return ClientPool(make, size)


async def test_requests_one_at_a_time_share_one_client(paubox_server: Server) -> None:
    made: list[httpx.AsyncClient] = []
    pool = pool_for(paubox_server, 8, made)
    for _ in range(5):
        async with pool.client() as client:
            assert (await client.get("message_receipt", params={"sourceTrackingId": "x"})).status_code in (200, 404)
    assert len(made) == 1
    await pool.aclose()
    assert made[0].is_closed


async def test_concurrent_requests_each_get_a_client_up_to_the_size(
    paubox_state: SandboxState, paubox_server: Server
) -> None:
    paubox_state.latency = 0.2
    made: list[httpx.AsyncClient] = []
    pool = pool_for(paubox_server, 4, made)
    peak, running = 0, 0

    async def one() -> int:
        nonlocal peak, running
        async with pool.client() as client:
            running += 1
            peak = max(peak, running)
            response = await client.post("messages", content=b"{}", headers={"Content-Type": "application/json"})
            running -= 1
            return response.status_code

    statuses = await asyncio.gather(*(one() for _ in range(6)))
    assert statuses == [400] * 6  # the sandbox answered each (an empty message is refused)
    assert len(made) == 4 and peak == 6  # 4 clients; 2 requests waited for a connection of the least busy
    statuses = await asyncio.gather(*(one() for _ in range(3)))
    assert len(made) == 4  # reused
    await pool.aclose()
    assert all(client.is_closed for client in made)
