"""How commands print: aligned tables for people, JSON with --json for scripts, one-line errors."""
from __future__ import annotations

import json
import shutil
import sys
import unicodedata
from typing import Any, Iterable, Sequence

import typer
from pydantic import BaseModel


def emit_json(value: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> None:
    if isinstance(value, BaseModel):
        typer.echo(value.model_dump_json(indent=2))
    elif isinstance(value, dict):
        typer.echo(json.dumps(value, indent=2, default=str))
    else:
        typer.echo(json.dumps([v.model_dump(mode="json") for v in value], indent=2))


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str], *, fit: Sequence[str] = ()) -> None:
    """Aligned columns, one row a line.  The columns named in ``fit`` (free text: an error, a subject)
    are cut so that a line fits the terminal; into a pipe or a file nothing is cut (a script or
    `grep` gets every character)."""
    rows = [[escaped("" if c is None else str(c)) for c in row] for row in rows]
    if not rows:
        typer.echo("(none)")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    cut = [i for i, h in enumerate(headers) if h in fit]
    if cut and sys.stdout.isatty():
        room = shutil.get_terminal_size().columns - sum(w for i, w in enumerate(widths) if i not in cut) \
            - 2 * (len(headers) - 1)
        # The narrowest first: what one does not need, the next may use.
        for n, i in enumerate(sorted(cut, key=lambda i: widths[i])):
            widths[i] = min(widths[i], max(room // (len(cut) - n), len(headers[i]), 12))
            room -= widths[i]
        rows = [[clip(c, widths[i]) if i in cut else c for i, c in enumerate(row)] for row in rows]
    typer.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def fields(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        typer.echo(f"{key.ljust(width)}  {escaped(shown(value))}")


def shown(value: Any) -> str:
    """A value as a person reads it: a list as its items, not as Python writes it."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(shown(v) for v in value)
    return str(value)


def escaped(text: str) -> str:
    """``text`` on one line, as a terminal cannot misread it: control characters (a line break in a
    key, an escape sequence in a subject) and line separators written as Python writes them (``\\n``)."""
    if text.isprintable():   # the common case, at once (a space is printable)
        return text
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c
                   for c in text)


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def clip(text: str, n: int) -> str:
    """``text`` cut to ``n`` characters for a table column."""
    return text if len(text) <= n else text[: n - 1] + "…"
