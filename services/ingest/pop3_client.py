"""The ingest service's asyncio POP3 client (RFC 1939, STLS RFC 2595, CAPA/response codes RFC 2449,
AUTH RFC 5034 with XOAUTH2).

No maintained asyncio POP3 library exists, and the protocol is small.  Multi-line replies are read by
searching the buffer for the CRLF.CRLF terminator and un-stuffing leading dots in one pass, so a
retrieved message costs a few byte operations.  ``retr_many`` pipelines RETR commands when the
server advertises PIPELINING (RFC 2449), which removes one round trip per message; so does
``dele_many`` for DELE.

Errors map onto ``shared.errors``; no message ever carries the password or token.
"""
from __future__ import annotations

import re
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence

from services.ingest.wire import MAX_MESSAGE_BYTES, MailConnection, ResponseTooLarge, TlsMode, open_session
from services.ingest.sasl import plain_initial_response, xoauth2_initial_response
from shared.errors import AuthenticationFailed, ConnectionFailed, PermanentError, TlsFailed, TransientError

# RETR commands sent ahead of the replies being read, when the server allows pipelining.
_PIPELINE_DEPTH = 32
_UIDL_LINE = re.compile(rb"(\d{1,9}) +([\x21-\x7e]{1,200}) *")
_LIST_LINE = re.compile(rb"(\d{1,9}) +(\d{1,18})(?: .*)?")
# RFC 2449 response codes that mean "try again later" rather than "wrong credentials".
_TRANSIENT_CODES = (b"[IN-USE]", b"[LOGIN-DELAY]", b"[SYS/TEMP]")


class Pop3CommandFailed(PermanentError):
    """The server answered -ERR to a command (not a login)."""

    reason = "pop3_command_failed"


class RetrRefused(Pop3CommandFailed):
    """The server answered -ERR to RETR of message ``number``; the session stays usable."""

    reason = "retr_refused"

    def __init__(self, message: str, number: int) -> None:
        super().__init__(message)
        self.number = number

    @property
    def temporary(self) -> bool:
        """The server says it cannot serve anything for now (RFC 3206), not this message."""
        return any(code in self.message.upper() for code in ("[SYS/TEMP]", "[IN-USE]"))


class MessageTooLarge(RetrRefused):
    """Message ``number`` ran past ``MAX_MESSAGE_BYTES`` while it was read, although LIST gave it as
    smaller (a server whose sizes are off): counted like a refusal, but the session cannot go on,
    the rest of the reply still being on its way."""

    reason = "message_too_large"


def unstuff(data: bytes) -> bytes:
    """Undo POP3 byte-stuffing of a multi-line body (CRLF kept): a line's leading ".." becomes "."."""
    if data.startswith(b".."):
        data = data[1:]
    return data.replace(b"\r\n..", b"\r\n.")


