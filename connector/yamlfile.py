"""YAML loading that remembers where each key was written, so errors can name file and line; pydantic's
errors turned into problems at those lines (`problems_from`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from connector.errors import ConfigError, Problem

Loc = tuple[str | int, ...]


@dataclass
class YamlDoc:
    """A parsed YAML document and the line (1-based) of every key path in it."""

    path: Path
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, loc: Sequence[str | int]) -> int | None:
        """The line of `loc`, or of its closest parent that has one."""
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get((), None)

    def problem(self, loc: Sequence[str | int], message: str) -> Problem:
        where = ".".join(str(part) for part in loc)
        return Problem(self.path, self.line_of(loc), where, message)


def load_yaml(path: Path) -> YamlDoc:
    """Parse `path`; raise ConfigError naming the file and line on unreadable or invalid YAML."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(path, None, "", f"cannot read file: {exc.strerror}")]) from exc
    return parse_yaml(text, path)


def parse_yaml(text: str, path: Path) -> YamlDoc:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError([Problem(path, line, "", f"invalid YAML: {exc.problem}")]) from exc
    doc = YamlDoc(path=path, data=None)
    if node is None:
        doc.data = {}
        return doc
    doc.lines[()] = node.start_mark.line + 1
    doc.data = _build(node, (), doc)
    return doc


def _build(node: yaml.Node, loc: Loc, doc: YamlDoc) -> Any:
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if key in result:
                raise ConfigError(
                    [Problem(doc.path, key_node.start_mark.line + 1, _dotted((*loc, key)), "duplicate key")]
                )
            doc.lines[(*loc, key)] = key_node.start_mark.line + 1
            result[key] = _build(value_node, (*loc, key), doc)
        return result
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            doc.lines[(*loc, index)] = item.start_mark.line + 1
            items.append(_build(item, (*loc, index), doc))
        return items
    return _scalar(node)


_SCALARS = yaml.SafeLoader("")  # only used to turn scalar nodes into values (ints, bools, timestamps)


def _scalar(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError([Problem(None, node.start_mark.line + 1, "", "keys must be plain values")])
    return _SCALARS.construct_object(node)


def _dotted(loc: Loc) -> str:
    return ".".join(str(part) for part in loc)


def problems_from(exc: ValidationError, doc: YamlDoc) -> list[Problem]:
    """Turn pydantic errors into problems with file, line and a readable key path (never the input)."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = _readable_loc(error["loc"], doc)
        message = _message(error)
        if loc and loc[-1] == "[key]":
            loc, message = loc[:-1], "names may only use lowercase letters, digits, '-' and '_'"
        problems.append(doc.problem(loc, message))
    return problems


def _readable_loc(loc: tuple[Any, ...], doc: YamlDoc) -> tuple[str | int, ...]:
    """Drop the union-tag entries pydantic inserts, keeping keys the person actually wrote."""
    kept: list[str | int] = []
    for index, part in enumerate(loc):
        if (*kept, part) in doc.lines or index == len(loc) - 1 or isinstance(part, int):
            kept.append(part)
    return tuple(kept)


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key (check the spelling against config.example.yaml)"
    if kind == "missing":
        return "required key is missing"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")
