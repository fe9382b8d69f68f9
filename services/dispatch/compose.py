"""From a validated request to the bytes that go on the wire, and every reason to refuse one.

Rules are data (``HEADER_ALLOW_LIST``) and small functions; everything here is pure, so unit tests
run it on plain values.  The MIME is built by ``email.message.EmailMessage`` under ``email.policy.SMTP``.
That policy refuses a literal CR or LF in a header value, but it decodes RFC 2047 encoded words when
it parses one, and Python before 3.11.10 / 3.12.5 writes a decoded CR/LF out raw (CVE-2024-6923):
``=?utf-8?q?x=0D=0ABcc:_a@evil.example?=`` in a subject became a real ``Bcc`` header.  So, whatever
got past the payload model: every text bound for a header is refused (``header_injection``) when it
holds a line break as such or in an encoded word; each header as written must be one line plus
continuation lines (the check later Pythons make, ``HeaderWriteError``); and the header block of the
message and of each MIME part must hold exactly the fields written here, or nothing is sent.

The checks a request meets on arrival raise ``Refused``: a request read and refused by a rule, which
does not count toward the dead-letter limit (``shared.consumer``).
"""
from __future__ import annotations

import base64
import binascii
import email.errors
import re
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import EmailPolicy
from email.utils import format_datetime, getaddresses
from datetime import datetime, timezone
from typing import Any

from shared.errors import InvalidInput, Refused
from shared.events.fields import breaks_header, is_sendable_address
from shared.events.payloads import EmailOutboundV1

# Headers a requester may set.  Everything else (From, Sender, To, Cc, Bcc, Subject, Date,
# Message-ID, MIME and Content-* headers, Received, Return-Path, signatures) is ours to write.
HEADER_ALLOW_LIST: frozenset[str] = frozenset({
    "reply-to",                 # addresses, validated
    "in-reply-to", "references",  # thread a reply (correlation reads them back)
    "list-unsubscribe", "list-unsubscribe-post", "list-id",
    "auto-submitted", "precedence", "importance", "priority", "sensitivity",
})
# Any custom X- header is allowed too, except our own namespace.
RESERVED_PREFIX = "x-conduit-"
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 ftext, and short enough to fold
_MSG_ID = re.compile(r"^<[^<>\s@]+@[^<>\s@]+>$")
# Message ids and URLs: written as given, folded only at their own whitespace.  The email package
# treats them as unstructured text and RFC 2047-encodes any word too long for a 78-character line,
# which breaks threading (an Outlook Message-ID is longer) and RFC 8058 one-click unsubscribe.
VERBATIM_HEADERS: frozenset[str] = frozenset({"in-reply-to", "references", "list-unsubscribe"})
_PRINTABLE_ASCII = re.compile(r"^[\t -~]*$")
_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def header_allowed(name: str) -> bool:
    lower = name.lower()
    if not _HEADER_NAME.match(name) or lower.startswith(RESERVED_PREFIX):
        return False
    return lower in HEADER_ALLOW_LIST or lower.startswith("x-")


def check_headers(headers: dict[str, str]) -> None:
    """Refuse a header outside the allow-list, or a value that cannot be what it claims."""
    seen: set[str] = set()
    for name, value in headers.items():
        lower = name.lower()
        if not header_allowed(name):
            raise Refused(f"header {name[:80]!r} is not allowed (see docs/dispatch.md for the allow-list)",
                          reason="header_not_allowed")
        if lower in seen:
            raise Refused(f"header {name!r} given twice", reason="header_not_allowed")
        seen.add(lower)
        if len(value) > 998:
            raise Refused(f"header {name!r} is longer than 998 characters", reason="header_too_long")
        if lower in VERBATIM_HEADERS:
            _check_verbatim(name, value)
        if lower == "reply-to":
            try:
                addresses = [a for _, a in getaddresses([value])]
            except Exception:  # noqa: BLE001 - the stdlib parser recurses on nested comments: no address list
                addresses = []
            if not addresses or not all(is_sendable_address(a) for a in addresses):
                raise Refused("Reply-To must be a list of email addresses", reason="bad_address")
        if lower in ("in-reply-to", "references"):
            ids = value.split()
            if not ids or not all(_MSG_ID.match(i) for i in ids):
                raise Refused(f"{name} must be message ids in angle brackets", reason="bad_header")


