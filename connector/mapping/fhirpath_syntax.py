"""Strict FHIRPath syntax: fhirpathpy's parser recovers from syntax errors silently (`Appointment..status`,
a missing `)`, `a b c` all compile and quietly select something else), so mapping conditions are parsed
once more here with the same grammar, and any syntax error, or text left over after the expression, is
reported. Pure: text in, the first problem (or None) out."""

from __future__ import annotations

from typing import Any

from antlr4 import CommonTokenStream, InputStream, Token
from antlr4.error.ErrorListener import ErrorListener
from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser


class _Collect(ErrorListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.problems: list[tuple[int, str]] = []

    def syntaxError(self, recognizer: Any, symbol: Any, line: int, column: int, message: str, error: Any) -> None:
        self.problems.append((column, message))


def syntax_error(expression: str) -> str | None:
    """The first syntax error of `expression`, as `column N: what` (None: it parses whole)."""
    collected = _Collect()
    lexer = FHIRPathLexer(InputStream(expression))
    lexer.removeErrorListeners()
    lexer.addErrorListener(collected)
    tokens = CommonTokenStream(lexer)
    parser = FHIRPathParser(tokens)
    parser.removeErrorListeners()
    parser.addErrorListener(collected)
    try:
        parser.expression()
    except Exception as exc:  # noqa: BLE001 - the lexer raises on characters it cannot read
        collected.problems.append((0, type(exc).__name__))
    if not collected.problems:
        left = tokens.LT(1)
        if left is not None and left.type != Token.EOF:
            collected.problems.append((left.column, f"unexpected {left.text!r} after a complete expression"))
    if not collected.problems:
        return None
    column, message = collected.problems[0]
    message = message.split(" expecting ")[0]
    if message == "mismatched input '<EOF>'":
        message = "the expression ends too soon"
    message = message.replace("mismatched input", "unexpected").replace("'<EOF>'", "the end of the expression")
    return f"column {column + 1}: {message}"
