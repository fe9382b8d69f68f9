"""The byte stream under the IMAP and POP3 clients: one buffered, deadline-bound connection with
TLS (implicit or upgraded by STARTTLS/STLS), failures mapped onto ``shared.errors``: a refused or
dropped connection is ``ConnectionFailed``, a missed deadline ``ProtocolTimeout``, a bad certificate
``TlsFailed``.
"""
from __future__ import annotations

import asyncio
import socket
import ssl

from shared.errors import ConnectionFailed, ProtocolTimeout, TlsFailed
from shared.registry.models import TlsMode

# One recv of the event loop's transports is at most 256 KiB; asking for as much keeps per-read
# overhead at one call per ~35 messages of 7 KB.
_READ_SIZE = 256 * 1024
# A response line (without its literals) longer than this is a broken or hostile server.
_MAX_LINE = 64 * 1024 * 1024
# The largest message Conduit reads, as an IMAP literal or a POP3 reply: more than any mail service
# delivers (Exchange Online's limit is 150 MB, Gmail's 50 MB).  Without a bound a broken or hostile
# server announcing a huge literal, or a RETR that never ends, would grow the buffer until the
# replica (every mailbox it works) is killed for its memory; with it, that one mailbox fails its
# sync with this reason and backs off.  A POP3 reply longer than this is refused as such
# (``read_until``'s ``limit``); the buffer's own bound, for any response, is this plus ``_MAX_LINE``.
MAX_MESSAGE_BYTES = 200 * 1024 * 1024


class ResponseTooLarge(ConnectionFailed):
    """A reply ran past the limit its reader set (``read_until``): the stream is left mid-reply."""


async def open_session(host: str, port: int, *, tls: TlsMode, ssl_context: ssl.SSLContext | None,
                       protocol: str, timeout: float) -> tuple[MailConnection, ssl.SSLContext | None]:
    """Connect for a client session: (the connection, the TLS context a STARTTLS upgrade must use).

    TLS is verified by default: without ``ssl_context`` the system trust store is used.  With
    ``implicit`` TLS starts with the first byte; with ``starttls`` the client upgrades after the
    greeting.
    """
    if tls not in ("implicit", "starttls", "none"):
        raise ValueError(f"tls must be 'implicit', 'starttls' or 'none', not {tls!r}")
    if tls != "none" and ssl_context is None:
        ssl_context = ssl.create_default_context()
    conn = await MailConnection.open(host, port, ssl_context=ssl_context if tls == "implicit" else None,
                                     protocol=protocol, timeout=timeout)
    return conn, ssl_context




# TCP keepalive on every mail session: a session idling for minutes (IMAP IDLE) learns from its own
# kernel within ~2 minutes that the far end is gone (a host down, a NAT or firewall that dropped the
# flow), instead of at its next command.  Linux names; elsewhere only SO_KEEPALIVE is set.
_KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4))


def _keep_alive(sock: socket.socket | None) -> None:
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE:
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _tls_error(protocol: str, host: str, exc: BaseException) -> TlsFailed:
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or str(exc)
        return TlsFailed(f"The {protocol} server {host} presented a TLS certificate that failed "
                         f"verification ({detail}).")
    return TlsFailed(f"The TLS handshake with the {protocol} server {host} failed "
                     f"({exc.__class__.__name__}: {exc}).")