def _check_verbatim(name: str, value: str) -> list[str]:
    """A header written verbatim must be printable ASCII (a message id, a URL: RFC 5322, RFC 2369)
    and fit RFC 5322's lines once folded: its lines."""
    if _PRINTABLE_ASCII.match(value):
        return _verbatim_lines(name, value)
    if _ASCII_CONTROL.search(value) or breaks_header(value):
        raise Refused(f"header {name!r} holds a control character", reason="header_injection")
    raise Refused(f"{name} must be ASCII (message ids, URLs)", reason="bad_header")


def header_texts(request: EmailOutboundV1, sender_email: str, sender_name: str | None, subject: str) -> list[str]:
    """Every text compose writes into a header.  The request's own fields passed the payload model,
    but the display name (the mailbox's name) and the subject with its token did not, and a stored
    request may predate a rule."""
    texts = [subject, sender_name or "", sender_email, *request.to, *request.cc, *request.bcc,
             *request.headers.keys(), *request.headers.values()]
    for attachment in request.attachments:
        texts += (attachment.filename, attachment.content_id or "", attachment.content_type)
    return texts


def check_header_text(texts: list[str]) -> None:
    """Refuse (``header_injection``) a header text that could end its line: a line break or NUL as
    such, or a control character decoded from an RFC 2047 encoded word."""
    for text in texts:
        if breaks_header(text):
            raise InvalidInput(f"header text {text[:80]!r} holds a line break or control character, as such or in "
                               "an RFC 2047 encoded word", reason="header_injection")


