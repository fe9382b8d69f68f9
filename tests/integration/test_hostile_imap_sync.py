"""A broken IMAP server against a folder's sync (a scripted server, since no real one misbehaves on
cue; PostgreSQL and the broker real): a FETCH answering a UID it was not asked for, UIDs or UIDNEXT
past 32 bits, UID 0.  Nothing lost, nothing announced twice, no service stalled."""
from __future__ import annotations

import asyncio
import contextlib
import uuid

from services.ingest import state
from services.ingest.imap_client import ImapClient
from services.ingest.imap_sync import ImapFolderSync
from services.ingest.publishing import Mailbox
from shared.events.topics import EMAIL_RECEIVED
from tests.support.topics import read_topic


def msg(n: int) -> bytes:
    return (f"From: a@customer.example\r\nTo: x@example.com\r\nSubject: m{n}\r\n"
            f"Message-ID: <m{n}-{uuid.uuid4().hex}@x>\r\n\r\nbody {n}\r\n").encode()


class Server:
    """mailbox: uid -> raw; extra: unsolicited (uid, raw) appended to every UID FETCH answer."""
    def __init__(self, mailbox, *, uidvalidity=7, extra=(), uidnext=None):
        self.mailbox = dict(mailbox)
        self.uidvalidity = uidvalidity
        self.extra = list(extra)
        self.uidnext = uidnext
        self.commands = []

    async def handle(self, reader, writer):
        async def send(b):
            writer.write(b); await writer.drain()
        await send(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
        while line := await reader.readline():
            tag, command = line.rstrip(b"\r\n").split(b" ", 1)
            self.commands.append(command)
            up = command.upper()
            if up.startswith(b"LOGOUT"):
                await send(b"* BYE\r\n" + tag + b" OK\r\n"); break
            if up.startswith(b"LOGIN"):
                await send(tag + b" OK [CAPABILITY IMAP4rev1] ok\r\n")
            elif up.startswith(b"CAPABILITY"):
                await send(b"* CAPABILITY IMAP4rev1\r\n" + tag + b" OK\r\n")
            elif up.startswith(b"EXAMINE") or up.startswith(b"SELECT"):
                uidnext = self.uidnext or (max(self.mailbox, default=0) + 1)
                await send(b"* %d EXISTS\r\n* OK [UIDVALIDITY %d] x\r\n* OK [UIDNEXT %d] x\r\n%s OK done\r\n"
                           % (len(self.mailbox), self.uidvalidity, uidnext, tag))
            elif up.startswith(b"UID SEARCH"):
                low = int(command.split(b" ")[3].split(b":")[0])
                uids = [u for u in sorted(self.mailbox) if u >= low] or sorted(self.mailbox)[-1:]
                await send(b"* SEARCH " + b" ".join(b"%d" % u for u in uids) + b"\r\n" + tag + b" OK\r\n")
            elif up.startswith(b"UID FETCH"):
                spec = command.split(b" ")[2]
                asked = set()
                for part in spec.split(b","):
                    a, _, b = part.partition(b":")
                    asked.update(range(int(a), int(b or a) + 1))
                out = b""
                seq = 0
                for uid in sorted(self.mailbox):
                    seq += 1
                    if uid in asked:
                        raw = self.mailbox[uid]
                        out += b"* %d FETCH (UID %d FLAGS () BODY[] {%d}\r\n%s)\r\n" % (seq, uid, len(raw), raw)
                for uid, raw in self.extra:
                    out += b"* %d FETCH (UID %d FLAGS () BODY[] {%d}\r\n%s)\r\n" % (seq, uid, len(raw), raw)
                await send(out + tag + b" OK done\r\n")
            else:
                await send(tag + b" OK\r\n")
        writer.close()


@contextlib.asynccontextmanager
async def serve(server: Server):
    s = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    try:
        yield s.sockets[0].getsockname()[1]
    finally:
        s.close()


async def one_sync(port, pool, publisher, mailbox):
    client = await ImapClient.connect("127.0.0.1", port, tls="none", ssl_context=None, timeout=5)
    await client.login("u", "p")
    try:
        return await ImapFolderSync(pool, publisher, mailbox).sync(client, ["INBOX"])
    finally:
        await client.logout()


async def new_mailbox(registry, org):
    email = f"u-{uuid.uuid4().hex[:8]}@example.com"
    await registry.add_user(org, "U", email)
    m = await registry.mailbox(org, email)
    return Mailbox(m.id, org.id, False, None)


async def saved(pool, mailbox):
    async with pool.acquire() as conn:
        return (await state.folder_sync_start(conn, mailbox.id, "INBOX"))[0]


async def published_uids(settings, expected: int) -> list[int]:
    return sorted(e["data"]["uid"] for e in await read_topic(settings, EMAIL_RECEIVED.name, expected, timeout=5))


async def test_a_message_not_asked_for_does_not_move_the_state_past_mail_never_fetched(
        settings, registry, org, pool, publisher) -> None:
    mailbox = await new_mailbox(registry, org)
    server = Server({1: msg(1), 2: msg(2)}, extra=[(1000, msg(1000))])
    async with serve(server) as port:
        assert await one_sync(port, pool, publisher, mailbox) == 2
        assert (await saved(pool, mailbox)).last_uid == 2     # was 1000: UIDs 3..1000 never asked for again
        server.extra = []
        server.mailbox[3] = msg(3)
        assert await one_sync(port, pool, publisher, mailbox) == 1
    assert await published_uids(settings, 3) == [1, 2, 3]


async def test_a_uid_past_32_bits_is_left_out_and_nothing_is_announced_twice(
        settings, registry, org, pool, publisher) -> None:
    mailbox = await new_mailbox(registry, org)
    server = Server({1: msg(1), 2**63: msg(2)}, uidnext=3)
    async with serve(server) as port:
        for _ in range(3):   # each sync used to announce UID 1 again, then fail to store UID 2^63
            await one_sync(port, pool, publisher, mailbox)
    assert await published_uids(settings, 1) == [1]
    assert (await saved(pool, mailbox)).last_uid == 1


async def test_uidnext_past_32_bits_is_a_warning_naming_the_servers_number(
        settings, registry, org, pool, publisher) -> None:
    mailbox = await new_mailbox(registry, org)
    sync = ImapFolderSync(pool, publisher, mailbox)
    async with serve(Server({1: msg(1), 2**63: msg(2)})) as port:
        client = await ImapClient.connect("127.0.0.1", port, tls="none", ssl_context=None, timeout=5)
        await client.login("u", "p")
        try:
            assert await sync.sync(client, ["INBOX"]) == 0
        finally:
            await client.logout()
    assert any("UIDNEXT 9223372036854775809" in text for _, text in sync.warnings), sync.warnings
    assert await published_uids(settings, 0) == []


async def test_uid_zero_is_left_out(settings, registry, org, pool, publisher) -> None:
    mailbox = await new_mailbox(registry, org)
    async with serve(Server({1: msg(1)}, extra=[(0, msg(0))])) as port:
        assert await one_sync(port, pool, publisher, mailbox) == 1
    assert await published_uids(settings, 1) == [1]
