"""Registry commands: profiles, users, queues, mailboxes, CRM records, activities, decisions.

Thin: each parses its arguments, calls ``shared.registry.service.Registry`` and prints.
"""
from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import Any, Optional

import typer
from aiokafka.errors import KafkaError
from pydantic import SecretStr

from conduit.cli.output import clip, emit_json, fail, fields, table
from conduit.cli.runner import load_settings, org_option, run
from conduit.context import command_context
from shared.errors import ConduitError, NotFound
from shared.registry import models
from shared.registry.repository import DIRECTIONS
from shared.registry.service import OwnerEdit, ProfileInput

log = logging.getLogger(__name__)

profile_app = typer.Typer(help="Email server profiles.", no_args_is_help=True)
user_app = typer.Typer(help="Users.", no_args_is_help=True)
queue_app = typer.Typer(help="Queues.", no_args_is_help=True)
mailbox_app = typer.Typer(help="Mailboxes: credentials, approval, Test & Enable.", no_args_is_help=True)
record_app = typer.Typer(help="CRM records that correlation resolves: contacts, accounts, leads.", no_args_is_help=True)
activity_app = typer.Typer(help="Email activities.", no_args_is_help=True)
message_app = typer.Typer(help="Why a message was or was not tracked.", no_args_is_help=True)
org_app = typer.Typer(help="Organizations and their correlation settings.", no_args_is_help=True)
folder_rule_app = typer.Typer(help="Folder-level tracking rules: a folder's email tracked regarding a record.",
                              no_args_is_help=True)
mailbox_app.add_typer(folder_rule_app, name="folder-rule")

JSON = typer.Option(False, "--json", help="Print JSON.")
SAME_OUTGOING_HELP = ("Use the incoming settings for outgoing too: the incoming credentials, and the incoming host "
                      "when no --outgoing-host is given.")
STOP_HELP = ("Stop a mailbox's direction after this many refused sign-ins in a row (1-100), until Test & Enable "
             "succeeds again; 0: never stop, back off and retry (the default).")


# --- organizations ------------------------------------------------------------------------------

@org_app.command("add")
def org_add(name: str, json_: bool = JSON) -> None:
    """Create an organization."""
    async def go() -> None:
        async with command_context(load_settings(), "default") as ctx:
            org = await ctx.registry.add_organization(name)
            emit_json(org) if json_ else typer.echo(f"organization {org.name} created ({org.id})")
    run(go)


@org_app.command("show")
def org_show(org: str = org_option(), json_: bool = JSON) -> None:
    """Show an organization's correlation settings."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            o = ctx.org
            emit_json(o) if json_ else fields([
                ("name", o.name), ("id", o.id), ("correlation order", ", ".join(o.correlation_order)),
                ("tracking token", f"{o.tracking_token_prefix}{'0' * o.tracking_token_digits}" if o.tracking_token_enabled else "off"),
                ("smart matching", f"on (at least {o.smart_matching_min_recipients} shared participant(s))"
                                   if o.smart_matching else "off"),
            ])
    run(go)


@org_app.command("set-correlation")
def org_set_correlation(
    org: str = org_option(),
    order: Optional[str] = typer.Option(None, help="Comma-separated: in_reply_to,tracking_token,thread_index,smart_matching"),
    tracking_token: Optional[bool] = typer.Option(None, "--tracking-token/--no-tracking-token"),
    token_prefix: Optional[str] = typer.Option(None),
    token_digits: Optional[int] = typer.Option(None),
    smart_matching: Optional[bool] = typer.Option(None, "--smart-matching/--no-smart-matching"),
    smart_matching_min_recipients: Optional[int] = typer.Option(
        None, help="Participants a message must share with a tracked email of the same subject (1-50; the "
                   "receiving mailbox's own address does not count)"),
) -> None:
    """Change how replies are correlated to tracked email."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            o = await ctx.registry.configure_correlation(
                ctx.org, correlation_order=[p.strip() for p in order.split(",") if p.strip()] if order is not None else None,
                tracking_token_enabled=tracking_token, tracking_token_prefix=token_prefix,
                tracking_token_digits=token_digits, smart_matching=smart_matching,
                smart_matching_min_recipients=smart_matching_min_recipients)
            typer.echo(f"correlation order: {', '.join(o.correlation_order)}")
    run(go)


# --- profiles -------------------------------------------------------------------------------------

@profile_app.command("add")
def profile_add(
    name: str,
    server_type: models.ServerType = typer.Option(..., "--type", help="imap, pop3, exchange_server, exchange_online or smtp"),
    incoming_host: Optional[str] = typer.Option(None), incoming_port: Optional[int] = typer.Option(None),
    incoming_tls: models.TlsMode = typer.Option("implicit"),
    outgoing_host: Optional[str] = typer.Option(None), outgoing_port: Optional[int] = typer.Option(None),
    outgoing_tls: models.TlsMode = typer.Option("starttls"),
    same_outgoing: bool = typer.Option(True, "--same-outgoing-settings/--separate-outgoing-settings",
                                       help=SAME_OUTGOING_HELP),
    service_url: Optional[str] = typer.Option(None, help="EWS URL, or the Graph base URL."),
    auth: models.AuthMethod = typer.Option("mailbox_credentials", help="mailbox_credentials, profile_impersonation or oauth2"),
    profile_user: Optional[str] = typer.Option(None, help="Profile user for impersonation."),
    oauth_token_url: Optional[str] = typer.Option(None), oauth_client_id: Optional[str] = typer.Option(None),
    oauth_scope: Optional[str] = typer.Option(None),
    tls_ca_file: Optional[str] = typer.Option(None, help="Extra CA certificate file to trust (verification stays on)."),
    max_connections: int = typer.Option(10, help="Maximum concurrent connections per server."),
    polling_interval: int = typer.Option(60, help="Minimum polling interval, seconds."),
    received_after: Optional[datetime] = typer.Option(None, help="Process only email received after this date."),
    move_failed: bool = typer.Option(False, help="IMAP: move a message the server will not hand over (skipped after 3 refusals) to an Undeliverable folder."),
    stop_after_refused_logins: int = typer.Option(0, help=STOP_HELP),
    default: bool = typer.Option(False, "--default", help="Make it the organization's default profile."),
    org: str = org_option(), json_: bool = JSON,
) -> None:
    """Add an email server profile.  Secrets are read from CONDUIT_PROFILE_SECRET / CONDUIT_OAUTH_CLIENT_SECRET or a prompt."""
    profile_secret = _secret_from("CONDUIT_PROFILE_SECRET", "profile password") if auth == "profile_impersonation" else None
    client_secret = _secret_from("CONDUIT_OAUTH_CLIENT_SECRET", "OAuth client secret") if auth == "oauth2" else None
    spec = ProfileInput(
        name=name, server_type=server_type, incoming_host=incoming_host, incoming_port=incoming_port,
        incoming_tls=incoming_tls, outgoing_host=outgoing_host or (incoming_host if same_outgoing else None),
        outgoing_port=outgoing_port, outgoing_tls=outgoing_tls, use_same_settings_for_outgoing=same_outgoing,
        service_url=service_url, auth_method=auth, profile_username=profile_user, profile_secret=profile_secret,
        oauth_token_url=oauth_token_url, oauth_client_id=oauth_client_id, oauth_client_secret=client_secret,
        oauth_scope=oauth_scope, tls_ca_file=tls_ca_file, max_concurrent_connections=max_connections,
        min_polling_interval_seconds=polling_interval,
        process_email_received_after=received_after.astimezone() if received_after else None,
        move_failed_to_undeliverable=move_failed, stop_after_refused_logins=stop_after_refused_logins,
    )

    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            p = await ctx.registry.add_profile(ctx.org, spec, make_default=default)
            emit_json(p) if json_ else typer.echo(f"profile {p.name} added ({p.id}){' [default]' if p.is_default else ''}")
            _warn_cleartext(p)
    run(go)


