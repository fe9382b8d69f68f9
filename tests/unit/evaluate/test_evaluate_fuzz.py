"""Fuzz parse_email (and the helpers that read raw bytes) with mutated real-looking messages.

Mutations: byte flips, truncations, duplicated header lines, random RFC 2047 words, huge headers,
random bytes spliced in.  The contract under test: never raise, and only hand out strings that a
PostgreSQL text column accepts.  Bounded to roughly 20 seconds.
"""
from __future__ import annotations

import base64

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.evaluate.context import MailboxContext
from services.evaluate.correlation import CorrelationSettings
from services.evaluate.decision import evaluate
from services.evaluate.lookups import Lookups, keys_for
from services.evaluate.parsing import (
    forwarded_message,
    generated_message_id,
    parse_email,
)

SEEDS: list[bytes] = [
    (
        b"From: =?utf-8?Q?J=C3=B6rg?= <j@customer.example>\r\nTo: owner@conduit.example, \"X, Y\" <x@y.example>\r\n"
        b"Subject: RE: Offer CRM:0001234\r\nDate: Mon, 6 Jan 2025 11:00:00 +0100\r\nMessage-ID: <a@b>\r\n"
        b"In-Reply-To: <p@q>\r\nReferences: <r@s>\r\n <p@q>\r\nThread-Index: "
        + base64.b64encode(bytes(27)) + b"\r\n"
        b'Content-Type: multipart/mixed; boundary="o"\r\n\r\n--o\r\nContent-Type: multipart/alternative; boundary="i"\r\n\r\n'
        b"--i\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe\r\n"
        b"--i\r\nContent-Type: text/html\r\n\r\n<p>hi</p>\r\n--i--\r\n--o\r\nContent-Type: message/rfc822\r\n\r\n"
        b"From: c@d.example\r\nSubject: inner\r\n\r\ninner body\r\n--o\r\nContent-Type: application/pdf; name=a.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--o--\r\n"
    ),
    b"From: a@b.example\nTo: c@d.example\nSubject: plain\nContent-Type: text/plain; charset=iso-8859-1\n\nCaf\xe9\n",
    (
        b"From: x@y.example\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes("Hällo wörld ".encode() * 20)
    ),
]

ENCODED_WORD = st.builds(
    lambda charset, kind, payload: f"=?{charset}?{kind}?{payload}?=".encode("utf-8", "surrogatepass"),
    st.sampled_from(["utf-8", "iso-8859-1", "utf-16", "x-unknown", "unicode_escape", "", "big5", "UTF-8*en"]),
    st.sampled_from(["Q", "B", "q", "b", "X"]),
    st.text(max_size=40),
)


@st.composite
def mutated(draw) -> bytes:
    raw = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "truncate", "duplicate", "encoded", "huge", "splice", "delete"]))
        if not raw and op not in ("huge", "splice", "encoded"):
            continue
        if op == "flip":
            at = draw(st.integers(0, len(raw) - 1))
            raw[at] = draw(st.integers(0, 255))
        elif op == "truncate":
            del raw[draw(st.integers(0, len(raw))) :]
        elif op == "duplicate":
            lines = bytes(raw).split(b"\n")
            at = draw(st.integers(0, len(lines) - 1))
            lines[at:at] = [lines[at]] * draw(st.integers(1, 50))
            raw = bytearray(b"\n".join(lines))
        elif op == "encoded":
            header = draw(st.sampled_from([b"Subject: ", b"From: ", b"To: ", b"Thread-Topic: "]))
            words = b" ".join(draw(st.lists(ENCODED_WORD, min_size=1, max_size=5)))
            raw[0:0] = header + words + draw(st.sampled_from([b" <a@b.example>\r\n", b"\r\n", b"\n"]))
        elif op == "huge":
            size = draw(st.sampled_from([1_000, 70_000, 300_000]))
            raw[0:0] = b"X-Huge: " + b"h" * size + b"\r\n"
        elif op == "splice":
            at = draw(st.integers(0, len(raw)))
            raw[at:at] = draw(st.binary(max_size=64))
        else:
            start = draw(st.integers(0, len(raw) - 1))
            del raw[start : start + draw(st.integers(1, 200))]
    return bytes(raw)


def _check(raw: bytes) -> None:
    parsed = parse_email(raw)
    assert not [d for d in parsed.defects if d.startswith("internal_error")], parsed.defects
    for text in (parsed.subject, parsed.preview, parsed.message_id or "", parsed.thread_topic or "",
                 *parsed.references, *parsed.in_reply_to, *(a.name for a in parsed.all_addresses)):
        assert "\x00" not in text
        text.encode("utf-8")
    inner = forwarded_message(raw)
    if inner is not None:
        parse_email(inner)
    generated_message_id(raw)
    settings = CorrelationSettings(smart_matching=True)
    keys_for([parsed], settings)
    for option in ("all", "responses", "known_records", "email_enabled_records"):
        box = MailboxContext("m", "user", "u", "owner@conduit.example", tracking=option)
        evaluate(parsed, box, Lookups(), settings)


FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(mutated())
def test_mutated_messages_never_raise(raw: bytes) -> None:
    _check(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_never_raise(raw: bytes) -> None:
    _check(raw)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(ENCODED_WORD, st.binary(max_size=20)), max_size=10))
def test_random_encoded_word_subjects_never_raise(parts: list[bytes]) -> None:
    _check(b"Subject: " + b" ".join(parts) + b"\r\nFrom: " + b"".join(parts[:2]) + b" <a@b.example>\r\n\r\nx")
