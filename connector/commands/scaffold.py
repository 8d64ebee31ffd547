"""`connector init`: a deployment folder from the examples shipped in the package.

The wheel carries `connector/examples/` (the repository's `config.example.yaml` and `mappings/`, linked
into the package so that there is one copy). `init` writes `config.yaml`, `mappings/` and a
`.env.example` naming every environment variable the config reads, and never overwrites a file unless
asked to.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from connector import references
from connector.config import Config, features_off
from connector.errors import ConnectorError
from connector.yamlfile import parse_yaml

EXAMPLES = Path(__file__).parent.parent / "examples"  # connector/examples
Loc = references.Loc
_COMMENTED_KEY = re.compile(r"^\s*#\s*[A-Za-z0-9_-]+:\s+(.*)$")  # "#   client_id: ${EHR_CLIENT_ID}"


@dataclass(frozen=True)
class EnvReference:
    name: str
    where: str  # the key path, or "" for a commented-out line
    line: int
    note: str = ""  # why it may stay unset


def env_references(text: str, path: Path) -> list[EnvReference]:
    """Every `${VAR}` a config text reads, in order: those of its keys, then those in commented-out lines."""
    doc = parse_yaml(text, path)
    off: list[tuple[Loc, str]] = []
    with contextlib.suppress(ValidationError):  # an invalid config still lists its variables, without notes
        off = features_off(Config.model_validate(doc.data, context={"base_dir": path.parent}))
    found: list[EnvReference] = []
    for loc, value in _strings(doc.data, ()):
        note = next((f"not needed while {why}" for part, why in off if loc[: len(part)] == part), "")
        found += [
            EnvReference(name, ".".join(map(str, loc)), doc.line_of(loc) or 0, note)
            for name in references.ENV_REF.findall(value)
        ]
    seen = {ref.name for ref in found}
    for number, line_text in enumerate(text.splitlines(), start=1):
        commented_key = _COMMENTED_KEY.match(line_text)
        for name in references.ENV_REF.findall(commented_key.group(1) if commented_key else ""):
            if name not in seen:
                seen.add(name)
                found.append(EnvReference(name, "", number))
    return found


def _strings(data: object, loc: Loc) -> Iterator[tuple[Loc, str]]:
    if isinstance(data, str):
        yield loc, data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _strings(value, (*loc, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _strings(value, (*loc, index))


def env_example(text: str, path: Path) -> str:
    """The text of `.env.example` for a config."""
    lines = [
        f"# Environment variables that {path.name} reads with ${{VAR}}. Copy to .env, fill in the values, make it",
        "# readable by the service only (chmod 600) and keep it out of version control. `connector validate`",
        "# names any that are missing. compose.yaml reads it as env_file; the systemd unit as EnvironmentFile.",
    ]
    refs = env_references(text, path)
    used = [ref for ref in refs if ref.where]
    for ref in used:
        lines += [
            "",
            f"# {ref.where} ({path.name} line {ref.line}){'; ' + ref.note if ref.note else ''}",
            f"{ref.name}=",
        ]
    commented = [ref for ref in refs if not ref.where]
    if commented:
        lines += ["", f"# In commented-out parts of {path.name} (line numbers); set them when you enable those parts:"]
        lines += [f"# {ref.name}=   # line {ref.line}" for ref in commented]
    return "\n".join(lines) + "\n"


def _targets(folder: Path) -> list[Path]:
    return [folder / "config.yaml", folder / "mappings", folder / ".env.example"]


def existing(folder: Path) -> list[Path]:
    """What `init` would overwrite: the files, and a mappings folder that is not empty."""
    return [
        target for target in _targets(folder) if target.exists() and not (target.is_dir() and not any(target.iterdir()))
    ]


def init(folder: Path, *, force: bool = False) -> list[Path]:
    """Write config.yaml, mappings/ and .env.example into `folder`; return what was written."""
    if not EXAMPLES.is_dir():
        raise ConnectorError(f"the shipped examples are missing ({EXAMPLES}): reinstall connector")
    clash = existing(folder)
    if clash and not force:
        names = ", ".join(str(path) for path in clash)
        raise ConnectorError(
            f"{names} already exist; nothing was written (choose another folder, move them "
            "away, or pass --force to overwrite them)"
        )
    config, mappings, env = _targets(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = (EXAMPLES / "config.example.yaml").read_text(encoding="utf-8")
    config.write_text(text, encoding="utf-8")
    shutil.copytree(EXAMPLES / "mappings", mappings, dirs_exist_ok=True)
    env.write_text(env_example(text, config), encoding="utf-8")
    return [config, mappings, env]
