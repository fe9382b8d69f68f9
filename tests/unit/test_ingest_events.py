"""What ingest puts on `email.received`: the batch template encodes every event byte for byte as the
model (``encode_event`` of ``Envelope[EmailReceivedV1]``) would, or leaves it to the model; and the
message key and From address, found without scanning the header with regular expressions, are the
ones the earlier regular-expression search found."""
from __future__ import annotations

import hashlib
import logging
import re
from datetime import datetime, timedelta, timezone
from uuid import UUID, uuid4

import pytest
from asyncpg.pgproto.pgproto import UUID as PgUUID
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.ingest import received_events
from services.ingest.received_events import ReceivedBatch, event_ids
from shared.addresses import address_pairs
from shared.events.envelope import Envelope, encode_event
from shared.events.payloads import EmailReceivedV1
from shared.mime import from_address, generated_message_id, header_block, message_key, normalize_message_id

ORG = UUID("0b7e4f2a-1c3d-4e5f-8a9b-0c1d2e3f4a5b")
MAILBOX = UUID("9f8e7d6c-5b4a-4392-a1b0-c9d8e7f6a5b4")
OCCURRED = datetime(2026, 11, 27, 7, 30, 1, 234567, tzinfo=timezone.utc)
SHA = hashlib.sha256(b"x").hexdigest()


def by_model(event_id: str, fields: dict, *, source: str = "imap", occurred_at: datetime = OCCURRED) -> bytes:
    """The encoding before the template: one validated envelope per event."""
    return encode_event(Envelope[EmailReceivedV1](
        event_id=UUID(event_id), occurred_at=occurred_at, type="email.received", schema_version=1,
        producer="ingest", organization_id=ORG,
        data=EmailReceivedV1(mailbox_id=MAILBOX, source=source, **fields),
    ))


def outcome(produce) -> bytes | type[Exception]:
    try:
        return produce()
    except ValidationError:
        return ValidationError


TEXT = st.one_of(
    st.sampled_from(["INBOX", "Entwürfe", 'say "hi"', "back\\slash", "tab\there", "\x01", "\x00", "a\x00b", "\x7f", "\u2028",
                     "😀", "", " padded ", "x" * 1000, "x" * 1001, "<a@b>", "a@b"]),
    st.text(max_size=30),
)
ZONES = st.sampled_from([timezone.utc, timezone(timedelta(0)), timezone(timedelta(hours=2)),
                         timezone(timedelta(hours=-5, minutes=-30)), timezone(timedelta(seconds=61))])
AWARE = st.builds(lambda d, z: d.replace(tzinfo=z), st.datetimes(min_value=datetime(1, 1, 2)), ZONES)
# Values the model accepts (the template's own path) ...
VALID = st.fixed_dictionaries({
    "folder": st.one_of(st.just("INBOX"), st.text(max_size=30)),
    "uid": st.one_of(st.none(), st.integers(1, 2**32)),
    "uidl": st.one_of(st.none(), st.text(max_size=30)),
    "raw_sha256": st.just(SHA),
    "size": st.integers(0, 10**9),
    "message_id": st.one_of(st.none(), TEXT.filter(lambda t: len(t) <= 1000)),
    "received_at": st.one_of(st.none(), AWARE),
    "forwarded_by": st.sampled_from([None, "alice@example.com", "x.y+z@sub.example.org"]),
})
# ... and anything, at the limits and past them (the model's to accept or refuse).
FIELDS = st.fixed_dictionaries({
    "folder": TEXT,
    "uid": st.one_of(st.none(), st.integers(-2, 2**33), st.just(True)),
    "uidl": st.one_of(st.none(), TEXT, st.just("u" * 200), st.just("u" * 201)),
    "raw_sha256": st.one_of(st.just(SHA), st.just(SHA.upper()), st.just(SHA[:-1]), st.just(SHA + "\n")),
    "size": st.one_of(st.integers(-1, 10**9)),
    "message_id": st.one_of(st.none(), TEXT, st.just("m" * 1000), st.just("m" * 1001)),
    "received_at": st.one_of(st.none(), AWARE, st.datetimes()),   # naive: refused
    "forwarded_by": st.one_of(st.none(), st.sampled_from(
        ["alice@example.com", "Alice@Example.COM", " bob@example.org", "not an address", "é@example.com"])),
})


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(VALID, FIELDS), st.sampled_from(["imap", "pop3", "ews", "graph", "smtp"]))
@example({"folder": "INBOX", "uid": 7, "uidl": None, "raw_sha256": SHA, "size": 7000, "message_id": "a@b",
          "received_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=1))),
          "forwarded_by": None}, "imap")
