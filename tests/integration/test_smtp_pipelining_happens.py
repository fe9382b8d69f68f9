"""Dispatch pipelines its SMTP envelope when, and only when, the server offers PIPELINING (RFC 2920).

The server (``HoldingSmtpServer``) holds its reply to MAIL FROM until it has read what the client
sent with it: with PIPELINING advertised, every RCPT TO and DATA are already there before MAIL is
answered (they left in one write); without it, nothing comes while the reply is held, and each
command follows the previous reply.  The test_smtp_transport cases run both paths, but only this
one tells them apart: a client that fell back to lock-step everywhere would pass those.

Against a running dispatch service (requests on the broker, the ledger in PostgreSQL)."""
from __future__ import annotations

import pytest

from shared.kafka import Publisher
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.dispatch import dispatch_running, finals, outbound, publish, sending_mailbox
from tests.support.scripted_smtp import HoldingSmtpServer

RECIPIENTS = ["buyer@customer.example", "cc@customer.example"]


@pytest.mark.parametrize("pipelining", [True, False], ids=["advertised", "not_advertised"])
async def test_mail_rcpt_and_data_leave_together_only_when_the_server_offers_pipelining(
        settings: Settings, registry: Registry, org, publisher: Publisher, pipelining: bool) -> None:
    async with HoldingSmtpServer(pipelining=pipelining, hold=0.5) as server:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=server.port)
        event = outbound(org, mailbox_id=sender.mailbox_id, to=RECIPIENTS[:1], cc=RECIPIENTS[1:], subject="Pipelined?")
        async with dispatch_running(settings):
            await publish(publisher, event)
            reader = await finals(settings, [event.data.idempotency_key])
    assert reader.final(event.data.idempotency_key).status == "sent"
    [transaction] = server.delivered()
    assert transaction.mail_from == f"<{sender.email}>"
    assert transaction.commands == ["MAIL", "RCPT", "RCPT", "DATA"]
    if pipelining:
        # Both RCPTs and DATA were on the wire before the server had said a word about MAIL.
        assert transaction.before_mail_reply == ["RCPT", "RCPT", "DATA"]
    else:
        # The client waited for MAIL's reply, held for half a second, before it sent anything more.
        assert transaction.before_mail_reply == []
