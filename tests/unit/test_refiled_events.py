"""`email.received`'s ``refiled`` (a message announced again to be filed under a folder rule's
record): ingest's batch template writes it as the model does, an event from before the field reads
as not refiled, and the health aggregate does not take a refiled event for received mail."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from uuid import UUID, uuid4

import jsonschema
import pytest

from services.evaluate.health import MessageReceived, observations
from services.ingest.received_events import ReceivedBatch
from shared.events.envelope import Envelope, decode_event, encode_event
from shared.events.payloads import EmailReceivedV1
from shared.events.schemas import schema_documents
from shared.events.topics import EMAIL_RECEIVED

ORG = UUID("0b7e4f2a-1c3d-4e5f-8a9b-0c1d2e3f4a5b")
MAILBOX = UUID("9f8e7d6c-5b4a-4392-a1b0-c9d8e7f6a5b4")
OCCURRED = datetime(2026, 11, 27, 7, 30, 1, 234567, tzinfo=timezone.utc)
SHA = hashlib.sha256(b"x").hexdigest()


@pytest.mark.parametrize("refiled", [False, True])
def test_the_template_writes_refiled_as_the_model(refiled: bool) -> None:
    first, second = str(uuid4()), str(uuid4())
    batch = ReceivedBatch(ORG, MAILBOX, "imap", occurred_at=OCCURRED, ids=iter([first, second]))
    args = ("Customers/Acme", 87, None, SHA, 7214, "m@example.org", OCCURRED, None)
    values = [batch.encode(*args, refiled=refiled) for _ in range(2)]
    assert batch._template   # the second event came from the template, not the model
    for event_id, value in zip((first, second), values):
        assert value == encode_event(Envelope[EmailReceivedV1](
            event_id=UUID(event_id), occurred_at=OCCURRED, type="email.received", schema_version=1,
            producer="ingest", organization_id=ORG,
            data=EmailReceivedV1(mailbox_id=MAILBOX, source="imap", folder="Customers/Acme", uid=87, raw_sha256=SHA,
                                 size=7214, message_id="m@example.org", received_at=OCCURRED, refiled=refiled)))
        assert json.loads(value)["data"]["refiled"] is refiled


def _event(**data) -> dict:
    return {"event_id": str(uuid4()), "type": "email.received", "schema_version": 1, "producer": "ingest",
            "organization_id": str(ORG), "occurred_at": OCCURRED.isoformat(),
            "data": {"mailbox_id": str(MAILBOX), "source": "imap", "raw_sha256": SHA, "size": 10, **data}}


def test_an_event_without_the_field_is_valid_and_not_refiled() -> None:
    schema = json.loads(schema_documents()[f"{EMAIL_RECEIVED.schema_name}.json"])
    old = _event()
    jsonschema.validate(old, schema)
    assert decode_event(json.dumps(old).encode(), EMAIL_RECEIVED.envelope).data.refiled is False
    jsonschema.validate(_event(refiled=True), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_event(refiled="yes"), schema)


def test_the_health_aggregate_does_not_count_a_refiled_event_as_received_mail() -> None:
    new = decode_event(json.dumps(_event()).encode(), EMAIL_RECEIVED.envelope)
    again = decode_event(json.dumps(_event(refiled=True, folder="Customers/Acme")).encode(), EMAIL_RECEIVED.envelope)
    assert observations("email.received", new) == [MessageReceived(MAILBOX, ORG, OCCURRED)]
    assert observations("email.received", again) == []