def _warn_cleartext(p: models.Profile) -> None:
    """Allowed (a relay inside the organization), but said: passwords cross the network in clear."""
    for server in p.cleartext_servers():
        typer.echo(f"warning: profile {p.name} reaches {server} without TLS: passwords and tokens would cross the "
                   "network in clear (--incoming-tls / --outgoing-tls starttls or implicit)", err=True)


@profile_app.command("set")
def profile_set(
    ref: str = typer.Argument(..., help="Profile name or id."),
    name: Optional[str] = typer.Option(None, help="A new name."),
    incoming_host: Optional[str] = typer.Option(None, help="The IMAP or POP3 server (the outgoing host follows "
                                                            "when it was the same and settings are shared)."),
    incoming_port: Optional[int] = typer.Option(None, help="The IMAP or POP3 port."),
    incoming_tls: Optional[models.TlsMode] = typer.Option(None, help="TLS to the incoming server: implicit, starttls or none."),
    outgoing_host: Optional[str] = typer.Option(None, help="The SMTP server."),
    outgoing_port: Optional[int] = typer.Option(None, help="The SMTP port (default: 465 implicit, 587 starttls, 25 none)."),
    outgoing_tls: Optional[models.TlsMode] = typer.Option(None, help="TLS to the SMTP server: implicit, starttls or none."),
    same_outgoing: Optional[bool] = typer.Option(None, "--same-outgoing-settings/--separate-outgoing-settings",
                                                 help=SAME_OUTGOING_HELP),
    service_url: Optional[str] = typer.Option(None, help="Exchange only: the EWS URL, or the Graph base URL."),
    auth: Optional[models.AuthMethod] = typer.Option(None, help="mailbox_credentials, profile_impersonation or oauth2"),
    profile_user: Optional[str] = typer.Option(None, help="Impersonation only: the profile's user."),
    profile_secret: bool = typer.Option(False, "--new-profile-secret",
                                        help="Replace the impersonation password (from CONDUIT_PROFILE_SECRET or a prompt)."),
    oauth_token_url: Optional[str] = typer.Option(None, help="OAuth 2.0 only: the token endpoint (https)."),
    oauth_client_id: Optional[str] = typer.Option(None, help="OAuth 2.0 only: the client (application) id."),
    oauth_scope: Optional[str] = typer.Option(None, help="OAuth 2.0 only: the scope asked for."),
    client_secret: bool = typer.Option(False, "--new-client-secret",
                                       help="Replace the OAuth client secret (from CONDUIT_OAUTH_CLIENT_SECRET or a prompt)."),
    tls_ca_file: Optional[str] = typer.Option(None, help="Extra CA certificate file to trust (verification stays on)."),
    max_connections: Optional[int] = typer.Option(None, help="Maximum concurrent connections per server."),
    polling_interval: Optional[int] = typer.Option(None, help="Minimum polling interval, seconds."),
    received_after: Optional[datetime] = typer.Option(None, help="Process only email received after this date."),
    move_failed: Optional[bool] = typer.Option(None, "--move-failed/--no-move-failed", help="IMAP: move messages given up on to an Undeliverable folder."),
    stop_after_refused_logins: Optional[int] = typer.Option(None, help=STOP_HELP),
    clear: list[str] = typer.Option([], "--clear", help="Reset a setting to none, e.g. tls-ca-file, received-after, "
                                                         "oauth-scope (repeatable)."),
    org: str = org_option(), json_: bool = JSON,
) -> None:
    """Change a profile's settings; the others stay.  Running services take the change within seconds."""
    changes = dict(
        name=name, incoming_host=incoming_host, incoming_port=incoming_port, incoming_tls=incoming_tls,
        outgoing_host=outgoing_host, outgoing_port=outgoing_port, outgoing_tls=outgoing_tls,
        use_same_settings_for_outgoing=same_outgoing, service_url=service_url, auth_method=auth,
        profile_username=profile_user, oauth_token_url=oauth_token_url, oauth_client_id=oauth_client_id,
        oauth_scope=oauth_scope, tls_ca_file=tls_ca_file, max_concurrent_connections=max_connections,
        min_polling_interval_seconds=polling_interval,
        process_email_received_after=received_after.astimezone() if received_after else None,
        move_failed_to_undeliverable=move_failed, stop_after_refused_logins=stop_after_refused_logins,
        profile_secret=_secret_from("CONDUIT_PROFILE_SECRET", "profile password") if profile_secret else None,
        oauth_client_secret=_secret_from("CONDUIT_OAUTH_CLIENT_SECRET", "OAuth client secret") if client_secret else None,
    )

    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            try:
                before = await ctx.registry.profile(ctx.org, ref)
            except NotFound:
                before = None   # the edit below says what is wrong, its input first
            waiting = _waiting(await ctx.registry.mailboxes(ctx.org), before.id if before else None)
            p = await ctx.registry.update_profile(ctx.org, ref, clear=clear, **changes)
            if json_:
                emit_json(p)
            else:
                # What really changed, a setting that follows another (the outgoing host) included.
                changed = [k for k in p.model_fields
                           if not k.startswith("has_") and getattr(p, k) != getattr(before, k)]
                changed += [k for k in ("profile_secret", "oauth_client_secret") if changes[k] is not None]
                typer.echo(f"profile {p.name} changed: {', '.join(changed)}" if changed
                           else f"profile {p.name}: already so, nothing changed")
            # Notes go to standard error with --json, whose standard output is the JSON alone.
            cleared = _backoffs_cleared(waiting, await ctx.registry.mailboxes(ctx.org)) if waiting else {}
            if cleared:
                directions = sorted({d for ds in cleared.values() for d in ds}, key=DIRECTIONS.index)
                typer.echo(f"profile {p.name}: back-off cleared for {len(cleared)} mailbox"
                           f"{'es' if len(cleared) != 1 else ''} ({', '.join(directions)}): their next sessions "
                           "use the new settings", err=json_)
            if before is not None and p.process_email_received_after != before.process_email_received_after:
                after = p.process_email_received_after
                typer.echo(f"profile {p.name}: "
                           + (f"email received after {after:%Y-%m-%d %H:%M %Z}".rstrip() if after else "no received-after date")
                           + " applies to mail received from now on; mail skipped before is not fetched again",
                           err=json_)
            _warn_cleartext(p)
    run(go)