def estimated_size(request: EmailOutboundV1, stored_sizes: dict[str, int] | None = None) -> int:
    """An upper-bound estimate before building: bodies, base64 attachments, headers; attachments by
    reference count with ``stored_sizes`` (their stored size), base64-encoded."""
    size = 2048 + len(request.subject) * 3 + sum(len(k) + len(v) + 4 for k, v in request.headers.items())
    for body in (request.text, request.html):
        if body:
            size += _encoded_text_size(body) + 200
    for attachment in request.attachments:
        if attachment.content_base64 is not None:
            size += _base64_part_size(len(attachment.content_base64)) + 400
        elif stored_sizes is not None:
            size += _base64_part_size((stored_sizes.get(attachment.content_sha256 or "", 0) + 2) // 3 * 4) + 400
    return size


def _base64_part_size(encoded: int) -> int:
    """A MIME part of ``encoded`` base64 characters: MIME breaks base64 into lines of 76 and a CRLF
    (2.6 % more), which took a message estimated under Graph's limit over it at the send."""
    return encoded + (encoded + 75) // 76 * 2


def _encoded_text_size(text: str) -> int:
    """At most the size of ``text`` as ``compose`` encodes it (``_cte``): 7-bit as is, else
    quoted-printable, where a byte outside ASCII (and "=") takes three, and a soft line break
    ("=" CRLF) comes every 76 characters.  Not base64's 4/3: 1.5 MB of "é" is 4.8 MB here."""
    raw = text.encode("utf-8", "surrogatepass")
    ascii_bytes = len(text.encode("ascii", "ignore"))
    escaped = 3 * (len(raw) - ascii_bytes) + 3 * raw.count(b"=") + (ascii_bytes - raw.count(b"="))
    return escaped + escaped // 73 * 3 + raw.count(b"\n")


def check_size(request: EmailOutboundV1, limit: int, stored_sizes: dict[str, int] | None = None) -> None:
    if estimated_size(request, stored_sizes) > limit:
        raise Refused(f"the message would exceed the size limit of {limit} bytes", reason="too_large")


def check_attachments(request: EmailOutboundV1) -> None:
    """Inline content must be base64: a request that is not is refused on arrival (rejected and
    dead-lettered), not found out when its message is built."""
    for attachment in request.attachments:
        if attachment.content_base64 is not None:
            _attachment_bytes(attachment, {})


def recipients(request: EmailOutboundV1) -> list[str]:
    """Envelope recipients: to, cc and bcc, each once (case-insensitively), in order."""
    seen: dict[str, str] = {}
    for address in (*request.to, *request.cc, *request.bcc):
        seen.setdefault(address.lower(), address)
    return list(seen.values())


def message_id_for(request_id: Any, sender: str) -> str:
    """The Message-ID we generate (without brackets): unique per ledger row, domain of the sender."""
    domain = sender.rsplit("@", 1)[-1]
    return f"conduit.{request_id.hex}@{domain}"


@dataclass(frozen=True)
class Composed:
    raw: bytes
    envelope_from: str
    recipients: list[str]


def compose(
    request: EmailOutboundV1,
    *,
    sender_email: str,
    sender_name: str | None,
    subject: str,
    message_id: str,
    attachments: dict[str, bytes] | None = None,
    date: datetime | None = None,
    max_bytes: int | None = None,
    bcc_header: bool = False,
) -> Composed:
    """The MIME message for a request, sent as the mailbox owner (From = the mailbox address)."""
    if not is_sendable_address(sender_email):
        # A mailbox registered before the registry refused such addresses (josé@...): say what is
        # wrong with it, rather than the header check's "header injection" further down.
        raise InvalidInput(f"the sending mailbox's address {sender_email!r} cannot be sent from: only printable "
                           "ASCII before the @ (SMTPUTF8 is not supported); change the mailbox's address",
                           reason="bad_address")
    date = date or datetime.now(timezone.utc)
    texts = header_texts(request, sender_email, sender_name, subject)
    # An encoded word is looked into whichever path writes it (cheap: most texts hold no "=?").  The
    # direct path takes printable ASCII only, so only the email package's path needs the rest.
    checked = "=?" in " ".join(texts)
    if checked:
        check_header_text(texts)
    fast = _compose_plain(request, sender_email, sender_name, subject, message_id, date, bcc_header)
    if fast is not None:
        raw = fast
    else:
        if not checked:
            check_header_text(texts)
        raw = _compose_mime(request, sender_email=sender_email, sender_name=sender_name, subject=subject,
                            message_id=message_id, attachments=attachments, date=date, bcc_header=bcc_header)
    if max_bytes is not None and len(raw) > max_bytes:
        raise InvalidInput(f"the message is {len(raw)} bytes, over the limit of {max_bytes}", reason="too_large")
    return Composed(raw, sender_email, recipients(request))


# Printable ASCII only: no CR, LF, NUL or any other control character can pass.
_PLAIN_VALUE = re.compile(r"^[ -~]{0,900}$")
_ATEXT_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]{0,200}$")


def _compose_plain(request: EmailOutboundV1, sender_email: str, sender_name: str | None, subject: str,
                   message_id: str, date: datetime, bcc_header: bool = False) -> bytes | None:
    """The common case without the email package's header parser (about 20x faster).

    Only a text-only (or html-only) 7-bit message whose every header value is printable ASCII
    short enough not to need folding takes this path; the output is byte for byte what
    ``_compose_mime`` writes for it (a unit test holds them equal).  Anything else returns None.
    """
    if request.attachments or (request.text is not None and request.html is not None):
        return None
    body, subtype = (request.text, "plain") if request.text is not None else (request.html or "", "html")
    if _cte(body) != "7bit":
        return None
    name = (sender_name or "").strip()
    if not _ATEXT_NAME.match(name) or name != " ".join(name.split()):
        return None
    headers = [("From", f"{name} <{sender_email}>" if name else sender_email)]
    if request.to:
        headers.append(("To", ", ".join(request.to)))
    if request.cc:
        headers.append(("Cc", ", ".join(request.cc)))
    if bcc_header and request.bcc:
        headers.append(("Bcc", ", ".join(request.bcc)))
    headers += [("Subject", subject), ("Date", format_datetime(date)), ("Message-ID", f"<{message_id}>")]
    headers += list(request.headers.items())
    lines = []
    for hname, value in headers:
        line = f"{hname}: {value}"
        if len(line) > 78 or not _PLAIN_VALUE.match(line) or value != value.strip() or "  " in value:
            return None  # would need folding or encoding: let the email package do it
        lines.append(line)
    lines += [f'Content-Type: text/{subtype}; charset="utf-8"', "Content-Transfer-Encoding: 7bit", "MIME-Version: 1.0"]
    # bytes.splitlines breaks at CR and LF only (str.splitlines also at FF, VT and \x1c-\x1e, which
    # a text body may hold): the email package's path splits the same way.
    text = b"\r\n".join(body.encode("ascii").splitlines()) + b"\r\n"
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + text