class Pop3Client:
    """One POP3 session.  Create with ``await Pop3Client.connect(...)``; one command at a time."""

    def __init__(self, conn: MailConnection, host: str) -> None:
        self._conn = conn
        self._host = host
        self.capabilities: frozenset[str] = frozenset()

    @classmethod
    async def connect(cls, host: str, port: int, *, tls: TlsMode, ssl_context: ssl.SSLContext | None = None,
                      timeout: float = 30.0) -> Pop3Client:
        """Connect and read the greeting; with ``tls="starttls"`` upgrade with STLS first.

        TLS is verified by default: without ``ssl_context`` the system trust store is used.
        """
        conn, ssl_context = await open_session(host, port, tls=tls, ssl_context=ssl_context, protocol="POP3",
                                               timeout=timeout)
        client = cls(conn, host)
        try:
            greeting = await conn.read_line()
            if not greeting.startswith(b"+OK"):
                raise ConnectionFailed(f"The POP3 server {host} refused the session: {_text(greeting)}.")
            await client._capa()
            if tls == "starttls":
                if "STLS" not in client.capabilities:
                    raise TlsFailed(f"The POP3 server {host} does not offer STLS.")
                await client._command(b"STLS")
                await conn.start_tls(ssl_context)
                await client._capa()   # RFC 2595: capabilities may change after STLS
        except BaseException:
            await conn.close()
            raise
        return client

    async def _capa(self) -> None:
        self._conn.write(b"CAPA\r\n")
        await self._conn.drain()
        status = await self._conn.read_line()
        if not status.startswith(b"+OK"):
            self.capabilities = frozenset()      # CAPA is optional (RFC 2449)
            return
        body = await self._read_multiline()
        self.capabilities = frozenset(
            line.decode("ascii", "replace").upper() for line in body.split(b"\r\n") if line)
        self.capabilities |= {c.split()[0] for c in self.capabilities if " " in c}

    # ---- authentication ----------------------------------------------------------------------------

    async def login(self, user: str, password: str) -> None:
        """USER/PASS; ``AuthenticationFailed`` when refused."""
        for value in (user, password):
            if "\r" in value or "\n" in value:
                raise AuthenticationFailed("A POP3 user name or password cannot contain a line break.")
        ok, text = await self._exchange(b"USER " + user.encode())
        if ok:
            ok, text = await self._exchange(b"PASS " + password.encode())
        if not ok:
            self._raise_login_error(user, text)

    async def authenticate_plain(self, user: str, service_user: str, password: str) -> None:
        """AUTH PLAIN as ``service_user``, acting as ``user`` (the profile's impersonation)."""
        await self._authenticate(b"PLAIN", plain_initial_response(user, service_user, password),
                                 f"{service_user} for {user}")

    async def authenticate_xoauth2(self, user: str, access_token: str) -> None:
        """AUTH XOAUTH2 with the initial response on the command line (RFC 5034 allows it)."""
        await self._authenticate(b"XOAUTH2", xoauth2_initial_response(user, access_token), user)

    async def _authenticate(self, mechanism: bytes, initial: bytes, user: str) -> None:
        self._conn.write(b"AUTH " + mechanism + b" " + initial + b"\r\n")
        await self._conn.drain()
        line = await self._conn.read_line()
        if line.startswith(b"+ ") or line == b"+":
            # A challenge here carries the error details; an empty reply lets the server say -ERR.
            self._conn.write(b"\r\n")
            await self._conn.drain()
            line = await self._conn.read_line()
        if not line.startswith(b"+OK"):
            self._raise_login_error(user, line[4:] if line.startswith(b"-ERR") else line)

    def _raise_login_error(self, user: str, text: bytes) -> None:
        reason = _text(text)
        if text.lstrip().upper().startswith(_TRANSIENT_CODES):
            raise TransientError(f"The POP3 server {self._host} cannot log in {user} right now: {reason.rstrip('.')}.",
                                 reason="server_unavailable")
        raise AuthenticationFailed(f"The POP3 server {self._host} rejected the credentials of {user}: {reason.rstrip('.')}.")

    # ---- the maildrop ------------------------------------------------------------------------------

    async def stat(self) -> tuple[int, int]:
        """(message count, total octets) of the maildrop."""
        text = await self._command(b"STAT")
        count, size = text.split()[:2]
        return int(count), int(size)

    async def uidl(self) -> dict[int, str]:
        """Message number -> unique id for every message (UIDL)."""
        await self._command(b"UIDL")
        body = await self._read_multiline()
        ids: dict[int, str] = {}
        for line in body.split(b"\r\n"):
            if not line:
                continue
            match = _UIDL_LINE.fullmatch(line)
            if match is None:
                # RFC 1939 7: a message number, one space, 1-70 characters 0x21-0x7E (we take up to
                # 200, the most an event carries).  Anything else cannot be kept track of.
                raise Pop3CommandFailed(f"The POP3 server {self._host} answered UIDL with a line that is not "
                                        f"'number unique-id': {_text(line[:100])}.", reason="protocol_error")
            ids[int(match[1])] = match[2].decode("ascii")
        return ids

    async def sizes(self) -> dict[int, int]:
        """Message number -> size in octets for every message (LIST without an argument)."""
        await self._command(b"LIST")
        body = await self._read_multiline()
        sizes: dict[int, int] = {}
        for line in body.split(b"\r\n"):
            match = _LIST_LINE.fullmatch(line) if line else None
            if match is not None:    # RFC 1939 5: "number size"; a line that is not says nothing
                sizes[int(match[1])] = int(match[2])
        return sizes

    async def retr(self, number: int) -> bytes:
        """The message ``number`` exactly as stored: byte-stuffing removed, CRLF line ends kept."""
        await self._command(b"RETR %d" % number)
        return unstuff(await self._read_multiline())

    async def retr_many(self, numbers: Sequence[int]) -> AsyncIterator[tuple[int, bytes]]:
        """(number, message) for each of ``numbers``, in order; pipelined when PIPELINING is offered."""
        depth = _PIPELINE_DEPTH if "PIPELINING" in self.capabilities else 1
        waiting: deque[int] = deque()
        queue = deque(numbers)
        while queue or waiting:
            while queue and len(waiting) < depth:
                number = queue.popleft()
                self._conn.write(b"RETR %d\r\n" % number)
                waiting.append(number)
            await self._conn.drain()
            number = waiting.popleft()
            status = await self._conn.read_line()
            if not status.startswith(b"+OK"):
                # The replies of the RETRs already sent still arrive: read them before failing.
                await self._discard_replies(waiting)
                raise RetrRefused(f"The POP3 server {self._host} refused RETR {number}: {_text(status[4:])}.", number)
            try:
                body = await self._read_multiline()
            except ResponseTooLarge as exc:
                raise MessageTooLarge(exc.message, number) from None
            yield number, unstuff(body)

    async def _discard_replies(self, waiting: deque[int]) -> None:
        while waiting:
            waiting.popleft()
            if (await self._conn.read_line()).startswith(b"+OK"):
                await self._read_multiline()

    async def dele(self, number: int) -> None:
        """Mark message ``number`` deleted; the server removes it at QUIT."""
        await self._command(b"DELE %d" % number)

    async def dele_many(self, numbers: Sequence[int]) -> None:
        """DELE each of ``numbers``; pipelined when PIPELINING is offered.  Every reply is read
        before an ``-ERR`` is raised, so the session stays usable (and QUIT commits nothing more
        than was marked)."""
        depth = _PIPELINE_DEPTH if "PIPELINING" in self.capabilities else 1
        refused: bytes | None = None
        for start in range(0, len(numbers), depth):
            chunk = numbers[start:start + depth]
            self._conn.write(b"".join(b"DELE %d\r\n" % n for n in chunk))
            await self._conn.drain()
            for _ in chunk:
                line = await self._conn.read_line()
                if not line.startswith(b"+OK") and refused is None:
                    refused = line[5:] if line.startswith(b"-ERR ") else line
        if refused is not None:
            raise Pop3CommandFailed(f"The POP3 server {self._host} refused DELE: {_text(refused)}.")

    async def noop(self) -> None:
        await self._command(b"NOOP")

    async def quit(self) -> None:
        """QUIT: commits deletions (UPDATE state), then closes."""
        try:
            await self._command(b"QUIT")
        finally:
            await self.close()

    async def close(self) -> None:
        """Close without QUIT (deletions are discarded); never raises."""
        await self._conn.close()

    # ---- machinery ---------------------------------------------------------------------------------

    async def _exchange(self, command: bytes) -> tuple[bool, bytes]:
        """Send one command; (whether it answered +OK, the rest of the status line)."""
        self._conn.write(command + b"\r\n")
        await self._conn.drain()
        line = await self._conn.read_line()
        if line.startswith(b"+OK"):
            return True, line[4:]
        return False, line[5:] if line.startswith(b"-ERR ") else line

    async def _command(self, command: bytes) -> bytes:
        """Send one command and return the status text; ``Pop3CommandFailed`` on -ERR."""
        ok, text = await self._exchange(command)
        if not ok:
            verb = command.split(b" ", 1)[0].decode()
            raise Pop3CommandFailed(f"The POP3 server {self._host} refused {verb}: {_text(text)}.")
        return text

    async def _read_multiline(self) -> bytes:
        """The body of a multi-line reply (still byte-stuffed), CRLF kept, terminator dropped.

        The status line's CRLF was consumed already, so an empty body is just ".\\r\\n"; otherwise
        the body ends at the first CRLF "." CRLF.
        """
        conn = self._conn
        if await conn.next_bytes_are(b".\r\n"):
            await conn.read_exact(3)
            return b""
        data, end = await conn.read_until(b"\r\n.\r\n", limit=MAX_MESSAGE_BYTES)
        return data[:end + 2]


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").strip()[:200] or "no reason given"
