"""The console's replay page: a window of a FHIR source planned again, as `connector replay` does. A dry run
first (what would be planned, and what the ledger already holds and so suppresses), then a confirmed run
that records the new notifications (the daemon's dispatcher sends them when due) and is audited.

    GET  /console/replay           the form (operators)
    POST /console/replay           dry run, or with `confirm` the real run (operators; CSRF; a reason)

Only the console served by `connector run` offers it: it needs the sources and the planner.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from connector.errors import ConnectorError
from connector.intake.replay import pages_between, replan
from connector.web.console.auth import Gate

if TYPE_CHECKING:
    from starlette.requests import Request

    from connector.intake.planner import Planner
    from connector.intake.polling import Poller
    from connector.ledger.abc import Reports
    from connector.results import Replay
    from connector.web.console.pages import Console

log = structlog.get_logger("connector.console")
SHOWN = 500  # rows of a replay listed on the page


class Replayer:
    """Plans a window of a source again with the daemon's own planner (dry or for real)."""

    def __init__(self, planner: Planner, poller: Poller, reports: Reports) -> None:
        self.planner, self.poller, self.reports = planner, poller, reports

    async def __call__(self, source: str, since: datetime | None, until: datetime | None, dry: bool) -> Replay:
        pages = pages_between(self.poller, source, since, until)
        return await replan(self.planner, self.reports, source, pages, dry_run=dry)


def _instant(value: str) -> datetime | None:
    value = value.strip()
    if not value:
        return None
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class ReplayPages:
    def __init__(self, console: Console, replayer: Replayer | None) -> None:
        self.console, self.replayer = console, replayer

    def routes(self) -> list[Route]:
        path = self.console.prefix + "/replay"
        return [Route(path, self.form, methods=["GET"]), Route(path, self.run, methods=["POST"])]

    def _page(self, user: Any, status: int = 200, **values: Any) -> HTMLResponse:
        sources = list(self.console.config.sources)
        values = {"form": {}, "result": None, "problem": None, **values}
        return self.console.page("replay.html", user, status, sources=sources, offered=bool(self.replayer), **values)

    async def form(self, request: Request) -> Response:
        user = await self.console.who(request)
        if user is None:
            return self.console.to_login()
        return self._page(user)

    async def run(self, request: Request) -> Response:
        console = self.console
        user, form = await console.posted(request)
        if user is None:
            return console.refuse("replay", "no session: sign in first", 401)
        if not Gate.csrf_ok(user, form.get("csrf")):
            return console.refuse("replay", "the form's CSRF token is missing or wrong")
        if not user.operator:
            return console.refuse("replay", "viewers cannot replay")
        if self.replayer is None:
            return console.refuse("replay", "replays need the sources: open the console served by `connector run`", 409)
        source = form.get("source", "")
        if source not in console.config.sources:
            return self._page(user, 400, form=form, problem="choose one of the FHIR sources")
        try:
            since, until = _instant(form.get("since", "")), _instant(form.get("until", ""))
        except ValueError:
            return self._page(user, 400, form=form, problem="since/until: a date or time such as 2026-12-01T08:00")
        confirm = form.get("confirm") == "yes"
        reason = " ".join(form.get("reason", "").split())[:500]
        if confirm and len(reason) < 3:
            return self._page(user, 400, form=form, problem="a confirmed replay needs a reason")
        try:
            result = await self.replayer(source, since, until, dry=not confirm)
        except ConnectorError as exc:
            return self._page(user, 502, form=form, problem=f"the source could not be read: {exc}")
        if confirm:
            inserted = sum(1 for item in result.items if item.inserted)
            window = f"since={since.isoformat() if since else '-'}, until={until.isoformat() if until else '-'}"
            scope = f"source={source}, {window}"
            await console.db.run(
                console.db.sync.console.audit, user.name, user.role, "replay", reason, None, f"{scope}, {inserted} new"
            )
            log.info("console.replayed", user=user.name, source=source, inserted=inserted)
        return self._page(user, form=form, result=result, confirmed=confirm, shown=SHOWN)
