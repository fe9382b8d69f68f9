"""Registry set-ups the inbound tests share: a profile on the test Dovecot and ready mailboxes."""
from __future__ import annotations

import base64
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from shared.registry.models import Organization
from shared.registry.service import ProfileInput, Registry


@dataclass
class ReadyMailbox:
    id: uuid.UUID
    email: str
    password: str


def imap_profile(dovecot, name: str = "dovecot-imap", **overrides) -> ProfileInput:
    fields = dict(name=name, server_type="imap", incoming_host=dovecot.host, incoming_port=dovecot.imap_port,
                  incoming_tls="none", outgoing_port=25, outgoing_tls="none", min_polling_interval_seconds=1)
    fields.update(overrides)
    return ProfileInput(**fields)


def pop3_profile(dovecot, name: str = "dovecot-pop3", **overrides) -> ProfileInput:
    return imap_profile(dovecot, name, server_type="pop3", incoming_port=dovecot.pop3_port, **overrides)


async def ready_mailbox(registry: Registry, org: Organization, dovecot, *, owner: str = "user", tracking: str = "all",
                        profile: str | None = None, **mailbox_settings) -> ReadyMailbox:
    """A user's (or queue's, or forward) mailbox with Dovecot credentials, approved and enabled for incoming."""
    email = f"{owner}-{uuid.uuid4().hex[:8]}@example.com"
    password = f"pw-{uuid.uuid4().hex[:8]}"
    dovecot.add_user(email, password)
    if owner == "user":
        await registry.add_user(org, f"User {email}", email)
    elif owner == "queue":
        await registry.add_queue(org, f"Queue {email}", email)
    else:
        await registry.add_forward_mailbox(org, "Forward", email, profile)
    await registry.set_credentials(org, email, email, SecretStr(password))
    await registry.update_mailbox(org, email, email_approved=True, tracking=tracking, profile=profile, **mailbox_settings)
    mailbox = await registry.mailbox(org, email)
    await registry.record_test(mailbox.id, "incoming", True, "ok")
    return ReadyMailbox(mailbox.id, email, password)


def message(subject: str = "Hello", *, sender: str = "someone@customer.example", to: str = "x@example.com",
            message_id: str | None = None, extra: str = "", body: str = "Hi there.\r\n") -> bytes:
    message_id = message_id or f"<{uuid.uuid4().hex}@customer.example>"
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {message_id}\r\n"
            f"Date: Fri, 27 Nov 2026 09:00:00 +0000\r\n{extra}MIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}").encode()


def forward(sender: str, to: str, message_id: str, attached: list[bytes], *, base64_parts: int = 0) -> bytes:
    """A message from ``sender`` carrying ``attached`` as message/rfc822 parts (the first
    ``base64_parts`` of them base64-encoded, as some clients do)."""
    parts = [b"--b1\r\nContent-Type: text/plain\r\n\r\nFYI\r\n"]
    for n, raw in enumerate(attached):
        if n < base64_parts:
            parts.append(b"--b1\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                         + base64.encodebytes(raw).replace(b"\n", b"\r\n") + b"\r\n")
        else:
            parts.append(b"--b1\r\nContent-Type: message/rfc822\r\n\r\n" + raw + b"\r\n")
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: Fwd: several\r\nMessage-ID: <{message_id}>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n").encode() + b"".join(parts) + b"--b1--\r\n"


def cpython_email_messages() -> list[Path]:
    """CPython's own email test messages (``test.test_email``'s data), when the stdlib's tests are installed."""
    try:
        import test.test_email as suite
    except ImportError:
        return []
    return sorted((Path(os.path.dirname(suite.__file__)) / "data").glob("msg_*.txt"))