def _waiting(mailboxes: list[models.Mailbox], profile_id: Any) -> dict[Any, list[str]]:
    """The directions of each mailbox (on ``profile_id``, or any) that back off now, not stopped."""
    now = datetime.now(timezone.utc)
    waiting = {m.id: [d for d in DIRECTIONS if _backing_off(getattr(m, d), now) and not getattr(m, d).stopped]
               for m in mailboxes if profile_id is None or m.profile_id == profile_id}
    return {m: ds for m, ds in waiting.items() if ds}


def _backoffs_cleared(waiting: dict[Any, list[str]], mailboxes: list[models.Mailbox]) -> dict[Any, list[str]]:
    """Of the back-offs ``waiting`` saw, those an edit ended (the registry clears them when the server
    or the credentials of a direction change)."""
    cleared = {m.id: [d for d in waiting[m.id] if getattr(m, d).backoff_until is None]
               for m in mailboxes if m.id in waiting}
    return {m: ds for m, ds in cleared.items() if ds}


@profile_app.command("list")
def profile_list(org: str = org_option(), json_: bool = JSON) -> None:
    """List email server profiles."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            ps = await ctx.registry.profiles(ctx.org)
            if json_:
                return emit_json(ps)
            table([(p.name, p.server_type, _endpoint(p.incoming_host, p.incoming_port, p.incoming_tls),
                    # What dispatch will reach: the incoming host and the TLS mode's port when none is named.
                    _endpoint(p.outgoing_host or p.incoming_host,
                              p.outgoing_port or models.DEFAULT_SUBMISSION_PORT[p.outgoing_tls], p.outgoing_tls),
                    p.auth_method, _stop_after(p, short=True),
                    "yes" if p.is_default else "") for p in ps],
                  ["name", "type", "incoming", "outgoing", "auth", "refused sign-ins", "default"])
    run(go)


@profile_app.command("show")
def profile_show(ref: str = typer.Argument(..., help="Profile name or id."), org: str = org_option(), json_: bool = JSON) -> None:
    """Show one profile."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            p = await ctx.registry.profile(ctx.org, ref)
            emit_json(p) if json_ else fields([(k.replace("_", " "), _stop_after(p) if k == "stop_after_refused_logins" else v)
                                               for k, v in p.model_dump().items()])
    run(go)


def _stop_after(p: models.Profile, *, short: bool = False) -> str:
    """What the profile does when a mailbox's sign-ins are refused."""
    n = p.stop_after_refused_logins
    if short:
        return f"stop after {n}" if n else "retry"
    return (f"after {n} in a row, the direction stops until Test & Enable" if n
            else "never (backs off and retries)")


@profile_app.command("set-default")
def profile_set_default(ref: str, org: str = org_option()) -> None:
    """Make a profile the organization's default (mailboxes without a profile are linked to it)."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            p = await ctx.registry.set_default_profile(ctx.org, ref)
            typer.echo(f"profile {p.name} is now the default")
    run(go)


# --- users and queues -------------------------------------------------------------------------------

@user_app.command("add")
def user_add(
    email: str = typer.Argument(..., metavar="ADDRESS", help="The user's email address."),
    name: str = typer.Option(..., "--name", help="Full name."),
    incoming: models.IncomingMethod = typer.Option("server_side_sync"),
    outgoing: models.OutgoingMethod = typer.Option("server_side_sync"),
    act: models.ActMethod = typer.Option("none", help="Appointments, contacts and tasks."),
    org: str = org_option(), json_: bool = JSON,
) -> None:
    """Add a user; with server-side sync, its mailbox is created on the default profile."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            u = await ctx.registry.add_user(ctx.org, name, email, incoming=incoming, outgoing=outgoing, act=act)
            emit_json(u) if json_ else typer.echo(
                f"user {u.email} added ({u.id})" + (f"; mailbox {u.mailbox_id}" if u.mailbox_id else ""))
            await _warn_shared_address(ctx, u.email, "user", u.id)
    run(go)


@user_app.command("list")
def user_list(org: str = org_option(), json_: bool = JSON) -> None:
    """List users."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            us = await ctx.registry.users(ctx.org)
            if json_:
                return emit_json(us)
            table([(u.email, u.full_name, u.incoming_method, u.outgoing_method, u.act_method,
                    "yes" if u.active else "no", u.mailbox_id) for u in us],
                  ["email", "name", "incoming", "outgoing", "act", "active", "mailbox"])
    run(go)


@queue_app.command("add")
def queue_add(
    email: str = typer.Argument(..., metavar="ADDRESS", help="The queue's email address."),
    name: str = typer.Option(..., "--name", help="The queue's name."),
    incoming: models.IncomingMethod = typer.Option("server_side_sync"),
    outgoing: models.OutgoingMethod = typer.Option("server_side_sync"),
    org: str = org_option(), json_: bool = JSON,
) -> None:
    """Add a queue; with server-side sync, its mailbox is created on the default profile."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            q = await ctx.registry.add_queue(ctx.org, name, email, incoming=incoming, outgoing=outgoing)
            emit_json(q) if json_ else typer.echo(
                f"queue {q.name} added ({q.id})" + (f"; mailbox {q.mailbox_id}" if q.mailbox_id else ""))
            await _warn_shared_address(ctx, q.email, "queue", q.id)
    run(go)


