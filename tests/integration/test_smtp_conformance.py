"""Dispatch's SMTP client where servers, or someone on the path, say what RFC 5321 and its
extensions allow but aiosmtpd never says (found by a review of the client, helper-75).

Against ``ScriptedSmtpServer`` sessions (every byte the server sends is the test's), the SMTP pool
and, where the outcome is the service's, dispatch itself on PostgreSQL and the broker:

- bytes that arrive in clear after the 220 to STARTTLS are refused, not read as the replies of the
  server inside TLS (RFC 3207 4.2, CVE-2011-0411: a forged acceptance of a refused message);
- a session that opens with a reply nobody asked for, or that ends as soon as it is open, fails the
  message waiting for it instead of opening new sessions in a tight loop for ever;
- a 552 "too many recipients" to RCPT is the 452 it should be (RFC 5321 4.5.3.1.10): the others get
  the message in the next transaction; a 552 "mailbox full" stays a refusal;
- a 421 during the envelope is the server's answer (temporary), not a bare lost connection;
- a server that refuses the session itself (a 554 greeting) backs the mailbox off with an alert;
- SIZE is the message's size (RFC 1870 4), and any 2xx to the final dot is an acceptance.

Composition (form feeds in bodies, verbatim headers at their length limit) is checked beside them.
"""
from __future__ import annotations

import asyncio
import ssl
from datetime import datetime, timezone

import pytest
import trustme

from services.dispatch.compose import _compose_mime, _compose_plain, check_headers, compose
from services.dispatch.smtp_client import (
    SmtpConnection, SmtpPermanentFailure, SmtpServer, SmtpTemporaryFailure,
)
from services.dispatch.service import _mailbox_level
from services.dispatch.smtp_transport import SmtpPool
from shared.errors import ConnectionFailed, InvalidInput, TlsFailed
from shared.events.payloads import EmailOutboundV1
from shared.kafka import Publisher
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.dispatch import StatusReader, dispatch, finals, outbound, publish, sending_mailbox
from tests.support.scripted_smtp import ScriptedSmtpServer, well_behaved
from tests.support.waiting import eventually

pytestmark = pytest.mark.peers

MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: t\r\n\r\nhello\r\n"
PIPELINING = b"250-scripted.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
LOCKSTEP = b"250-scripted.test\r\n250 8BITMIME\r\n"
SETTLED_WITHIN = 5.0   # a send that fails must fail this soon, not after a reconnect storm


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def _starttls_session(server_tls: ssl.SSLContext, injected: bytes, inside_rcpt: bytes = b"250 2.1.5 ok\r\n"):
    """A server whose 220 to STARTTLS comes with ``injected`` in the same clear write (as a man in
    the middle would add it); inside TLS it is honest, answering RCPT with ``inside_rcpt``."""
    async def session(reader, writer, server: ScriptedSmtpServer) -> None:
        writer.write(b"220 scripted.test ESMTP\r\n")
        while line := await server.line(reader):
            if line[:4].upper() == b"EHLO":
                writer.write(b"250-scripted.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
            elif line[:8].upper() == b"STARTTLS":
                writer.write(b"220 2.0.0 ready\r\n" + injected)
                await writer.drain()
                await writer.start_tls(server_tls)
                break
            await writer.drain()
        while line := await server.line(reader):
            verb = line[:4].upper()
            writer.write(PIPELINING if verb == b"EHLO" else inside_rcpt if verb == b"RCPT"
                         else b"554 5.5.1 no valid recipients\r\n" if verb == b"DATA" else b"250 ok\r\n")
            await writer.drain()
    return session


@pytest.mark.parametrize("injected", [
    b"250 injected\r\n",
    # A whole transaction scripted in clear: EHLO's reply, MAIL, RCPT, DATA, and an acceptance of a
    # message the real server (inside TLS) refuses.
    b"250-mitm\r\n250 PIPELINING\r\n250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n250 2.0.0 forged acceptance\r\n",
], ids=["one-reply", "forged-acceptance"])
async def test_replies_injected_in_clear_after_starttls_are_refused(tls_contexts, injected: bytes) -> None:
    server_tls, client_tls = tls_contexts
    async with ScriptedSmtpServer(_starttls_session(server_tls, injected, b"550 5.1.1 no such user\r\n")) as server:
        conn = SmtpConnection(SmtpServer("127.0.0.1", server.port, "starttls", ssl_context=client_tls),
                              helo_name="client.test", timeout=5)
        with pytest.raises(TlsFailed) as refused:
            await conn.open(None)
        assert refused.value.reason == "starttls_injection"
        assert not any(line.startswith(b"MAIL") for line in server.lines)


async def test_an_honest_starttls_session_still_sends(tls_contexts) -> None:
    server_tls, client_tls = tls_contexts
    async with ScriptedSmtpServer(_starttls_session(server_tls, b"")) as server:
        conn = SmtpConnection(SmtpServer("127.0.0.1", server.port, "starttls", ssl_context=client_tls),
                              helo_name="client.test", timeout=5)
        await conn.open(None)
        try:
            assert "PIPELINING" in conn.extensions   # EHLO's reply from inside TLS
            with pytest.raises(SmtpPermanentFailure):   # and DATA's 554, read in step
                await conn.send("a@example.com", ["b@example.net"], MESSAGE)
        finally:
            conn.abort()


def _opening_misbehaves(how: str):
    async def session(reader, writer, server: ScriptedSmtpServer) -> None:
        writer.write(b"220 scripted.test ESMTP\r\n" + (b"220 scripted.test ready\r\n" if how == "doubled-greeting" else b""))
        while line := await server.line(reader):
            if line[:4].upper() == b"EHLO":
                writer.write(PIPELINING + (b"250 scripted.test at your service\r\n" if how == "extra-line" else b""))
                await writer.drain()
                if how == "closes-after-ehlo":
                    return
            else:
                writer.write(b"250 ok\r\n")
                await writer.drain()
    return session


@pytest.mark.parametrize("how", ["doubled-greeting", "extra-line", "closes-after-ehlo"])
async def test_a_session_unusable_once_open_fails_the_message_instead_of_reconnecting_for_ever(how: str) -> None:
    async with ScriptedSmtpServer(_opening_misbehaves(how)) as server:
        pool = SmtpPool(SmtpServer("127.0.0.1", server.port, "none"), None, max_connections=1,
                        helo_name="client.test", timeout=5)
        try:
            async with asyncio.timeout(SETTLED_WITHIN):
                with pytest.raises(ConnectionFailed):
                    await pool.send("a@example.com", ["b@example.net"], MESSAGE)
        finally:
            await pool.close()
        assert server.connections <= 2, f"{server.connections} sessions opened for one message"
        assert not server.contents


def _recipient_limit(limit: int, reply: bytes = b"552 5.5.3 Too many recipients\r\n"):
    return lambda n: b"250 2.1.5 ok\r\n" if n <= limit else reply


@pytest.mark.parametrize("ehlo", [PIPELINING, LOCKSTEP], ids=["pipelining", "lock-step"])
async def test_552_too_many_recipients_defers_those_recipients_and_552_mailbox_full_refuses(ehlo: bytes) -> None:
    async with ScriptedSmtpServer(well_behaved(ehlo=ehlo, rcpt=_recipient_limit(2))) as server:
        pool = SmtpPool(SmtpServer("127.0.0.1", server.port, "none"), None, max_connections=1,
                        helo_name="client.test", timeout=5)
        try:
            accepted = await pool.send("a@example.com", ["r1@x.example", "r2@x.example", "r3@x.example"], MESSAGE)
        finally:
            await pool.close()
    assert list(accepted.refused_recipients) == ["r3@x.example"]
    async with ScriptedSmtpServer(well_behaved(ehlo=ehlo, rcpt=lambda n: b"552 5.2.2 Mailbox full\r\n")) as server:
        pool = SmtpPool(SmtpServer("127.0.0.1", server.port, "none"), None, max_connections=1,
                        helo_name="client.test", timeout=5)
        try:
            with pytest.raises(SmtpPermanentFailure):
                await pool.send("a@example.com", ["r1@x.example"], MESSAGE)
        finally:
            await pool.close()


async def test_a_server_recipient_limit_answered_552_sends_to_everyone_over_several_transactions(
        settings: Settings, registry: Registry, org, publisher: Publisher) -> None:
    to = [f"r{n}@customer.example" for n in range(1, 6)]
    async with ScriptedSmtpServer(well_behaved(rcpt=_recipient_limit(2))) as server:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=server.port)
        event = outbound(org, mailbox_id=sender.mailbox_id, to=to)
        await publish(publisher, event)
        await dispatch(settings, burst_horizon_seconds=3)
        key = event.data.idempotency_key
        final = (await finals(settings, [key])).final(key)
        rcpts = [line.split(b"<")[1].split(b">")[0].decode() for line in server.lines if line.startswith(b"RCPT")]
    assert (final.status, final.reason) == ("sent", None), final
    assert len(server.contents) == 3 and len(set(server.contents)) == 1   # the same bytes, three times
    assert rcpts == to + to[2:] + to[4:]   # each transaction offers those not yet accepted; 2 are taken


