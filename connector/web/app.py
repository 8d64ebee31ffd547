"""The HTTP app of `connector run` (`server:` in the config): every endpoint, each behind `guarded`.

    POST /webhooks/paubox/<token>                  Paubox webhook events               connector.web.paubox
    POST /fhir/<source>/notify                     FHIR Subscription notifications    connector.web.fhir
    PUT  /fhir/<source>/notify/Appointment/<id>    R4 rest-hook with the resource     connector.web.fhir
    POST /webhooks/crm/<source>[/<path_token>]     CRM webhooks                       connector.web.crm
    GET  /livez, /healthz, /metrics                health and metrics                 connector.web.health
    GET, POST /console/...                         the operator console (`console:`)   connector.web.console
    GET|POST /links/<action>/<token>               patients' links (GET shows, POST acts) connector.web.links

Endpoints verify, parse and hand over; no mapping logic lives here. Bodies are PHI: never logged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.routing import Route

from connector.web import paubox
from connector.web.common import guarded

if TYPE_CHECKING:
    from connector.config import Config
    from connector.ledger.sql import SqlLedger
    from connector.sending.aftercare import Aftercare
    from connector.web.console.preview import Previewer
    from connector.web.console.replay import Replayer


def create_app(config: Config, aftercare: Aftercare, extra_routes: list[Route] | None = None) -> Starlette:
    """The Paubox webhook endpoint and `extra_routes` (the daemon adds every other endpoint), guarded."""
    routes = [*paubox.routes(config, aftercare), *(extra_routes or [])]
    return Starlette(routes=[Route(r.path, guarded(r.endpoint), methods=list(r.methods or ["GET"])) for r in routes])


def console_routes(
    config: Config, ledger: SqlLedger, preview: Previewer | None = None, replayer: Replayer | None = None
) -> list[Route]:
    """The operator console's pages, when `console:` is configured (none otherwise). `preview` and `replayer`
    (the daemon's preparers, planner and poller): without them the console offers no previews or replays."""
    if config.console is None:
        return []
    from connector.ledger.aio import AsyncConsole
    from connector.web.console.pages import Console
    from connector.web.console.replay import ReplayPages

    console = Console(config, AsyncConsole(ledger), preview)
    routes = [*console.routes(), *ReplayPages(console, replayer).routes()]
    return [Route(r.path, console.refusing_bad_forms(r.endpoint), methods=list(r.methods or ["GET"])) for r in routes]