@queue_app.command("list")
def queue_list(org: str = org_option(), json_: bool = JSON) -> None:
    """List queues."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            qs = await ctx.registry.queues(ctx.org)
            if json_:
                return emit_json(qs)
            table([(q.name, q.email, q.incoming_method, q.outgoing_method, "yes" if q.active else "no", q.mailbox_id)
                   for q in qs], ["name", "email", "incoming", "outgoing", "active", "mailbox"])
    run(go)


@user_app.command("set")
def user_set(
    ref: str = typer.Argument(..., help="The user's address or id."),
    email: Optional[str] = typer.Option(None, "--email", help="A new address, its mailbox's too: the mailbox must "
                                                               "then be approved and tested again."),
    incoming: Optional[models.IncomingMethod] = typer.Option(None, help="How the user's incoming email is delivered."),
    outgoing: Optional[models.OutgoingMethod] = typer.Option(None, help="How the user's outgoing email is sent."),
    act: Optional[models.ActMethod] = typer.Option(None, help="Appointments, contacts and tasks."),
    org: str = org_option(), json_: bool = JSON,
) -> None:
    """Change a user's address or delivery methods; the others stay."""
    _owner_edit("user", ref, org, json_, email=email, incoming_method=incoming, outgoing_method=outgoing,
                act_method=act)


@user_app.command("activate")
def user_activate(ref: str = typer.Argument(..., help="The user's address or id."), org: str = org_option()) -> None:
    """Activate a user: its mailbox is processed again (when approved and tested)."""
    _owner_edit("user", ref, org, False, active=True)


@user_app.command("deactivate")
def user_deactivate(ref: str = typer.Argument(..., help="The user's address or id."), org: str = org_option()) -> None:
    """Deactivate a user: its mailbox is not processed while the user is inactive."""
    _owner_edit("user", ref, org, False, active=False)


@queue_app.command("set")
def queue_set(
    ref: str = typer.Argument(..., help="The queue's address, name or id."),
    email: Optional[str] = typer.Option(None, "--email", help="A new address, its mailbox's too: the mailbox must "
                                                               "then be approved and tested again."),
    incoming: Optional[models.IncomingMethod] = typer.Option(None, help="How the queue's incoming email is delivered."),
    outgoing: Optional[models.OutgoingMethod] = typer.Option(None, help="How the queue's outgoing email is sent."),
    org: str = org_option(), json_: bool = JSON,
) -> None:
    """Change a queue's address or delivery methods; the others stay."""
    _owner_edit("queue", ref, org, json_, email=email, incoming_method=incoming, outgoing_method=outgoing)


@queue_app.command("activate")
def queue_activate(ref: str = typer.Argument(..., help="The queue's address, name or id."), org: str = org_option()) -> None:
    """Activate a queue: its mailbox is processed again (when approved and tested)."""
    _owner_edit("queue", ref, org, False, active=True)


@queue_app.command("deactivate")
def queue_deactivate(ref: str = typer.Argument(..., help="The queue's address, name or id."), org: str = org_option()) -> None:
    """Deactivate a queue: its mailbox is not processed while the queue is inactive."""
    _owner_edit("queue", ref, org, False, active=False)


def _owner_edit(kind: str, ref: str, org: str, json_: bool, **changes: Any) -> None:
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            update = ctx.registry.update_user if kind == "user" else ctx.registry.update_queue
            edit = await update(ctx.org, ref, **changes)
            if "email" in edit.changed:   # standard error: with --json, standard output is the JSON alone
                await _warn_shared_address(ctx, edit.owner.email, kind, edit.owner.id)
            if json_:
                return emit_json({kind: edit.owner.model_dump(mode="json"),
                                  "changed": {k: list(v) for k, v in edit.changed.items()},
                                  "mailbox": edit.mailbox.model_dump(mode="json") if edit.mailbox else None,
                                  "mailbox_created": edit.mailbox_created, "approval_withdrawn": edit.approval_withdrawn,
                                  "tests_reset": list(edit.tests_reset), "processed": list(edit.processed),
                                  "waits_for": list(edit.waits_for)})
            typer.echo(_owner_line(kind, edit, set(changes) == {"active"}))
    run(go)


async def _warn_shared_address(ctx: Any, email: str, kind: str, own_id: Any) -> None:
    """One line on standard error when ``email``, just given to the ``kind`` ``own_id``, is another
    user's, queue's, contact's, account's or lead's too: mail from it is resolved to one of them only
    (the first of users, contacts, accounts, leads, queues: docs/inbound.md, "Parties"), so a user
    with a customer's address takes that customer's mail."""
    parties = await ctx.registry.parties_with_address(ctx.org, email)
    others = [p for p in parties if p[1] != own_id]
    if not others:
        return

    def named(party: tuple[str, Any, str]) -> str:
        return f"this {kind}" if party[1] == own_id else f"the {party[0]} {party[2]}"
    typer.echo(f"warning: {email} is also the address of " + ", ".join(f"{k} {n} ({i})" for k, i, n in others)
               + f"; mail from it is resolved to {named(parties[0])}, not to "
               + " or ".join(named(p) for p in parties[1:])
               + " (the first of users, contacts, accounts, leads, queues, the oldest first: docs/inbound.md), "
                 "mail to it to all of them", err=True)


def _owner_line(kind: str, edit: OwnerEdit, activation: bool) -> str:
    """What an edit of a user or a queue did, and where its mailbox stands, in one line."""
    before = edit.changed["email"][0] if "email" in edit.changed else edit.owner.email
    who = f"{kind} {before}"
    if activation:
        if not edit.changed:
            return f"{who}: {'active' if edit.owner.active else 'inactive'} already; nothing changed"
        if not edit.owner.active:
            return f"{who}: deactivated; " + (f"its mailbox {edit.mailbox.email} is not processed while the {kind} is "
                                               "inactive" if edit.mailbox else "it has no mailbox")
        head = f"{who}: activated"
    elif not edit.changed:
        return f"{who}: already so, nothing changed"
    else:
        head = f"{who} changed: " + ", ".join(
            f"address now {new}" if k == "email" else f"{k.removesuffix('_method')} {old} -> {new}"
            for k, (old, new) in edit.changed.items())
    notes = [head]
    m = edit.mailbox
    if m is None:
        return f"{head}; it has no mailbox"
    if edit.mailbox_created:
        notes.append(f"its mailbox {m.email} was created" + (f" on the profile {m.profile_name}" if m.profile_name
                                                            else ", without a profile: the organization has none"))
    if edit.address_moved:
        notes.append("its mailbox's address too"
                     + (": approval withdrawn" if edit.approval_withdrawn else "")
                     + (f"{',' if edit.approval_withdrawn else ':'} Test & Enable reset ({', '.join(edit.tests_reset)})"
                        if edit.tests_reset else ""))
    if edit.processed:
        notes.append(f"its mailbox is processed ({', '.join(edit.processed)})")
    elif edit.waits_for:
        notes.append("its mailbox is not processed: " + ", and ".join(edit.waits_for))
    else:
        notes.append("its mailbox is not processed")
    return "; ".join(notes)