def _closes_with_421(at: bytes):
    async def session(reader, writer, server: ScriptedSmtpServer) -> None:
        writer.write(b"220 scripted.test\r\n")
        while line := await server.line(reader):
            verb = line[:4].upper()
            if verb == at:
                writer.write(b"421 4.3.2 shutting down\r\n")
                await writer.drain()
                return
            writer.write((PIPELINING if at == b"MAIL" else LOCKSTEP) if verb == b"EHLO" else b"250 ok\r\n")
            await writer.drain()
    return session


@pytest.mark.parametrize("at", [b"RCPT", b"MAIL"], ids=["rcpt-lock-step", "mail-pipelined"])
async def test_a_421_during_the_envelope_is_the_servers_temporary_answer(at: bytes) -> None:
    async with ScriptedSmtpServer(_closes_with_421(at)) as server:
        conn = SmtpConnection(SmtpServer("127.0.0.1", server.port, "none"), helo_name="client.test", timeout=5)
        await conn.open(None)
        try:
            with pytest.raises(SmtpTemporaryFailure) as answer:
                await conn.send("a@example.com", ["r1@x.example", "r2@x.example"], MESSAGE)
        finally:
            conn.abort()
    assert answer.value.code == 421 and "shutting down" in answer.value.text
    assert not conn.usable


async def test_a_server_refusing_the_session_backs_the_mailbox_off_and_keeps_the_request(
        settings: Settings, registry: Registry, org, publisher: Publisher) -> None:
    async with ScriptedSmtpServer(well_behaved(greeting=b"554 5.7.1 no SMTP service for you\r\n")) as server:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=server.port)
        event = outbound(org, mailbox_id=sender.mailbox_id)
        await publish(publisher, event)
        await dispatch(settings, burst_horizon_seconds=1)
    key = event.data.idempotency_key
    async with StatusReader(settings) as reader:
        async def retried() -> bool:
            await reader.poll()
            return reader.statuses(key)[2:] == ["pending_send"]   # pending_send, sending, then back
        await eventually(retried, what="the request back to pending_send")
        last = reader.by_key[key][-1]
    assert last.reason == "smtp_greeting_refused" and "554" in last.detail, last
    mailbox = await registry.mailbox(org, sender.email)
    assert mailbox.outgoing.error_count == 1 and mailbox.outgoing.backoff_until is not None


