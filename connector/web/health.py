"""Health and metrics endpoints of `connector run`:

GET /livez     200 while the process serves requests (what a container engine's health check asks)
GET /healthz   readiness: 200 when every part is well, else 503; a JSON body names each failing part,
               since when and why (connector.monitor gathers the facts, connector.health judges them)
GET /metrics   Prometheus text (connector.monitor.Monitor.exposition)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from connector import health

if TYPE_CHECKING:
    from connector.monitor import Monitor


def routes(monitor: Monitor) -> list[Route]:
    async def livez(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def healthz(request: Request) -> Response:
        ok, body = health.report(await monitor.findings())
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        return Response(await monitor.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return [
        Route("/livez", livez, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
