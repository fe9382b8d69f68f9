"""How commands print: aligned tables for people, JSON with --json for scripts, one-line errors."""
from __future__ import annotations

import json
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


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> None:
    rows = [["" if c is None else str(c) for c in row] for row in rows]
    if not rows:
        typer.echo("(none)")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    typer.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def fields(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        typer.echo(f"{key.ljust(width)}  {shown(value)}")


def shown(value: Any) -> str:
    """A value as a person reads it: a list as its items, not as Python writes it."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(shown(v) for v in value)
    return str(value)


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def clip(text: str, n: int) -> str:
    """``text`` cut to ``n`` characters for a table column."""
    return text if len(text) <= n else text[: n - 1] + "…"
