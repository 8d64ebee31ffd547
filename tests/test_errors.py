"""The error tree is complete: every exception class the package defines is a ConnectorError and is drawn in
connector.errors' docstring (the local test servers of connector.sandbox answer their errors as HTTP and
are left out)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from connector import errors
from connector.errors import ConnectorError

PACKAGE = Path(__file__).resolve().parent.parent / "connector"
MODULES = sorted(
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
    if "sandbox" not in p.parts
    and "migrations" not in p.parts  # alembic runs migrations, not imports
    and p.name != "__main__.py"  # importing it runs the command line
)


def exception_classes(module_name: str) -> list[type[BaseException]]:
    module = importlib.import_module(module_name)
    return [
        value
        for value in vars(module).values()
        if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module_name
    ]


@pytest.mark.parametrize("module_name", MODULES)
def test_every_exception_is_a_connector_error_and_in_the_drawn_tree(module_name: str) -> None:
    tree = errors.__doc__ or ""
    for cls in exception_classes(module_name):
        assert issubclass(cls, ConnectorError), f"{module_name}.{cls.__name__} is not under ConnectorError"
        assert cls.__name__ in tree, f"{module_name}.{cls.__name__} is missing from the tree in errors.py"
