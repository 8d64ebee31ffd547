"""Values a config gives by reference: `${VAR}` (an environment variable) and `{file: path}` (a file).

Secrets are kept as references (`SecretRef`) and read on first use, so a command needs only the secrets
of what it touches, and a disabled feature's secret is never read. A plain string with `${VAR}` is
expanded when the file is loaded; when the variable is not set it is kept as written (`Unresolved`) and
refused only in the parts a command touches. An empty variable counts as not set.

Every reference knows where it was written (file, line, key) once `connector.config.locate` has run, so a
missing one is reported like any other config problem, with the next step (`connector.config.missing`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, GetCoreSchemaHandler, SecretStr, ValidationInfo, ValidatorFunctionWrapHandler
from pydantic_core import CoreSchema, core_schema

from connector.errors import ConfigError, Problem

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
Loc = tuple[str | int, ...]
_NEXT_STEP = "export it, or add it to the env file the service reads"


def _env(name: str) -> tuple[str | None, str | None]:
    """(value, None) or (None, what is wrong)."""
    value = os.environ.get(name)
    if value is None:
        return None, f"environment variable {name} is not set"
    if not value.strip():
        return None, f"environment variable {name} is empty"
    return value, None


class Unresolved(str):
    """A plain config string whose `${VAR}` is not set, kept as written."""

    problem: str
    origin: Problem | None = None

    def __new__(cls, text: str, problem: str) -> Unresolved:
        self = super().__new__(cls, text)
        self.problem = problem
        return self


def expand_env(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Replace each ${VAR} of a string with the variable's value; an unset one leaves an `Unresolved`."""
    if not isinstance(value, str):
        return handler(value)
    problems: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        found, problem = _env(match.group(1))
        if found is None:
            problems.append(problem or "")
            return match.group(0)
        return found

    result = handler(ENV_REF.sub(substitute, value))
    return Unresolved(result, problems[0]) if problems else result


class SecretRef:
    """A secret by reference, read when first used (then remembered). Never shows its value."""

    def __init__(self, *, env: str | None = None, file: Path | None = None, value: str | None = None) -> None:
        self.env, self.file, self._value = env, file, value
        self.origin: Problem | None = None

    @property
    def reference(self) -> str:
        """How the config wrote it: `${VAR}` or `{file: path}`; never the value."""
        if self.env is not None:
            return "${" + self.env + "}"
        return f"{{file: {self.file}}}" if self.file is not None else "<given in code>"

    def problem(self) -> str | None:
        """None when the secret can be read (it is then remembered), else what is wrong."""
        if self._value is not None:
            return None
        if self.env is not None:
            value, problem = _env(self.env)
        else:
            assert self.file is not None
            try:
                value, problem = self.file.read_text(encoding="utf-8"), None
            except OSError as exc:
                value, problem = None, f"cannot read secret file {self.file}: {exc.strerror}"
            if value is not None and not value.strip():
                value, problem = None, f"secret file {self.file} is empty"
        if value is not None:
            self._value = value.strip()
        return problem

    def get_secret_value(self) -> str:
        problem = self.problem()
        if problem is not None:
            raise ConfigError([located(self.origin, with_next_step(problem))])
        assert self._value is not None
        return self._value

    def __repr__(self) -> str:
        return f"SecretRef({self.reference!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SecretRef)
            and (self.env, self.file) == (other.env, other.file)
            and (self.env is not None or self.file is not None or self._value == other._value)
        )

    def __hash__(self) -> int:
        return hash((self.env, self.file))

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.with_info_plain_validator_function(
            cls._validate, serialization=core_schema.plain_serializer_function_ser_schema(lambda ref: ref.reference)
        )

    @classmethod
    def _validate(cls, value: Any, info: ValidationInfo) -> SecretRef:
        if isinstance(value, SecretRef):
            return value
        if isinstance(value, SecretStr):  # configs built in code
            return cls(value=value.get_secret_value())
        if isinstance(value, str) and ENV_REF.fullmatch(value.strip()):
            return cls(env=value.strip()[2:-1])
        if isinstance(value, dict) and set(value) == {"file"} and isinstance(value["file"], str):
            base = (info.context or {}).get("base_dir", Path.cwd())
            path = Path(value["file"])
            return cls(file=path if path.is_absolute() else base / path)
        raise ValueError("secrets must be references, ${ENV_VAR} or {file: /path/to/secret}; inline values are refused")


def with_next_step(problem: str) -> str:
    return f"{problem} ({_NEXT_STEP})" if problem.startswith("environment variable") else problem


def located(origin: Problem | None, message: str) -> Problem:
    if origin is None:
        return Problem(None, None, "", message)
    return Problem(origin.file, origin.line, origin.where, message)


def walk(node: Any, loc: Loc = ()) -> Iterator[tuple[Loc, SecretRef | Unresolved]]:
    """Every reference in a config model, with its key path as written in the file."""
    if isinstance(node, SecretRef | Unresolved):
        yield loc, node
    elif isinstance(node, BaseModel):
        for name, field in type(node).model_fields.items():
            yield from walk(getattr(node, name), (*loc, field.alias or name))
    elif isinstance(node, dict):
        for key, item in node.items():
            yield from walk(item, (*loc, key))
    elif isinstance(node, list | tuple):
        for index, item in enumerate(node):
            yield from walk(item, (*loc, index))
