"""`conduit demo`: the inbound and outbound paths on one machine, against real peers.

Starts the embedded PostgreSQL and Tansu broker (or uses DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS),
a private Dovecot (IMAP) and an aiosmtpd capture server, seeds a demo organization (a profile, two
users with Dovecot mailboxes, a contact), delivers a few emails, runs ingest and evaluate, shows
the activities they became and why one was not tracked, then sends an email through dispatch and
shows it at the SMTP server.  Everything it started is stopped at the end, however it ends: its
temporary folder is removed, and the demo organization's mailboxes are deactivated (they point at a
Dovecot that is gone, and every later `conduit up` would try them for ever); the organization and its
activities stay, to look at with ``--org``.
"""
from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import asyncpg
from pydantic import SecretStr

from conduit.context import prepare_database
from conduit.stack import Stack, say_now
from shared.crypto import load_cipher
from shared.db.pool import create_pool
from shared.errors import ConduitError
from shared.lifecycle import run_service
from shared.registry.models import Organization
from shared.registry.service import ProfileInput, Registry
from shared.settings import Settings


def _mail(subject: str, sender: str, to: str, extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{uuid.uuid4().hex}@customer.example>\r\n"
            f"{extra}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello from the demo.\r\n").encode()


async def run_demo(settings: Settings, say: Callable[[str], None] = say_now) -> None:
    import logging

    logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd's deprecation chatter
    # Its own topic prefix, recorded with the stack: the demo's events never mix with another run's.
    stack = Stack(settings.model_copy(update={"topic_prefix": f"demo-{uuid.uuid4().hex[:6]}."}), say)
    try:
        await stack.start_infrastructure()
        await _demo(stack.settings, say)
    finally:
        await stack.stop()


async def _demo(settings: Settings, say: Callable[[str], None]) -> None:
    from conduit.peers.dovecot import Dovecot
    from conduit.peers.smtp import CaptureSmtpServer
    from services.dispatch.service import DispatchService
    from services.evaluate.service import EvaluateService
    from services.ingest.service import IngestService

    users = {"ann@example.com": "all", "bob@example.com": "known_records"}
    passwords = {email: uuid.uuid4().hex for email in users}
    work = Path(tempfile.mkdtemp(prefix="conduit-demo-"))
    dovecot = smtp = pool = registry = org = None
    try:
        work.chmod(0o755)
        dovecot = Dovecot(work / "dovecot")
        smtp = CaptureSmtpServer(work / "smtp", users=passwords)
        pool = await create_pool(settings, max_size=4, name="conduit-demo")
        await dovecot.start()
        smtp.start()
        say(f"dovecot    IMAP on {dovecot.host}:{dovecot.imap_port}; SMTP capture on {smtp.host}:{smtp.port}")
        await prepare_database(settings, pool)
        registry = Registry(pool, load_cipher(settings), producer="demo")
        org = await registry.add_organization(f"demo-{uuid.uuid4().hex[:6]}")
        await registry.add_profile(org, ProfileInput(
            name="local", server_type="imap", incoming_host=dovecot.host, incoming_port=dovecot.imap_port,
            incoming_tls="none", outgoing_host=smtp.host, outgoing_port=smtp.port, outgoing_tls="none",
            min_polling_interval_seconds=5))
        await registry.add_record(org, "contact", "Bea Buyer", "bea@customer.example")
        for email, tracking in users.items():
            password = passwords[email]
            dovecot.add_user(email, password)
            await registry.add_user(org, email.split("@")[0].title(), email)
            await registry.set_credentials(org, email, email, SecretStr(password))
            await registry.update_mailbox(org, email, email_approved=True, tracking=tracking)
            mailbox = await registry.mailbox(org, email)
            for direction in ("incoming", "outgoing"):
                await registry.record_test(mailbox.id, direction, True, "demo peers")
        say(f"seeded     organization {org.name}: profile 'local', users {', '.join(users)} (tracking all / known records), contact bea@customer.example")
        dovecot.deliver("ann@example.com", _mail("Quote for 40 licences", "Bea <bea@customer.example>", "ann@example.com"))
        dovecot.deliver("ann@example.com", _mail("Lunch on Friday?", "carl@friends.example", "ann@example.com"))
        dovecot.deliver("bob@example.com", _mail("Renewal question", "bea@customer.example", "bob@example.com"))
        stranger = _mail("Special offer!!!", "promo@spam.example", "bob@example.com")
        dovecot.deliver("bob@example.com", stranger)
        say("delivered  4 emails into Dovecot; running ingest and evaluate ...")
        await run_service(IngestService(settings), burst=True)
        await run_service(EvaluateService(settings), burst=True)
        say("\nemail activities:")
        for a in reversed(await registry.activities(org)):
            say(f"  {a.direction:<8} {a.from_address:<28} {a.subject}")
        from shared.mime import message_key

        for d in await registry.decisions(org, message_key(stranger)):
            say(f"\nwhy was 'Special offer!!!' not tracked? {d.mailbox_email}: [{d.reason}] {d.explanation}")
        say("\nsending an email through dispatch ...")
        from shared.events.envelope import Envelope
        from shared.events.payloads import EmailOutboundV1
        from shared.kafka import Publisher

        publisher = Publisher(settings, client_id="demo")
        await publisher.start()
        request = Envelope[EmailOutboundV1](
            type="email.outbound", schema_version=1, producer="demo", organization_id=org.id,
            data=EmailOutboundV1(idempotency_key="demo-1", sender_email="ann@example.com", to=["bea@customer.example"],
                                 subject="Your quote", text="Please find the quote below.\n"))
        await publisher.publish("email.outbound", request, "demo-1")
        await publisher.stop()
        await run_service(DispatchService(settings), burst=True)
        captured = await smtp.wait_for_messages(1, timeout=30)
        say(f"  accepted by the SMTP server: from {captured[0].mail_from} to {', '.join(captured[0].rcpt_tos)}, "
            f"subject {captured[0].header('Subject')!r}")
        say("\ndemo done: `conduit up` runs the same services continuously.")
    finally:
        if registry is not None and org is not None:
            await _deactivate(registry, org, say)
        if pool is not None:
            await pool.close()
        if smtp is not None:
            smtp.stop()
        if dovecot is not None:
            await dovecot.stop()
        shutil.rmtree(work, ignore_errors=True)


async def _deactivate(registry: Registry, org: Organization, say: Callable[[str], None]) -> None:
    """Deactivate the demo organization's mailboxes: their Dovecot stops with the demo."""
    try:
        for mailbox in await registry.mailboxes(org):
            if mailbox.active:
                await registry.update_mailbox(org, str(mailbox.id), active=False)
    except (ConduitError, asyncpg.PostgresError, OSError) as exc:
        # Said, not raised: the rest of the clean-up still runs, and the demo's own error (if any) stays the error.
        say(f"could not deactivate the mailboxes of organization {org.name} ({type(exc).__name__}): "
            f"run `conduit mailbox deactivate EMAIL --org {org.name}` for each")
        return
    say(f"cleaned up organization {org.name}: its mailboxes are deactivated (see `conduit activity list --org {org.name}`)")
