"""JSON from strangers (webhook and notification bodies): bounded nesting, finite numbers, valid Unicode.

`json.loads` accepts what nothing downstream can handle: `"\\ud800"` (a lone UTF-16 surrogate escape) decodes
to a str that every UTF-8 encoder refuses (database drivers, AES associated data, JSON answers, headers);
`NaN`, `Infinity` and `1e400` are not JSON; deep nesting drives later recursive walks into a RecursionError.
A body holding any of them is refused whole, like any other malformed body. Pure; the messages are fixed
and never quote the body.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from connector.errors import ConnectorError

MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


class BadJson(ConnectorError, ValueError):
    """The body is not JSON we accept; `str()` is a fixed reason, safe to log and to answer with. Also a
    ValueError, as `json.loads`'s own errors are, so that callers treat both alike."""


def load(body: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse an untrusted body. Raises BadJson: not JSON, too deep, a non-finite number, a lone surrogate."""
    try:
        document = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise BadJson("body nests too deeply") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, too many digits, NaN/Infinity/1e400
        raise BadJson("body is not valid JSON") from None  # not chained: JSONDecodeError.doc holds the body
    problem = _problem(document, max_depth)
    if problem is not None:
        raise BadJson(problem)
    return document


def storable(text: str) -> bool:
    """Text that can be stored, logged and sent back as it is: printable, so no control characters (NUL,
    CR, LF...), no lone surrogates, no line separators. For ids and keys taken from a request."""
    return text.isprintable()


def _reject_constant(name: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 would become inf, which json.dumps writes back as invalid JSON
        raise ValueError("number out of range")
    return value


def _problem(document: Any, limit: int) -> str | None:
    """Why a decoded document is refused, walking it iteratively (so the walk itself cannot overflow)."""
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return "body holds a lone surrogate escape: not valid Unicode"
            continue
        if isinstance(value, dict):
            if depth > limit:
                return "body nests too deeply"
            stack.extend((key, depth) for key in value)
            stack.extend((child, depth + 1) for child in value.values())
        elif isinstance(value, list):
            if depth > limit:
                return "body nests too deeply"
            stack.extend((child, depth + 1) for child in value)
    return None