def _compose_mime(request: EmailOutboundV1, *, sender_email: str, sender_name: str | None, subject: str,
                  message_id: str, attachments: dict[str, bytes] | None, date: datetime,
                  bcc_header: bool = False) -> bytes:
    msg = EmailMessage(policy=_POLICY)
    try:
        msg["From"] = Address(display_name=sender_name or "", addr_spec=sender_email)
        if request.to:
            msg["To"] = ", ".join(request.to)
        if request.cc:
            msg["Cc"] = ", ".join(request.cc)
        if bcc_header and request.bcc:
            # Exchange reads the recipients from the MIME (and drops Bcc when delivering);
            # over SMTP Bcc recipients are envelope-only.
            msg["Bcc"] = ", ".join(request.bcc)
        msg["Subject"] = subject
        msg["Date"] = format_datetime(date)
        msg["Message-ID"] = f"<{message_id}>"
        for name, value in request.headers.items():
            msg[name] = _VerbatimHeader(name, value) if name.lower() in VERBATIM_HEADERS else value
    except (ValueError, TypeError) as exc:  # the policy refuses CR/LF and malformed values
        raise InvalidInput(f"a header cannot be written safely: {exc}", reason="header_injection") from exc
    text, html = request.text, request.html
    if text is None and html is None:
        text = ""
    if text is not None:
        msg.set_content(text, cte=_cte(text))
        if html is not None:
            msg.add_alternative(html, subtype="html", cte=_cte(html))
    else:
        msg.set_content(html or "", subtype="html", cte=_cte(html or ""))
    for attachment in request.attachments:
        data = _attachment_bytes(attachment, attachments or {})
        maintype, _, subtype = attachment.content_type.partition("/")
        kwargs: dict[str, Any] = {"maintype": maintype, "subtype": subtype, "filename": attachment.filename}
        if attachment.inline:
            kwargs["disposition"] = "inline"
            if attachment.content_id:
                kwargs["cid"] = f"<{attachment.content_id.strip('<>')}>"
        try:
            if msg.get_content_maintype() == "multipart" and msg.get_content_subtype() == "alternative" or not msg.is_multipart():
                msg.make_mixed()
            msg.add_attachment(data, **kwargs)
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"attachment {attachment.filename!r} cannot be attached: {exc}", reason="bad_attachment") from exc
    try:
        raw = msg.as_bytes()
    except _HEADER_WRITE_ERRORS as exc:  # Python 3.11.10+ / 3.12.5+ check what they write, as _POLICY does
        raise InvalidInput(f"a header cannot be written safely: {exc}", reason="header_injection") from exc
    _check_header_blocks(msg, raw)
    return raw


_HEADER_WRITE_ERRORS: tuple[type[Exception], ...] = tuple(
    e for e in (getattr(email.errors, "HeaderWriteError", None),) if e is not None)
# Inside a written header (its final CRLF taken off), a line may end only where a continuation line
# starts: CRLF then a space or tab.  Anything else would start a header of its own, or the body.
_LINE_END_WITHOUT_CONTINUATION = re.compile(r"\r(?!\n[ \t])|(?<!\r)\n")


class _CheckedPolicy(EmailPolicy):
    """``email.policy.SMTP`` that refuses a header whose written form ends its line anywhere but at a
    fold: what Python 3.11.10+ checks (``verify_generated_headers``), for the Python we run."""

    def fold(self, name: str, value: Any) -> str:
        return _checked_fold(name, super().fold(name, value), self.linesep)

    def fold_binary(self, name: str, value: Any) -> bytes:
        folded = super().fold_binary(name, value)
        _checked_fold(name, folded.decode("ascii", "surrogateescape"), self.linesep)
        return folded


