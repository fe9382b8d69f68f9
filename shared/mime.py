"""The identity of a message, the same for ingest and evaluate, and who forwarded it.

One email activity per Message-ID per organization: both ingest (to skip a message moved between
tracked folders) and evaluate (to deduplicate) key on the Message-ID header, normalised, or on a
hash of what every copy of the message shares when it has none.  Reading only the header block
keeps this cheap.
"""
from __future__ import annotations

import hashlib
import re

from shared.addresses import address_pairs

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_HEADER_END = re.compile(rb"\r?\n\r?\n")   # where the header block ends; _header_end finds it
# The value of the field whose line starts where it is matched (names hold no colon).
_FIELD_VALUE = re.compile(rb"[^:]*:[ \t]*(.*(?:\r?\n[ \t].*)*)")
# In UTF-8 bytes, not characters: the id is a key of PostgreSQL btree indexes (ingested_message,
# email_activity, email_decision), which refuse an entry over 2,704 bytes, and an id of 995
# characters outside ASCII is up to four times that.  A longer id counts as missing.
MAX_ID_LENGTH = 995
# The usual Message-ID value, "<id@host>" and the CR of its line: printable ASCII without space or
# angle brackets inside.  ``normalize_message_id`` leaves such an id as it is (no folding, one pair
# of brackets, nothing to strip or refuse), so it is taken without decoding the value first.
_PLAIN_ID = re.compile(rb"<([\x21-\x3b\x3d\x3f-\x7e]{1,%d})>\r?" % MAX_ID_LENGTH)
HEADER_LIMIT = 256 * 1024


def header_block(raw: bytes, limit: int = HEADER_LIMIT) -> bytes:
    return raw[: _header_end(raw, limit)]


def _header_end(raw: bytes, limit: int) -> int:
    """Where the header block ends: the start of the first ``_HEADER_END`` match in ``raw[:limit]``,
    or ``limit``.

    Found with ``bytes.find`` rather than the regular expression, which has no literal to skip
    ahead to and steps through every byte (~2 us of a 10 us ``message_key``).  The earliest match
    begins at the first LF followed by LF or CRLF, one byte earlier if a CR precedes that LF.
    """
    at = raw.find(b"\n\r\n", 0, limit)
    lf = raw.find(b"\n\n", 0, limit if at < 0 else at + 1)
    if lf >= 0:
        at = lf
    if at < 0:
        return limit
    return at - 1 if at and raw[at - 1] == 0x0D else at


def _field_start(raw: bytes, end: int, name: bytes) -> int:
    """Offset of the first line of ``raw[:end]`` that starts with ``name`` (lower-case, ASCII case
    ignored, as the field patterns' ``^`` with IGNORECASE and MULTILINE), or -1."""
    return _find_field(raw[:end].lower(), name)


def _find_field(head: bytes, name: bytes) -> int:
    """``_field_start`` in a header block already lower-cased."""
    if head.startswith(name):
        return 0
    at = head.find(b"\n" + name)
    return at + 1 if at >= 0 else -1


def normalize_message_id(value: str) -> str | None:
    """`<Abc@Host>` -> `Abc@Host`: angle brackets and folding removed, case kept (it matters)."""
    value = " ".join(value.split())
    match = re.search(r"<([^<>]+)>", value)
    value = (match.group(1) if match else value).strip()
    if not value or len(value) > MAX_ID_LENGTH or any(c in value for c in "\r\n\x00 "):
        return None
    if not value.isascii() and len(value.encode("utf-8", "surrogatepass")) > MAX_ID_LENGTH:
        return None
    return value


# The fields that say what a message is rather than where it went.  The copies of one message in
# several mailboxes differ in their trace fields (Received, Delivered-To, Return-Path,
# X-Original-To), so a hash of the whole bytes would make each copy an activity of its own.
_IDENTITY_FIELDS = (b"from", b"to", b"cc", b"date", b"subject")
# Starts with a literal newline so the engine skips from line to line; continuation lines belong
# to the value.  Matched in ``b"\n" + head.lower()``, so a match's offsets are one past the head's.
_IDENTITY_FIELD = re.compile(rb"\n(from|to|cc|date|subject)[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)")


