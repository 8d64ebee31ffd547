"""The package's shape, checked from its source with `ast` (nothing is imported):

- the longest chain of run-time imports is at most 11 modules (an import under `if TYPE_CHECKING:` is
  for annotations only and does not run; an import inside a function does not run at import time either,
  and the package keeps those for the few places where the delay is the point);
- no import cycle, counting every module-level import, the type-checking ones too (the sandbox's included);
- no upward import: every module belongs to one layer (LAYERS, below), and imports, the type-checking ones
  too, only from its own layer or those beneath it; intake and sending never import each other;
- no module is longer than 400 lines unless its docstring says why.

An import names one module: `from connector.ledger.sql import SqlLedger` is an edge to connector.ledger.sql
(Python also runs the package's `__init__` first; as in import-linter, that is not counted as an edge).

Run `python tests/test_architecture.py` to print the longest chain and each module's layer.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "connector"
MAX_CHAIN = 11
MAX_LINES = 400

# Lowest first. A module belongs to the first layer one of whose prefixes it starts with (most specific
# prefixes are listed before the packages they belong to).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundations",  # values, errors, settings and text helpers every layer may use
        (
            "connector.errors",
            "connector.units",
            "connector.models",
            "connector.results",
            "connector.files",
            "connector.logs",
            "connector.metrics",
            "connector.jsontext",
            "connector.yamlfile",
            "connector.references",
            "connector.urls",
            "connector.config",
            "connector.mapping.fhirpath_syntax",  # pure text check the config's CRM FHIRPaths use too
            "connector.ledger:",  # the package's __init__ only: the ledger's value types
            "connector.delivery:",  # the package's __init__ only: Outcome, Verdict, Signal, Mailer
        ),
    ),
    (
        "core",  # pure: values in, values out, no I/O
        (
            "connector.fhir",
            "connector.fhir_lean",
            "connector.addresses",
            "connector.lifecycle",
            "connector.timing",
            "connector.optout",
            "connector.links",
            "connector.calendar",
            "connector.health",
            "connector.preflight",
            "connector.mapping",
            "connector.crm",
            "connector.delivery.retry",
            "connector.delivery.gate",
            "connector.delivery.status",
            "connector.intake.checks",
            "connector.intake.cursor",
            "connector.intake.decide",
            "connector.intake.notifications",
            "connector.sending.steps",
            "connector.writeback",
            "connector.cap",
            "connector.handoff",
            "connector.bounces",
        ),
    ),
    (
        "adapters",  # the outside world: the ledger's database, sources, mailers; the local test servers
        (
            "connector.ledger",
            "connector.sources",
            "connector.delivery.paubox",
            "connector.delivery.pool",
            "connector.delivery.smtp",
            "connector.sandbox",
        ),
    ),
    (
        "shell",  # where events enter and leave, the endpoints, the wiring, the commands
        (
            "connector.intake",
            "connector.sending",
            "connector.web",
            "connector.monitor",
            "connector.runtime",
            "connector.daemon",
            "connector.commands",
            "connector.report",
            "connector.progress",
            "connector.machine",
            "connector.operate",
            "connector.preview",
            "connector.cli",
            "connector.cli_check",
            "connector.cli_bounces",
            "connector.entry",
            "connector.__main__",
            "connector.testing",  # the harness tests, chaos and bench share: servers, configs, daemons
            "connector:",  # the package's __init__
        ),
    ),
]
APART = [("connector.intake", "connector.sending")]  # neither imports the other (nor its pure parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix.endswith(":"):
                if module == prefix[:-1]:
                    return rank
            elif module == prefix or module.startswith(prefix + "."):
                return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_architecture.py")


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(body: list[ast.stmt], typing: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Module-level imports (inside `if`/`try` too, not inside functions or classes). `typing`: with those
    under `if TYPE_CHECKING:`."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _type_checking(node) or typing:
                yield from _imports(node.body, typing)
            yield from _imports(node.orelse, typing)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _imports(block, typing)


@cache
def edges(typing: bool) -> dict[str, frozenset[str]]:
    """What each module of the package imports from the package."""
    graph: dict[str, frozenset[str]] = {}
    for name, path in MODULES.items():
        found: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")).body, typing):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in MODULES}
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    found.add(f"{base}.{alias.name}")
                elif base in MODULES:
                    found.add(base)
        graph[name] = frozenset(found - {name})
    return graph


def longest_chain(graph: dict[str, frozenset[str]]) -> list[str]:
    memo: dict[str, list[str]] = {}

    def chain(module: str, path: tuple[str, ...]) -> list[str]:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(module) :], module]))
        if module not in memo:
            below = [chain(d, (*path, module)) for d in sorted(graph[module])]
            memo[module] = [module, *max(below, key=len, default=[])]
        return memo[module]

    return max((chain(m, ()) for m in sorted(graph)), key=len)


def cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for dep in sorted(graph[module]):
            if dep not in index:
                visit(dep)
                low[module] = min(low[module], low[dep])
            elif dep in stack:
                low[module] = min(low[module], index[dep])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return groups


def test_the_longest_chain_of_run_time_imports_is_short() -> None:
    chain = longest_chain(edges(typing=False))
    assert len(chain) <= MAX_CHAIN, f"{len(chain)} modules (at most {MAX_CHAIN}): " + " -> ".join(chain)


def test_no_import_cycle() -> None:
    found = cycles(edges(typing=True))
    assert found == [], "import cycles (type-checking imports count): " + "; ".join(" <-> ".join(g) for g in found)


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    upward = [
        f"{module} ({LAYERS[layer(module)][0]}) imports {dep} ({LAYERS[layer(dep)][0]})"
        for module, deps in edges(typing=True).items()
        for dep in sorted(deps)
        if layer(dep) > layer(module)
    ]
    assert upward == [], "\n".join(upward)


def test_intake_and_sending_do_not_reach_into_each_other() -> None:
    crossing = [
        f"{module} imports {dep}"
        for module, deps in edges(typing=True).items()
        for a, b in APART
        for dep in sorted(deps)
        if (module.startswith(a + ".") and dep.startswith(b + "."))
        or (module.startswith(b + ".") and dep.startswith(a + "."))
    ]
    assert crossing == [], "\n".join(crossing)


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer(module)


def test_modules_over_400_lines_say_why() -> None:
    """A long module says so in its docstring ('... lines: ...'), or it is split."""
    long = {
        name: len(path.read_text(encoding="utf-8").splitlines())
        for name, path in MODULES.items()
        if len(path.read_text(encoding="utf-8").splitlines()) > MAX_LINES
    }
    unexplained = [
        f"{name} ({lines} lines)"
        for name, lines in sorted(long.items())
        if f"longer than {MAX_LINES} lines" not in (ast.get_docstring(ast.parse(MODULES[name].read_text())) or "")
    ]
    assert unexplained == [], "split these, or say in the docstring why they are longer than 400 lines: " + ", ".join(
        unexplained
    )


def test_the_checks_see_a_cycle_and_an_upward_import() -> None:
    """The checks can fail: a made-up graph with a cycle and a core module importing the shell."""
    graph = {
        "connector.fhir": frozenset({"connector.runtime"}),
        "connector.runtime": frozenset({"connector.fhir"}),
    }
    assert cycles(graph) == [["connector.fhir", "connector.runtime"]]
    with pytest.raises(AssertionError, match="import cycle"):
        longest_chain(graph)
    assert layer("connector.runtime") > layer("connector.fhir")


if __name__ == "__main__":
    run_time = longest_chain(edges(typing=False))
    print(f"longest chain of run-time imports: {len(run_time)} modules\n  " + " -> ".join(run_time))
    found = cycles(edges(typing=True))
    if found:
        print("cycles (type-checking imports count): " + "; ".join(" <-> ".join(g) for g in found))
    else:
        print(f"every import: {len(longest_chain(edges(typing=True)))} modules, no cycle")
    for module in sorted(MODULES, key=lambda m: (layer(m), m)):
        print(f"  {LAYERS[layer(module)][0]:<12} {module}")
    sys.exit(0)