# --- mailboxes ----------------------------------------------------------------------------------------

@mailbox_app.command("list")
def mailbox_list(org: str = org_option(), json_: bool = JSON) -> None:
    """List mailboxes with their state per direction."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            ms = await ctx.registry.mailboxes(ctx.org)
            if json_:
                return emit_json(ms)
            now = datetime.now(timezone.utc)
            # A direction backing off says so here: its Test & Enable result alone read "success"
            # while every attempt failed (`mailbox show` has the why; `test-enable` retries at once).
            table([(m.email, m.owner_kind or "forward", m.profile_name or "-", "yes" if m.active else "no",
                    "yes" if m.email_approved else "no", *(_direction(getattr(m, d), now) for d in ("incoming", "outgoing", "act")),
                    m.incoming.error_count + m.outgoing.error_count) for m in ms],
                  ["email", "owner", "profile", "active", "approved", "incoming", "outgoing", "act", "errors"])
    run(go)


def _backing_off(state: models.DirectionState, now: datetime) -> bool:
    # A back-off that has ended is kept until the next success clears it: not news.
    return state.backoff_until is not None and state.backoff_until > now


def _direction(state: models.DirectionState, now: datetime) -> str:
    if state.stopped:
        return f"{state.status}, stopped"
    return f"{state.status}, backing off" if _backing_off(state, now) else state.status


@mailbox_app.command("show")
def mailbox_show(ref: str = typer.Argument(..., help="Mailbox id, address, or its owner's address."),
                 org: str = org_option(), json_: bool = JSON) -> None:
    """Show a mailbox: settings, Test & Enable results, errors, back-off, where ingest stands, recent alerts."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            m = await ctx.registry.mailbox(ctx.org, ref, sync=True)
            if json_:
                return emit_json(m)
            pairs: list[tuple[str, object]] = [
                ("email", m.email), ("id", m.id), ("owner", f"{m.owner_kind} {m.owner_id}" if m.owner_kind else "forward mailbox"),
                ("profile", m.profile_name or "none"), ("credentials", "set" if m.has_credentials else "not set"),
                ("active", m.active), ("email approved", m.email_approved), ("tracking", m.tracking),
                ("tracked folders", ", ".join(m.tracked_folders)),
            ]
            pairs += [(f"folder rule {r.folder}", f"regarding {r.regarding_kind} {r.regarding_email} ({r.regarding_id}); "
                                                  f"earlier mail {r.earlier_mail()}")
                      for r in m.folder_rules]
            if m.owner_kind == "queue":
                pairs += [("convert to activities", m.convert_to_activities), ("delete after processing", m.delete_after_processing)]
            now = datetime.now(timezone.utc)
            for d in ("incoming", "outgoing", "act"):
                s = getattr(m, d)
                if s.stopped:
                    # Not backing off: nothing will try again until Test & Enable (the message says how).
                    pairs.append((d, f"{s.status}: STOPPED at {s.stopped_at.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} "
                                     f"UTC, not processed until Test & Enable succeeds; errors {s.error_count}"
                                     + (f"; {s.test_message}" if s.test_message else "")))
                    continue
                pairs.append((d, f"{s.status}; errors {s.error_count}"
                              + (f"; refused sign-ins in a row {s.refused_logins}" if s.refused_logins else "")
                              + (f"; backing off until {s.backoff_until.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} "
                                 "UTC (`conduit mailbox test-enable` tries now)" if _backing_off(s, now) else "")
                              + (f"; {s.test_message}" if s.test_message else "")))
            if m.sync is not None:
                pairs += _sync_lines(m.sync)
            fields(pairs)
            if m.alerts:
                typer.echo("alerts:")
                for a in m.alerts:
                    typer.echo(f"  {a.created_at:%Y-%m-%d %H:%M:%S} {a.severity:<11} {a.direction or '-':<8} {a.code}: {a.message}")
    run(go)


def _sync_lines(sync: models.MailboxSync) -> list[tuple[str, object]]:
    last = f", the last at {sync.last_ingested_at:%Y-%m-%d %H:%M:%S}" if sync.last_ingested_at else ""
    lines: list[tuple[str, object]] = [
        ("worked by", f"{sync.worked_by} (lease until {sync.lease_expires_at:%H:%M:%S})" if sync.worked_by
         else "no ingest replica holds it now"),
        ("ingested", f"{sync.ingested} message(s){last}"),
    ]
    lines += [(f"folder {f.folder}", f"UIDVALIDITY {f.uidvalidity}, read to UID {f.last_uid}"
               + (f", HIGHESTMODSEQ {f.highestmodseq}" if f.highestmodseq else "")
               + f"; changed {f.changed_at:%Y-%m-%d %H:%M:%S}") for f in sync.folders]
    if sync.pop3_seen:
        lines.append(("POP3 messages seen", sync.pop3_seen))
    if sync.held:
        # Held messages never expire: an administrator who leaves a mailbox off for good sees them here.
        lines.append(("held", f"{sync.held} message(s) since {sync.held_since:%Y-%m-%d %H:%M:%S}, "
                              f"waiting for the mailbox ({sync.held_for or 'behind_held_messages'}); evaluated "
                              "again once it may process email"))
    return lines


