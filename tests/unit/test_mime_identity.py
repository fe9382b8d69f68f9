"""shared.mime: the identity ingest and evaluate give a message, and who forwarded it to a forward
mailbox.  Plain bytes in, no peers."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.mime import (
    MAX_ID_LENGTH,
    forwarder_address,
    from_address,
    generated_message_id,
    message_key,
    normalize_message_id,
)

BODY = b"From: Cust <cust@customer.example>\r\nTo: a@example.com, b@example.com\r\nSubject: s\r\n\r\nbody\r\n"


def test_message_id_limit_counts_utf8_bytes():
    ascii_id = "a" * (MAX_ID_LENGTH - 2) + "@h"
    assert normalize_message_id(f"<{ascii_id}>") == ascii_id
    wide = "\u4e00" * 400 + "@h"  # 402 characters, 1,202 bytes
    assert normalize_message_id(f"<{wide}>") is None
    assert normalize_message_id("<" + "é" * 300 + "@h>") == "é" * 300 + "@h"  # 602 bytes: fine
    raw = ("Message-ID: <" + wide + ">\r\n").encode() + BODY
    assert message_key(raw) == generated_message_id(raw)


def test_generated_message_id_ignores_trace_fields():
    first = b"Return-Path: <cust@customer.example>\r\nDelivered-To: a@example.com\r\nReceived: from mx1\r\n\tby a; x\r\n"
    second = b"X-Original-To: b@example.com\r\nDelivered-To: b@example.com\r\nReceived: from mx2 by b; y\r\n"
    key = message_key(first + BODY)
    assert key == message_key(second + BODY) == generated_message_id(BODY)
    assert key.startswith("conduit-") and key.endswith("@generated.invalid")
    assert generated_message_id(BODY.replace(b"\r\n", b"\n")) == key  # a copy stored with LF line ends
    assert generated_message_id(BODY.replace(b"body", b"other")) != key
    assert generated_message_id(BODY.replace(b"Subject: s", b"Subject: t")) != key
    assert generated_message_id(BODY.replace(b"To: a@", b"To: c@")) != key


def test_generated_message_id_never_raises():
    for value in (b"", b"\r\n\r\n", b"\x00\xff", b"From:\r\n \r\n", bytearray(BODY), memoryview(BODY), "text", None, 5):
        assert generated_message_id(value).endswith("@generated.invalid")  # type: ignore[arg-type]
    assert generated_message_id(bytearray(BODY)) == generated_message_id(BODY)


def test_forwarder_is_who_redirected_it():
    redirected = b"Resent-From: Rita <Rita@Example.com>\r\nResent-To: fwd@example.com\r\n" + BODY
    assert forwarder_address(redirected) == "rita@example.com"
    twice = b"Resent-From: last@example.com\r\nResent-Date: x\r\nResent-From: first@example.com\r\n" + BODY
    assert forwarder_address(twice) == "last@example.com"  # the topmost block is the newest
    assert forwarder_address(b"Resent-Sender: s@example.com\r\n" + BODY) == "s@example.com"
    assert forwarder_address(b"Resent-From: nobody\r\n" + BODY) is None  # redirected by someone unknown, not by the author
    assert forwarder_address(BODY) == "cust@customer.example"  # forwarded: the From
    assert forwarder_address(b"Subject: x\r\n\r\nResent-From: body@example.com\r\n") is None
    assert forwarder_address(b"") is None


def test_the_address_is_the_address_not_what_the_display_name_or_a_comment_holds():
    """DMARC vouches for the address, not the display name: mail from mallory is not the CEO's."""
    spoof = b'From: "ceo@example.com" <mallory@evil.example>\r\n' + BODY.split(b"\r\n", 1)[1]
    assert from_address(spoof) == forwarder_address(spoof) == "mallory@evil.example"
    commented = b"From: Alice (formerly al@old.example) <Alice@Example.com>\r\n" + BODY.split(b"\r\n", 1)[1]
    assert forwarder_address(commented) == "alice@example.com"
    redirect = b'Resent-From: "bob@example.com" <alice@example.com>\r\n' + BODY
    assert forwarder_address(redirect) == "alice@example.com"
    folded = b"From: \"Alice, the\r\n ceo@example.com one\" <alice@example.com>\r\n" + BODY.split(b"\r\n", 1)[1]
    assert from_address(folded) == "alice@example.com"
    assert from_address(b"From: undisclosed-recipients:;\r\n\r\n") is None
    # An address in an unquoted display name, and a quoted display name with no address at all.
    rest = BODY.split(b"\r\n", 1)[1]
    assert forwarder_address(b"From: ceo@example.com <mallory@evil.example>\r\n" + rest) == "mallory@evil.example"
    assert from_address(b'From: "ceo@example.com"\r\n' + rest) is None
    assert forwarder_address(b'Resent-From: "ceo@example.com", bob@example.org\r\n' + BODY) == "bob@example.org"
    # Nor out of a quoted name followed by a comment; an address with spaces and a comment inside
    # (obsolete, but valid) is one.
    assert from_address(b'From: "ceo@bank.example" (@bank.example)\r\n' + rest) is None
    assert forwarder_address(b'Resent-From: "ceo@bank.example" (x), me@bank.example\r\n' + BODY) == "me@bank.example"
    assert from_address(b'From: Bob <bob @ (work) example.com>\r\n' + rest) == "bob@example.com"


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.one_of(st.sampled_from([
    b"From: Alice <alice@example.com>", b"from: bob@example.org", b"Resent-From: r@example.com", b"resent-sender: s@x",
    b"Resent-From: nobody", b"Resent-Date: x", b"\r\n", b"\n", b" ", b"\t", b"Subject: resent-from: z@z"]),
    st.binary(max_size=8)), max_size=12))
def test_forwarder_is_from_unless_redirected(pieces: list[bytes]) -> None:
    raw = b"".join(pieces)
    found = forwarder_address(raw)
    if b"resent-" not in raw.lower():
        assert found == from_address(raw)
    assert found is None or found == found.lower()


def test_an_address_the_parser_cannot_read_is_no_address():
    # email.utils recurses on nested comments: 3,000 "(" raised RecursionError, which failed the
    # whole batch of a forward mailbox at every sync, so no later mail of it was ever ingested.
    raw = b"From: " + b"(" * 3000 + b"\r\nResent-From: " + b"(" * 3000 + b"\r\nSubject: x\r\n\r\nbody\r\n"
    assert from_address(raw) is None
    assert forwarder_address(raw) is None
