"""Pure: whether a value is exactly one usable email address.

A value is used as it is or not at all: never trimmed, never split, never repaired. Usable means one
`local@domain` address and nothing else: a dot-atom local part (RFC 5322 `atext`, plus non-ASCII letters as
RFC 6531 allows), a domain of at least two labels of letters, digits and inner hyphens, ending in a name,
not a number. Refused: whitespace anywhere, control characters (CR/LF included), lone surrogates, invisible
format characters, several addresses, display names and angle brackets, quoted local parts, address
literals (`[127.0.0.1]`), a missing local part or domain.
"""

from __future__ import annotations

import re

from connector.logs import unsafe

_LOCAL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
    r"(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+)*"
)
MAX_LENGTH = 254  # RFC 5321's path limit less the angle brackets
MAX_LOCAL = 64


def _label(label: str) -> bool:
    return (
        0 < len(label) <= 63 and label[0] != "-" and label[-1] != "-" and all(ch.isalnum() or ch == "-" for ch in label)
    )


def usable(value: object) -> bool:
    """True when `value` is exactly one email address we may write to (see the module's rules)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_LENGTH or unsafe(value):
        return False
    if not value.isprintable() or any(ch.isspace() for ch in value):
        return False
    local, at, domain = value.rpartition("@")
    if not at or not local or len(local) > MAX_LOCAL or not _LOCAL.fullmatch(local):
        return False
    labels = domain.split(".")
    return len(labels) >= 2 and all(_label(label) for label in labels) and not labels[-1].isdigit()
