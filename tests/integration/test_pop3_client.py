"""Conduit's POP3 client against a real Dovecot (conduit.peers.dovecot)."""
from __future__ import annotations

import uuid

import pytest

from conduit.peers import free_port
from services.ingest.pop3_client import Pop3Client, unstuff
from shared.errors import AuthenticationFailed, ConnectionFailed, TlsFailed

PASSWORD = "pop-secret-9"


def test_unstuff_removes_one_leading_dot_per_line():
    assert unstuff(b"..a\r\nb\r\n..\r\n...c\r\n") == b".a\r\nb\r\n.\r\n..c\r\n"


def message(i: int) -> bytes:
    """A message with lines that POP3 must byte-stuff, and 8-bit data."""
    return (f"From: a@example.org\r\nSubject: pop {i}\r\nMessage-ID: <p{i}-{uuid.uuid4().hex}@x>\r\n\r\n"
            ".\r\n..\r\n.leading dot\r\nmiddle . dot\r\n+OK not a reply\r\n-ERR nor this\r\n"
            f"Grüße {i}\r\n").encode() + b"x" * (i * 131 % 5000) + b"\r\n.\r\n"


@pytest.fixture
def dovecot(tls_dovecot):
    """The session's TLS Dovecot (tests/integration/conftest.py); tests add their own users."""
    return tls_dovecot


@pytest.fixture
async def maildrop(dovecot):
    """A fresh user with 40 messages; yields (address, delivered messages in delivery order)."""
    address = f"p{uuid.uuid4().hex[:10]}@example.com"
    dovecot.add_user(address, PASSWORD)
    delivered = [message(i) for i in range(40)]
    dovecot.deliver_many(address, delivered)
    return address, delivered


async def logged_in(dovecot, address: str) -> Pop3Client:
    client = await Pop3Client.connect(dovecot.host, dovecot.pop3_port, tls="none", ssl_context=None)
    await client.login(address, PASSWORD)
    return client


pytestmark = pytest.mark.peers


async def test_login_stat_uidl_and_exact_retr(dovecot, maildrop):
    address, delivered = maildrop
    client = await logged_in(dovecot, address)
    try:
        count, size = await client.stat()
        assert count == 40 and size == sum(map(len, delivered))
        ids = await client.uidl()
        assert sorted(ids) == list(range(1, 41)) and len(set(ids.values())) == 40
        retrieved = [await client.retr(n) for n in sorted(ids)]
        assert sorted(retrieved) == sorted(delivered)
    finally:
        await client.quit()


async def test_pipelined_retr_many_matches_single_retr(dovecot, maildrop):
    address, delivered = maildrop
    client = await logged_in(dovecot, address)
    try:
        assert "PIPELINING" in client.capabilities
        single = {n: await client.retr(n) for n in range(1, 41)}
        pipelined = {n: raw async for n, raw in client.retr_many(range(1, 41))}
        assert pipelined == single
    finally:
        await client.quit()


async def test_wrong_password_is_authentication_failed(dovecot, maildrop):
    address, _ = maildrop
    client = await Pop3Client.connect(dovecot.host, dovecot.pop3_port, tls="none", ssl_context=None)
    try:
        with pytest.raises(AuthenticationFailed) as caught:
            await client.login(address, "Not-The-Pass-77")
        assert "Not-The-Pass-77" not in str(caught.value)
    finally:
        await client.close()


async def test_dele_then_quit_removes_and_close_keeps(dovecot, maildrop):
    address, _ = maildrop
    client = await logged_in(dovecot, address)
    await client.dele(1)
    await client.dele(2)
    await client.close()                    # no QUIT: nothing is deleted
    client = await logged_in(dovecot, address)
    assert (await client.stat())[0] == 40
    await client.dele(1)
    await client.dele(2)
    await client.quit()
    assert dovecot.message_count(address) == 38
    client = await logged_in(dovecot, address)
    try:
        assert (await client.stat())[0] == 38
    finally:
        await client.quit()


async def test_stls_and_implicit_tls_verify_with_the_ca(dovecot, maildrop, tls):
    address, delivered = maildrop
    for mode, port in (("starttls", dovecot.pop3_port), ("implicit", dovecot.pop3s_port)):
        client = await Pop3Client.connect(dovecot.host, port, tls=mode, ssl_context=tls["client"])
        try:
            assert "STLS" not in client.capabilities
            await client.login(address, PASSWORD)
            assert (await client.stat())[0] == len(delivered)
        finally:
            await client.quit()


async def test_tls_without_the_ca_is_tls_failed(dovecot):
    for mode, port in (("starttls", dovecot.pop3_port), ("implicit", dovecot.pop3s_port)):
        with pytest.raises(TlsFailed, match="certificate"):
            await Pop3Client.connect(dovecot.host, port, tls=mode, ssl_context=None, timeout=10)


async def test_connection_refused_is_connection_failed():
    with pytest.raises(ConnectionFailed):
        await Pop3Client.connect("127.0.0.1", free_port(), tls="none", ssl_context=None, timeout=5)
