"""Test & Enable: connect to the mailbox's servers with its settings and record each direction.

Each check uses the same client the services use, so a success here means the service will get
in.  The result (success or failure with a one-line reason) is stored per direction; success
enables the direction and clears errors and back-off.  Unless asked for given directions, only those
the mailbox is used for are tested: its owner's that use server-side sync (a forward mailbox's
incoming); a direction its owner sends or receives otherwise is left alone, neither tested nor failed.
"""
from __future__ import annotations

import asyncio
from uuid import UUID

from shared.errors import ConduitError, InvalidInput
from shared.oauth import TokenProvider
from shared.registry import models, repository as repo
from shared.registry.service import MailboxWork, Registry
from shared.tls import client_context

CHECK_TIMEOUT = 20.0


TESTED = ("incoming", "outgoing")


async def test_enable(registry: Registry, org: models.Organization, ref: str,
                      directions: list[str] | None = None) -> dict[str, tuple[bool, str]]:
    """Test the ``directions`` of the mailbox ``ref`` (None: those it is used for, ``unused_directions``)
    and record each result."""
    mailbox = await registry.mailbox(org, ref)
    if directions is None:
        unused = await unused_directions(registry, mailbox)
        directions = [d for d in TESTED if d not in unused]
    if "act" in directions:
        # Refused before anything is tested: recorded as a failed test, it would leave the mailbox
        # `failing` on mailbox.health, and no later test could clear it.
        raise InvalidInput("appointments, contacts and tasks synchronization (--direction act) is not available yet "
                           "for any profile type; test incoming and outgoing", reason="unsupported")
    results: dict[str, tuple[bool, str]] = {}
    for direction in directions:
        ok, message = await _check(registry, mailbox, direction)
        await registry.record_test(mailbox.id, direction, ok, message)
        results[direction] = (ok, message)
    return results


async def unused_directions(registry: Registry, mailbox: models.Mailbox) -> dict[str, str]:
    """The directions Test & Enable tests that no service works for this mailbox, each with why: its
    owner's delivery method for it is not server-side sync (a forward mailbox only receives)."""
    if mailbox.owner_kind is None:
        return {"outgoing": "a forward mailbox only receives"}
    async with registry.pool.acquire() as conn:
        owner = await repo.owner_by_id(conn, mailbox.owner_kind, mailbox.owner_id)
    if owner is None:
        return {}
    return {d: f"the {mailbox.owner_kind}'s {d} is {owner[f'{d}_method']}" for d in TESTED
            if owner[f"{d}_method"] != "server_side_sync"}


async def _check(registry: Registry, mailbox: models.Mailbox, direction: str) -> tuple[bool, str]:
    if not mailbox.active:
        return False, "the mailbox is inactive"
    if mailbox.profile_id is None:
        return False, "the mailbox has no email server profile"
    if not mailbox.email_approved:
        return False, "the mailbox's email address is not approved (`conduit mailbox approve`)"
    work = await _work_item(registry, mailbox.id)
    try:
        await asyncio.wait_for(_connect(work, direction), CHECK_TIMEOUT)
    except ConduitError as exc:
        return False, exc.message
    except asyncio.TimeoutError:
        return False, f"the server did not answer within {CHECK_TIMEOUT:.0f} s"
    return True, f"{direction} connection and sign-in succeeded"


async def _work_item(registry: Registry, mailbox_id: UUID) -> MailboxWork:
    # mailboxes_to_process() filters on the very statuses being tested, so read the row directly.
    async with registry.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT m.*, to_jsonb(p.*) AS profile FROM mailbox m JOIN email_server_profile p ON p.id = m.profile_id WHERE m.id = $1",
            mailbox_id,
        )
    return MailboxWork(row, row["profile"], registry.cipher)


async def _connect(work: MailboxWork, direction: str) -> None:
    """Sign in the way the service that will work the direction does: ingest's clients and sign-in
    for incoming email, dispatch's transports (SMTP with a password, XOAUTH2 or as a relay; EWS;
    Graph) for outgoing."""
    profile = work.profile
    if direction == "incoming":
        from services.ingest.imap_client import ImapClient
        from services.ingest.pop3_client import Pop3Client
        from services.ingest.runner import sign_in

        clients = {"imap": ImapClient, "pop3": Pop3Client}
        if profile["server_type"] not in clients:
            raise ConduitError(f"incoming email over {profile['server_type']} is not available yet", reason="unsupported")
        client = await clients[profile["server_type"]].connect(
            profile["incoming_host"], profile["incoming_port"], tls=profile["incoming_tls"],
            ssl_context=client_context(profile.get("tls_ca_file")), timeout=CHECK_TIMEOUT)
        try:
            await sign_in(client, work, TokenProvider())
            if isinstance(client, ImapClient):
                await client.select("INBOX")
                await client.logout()
            else:
                await client.stat()
                await client.quit()
        finally:
            await client.close()
        return
    from services.dispatch.transports import Transports

    transports = Transports(timeout=CHECK_TIMEOUT)
    try:
        await transports.check(work)
    finally:
        await transports.close()