@mailbox_app.command("add-forward")
def mailbox_add_forward(email: str, name: str = typer.Option("Forward mailbox"), profile: Optional[str] = None,
                        org: str = org_option(), json_: bool = JSON) -> None:
    """Add a forward mailbox (belongs to no user or queue)."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            m = await ctx.registry.add_forward_mailbox(ctx.org, name, email, profile)
            emit_json(m) if json_ else typer.echo(f"forward mailbox {m.email} added ({m.id})")
    run(go)


@mailbox_app.command("set-credentials")
def mailbox_set_credentials(
    ref: str, username: Optional[str] = typer.Option(None, help="Login name (default: the mailbox address)."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password or token from standard input."),
    org: str = org_option(),
) -> None:
    """Store a mailbox's password or token, encrypted.  Never pass it as an argument: prompt, stdin or CONDUIT_MAILBOX_SECRET."""
    secret = SecretStr(sys.stdin.readline().rstrip("\r\n")) if password_stdin else _secret_from("CONDUIT_MAILBOX_SECRET", "password")

    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            try:
                waiting = _waiting([await ctx.registry.mailbox(ctx.org, ref)], None)
            except NotFound:
                waiting = {}   # the command below says so
            m = await ctx.registry.set_credentials(ctx.org, ref, username, secret)
            typer.echo(f"credentials stored for {m.email} (encrypted)")
            cleared = _backoffs_cleared(waiting, [m]).get(m.id)
            if cleared:
                typer.echo(f"{m.email}: back-off cleared ({', '.join(cleared)}): the next sessions use the new credentials")
            stopped = [d for d in ("incoming", "outgoing", "act") if getattr(m, d).stopped]
            if stopped:
                typer.echo(f"{m.email}: {', '.join(stopped)} stopped after refused sign-ins: not processed until "
                           f"`conduit mailbox test-enable {m.email}` succeeds with these credentials")
    run(go)


def _mailbox_flag(ref: str, org: str, done: str, **change: object) -> None:
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            before = await ctx.registry.mailbox(ctx.org, ref)
            m = await ctx.registry.update_mailbox(ctx.org, ref, **change)
            typer.echo(f"{m.email}: {done}" + (" already; nothing changed" if m == before else ""))
    run(go)


@mailbox_app.command("approve")
def mailbox_approve(ref: str, org: str = org_option()) -> None:
    """Approve the mailbox's email address (required before it is processed)."""
    _mailbox_flag(ref, org, "email address approved", email_approved=True)


@mailbox_app.command("reject")
def mailbox_reject(ref: str, org: str = org_option()) -> None:
    """Withdraw the approval of the mailbox's email address (Dynamics 365's Reject Email): it is not
    processed until approved again."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            before = await ctx.registry.mailbox(ctx.org, ref)
            m = await ctx.registry.update_mailbox(ctx.org, ref, email_approved=False)
            typer.echo(f"{m.email}: email address approval withdrawn; it is not processed until "
                       f"`conduit mailbox approve {m.email}`" if before.email_approved
                       else f"{m.email}: email address not approved already; nothing changed")
    run(go)


@mailbox_app.command("activate")
def mailbox_activate(ref: str, org: str = org_option()) -> None:
    """Activate a mailbox."""
    _mailbox_flag(ref, org, "active", active=True)


@mailbox_app.command("deactivate")
def mailbox_deactivate(ref: str, org: str = org_option()) -> None:
    """Deactivate a mailbox: it is never processed while inactive."""
    _mailbox_flag(ref, org, "inactive", active=False)


@mailbox_app.command("configure")
def mailbox_configure(
    ref: str,
    profile: Optional[str] = typer.Option(None, help="Link to this profile."),
    tracking: Optional[models.Tracking] = typer.Option(None, help="all, responses, known_records or email_enabled_records"),
    folders: Optional[str] = typer.Option(None, help="Comma-separated folders to track (default INBOX)."),
    convert: Optional[bool] = typer.Option(None, "--convert/--no-convert", help="Queues: convert incoming email to activities."),
    delete_after: Optional[bool] = typer.Option(
        None, "--delete-after-processing/--keep-on-server",
        help="Delete from the server each message once it is an activity (and copies of it found earlier); queue "
             "mailboxes only. See docs/inbound.md."),
    org: str = org_option(),
) -> None:
    """Change a mailbox's profile, tracking option, tracked folders and queue options.  Moved to a
    profile with another server, the mailbox needs Test & Enable again for the directions concerned."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            before = await ctx.registry.mailbox(ctx.org, ref)
            m = await ctx.registry.update_mailbox(
                ctx.org, ref, profile=profile, tracking=tracking,
                tracked_folders=folders.split(",") if folders is not None else None,
                convert_to_activities=convert, delete_after_processing=delete_after)
            done = "already so, nothing changed" if m == before else "updated"
            if m.delete_after_processing != before.delete_after_processing:
                # What the switch does, rather than "updated": it reaches mail ingested before it too.
                done = ("messages that became activities are now deleted from the server, including ones found "
                        "before (and their copies)" if m.delete_after_processing
                        else "messages that became activities are now kept on the server (those deleted already "
                             "are gone)")
            typer.echo(f"{m.email}: {done}"
                       + (f"; tracked folders: {', '.join(m.tracked_folders)}" if folders is not None else ""))
            for rule in m.folder_rules:
                if rule.folder not in m.tracked_folders:
                    typer.echo(f"warning: the folder {rule.folder} has a folder-level tracking rule but is no longer "
                               "tracked: its mail is not read (`conduit mailbox folder-rule remove` drops the rule)", err=True)
            reset = [d for d in ("incoming", "outgoing", "act")
                     if getattr(before, d).status != "not_run" and getattr(m, d).status == "not_run"]
            if reset:
                typer.echo(f"{m.email}: moved to the profile {m.profile_name}, whose server it was not tested with: "
                           f"Test & Enable results reset for {', '.join(reset)}; it is not processed until "
                           f"`conduit mailbox test-enable {m.email}` succeeds")
    run(go)


# --- folder-level tracking rules --------------------------------------------------------------------

