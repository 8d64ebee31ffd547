"""YAML loading that remembers where each key was written, so errors can name file and line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
