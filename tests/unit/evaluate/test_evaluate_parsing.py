"""parse_email: what it extracts, and that it never raises on real-world and hostile input."""
from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.evaluate.parsing import (
    ParsedEmail,
    decode_header_value,
    forwarded_message,
    generated_message_id,
    normalize_email_address,
    parse_email,
)
from tests.support.mailboxes import cpython_email_messages

CPYTHON_MESSAGES = cpython_email_messages()
DATA = Path(__file__).parent / "data"

# Hostile samples of our own, so the suite means something where the stdlib tests are not installed.
NASTY: list[bytes] = [
    b"",
    b"\r\n\r\n",
    b"no colon at all",
    b"Subject: only headers, no blank line",
    b" leading continuation\r\nSubject: x\r\n\r\nbody",
    b"Subject: \x00\x00nul\x00\r\nFrom: a\x00@b.example\r\n\r\n\x00body",
    b"Subject: caf\xe9 cr\xe8me\r\nFrom: Ren\xe9 <rene@example.com>\r\n\r\nlatin-1 headers",
    "Subject: Grüße\r\nFrom: Jörg <jörg@bücher.example>\r\n\r\nutf-8 headers".encode(),
    b"Subject: =?utf-8?B?not base64!!?= =?x-unknown?Q?abc?= =?utf-8?Q?=ZZ?=\r\n\r\n",
    b"Subject: =?unicode_escape?Q?=5Cud800?= =?raw-unicode-escape?B?XHVkODAw?=\r\n\r\n",
    b"Subject: =?utf-16?B?2D0=?=\r\n\r\n",
    b"From: <<<@>>>, \"unterminated, @@, (comment <a@b>\r\nTo: ;;;,,,\r\nCc: group: a@b.example, c@d.example;\r\n\r\n",
    b"Date: yesterday at noon\r\nMessage-ID: no brackets here\r\n\r\n",
    b"Date: Mon, 99 Foo 99999 99:99:99 +9999\r\n\r\n",
    b"Date: Fri, 31 Dec 9999 23:59:59 -1400\r\n\r\n",
    b"Thread-Index: !!!!\r\n\r\n",
    b"Thread-Index: AQ==\r\n\r\n",
    b"Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\nno boundary param",
    b"Content-Type: multipart/mixed; boundary=\"\"\r\n\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n--b\r\n",
    b"Content-Type: text/plain; charset=no-such-charset\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!!====",
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ=\r\n=E2=82",
    b"Content-Type: message/rfc822\r\n\r\n",
    b"From: a@b.example\r\n" + b"X-Long: " + b"a" * 300_000 + b"\r\n\r\nbody",
    b"Subject: " + b"=?utf-8?q?x?= " * 20_000 + b"\r\n\r\n",
    b"References: " + b"<r@x> " * 10_000 + b"\r\n\r\n",
    b"\r\r\rSubject: cr only\r\rFrom: a@b.example\r\r\rbody",
    b"From: a@[127.0.0.1]\r\nTo: b@[IPv6:::1], c@xn--bcher-kva.example, d@-bad-.example\r\n\r\n",
]


def _all_samples() -> list[bytes]:
    samples = list(NASTY)
    if DATA.is_dir():
        samples += [p.read_bytes() for p in sorted(DATA.iterdir()) if p.is_file()]
    return samples


def _check_safe(parsed: ParsedEmail) -> None:
    """Every string must be fit for PostgreSQL text: no NUL, encodable as UTF-8."""
    strings = [parsed.subject, parsed.preview, parsed.message_id or "", parsed.thread_topic or ""]
    strings += list(parsed.in_reply_to) + list(parsed.references) + list(parsed.defects)
    for address in parsed.all_addresses:
        strings += [address.name, address.email]
    for text in strings:
        assert "\x00" not in text
        text.encode("utf-8")
    assert len(parsed.preview) <= 500
    if parsed.date is not None:
        assert parsed.date.tzinfo is not None and parsed.date.utcoffset().total_seconds() == 0


@pytest.mark.skipif(not CPYTHON_MESSAGES, reason="CPython's test.test_email data is not installed")
@pytest.mark.parametrize("path", CPYTHON_MESSAGES, ids=lambda p: p.name)
def test_cpython_email_test_data_never_raises(path: Path):
    raw = path.read_bytes()
    parsed = parse_email(raw)
    assert not [d for d in parsed.defects if d.startswith("internal_error")]
    _check_safe(parsed)
    forwarded_message(raw)
    generated_message_id(raw)


@pytest.mark.parametrize("raw", _all_samples(), ids=lambda raw: repr(raw[:30]))
def test_nasty_samples_never_raise(raw: bytes):
    parsed = parse_email(raw, max_header_bytes=64 * 1024)
    assert not [d for d in parsed.defects if d.startswith("internal_error")], parsed.defects
    _check_safe(parsed)
    assert parsed.size == len(raw)
    forwarded_message(raw)
    assert generated_message_id(raw).endswith("@generated.invalid")