@folder_rule_app.command("add")
def folder_rule_add(ref: str = typer.Argument(..., help="Mailbox id, address, or its owner's address."),
                    folder: str = typer.Argument(..., help="The folder, as the server names it (e.g. Customers/Acme)."),
                    record: str = typer.Argument(..., help="KIND:ID or KIND:ADDRESS, e.g. account:info@acme.example."),
                    org: str = org_option(), json_: bool = JSON) -> None:
    """Track a folder's email regarding a record, whatever the tracking option (an untracked folder is added)."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            rule, added = await ctx.registry.add_folder_rule(ctx.org, ref, folder, record)
            if json_:
                return emit_json({**rule.model_dump(mode="json"), "added_to_tracked_folders": added})
            typer.echo(f"{folder}: email in this folder is tracked regarding {rule.regarding_kind} "
                       f"{rule.regarding_email} ({rule.regarding_id})")
            if added:
                typer.echo(f"{folder}: was not tracked; added to the mailbox's tracked folders")
            typer.echo(f"{folder}: the email already in it is filed at the folder's next sync "
                       "(`conduit mailbox folder-rule list` shows how far)")
    run(go)


@folder_rule_app.command("list")
def folder_rule_list(ref: str = typer.Argument(..., help="Mailbox id, address, or its owner's address."),
                     org: str = org_option(), json_: bool = JSON) -> None:
    """List a mailbox's folder-level tracking rules."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            rules = await ctx.registry.folder_rules(ctx.org, ref)
            if json_:
                return emit_json(rules)
            table([(r.folder, r.regarding_kind, r.regarding_email, r.regarding_name, r.regarding_id, r.earlier_mail())
                   for r in rules], ["folder", "kind", "email", "name", "record id", "earlier mail"])
    run(go)


@folder_rule_app.command("remove")
def folder_rule_remove(ref: str = typer.Argument(..., help="Mailbox id, address, or its owner's address."),
                       folder: str = typer.Argument(..., help="The folder whose rule goes."),
                       org: str = org_option()) -> None:
    """Remove a folder's rule; the folder stays tracked (`configure --folders` changes that)."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            rule = await ctx.registry.remove_folder_rule(ctx.org, ref, folder)
            typer.echo(f"{rule.folder}: no longer tracked regarding {rule.regarding_kind} {rule.regarding_email}; "
                       "the folder stays tracked")
    run(go)


@mailbox_app.command("test-enable")
def mailbox_test_enable(
    ref: str,
    direction: list[str] = typer.Option(
        [], "--direction", help="incoming, outgoing, act (repeatable). Default: the directions the mailbox is used "
                                "for (its owner's that use server-side sync)."),
    org: str = org_option(),
) -> None:
    """Test & Enable: connect with the mailbox's settings, record each direction's result, enable on success.
    A direction its owner does not use server-side sync for is not tested unless asked for."""
    from conduit.test_enable import TESTED, test_enable, unused_directions

    bad = set(direction) - {"incoming", "outgoing", "act"}
    if bad:
        raise fail(f"unknown direction: {', '.join(sorted(bad))}")

    async def go() -> int:
        # Each direction's result is printed below: the alert recording a failure is not logged too.
        alerts = logging.getLogger("shared.registry.service")
        if alerts.getEffectiveLevel() > logging.DEBUG:
            alerts.setLevel(logging.ERROR)
        async with command_context(load_settings(), org) as ctx:
            mailbox = await ctx.registry.mailbox(ctx.org, ref)
            unused = await unused_directions(ctx.registry, mailbox)
            results = await test_enable(ctx.registry, ctx.org, str(mailbox.id), direction or None)
            for d in dict.fromkeys(direction or TESTED):
                if d not in results:
                    typer.echo(f"{d:<9} not used ({unused[d]})")
                    continue
                ok, message = results[d]
                # Asked for by name, a direction no service works for may fail for that very reason.
                why = f" (not used: {unused[d]})" if d in unused else ""
                typer.echo(f"{d:<9} {'success' if ok else 'failure'}: {message}{why}")
            return 0 if all(ok for ok, _ in results.values()) else 1
    code = run(go)
    if code:
        raise typer.Exit(code)


# --- records, activities, decisions ---------------------------------------------------------------------

@record_app.command("add")
def record_add(kind: models.RecordKind, email: str, name: str = typer.Option(..., "--name"),
               email_enabled: bool = typer.Option(True, "--email-enabled/--email-disabled"),
               org: str = org_option(), json_: bool = JSON) -> None:
    """Add a contact, account or lead."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            r = await ctx.registry.add_record(ctx.org, kind, name, email, email_enabled=email_enabled)
            emit_json(r) if json_ else typer.echo(f"{r.kind} {r.email} added ({r.id})")
            await _warn_shared_address(ctx, r.email, r.kind, r.id)
    run(go)


@record_app.command("list")
def record_list(kind: Optional[models.RecordKind] = typer.Option(None), org: str = org_option(), json_: bool = JSON) -> None:
    """List contacts, accounts and leads."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            rs = await ctx.registry.records(ctx.org, kind)
            emit_json(rs) if json_ else table([(r.kind, r.email, r.name, r.email_enabled, r.id) for r in rs],
                                              ["kind", "email", "name", "email enabled", "id"])
    run(go)


@activity_app.command("list")
def activity_list(limit: int = typer.Option(50, min=1, max=10_000), org: str = org_option(), json_: bool = JSON) -> None:
    """List recent email activities."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            acts = await ctx.registry.activities(ctx.org, limit)
            if json_:
                return emit_json(acts)
            table([(f"{a.created_at:%Y-%m-%d %H:%M:%S}", a.direction, a.status, a.from_address, clip(a.subject, 50),
                    f"{a.regarding_kind}:{a.regarding_id}" if a.regarding_kind else "", a.id) for a in acts],
                  ["created", "direction", "status", "from", "subject", "regarding", "id"])
    run(go)


@activity_app.command("show")
def activity_show(ref: str = typer.Argument(..., help="Activity id or Message-ID."), org: str = org_option(), json_: bool = JSON) -> None:
    """Show an email activity and the decisions that made it."""
    async def go() -> None:
        async with command_context(load_settings(), org) as ctx:
            a = await ctx.registry.activity(ctx.org, ref)
            decisions = await ctx.registry.decisions(ctx.org, a.message_id)
            waiting = await _held_since(ctx, a.message_id)
            if json_:
                return emit_json({"activity": a.model_dump(mode="json"), "decisions": _decisions_json(decisions, waiting)})
            fields([(k.replace("_", " "), v) for k, v in a.model_dump().items() if k != "parties"])
            _print_decisions(decisions, waiting)
    run(go)


