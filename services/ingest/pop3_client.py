"""The ingest service's asyncio POP3 client (RFC 1939, STLS RFC 2595, CAPA/response codes RFC 2449,
AUTH RFC 5034 with XOAUTH2).

No maintained asyncio POP3 library exists, and the protocol is small.  Multi-line replies are read by
searching the buffer for the CRLF.CRLF terminator and un-stuffing leading dots in one pass, so a
retrieved message costs a few byte operations.  ``retr_many`` pipelines RETR commands when the
server advertises PIPELINING (RFC 2449), which removes one round trip per message; so does
``dele_many`` for DELE.

Every status line must begin with ``+OK`` or ``-ERR`` (RFC 1939 section 3); any other line means
client and server no longer agree on which reply is which (a server that did not byte-stuff a line
"." inside a message ends it early, and the rest of it stands where the next status line should):
``OutOfStep`` ends the session, never QUIT, so nothing read past that point is recorded or deleted.

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
# RFC 5034 section 4 (after RFC 2449's limit): an AUTH command with its initial response may not
# exceed 255 octets, CRLF included; a longer one (an XOAUTH2 token) goes after a "+" challenge.
_MAX_COMMAND_OCTETS = 255


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


class OutOfStep(ConnectionFailed):
    """A status line began with neither "+OK" nor "-ERR": the session cannot go on, since every
    reply after it could be taken for another's.  ``suspect`` is the message read just before, when
    there is one: most likely it ended early (a line "." the server did not byte-stuff), so it was
    not handed out.  The text never quotes the line, which may be part of a message."""

    reason = "protocol_error"

    def __init__(self, message: str, suspect: int | None = None) -> None:
        super().__init__(message)
        self.suspect = suspect


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
        # What the last UIDL left out: its message number (or the line's start) for each line that
        # gave no usable unique id.
        self.untracked_uidl_lines: list[str] = []

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
        ok, _ = await self._exchange(b"CAPA")
        if not ok:
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
        """AUTH XOAUTH2, with the initial response on the command line when it fits (RFC 5034)."""
        await self._authenticate(b"XOAUTH2", xoauth2_initial_response(user, access_token), user)

    async def _authenticate(self, mechanism: bytes, initial: bytes, user: str) -> None:
        command = b"AUTH " + mechanism + b" " + initial
        if len(command) + 2 > _MAX_COMMAND_OCTETS:
            # RFC 5034 section 4: no initial response on the line; the server's empty challenge asks for it.
            self._conn.write(b"AUTH " + mechanism + b"\r\n")
            await self._conn.drain()
            line = await self._read_status("AUTH", challenge=True)
            if not _is_challenge(line):
                self._check_login(user, line)
                return
            command = initial
        self._conn.write(command + b"\r\n")
        await self._conn.drain()
        line = await self._read_status("AUTH", challenge=True)
        if _is_challenge(line):
            # A challenge here carries the error details; an empty reply lets the server say -ERR.
            self._conn.write(b"\r\n")
            await self._conn.drain()
            line = await self._read_status("AUTH")
        self._check_login(user, line)

    def _check_login(self, user: str, line: bytes) -> None:
        if not line.startswith(b"+OK"):
            self._raise_login_error(user, line[4:])

    def _raise_login_error(self, user: str, text: bytes) -> None:
        reason = _text(text)
        code = text.lstrip().upper()
        if code.startswith(_TRANSIENT_CODES):
            raise TransientError(f"The POP3 server {self._host} cannot log in {user} right now: {reason.rstrip('.')}.",
                                 reason="server_unavailable")
        if code.startswith(b"[SYS/PERM]"):
            # RFC 3206 section 4: a system error that will not pass by itself (a mailbox the server
            # cannot open), not the credentials ([AUTH], or no code): no sign-in refused is counted.
            raise PermanentError(f"The POP3 server {self._host} cannot serve {user}: {reason.rstrip('.')}.",
                                 reason="server_refused")
        raise AuthenticationFailed(f"The POP3 server {self._host} rejected the credentials of {user}: {reason.rstrip('.')}.")

    # ---- the maildrop ------------------------------------------------------------------------------

    async def stat(self) -> tuple[int, int]:
        """(message count, total octets) of the maildrop."""
        text = await self._command(b"STAT")
        count, size = text.split()[:2]
        return int(count), int(size)

    async def uidl(self) -> dict[int, str]:
        """Message number -> unique id for every message (UIDL) that has one Conduit can keep track of.

        RFC 1939 section 7: a message number, one space, 1-70 characters 0x21-0x7E (up to 200 are
        taken, the most an event carries).  A line that is not is left out, its message untracked,
        and named in ``untracked_uidl_lines`` (its message number, or the line's start); only a
        listing with no usable line at all fails (``protocol_error``).
        """
        await self._command(b"UIDL")
        body = await self._read_multiline()
        ids: dict[int, str] = {}
        self.untracked_uidl_lines = []
        for line in body.split(b"\r\n"):
            if not line:
                continue
            match = _UIDL_LINE.fullmatch(line)
            if match is None:
                number = re.match(rb"\d{1,9}(?= )", line)
                self.untracked_uidl_lines.append(f"message {int(number[0])}" if number else repr(_text(line[:40])))
                continue
            ids[int(match[1])] = match[2].decode("ascii")
        if self.untracked_uidl_lines and not ids:
            raise Pop3CommandFailed(f"The POP3 server {self._host} answered UIDL with no line that is "
                                    f"'number unique-id' of 1-200 printable characters "
                                    f"({', '.join(self.untracked_uidl_lines[:5])}).", reason="protocol_error")
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
        """(number, message) for each of ``numbers``, in order; pipelined when PIPELINING is offered.

        A message is handed out once the status line after it proved in step (the next RETR's
        "+OK" or "-ERR"), or when it is the last asked for: one that ended early is named by
        ``OutOfStep.suspect`` instead.  (The last one's end is checked only by the next command.)
        """
        depth = _PIPELINE_DEPTH if "PIPELINING" in self.capabilities else 1
        waiting: deque[int] = deque()
        queue = deque(numbers)
        held: tuple[int, bytes] | None = None
        while queue or waiting:
            while queue and len(waiting) < depth:
                number = queue.popleft()
                self._conn.write(b"RETR %d\r\n" % number)
                waiting.append(number)
            await self._conn.drain()
            number = waiting.popleft()
            status = await self._read_status(f"RETR {number}", suspect=held[0] if held else None)
            if held is not None:
                yield held
                held = None
            if not status.startswith(b"+OK"):
                # The replies of the RETRs already sent still arrive: read them before failing.
                await self._discard_replies(waiting)
                raise RetrRefused(f"The POP3 server {self._host} refused RETR {number}: {_text(status[4:])}.", number)
            try:
                body = await self._read_multiline()
            except ResponseTooLarge as exc:
                raise MessageTooLarge(exc.message, number) from None
            held = number, unstuff(body)
        if held is not None:
            yield held

    async def _discard_replies(self, waiting: deque[int]) -> None:
        while waiting:
            number = waiting.popleft()
            if (await self._read_status(f"RETR {number}")).startswith(b"+OK"):
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
            for number in chunk:
                line = await self._read_status(f"DELE {number}")
                if not line.startswith(b"+OK") and refused is None:
                    refused = line[4:]
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
        line = await self._read_status(command.split(b" ", 1)[0].decode("ascii", "replace"))
        return line.startswith(b"+OK"), line[4:]

    async def _read_status(self, what: str, *, suspect: int | None = None, challenge: bool = False) -> bytes:
        """The status line answering ``what``: "+OK" or "-ERR" (with ``challenge``, a SASL "+"
        continuation too); anything else is ``OutOfStep``."""
        line = await self._conn.read_line()
        if line.startswith((b"+OK", b"-ERR")) or (challenge and _is_challenge(line)):
            return line
        after = f" (message {suspect}, read just before, probably ended early)" if suspect is not None else ""
        raise OutOfStep(f"The POP3 server {self._host} answered {what} with a line that is neither +OK nor -ERR: "
                        f"client and server are out of step{after}; the session ends.", suspect)

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


def _is_challenge(line: bytes) -> bool:
    """A SASL continuation (RFC 5034 section 4): "+" and a space, or a bare "+", not "+OK"."""
    return line.startswith(b"+ ") or line == b"+"


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").strip()[:200] or "no reason given"
