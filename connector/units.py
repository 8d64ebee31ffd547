"""Small foundations every layer may use: durations as a config writes them, names, time zones.

Pure and dependency-free within the package: `parse_duration('48h')`, `human_duration(timedelta)`, the
pattern of source, mapping and key names, and the pydantic types `Duration` and `Zone` that the config
and the mapping files use.
"""

from __future__ import annotations

import re
import zoneinfo
from datetime import timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"  # sources, mappings, key ids


def parse_duration(value: Any) -> Any:
    """'90s', '5m', '48h', '2d', '250ms' or a number of seconds → timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    raise ValueError("expected a duration such as 250ms, 30s, 5m, 48h or 2d")


def human_duration(value: timedelta) -> str:
    """A duration as a config would write it: 250ms, 30s, 5m, 2h."""
    seconds = value.total_seconds()
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds * 1000:g}ms"


def _zone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA time zone {value!r}") from None
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
Zone = Annotated[str, AfterValidator(_zone)]  # an IANA time zone name, checked at load