REALISTIC = (
    b"Received: from mx.customer.example by mail.conduit.example; Mon, 6 Jan 2025 10:00:02 +0000\r\n"
    b"From: =?utf-8?Q?J=C3=B6rg_M=C3=BCller?= <Joerg.Mueller@Customer.EXAMPLE>\r\n"
    b'To: "Owner, The" <owner@conduit.example>, second@conduit.example\r\n'
    b"Cc: =?iso-8859-1?q?Ren=E9?= <rene@b\xc3\xbccher.example>\r\n"
    b"Reply-To: replies@customer.example\r\n"
    b"Subject: =?utf-8?B?UkU6IEFuZ2Vib3Qg?=\r\n =?utf-8?B?w7xiZXI=?= CRM:0001234\r\n"
    b"Date: Mon, 6 Jan 2025 11:00:00 +0100\r\n"
    b"Message-ID: < AbC.123@Customer.example >\r\n"
    b"In-Reply-To: <parent@conduit.example>\r\n"
    b"References: <root@conduit.example>\r\n <parent@conduit.example>\r\n"
    b"Thread-Index: " + base64.b64encode(bytes(range(22)) + b"12345") + b"\r\n"
    b"Thread-Topic: Angebot\r\n"
    b"Auto-Submitted: auto-replied\r\n"
    b"X-Priority: 1 (Highest)\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="outer"\r\n'
    b"\r\n"
    b"preamble\r\n"
    b"--outer\r\n"
    b'Content-Type: multipart/alternative; boundary="inner"\r\n'
    b"\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Gr=C3=BC=C3=9Fe,\r\n\r\nhier ist   das Angebot.=\r\n Danke.\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<html><body><p>HTML version</p></body></html>\r\n"
    b"--inner--\r\n"
    b"--outer\r\n"
    b'Content-Type: application/pdf; name="offer.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"JVBERi0xLjQK\r\n"
    b"--outer--\r\n"
)


def test_realistic_message_fields():
    parsed = parse_email(REALISTIC)
    assert parsed.message_id == "AbC.123@Customer.example"
    assert parsed.in_reply_to == ("parent@conduit.example",)
    assert parsed.references == ("root@conduit.example", "parent@conduit.example")
    assert parsed.subject == "RE: Angebot über CRM:0001234"
    assert parsed.from_.name == "Jörg Müller"
    assert parsed.from_.email == "joerg.mueller@customer.example"
    assert [(a.name, a.email) for a in parsed.to] == [("Owner, The", "owner@conduit.example"), ("", "second@conduit.example")]
    assert parsed.cc[0].name == "René"
    assert parsed.cc[0].email == "rene@xn--bcher-kva.example"
    assert parsed.reply_to[0].email == "replies@customer.example"
    assert parsed.date == datetime(2025, 1, 6, 10, 0, tzinfo=UTC)
    assert parsed.thread_root == base64.b64encode(bytes(range(22))).decode()
    assert parsed.thread_topic == "Angebot"
    assert parsed.auto_submitted == "auto-replied" and parsed.is_automated
    assert parsed.importance == "high"
    assert parsed.content_type == "multipart/mixed"
    assert parsed.preview == "Grüße, hier ist das Angebot. Danke."
    assert parsed.has_attachments and not parsed.has_forwarded_message
    assert parsed.defects == ()
    assert parsed.participants == {
        "joerg.mueller@customer.example", "owner@conduit.example", "second@conduit.example", "rene@xn--bcher-kva.example"
    }


def test_lf_only_message_and_html_preview():
    raw = (
        b"From: a@b.example\nSubject: hi\nContent-Type: text/html; charset=iso-8859-1\n\n"
        b"<html><head><style>p {color: red}</style></head><body><p>Caf\xe9 &amp; cr&egrave;me</p></body></html>\n"
    )
    parsed = parse_email(raw)
    assert parsed.preview == "Café & crème"
    assert parsed.defects == ("missing_message_id", "missing_date")


def test_preview_is_bounded_and_optional():
    raw = b"From: a@b.example\r\n\r\n" + b"word " * 100_000
    assert len(parse_email(raw).preview) == 500
    assert parse_email(raw, preview_chars=0).preview == ""


def test_base64_text_preview():
    body = base64.encodebytes("Héllo wörld ".encode() * 50)
    raw = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n" + body
    assert parse_email(raw).preview.startswith("Héllo wörld Héllo")


def test_defects_are_recorded():
    raw = b"Subject: =?utf-8?B?####?=\r\nFrom: not an address\r\nDate: never\r\nMessage-ID: <a b>\r\nSubject: dup\r\n\r\n"
    defects = parse_email(raw).defects
    assert "invalid_address:from" in defects
    assert "invalid_date" in defects
    assert "duplicate_header:subject" in defects
    assert "missing_message_id" not in defects