def generated_message_id(raw: bytes) -> str:
    """A stable identity for a message without a usable Message-ID, the same for every copy of it.

    The hash covers From, To, Cc, Date and Subject (whitespace and folding collapsed) and the body
    without CRs.  Never raises: anything but bytes hashes as an empty message.
    """
    if not isinstance(raw, bytes):
        raw = bytes(raw) if isinstance(raw, (bytearray, memoryview)) else b""
    end = _header_end(raw, HEADER_LIMIT)
    head = raw[:end]
    found: dict[bytes, list[bytes]] = {name: [] for name in _IDENTITY_FIELDS}
    for match in _IDENTITY_FIELD.finditer(b"\n" + head.lower()):
        start, stop = match.span(2)
        found[match.group(1)].append(b" ".join(head[start - 1 : stop - 1].split()))
    digest = hashlib.sha256()
    for name, values in found.items():
        for value in values:
            digest.update(name + b":" + value + b"\n")
    digest.update(b"\n")
    # Without CRs, so a copy stored with LF line ends hashes alike (translate: a third of the
    # time of replacing CRLF).
    digest.update(raw[end:].translate(None, b"\r").lstrip(b"\n"))
    return f"conduit-{digest.hexdigest()[:32]}@generated.invalid"


def message_key(raw: bytes) -> str:
    """The message's identity: its normalised Message-ID, or ``generated_message_id``."""
    # The field's line is found with bytes.find and the pattern only matched there: the same
    # match as ``_MESSAGE_ID.search(header_block(raw))``, without the regular expression trying
    # every position of the header.
    end = _header_end(raw, HEADER_LIMIT)
    start = _field_start(raw, end, b"message-id:")
    if start >= 0:
        value = _MESSAGE_ID.match(raw, start, end).group(1)
        plain = _PLAIN_ID.fullmatch(value)
        if plain:
            return plain.group(1).decode("ascii")
        normalized = normalize_message_id(value.decode("utf-8", "replace"))
        if normalized:
            return normalized
    return generated_message_id(raw)


def from_address(raw: bytes) -> str | None:
    """The first address in the From header, lower-cased, or None."""
    end = _header_end(raw, HEADER_LIMIT)
    start = _field_start(raw, end, b"from:")
    return _first_address(raw, start, end) if start >= 0 else None


def forwarder_address(raw: bytes) -> str | None:
    """Who sent a message on to a forward mailbox, lower-cased, or None.

    A message forwarded (as an attachment or inline) is a new message from the user: its From.  A
    message redirected (RFC 5322 3.6.6, "bounce" or "redirect" in mail clients) keeps the author's
    From, and the user who redirected it is in the Resent-From (or Resent-Sender) of the topmost,
    newest, resent block.  With Resent-* fields but no address in them the forwarder is unknown:
    falling back to From would attribute the message to its author.
    """
    end = _header_end(raw, HEADER_LIMIT)
    head = raw[:end].lower()
    if b"resent-" in head:  # redirected mail is rare: forwarded mail pays for this one scan only
        start = _find_field(head, b"resent-from:")
        if start < 0:
            start = _find_field(head, b"resent-sender:")
        if start >= 0:
            return _first_address(raw, start, end)
    start = _find_field(head, b"from:")
    return _first_address(raw, start, end) if start >= 0 else None


def _first_address(raw: bytes, start: int, end: int) -> str | None:
    """The first address in the value of the field whose line starts at ``start``, lower-cased.

    Parsed as an address list (RFC 5322 3.4), not searched for something shaped like an address: a
    display name or a comment may hold one (``"ceo@example.com" <mallory@evil.example>``), and
    DMARC vouches only for the address itself."""
    value = _FIELD_VALUE.match(raw, start, end).group(1).decode("utf-8", "replace")
    # Unfolded (RFC 5322 2.2.3): every line break in a field's value precedes white space.
    try:
        pairs = address_pairs(value.replace("\r", "").replace("\n", ""))
    except Exception:  # noqa: BLE001 - the stdlib parser recurses on nested comments: no address here
        return None
    for _, address in pairs:
        if "@" in address:
            return address.strip().lower()
    return None