@message_app.command("why")
def message_why(message_id: str, org: str = org_option(), json_: bool = JSON) -> None:
    """Why was this email (not) tracked?  One answer per mailbox it reached, and, for an email
    Conduit sent, the request it sent it for and its outgoing activity."""
    if not message_id.strip():
        raise fail("the Message-ID is empty: give the one from the email's Message-ID header")

    async def go() -> int:
        async with command_context(load_settings(), org) as ctx:
            decisions = await ctx.registry.decisions(ctx.org, message_id)
            waiting = await _held_since(ctx, message_id) if decisions else {}
            sent = await ctx.registry.sent_message(ctx.org, message_id)
            activity = await _activity(ctx, sent.activity_id) if sent is not None and sent.activity_id else None
            refused, unread = ([], None) if decisions else await _dead_lettered(ctx, message_id)
            if json_:
                answers = [{"kind": "decision", **d} for d in _decisions_json(decisions, waiting)]
                if sent is not None:
                    answers.append(_sent_json(sent, activity))
                typer.echo(json.dumps(answers, indent=2))
            else:
                _print_decisions(decisions, waiting)
            for x in refused:   # standard error with --json, which keeps standard output to the JSON
                typer.echo(f"refused by evaluate at {x.logged_at:%Y-%m-%d %H:%M:%S} [{x.reason}] {x.error}; "
                           f"once mended: conduit dead-letters replay email.received --at {x.at}", err=json_)
            if sent is not None and not json_:
                typer.echo(_sent_text(sent, activity, received=bool(decisions)))
            if decisions or sent is not None:
                return 0
            if refused:
                return 1
            dead_letters = (f"the dead letters could not be read ({unread}: run it again where the broker is "
                            "reachable to know whether evaluate refused it)" if unread
                            else "no dead letter of it was found")
            raise fail(f"no message {message_id.strip()} is known in organization {ctx.org.name}: no mailbox decided "
                       f"it (no mailbox that Conduit processes received it), Conduit did not send it, and "
                       f"{dead_letters}. Check the Message-ID and --org; `conduit mailbox show` says whether "
                       "a mailbox that should have received it is processed", code=1)
    if run(go):
        raise typer.Exit(1)


async def _activity(ctx: Any, activity_id: Any) -> models.Activity | None:
    """The activity by its id; None when it is gone since (deleted in the database)."""

    try:
        return await ctx.registry.activity(ctx.org, str(activity_id))
    except NotFound:
        return None


def _sent_text(sent: models.OutboundRequest, activity: models.Activity | None, *, received: bool) -> str:
    """One line: the request Conduit sent the message for, where it stands, and its outgoing activity."""
    what = "sent by Conduit" if sent.status == "sent" else f"an email Conduit was asked to send ({sent.status})"
    line = (f"{what}{'' if received else ', not received'}: request {sent.idempotency_key} through "
            f"{sent.mailbox_email or 'its mailbox'}. {sent.explanation()}")
    if sent.activity_id is None:
        return line
    line += f" Its outgoing activity: {sent.activity_id}"
    if activity is not None:
        line += (f", regarding {activity.regarding_kind} {activity.regarding_id}"
                 if activity.regarding_kind else ", regarding no record")
    return line + "."


def _sent_json(sent: models.OutboundRequest, activity: models.Activity | None) -> dict[str, Any]:
    """The send's answer in `message why --json`, beside the decisions (``kind`` tells them apart)."""
    return {
        "kind": "sent", "message_id": sent.message_id, "idempotency_key": sent.idempotency_key,
        "status": sent.status, "sent_at": sent.sent_at.isoformat() if sent.sent_at else None,
        "mailbox_id": str(sent.mailbox_id) if sent.mailbox_id else None, "mailbox_email": sent.mailbox_email,
        "explanation": sent.explanation(), "activity_id": str(sent.activity_id) if sent.activity_id else None,
        "regarding": {"kind": activity.regarding_kind, "id": str(activity.regarding_id)}
        if activity is not None and activity.regarding_kind else None,
        "request": sent.model_dump(mode="json"),
        "activity": activity.model_dump(mode="json") if activity is not None else None,
    }


async def _dead_lettered(ctx: Any, message_id: str) -> tuple[list[Any], str | None]:
    """Dead letters of this message on email.received, and why they could not be read, if so (the
    broker may be stopped: the registry's answer stands on its own, but "none found" would be untrue)."""
    from shared import deadletters

    try:
        return await asyncio.wait_for(deadletters.of_message(ctx.settings, ctx.pool, ctx.org.id, message_id), 15), None
    except (ConduitError, KafkaError, OSError, asyncio.TimeoutError) as exc:
        log.info("could not read email.received's dead letters: %s", exc)
        return [], str(exc) or type(exc).__name__


async def _held_since(ctx: Any, message_id: str) -> dict[Any, datetime]:
    """Mailbox id -> since when evaluate holds this message for it (waiting for the mailbox)."""
    from services.evaluate.held import held_since

    async with ctx.pool.acquire() as conn:
        return await held_since(conn, ctx.org.id, message_id.strip())


def _decisions_json(decisions: list[models.Decision], waiting: dict[Any, datetime]) -> list[dict[str, Any]]:
    """``held``: an event of the message waits for its mailbox (its decision is held; or, after a
    decision for good, a newer event of it, announced again from another folder, is)."""
    return [{**d.model_dump(mode="json"), "held": d.mailbox_id in waiting,
             "held_since": waiting[d.mailbox_id].isoformat() if d.mailbox_id in waiting else None} for d in decisions]


def _print_decisions(decisions: list[models.Decision], waiting: dict[Any, datetime]) -> None:
    from services.evaluate.chains import GUARDS

    holding = {g.name for g in GUARDS if getattr(g, "holds", False)}
    for d in decisions:
        since = waiting.get(d.mailbox_id)
        when = f"{since.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC" if since is not None else ""
        verdict = f"held since {when}" if since is not None and d.rule in holding else \
            "tracked" if d.tracked else "not tracked"
        line = f"{d.mailbox_email}: {verdict} [{d.reason}, rule {d.rule}] {d.explanation}"
        if since is not None and d.rule not in holding:
            # Decided before; announced again since (moved into a mapped folder) while its mailbox
            # may not process email: that event waits, and may change the decision.
            line += (f" A newer event of it (announced again, from another folder) is held since {when}; "
                     "it will be evaluated when the mailbox may process email again.")
        typer.echo(line)


def _secret_from(env: str, what: str) -> SecretStr:
    value = os.environ.get(env)
    if value is None:
        if not sys.stdin.isatty():
            raise fail(f"no {what}: set {env} or run in a terminal to be prompted")
        value = getpass.getpass(f"{what}: ")
    return SecretStr(value)


def _endpoint(host: str | None, port: int | None, tls: str) -> str:
    if not host:
        return "-"
    return f"{host}:{port} ({tls})" if port else f"{host} ({tls})"