def test_message_id_forms():
    assert parse_email(b"Message-ID: bare@id.example\r\n\r\n").message_id == "bare@id.example"
    assert "message_id_without_brackets" in parse_email(b"Message-ID: bare@id.example\r\n\r\n").defects
    assert parse_email(b"Message-ID: <a@b> <c@d>\r\n\r\n").message_id == "a@b"
    assert parse_email(b"Message-ID: <fol\r\n ded@b>\r\n\r\n").message_id == "folded@b"
    parsed = parse_email(b"Message-ID:\r\n\r\n")
    assert parsed.message_id is None and "invalid_message_id" in parsed.defects


def test_references_without_brackets_and_limit():
    assert parse_email(b"References: a@b c@d\r\n\r\n").references == ("a@b", "c@d")
    many = b"References: " + b" ".join(b"<%d@x>" % i for i in range(200)) + b"\r\n\r\n"
    refs = parse_email(many).references
    assert len(refs) == 50 and refs[-1] == "199@x"


def test_huge_header_block_is_truncated_not_fatal():
    raw = b"From: a@b.example\r\n" + b"X-Filler: " + b"y" * 100 + b"\r\n" * 0 + (b"X-F: " + b"z" * 70 + b"\r\n") * 5000
    parsed = parse_email(raw + b"Subject: late\r\n\r\nbody", max_header_bytes=64 * 1024)
    assert "header_block_truncated" in parsed.defects
    assert parsed.from_.email == "a@b.example"


def test_normalize_email_address():
    assert normalize_email_address(" John.Doe@Example.COM ") == "john.doe@example.com"
    assert normalize_email_address("jörg@bücher.example") == "jörg@xn--bcher-kva.example"
    assert normalize_email_address("a@b.example.") == "a@b.example"
    assert normalize_email_address("a@[127.0.0.1]") == "a@[127.0.0.1]"
    for bad in ("", "a", "@b", "a@", "a b@c", "a@b c", "a@-b-.example", "a@b..c", ".a@b", "a@" + "x" * 300):
        assert normalize_email_address(bad) is None, bad


def test_decode_header_value():
    assert decode_header_value("=?utf-8?q?a?= =?utf-8?q?b?=") == "ab"  # whitespace between words dropped
    assert decode_header_value("x =?utf-8?q?a?= y") == "x a y"
    # a multibyte character split across two words
    euro = "€".encode()
    split = f"=?utf-8?B?{base64.b64encode(euro[:1]).decode()}?= =?utf-8?B?{base64.b64encode(euro[1:]).decode()}?="
    assert decode_header_value(split) == "€"
    assert decode_header_value("=?x-unknown?q?caf=E9?=") == "café"  # falls back to cp1252
    assert decode_header_value("=?utf-8*en?q?hi?=") == "hi"  # RFC 2231 language tag
    assert "\x00" not in decode_header_value("=?utf-8?q?a=00b?=")
    assert "\ud800" not in decode_header_value("=?raw-unicode-escape?q?=5Cud800?=")


def test_forwarded_message_returns_inner_raw():
    inner = b"From: customer@customer.example\r\nSubject: original\r\nMessage-ID: <inner@x>\r\n\r\nhi\r\n"
    outer = (
        b"From: user@conduit.example\r\nTo: forward@conduit.example\r\n"
        b'Content-Type: multipart/mixed; boundary="f"\r\n\r\n'
        b"--f\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--f\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"--f--\r\n"
    )
    assert parse_email(outer).has_forwarded_message
    found = forwarded_message(outer)
    assert found is not None and parse_email(found).message_id == "inner@x"
    assert parse_email(found).from_.email == "customer@customer.example"


def test_forwarded_message_base64_encoded_part():
    inner = b"From: c@customer.example\r\nMessage-ID: <b64@x>\r\n\r\nhi\r\n"
    outer = (
        b'Content-Type: multipart/mixed; boundary="f"\r\n\r\n'
        b"--f\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(inner) + b"--f--\r\n"
    )
    assert parse_email(forwarded_message(outer)).message_id == "b64@x"


def test_forwarded_message_absent():
    assert forwarded_message(REALISTIC) is None
    assert forwarded_message(b"") is None
    assert forwarded_message(b"garbage") is None


def test_generated_message_id_is_stable_across_trace_headers():
    raw = b"From: a@b.example\r\nTo: c@d.example\r\nSubject: s\r\n\r\nbody\r\n"
    other_copy = b"Received: from elsewhere\r\nDelivered-To: x@y\r\n" + raw
    first = generated_message_id(raw)
    assert first == generated_message_id(other_copy)
    assert first.startswith("conduit-") and first.endswith("@generated.invalid")
    assert first != generated_message_id(raw.replace(b"body", b"other"))


def test_generate_missing_id_option():
    raw = b"From: a@b.example\r\n\r\nbody"
    parsed = parse_email(raw, generate_missing_id=True)
    assert parsed.message_id == generated_message_id(raw)
    assert "missing_message_id" in parsed.defects
    assert parse_email(b"Message-ID: <m@x>\r\n\r\n", generate_missing_id=True).message_id == "m@x"


def test_non_bytes_input_does_not_raise():
    parsed = parse_email("not bytes")  # type: ignore[arg-type]
    assert any(d.startswith("internal_error") for d in parsed.defects)
