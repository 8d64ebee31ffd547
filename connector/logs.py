"""Structured logs (structlog) on stderr: `console` (key=value) or `json`.

Log lines carry names of sources and mappings, resource types, ids and versions, notification ids,
HTTP statuses and reasons, never patient data, message bodies, addresses or notification keys.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from pathlib import Path

import structlog

# Control characters (C0, DEL, C1), line and paragraph separators, and lone surrogates: what must not reach
# a log line, a ledger column or a header as it is.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("console", "json")


def configure(level: str = "info", fmt: str = "console") -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(
        level=max(LEVELS[level], logging.WARNING),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
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
