"""Turn the raw bytes of one message into the facts evaluate decides on.

Evaluate sees every message that ingest pulls from every mailbox, so this parser is built for
throughput and for never failing:

- Only the header block is parsed (our own line splitter; no ``email.message.Message`` tree), and
  only the headers evaluate needs are kept.  The body is walked with ``bytes.find`` over MIME
  boundaries just far enough to say whether it carries attachments or a forwarded message and to
  cut a short plain-text preview out of its first text part.  That is ~20x cheaper than
  ``email.message_from_bytes(raw, policy=email.policy.default)``.
- ``parse_email`` never raises.  Whatever is wrong with the input (broken MIME, unknown charsets,
  NUL bytes, 8-bit header bytes, malformed addresses, RFC 2047 garbage, huge headers) is recorded
  as a stable code in ``ParsedEmail.defects`` and the best reading of the rest is returned.
- Every string handed out is safe for PostgreSQL ``text`` (no NUL, no lone surrogates).

Defect codes (stable; used in logs and ``conduit message why``):
``no_header_block``, ``header_block_truncated``, ``nul_bytes``, ``non_utf8_header``,
``malformed_header_line``, ``continuation_without_header``, ``duplicate_header:<name>``,
``missing_message_id``, ``message_id_without_brackets``, ``invalid_message_id``,
``missing_from``, ``invalid_address:<header>``, ``missing_date``, ``invalid_date``,
``invalid_encoded_word``, ``unknown_charset``, ``invalid_thread_index``,
``multipart_without_boundary``, ``mime_parts_truncated``, ``invalid_body_encoding``,
``internal_error:<ExceptionType>`` (a bug of ours, caught so the message still flows).
"""
from __future__ import annotations

import base64
import binascii
import codecs
import html
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import lru_cache
from urllib.parse import unquote

import idna

# One identity for ingest and evaluate: the same limit and the same id for a message without one.
from shared.addresses import address_pairs
from shared.mime import MAX_ID_LENGTH, generated_message_id

__all__ = [
    "Address",
    "ForwardedMessages",
    "ParsedEmail",
    "decode_header_value",
    "forwarded_message",
    "forwarded_messages",
    "generated_message_id",
    "normalize_email_address",
    "parse_email",
]

PREVIEW_CHARS = 500
# How much of a text part is decoded to build the preview: enough for 500 characters of prose
# even quoted-printable encoded, small enough that a 10 MB text body costs nothing.
_PREVIEW_SOURCE_BYTES = 4 * 1024
_HTML_SOURCE_BYTES = 32 * 1024
_MAX_MIME_PARTS = 64
_MAX_MIME_DEPTH = 8
_MAX_PART_HEADER_BYTES = 16 * 1024
# A thread can carry hundreds of References; the newest ones and the root are the useful correlation keys.
_MAX_REFERENCES = 50
THREAD_ROOT_BYTES = 22  # Outlook Thread-Index: 6 bytes FILETIME + 16 bytes conversation GUID