class MailConnection:
    """A buffered byte stream to a mail server: large reads, a deadline on every read, TLS upgrade.

    Errors come out as ``shared.errors`` classes: a refused or dropped connection is
    ``ConnectionFailed``, a missed deadline ``ProtocolTimeout``, a bad certificate ``TlsFailed``.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, protocol: str,
                 host: str, timeout: float) -> None:
        self._reader = reader
        self._writer = writer
        self._protocol = protocol
        self._host = host
        self._peer = f"{protocol} server {host}"     # for error messages
        self.timeout = timeout
        self._buf = bytearray()
        self._pos = 0

    @classmethod
    async def open(cls, host: str, port: int, *, ssl_context: ssl.SSLContext | None, protocol: str,
                   timeout: float) -> MailConnection:
        """Connect to ``host:port``, with TLS from the first byte when ``ssl_context`` is given."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ssl_context, server_hostname=host if ssl_context else None,
                    limit=4 * _READ_SIZE)
        except TimeoutError:
            raise ProtocolTimeout(
                f"Connecting to the {protocol} server {host}:{port} took longer than {timeout:g} s.") from None
        except ssl.SSLError as exc:
            raise _tls_error(protocol, host, exc) from None
        except OSError as exc:
            raise ConnectionFailed(
                f"Could not connect to the {protocol} server {host}:{port} ({exc.strerror or exc}).") from None
        _keep_alive(writer.get_extra_info("socket"))
        return cls(reader, writer, protocol=protocol, host=host, timeout=timeout)

    async def start_tls(self, ssl_context: ssl.SSLContext) -> None:
        """Upgrade to TLS (STARTTLS/STLS), dropping anything the server sent before the handshake."""
        # RFC 2595 section 3.1: bytes received before the handshake may be injected by an attacker.
        self._buf.clear()
        self._pos = 0
        try:
            async with asyncio.timeout(self.timeout):
                await self._writer.start_tls(ssl_context, server_hostname=self._host)
        except TimeoutError:
            raise ProtocolTimeout(
                f"The TLS handshake with the {self._peer} took longer than {self.timeout:g} s.") from None
        except ssl.SSLError as exc:
            raise _tls_error(self._protocol, self._host, exc) from None
        except OSError as exc:
            raise ConnectionFailed(
                f"The {self._peer} dropped the connection during the TLS handshake ({exc}).") from None

    async def _fill(self, timeout: float | None = None) -> None:
        """Append at least one more byte from the socket to the buffer, compacting it first."""
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        wait = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(wait):
                data = await self._reader.read(_READ_SIZE)
        except TimeoutError:
            raise ProtocolTimeout(f"The {self._peer} did not answer within {wait:g} s.") from None
        except ssl.SSLError as exc:
            raise _tls_error(self._protocol, self._host, exc) from None
        except OSError as exc:
            raise ConnectionFailed(f"The connection to the {self._peer} failed ({exc}).") from None
        if not data:
            raise ConnectionFailed(f"The {self._peer} closed the connection.")
        if len(self._buf) + len(data) > MAX_MESSAGE_BYTES + _MAX_LINE:
            raise ConnectionFailed(f"The {self._peer} sent more than {(MAX_MESSAGE_BYTES + _MAX_LINE) // 2**20} MiB "
                                   "without ending a response: a message larger than Conduit reads, or a broken server.")
        self._buf += data

    async def read_line(self, timeout: float | None = None) -> bytes:
        """Return the next line without its CRLF.  ``timeout`` bounds the wait for the first byte only
        when the buffer is empty (IDLE uses it); later reads use the connection's timeout."""
        buf = self._buf
        search_from = self._pos
        while True:
            end = buf.find(b"\r\n", search_from)
            if end >= 0:
                line = bytes(buf[self._pos:end])
                self._pos = end + 2
                return line
            if len(buf) - self._pos > _MAX_LINE:
                raise ConnectionFailed(f"The {self._peer} sent a line longer than {_MAX_LINE} bytes.")
            offset = max(len(buf) - 1 - self._pos, 0)   # a CR may end this read, its LF start the next
            await self._fill(timeout if len(buf) == self._pos else None)
            search_from = self._pos + offset

    async def read_exact(self, size: int) -> bytes:
        """Return exactly ``size`` bytes (an IMAP literal: at most ``MAX_MESSAGE_BYTES``)."""
        if size > MAX_MESSAGE_BYTES:
            raise ConnectionFailed(f"The {self._peer} announced {size} bytes at once, more than the "
                                   f"{MAX_MESSAGE_BYTES // 2**20} MiB Conduit reads as one message.")
        while len(self._buf) - self._pos < size:
            await self._fill()
        start = self._pos
        self._pos = start + size
        with memoryview(self._buf) as view:
            return bytes(view[start:start + size])

    async def read_until(self, marker: bytes, start_offset: int = 0, *,
                         limit: int | None = None) -> tuple[bytes, int]:
        """Return (everything up to and including ``marker``, the index where the marker starts in it),
        searching from ``start_offset`` bytes into the unread data.  Used for POP3 multi-line replies.
        ``limit``: ``ResponseTooLarge`` once more than that many bytes came without the marker."""
        search_from = self._pos + start_offset
        while True:
            end = self._buf.find(marker, search_from)
            if end >= 0:
                start = self._pos
                self._pos = end + len(marker)
                with memoryview(self._buf) as view:
                    return bytes(view[start:self._pos]), end - start
            offset = max(len(self._buf) - len(marker) + 1 - self._pos, start_offset)
            if limit is not None and len(self._buf) - self._pos > limit + len(marker):
                raise ResponseTooLarge(f"The {self._peer} sent more than {limit // 2**20} MiB without ending a "
                                       "reply: a message larger than Conduit reads, or a broken server.")
            await self._fill()
            search_from = self._pos + offset

    async def next_bytes_are(self, prefix: bytes) -> bool:
        """Whether the unread data starts with ``prefix`` (reads until it can tell; consumes nothing)."""
        while len(self._buf) - self._pos < len(prefix):
            await self._fill()
        return self._buf.startswith(prefix, self._pos)

    def unread(self) -> tuple[bytearray, int]:
        """(the receive buffer, where its unread data starts), for a parser that reads responses in
        place (the IMAP FETCH fast path).  Valid until the next await: reads compact and extend the
        buffer; the parser hands back what it read with ``consume_to`` before awaiting."""
        return self._buf, self._pos

    def consume_to(self, position: int) -> None:
        """Mark the buffer up to ``position`` (an index into ``unread()``'s buffer) as read."""
        self._pos = position

    async def fill(self) -> None:
        """Receive at least one more byte (for ``unread`` parsers that found a response incomplete)."""
        await self._fill()

    def buffered(self) -> int:
        """How many received bytes are not consumed yet."""
        return len(self._buf) - self._pos

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    async def drain(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._writer.drain()
        except TimeoutError:
            raise ProtocolTimeout(f"The {self._peer} did not accept data within {self.timeout:g} s.") from None
        except OSError as exc:
            raise ConnectionFailed(f"The connection to the {self._peer} failed ({exc}).") from None

    async def close(self) -> None:
        """Close the socket; never raises."""
        try:
            self._writer.close()
            async with asyncio.timeout(2.0):
                await self._writer.wait_closed()
        except Exception:  # noqa: BLE001 - closing must not fail the caller, whatever the socket says
            pass
