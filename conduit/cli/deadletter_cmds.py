"""`conduit dead-letters`: the events a service refused, why, and replaying them once the cause is mended.

The operator's side of ``shared.deadletters``: `list` reads the dead-letter topics (nothing is
consumed or changed), `replay` publishes the chosen dead letters to the topic they came from.
"""
from __future__ import annotations

from typing import Optional

import typer

from conduit.cli.output import emit_json, fail, table
from conduit.cli.runner import load_settings, run
from conduit.context import database

_LINES = 20   # dead letters a replay names one by one before it summarises

dead_letters_app = typer.Typer(help="Events a service refused: why, and replaying them.", no_args_is_help=True)


@dead_letters_app.command("list")
def dead_letters_list(topic: Optional[str] = typer.Argument(None, help="The refusing service's topic, e.g. email.outbound (default: all)."),
                      reason: list[str] = typer.Option([], "--reason", help="Only this reason (repeatable)."),
                      pending: bool = typer.Option(False, "--pending", help="Only those not replayed yet."),
                      limit: int = typer.Option(200, "--limit", min=1, help="Show the latest this many."),
                      json_: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List dead letters, oldest first: where, when, why, and whether they were replayed."""
    from shared import deadletters

    async def go() -> None:
        settings = load_settings()
        async with database(settings) as pool:
            every = [x for t in deadletters.dead_letter_topics(topic) for x in await deadletters.read(settings, pool, t)]
        _refuse_unknown_reasons(reason, every, f" of {topic}" if topic else "")
        found = [x for x in every if (not reason or x.reason in reason) and not (pending and x.replayed_at)]
        letters = sorted(found, key=lambda x: x.logged_at)[-limit:]
        if json_:
            return emit_json(letters)
        table([(x.topic, x.at, f"{x.logged_at:%Y-%m-%d %H:%M:%S}", x.reason, x.subject or x.key or "",
                f"{x.replayed_at:%Y-%m-%d %H:%M:%S}" if x.replayed_at else "-", x.error) for x in letters],
              ["topic", "at", "logged", "reason", "about", "replayed", "error"], fit=["about", "error"])
        waiting = sum(1 for x in found if not x.replayed_at)
        if found:
            shown = f" (the last {len(letters)} shown: --limit for more)" if len(letters) < len(found) else ""
            typer.echo(f"{len(found)} dead letter{'s' * (len(found) != 1)}, {waiting} not replayed{shown}.")
    run(go)


def _refuse_unknown_reasons(reasons: list[str], every: list, where: str) -> None:
    """Reasons are codes each service gives; there is no list of them all, but a reason no dead
    letter here has is a typo to say, not an empty answer (with no dead letters, none is right)."""
    known = sorted({x.reason for x in every})
    unknown = [r for r in reasons if r not in known]
    if unknown and every:
        raise fail(f"no dead letter{where} has the reason {', '.join(map(repr, unknown))}: "
                   f"the reasons there are {', '.join(known)}")


@dead_letters_app.command("replay")
def dead_letters_replay(topic: str = typer.Argument(..., help="The topic the events were refused on, e.g. email.outbound."),
                        reason: list[str] = typer.Option([], "--reason", help="Only this reason (repeatable)."),
                        at: list[str] = typer.Option([], "--at", help="Only the dead letter at PARTITION:OFFSET (repeatable)."),
                        again: bool = typer.Option(False, "--again", help="Also those replayed before."),
                        dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be replayed; publish nothing."),
                        json_: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Publish dead letters to the topic they came from, for its service to handle again (idempotently)."""
    from shared import deadletters

    for place in at:
        partition, sep, offset = place.partition(":")
        if not (sep and partition.isdigit() and offset.isdigit()):
            raise fail(f"--at needs PARTITION:OFFSET (as `conduit dead-letters list` shows), got {place!r}")

    async def go() -> None:
        settings = load_settings()
        (name,) = deadletters.dead_letter_topics(topic)
        async with database(settings) as pool:
            if reason and not at:   # a typo among the reasons is said, as `list` says it
                _refuse_unknown_reasons(reason, await deadletters.read(settings, pool, name), f" of {name}")
            # Only the named ones (or those of the reason) are kept, with their events' bytes.
            letters = await deadletters.read(settings, pool, name, values=True,
                                             keep=lambda x: x.at in at if at else not reason or x.reason in reason)
            missing = set(at) - {x.at for x in letters}
            if missing:
                raise fail(f"no dead letter of {name} at {', '.join(sorted(missing))}")
            letters = [x for x in letters if not reason or x.reason in reason]
            chosen = [x for x in letters if again or x.replayed_at is None]
            for x in [x for x in chosen if x.content_left_out is not None]:
                typer.echo(f"{x.at}: the event ({x.content_left_out} bytes) was too large for {name}; it is on "
                           f"{x.topic} at partition {x.original_partition}, offset {x.original_offset}, and is not "
                           "replayed from here", err=True)
            chosen = [x for x in chosen if x.content_left_out is None]
            if not dry_run:
                await deadletters.replay(settings, pool, chosen)
        if json_:
            return emit_json({"topic": name, "dry_run": dry_run, "replayed": [x.model_dump(mode="json") for x in chosen]})
        skipped = 0 if again else sum(1 for x in letters if x.replayed_at)
        if not chosen:
            typer.echo(f"nothing to replay on {name}" + (f" ({skipped} replayed before: --again to replay them too)" if skipped else ""))
            return
        for x in chosen[:_LINES]:
            typer.echo(f"  {x.at}  {x.reason}  {x.subject or x.key or ''}")
        if len(chosen) > _LINES:
            typer.echo(f"  ... and {len(chosen) - _LINES} more (--json lists them all)")
        verb = "would replay" if dry_run else "replayed"
        typer.echo(f"{verb} {len(chosen)} dead letter{'s' * (len(chosen) != 1)} to {name}"
                   + ("" if dry_run else f"; {name}'s consumer handles each again, and dead-letters it again if it is still refused")
                   + (f" ({skipped} replayed before, left out: --again)" if skipped else ""))
    run(go)