def _checked_fold(name: str, folded: str, linesep: str) -> str:
    if not folded.endswith(linesep) or _LINE_END_WITHOUT_CONTINUATION.search(folded[:-len(linesep)]):
        raise InvalidInput(f"header {name!r} would not be one header line once written (header injection)",
                           reason="header_injection")
    return folded


_POLICY = _CheckedPolicy(linesep="\r\n")  # otherwise email.policy.SMTP


class _VerbatimHeader:
    """A header value written as given, folded only at its own whitespace (``VERBATIM_HEADERS``).

    The email package stores a value with a matching ``name`` unchanged and folds it by calling its
    ``fold`` (``EmailPolicy.header_store_parse`` and ``EmailPolicy.fold``): no parsing, no encoding.
    """

    __slots__ = ("name", "value")

    def __init__(self, name: str, value: str) -> None:
        self.name, self.value = name, value

    def __str__(self) -> str:
        return self.value

    def fold(self, *, policy: EmailPolicy) -> str:
        return policy.linesep.join(_check_verbatim(self.name, self.value)) + policy.linesep


def _verbatim_lines(name: str, value: str) -> list[str]:
    """``name: value`` folded at the value's own whitespace into lines of 78 where it can, refused
    when a line would pass 998 (RFC 5322 2.1.1: the name counts, so a 994-character id cannot be
    written after "References: ")."""
    # Each word with the whitespace before it; a fold goes before that whitespace, so unfolding
    # (taking the CRLFs out) gives the value back.
    first, *words = re.findall(r"[ \t]*[^ \t]+", value.strip(" \t")) or [""]
    lines = [f"{name}: {first}"]
    for word in words:
        if len(lines[-1]) + len(word) > 78:
            lines.append(word)
        else:
            lines[-1] += word
    if any(len(line) > 998 for line in lines):
        raise Refused(f"header {name!r} has a word too long for a 998-character line", reason="header_too_long")
    return lines


def _check_header_blocks(msg: EmailMessage, raw: bytes) -> None:
    """The header block of the message and of each MIME part holds exactly the fields written here,
    in order: an injected header (or an injected blank line, which ends a block early) is refused."""
    parts = list(msg.walk())
    starts = [0]
    for part in parts:
        boundary = part.get_boundary() if part.is_multipart() else None
        if boundary is not None:
            # The generator writes each part after a blank line or CRLF, then "--boundary" CRLF.
            delimiter = b"\r\n--" + boundary.encode("ascii") + b"\r\n"
            at = raw.find(delimiter)
            while at != -1:
                starts.append(at + len(delimiter))
                at = raw.find(delimiter, at + len(delimiter))
    starts.sort()
    written = [_field_names(raw, start) for start in starts]
    expected = [[name.lower() for name in part.keys()] for part in parts]
    if written != expected:
        raise InvalidInput("the message as written holds other header fields than were set (header injection)",
                           reason="header_injection")


def _field_names(raw: bytes, start: int) -> list[str]:
    end = raw.find(b"\r\n\r\n", start)
    block = raw[start:end if end != -1 else len(raw)]
    if raw.startswith(b"\r\n", start):
        return []
    return [line.split(b":", 1)[0].decode("ascii", "replace").lower()
            for line in re.split(rb"\r\n|\r|\n", block) if line[:1] not in (b" ", b"\t")]


def _cte(text: str) -> str:
    # 7-bit text with short lines goes as is; anything else quoted-printable (readable, safe).
    if text.isascii() and all(len(line) <= 998 for line in text.encode("ascii").splitlines()):
        return "7bit"
    return "quoted-printable"


def _attachment_bytes(attachment: Any, stored: dict[str, bytes]) -> bytes:
    if attachment.content_base64 is not None:
        try:
            return base64.b64decode(attachment.content_base64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Refused(f"attachment {attachment.filename!r} is not valid base64", reason="bad_attachment") from exc
    data = stored.get(attachment.content_sha256)
    if data is None:
        raise Refused(f"attachment {attachment.filename!r} refers to content that is not stored",
                      reason="attachment_not_found")
    return data
