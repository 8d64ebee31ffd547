"""Structured logs (structlog) on stderr: `console` (key=value) or `json`. Libraries that log through the
standard library (uvicorn, APScheduler, SQLAlchemy, httpx) are formatted by the same renderer, so a JSON
stream holds JSON lines only.

Log lines carry names of sources and mappings, resource types, ids and versions, notification ids,
HTTP statuses and reasons, never patient data, message bodies, addresses or notification keys.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import traceback
from pathlib import Path

import structlog

# Control characters (C0, DEL, C1), line and paragraph separators, and lone surrogates: what must not reach
# a log line, a ledger column or a header as it is.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("console", "json")


HANDLER = "connector"  # the name of the root handler `configure` installs (and replaces when called again)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is when a line is written (a test's capture may have replaced it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _StderrLogger:
    """structlog's PrintLogger over whatever `sys.stderr` is when a line is written, like `_Stderr`."""

    _lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = error = err = critical = exception = fatal = failure = msg


def _stderr_logger(*args: object) -> _StderrLogger:
    return _StderrLogger()


def configure(level: str = "info", fmt: str = "console") -> None:
    """Our lines (structlog) and every library's (uvicorn, APScheduler, ... through stdlib logging) in one
    format on stderr. Libraries speak from `warning` up (APScheduler from `error`), whatever `level`."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        # plain tracebacks: rich's would print the frames' local variables, and with them patient data
        else structlog.dev.ConsoleRenderer(
            colors=False, pad_event_to=0, exception_formatter=structlog.dev.plain_traceback
        )
    )
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    traceback_text: list[structlog.typing.Processor] = [structlog.processors.format_exc_info] if fmt == "json" else []
    structlog.configure(
        processors=[structlog.processors.add_log_level, stamp, *traceback_text, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    foreign: list[structlog.typing.Processor] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        stamp,
        *traceback_text,
    ]
    handler = _Stderr()
    handler.name = HANDLER
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=foreign,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.name == HANDLER]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(LEVELS[level], logging.WARNING))
    # "skipped: maximum number of running instances reached" every second while a long dispatch runs is
    # expected (max_instances=1 on purpose), not news.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def where(exc: BaseException) -> str:
    """'KeyError at connector/intake/planner.py:123': an unexpected error, located but not quoted
    (exception messages can carry data from a resource)."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if "/connector/" in f.filename] or frames
    if not own:
        return type(exc).__name__
    frame = own[-1]
    parts = Path(frame.filename).parts
    short = "/".join(parts[parts.index("connector") :]) if "connector" in parts else Path(frame.filename).name
    return f"{type(exc).__name__} at {short}:{frame.lineno}"


def unsafe(text: str) -> bool:
    """True when `text` holds a control character, a line separator or a lone surrogate."""
    return _UNSAFE.search(text) is not None


def safe_text(value: object, limit: int) -> str:
    """`value` as text that can be logged and stored whatever it held: control characters, line separators
    and lone surrogates escaped (`\\u000a`), cut to `limit` characters. For ids and versions, not content."""
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", str(value))[:limit]
