"""The ingest service's asyncio IMAP4rev1 client (RFC 3501, CONDSTORE/QRESYNC RFC 7162, IDLE RFC 2177).

Why not aioimaplib: measured on this machine against Dovecot (bench/imap_fetch.py, 10,000 messages of
7 KB), aioimaplib 2.0.3 fetches ~4,000 msg/s while this client fetches several times more, which the
ingest target (>= imapflow, >= 2.5x mbsync) needs.  aioimaplib re-joins and re-scans its pending
bytes for every piece of data it receives and builds a list of lines per response; here the socket
is read in large chunks into one buffer, and a FETCH response of the usual shape costs one regular
expression match where it starts in that buffer and one slice of its literal (anything else goes
through a general reader and tokeniser).

The client does one thing at a time (IMAP commands are serialised by a lock), pipelines only its own
UID FETCH chunks, bounds every read with a deadline and maps failures onto ``shared.errors``:
``ConnectionFailed`` and ``ProtocolTimeout`` (transient), ``AuthenticationFailed`` and ``TlsFailed``
(permanent).  No error message ever carries a password or a token.

The byte stream under it (``MailConnection``: buffered, deadline-bound, TLS) is ``wire.py``, shared
with the POP3 client.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from services.ingest.wire import MailConnection, TlsMode, open_session
from services.ingest.sasl import plain_initial_response, xoauth2_initial_response
from shared.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    PermanentError,
    ProtocolTimeout,
    TlsFailed,
)

log = logging.getLogger(__name__)

# RFC 2177: servers may drop a client idle for 30 minutes; re-issue IDLE before that.
IDLE_RESTART_SECONDS = 29 * 60


class ImapCommandFailed(PermanentError):
    """The server answered NO or BAD to a command (not a login)."""

    reason = "imap_command_failed"


class FolderUnavailable(ImapCommandFailed):
    """SELECT or EXAMINE was refused: the folder does not exist (or may not be opened)."""

    reason = "folder_unavailable"


class FetchRefused(ImapCommandFailed):
    """The server answered NO or BAD (``status``) to a UID FETCH; ``uids`` are the UIDs that command
    asked for, ``unserved`` those of them it did not serve.

    Servers do this for single messages they cannot serve (Gmail: "Some messages could not be
    FETCHed (Failure)", for the same message every time), often after serving the others."""

    reason = "fetch_refused"

    def __init__(self, message: str, uids: Sequence[int], served: Collection[int] = (), *,
                 status: str = "NO") -> None:
        super().__init__(message)
        self.uids = list(uids)
        self.status = status
        # What the command asked for and the server did not serve before refusing, in UID order.
        self.unserved = [u for u in self.uids if u not in served]

    @property
    def temporary(self) -> bool:
        """The server says it cannot serve anything for now (RFC 5530 codes), not this message."""
        text = self.message.upper()
        return any(code in text for code in ("[UNAVAILABLE]", "[INUSE]", "[LIMIT]"))

    @property
    def of_the_messages(self) -> bool:
        """A refusal that may be the messages' own: a NO the server does not mark temporary.  A BAD
        says the command (or the session) was at fault, not the messages (RFC 3501 7.1.3)."""
        return self.status == "NO" and not self.temporary


# --------------------------------------------------------------------------------------------------
# IMAP syntax helpers: modified UTF-7, strings, sequence sets, response tokens, dates
# --------------------------------------------------------------------------------------------------


def encode_mailbox_name(name: str) -> str:
    """Encode a folder name in IMAP modified UTF-7 (RFC 3501 section 5.1.3)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            utf16 = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(utf16).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


_MUTF7_RUN = re.compile(r"&([^-]*)-")


def decode_mailbox_name(name: str) -> str:
    """Decode an IMAP modified UTF-7 folder name; names that are not valid mUTF-7 come back as sent."""
    def run(match: re.Match[str]) -> str:
        encoded = match.group(1)
        if not encoded:
            return "&"
        padded = encoded.replace(",", "/") + "=" * (-len(encoded) % 4)
        return base64.b64decode(padded).decode("utf-16-be")

    try:
        return _MUTF7_RUN.sub(run, name)
    except (ValueError, UnicodeDecodeError):
        return name


class _Literal:
    """A command argument that must travel as a literal (8-bit or CR/LF content)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _astring(value: str) -> bytes | _Literal:
    """An IMAP astring: a quoted string when it is printable ASCII, else a literal."""
    if value.isascii() and value.isprintable():
        return b'"' + value.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'
    return _Literal(value.encode())


def parse_uid_set(text: bytes) -> tuple[tuple[int, int], ...]:
    """Read a UID set as servers send it (``b"1:3,7,10:9"``) into ascending ``(first, last)`` ranges.

    Ranges, not a list: a VANISHED response may cover many thousands of UIDs in a few bytes."""
    ranges: list[tuple[int, int]] = []
    for part in text.split(b","):
        low, _, high = part.strip().partition(b":")
        if not low.isdigit() or not (high.isdigit() or not high):
            continue        # "*" has no place in a server's UID set; anything else is not a UID
        first, last = int(low), int(high or low)
        ranges.append((min(first, last), max(first, last)))
    return tuple(sorted(ranges))


def sequence_set(uids: Sequence[int]) -> bytes:
    """Compress sorted unique UIDs into an IMAP sequence set: [1,2,3,7,9,10] -> b"1:3,7,9:10"."""
    parts: list[str] = []
    start = prev = uids[0]
    for uid in uids[1:]:
        if uid != prev + 1:
            parts.append(f"{start}:{prev}" if prev != start else str(start))
            start = uid
        prev = uid
    parts.append(f"{start}:{prev}" if prev != start else str(start))
    return ",".join(parts).encode()


# Tokens of a response: ( ) "quoted" {literal} atom-with-optional-[section]<partial>.
_TOKEN = re.compile(
    rb'[ ]*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|\{(\d+)\+?\}|([^ ()"{\[\]]+(?:\[[^\]]*\])?(?:<[\d.]+>)?|\[|\]))')


def parse_tokens(text: bytes, literals: Sequence[bytes] = ()) -> list:
    """Parse response text into nested lists: atoms as ``str``, strings (quoted or literal) as ``bytes``.

    ``text`` holds ``{n}`` markers where literals were; ``literals`` holds their bytes in order.
    """
    root: list = []
    stack = [root]
    current = root
    literal_index = 0
    for match in _TOKEN.finditer(text):
        opening, closing, quoted, literal, atom = match.groups()
        if atom is not None:
            current.append(atom.decode("ascii", "replace"))
        elif literal is not None:
            current.append(literals[literal_index])
            literal_index += 1
        elif quoted is not None:
            current.append(re.sub(rb"\\(.)", rb"\1", quoted) if b"\\" in quoted else quoted)
        elif opening:
            current = []
            stack[-1].append(current)
            stack.append(current)
        elif closing and len(stack) > 1:
            stack.pop()
            current = stack[-1]
    return root


_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}
_ZONES: dict[str, timezone] = {}


def parse_internaldate(value: bytes) -> datetime | None:
    """Parse ``"17-Jul-1996 02:44:25 -0700"`` (day may be space-padded) into an aware datetime.

    Hand-sliced rather than strptime: this runs once per fetched message.
    """
    try:
        text = value.decode("ascii")
        zone = text[21:26]
        tz = _ZONES.get(zone)
        if tz is None:
            minutes = int(zone[1:3]) * 60 + int(zone[3:5])
            tz = _ZONES[zone] = timezone(timedelta(minutes=-minutes if zone[0] == "-" else minutes))
        return datetime(int(text[7:11]), _MONTHS[text[3:6]], int(text[0:2]), int(text[12:14]),
                        int(text[15:17]), int(text[18:20]), tzinfo=tz)
    except (ValueError, KeyError, IndexError, UnicodeDecodeError):
        return None


_LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}$")
_RESP_CODE = re.compile(rb"^\[([^\]]*)\]")
# UIDs and UIDVALIDITY are 32-bit (RFC 3501 2.3.1.1), mod-sequences at most 2^63 - 1 (RFC 7162 7): a
# server past them is broken, and PostgreSQL's bigint could not hold the mod-sequence either.  Zero is
# let through: some servers send [UIDNEXT 0] (then found from the last message) or [UIDVALIDITY 0].
MAX_UID = 2**32 - 1
_RANGES = {"UIDVALIDITY": MAX_UID, "UIDNEXT": MAX_UID + 1, "HIGHESTMODSEQ": 2**63 - 1}
# Response codes of a refused login that are the server's trouble, not the credentials' (RFC 5530).
_LOGIN_NOT_NOW = ("[UNAVAILABLE]", "[SERVERBUG]", "[INUSE]", "[LIMIT]")
# A fetch_servable that has had this many UIDs refused one by one and none served takes the server to
# refuse everything (a storage failure, say): narrowing further would cost two commands a message.
SERVER_WIDE_REFUSALS = 5


# --------------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnownFolder:
    """What a client remembers of a folder, for SELECT/EXAMINE with QRESYNC (RFC 7162 3.2.5): the
    server then reports what changed since ``modseq`` among the UIDs up to ``last_uid``."""

    uidvalidity: int
    modseq: int
    last_uid: int = 0


@dataclass(frozen=True)
class FolderState:
    """What SELECT/EXAMINE reports about a folder.

    With QRESYNC and a ``KnownFolder`` whose UIDVALIDITY is still the folder's, ``quick_resync`` is
    True and ``vanished`` (UID ranges expunged since the known modseq) and ``changed`` (UIDs whose
    flags changed since then) are complete; otherwise they are empty and mean nothing.
    """

    uidvalidity: int
    uidnext: int
    exists: int
    highestmodseq: int | None
    quick_resync: bool = False
    vanished: tuple[tuple[int, int], ...] = ()
    changed: tuple[int, ...] = ()


class FetchedMessage(NamedTuple):
    """One fetched message.  A NamedTuple, not a dataclass: one is built per message, and a frozen
    dataclass's ``__init__`` costs ~0.4 us more."""

    uid: int
    raw: bytes
    internaldate: datetime | None
    flags: tuple[str, ...]
    modseq: int | None


class _WithoutContent(NamedTuple):
    """A FETCH response naming a UID but carrying no usable message content: ``BODY[] NIL`` (a
    server that cannot render the message, or Dovecot's answer for one expunged under us), or no
    body item at all (a flag update, or a server that left the body out)."""

    number: int     # the message sequence number, which an EXPUNGE during the command may name
    uid: int
    what: str       # what came instead of the content, for the refusal's reason


@dataclass
class _Reply:
    """A completed command: its tagged status and text, and the untagged responses that came with it."""

    status: str
    text: bytes
    untagged: list[tuple[bytes, list[bytes]]]


# Untagged responses that mean "the selected folder changed" (IDLE wakes on them).
_CHANGE_KINDS = frozenset({b"EXISTS", b"RECENT", b"EXPUNGE", b"FETCH", b"VANISHED"})


