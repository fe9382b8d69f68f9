"""`conduit outbound`: the requests to send and where each stands, as the send ledger holds them.

The counterpart of `conduit message why` for outgoing email: "was it sent, and if not, why?"
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from conduit.cli.output import emit_json, fail, fields, table
from conduit.cli.runner import load_settings, org_option, run
from conduit.context import command_context, database

outbound_app = typer.Typer(help="Requests to send email: their status, why, and sending a failed one again.",
                            no_args_is_help=True)
STATUSES = ("pending_send", "sending", "sent", "failed", "rejected")


@outbound_app.command("list")
def outbound_list(status: Optional[str] = typer.Option(None, "--status", help="Only this status: " + ", ".join(STATUSES) + "."),
                  limit: int = typer.Option(50, min=1, max=10_000), org: str = org_option(),
                  json_: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List recent requests to send, newest first."""
    if status is not None and status not in STATUSES:
        raise typer.BadParameter(f"{status!r} is not one of {', '.join(STATUSES)}", param_hint="--status")

    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            requests = await ctx.registry.outbound_requests(ctx.org, status, limit)
            if json_:
                return emit_json(requests)
            table([(f"{r.created_at:%Y-%m-%d %H:%M:%S}", r.status, r.reason or "", r.attempts, r.mailbox_email or "",
                    ", ".join(r.to), r.subject or "", r.idempotency_key) for r in requests],
                  ["created", "status", "reason", "attempts", "mailbox", "to", "subject", "key"], fit=["to", "subject"])
    run(go)


@outbound_app.command("store")
def outbound_store(files: list[Path] = typer.Argument(..., help="Files to attach by reference."),
                   json_: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Store attachment content in the raw store and print each file's SHA-256: what an email.outbound
    request's attachment names as `content_sha256` (content-addressed: storing twice is a no-op)."""
    contents = []
    for path in files:
        try:
            contents.append((path, path.read_bytes()))
        except OSError as exc:
            raise fail(f"{path}: {exc.strerror or exc}") from None

    async def go() -> None:
        from shared.rawstore import store_raw

        async with database(load_settings()) as pool, pool.acquire() as conn:
            hashes = await store_raw(conn, [content for _, content in contents])
        stored = [{"file": str(path), "content_sha256": sha, "size": len(content)}
                  for (path, content), sha in zip(contents, hashes)]
        if json_:
            return typer.echo(json.dumps(stored, indent=2))
        for item in stored:
            typer.echo(f"{item['content_sha256']}  {item['size']:>10}  {item['file']}")
    run(go)


@outbound_app.command("show")
def outbound_show(ref: str = typer.Argument(..., help="Idempotency key, request id or Message-ID."), org: str = org_option(),
                  json_: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show a request to send: its status, attempts, the server's reply, and what that means."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            r = await ctx.registry.outbound_request(ctx.org, ref)
            if json_:
                return emit_json({**r.model_dump(mode="json"), "explanation": r.explanation()})
            fields([(k.replace("_", " "), ", ".join(v) if isinstance(v, list) else v) for k, v in r.model_dump().items()
                    if v is not None and v != []])
            typer.echo(r.explanation())
    run(go)


@outbound_app.command("resend")
def outbound_resend(ref: str = typer.Argument(..., help="Idempotency key, request id or Message-ID of a failed request."),
                    key: Optional[str] = typer.Option(None, "--key", help="The new idempotency key (default: KEY.resend)."),
                    wait: bool = typer.Option(False, "--wait", help="Wait for the final status and print it."),
                    timeout: float = typer.Option(60.0, "--timeout", min=1, help="Seconds --wait waits."),
                    org: str = org_option(), json_: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Send a failed request again, as a new request with a new idempotency key (and a new Message-ID).

    For outcome_unknown, first check that it did not arrive: `conduit outbound show` names the Message-ID.
    """
    from conduit.cli.send_cmd import checked_key, publish_request

    checked_key(key)

    async def go() -> int:
        async with command_context(load_settings(), org) as ctx:
            payload = await ctx.registry.resend_request(ctx.org, ref, key)
            return await publish_request(ctx, payload, producer="conduit outbound resend", wait=wait, timeout=timeout,
                                         json_=json_)

    code = run(go)
    if code:
        raise typer.Exit(code)