# Headers evaluate reads.  Everything else in the block is skipped while splitting.
_SINGLE = frozenset(
    {
        "message-id", "subject", "from", "sender", "date", "in-reply-to", "references",
        "thread-index", "thread-topic", "auto-submitted", "precedence", "list-id",
        "importance", "x-priority", "content-type", "content-transfer-encoding",
    }
)
_MULTI = frozenset({"to", "cc", "bcc", "reply-to"})
_WANTED = tuple(sorted(_SINGLE | _MULTI))
_PART_WANTED = ("content-type", "content-transfer-encoding", "content-disposition")
_NAMES = {name.encode("ascii"): name for name in _WANTED + _PART_WANTED}


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox of an address header: display name and normalised address.

    ``email`` is lower-cased with an ASCII (IDNA A-label) domain, so it compares equal to the
    registry's addresses normalised with ``normalize_email_address``.
    """

    name: str
    email: str


@dataclass(frozen=True, slots=True)
class ParsedEmail:
    """What evaluate knows about one message.  Built only by ``parse_email``."""

    message_id: str | None
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    subject: str
    from_: Address | None
    sender: Address | None
    reply_to: tuple[Address, ...]
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    bcc: tuple[Address, ...]
    date: datetime | None
    thread_index: str | None
    thread_root: str | None
    thread_topic: str | None
    auto_submitted: str | None
    precedence: str | None
    list_id: str | None
    importance: str | None
    content_type: str
    preview: str
    has_attachments: bool
    has_forwarded_message: bool
    size: int
    defects: tuple[str, ...]

    @property
    def participants(self) -> frozenset[str]:
        """Addresses of sender and visible recipients (smart matching compares these)."""
        found = {a.email for a in self.to}
        found.update(a.email for a in self.cc)
        if self.from_ is not None:
            found.add(self.from_.email)
        return frozenset(found)

    @property
    def all_addresses(self) -> tuple[Address, ...]:
        head = (self.from_,) if self.from_ is not None else ()
        sender = (self.sender,) if self.sender is not None else ()
        return head + sender + self.reply_to + self.to + self.cc + self.bcc

    @property
    def is_automated(self) -> bool:
        """Sent by a machine (RFC 3834 Auto-Submitted, or a bulk/junk/auto-reply Precedence)."""
        if self.auto_submitted is not None and self.auto_submitted != "no":
            return True
        return self.precedence in ("bulk", "junk", "auto_reply")


# --------------------------------------------------------------------------------------------
# Header block


def _find_header_end(raw: bytes, limit: int) -> tuple[int, int]:
    """(end of header block, start of body); ``(-1, -1)`` when no blank line within ``limit``."""
    if raw[:1] == b"\n":
        return 0, 1
    if raw[:2] == b"\r\n":
        return 0, 2
    # CRLF first, then LF only up to where CRLF was found: a CRLF message has no "\n\n" at all and
    # searching for it would scan the whole body.
    crlf = raw.find(b"\n\r\n", 0, limit)
    lf = raw.find(b"\n\n", 0, crlf + 2 if crlf >= 0 else limit)
    if lf < 0 and crlf < 0:
        return -1, -1
    if crlf < 0 or (0 <= lf < crlf):
        return lf + 1, lf + 2
    return crlf + 1, crlf + 3


def _decode_value(data: bytes, defects: list[str] | None) -> str:
    if b"\x00" in data:
        data = data.replace(b"\x00", b"")
        if defects is not None:
            defects.append("nul_bytes")
    try:
        return data.decode("utf-8")  # ASCII, and RFC 6532 UTF-8 headers
    except UnicodeDecodeError:
        # Legacy clients put raw 8-bit, mostly windows-1252, into headers.
        if defects is not None:
            defects.append("non_utf8_header")
        return data.decode("cp1252", "replace")


# A line that is neither a continuation, nor "name:", nor an mbox "From " line, nor blank.  The
# pattern starts with a literal newline so the regex engine can skip ahead with a fast search.
_MALFORMED_LINE = re.compile(rb"\n(?![ \t]|[^\s:]+[ \t]*:|from |\r?\n|\r?$)")


@lru_cache(maxsize=8)
def _header_pattern(wanted: tuple[str, ...]) -> re.Pattern[bytes]:
    # Starts with a literal newline, so the engine skips from line to line with a fast search and
    # tries the names only at line starts; continuation lines are part of the value.
    names = b"|".join(re.escape(n.encode("ascii")) for n in sorted(wanted, key=len, reverse=True))
    return re.compile(rb"\n(" + names + rb")[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)")


def _split_headers(
    head: bytes, wanted: tuple[str, ...], defects: list[str] | None
) -> dict[str, list[str]]:
    """Find the ``wanted`` headers (lower-case names) in a header block; unfold and decode them.

    Works on bytes with one regex pass over a lower-cased copy: the block is mostly trace and DKIM
    headers that evaluate never reads, and neither decoding nor splitting them is worth the time.
    """
    if b"\r" in head and b"\n" not in head:
        head = head.replace(b"\r", b"\n")  # classic Mac line ends
    low = b"\n" + head.lower()  # lower() only touches ASCII, so offsets stay aligned (+1)
    headers: dict[str, list[str]] = {}
    for match in _header_pattern(wanted).finditer(low):
        start, end = match.span(2)
        data = head[start - 1 : end - 1]
        if b"\n" in data:  # unfold: drop the line breaks, keep the folding whitespace
            data = data.replace(b"\r\n", b"").replace(b"\n", b"")
        name = _NAMES[match.group(1)]
        value = _decode_value(data.strip(), defects)
        found = headers.get(name)
        if found is None:
            headers[name] = [value]
        else:
            found.append(value)
    if defects is not None:
        if head[:1] in (b" ", b"\t"):
            defects.append("continuation_without_header")
        if _MALFORMED_LINE.search(low):
            defects.append("malformed_header_line")
    return headers


# --------------------------------------------------------------------------------------------
# RFC 2047 encoded words

_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([QqBb])\?([^?\s]*)\?=")
# Codecs that are "text encodings" to Python but are no charset a mailer may name: they can
# produce surrogates or execute escape sequences chosen by the sender.
_REFUSED_CODECS = frozenset(
    {"unicode_escape", "raw_unicode_escape", "punycode", "idna", "undefined", "mbcs", "oem"}
)
_CHARSET_ALIASES = {"unknown-8bit": "", "x-unknown": "", "ansi_x3.4-1968": "ascii", "us-ascii": "ascii"}


@lru_cache(maxsize=256)
def _codec_for(charset: str) -> str | None:
    charset = charset.strip().strip('"').lower()
    charset = _CHARSET_ALIASES.get(charset, charset)
    if not charset:
        return None
    try:
        info = codecs.lookup(charset)
    except (LookupError, ValueError):
        return None
    if info.name in _REFUSED_CODECS or not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def _decode_bytes(data: bytes, charset: str | None, defects: list[str] | None) -> str:
    codec = _codec_for(charset) if charset else None
    if codec is not None:
        try:
            return data.decode(codec, "replace")
        except Exception:  # noqa: BLE001, S110 - a codec's own bug must not stop the message
            pass
    elif charset and defects is not None:
        defects.append("unknown_charset")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def _safe_text(text: str) -> str:
    """No NUL, no line breaks, no lone surrogates: fit for a PostgreSQL text column."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    if "\r" in text or "\n" in text:
        text = text.replace("\r", " ").replace("\n", " ")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def decode_header_value(value: str, defects: list[str] | None = None) -> str:
    """Decode RFC 2047 encoded words in an unstructured header value; never raises.

    Adjacent words of one charset are joined before decoding, because mailers split multibyte
    characters across words; whitespace between two encoded words is dropped (RFC 2047, 6.2).
    """
    if "=?" not in value:
        return _safe_text(value)
    out: list[str] = []
    pending = bytearray()
    pending_charset: str | None = None
    pos = 0
    for match in _ENCODED_WORD.finditer(value):
        gap = value[pos : match.start()]
        pos = match.end()
        if pending_charset is not None and (not gap or gap.isspace()):
            gap = ""
        charset, kind, text = match.group(1).lower(), match.group(2), match.group(3)
        try:
            if kind in "Bb":
                text = text.rstrip("=")
                text += "=" * (-len(text) % 4)
                data = binascii.a2b_base64(text.encode("ascii"))
            else:
                data = binascii.a2b_qp(text.encode("utf-8"), header=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            if defects is not None:
                defects.append("invalid_encoded_word")
            data = None
        if data is None or gap or charset != pending_charset:
            if pending_charset is not None:
                out.append(_decode_bytes(bytes(pending), pending_charset, defects))
                pending.clear()
                pending_charset = None
            if gap:
                out.append(gap)
        if data is None:
            out.append(match.group(0))
            continue
        pending += data
        pending_charset = charset
    if pending_charset is not None:
        out.append(_decode_bytes(bytes(pending), pending_charset, defects))
    out.append(value[pos:])
    return _safe_text("".join(out))


# --------------------------------------------------------------------------------------------
# Addresses

_DOMAIN = re.compile(
    r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*"
)
_LITERAL_DOMAIN = re.compile(r"\[[0-9a-f:.]{2,45}\]|\[ipv6:[0-9a-f:.]{2,45}\]")
_LOCAL_FORBIDDEN = re.compile(r'[\s<>(),;:\\"\[\]@\x00-\x1f\x7f]')
# Full stops other than "." that IDNA processing takes as one.
_OTHER_DOTS = frozenset("\u3002\uff0e\uff61")


def _folds_into_ascii(text: str) -> bool:
    """Whether lower-casing turns a character that is not ASCII into ASCII (the Kelvin sign into
    "k"): such an address would be read as one it only looks like."""
    return any(not c.isascii() and c.lower().isascii() for c in text)


# The address caches hold at most a few MiB: entries are bounded in count *and* in length (a cache of
# 64 KiB Cc values, distinct in each of a stranger's messages, filled evaluate past its memory limit).
_ADDRESS_CACHE_SIZE = 16384
_VALUE_CACHE_SIZE = 4096
CACHED_VALUE_LENGTH = 512


def normalize_email_address(address: str) -> str | None:
    """``local@domain`` lower-cased with an IDNA (A-label) domain, or None if implausible.

    The registry must store addresses normalised with this function so lookups match.
    """
    if len(address) > 400:   # 320 octets and blanks around them at most: longer is no address
        return None
    return _normalize_email_address(address)


@lru_cache(maxsize=_ADDRESS_CACHE_SIZE)
def _normalize_email_address(address: str) -> str | None:
    # Cached: the same few thousand addresses recur across every batch.
    address = address.strip()
    if not address or len(address) > 320:
        return None
    at = address.rfind("@")
    if at <= 0 or at == len(address) - 1:
        return None
    local, domain = address[:at], address[at + 1 :].rstrip(".")
    if len(local) > 64 or _LOCAL_FORBIDDEN.search(local) or local.startswith(".") or local.endswith("."):
        return None
    if not domain.isascii():
        # IDNA 2008, which maps nothing: the stdlib's IDNA 2003 codec read fullwidth letters, soft
        # hyphens, zero-width spaces and ideographic full stops as the ASCII they look like (a
        # stranger's ceo@ｅｘａｍｐｌｅ.com resolved to the CEO), and straße.de as strasse.de, which is
        # another domain.  Such a domain is no address of anyone's.
        if _folds_into_ascii(domain) or any(c in _OTHER_DOTS for c in domain):
            return None
        try:
            domain = idna.encode(domain.lower(), uts46=False).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            return None
    else:
        domain = domain.lower()
    if not local.isascii() and _folds_into_ascii(local):
        return None
    if len(domain) > 253:
        return None
    if not (_DOMAIN.fullmatch(domain) or _LITERAL_DOMAIN.fullmatch(domain)):
        return None
    return f"{local.lower()}@{domain}"


_QUOTED_PAIR = re.compile(r"\\(.)")


def _parse_address_value(value: str) -> tuple[tuple[Address, ...], bool]:
    """(valid addresses, any invalid one seen).  A short value is cached (To: the mailbox recurs in
    every message); a long list is read each time it comes."""
    if len(value) > CACHED_VALUE_LENGTH:
        return _read_address_value(value)
    return _cached_address_value(value)


def _read_address_value(value: str) -> tuple[tuple[Address, ...], bool]:
    try:
        pairs = address_pairs(value)
    except Exception:  # noqa: BLE001 - stdlib parser bugs on hostile input mean "invalid"
        return (), True
    found: list[Address] = []
    invalid = False
    seen: set[str] = set()
    for name, addr in pairs:
        if not addr:
            if name and "@" in name:
                invalid = True
            continue
        email = normalize_email_address(addr)
        if email is None:
            invalid = True
            continue
        if email in seen:
            continue
        seen.add(email)
        name = decode_header_value(name) if "=?" in name else _safe_text(name)
        found.append(Address(name=name.strip(), email=email))
    return tuple(found), invalid


_cached_address_value = lru_cache(maxsize=_VALUE_CACHE_SIZE)(_read_address_value)


def _addresses(values: list[str] | None, header: str, defects: list[str]) -> tuple[Address, ...]:
    if not values:
        return ()
    value = values[0] if len(values) == 1 else ", ".join(values)
    if len(value) > 64 * 1024:  # a pathological list; the head of it is what matters
        value = value[: 64 * 1024]
    found, invalid = _parse_address_value(value)
    if invalid:
        defects.append(f"invalid_address:{header}")
    return found


# --------------------------------------------------------------------------------------------
# Identifiers, dates, Outlook conversation index

# No "\s*" around the group: with a lazy group between them, a "<" followed by thousands of blanks
# and no ">" took cubic time (one crafted In-Reply-To held evaluate for hours).  Blanks are dropped
# below instead.
_ANGLE_ID = re.compile(r"<([^<>]*)>")
_WS = re.compile(r"\s+")


def _id_fits(value: str) -> bool:
    """Short enough to be a key (``shared.mime.MAX_ID_LENGTH``, UTF-8 bytes): an id longer than
    that is no stored Message-ID, so it can neither be one nor correlate with one."""
    return 0 < len(value) <= MAX_ID_LENGTH and (value.isascii() or len(value.encode("utf-8")) <= MAX_ID_LENGTH)


def _message_ids(value: str) -> list[str]:
    ids = []
    for found in _ANGLE_ID.findall(value):
        if _WS.search(found):
            found = _WS.sub("", found)  # blanks around the id, or folded inside the brackets
        if not found:
            continue
        if len(found) <= MAX_ID_LENGTH:  # too many characters is too many bytes: no copy to find out
            found = _safe_text(found)
            if _id_fits(found):
                ids.append(found)
    return ids


def _single_message_id(value: str, defects: list[str]) -> str | None:
    ids = _message_ids(value)
    if ids:
        return ids[0]
    token = _safe_text(value.strip())
    if token and not any(c.isspace() for c in token) and _id_fits(token):
        defects.append("message_id_without_brackets")
        return token
    defects.append("invalid_message_id")
    return None


def _reference_ids(value: str) -> list[str]:
    ids = _message_ids(value)
    if not ids:
        # Some mailers omit the brackets; accept bare tokens that look like ids.
        ids = [_safe_text(t) for t in value.split() if "@" in t and len(t) <= MAX_ID_LENGTH]
        ids = [t for t in ids if _id_fits(t)]
    return ids


def _parse_date(value: str, defects: list[str]) -> datetime | None:
    try:
        parsed = parsedate_to_datetime(value)
        if parsed.tzinfo is None:  # "-0000": zone unknown; UTC is the only honest reading
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (TypeError, ValueError, IndexError, OverflowError, AttributeError):
        defects.append("invalid_date")
        return None


def _thread_root(value: str, defects: list[str]) -> str | None:
    text = "".join(value.split())
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=False)
    except (binascii.Error, ValueError):
        data = b""
    if len(data) < THREAD_ROOT_BYTES:
        defects.append("invalid_thread_index")
        return None
    return base64.b64encode(data[:THREAD_ROOT_BYTES]).decode("ascii")