class ImapClient:
    """One IMAP session.  Create with ``await ImapClient.connect(...)``; not safe for concurrent use
    by several tasks beyond the serialisation its lock gives.

    While a ``fetch()`` iteration is open no other command may be sent (the stream is busy with its
    responses); leave a fetch early with ``contextlib.aclosing``.
    """

    def __init__(self, conn: MailConnection, host: str, timeout: float) -> None:
        self._conn = conn
        self._host = host
        self._timeout = timeout
        self.capabilities: frozenset[str] = frozenset()
        self._tag_number = 0
        self._lock = asyncio.Lock()
        self._broken: str | None = None
        self._condstore = False
        self._qresync = False
        self._tracking_asked = False   # enable_quick_resync ran (whatever the server answered)
        self._changed = False      # an untagged change arrived since the last select/uids_since/idle
        self._logging_out = False  # BYE is expected only after LOGOUT
        self._alerted = False      # an [ALERT] of the server's was logged this session
        self.idling = False        # True while the server has us in IDLE (for tests and health checks)
        # Parsed INTERNALDATE and FLAGS values by their bytes: mail delivered together shares a date
        # to the second, and most messages share a few flag sets.  Bounded by clearing.
        self._dates: dict[bytes, datetime | None] = {}
        self._flag_sets: dict[bytes, tuple[str, ...]] = {}

    # ---- connection and authentication ---------------------------------------------------------

    @classmethod
    async def connect(cls, host: str, port: int, *, tls: TlsMode, ssl_context: ssl.SSLContext | None = None,
                      timeout: float = 30.0) -> ImapClient:
        """Connect, read the greeting and the capabilities; with ``tls="starttls"`` upgrade first.

        TLS is verified by default: without ``ssl_context`` the system trust store is used.
        """
        conn, ssl_context = await open_session(host, port, tls=tls, ssl_context=ssl_context, protocol="IMAP",
                                               timeout=timeout)
        client = cls(conn, host, timeout)
        try:
            await client._read_greeting()
            if tls == "starttls":
                await client._starttls(ssl_context)
            if not client.capabilities:
                await client._capability()
        except BaseException:
            await conn.close()
            raise
        return client

    async def _read_greeting(self) -> None:
        line = await self._conn.read_line()
        if line.startswith(b"* BYE"):
            raise ConnectionFailed(f"The IMAP server {self._host} refused the session: {_text(line[5:])}.")
        if not (line.startswith(b"* OK") or line.startswith(b"* PREAUTH")):
            raise ConnectionFailed(f"The server at {self._host} did not greet like an IMAP server.")
        self._note_capabilities(line.split(b" ", 2)[2] if line.count(b" ") >= 2 else b"")

    async def _starttls(self, ssl_context: ssl.SSLContext) -> None:
        if not self.capabilities:
            await self._capability()
        if "STARTTLS" not in self.capabilities:
            raise TlsFailed(f"The IMAP server {self._host} does not offer STARTTLS.")
        await self._simple(b"STARTTLS", what="STARTTLS")
        await self._conn.start_tls(ssl_context)
        # RFC 3501 6.2.1: capabilities learned before TLS must be discarded.
        self.capabilities = frozenset()
        await self._capability()

    async def _capability(self) -> None:
        reply = await self._simple(b"CAPABILITY", what="CAPABILITY")
        for text, _ in reply.untagged:
            if text[2:13].upper() == b"CAPABILITY ":
                self.capabilities = frozenset(text[13:].decode("ascii", "replace").upper().split())

    def _note_capabilities(self, resp_text: bytes) -> None:
        """Take capabilities from a ``[CAPABILITY ...]`` response code (greeting, LOGIN OK)."""
        match = _RESP_CODE.match(resp_text)
        if match and match.group(1)[:11].upper() == b"CAPABILITY ":
            self.capabilities = frozenset(match.group(1)[11:].decode("ascii", "replace").upper().split())

    async def login(self, user: str, password: str) -> None:
        """LOGIN with quoted strings or literals as the values need; ``AuthenticationFailed`` on NO."""
        if "LOGINDISABLED" in self.capabilities:
            raise AuthenticationFailed(f"The IMAP server {self._host} refuses LOGIN on this connection; use TLS.")
        reply = await self._command([b"LOGIN", _astring(user), _astring(password)])
        self._check_login(reply, user)
        await self._after_auth()

    async def authenticate_xoauth2(self, user: str, access_token: str) -> None:
        """AUTHENTICATE XOAUTH2 (initial response inline when SASL-IR is advertised)."""
        if "AUTH=XOAUTH2" not in self.capabilities:
            raise AuthenticationFailed(f"The IMAP server {self._host} does not offer XOAUTH2.")
        initial = xoauth2_initial_response(user, access_token)
        if "SASL-IR" in self.capabilities:
            reply = await self._command([b"AUTHENTICATE XOAUTH2", initial], sasl_response=b"")
        else:
            reply = await self._command([b"AUTHENTICATE XOAUTH2"], sasl_response=initial)
        self._check_login(reply, user)
        await self._after_auth()

    async def authenticate_plain(self, user: str, service_user: str, password: str) -> None:
        """AUTHENTICATE PLAIN as ``service_user``, acting as ``user`` (the profile's impersonation)."""
        if "AUTH=PLAIN" not in self.capabilities:
            raise AuthenticationFailed(f"The IMAP server {self._host} does not offer AUTHENTICATE PLAIN, which "
                                       "signing in with the profile's credentials for another user needs.")
        initial = plain_initial_response(user, service_user, password)
        if "SASL-IR" in self.capabilities:
            reply = await self._command([b"AUTHENTICATE PLAIN", initial], sasl_response=b"")
        else:
            reply = await self._command([b"AUTHENTICATE PLAIN"], sasl_response=initial)
        self._check_login(reply, f"{service_user} for {user}")
        await self._after_auth()

    def _check_login(self, reply: _Reply, user: str) -> None:
        if reply.status == "OK":
            # Capabilities change with authentication; empty means "ask again" (_after_auth).
            self.capabilities = frozenset()
            self._note_capabilities(reply.text)
            return
        text = _text(reply.text)
        # RFC 5530: these codes say the server cannot log anyone in for now (it is unavailable, broken,
        # the account busy elsewhere or at its connection limit), nothing of the credentials: worth
        # a retry, and no "wrong password" alert (nor an XOAUTH2 token forgotten).  No code, and
        # AUTHENTICATIONFAILED, AUTHORIZATIONFAILED, EXPIRED and the rest, are final.
        if text.upper().startswith(_LOGIN_NOT_NOW):
            raise ConnectionFailed(f"The IMAP server {self._host} could not log in {user} for now: {text.rstrip('.')}.")
        raise AuthenticationFailed(f"The IMAP server {self._host} rejected the credentials of {user}: {text.rstrip('.')}.")

    async def _after_auth(self) -> None:
        """Ask for CAPABILITY when the login reply did not announce the new set."""
        if not self.capabilities:
            await self._capability()

    @property
    def condstore_enabled(self) -> bool:
        return self._condstore

    @property
    def qresync_enabled(self) -> bool:
        """True once ENABLE QRESYNC succeeded: SELECT takes ``known=`` and expunges come as VANISHED."""
        return self._qresync

    async def enable_condstore(self) -> bool:
        """Turn on CONDSTORE (MODSEQ in fetches, HIGHESTMODSEQ on select); False when not advertised.
        Once per session: later calls cost nothing."""
        if self._condstore:
            return True
        await self._after_auth()
        if "CONDSTORE" not in self.capabilities:
            return False
        # Without ENABLE, fetching MODSEQ is what turns CONDSTORE on (RFC 7162 3.1).
        if "ENABLE" in self.capabilities and "CONDSTORE" not in await self._enable(b"CONDSTORE"):
            return False
        self._condstore = True
        return True

    async def enable_qresync(self) -> bool:
        """Turn on QRESYNC (which implies CONDSTORE); False when not advertised.  Once per session."""
        if self._qresync:
            return True
        await self._after_auth()
        if "QRESYNC" not in self.capabilities or "ENABLE" not in self.capabilities:
            return False
        # RFC 5161: only an "* ENABLED QRESYNC" turns it on; a server may accept ENABLE and enable nothing.
        if "QRESYNC" not in await self._enable(b"QRESYNC"):
            return False
        self._condstore = self._qresync = True
        return True

    async def enable_quick_resync(self) -> str | None:
        """Turn on the best change tracking the server offers: "QRESYNC", else "CONDSTORE", else None.
        Meant right after login (RFC 5161 wants ENABLE before a folder is selected).  Asks once per
        session; a server that refuses ENABLE gets the plain path, not a failed sync."""
        if not self._tracking_asked:
            self._tracking_asked = True
            for enable in (self.enable_qresync, self.enable_condstore):
                try:
                    if await enable():
                        break
                except ImapCommandFailed as exc:
                    log.info("imap_enable_refused", extra={"host": self._host, "reason": exc.message})
        return "QRESYNC" if self._qresync else "CONDSTORE" if self._condstore else None

    async def _enable(self, extension: bytes) -> set[str]:
        reply = await self._simple(b"ENABLE " + extension, what="ENABLE")
        enabled: set[str] = set()
        for text, _ in reply.untagged:
            if text[2:10].upper() == b"ENABLED ":
                enabled.update(text[10:].decode("ascii", "replace").upper().split())
        return enabled

    # ---- folders ---------------------------------------------------------------------------------

    async def list_folders(self) -> list[str]:
        """All selectable folders, names decoded from modified UTF-7."""
        reply = await self._simple(b'LIST "" "*"', what="LIST")
        names = []
        for text, literals in reply.untagged:
            if text[2:7].upper() != b"LIST ":
                continue
            tokens = parse_tokens(text[7:], literals)
            if len(tokens) < 3 or not isinstance(tokens[0], list):
                continue
            attributes = {str(a).upper() for a in tokens[0]}
            if "\\NOSELECT" in attributes or "\\NONEXISTENT" in attributes:
                continue
            name = tokens[2]
            name = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
            names.append(decode_mailbox_name(name))
        return names

    async def select(self, folder: str, *, readonly: bool = True, known: KnownFolder | None = None) -> FolderState:
        """SELECT (or EXAMINE when ``readonly``) a folder and report its UIDVALIDITY, UIDNEXT, EXISTS.

        With ``known`` and QRESYNC enabled the command carries ``(QRESYNC (uidvalidity modseq
        1:last_uid))`` and the answer also says what vanished and what changed since then (one
        round trip); without QRESYNC ``known`` is ignored."""
        verb = b"EXAMINE" if readonly else b"SELECT"
        parts: list[bytes | _Literal] = [verb, _astring(encode_mailbox_name(folder))]
        if known is not None and self._qresync:
            params = b"%d %d" % (known.uidvalidity, known.modseq)
            if known.last_uid > 0:
                # Known UIDs: the server need not report expunges of mail we never saw.
                params += b" 1:%d" % known.last_uid
            parts.append(b"(QRESYNC (" + params + b"))")
        else:
            known = None
        reply = await self._command(parts)
        if reply.status != "OK":
            raise FolderUnavailable(
                f"The IMAP server {self._host} could not open the folder {folder!r}: {_text(reply.text)}.")
        self._changed = False
        values: dict[str, int] = {}
        exists = 0
        vanished: list[tuple[int, int]] = []
        changed: list[int] = []
        for text, literals in reply.untagged:
            words = text.split(b" ", 3)
            kind = words[2].upper() if len(words) >= 3 else b""
            if kind == b"EXISTS" and words[1].isdigit():
                exists = int(words[1])
            elif kind == b"FETCH" and known is not None:
                uid = _fetch_items(text, literals).get("UID")
                if isinstance(uid, str) and uid.isdigit():
                    changed.append(int(uid))
            elif words[1:2] == [b"VANISHED"] and known is not None:
                uid_set = text[11:]
                if uid_set[:10].upper() == b"(EARLIER) ":
                    uid_set = uid_set[10:]
                vanished.extend(parse_uid_set(uid_set))
            elif words[1:2] == [b"OK"] and len(words) > 2:
                code = _RESP_CODE.match(b" ".join(words[2:]))
                if code:
                    code_words = code.group(1).split()
                    if len(code_words) == 2 and code_words[1].isdigit():
                        values[code_words[0].upper().decode()] = int(code_words[1])
                    elif code_words[:1] == [b"CLOSED"]:
                        # RFC 7162 3.2.11: what came before [CLOSED] was about the folder selected before.
                        exists = 0
                        vanished.clear()
                        changed.clear()
                        values.clear()
        if "UIDVALIDITY" not in values:
            raise ImapCommandFailed(f"The IMAP server {self._host} did not report UIDVALIDITY for {folder!r}.")
        for name, highest in _RANGES.items():
            value = values.get(name)
            if value is not None and value > highest:
                raise ImapCommandFailed(f"The IMAP server {self._host} reported {name} {value} for {folder!r}, "
                                        "outside the range IMAP allows (RFC 3501, RFC 7162).")
        uidnext = values.get("UIDNEXT") or await self._highest_uid_plus_one(exists)
        # Another UIDVALIDITY: the folder was renumbered and the server ignored our parameters.
        quick = known is not None and known.uidvalidity == values["UIDVALIDITY"] and "HIGHESTMODSEQ" in values
        return FolderState(uidvalidity=values["UIDVALIDITY"], uidnext=uidnext, exists=exists,
                           highestmodseq=values.get("HIGHESTMODSEQ"), quick_resync=quick,
                           vanished=tuple(sorted(vanished)) if quick else (),
                           changed=tuple(sorted(set(changed))) if quick else ())

    async def _highest_uid_plus_one(self, exists: int) -> int:
        """UIDNEXT for the rare server that does not send it: a lower bound from the last message.
        The server's answer for that message is no change of the folder: it must not wake the IDLE
        that follows (a sync that finds nothing, then IDLE woken again, for ever)."""
        if not exists:
            return 1
        changed_before = self._changed
        reply = await self._simple(b"FETCH * (UID)", what="FETCH")
        kinds = {_response_kind(text) for text, _ in reply.untagged}
        self._changed = changed_before or bool(kinds & (_CHANGE_KINDS - {b"FETCH"}))
        uids = [_fetch_items(text, lits).get("UID") for text, lits in reply.untagged if b"FETCH" in text]
        return max((int(u) for u in uids if isinstance(u, str) and u.isdigit() and int(u) <= MAX_UID), default=0) + 1

    # ---- searching ----------------------------------------------------------------------------------

    async def uids_since(self, last_uid: int) -> list[int]:
        """UIDs greater than ``last_uid``, ascending."""
        self._changed = False
        reply = await self._simple(b"UID SEARCH UID %d:*" % (last_uid + 1), what="UID SEARCH")
        # "N:*" always matches the highest message, even when its UID is below N: filter.
        return sorted(uid for uid in _search_results(reply) if uid > last_uid)

    async def uids_changed_since(self, modseq: int) -> list[int]:
        """UIDs whose metadata changed after ``modseq`` (CONDSTORE; enabled on first use)."""
        if not self._condstore and not await self.enable_condstore():
            raise ImapCommandFailed(f"The IMAP server {self._host} does not support CONDSTORE.")
        # SEARCH MODSEQ n matches mod-sequences >= n (RFC 7162 3.1.5): "after modseq" is n + 1.
        reply = await self._simple(b"UID SEARCH MODSEQ %d" % (modseq + 1), what="UID SEARCH")
        return sorted(_search_results(reply))

    async def uids_present(self, uids: Sequence[int]) -> set[int]:
        """Of ``uids`` (of the selected folder), those the folder holds now: one ``UID SEARCH UID``
        (a UID that no longer exists simply does not match)."""
        ordered = sorted(set(uids))
        if not ordered:
            return set()
        reply = await self._simple(b"UID SEARCH UID " + sequence_set(ordered), what="UID SEARCH")
        asked = set(ordered)
        return {uid for uid in _search_results(reply) if uid in asked}

    async def still_there(self, uids: Sequence[int]) -> dict[int, datetime | None]:
        """Of ``uids`` (of the selected folder), those the folder holds now and that are not flagged
        \\Deleted, each with its INTERNALDATE: one UID FETCH of UID, FLAGS and INTERNALDATE, no
        content.  A UID no longer there is simply absent from the answer (RFC 3501 6.4.8: a UID
        FETCH of UIDs that do not exist is no error), and one reported expunged before the answer
        ends is gone too.  What the server answers for the UIDs asked is no change of the folder: it
        does not wake an IDLE that follows (anything else that came with it still does)."""
        ordered = sorted(set(uids))
        if not ordered:
            return {}
        asked = set(ordered)
        changed_before = self._changed
        reply = await self._simple(b"UID FETCH " + sequence_set(ordered) + b" (UID FLAGS INTERNALDATE)",
                                   what="UID FETCH")
        found: dict[int, tuple[int, datetime | None]] = {}   # UID -> (sequence number, INTERNALDATE)
        deleted: set[int] = set()
        other_change = False
        for text, literals in reply.untagged:
            words = text.split(b" ", 3)
            if len(words) > 2 and words[1].isdigit() and words[2].upper() == b"FETCH":
                items = _fetch_items(text, literals)
                uid, date = items.get("UID"), items.get("INTERNALDATE")
                if isinstance(uid, str) and uid.isdigit() and int(uid) in asked and isinstance(date, bytes):
                    found[int(uid)] = (int(words[1]), parse_internaldate(date))
                    if any(str(f).upper() == "\\DELETED" for f in items.get("FLAGS") or ()):
                        deleted.add(int(uid))
                    continue
                other_change = True    # an unsolicited flag update of another client's
                continue
            _forget_expunged(text, found)
            other_change = other_change or _response_kind(text) in _CHANGE_KINDS
        self._changed = changed_before or other_change
        return {uid: date for uid, (_, date) in found.items() if uid not in deleted}

    # ---- fetching -----------------------------------------------------------------------------------

    def fetch(self, uids: Sequence[int], *, chunk: int = 500) -> AsyncIterator[FetchedMessage]:
        """Stream whole messages (UID FLAGS INTERNALDATE BODY.PEEK[], MODSEQ with CONDSTORE) for
        ``uids``, in chunks of ``chunk`` UIDs sent as compressed ranges.  UIDs no longer on the
        server are simply absent from the results, and so are those the server answered without
        their content (``fetch_servable`` reports those)."""
        return _one_by_one(self._fetch(uids, chunk, self._whole_items()))

    def fetch_headers(self, uids: Sequence[int], *, chunk: int = 500) -> AsyncIterator[FetchedMessage]:
        """Like ``fetch`` but ``raw`` holds only the header block (BODY.PEEK[HEADER])."""
        items = b"UID FLAGS INTERNALDATE BODY.PEEK[HEADER]" + (b" MODSEQ" if self._condstore else b"")
        return _one_by_one(self._fetch(uids, chunk, items))

    def _whole_items(self) -> bytes:
        return b"UID FLAGS INTERNALDATE BODY.PEEK[]" + (b" MODSEQ" if self._condstore else b"")

    async def fetch_servable(self, uids: Sequence[int], refused: dict[int, str], *,
                             chunk: int = 500) -> AsyncIterator[list[FetchedMessage]]:
        """Like ``fetch``, in lists of messages (as they were read), and a UID FETCH the server
        refuses does not end it: the UIDs of that command it did not serve are fetched again in
        halves, down to single UIDs, and those the server still refuses go into ``refused`` (UID ->
        the server's words).  The UIDs after them are fetched as usual, so one message a server
        cannot serve costs a few round trips, not the rest of the folder.  Messages may come out of
        UID order around a refusal.

        A UID FETCH answered OK refuses too when its FETCH response for a UID it asked for carries
        no content (``BODY[] NIL``, or no body item): that UID goes into ``refused`` as well, unless
        an EXPUNGE or VANISHED before the command's end says the message is gone.  A UID the answer
        does not name at all is not in ``refused``: whether the server still has it is the caller's
        to ask (``uids_present``).

        Only a NO the server does not mark temporary is narrowed down (``FetchRefused.of_the_messages``);
        any other refusal ends the fetch with ``FetchRefused``.  The server refusing
        ``SERVER_WIDE_REFUSALS`` UIDs one by one before it has served any ends it with
        ``ImapCommandFailed``: that is no fault of the messages, and narrowing on would cost two
        commands a message."""
        # Work in UID order: each entry is (UIDs, chunk), a narrowing going before the rest.
        work: deque[tuple[list[int], int]] = deque([(sorted(set(uids)), chunk)])
        served_any = False
        refused_alone = 0   # UIDs refused one by one (while none was served)
        while work:
            pending, size = work.popleft()
            try:
                async with aclosing(self._fetch(pending, size, self._whole_items(), refused)) as fetched:
                    async for messages in fetched:
                        served_any = served_any or bool(messages)
                        yield messages
            except FetchRefused as exc:
                if not exc.of_the_messages:
                    raise
                rest = [u for u in pending if u > exc.uids[-1]]
                if rest:
                    work.appendleft((rest, size))
                if len(exc.uids) == 1 and exc.unserved:
                    refused[exc.uids[0]] = exc.message
                    refused_alone += 1
                    if not served_any and refused_alone >= SERVER_WIDE_REFUSALS:
                        raise ImapCommandFailed(f"The IMAP server {self._host} refused each of the first "
                                                f"{refused_alone} messages asked for and served none (the last "
                                                f"refusal: {exc.message.rstrip('.')}).") from None
                elif exc.unserved:
                    # Each narrower command asks for at most half: single UIDs are reached.
                    work.appendleft((exc.unserved, (len(exc.unserved) + 1) // 2))

    async def _fetch(self, uids: Sequence[int], chunk: int, items: bytes,
                     without_content: dict[int, str] | None = None) -> AsyncIterator[list[FetchedMessage]]:
        """The messages of ``uids`` in lists, as ``_fetch_responses`` reads them; a refused command
        raises ``FetchRefused`` naming what it asked for and what it served before refusing.  UIDs a
        command that ended OK answered without their content go into ``without_content`` (UID ->
        reason), when given."""
        requested = set(uids)
        ordered = sorted(requested)
        if not ordered:
            return
        chunks = deque(ordered[i:i + chunk] for i in range(0, len(ordered), chunk))
        await self._acquire()
        in_flight: deque[bytes] = deque()
        asked: deque[list[int]] = deque()   # the UIDs of each command in flight

        def send_next() -> None:
            asked.append(chunks.popleft())
            in_flight.append(self._send_simple(b"UID FETCH " + sequence_set(asked[-1]) + b" (" + items + b")"))

        try:
            # Two commands in flight: the server starts the next chunk while we parse this one.
            for _ in range(min(2, len(chunks))):
                send_next()
            await self._conn.drain()
            while in_flight:
                # This command's UIDs, for a refusal's account: the UIDs only, since the messages
                # themselves must be free to go once stored (a chunk of large mail is gigabytes).
                served: set[int] = set()
                missing: dict[int, tuple[int, str]] = {}   # filled only by unusual answers (rare)
                try:
                    async for messages in self._fetch_responses(in_flight[0], missing):
                        stray = [m.uid for m in messages if m.uid not in requested]
                        if stray:
                            # A message no command asked for (a broken server): taken, its UID would
                            # move the folder's state past mail never fetched.  (Not by command: a
                            # server may answer pipelined commands' FETCHes interleaved.)
                            log.warning("the IMAP server %s answered UID FETCH with messages it was not asked "
                                        "for (UIDs %s): left out", self._host, stray[:10])
                            messages = [m for m in messages if m.uid in requested]
                        served.update([m.uid for m in messages])
                        if messages:
                            yield messages
                except FetchRefused as exc:
                    in_flight.popleft()   # its tagged answer is read: nothing of it is left to drain
                    raise FetchRefused(exc.message, asked[0], served, status=exc.status) from None
                in_flight.popleft()
                done = asked.popleft()
                if missing and without_content is not None:
                    self._note_without_content(done, missing, served, without_content)
                if chunks:
                    send_next()
                    await self._conn.drain()
        finally:
            try:
                if in_flight and self._broken is None:
                    await self._drain_tags(in_flight)
            except BaseException:
                self._broken = "a fetch was abandoned while its responses were still arriving"
                raise
            finally:
                self._lock.release()

    def _note_without_content(self, asked: Sequence[int], missing: dict[int, tuple[int, str]],
                              served: set[int], sink: dict[int, str]) -> None:
        """After a UID FETCH ended OK: the UIDs it asked for that the server answered, never with
        their content, and did not report expunged (``missing``) go into ``sink`` (UID -> reason).
        A response naming a UID the command did not ask for is an unsolicited flag update, and a
        UID served in another response of the command (a server may split a message's items) was
        served."""
        wanted = set(asked)
        for uid, (_, what) in missing.items():
            if uid in wanted and uid not in served:
                sink[uid] = f"The IMAP server {self._host} answered UID FETCH without the message's content ({what})."

    async def _fetch_responses(self, tag: bytes,
                               missing: dict[int, tuple[int, str]]) -> AsyncIterator[list[FetchedMessage]]:
        """Yield the messages of one UID FETCH, in lists, until its tagged response; raise on NO/BAD.
        FETCH responses naming a UID without its content are recorded in ``missing`` (UID ->
        (sequence number, what came instead)), less those an EXPUNGE or VANISHED then says are gone.

        Lists: the usual responses are read straight from the receive buffer, all those a read
        brought at once (~35 of 7 KB), and one async-generator step per message less counts."""
        conn = self._conn
        read_response = self._read_response
        uidless_logged = False
        while True:
            messages, incomplete = self._take_usual_fetches()
            if messages:
                yield messages
            if incomplete:
                await conn.fill()
                continue
            # Anything else (another order, NIL, escapes, a flag update, the tagged end): the general reader.
            text, literals = await read_response()
            if text[:2] == b"* ":
                answer = _fetched_message(text, literals)
                if type(answer) is FetchedMessage:
                    yield [answer]
                    continue
                if answer is not None:
                    missing[answer.uid] = (answer.number, answer.what)
                elif literals and text[2:].split(b" ", 2)[1:2] in ([b"FETCH"], [b"fetch"]):
                    # A message's content without its UID (RFC 3501 6.4.8 says a UID FETCH answer
                    # carries it): nothing to store it by.  Left out, its UID is one the answer does
                    # not name, which the caller asks the server about.
                    if not uidless_logged:
                        uidless_logged = True
                        log.warning("the IMAP server %s answered UID FETCH with a message without its UID: "
                                    "left out", self._host)
                elif missing:
                    _forget_expunged(text, missing)
            if text[:1] == b"*" or text[:1] == b"+":
                self._note_untagged(text, literals, None)
                continue
            status = self._tagged_status(text, tag)
            if status is None:
                continue
            if status != "OK":
                raise FetchRefused(f"The IMAP server {self._host} refused UID FETCH: {_text(text[len(tag) + 4:])}.",
                                   (), status=status)
            return

    def _take_usual_fetches(self) -> tuple[list[FetchedMessage], bool]:
        """Consume the complete usual FETCH responses (``_USUAL_FETCH``) at the head of the receive
        buffer and return their messages, and whether the next response has not fully arrived and
        may be usual too (read more, then look again).  Anything else is left for the general reader.

        ~4.7 us of CPU per 7 KB message against ~12.5 us through line splitting, literal reads and
        tokenising (500 responses read from memory; FETCH reading was a third of ingest's CPU)."""
        buf, pos = self._conn.unread()
        size = len(buf)
        messages: list[FetchedMessage] = []
        match = _USUAL_FETCH.match
        dates, flag_sets = self._dates, self._flag_sets
        with memoryview(buf) as view:
            while True:
                head = match(buf, pos)
                if head is None:
                    # A head cut off by the end of a read: wait for the rest.  Only a short unfinished
                    # line can be one; anything longer is read by the general reader.
                    incomplete = size - pos < 1024 and buf.find(b"\r\n", pos) < 0
                    break
                start = head.end()
                end = start + int(head.group(5))
                if end + 3 > size:
                    incomplete = True
                    break
                if not buf.startswith(b")\r\n", end):
                    incomplete = False      # items after the literal: not the usual shape
                    break
                uid, flags, date, modseq = head.group(1, 2, 3, 4)
                internaldate = dates.get(date, _UNSEEN)
                if internaldate is _UNSEEN:
                    if len(dates) >= 1024:
                        dates.clear()
                    internaldate = dates[date] = parse_internaldate(date)
                flag_set = flag_sets.get(flags)
                if flag_set is None:
                    if len(flag_sets) >= 1024:
                        flag_sets.clear()
                    flag_set = flag_sets[flags] = tuple(flags.decode("ascii").split())
                messages.append(FetchedMessage(int(uid), view[start:end].tobytes(), internaldate, flag_set,
                                               int(modseq) if modseq is not None else None))
                pos = end + 3
        self._conn.consume_to(pos)
        return messages, incomplete

    async def _drain_tags(self, tags: deque[bytes]) -> None:
        while tags:
            tag = tags.popleft()
            while True:
                text, literals = await self._read_response()
                if text[:1] in (b"*", b"+"):
                    if not (literals and text[:2] == b"* "):
                        self._note_untagged(text, literals, None)
                    continue
                if self._tagged_status(text, tag) is not None:
                    break

    # ---- changing messages -----------------------------------------------------------------------

    async def add_flags(self, uids: Sequence[int], flags: Sequence[str]) -> None:
        """Add ``flags`` to messages (UID STORE +FLAGS.SILENT)."""
        await self._store_flags(uids, b"+", flags)

    async def remove_flags(self, uids: Sequence[int], flags: Sequence[str]) -> None:
        """Take ``flags`` off messages (UID STORE -FLAGS.SILENT)."""
        await self._store_flags(uids, b"-", flags)

    async def _store_flags(self, uids: Sequence[int], sign: bytes, flags: Sequence[str]) -> None:
        ordered = sorted(set(uids))
        if not ordered:
            return
        flag_list = " ".join(flags).encode("ascii")
        await self._simple(b"UID STORE " + sequence_set(ordered) + b" " + sign + b"FLAGS.SILENT (" + flag_list + b")",
                           what="UID STORE")

    async def mark_deleted(self, uids: Sequence[int]) -> None:
        await self.add_flags(uids, ("\\Deleted",))

    async def expunge(self, uids: Sequence[int]) -> None:
        """Remove the deleted messages ``uids`` (flagged \\Deleted), and only those.

        With UIDPLUS that is UID EXPUNGE.  Without it, plain EXPUNGE (the only form RFC 3501 has)
        removes every message flagged \\Deleted in the folder, another client's too (a user who
        flagged mail to purge it later, or to undo): their flag is taken off for the EXPUNGE and put
        back after it (also when the EXPUNGE is refused), UID EXPUNGE's effect with the base protocol's
        commands (RFC 4315 1).  A session lost in between leaves their messages unflagged, never
        removed."""
        ordered = sorted(set(uids))
        if not ordered:
            return
        if "UIDPLUS" in self.capabilities:
            await self._simple(b"UID EXPUNGE " + sequence_set(ordered), what="UID EXPUNGE")
            return
        reply = await self._simple(b"UID SEARCH DELETED", what="UID SEARCH")
        others = sorted(set(_search_results(reply)) - set(ordered))
        await self.remove_flags(others, ("\\Deleted",))
        try:
            await self._simple(b"EXPUNGE", what="EXPUNGE")
        finally:
            # Refused too (no expunge right, a quota): the other client's flags are put back.
            if others and not self._broken:
                await self.add_flags(others, ("\\Deleted",))

    async def move(self, uids: Sequence[int], folder: str) -> bool:
        """Move messages of the selected folder to ``folder``, creating it when the server says it
        does not exist yet (``[TRYCREATE]``, RFC 3501 6.4.7): UID MOVE (RFC 6851) where offered, and
        False.  Without MOVE: UID COPY, and True: the caller, once it has recorded the copy, removes
        the originals (``remove``), so a failure between the two never copies them twice."""
        ordered = sorted(set(uids))
        if not ordered:
            return False
        verb = b"UID MOVE" if "MOVE" in self.capabilities else b"UID COPY"
        parts: list[bytes | _Literal] = [verb, sequence_set(ordered), _astring(encode_mailbox_name(folder))]
        reply = await self._command(parts)
        if reply.status != "OK" and b"[TRYCREATE]" in reply.text.upper():
            created = await self._command([b"CREATE", _astring(encode_mailbox_name(folder))])
            if created.status != "OK" and b"[ALREADYEXISTS]" not in created.text.upper():
                raise ImapCommandFailed(f"The IMAP server {self._host} refused to create the folder {folder!r}: "
                                        f"{_text(created.text)}.")
            reply = await self._command(parts)
        if reply.status != "OK":
            raise ImapCommandFailed(f"The IMAP server {self._host} refused {verb.decode()} to {folder!r}: {_text(reply.text)}.")
        return verb == b"UID COPY"

    async def remove(self, uids: Sequence[int]) -> None:
        """\\Deleted, then the expunge of just those messages (``expunge``)."""
        await self.mark_deleted(uids)
        await self.expunge(uids)

    # ---- waiting for changes -------------------------------------------------------------------------

    async def idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a change in the selected folder (IDLE, or NOOP polling when the
        server lacks IDLE).  True as soon as EXISTS/RECENT/FETCH/EXPUNGE (VANISHED once QRESYNC is
        enabled: RFC 7162 3.2.10) arrives, False on timeout, or when the server ends the IDLE itself
        (its tagged reply: the caller looks at the folder, then idles again; re-issued here, IDLE
        would run hot against a server that ends it at once).
        Leaves IDLE with DONE every time, and re-issues it before 29 minutes (RFC 2177)."""
        if self._changed:       # reported while another command ran: do not wait for the next one
            self._changed = False
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if "IDLE" not in self.capabilities:
            return await self.noop()
        while True:
            period_end = min(deadline, loop.time() + IDLE_RESTART_SECONDS)
            woke, ended_by_server = await self._idle_once(period_end)
            if woke:
                self._changed = False
                return True
            if ended_by_server or loop.time() >= deadline:
                return False

    async def _idle_once(self, period_end: float) -> tuple[bool, bool]:
        """One IDLE until ``period_end``: (whether a change came, whether the server ended it)."""
        loop = asyncio.get_running_loop()
        await self._acquire()
        try:
            tag = self._send_simple(b"IDLE")
            await self._conn.drain()
            while True:          # until the server's "+ idling"
                text, literals = await self._read_response()
                if text[:1] == b"+":
                    break
                if text[:1] == b"*":
                    self._note_untagged(text, literals, None)
                    continue
                status = self._tagged_status(text, tag)
                if status is not None:
                    raise ImapCommandFailed(f"The IMAP server {self._host} refused IDLE: {_text(text)}.")
            self.idling = True
            woke = self._changed
            while not woke:
                remaining = period_end - loop.time()
                if remaining <= 0:
                    break
                try:
                    text, literals = await self._read_response(first_timeout=remaining)
                except ProtocolTimeout:
                    if self._conn.buffered():
                        raise
                    break
                if text[:1] not in (b"*", b"+"):
                    status = self._tagged_status(text, tag)
                    if status is None:
                        continue
                    # The server ended the IDLE itself (its own time limit): no DONE, which it would
                    # take for a command.  The caller looks at the folder and idles again.
                    self.idling = False
                    if status != "OK":
                        raise ImapCommandFailed(f"The IMAP server {self._host} ended IDLE with {status}: "
                                                f"{_text(text[len(tag) + len(status) + 2:])}.")
                    return woke or self._changed, True
                self._note_untagged(text, literals, None)
                woke = self._changed
            self.idling = False
            self._conn.write(b"DONE\r\n")
            await self._conn.drain()
            reply = await self._collect(tag, None)
            if reply.status != "OK":
                raise ImapCommandFailed(
                    f"The IMAP server {self._host} ended IDLE with {reply.status}: {_text(reply.text)}.")
            return woke or self._changed, False
        except BaseException:
            self.idling = False
            self._broken = self._broken or "an IDLE was interrupted"
            raise
        finally:
            self._lock.release()

    async def noop(self) -> bool:
        """NOOP; True when the server reported a change in the selected folder."""
        await self._simple(b"NOOP", what="NOOP")
        changed, self._changed = self._changed, False
        return changed

    async def logout(self) -> None:
        """LOGOUT and close the connection."""
        self._logging_out = True
        try:
            await self._simple(b"LOGOUT", what="LOGOUT")
        except ConnectionFailed:
            pass        # the server may close right after its BYE, before the tagged OK
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the connection without LOGOUT; never raises."""
        self._broken = self._broken or "the connection was closed"
        await self._conn.close()

    # ---- command machinery -------------------------------------------------------------------------

    async def _acquire(self) -> None:
        if self._broken is not None:
            raise ConnectionFailed(f"The IMAP connection to {self._host} is unusable: {self._broken}.")
        try:
            async with asyncio.timeout(self._timeout):
                await self._lock.acquire()
        except TimeoutError:
            raise RuntimeError("An IMAP command was issued while a fetch() or idle() on the same client "
                               "was still open; close it first (contextlib.aclosing).") from None
        if self._broken is not None:
            self._lock.release()
            raise ConnectionFailed(f"The IMAP connection to {self._host} is unusable: {self._broken}.")

    def _next_tag(self) -> bytes:
        self._tag_number += 1
        return b"C%d" % self._tag_number

    def _send_simple(self, command: bytes) -> bytes:
        """Queue a command without literals; returns its tag (the caller drains)."""
        tag = self._next_tag()
        self._conn.write(tag + b" " + command + b"\r\n")
        return tag

    async def _simple(self, command: bytes, *, what: str) -> _Reply:
        """Run a command without literals and raise ``ImapCommandFailed`` unless it ends OK."""
        reply = await self._command([command])
        if reply.status != "OK" and not (what == "LOGOUT" and self._broken):
            raise ImapCommandFailed(f"The IMAP server {self._host} refused {what}: {_text(reply.text)}.")
        return reply

    async def _command(self, parts: list[bytes | _Literal], *, sasl_response: bytes | None = None) -> _Reply:
        """Send a command made of ``parts`` (joined by spaces) and collect its reply.

        Literals go non-synchronising with LITERAL+, else wait for the server's continuation.
        ``sasl_response`` answers the first continuation of an AUTHENTICATE exchange.
        """
        await self._acquire()
        try:
            tag = self._next_tag()
            line = bytearray(tag)
            literal_plus = "LITERAL+" in self.capabilities
            for part in parts:
                line += b" "
                if isinstance(part, bytes):
                    line += part
                    continue
                if literal_plus:
                    line += b"{%d+}\r\n" % len(part.data) + part.data
                    continue
                line += b"{%d}\r\n" % len(part.data)
                self._conn.write(bytes(line))
                await self._conn.drain()
                early = await self._wait_continuation(tag)
                if early is not None:
                    return early
                line = bytearray(part.data)
            self._conn.write(bytes(line) + b"\r\n")
            await self._conn.drain()
            return await self._collect(tag, sasl_response)
        except BaseException:
            # Only I/O failures and cancellation get here: the stream is out of step for good.
            self._broken = self._broken or "the connection failed during a command"
            raise
        finally:
            self._lock.release()

    async def _wait_continuation(self, tag: bytes) -> _Reply | None:
        """Wait for "+" before sending a literal; a tagged reply instead ends the command early."""
        untagged: list[tuple[bytes, list[bytes]]] = []
        while True:
            text, literals = await self._read_response()
            if text[:1] == b"+":
                return None
            if text[:1] == b"*":
                self._note_untagged(text, literals, untagged)
                continue
            status = self._tagged_status(text, tag)
            if status is not None:
                return _Reply(status, text[len(tag) + len(status) + 2:], untagged)

    async def _collect(self, tag: bytes, sasl_response: bytes | None) -> _Reply:
        """Read responses until the tagged one for ``tag``."""
        untagged: list[tuple[bytes, list[bytes]]] = []
        while True:
            text, literals = await self._read_response()
            if text[:1] == b"*":
                self._note_untagged(text, literals, untagged)
                continue
            if text[:1] == b"+":
                # An AUTHENTICATE challenge: the first gets our response, any later one (XOAUTH2's
                # error details) an empty line so the server can finish with NO.
                self._conn.write((sasl_response or b"") + b"\r\n")
                sasl_response = None
                await self._conn.drain()
                continue
            status = self._tagged_status(text, tag)
            if status is not None:
                return _Reply(status, text[len(tag) + len(status) + 2:], untagged)

    def _tagged_status(self, text: bytes, tag: bytes) -> str | None:
        """The status (OK/NO/BAD) if ``text`` is the tagged response for ``tag``, else None."""
        if text[:len(tag) + 1] != tag + b" ":
            log.warning("imap_unexpected_line", extra={"host": self._host, "line_start": text[:40]})
            return None
        status = text[len(tag) + 1:len(tag) + 4].upper().rstrip()
        return status.decode("ascii", "replace") if status in (b"OK", b"NO", b"BAD") else "BAD"

    def _note_untagged(self, text: bytes, literals: list[bytes], sink: list | None) -> None:
        """Record an untagged response: BYE ends the session, changes wake IDLE, the rest go to ``sink``."""
        if sink is not None:
            sink.append((text, literals))
        words = text.split(b" ", 3)
        if len(words) > 2 and words[1].isdigit():
            kind = words[2].upper()                 # "* 5 EXISTS"
        else:
            kind = words[1].upper() if len(words) > 1 else b""
        if kind in _CHANGE_KINDS:
            self._changed = True
        elif kind == b"BYE":
            self._broken = "the server ended the session"
            if not self._logging_out:
                raise ConnectionFailed(f"The IMAP server {self._host} ended the session: {_text(text[6:])}.")
        elif kind == b"CAPABILITY" and len(words) > 2:
            self.capabilities = frozenset(text[13:].decode("ascii", "replace").upper().split())
        elif kind in (b"OK", b"NO", b"BAD") and words[2:3] and words[2][:7].upper() == b"[ALERT]":
            # RFC 3501 7.1: an alert must be presented to the user; logged once a session (a server
            # may repeat it with every command).  The server's words, never ours.
            if not self._alerted:
                self._alerted = True
                log.warning("the IMAP server %s alerts: %s", self._host, _text(text.split(b" ", 2)[2]))

    async def _read_response(self, first_timeout: float | None = None) -> tuple[bytes, list[bytes]]:
        """Read one response: its text with ``{n}`` markers, and the literals' bytes."""
        conn = self._conn
        line = await conn.read_line(first_timeout)
        if line[-1:] != b"}":
            return line, []
        parts = [line]
        literals: list[bytes] = []
        while True:
            match = _LITERAL_AT_END.search(line)
            if match is None:
                break
            literals.append(await conn.read_exact(int(match.group(1))))
            line = await conn.read_line()
            parts.append(line)
        return b"".join(parts), literals


async def _one_by_one(lists: AsyncIterator[list[FetchedMessage]]) -> AsyncIterator[FetchedMessage]:
    async with aclosing(lists):
        async for messages in lists:
            for message in messages:
                yield message


def _response_kind(text: bytes) -> bytes:
    """What an untagged response is, upper-case: ``b"EXPUNGE"`` for "* 5 EXPUNGE", ``b"OK"`` for "* OK ..."."""
    words = text.split(b" ", 3)
    if len(words) > 2 and words[1].isdigit():
        return words[2].upper()
    return words[1].upper() if len(words) > 1 else b""


def _text(raw: bytes) -> str:
    """Server text for an error message: decoded, one line, bounded, without its final period (the
    message ends with its own)."""
    return raw.decode("utf-8", "replace").strip()[:200].rstrip(".") or "no reason given"


def _search_results(reply: _Reply) -> list[int]:
    """The UIDs a SEARCH answered; a number no UID can be (0, or past 32 bits) is left out: such a
    message could never be fetched by its UID, nor stored (the state would stop at it for ever)."""
    uids: list[int] = []
    for text, _ in reply.untagged:
        if text[2:8].upper() == b"SEARCH":
            for word in text[9:].split():
                if not word.isdigit():
                    break           # "(MODSEQ n)" trails the numbers with CONDSTORE
                uid = int(word)
                if 0 < uid <= MAX_UID:
                    uids.append(uid)
    return uids


def _fetch_items(text: bytes, literals: list[bytes]) -> dict:
    """The FETCH data items of ``* n FETCH (...)`` as a dict keyed by upper-case item name."""
    start = text.find(b"(")
    tokens = parse_tokens(text[start:], literals)
    if not tokens or not isinstance(tokens[0], list):
        return {}
    items = tokens[0]
    return {str(items[i]).upper(): items[i + 1] for i in range(0, len(items) - 1, 2)}


# The usual FETCH response to this client's UID FETCH, whole, in the order Dovecot sends the items
# (UID FLAGS INTERNALDATE [MODSEQ] BODY[]): matched where it starts in the receive buffer, its
# literal then sliced out and ")\r\n" checked after it.  Flags are atoms of plain ASCII (no quotes,
# brackets or braces), the date a quoted string without escapes; anything else, and every other
# order, goes to the general reader.  Groups: uid, flags, date, modseq, literal size.
_USUAL_FETCH = re.compile(
    rb'\* \d+ FETCH \(UID (\d+) FLAGS \(([!#-\'*-Z\\^-z|~ ]*)\) INTERNALDATE "([^"\\\r\n]*)" '
    rb'(?:MODSEQ \((\d+)\) )?BODY\[(?:HEADER)?\] \{(\d+)\}\r\n')
_UNSEEN = object()

# The usual shape of a FETCH response to our own command, read without the general tokeniser:
# "* n FETCH (" then items this client asks for, each with a plain value: a number, a
# parenthesised list of flags or of one number, a quoted string without escapes, or a literal.
_FETCH_START = re.compile(rb"\* (\d+) FETCH \(")
_FETCH_ITEM = re.compile(
    rb' ?(UID|FLAGS|INTERNALDATE|MODSEQ|BODY\[\]|BODY\[HEADER\]) (?:(\d+)|\(([^()"{}\[\]]*)\)|"([^"\\]*)"|(\{\d+\}))')
_UNUSUAL = object()
# What a FETCH response naming a UID had instead of the content, when it had no body item at all.
_NO_BODY = "no BODY[] in its FETCH response"


def _fetched_message_fast(text: bytes, literals: list[bytes]) -> FetchedMessage | _WithoutContent | None | object:
    """``_fetched_message`` for the usual shape (~1.8x cheaper; reading FETCH responses was a fifth
    of ingest's CPU); ``_UNUSUAL`` for anything else, which the general parser then reads."""
    start = _FETCH_START.match(text)
    end = len(text) - 1
    if start is None or text[end:] != b")":
        return _UNUSUAL
    pos = start.end()
    uid = raw = internaldate = modseq = None
    flags: tuple[str, ...] = ()
    used = 0
    match_item = _FETCH_ITEM.match
    while pos < end:
        item = match_item(text, pos, end)
        if item is None:
            return _UNUSUAL
        name, number, listed, quoted, literal = item.groups()
        if name == b"UID" and number is not None:
            uid = int(number)
        elif name == b"FLAGS" and listed is not None:
            flags = tuple(listed.decode("ascii", "replace").split())
        elif name == b"INTERNALDATE" and quoted is not None:
            internaldate = parse_internaldate(quoted)
        elif name == b"MODSEQ" and listed is not None and listed.isdigit():
            modseq = int(listed)
        elif name[:4] == b"BODY" and literal is not None and used < len(literals):
            if raw is None or name == b"BODY[]":   # BODY[] wins over BODY[HEADER], as below
                raw = literals[used]
            used += 1
        else:
            return _UNUSUAL
        pos = item.end()
    if used != len(literals):
        return _UNUSUAL
    if uid is None:
        return None
    if raw is None:
        return _WithoutContent(int(start.group(1)), uid, _NO_BODY)
    return FetchedMessage(uid=uid, raw=raw, internaldate=internaldate, flags=flags, modseq=modseq)


def _fetched_message(text: bytes, literals: list[bytes]) -> FetchedMessage | _WithoutContent | None:
    """Turn one untagged response into a FetchedMessage; a ``_WithoutContent`` for a FETCH response
    that names a UID without the message's content (NIL, or no body item: a flag update, say); None
    for anything else."""
    fast = _fetched_message_fast(text, literals)
    if fast is not _UNUSUAL:
        return fast  # type: ignore[return-value]
    return _fetched_message_general(text, literals)


def _fetched_message_general(text: bytes, literals: list[bytes]) -> FetchedMessage | _WithoutContent | None:
    """``_fetched_message`` through the general tokeniser: any order, NIL, escapes, lower case."""
    words = text.split(b" ", 3)
    if words[2:3] not in ([b"FETCH"], [b"fetch"]) or not words[1].isdigit():
        return None
    items = _fetch_items(text, literals)
    uid = items.get("UID")
    if not (isinstance(uid, str) and uid.isdigit()):
        return None
    name = "BODY[]"
    raw = items.get(name)
    if raw is None:
        name = "BODY[HEADER]"
        raw = items.get(name)
    if not isinstance(raw, bytes):
        # NIL is no message, not an empty one: stored and published, it would be a junk activity
        # (and every such message would share one generated key).
        what = _NO_BODY if raw is None else f"{name} {raw[:40] if isinstance(raw, str) else 'unreadable'}"
        return _WithoutContent(int(words[1]), int(uid), what)
    date = items.get("INTERNALDATE")
    modseq = items.get("MODSEQ")
    return FetchedMessage(
        uid=int(uid),
        raw=raw,
        internaldate=parse_internaldate(date) if isinstance(date, bytes) else None,
        flags=tuple(items.get("FLAGS") or ()),
        modseq=int(modseq[0]) if isinstance(modseq, list) and modseq else None,
    )


def _forget_expunged(text: bytes, missing: dict[int, tuple[int, str]]) -> None:
    """Drop from ``missing`` (UID -> (sequence number, what came)) the messages an ``EXPUNGE`` or
    ``VANISHED`` response says are gone, and renumber the others as an EXPUNGE does (RFC 3501
    7.4.1).  Dovecot answers ``BODY[] NIL`` for a message expunged after our SEARCH, then reports
    the expunge before the command's end: that message is gone, not refused."""
    words = text.split(b" ", 3)
    if len(words) == 3 and words[1].isdigit() and words[2].upper() == b"EXPUNGE":
        gone = int(words[1])
        for uid, (number, what) in list(missing.items()):
            if number == gone:
                del missing[uid]
            elif number > gone:
                missing[uid] = (number - 1, what)
    elif len(words) > 2 and words[1].upper() == b"VANISHED":
        uid_set = text[11:]
        if uid_set[:10].upper() == b"(EARLIER) ":
            uid_set = uid_set[10:]
        for first, last in parse_uid_set(uid_set):
            for uid in [u for u in missing if first <= u <= last]:
                del missing[uid]