async def test_size_is_the_message_size_and_any_2xx_to_the_final_dot_is_an_acceptance() -> None:
    # 990 octets, five of its lines starting with a dot: 998 on the wire with the stuffed dots,
    # 993 with the final ".CRLF" counted too; RFC 1870's SIZE counts neither.
    head = MESSAGE[:-len(b"hello\r\n")] + b".x\r\n" * 5
    message = head + b"y" * (990 - len(head) - 2) + b"\r\n"
    ehlo = b"250-scripted.test\r\n250-PIPELINING\r\n250 SIZE 990\r\n"
    async with ScriptedSmtpServer(well_behaved(ehlo=ehlo, data_reply=b"251 2.0.0 queued elsewhere\r\n")) as server:
        conn = SmtpConnection(SmtpServer("127.0.0.1", server.port, "none"), helo_name="client.test", timeout=5)
        await conn.open(None)
        try:
            accepted = await conn.send("a@example.com", ["r1@x.example"], message)
        finally:
            conn.abort()
    assert accepted.code == 251
    assert [line for line in server.lines if line.startswith(b"MAIL")] == [b"MAIL FROM:<a@example.com> SIZE=990\r\n"]


DATE = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
COMPOSE = dict(sender_email="ann@example.com", sender_name=None, subject="Hi", message_id="c.1@example.com", date=DATE)


def _request(**fields) -> EmailOutboundV1:
    return EmailOutboundV1(**{"idempotency_key": "k", "sender_email": "ann@example.com", "to": ["bob@example.net"],
                              "subject": "Hi", **fields})


@pytest.mark.parametrize("control", ["\x0c", "\x0b", "\x1c", "\x1d", "\x1e"])
def test_a_form_feed_in_a_body_is_sent_as_written_on_both_paths(control: str) -> None:
    request = _request(text=f"page one{control}page two\n")
    plain = _compose_plain(request, "ann@example.com", None, "Hi", "c.1@example.com", DATE)
    assert plain is not None and plain == _compose_mime(request, attachments=None, **COMPOSE)
    assert plain.endswith(f"page one{control}page two\r\n".encode())


def test_a_line_over_998_octets_joined_by_a_form_feed_is_encoded() -> None:
    raw = compose(_request(text="a" * 600 + "\x0c" + "b" * 600 + "\n", html="<p>x</p>"), **COMPOSE).raw
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert b'text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable' in raw


def test_a_verbatim_header_that_cannot_be_written_is_refused_on_arrival() -> None:
    longest = "<" + "a" * (998 - len("References: ") - len("@example.com>") - 1) + "@example.com>"
    check_headers({"References": longest})
    compose(_request(text="hi", headers={"References": longest}), **COMPOSE)
    with pytest.raises(InvalidInput) as refused:
        check_headers({"References": longest.replace("<", "<a", 1)})
    assert refused.value.reason == "header_too_long"


async def test_starttls_refused_for_now_is_temporary_and_nothing_is_sent_in_clear() -> None:
    ehlo = b"250-scripted.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"

    async def session(reader, writer, server: ScriptedSmtpServer) -> None:
        writer.write(b"220 scripted.test ESMTP\r\n")
        while line := await server.line(reader):
            writer.write(ehlo if line[:4].upper() == b"EHLO"
                         else b"454 4.7.0 TLS not available due to temporary reason\r\n" if line[:8].upper() == b"STARTTLS"
                         else b"250 ok\r\n")
            await writer.drain()
    async with ScriptedSmtpServer(session) as server:
        pool = SmtpPool(SmtpServer("127.0.0.1", server.port, "starttls"), None, max_connections=1,
                        helo_name="client.test", timeout=5)
        try:
            with pytest.raises(SmtpTemporaryFailure) as refused:
                await pool.send("a@example.com", ["b@example.net"], MESSAGE)
        finally:
            await pool.close()
    assert (refused.value.code, refused.value.reason) == (454, "starttls_temporary")
    assert _mailbox_level(refused.value, "smtp")   # the mailbox backs off and tries again, never in clear
    assert not any(line.startswith(b"MAIL") for line in server.lines)
