"""Config files for a test's world: one FHIR source `ehr`, the Paubox sandbox, a ledger, the shipped mappings.

`write_config` writes the config the tests have always used; keyword mappings (`source`, `dispatch`,
`paubox`, `server`) set or replace keys of a section, and a value of None removes a default key. The
`extra*` strings are raw YAML lines added as they are, for what the mappings cannot say.
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from connector.testing.servers import USERNAME

SHIPPED_MAPPINGS = (Path(__file__).resolve().parent.parent / "examples" / "mappings").resolve()
SENDER = "Example Clinic <appointments@clinic.example.org>"
OPTOUT_KEY = base64.b64encode(b"opt-out digest key for the tests").decode()  # 32 bytes, made up
Section = Mapping[str, object]


def copy_mappings(target: Path, only: Iterable[str], source: Path = SHIPPED_MAPPINGS) -> Path:
    """A copy of the mappings folder `source` in `target` with only the mappings named in `only` (their
    templates and the layouts stay). Copying into an existing copy is fine."""
    shutil.copytree(source, target, dirs_exist_ok=True)
    keep = set(only)
    for mapping in target.glob("*.yaml"):
        if mapping.stem not in keep:
            mapping.unlink()
    return target


def yaml_lines(section: Section, indent: int) -> str:
    """`key: value` lines of a section at `indent` spaces, nested mappings below their key. Values are written
    as they are (test constants, not quoted); None leaves the key out."""
    pad, lines = " " * indent, []
    for key, value in section.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            lines.append(f"{pad}{key}:\n{yaml_lines(value, indent + 2)}")
        elif isinstance(value, bool):
            lines.append(f"{pad}{key}: {'true' if value else 'false'}\n")
        else:
            lines.append(f"{pad}{key}: {value}\n")
    return "".join(lines)


def write_config(
    folder: Path,
    fhir_url: str,
    paubox_url: str,
    *,
    ledger_url: str | None = None,
    mappings: tuple[str, ...] | None = None,
    optout: bool = True,
    source: Section | None = None,
    dispatch: Section | None = None,
    paubox: Section | None = None,
    server: Section | None = None,
    name: str = "config.yaml",
    extra_source: str = "",
    extra: str = "",
    paubox_extra: str = "",
    delivery_extra: str = "",
) -> Path:
    """Write `folder/name` for the servers at `fhir_url` and `paubox_url`; returns its path.

    `ledger_url`: default SQLite `connector.db` beside the config. `mappings`: only these of the shipped
    mappings, copied to `folder/mappings` (default: the shipped folder itself). `optout`: with a key for
    opt-out digests, in `folder/optout.key`. `source`, `dispatch`, `paubox`, `server`: keys of those sections
    over the defaults (`server` only when given); `dispatch.bulk` is 0 (one by one) unless given, and
    `{"bulk": None}` leaves the product's default."""
    mappings_dir = SHIPPED_MAPPINGS if mappings is None else copy_mappings(folder / "mappings", mappings)
    source_keys = {
        "base_url": fhir_url,
        "start_from": "2000-01-01T00:00:00Z",
        "page_size": 2,
        "timezone": "America/New_York",
        "retries": {"backoff": "10ms"},
        **(source or {}),
    }
    paubox_keys = {"base_url": f"{paubox_url}/v1/{USERNAME}", "api_key": "${PAUBOX_API_KEY}", **(paubox or {})}
    # One by one unless the test asks for bulk (the product's default is bulk): faults are per request.
    pinned = {} if "bulk:" in extra else {"bulk": 0}
    dispatch_keys = {"interval": "1s", "retry_backoff": "1s", **pinned, **(dispatch or {})}
    text = (
        f"sources:\n  ehr:\n{yaml_lines(source_keys, 4)}{extra_source}\n"
        f"mappings: {mappings_dir}\n"
        f"ledger:\n  url: {ledger_url or 'sqlite:///connector.db'}\n"
        f'delivery:\n  from: "{SENDER}"\n{delivery_extra}  paubox:\n{yaml_lines(paubox_keys, 4)}{paubox_extra}'
        f"dispatch:\n{yaml_lines(dispatch_keys, 2)}"
        + (f"server:\n{yaml_lines(server, 2)}" if server is not None else "")
        + extra
    )
    if optout:
        (folder / "optout.key").write_text(OPTOUT_KEY)
        text += "optout:\n  keys:\n    t1: {file: optout.key}\n  current: t1\n"
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path
