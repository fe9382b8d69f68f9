"""Validated field types shared by the event payloads.

Anything that may end up in a mail header is refused if it holds a line break or NUL, as such or
inside an RFC 2047 encoded word (``=?utf-8?q?x=0D=0ABcc:...?=``: the email package decodes those when
it parses a header, and before 3.11.10 / 3.12.5 writes the decoded CR/LF out raw, CVE-2024-6923), so
no input can inject a header, whatever later code does with it.
"""
from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import AfterValidator, Field

_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*"
_ADDRESS = re.compile(r"^[^@\s<>()\[\],;:\"\\]{1,64}@" + _DOMAIN + "$")
# An address Conduit writes into a header it sends: printable ASCII before the @ as well (RFC 5322's
# atext and dots).  Written as an encoded word, a local part outside ASCII is no address at all for
# the recipient's client (RFC 2047 forbids encoded words in an address), and bidirectional or
# zero-width characters in it can make one address look like another.  Internationalised addresses
# (RFC 6531, SMTPUTF8 messages) are not sent yet.
_SENDABLE_PATTERN = r"^[\x21\x23-\x27\x2a\x2b\x2d-\x39\x3d\x3f\x41-\x5a\x5e-\x7e]{1,64}@" + _DOMAIN + "$"
_SENDABLE = re.compile(_SENDABLE_PATTERN)

# NUL and every character str.splitlines() breaks at: the email package refuses those in a header
# value when it stores one, so a value holding one could never be sent.
_LINE_BREAK = re.compile("[\r\n\x00\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
# What an encoded word must not decode to: any control character (C0, DEL, C1) or line separator.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Every place an encoded word may start, overlapping (a lookahead), and more loosely than RFC 2047:
# the email package decodes encoded words inside atoms, quoted strings and parameters, and whatever
# it might decode must be looked at.
# Each part is bounded (a header line is at most 998 characters), so that a text of many "=?" and no
# "?=" costs a bounded scan per start instead of one to its end (quadratic: 57 s for 280 KB).
_ENCODED_WORD = re.compile(r"(?==\?([^?]{0,998})\?([^?]{0,998})\?(.{0,998}?)\?=)", re.DOTALL)
_Q_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")


def encoded_word_texts(value: str) -> Iterator[str]:
    """The text of every RFC 2047 encoded word in ``value``, decoded as the email package decodes it
    (``email._encoded_words.decode``: the word's charset, else ASCII; lenient base64), and, where it
    is unsure, more ways than one.  Nothing when ``value`` has no ``=?`` (the common case, no cost)."""
    if "=?" not in value:
        return
    for match in _ENCODED_WORD.finditer(value):
        charset, cte, text = match.groups()
        cte = cte.lower()
        if cte not in ("q", "b"):
            continue  # not an encoded word for any decoder
        encoded = text.encode("utf-8", "surrogateescape")
        if cte == "q":
            candidates = [_Q_ESCAPE.sub(lambda m: bytes.fromhex(m.group(1).decode()), encoded.replace(b"_", b" "))]
        else:
            candidates = []
            padding = b"=" * (-len(encoded) % 4)
            for attempt, validate in ((encoded + padding, True), (encoded, False), (encoded + b"==", False)):
                try:
                    candidates.append(base64.b64decode(attempt, validate=validate))
                except (binascii.Error, ValueError):
                    pass
        charset = charset.partition("*")[0]  # RFC 2231 language suffix
        for data in dict.fromkeys(candidates):
            yield _decoded(data, charset)


def _decoded(data: bytes, charset: str) -> str:
    try:
        try:
            return data.decode(charset)
        except UnicodeDecodeError:
            return data.decode(charset, "surrogateescape")
    except (LookupError, UnicodeError):
        return data.decode("ascii", "surrogateescape")
    except Exception:  # noqa: BLE001 - an odd codec: show every byte, controls included
        return data.decode("latin-1")


def breaks_header(value: str) -> bool:
    """Whether ``value``, written into a header, could end the line: a line break or NUL as such, or
    a control character in the text of an encoded word."""
    if _LINE_BREAK.search(value):
        return True
    return "=?" in value and any(_CONTROL.search(text) for text in encoded_word_texts(value))


def _no_line_breaks(value: str) -> str:
    if breaks_header(value):
        raise ValueError("must not contain CR, LF, NUL or another line break, as such or in an RFC 2047 "
                         "encoded word (header injection)")
    return value


def _email_address(value: str) -> str:
    value = _no_line_breaks(value.strip())
    if len(value) > 254 or not _ADDRESS.match(value):
        raise ValueError(f"not a valid email address: {value[:80]!r}")
    local, domain = value.rsplit("@", 1)
    return f"{local}@{domain.lower()}"


# The published JSON Schemas say what the validators enforce, so a producer that checks against
# them learns of a refusal before it publishes (the patterns only describe; the validators decide:
# they also refuse the rarer line breaks and encoded words that decode to a control character).
ONE_LINE = {"pattern": "^[^\\r\\n\\u0000]*$"}
EmailAddress = Annotated[str, AfterValidator(_email_address),
                         Field(max_length=254, examples=["alice@example.com"],
                               json_schema_extra={"pattern": "^[^@\\s<>()\\[\\],;:\"\\\\]{1,64}@[A-Za-z0-9.-]+$"})]
HeaderText = Annotated[str, AfterValidator(_no_line_breaks), Field(json_schema_extra=ONE_LINE)]


def bounded_header_text(max_length: int) -> Any:
    """``HeaderText`` whose length is checked first: the encoded-word scan never sees a longer text."""
    return Annotated[str, Field(max_length=max_length), AfterValidator(_no_line_breaks), Field(json_schema_extra=ONE_LINE)]


def _sendable_address(value: str) -> str:
    value = _email_address(value)
    if not _SENDABLE.match(value):
        raise ValueError(f"{value[:80]!r} has characters outside printable ASCII before the @: internationalised "
                         "addresses (RFC 6531) are not sent yet")
    return value


# Every address a request names (sender, recipients): what can be written into the message's headers.
SendableAddress = Annotated[str, AfterValidator(_sendable_address),
                            Field(max_length=254, examples=["alice@example.com"],
                                  json_schema_extra={"pattern": _SENDABLE_PATTERN})]


def is_sendable_address(value: str) -> bool:
    try:
        _sendable_address(value)
    except ValueError:
        return False
    return True


def is_email_address(value: str) -> bool:
    try:
        _email_address(value)
    except ValueError:
        return False
    return True