_PRIORITY = {"1": "high", "2": "high", "3": "normal", "4": "low", "5": "low"}


def _importance(headers: dict[str, list[str]]) -> str | None:
    if "importance" in headers:
        value = headers["importance"][0].strip().lower()
        if value in ("low", "normal", "high"):
            return value
    if "x-priority" in headers:
        value = headers["x-priority"][0].strip()[:1]
        return _PRIORITY.get(value)
    return None


def _first_token(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


# --------------------------------------------------------------------------------------------
# MIME body walk

_PARAM = re.compile(r';\s*([A-Za-z0-9_.*\-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


def _content_type(value: str | None) -> tuple[str, dict[str, str]]:
    if not value:
        return "text/plain", {}
    head, _, rest = value.partition(";")
    ctype = head.strip().lower()
    if "/" not in ctype:
        ctype = "text/plain"  # RFC 2045 5.2: an invalid type is treated as text/plain
    params: dict[str, str] = {}
    if rest:
        for key, val in _PARAM.findall(";" + rest):
            if val[:1] == '"':
                val = _QUOTED_PAIR.sub(r"\1", val[1:-1])
            key = key.lower()
            if key.endswith("*") and "'" in val:  # RFC 2231: charset'language'percent-encoded
                key = key[:-1]
                val = unquote(val.split("'", 2)[-1], errors="replace")
            params.setdefault(key, val)
    return ctype, params


@dataclass(slots=True)
class _BodyScan:
    """Mutable state of one walk over a body."""

    want_preview: bool
    plain: tuple[bytes, str | None, str] | None = None  # (source bytes, charset, cte)
    html: tuple[bytes, str | None, str] | None = None
    attachments: bool = False
    forwarded: tuple[int, int, str] | None = None  # (start, end, cte) of a message/rfc822 part
    # The message/rfc822 parts after the first, in order; None (no list built) for the usual
    # message, which carries at most one.
    more_forwarded: list[tuple[int, int, str]] | None = None
    parts: int = 0


def _iter_parts(body: bytes, start: int, end: int, boundary: bytes):
    """Yield (start, end) of each body part between ``start`` and ``end``."""
    delim = b"--" + boundary
    if body.startswith(delim, start):
        pos = start
    else:
        pos = body.find(b"\n" + delim, start, end)
        if pos < 0:
            return
        pos += 1
    step = len(delim)
    while True:
        after = pos + step
        if body.startswith(b"--", after):
            return  # close delimiter
        eol = body.find(b"\n", after, end)
        if eol < 0:
            return
        part_start = eol + 1
        nxt = body.find(b"\n" + delim, part_start, end)
        part_end = nxt if nxt >= 0 else end
        if part_end > part_start and body[part_end - 1 : part_end] == b"\r":
            part_end -= 1
        yield part_start, part_end
        if nxt < 0:
            return
        pos = nxt + 1


def _scan_entity(
    body: bytes,
    start: int,
    end: int,
    ctype: str,
    params: dict[str, str],
    cte: str,
    disposition: str,
    scan: _BodyScan,
    depth: int,
    defects: list[str],
) -> None:
    if ctype.startswith("multipart/"):
        boundary = params.get("boundary", "")
        if not boundary:
            defects.append("multipart_without_boundary")
            return
        if depth >= _MAX_MIME_DEPTH:
            defects.append("mime_parts_truncated")
            return
        boundary_bytes = boundary.encode("utf-8", "replace")
        for part_start, part_end in _iter_parts(body, start, end, boundary_bytes):
            scan.parts += 1
            if scan.parts > _MAX_MIME_PARTS:
                defects.append("mime_parts_truncated")
                return
            head_end, body_start = _find_header_end_in(body, part_start, part_end)
            content_type, cte, disposition = _part_headers(body[part_start:head_end])
            part_type, part_params = _content_type(content_type)
            if content_type is None and ctype == "multipart/digest":
                part_type = "message/rfc822"
            _scan_entity(
                body, body_start, part_end, part_type, part_params, cte, disposition, scan, depth + 1, defects
            )
        return
    named = "filename" in disposition.lower() or any(k.startswith("name") for k in params)
    if ctype == "message/rfc822":
        scan.attachments = True
        if scan.forwarded is None:
            scan.forwarded = (start, end, cte)
        elif scan.more_forwarded is None:
            scan.more_forwarded = [(start, end, cte)]
        else:
            scan.more_forwarded.append((start, end, cte))
        return
    if _first_token(disposition) == "attachment" or named:
        scan.attachments = True
        return
    if ctype == "text/plain":
        if scan.want_preview and scan.plain is None:
            source = body[start : min(end, start + _PREVIEW_SOURCE_BYTES)]
            if source.strip():  # an empty first part says nothing; try the next one
                scan.plain = (source, params.get("charset"), cte)
        return
    if ctype == "text/html":
        if scan.want_preview and scan.html is None:
            source = body[start : min(end, start + _HTML_SOURCE_BYTES)]
            if source.strip():
                scan.html = (source, params.get("charset"), cte)
        return
    if not ctype.startswith("text/"):
        scan.attachments = True  # images, PDFs, calendars, ...: content a user would call attached


def _header_at(head: bytes, low: bytes, needle: bytes) -> str | None:
    start = low.find(needle)
    if start < 0:
        return None
    start += len(needle)
    end = start
    while True:
        end = low.find(b"\n", end)
        if end < 0:
            end = len(low)
            break
        if low[end + 1 : end + 2] in (b" ", b"\t"):
            end += 1
            continue
        break
    data = head[start - 1 : end - 1].replace(b"\r", b"").replace(b"\n", b"")
    return data.strip().decode("utf-8", "replace")


def _part_headers(head: bytes) -> tuple[str | None, str, str]:
    """(Content-Type, transfer encoding, Content-Disposition) of a body part's small header block."""
    if not head:
        return None, "7bit", ""
    low = b"\n" + head.lower()
    content_type = _header_at(head, low, b"\ncontent-type:") if b"\ncontent-type:" in low else None
    cte = _header_at(head, low, b"\ncontent-transfer-encoding:") if b"encoding:" in low else None
    disposition = _header_at(head, low, b"\ncontent-disposition:") if b"disposition:" in low else None
    return content_type, _first_token(cte) if cte else "7bit", disposition or ""


def _find_header_end_in(body: bytes, start: int, end: int) -> tuple[int, int]:
    """Header/body split of a body part; a part that starts with a blank line has no headers."""
    if body.startswith(b"\n", start):
        return start, start + 1
    if body.startswith(b"\r\n", start):
        return start, start + 2
    limit = min(end, start + _MAX_PART_HEADER_BYTES)
    crlf = body.find(b"\n\r\n", start, limit)
    lf = body.find(b"\n\n", start, crlf + 2 if crlf >= 0 else limit)
    if lf < 0 and crlf < 0:
        return start, start  # no headers we can trust; treat the part as body
    if crlf < 0 or (0 <= lf < crlf):
        return lf + 1, lf + 2
    return crlf + 1, crlf + 3


def _first(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return values[0] if values else None


def _decode_transfer(data: bytes, cte: str, defects: list[str]) -> bytes:
    if cte == "base64":
        compact = b"".join(data.split())
        compact = compact[: len(compact) - len(compact) % 4]
        try:
            return binascii.a2b_base64(compact)
        except (binascii.Error, ValueError):
            defects.append("invalid_body_encoding")
            return b""
    if cte == "quoted-printable":
        return binascii.a2b_qp(data)
    return data


_HTML_DROP = re.compile(r"<(script|style|head|title)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.DOTALL | re.IGNORECASE)
_HTML_TAG = re.compile(r"<[^>]*>")


def _preview(scan: _BodyScan, limit: int, defects: list[str]) -> str:
    """Collapse the first text part into at most ``limit`` characters.

    Decodes a small prefix first and widens it only when the text came out short (long HTML
    heads, whitespace-heavy bodies): most messages need a kilobyte or two, never the whole part.
    """
    is_html = scan.plain is None
    source = scan.html if is_html else scan.plain
    if source is None:
        return ""
    data, charset, cte = source
    size = 2048
    while True:
        chunk = data[:size]
        text = _decode_bytes(_decode_transfer(chunk, cte, defects), charset or "utf-8", None)
        if is_html:
            text = html.unescape(_HTML_TAG.sub(" ", _HTML_DROP.sub(" ", text)))
        # Collapse only a window a little larger than the limit: splitting a whole part into
        # words costs more than everything else in the preview.
        window = " ".join(text[: limit * 2].replace("\x00", "").split())
        if len(window) < limit and len(text) > limit * 2:  # whitespace-heavy: use all we decoded
            window = " ".join(text.replace("\x00", "").split())
        if len(window) >= limit or len(chunk) == len(data):
            return _safe_text(window[:limit])
        size *= 4


# --------------------------------------------------------------------------------------------
# Entry points


def parse_email(
    raw: bytes,
    *,
    max_header_bytes: int = 256 * 1024,
    preview_chars: int = PREVIEW_CHARS,
    generate_missing_id: bool = False,
) -> ParsedEmail:
    """Parse one raw RFC 5322 message; never raises (problems land in ``defects``).

    With ``generate_missing_id`` a message without a usable Message-ID gets
    ``generated_message_id(raw)`` (the ``missing_message_id`` defect still says so), which keeps
    deduplication and same-batch correlation working for it.  It is ``shared.mime``'s, the key
    ingest gives the message, and the same for every mailbox's copy.
    """
    defects: list[str] = []
    fields: dict = {}
    try:
        _parse_into(bytes(raw), max_header_bytes, preview_chars, fields, defects)
    except Exception as exc:  # noqa: BLE001 - the contract is "never raises"; keep what we have
        defects.append(f"internal_error:{type(exc).__name__}")
    if generate_missing_id and fields.get("message_id") is None:
        fields["message_id"] = generated_message_id(raw)
    fields["size"] = len(raw) if isinstance(raw, (bytes, bytearray, memoryview)) else 0
    fields["defects"] = tuple(dict.fromkeys(defects))  # de-duplicated, first-seen order
    return ParsedEmail(**{**_EMPTY, **fields})


# What a field is when its header is absent (or parsing stopped before reaching it).
_EMPTY: dict = {
    "message_id": None, "in_reply_to": (), "references": (), "subject": "", "from_": None, "sender": None,
    "reply_to": (), "to": (), "cc": (), "bcc": (), "date": None, "thread_index": None, "thread_root": None,
    "thread_topic": None, "auto_submitted": None, "precedence": None, "list_id": None, "importance": None,
    "content_type": "text/plain", "preview": "", "has_attachments": False, "has_forwarded_message": False,
}


def _parse_into(raw: bytes, max_header_bytes: int, preview_chars: int, f: dict, defects: list[str]) -> None:
    head_end, body_start = _find_header_end(raw, max_header_bytes)
    if head_end < 0:
        if len(raw) <= max_header_bytes:
            head_end = body_start = len(raw)  # headers only, no body
        else:
            # A header block beyond the limit is an attack or a broken mailer: keep what fits.
            defects.append("header_block_truncated")
            cut = raw.rfind(b"\n", 0, max_header_bytes)
            head_end = cut + 1 if cut > 0 else max_header_bytes
            body_start = len(raw)
    if head_end == 0:
        defects.append("no_header_block")
    headers = _split_headers(raw[:head_end], _WANTED, defects)

    for name, values in headers.items():
        if len(values) > 1 and name in _SINGLE:
            defects.append(f"duplicate_header:{name}")

    value = _first(headers, "message-id")
    f["message_id"] = _single_message_id(value, defects) if value is not None else None
    if value is None:
        defects.append("missing_message_id")
    value = _first(headers, "in-reply-to")
    if value:
        f["in_reply_to"] = tuple(_reference_ids(value))
    value = _first(headers, "references")
    if value:
        refs = _reference_ids(value)
        # The first id (the thread's root, RFC 5322 3.6.4 keeps it when trimming) and the newest.
        f["references"] = tuple(refs if len(refs) <= _MAX_REFERENCES else refs[:1] + refs[1 - _MAX_REFERENCES:])

    value = _first(headers, "subject")
    f["subject"] = decode_header_value(value, defects) if value else ""

    value = _first(headers, "from")
    if value is None:
        defects.append("missing_from")
    else:
        found = _addresses([value], "from", defects)
        f["from_"] = found[0] if found else None
    value = _first(headers, "sender")
    if value is not None:
        found = _addresses([value], "sender", defects)
        f["sender"] = found[0] if found else None
    f["reply_to"] = _addresses(headers.get("reply-to"), "reply-to", defects)
    f["to"] = _addresses(headers.get("to"), "to", defects)
    f["cc"] = _addresses(headers.get("cc"), "cc", defects)
    f["bcc"] = _addresses(headers.get("bcc"), "bcc", defects)

    value = _first(headers, "date")
    if value is None:
        defects.append("missing_date")
    else:
        f["date"] = _parse_date(value, defects)

    value = _first(headers, "thread-index")
    if value:
        f["thread_index"] = _safe_text(value.strip())
        f["thread_root"] = _thread_root(value, defects)
    value = _first(headers, "thread-topic")
    if value:
        f["thread_topic"] = decode_header_value(value, defects)
    value = _first(headers, "auto-submitted")
    if value:
        f["auto_submitted"] = _safe_text(_first_token(value))
    value = _first(headers, "precedence")
    if value:
        f["precedence"] = _safe_text(_first_token(value))
    value = _first(headers, "list-id")
    if value:
        ids = _message_ids(value)
        f["list_id"] = ids[0].lower() if ids else _safe_text(value.strip().lower())
    f["importance"] = _importance(headers)

    ctype, params = _content_type(_first(headers, "content-type"))
    f["content_type"] = _safe_text(ctype)
    scan = _BodyScan(want_preview=preview_chars > 0)
    cte = _first_token(_first(headers, "content-transfer-encoding") or "7bit")
    _scan_entity(raw, body_start, len(raw), ctype, params, cte, "", scan, 0, defects)
    f["has_attachments"] = scan.attachments
    f["has_forwarded_message"] = scan.forwarded is not None
    if preview_chars > 0:
        f["preview"] = _preview(scan, preview_chars, defects)


@dataclass(frozen=True, slots=True)
class ForwardedMessages:
    """The messages a forward carries as ``message/rfc822`` attachments, in order.

    ``messages`` holds at most the ``limit`` given to ``forwarded_messages``; ``omitted`` are the raw
    bytes of the attached messages past it.  ``parts_truncated``: the forward has more MIME parts
    than are read (64), so attached messages past them were not even seen.
    """

    messages: tuple[bytes, ...] = ()
    omitted: tuple[bytes, ...] = ()
    parts_truncated: bool = False

    @property
    def found(self) -> int:
        return len(self.messages) + len(self.omitted)


def forwarded_messages(raw: bytes, *, limit: int) -> ForwardedMessages:
    """Every attached ``message/rfc822`` part of ``raw`` (the first ``limit`` in ``messages``, the
    rest in ``omitted``); empty when there is none or the input is malformed.  Never raises.

    Forward mailboxes receive mail that users forward *as an attachment*, one or several messages
    at a time: the outer From is the forwarding user, each inner message is one to track.
    """
    try:
        raw = bytes(raw)
        head_end, body_start = _find_header_end(raw, 256 * 1024)
        if head_end < 0:
            return ForwardedMessages()
        headers = _split_headers(raw[:head_end], _WANTED, None)
        ctype, params = _content_type(_first(headers, "content-type"))
        scan = _BodyScan(want_preview=False)
        cte = _first_token(_first(headers, "content-transfer-encoding") or "7bit")
        defects: list[str] = []
        _scan_entity(raw, body_start, len(raw), ctype, params, cte, "", scan, 0, defects)
        if scan.forwarded is None:
            return ForwardedMessages()
        parts = [_attached_bytes(raw, part) for part in (scan.forwarded, *(scan.more_forwarded or ()))]
        found = [inner for inner in parts if inner]
        return ForwardedMessages(tuple(found[:limit]), tuple(found[limit:]), "mime_parts_truncated" in defects)
    except Exception:  # noqa: BLE001 - malformed input means "no forwarded message"
        return ForwardedMessages()


def _attached_bytes(raw: bytes, part: tuple[int, int, str]) -> bytes:
    """One attached message's bytes, its (improper) transfer encoding undone; empty if undecodable."""
    start, end, part_cte = part
    inner = raw[start:end]
    try:
        if part_cte == "base64":  # not allowed by RFC 2046, produced by some clients anyway
            inner = binascii.a2b_base64(b"".join(inner.split()))
        elif part_cte == "quoted-printable":
            inner = binascii.a2b_qp(inner)
    except (binascii.Error, ValueError):
        return b""
    return inner


def forwarded_message(raw: bytes) -> bytes | None:
    """The raw bytes of the first attached ``message/rfc822`` part, or None.  Never raises."""
    found = forwarded_messages(raw, limit=1)
    return found.messages[0] if found.messages else None
