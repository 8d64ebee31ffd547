"""Logs and printed lines: every log line (ours, uvicorn's, APScheduler's) in the chosen format, plain
tracebacks, and no colour markup printed as text when the output is not a terminal."""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog

from connector import logs
from connector.sandbox.fhir import FhirState
from connector.testing import (
    API_KEY,
    appointment,
    cli,
    daemon,
    environment,
    free_port,
    patient,
    serve_fhir,
    serve_paubox,
    write_config,
)

BASIC = ("appointment-booked", "appointment-cancelled")
MARKUP = re.compile(r"\[/?(red|green|bold|yellow)[^\]]*\]")


@pytest.fixture
def configured() -> Iterator[None]:
    """uvicorn's loggers as in `connector run` (the test servers of other tests gave them handlers of their
    own), then logging put back as it was."""
    saved = []
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate, logger.level))
        logger.handlers, logger.propagate = [], True
        logger.setLevel(logging.WARNING)
    yield
    for logger, handlers, propagate, level in saved:
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(level)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.name == logs.HANDLER]:
        root.removeHandler(handler)
    structlog.reset_defaults()


def emit_everything() -> None:
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    logging.getLogger("apscheduler.scheduler").error("Run time of job %r was missed", "poll:ehr")
    logging.getLogger("apscheduler.scheduler").warning("Execution of job skipped")  # below APScheduler's level
    logging.getLogger("httpx").info("HTTP Request: GET ...")  # libraries speak from warning up
    structlog.get_logger("connector.daemon").info("daemon.started", sources=["ehr"])


def test_json_format_puts_library_lines_through_structlog(configured: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", "json")
    emit_everything()
    lines = capsys.readouterr().err.splitlines()
    parsed = [json.loads(line) for line in lines]  # every line is JSON
    assert [(p.get("logger"), p["level"], p["event"]) for p in parsed] == [
        ("uvicorn.error", "warning", "Invalid HTTP request received."),
        ("apscheduler.scheduler", "error", "Run time of job 'poll:ehr' was missed"),
        (None, "info", "daemon.started"),
    ]
    assert all(p["timestamp"].endswith("Z") for p in parsed)


def test_console_format_renders_library_lines_like_ours(configured: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", "console")
    emit_everything()
    lines = capsys.readouterr().err.splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z"
    assert re.fullmatch(stamp + r" \[warning\s*\] Invalid HTTP request received\. \[uvicorn\.error\]", lines[0])
    assert re.fullmatch(stamp + r" \[info\s*\] daemon\.started sources=\['ehr'\]", lines[-1])
    assert len(lines) == 3


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_tracebacks_are_plain_and_show_no_local_values(
    configured: None, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    logs.configure("info", fmt)
    patient_name = "Robin Example-Patient"  # a local variable a rich traceback would print
    try:
        raise KeyError(len(patient_name))
    except KeyError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
        structlog.get_logger("connector.web").exception("request.crashed")
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 21" in err
    assert "Robin" not in err and "╭" not in err
    if fmt == "json":
        assert all(json.loads(line) for line in err.splitlines())


def test_a_daemon_logs_uvicorn_lines_as_json(tmp_path: Path) -> None:
    """A malformed request makes uvicorn log a warning; with CONNECTOR_LOG_FORMAT=json it is a JSON line
    like every other line the daemon writes."""
    port = free_port()
    with serve_fhir(FhirState()) as fhir, serve_paubox() as paubox:
        config = write_config(tmp_path, fhir.url, paubox.url, mappings=BASIC, server={"port": port})
        env = environment(PAUBOX_API_KEY=API_KEY, CONNECTOR_LOG_FORMAT="json")
        with daemon(config, env=env) as child:
            child.wait_http(f"http://127.0.0.1:{port}/livez")
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                sock.recv(1024)
            child.wait_until(lambda: "Invalid HTTP request" in child.log_text())
            child.stop()
            text = child.log_text()
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("=====")]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a log line that is not JSON: {line!r}")
    events = [(p.get("logger"), p["event"]) for p in parsed]
    assert ("uvicorn.error", "Invalid HTTP request received.") in events
    assert (None, "daemon.started") in events and (None, "daemon.stopped") in events


def test_no_markup_tags_in_plain_output(tmp_path: Path) -> None:
    """`sending paused`, a source that failed, dry-run source failures and `error:` lines are plain text
    when the output is not a terminal."""
    state = FhirState()
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    state.load([patient("p1", "Robin", email="robin@example.org"), appointment("a1", "p1", start)])
    with serve_fhir(state) as fhir, serve_paubox() as paubox:
        config = write_config(tmp_path, fhir.url, paubox.url, mappings=BASIC)
        paused = cli(
            "run", "--once", "--config", config, cwd=tmp_path, env=environment(PAUBOX_API_KEY="nope"), check=False
        )
    down = write_config(tmp_path, f"http://127.0.0.1:{free_port()}", "http://127.0.0.1:9", name="down.yaml")
    failed = cli("run", "--once", "--config", down, cwd=tmp_path, check=False)
    dry = cli("run", "--dry-run", "--config", down, cwd=tmp_path, check=False)
    subscription = {
        "enabled": True,
        "secret": "${SUB_SECRET}",
        "endpoint": "https://connector.example.org/fhir/ehr/notify",
    }
    subscribing = write_config(
        tmp_path, f"http://127.0.0.1:{free_port()}", "http://127.0.0.1:9", source={"subscription": subscription}
    )
    env = environment(PAUBOX_API_KEY=API_KEY, SUB_SECRET="Bearer sub-secret-2")
    error = cli("subscribe", "ehr", "--config", subscribing, cwd=tmp_path, env=env, check=False)
    assert "sending paused:" in paused.stdout
    assert "source ehr: FAILED source 'ehr'" in failed.stdout
    assert "source 'ehr': Appointment search page 1 failed: ConnectError" in dry.stdout
    assert error.stdout.startswith("error: subscription.topic") and error.returncode == 2
    for result in (paused, failed, dry, error):
        assert not MARKUP.search(result.stdout + result.stderr), result.stdout
        assert "\x1b[" not in result.stdout