def test_template_encodes_as_the_model(fields: dict, source: str) -> None:
    first, second = str(uuid4()), str(uuid4())
    batch = ReceivedBatch(ORG, MAILBOX, source, occurred_at=OCCURRED, ids=iter([first, second]))
    args = [fields[k] for k in ("folder", "uid", "uidl", "raw_sha256", "size", "message_id", "received_at",
                                "forwarded_by")]
    assert outcome(lambda: batch.encode(*args)) == outcome(lambda: by_model(first, fields, source=source))
    # The second event of a batch is not checked against the model: it must be equal by itself.
    assert outcome(lambda: batch.encode(*args)) == outcome(lambda: by_model(second, fields, source=source))
    filled = batch._fill(second, *args) if batch._template else None
    if filled is not None:
        assert filled == by_model(second, fields, source=source)
    assert batch._template == (source != "smtp")


@pytest.mark.parametrize("uuid_type", [UUID, PgUUID], ids=["uuid", "asyncpg"])
def test_the_usual_event_is_written_from_the_template(uuid_type: type, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """As ingest calls it (ids as asyncpg returns them): only the first event goes through the model."""
    batch = ReceivedBatch(uuid_type(str(ORG)), uuid_type(str(MAILBOX)), "imap", occurred_at=OCCURRED)
    through_model = []
    original = batch._through_model
    monkeypatch.setattr(batch, "_through_model", lambda *args: through_model.append(args) or original(*args))
    received = datetime(2026, 11, 27, 8, 0, tzinfo=timezone(timedelta(hours=1)))
    values = [batch.encode("INBOX", uid, None, SHA, 7000, f"m{uid}@example.org", received, None) for uid in range(1, 5)]
    assert batch._template and batch._checked and len(through_model) == 1
    for value in values:
        event = Envelope[EmailReceivedV1].model_validate_json(value)
        assert value == by_model(str(event.event_id), event.data.model_dump(exclude={"mailbox_id", "source"}))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_template_that_differs_from_the_model_sends_the_batch_through_the_model(
        caplog: pytest.LogCaptureFixture) -> None:
    batch = ReceivedBatch(ORG, MAILBOX, "imap", occurred_at=OCCURRED)
    batch._shared = batch._shared.replace('"producer":"ingest"', '"producer":"other"')
    values = [batch.encode("INBOX", uid, None, SHA, 10, None, None, None) for uid in (1, 2)]
    assert all(b'"producer":"ingest"' in v for v in values)
    assert not batch._template
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    errors[0].expected = True   # this test provokes it


def test_template_limits_are_the_models() -> None:
    limits = {name: next(m.max_length for m in field.metadata if hasattr(m, "max_length"))
              for name, field in EmailReceivedV1.model_fields.items() if name in ("folder", "uidl", "message_id")}
    assert limits == {"folder": received_events.MAX_FOLDER, "uidl": received_events.MAX_UIDL,
                      "message_id": received_events.MAX_MESSAGE_ID}
    assert received_events.SOURCES == {"imap", "pop3", "ews", "graph"}
    (uid_limit,) = [m.le for m in EmailReceivedV1.model_fields["uid"].metadata if hasattr(m, "le")]
    assert uid_limit == received_events.MAX_UID


def test_event_ids_are_random_uuid4_text() -> None:
    ids = event_ids()
    drawn = [next(ids) for _ in range(3000)]
    assert len(set(drawn)) == len(drawn)
    for text in drawn:
        parsed = UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == "specified in RFC 4122"
    # Every random digit varies (the version digit is fixed, the variant digit takes 8, 9, a, b).
    assert {text[19] for text in drawn} == set("89ab")
    assert all(len({text[i] for text in drawn}) == 16 for i in range(36) if i not in (8, 13, 14, 18, 19, 23))


# -- message key and From address ------------------------------------------------------------------

_OLD_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_OLD_HEADER_END = re.compile(rb"\r?\n\r?\n")
_OLD_FROM = re.compile(rb"^from:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def old_header_block(raw: bytes, limit: int = 256 * 1024) -> bytes:
    end = _OLD_HEADER_END.search(raw, 0, limit)
    return raw[: end.start()] if end else raw[:limit]


def old_message_key(raw: bytes) -> str:
    match = _OLD_MESSAGE_ID.search(old_header_block(raw))
    if match:
        normalized = normalize_message_id(match.group(1).decode("utf-8", "replace"))
        if normalized:
            return normalized
    return generated_message_id(raw)  # the scan is under test here, not the id made without one


def old_from_address(raw: bytes) -> str | None:
    match = _OLD_FROM.search(old_header_block(raw))
    if not match:
        return None
    # The field as the regular expression found it; its value parsed as an address list (the scan is
    # under test here, not the parsing: shared/addresses.py has its own tests).
    for _, address in address_pairs(match.group(1).decode("utf-8", "replace").replace("\r", "").replace("\n", "")):
        if "@" in address:
            return address.strip().lower()
    return None


PIECES = st.sampled_from([
    b"Message-ID: <a@b>", b"message-id:<x.y@z>", b"MESSAGE-ID: \t<spaced id@h>", b"Message-Id: no-brackets@h",
    b"Message-ID: <a@b> <c@d>", b"Message-ID: <<a@b>>", b"Message-ID:", b"Message-ID: <>", b"Message-ID: <\xc3\xa9@h>",
    b"Message-ID: <\xff@h>", b"Message-ID: <a\x01b@h>", b"Message-ID: <a\x7fb@h>", b"Message-ID: <a\x1fb@h>",
    b"Message-ID: <a@b>\r\r", b"Message-ID: <a@b> ", b"Message-ID: <a@b>\t", b"Message-ID:  <a@b>\r\n\t<c@d>",
    b"Message-ID: <" + b"l" * 996 + b">", b"Message-ID: <" + b"l" * 995 + b">", b"X-Message-ID: <not@this>",
    b" Message-ID: <folded@in>",
    b"From: Alice <Alice@Example.COM>", b"from: bob@example.org", b"FROM: \"X, Y\" <x@y>", b"From: nobody",
    b"From:", b"Subject: hi", b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\n\n", b"\n\r\n", b"\r\n\n", b" ", b"\t",
    b"\x00", b"body text", b"\xe9",
])


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.one_of(PIECES, st.binary(max_size=8)), max_size=14))
@example([b"Message-ID: <a@b>", b"\r\n", b"\r\n", b"Message-ID: <c@d>"])
@example([b"\n", b"\r\n", b"Message-ID: <a@b>"])
@example([b"Subject: x\r", b"\n\r\n", b"Message-ID: <a@b>"])
def test_message_key_and_from_address_find_what_the_regex_search_found(pieces: list[bytes]) -> None:
    raw = b"".join(pieces)
    assert header_block(raw) == old_header_block(raw)
    for limit in (0, 1, 5, 17):
        assert header_block(raw, limit) == old_header_block(raw, limit)
    assert message_key(raw) == old_message_key(raw)
    assert from_address(raw) == old_from_address(raw)
