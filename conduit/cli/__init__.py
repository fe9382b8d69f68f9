"""The `conduit` command: run the system, run one service, and manage the registry."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from conduit.cli import deadletter_cmds, outbound_cmds, registry_cmds, secrets_cmds, send_cmd
from conduit.cli.output import fail
from conduit.cli.runner import load_settings, run

# Help as click formats it, not rich's panels: those cut option names and defaults to fit 80 columns
# (`--same-outgoing…`); click puts a long option on a line of its own and wraps its help instead.
# The setting is the root's, and typer passes it down to every sub-command.
app = typer.Typer(help="Conduit: server-side synchronization of email, appointments, contacts and tasks.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
schemas_app = typer.Typer(help="Event JSON Schemas.", no_args_is_help=True)
rules_app = typer.Typer(help="The relevance rules evaluate applies, per tracking option.", no_args_is_help=True)

app.add_typer(db_app, name="db")
app.add_typer(schemas_app, name="schemas")
app.add_typer(rules_app, name="rules")
app.add_typer(registry_cmds.org_app, name="org")
app.add_typer(registry_cmds.profile_app, name="profile")
app.add_typer(registry_cmds.user_app, name="user")
app.add_typer(registry_cmds.queue_app, name="queue")
app.add_typer(registry_cmds.mailbox_app, name="mailbox")
app.add_typer(registry_cmds.record_app, name="record")
app.add_typer(registry_cmds.activity_app, name="activity")
app.add_typer(registry_cmds.message_app, name="message")
app.command("send")(send_cmd.send)
app.add_typer(outbound_cmds.outbound_app, name="outbound")
app.add_typer(deadletter_cmds.dead_letters_app, name="dead-letters")
app.add_typer(secrets_cmds.secrets_app, name="secrets")


@rules_app.command("list")
def rules_list(option: Optional[str] = typer.Option(None, "--option", help="Only this tracking option's chain."),
               json_: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The rule chain of each tracking option, in the order rules are tried; the first to decide wins."""
    from conduit.services import rule_chains

    chains = rule_chains()
    if option is not None:
        if option not in chains:
            raise fail(f"unknown tracking option {option!r}: choose from {', '.join(chains)}")
        chains = {option: chains[option]}
    if json_:
        typer.echo(json.dumps({o: [{"rule": n, "description": d, "reasons": list(r)} for n, d, r in rules]
                               for o, rules in chains.items()}, indent=2))
        return
    for o, rules in chains.items():
        typer.echo(f"tracking option {o}:")
        for i, (name, description, reasons) in enumerate(rules, 1):
            typer.echo(f"  {i:2}. {name} [{', '.join(reasons)}]\n      {description}")


@app.command()
def up() -> None:
    """Run the whole system: embedded PostgreSQL and broker unless configured, migrations, all four services."""
    from conduit.stack import run_up

    # Not the running stack's settings: this one is a stack of its own (refused if one runs already).
    run(lambda: run_up(load_settings(use_running_stack=False)))


@app.command()
def demo() -> None:
    """Show Conduit working end to end against local real peers (Dovecot, an SMTP capture server)."""
    from conduit.demo import run_demo

    run(lambda: run_demo(load_settings(use_running_stack=False)))


@app.command("run")
def run_one(service: str = typer.Argument(..., help="ingest, evaluate, dispatch or exchange_sync"),
            burst: bool = typer.Option(False, help="Return once there is no more work (tests).")) -> None:
    """Run one service (what a Kubernetes pod runs)."""
    from conduit.services import SERVICE_FACTORIES, build_service
    from shared.lifecycle import run_service
    from shared.logs import configure_logging

    if service not in SERVICE_FACTORIES:
        raise fail(f"unknown service {service!r}: choose from {', '.join(SERVICE_FACTORIES)}")
    settings = load_settings()
    configure_logging(settings, service)
    run(lambda: run_service(build_service(service, settings), health_port=settings.health_port, burst=burst,
                            health_host=settings.health_host))


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending migrations (idempotent; safe to run from several places at once)."""
    from shared.db.migrate import migrate
    from shared.db.pool import create_pool

    async def go() -> None:
        pool = await create_pool(load_settings(), max_size=1, name="conduit-cli")
        try:
            async with pool.acquire() as conn:
                applied = await migrate(conn)
        finally:
            await pool.close()
        typer.echo(f"applied {', '.join(applied)}" if applied else "database is up to date")
    run(go)


@schemas_app.command("export")
def schemas_export(directory: Path = typer.Option(Path("schemas"), help="Where to write the JSON Schema files.")) -> None:
    """Write one JSON Schema file per topic (checked in; a test keeps them equal to the models)."""
    from shared.events.schemas import export_schemas

    try:
        written = export_schemas(directory)
    except OSError as exc:   # not a folder, not writable, a file in the way
        where = exc.filename or directory
        raise fail(f"cannot write the schemas to {directory}: {exc.strerror or exc}"
                   f"{'' if str(where) == str(directory) else f' ({where})'}") from None
    for path in written:
        typer.echo(f"wrote {path}")


def main() -> None:
    """`conduit`: a usage error (an unknown option, a bad value) is one `error:` line, like every other
    error, instead of click's usage block; click's own handling is kept for the rest."""
    # The vendored click's exceptions are reachable only through typer's (as in the runner).
    click_exception = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        code = app(standalone_mode=False)   # an Exit's code is returned, not raised
    except click_exception as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":   # `conduit outbound`: the group's help
            exc.show()
            sys.exit(exc.exit_code)
        message = " ".join(exc.format_message().split())
        where = getattr(exc, "ctx", None)
        hint = f" (`{where.command_path} --help` says more)" if where is not None else ""
        if getattr(exc, "option_name", None) == "--email" and where is not None \
                and where.command_path.split()[-2:] in (["user", "add"], ["queue", "add"]):
            # `set` takes --email; `add` takes the address as its argument (click would offer --help).
            message = f"no such option: --email: the address is the argument, `{where.command_path} ADDRESS --name NAME`"
            hint = ""
        raise SystemExit(fail(message + hint, code=exc.exit_code).exit_code) from None
    except typer.Abort:   # Ctrl-D at a prompt
        raise SystemExit(fail("aborted", code=1).exit_code) from None
    sys.exit(code if isinstance(code, int) else 0)
