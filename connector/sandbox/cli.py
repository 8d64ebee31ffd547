"""`connector sandbox`: the local Paubox-compatible API, its inbox, and the FHIR test server."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import httpx
import typer

sandbox_app = typer.Typer(
    help="Local stand-ins for Paubox and a FHIR server: try everything before any real key exists."
)


def _serve(app: object, host: str, port: int) -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}; the sandboxes are meant for 127.0.0.1", file=sys.stderr)
    import uvicorn  # here: `connector` itself starts without the server

    uvicorn.run(app, host=host, port=port, log_level="warning", log_config=None)  # type: ignore[arg-type]


@sandbox_app.callback(invoke_without_command=True)
def paubox(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8025,
    api_key: Annotated[
        str, typer.Option(envvar="PAUBOX_API_KEY", help="API key to accept (env PAUBOX_API_KEY).", show_default=False)
    ] = "sandbox-key",
    username: Annotated[str, typer.Option(help="API username in /v1/<username>/….")] = "sandbox",
    from_domain: Annotated[list[str], typer.Option(help="Verified sender domain(s).")] = ["example.org"],  # noqa: B006
    webhook_url: Annotated[str | None, typer.Option(help="POST Paubox-shaped webhooks here.")] = None,
    latency_ms: Annotated[float, typer.Option(help="Delay every send by this much.")] = 0,
    chaos: Annotated[
        str | None,
        typer.Option(
            help="Random faults per send, e.g. server_error=0.05,rate_limit=0.02,hang=0.01,drop_webhook=0.01,"
            "accepted_500=0.01,hang_seconds=30,seed=7"
        ),
    ] = None,
) -> None:
    """Serve a Paubox-compatible Email API on http://HOST:PORT/v1/<username> (and /v1/email, /v1)."""
    if ctx.invoked_subcommand is not None:
        return
    from connector.sandbox.paubox import SandboxState, create_app
    from connector.sandbox.paubox_faults import Chaos

    chaos_state = Chaos()
    for item in (chaos or "").split(","):
        name, _, value = (part.strip() for part in item.partition("="))
        if not name:
            continue
        if name not in Chaos.__dataclass_fields__:
            raise typer.BadParameter(f"unknown chaos setting {name!r}", param_hint="--chaos")
        setattr(chaos_state, name, int(value) if name == "seed" else float(value))
    chaos_state.__post_init__()  # reseed after the settings
    state = SandboxState(
        api_key=api_key,
        username=username,
        from_domains=tuple(from_domain),
        webhook_url=webhook_url,
        latency=latency_ms / 1000,
        chaos=chaos_state if chaos else None,
    )
    print(
        f"Paubox sandbox on http://{host}:{port}/v1/{username} (inbox: http://{host}:{port}/_sandbox/messages)",
        file=sys.stderr,
    )
    _serve(create_app(state), host, port)


@sandbox_app.command()
def inbox(
    url: Annotated[str, typer.Option(help="Sandbox address.")] = "http://127.0.0.1:8025",
    show: Annotated[int | None, typer.Option(help="Print message number N in full.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw list.")] = False,
) -> None:
    """List the messages the sandbox accepted (or print one in full)."""
    from rich.console import Console
    from rich.table import Table

    try:
        messages = httpx.get(f"{url.rstrip('/')}/_sandbox/messages", timeout=10).json()["messages"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise typer.BadParameter(f"no sandbox answering at {url} ({type(exc).__name__})", param_hint="--url") from None
    if as_json:
        print(json.dumps(messages, indent=2))
        return
    if show is not None:
        message = messages[show - 1]
        print(f"To: {', '.join(message['recipients'])}\nFrom: {message['from']}\nSubject: {message['subject']}")
        shown = {"subject", "from"}
        for name, value in message.get("headers", message["custom_headers"]).items():
            if name.lower() not in shown:
                print(f"{name}: {value}")
        for attachment in message.get("attachments") or []:
            print(f"Attachment: {attachment.get('fileName')} ({attachment.get('contentType')})")
        print(f"\n{message['text'] or ''}\n--- HTML ---\n{message['html'] or '(none)'}")
        return
    table = Table(title=f"Sandbox inbox ({len(messages)} message(s))", title_justify="left")
    for column in ("#", "received", "to", "subject", "X-Notification-Key"):
        table.add_column(column, overflow="fold")
    for number, message in enumerate(messages, start=1):
        table.add_row(
            str(number),
            message["received_at"][11:19],
            ", ".join(message["recipients"]),
            message["subject"],
            message["custom_headers"].get("X-Notification-Key", ""),
        )
    Console(highlight=False, width=None if sys.stdout.isatty() else 160).print(table)


@sandbox_app.command()
def fhir(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8090,
    data: Annotated[list[Path], typer.Option(help="Extra JSON resources or Bundles to load.")] = [],  # noqa: B006
    sample_data: Annotated[bool, typer.Option(help="Load the HL7 examples and generated demo appointments.")] = True,
) -> None:
    """Serve a FHIR R4 test server (search, _include, paging, versions, writes) with sample data."""
    from connector.sandbox.fhir import FhirState, create_app
    from connector.sandbox.sample_data import demo_resources

    state = FhirState()
    if sample_data:
        state.load(demo_resources(datetime.now(UTC)))
    for path in data:
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        state.load([json.loads(f.read_text(encoding="utf-8")) for f in files])
    print(f"FHIR test server on http://{host}:{port} with {len(state.resources)} resources", file=sys.stderr)
    _serve(create_app(state), host, port)
