"""The console's endpoints (under `console.path`, `/console` by default): server-rendered pages, no script.

    GET  /console                          overview: sources, mailer, counts, attention list, charts
    GET, POST /console/notifications       search (appointment, patient, key, state, mapping, source, due window)
    GET  /console/notifications/<id>       one notification's timeline
    POST /console/notifications/<id>/act   resolve an in_doubt one (sent, resend, cancel) or retry a failed one
    POST /console/notifications/act        the same for every notification a search finds (operators)
    POST /console/notifications/<id>/preview   the email as it would be sent now (operators; audited)
    GET  /console/appointments/<id>        everything planned for one appointment, and what was seen of it
    GET  /console/audit                    what people did here
    GET, POST /console/replay              a window of a source planned again (connector.web.console.replay)
    GET, POST /console/login; POST /console/logout

A GET never changes anything. Every POST carries the session's CSRF token (403 without it); actions need the
operator role and a reason, and are written to the audit table with the change they make.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs

import structlog
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from connector.errors import ConnectorError
from connector.ledger.console import ACTIONS, Action, Search
from connector.models import State
from connector.web.common import RequestTooLarge, read_body
from connector.web.console import facts
from connector.web.console.auth import Gate, User

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from starlette.requests import Request

    from connector.config import Config
    from connector.ledger.aio import AsyncConsole
    from connector.web.console.preview import Previewer

log = structlog.get_logger("connector.console")
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
PRIVATE = ("patient_id", "key")  # search fields refused in a GET's query string: they would sit in URLs and logs
FIELDS = ("appointment_id", "patient_id", "key", "state", "mapping", "source", "since", "until")


class BadForm(ConnectorError, ValueError):
    """A search or form field that cannot be understood; the message names the field."""


def search_from(values: Any) -> Search:
    def text(name: str) -> str | None:
        value = str(values.get(name) or "").strip()
        if len(value) > 512:
            raise BadForm(f"{name} is too long")
        return value or None

    def instant(name: str) -> datetime | None:
        value = text(name)
        if value is None:
            return None
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise BadForm(f"{name}: give a date or time such as 2026-12-01 or 2026-12-01T08:00") from None
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

    state = text("state")
    if state is not None and state not in {s.value for s in State}:
        raise BadForm(f"state: one of {', '.join(s.value for s in State)}")
    return Search(
        text("appointment_id"), text("patient_id"), text("key"), State(state) if state else None, text("mapping"),
        text("source"), instant("since"), instant("until"),
    )  # fmt: skip


async def form_of(request: Request) -> dict[str, str]:
    """A posted form (application/x-www-form-urlencoded, at most 64 KiB and 40 fields); the first value of
    each field. BadForm otherwise (answered 400 by `Console.refusing_bad_forms`)."""
    try:
        body = await read_body(request, 65536)
    except RequestTooLarge:
        raise BadForm("the form is larger than 64 KiB") from None
    try:
        fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=40)
    except ValueError:  # more fields than that
        raise BadForm("the form has more than 40 fields") from None
    return {name: values[0] for name, values in fields.items()}


class Console:
    def __init__(self, config: Config, db: AsyncConsole, preview: Previewer | None = None) -> None:
        assert config.console is not None
        self.config, self.settings, self.db, self.preview = config, config.console, db, preview
        self.prefix = self.settings.path
        trusted = list(config.server.trusted_proxies) if config.server else []
        self.gate = Gate(self.settings, trusted)
        self.templates = Environment(
            loader=PackageLoader("connector.web.console", "templates"), autoescape=select_autoescape(default=True)
        )

    def routes(self) -> list[Route]:
        p = self.prefix
        return [
            Route(p, self.overview, methods=["GET"]),
            Route(p + "/login", self.login_page, methods=["GET"]),
            Route(p + "/login", self.login, methods=["POST"]),
            Route(p + "/logout", self.logout, methods=["POST"]),
            Route(p + "/notifications", self.notifications, methods=["GET", "POST"]),
            Route(p + "/notifications/act", self.act_many, methods=["POST"]),
            Route(p + "/notifications/{nid:int}", self.notification, methods=["GET"]),
            Route(p + "/notifications/{nid:int}/act", self.act_one, methods=["POST"]),
            Route(p + "/notifications/{nid:int}/preview", self.show_preview, methods=["POST"]),
            Route(p + "/appointments/{aid}", self.appointment, methods=["GET"]),
            Route(p + "/audit", self.audit, methods=["GET"]),
        ]

    def refusing_bad_forms(self, endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[..., Any]:
        """`endpoint`, with a form too large or with too many fields refused (400), not a crash (500)."""

        async def wrapper(request: Request) -> Response:
            try:
                return await endpoint(request)
            except BadForm as exc:
                return self.refuse("form", str(exc), 400)

        return wrapper

    # pages ------------------------------------------------------------------------------------------------

    def page(self, name: str, user: User | None, status: int = 200, **values: Any) -> HTMLResponse:
        html = self.templates.get_template(name).render(p=self.prefix, user=user, states=list(State), **values)
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    async def who(self, request: Request) -> User | None:
        """The signed-in user of this request, unless the session was signed out (in any process: the
        ledger keeps sign-outs)."""
        user = self.gate.user(request)
        if user is None or user.sso:
            return user
        ended = await self.db.run(self.db.sync.console.signed_out, Gate.session_id(user))
        return None if ended else user

    def to_login(self) -> Response:
        return RedirectResponse(self.prefix + "/login", status_code=303, headers=HEADERS)

    async def overview(self, request: Request) -> Response:
        user = await self.who(request)
        if user is None:
            return self.to_login()
        found = await self.db.run(facts.overview, self.config, self.db.sync, datetime.now(UTC))
        return self.page("overview.html", user, o=found)

    async def notifications(self, request: Request) -> Response:
        """The search. The page's form posts it (so that patient ids and keys stay out of URLs, browser history
        and proxy logs); a GET with the same fields works too (the overview's links by state)."""
        if request.method == "POST":
            user, params = await self.posted(request)
            if user is None:
                return self.to_login()
            if not Gate.csrf_ok(user, params.get("csrf")):
                return self.refuse("search", "the form's CSRF token is missing or wrong")
        else:
            user, params = await self.who(request), dict(request.query_params)
            if user is None:
                return self.to_login()
            named = [name for name in PRIVATE if name in params]
            if named:  # patient ids and keys are posted with the form, never put in an address
                problem = f"{', '.join(named)}: search with the form; these are never taken from the address"
                return self.page(
                    "notifications.html", user, 400, rows=[], problem=problem, q={}, more=None, fields=FIELDS
                )
        try:
            search = search_from(params)
            before = int(params["before"]) if params.get("before", "").isdigit() else None
        except BadForm as exc:
            return self.page(
                "notifications.html", user, 400, rows=[], problem=str(exc), q=params, more=None, fields=FIELDS
            )
        size = self.settings.page_size
        rows = await self.db.run(self.db.sync.console.search, search, before, size + 1)
        more = rows[size - 1].id if len(rows) > size else None
        return self.page(
            "notifications.html", user, rows=rows[:size], q=params, more=more, problem=None,
            searched=any(params.get(k) for k in FIELDS), fields=FIELDS,
        )  # fmt: skip

    async def notification(self, request: Request) -> Response:
        user = await self.who(request)
        if user is None:
            return self.to_login()
        detail = await self.db.run(self.db.sync.console.detail, request.path_params["nid"])
        if detail is None:
            return self.page("message.html", user, 404, title="Not found", text="No notification has this id.")
        actions = [a for a, (states, _) in ACTIONS.items() if detail.record.state in states]
        return self.page(
            "detail.html", user, t=facts.timeline(detail), n=detail.record, actions=actions,
            previews=self.preview is not None,
        )  # fmt: skip

    async def appointment(self, request: Request) -> Response:
        user = await self.who(request)
        if user is None:
            return self.to_login()
        aid = str(request.path_params["aid"])[:128]
        story = await self.db.run(facts.appointment, self.db.sync, aid)
        return self.page("appointment.html", user, s=story)

    async def audit(self, request: Request) -> Response:
        user = await self.who(request)
        if user is None:
            return self.to_login()
        before = request.query_params.get("before", "")
        entries = await self.db.run(self.db.sync.console.audit_log, int(before) if before.isdigit() else None, 101)
        more = entries[99].id if len(entries) > 100 else None
        return self.page("audit.html", user, entries=entries[:100], more=more)

    # sign-in ----------------------------------------------------------------------------------------------

    def login_form(self, request: Request, problem: str | None = None, status: int = 200) -> HTMLResponse:
        """The sign-in page, its token bound to this browser's pre-session cookie (set here when missing)."""
        nonce, new = self.gate.login_nonce(request)
        token = self.gate.login_token(nonce)
        page = self.page("login.html", None, status, token=token, problem=problem, local=bool(self.settings.users))
        if new:
            self.gate.keep_login_nonce(page, nonce, self.prefix)
        return page

    async def login_page(self, request: Request) -> Response:
        if await self.who(request) is not None:
            return RedirectResponse(self.prefix, status_code=303, headers=HEADERS)
        return self.login_form(request)

    async def login(self, request: Request) -> Response:
        form = await form_of(request)
        if not self.gate.login_token_ok(request, form.get("csrf")):
            why = "the sign-in form's token is missing, stale or from another browser: open the sign-in page again"
            return self.refuse("login", why)
        name, password = str(form.get("user", ""))[:64], str(form.get("password", ""))[:1024]
        address = request.client.host if request.client else ""
        user = self.gate.sign_in(name, password, address)
        if isinstance(user, str):
            log.warning("console.sign_in_refused", problem=user)
            return self.login_form(request, user, 401)
        log.info("console.signed_in", user=user.name, role=user.role)
        response = RedirectResponse(self.prefix, status_code=303, headers=HEADERS)
        self.gate.start_session(response, user, self.prefix)
        self.gate.drop_login_nonce(response, self.prefix)  # a new form (and value) for the next sign-in
        return response

    async def logout(self, request: Request) -> Response:
        user, form = await self.posted(request)
        if user is None or not Gate.csrf_ok(user, form.get("csrf")):
            return self.refuse("logout", "no session or CSRF token")
        if not user.sso:  # refused from now on by every process serving the console, restarted ones too
            now = datetime.now(UTC)
            until = now + self.settings.session_lifetime
            await self.db.run(self.db.sync.console.sign_out, Gate.session_id(user), until, now)
        log.info("console.signed_out", user=user.name)
        response = self.to_login()
        self.gate.end_session(response, self.prefix)
        return response

    # actions ----------------------------------------------------------------------------------------------

    async def posted(self, request: Request) -> tuple[User | None, Any]:
        return await self.who(request), await form_of(request)

    def refuse(self, what: str, reason: str, status: int = 403) -> HTMLResponse:
        log.warning("console.refused", action=what, reason=reason)
        return self.page("message.html", None, status, title="Refused", text=f"Refused: {reason}.")

    def checked(self, user: User | None, form: Any) -> tuple[Action, str] | HTMLResponse:
        """(action, reason) of an allowed action, else the refusal."""
        if user is None:
            return self.refuse("act", "no session: sign in first", 401)
        if not Gate.csrf_ok(user, form.get("csrf")):
            return self.refuse("act", "the form's CSRF token is missing or wrong")
        if not user.operator:
            return self.refuse("act", "viewers cannot act on notifications")
        action, reason = str(form.get("action", "")), " ".join(str(form.get("reason", "")).split())[:500]
        if action not in ACTIONS:
            return self.refuse("act", "unknown action", 400)
        if len(reason) < 3:
            return self.refuse("act", "give a reason (what you checked, who asked)", 400)
        return cast("Action", action), reason

    async def act_one(self, request: Request) -> Response:
        user, form = await self.posted(request)
        checked = self.checked(user, form)
        if isinstance(checked, HTMLResponse):
            return checked
        assert user is not None
        nid = int(request.path_params["nid"])
        action, reason = checked
        changed = await self.db.run(
            self.db.sync.console.act,
            action,
            user.name,
            user.role,
            reason,
            notification_id=nid,
        )
        log.info("console.acted", user=user.name, action=action, notification=nid, changed=changed)
        return RedirectResponse(f"{self.prefix}/notifications/{nid}", status_code=303, headers=HEADERS)

    async def act_many(self, request: Request) -> Response:
        user, form = await self.posted(request)
        checked = self.checked(user, form)
        if isinstance(checked, HTMLResponse):
            return checked
        assert user is not None
        try:
            search = search_from(form)
        except BadForm as exc:
            return self.refuse("act", str(exc), 400)
        action, reason = checked
        changed = await self.db.run(
            self.db.sync.console.act,
            action,
            user.name,
            user.role,
            reason,
            search=search,
        )
        log.info("console.acted", user=user.name, action=action, scope=search.describe(), changed=changed)
        return self.page(
            "message.html", user, title="Done", text=f"{action}: {changed} notification(s) changed; see the audit log."
        )

    async def show_preview(self, request: Request) -> Response:
        """The email as it would be sent now: operators only, on a POST (it is audited), never stored."""
        user, form = await self.posted(request)
        if user is None:
            return self.refuse("preview", "no session: sign in first", 401)
        if not Gate.csrf_ok(user, form.get("csrf")):
            return self.refuse("preview", "the form's CSRF token is missing or wrong")
        if not user.operator:
            return self.refuse("preview", "previews show patient data: operators only")
        if self.preview is None:
            return self.refuse("preview", "previews need the sources: open the console served by `connector run`", 409)
        nid = int(request.path_params["nid"])
        detail = await self.db.run(self.db.sync.console.detail, nid)
        if detail is None:
            return self.page("message.html", user, 404, title="Not found", text="No notification has this id.")
        await self.db.run(self.db.sync.console.audit, user.name, user.role, "preview", "preview shown", nid)
        log.info("console.previewed", user=user.name, notification=nid)
        shown = await self.preview(detail.record)
        return self.page("preview.html", user, n=detail.record, shown=shown)
