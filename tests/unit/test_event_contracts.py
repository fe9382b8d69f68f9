"""The checked-in JSON Schemas equal the models, and every documented example validates."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from shared.events.schemas import schema_documents
from shared.events.topics import TOPICS

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_schemas_match_the_models() -> None:
    for name, text in schema_documents().items():
        path = ROOT / "schemas" / name
        assert path.exists(), f"{path} missing: run `conduit schemas export`"
        assert path.read_text() == text, f"{path} is stale: run `conduit schemas export`"


def _examples(topic: str) -> list[dict]:
    doc = (ROOT / "docs" / "topics" / f"{topic}.md").read_text()
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", doc, flags=re.S)]


@pytest.mark.parametrize("topic", sorted(TOPICS))
def test_documented_examples_validate(topic: str) -> None:
    examples = _examples(topic)
    assert examples, f"docs/topics/{topic}.md has no example"
    schema = json.loads((ROOT / "schemas" / f"{TOPICS[topic].schema_name}.json").read_text())
    for example in examples:
        jsonschema.validate(example, schema)
        event = TOPICS[topic].envelope.model_validate(example)
        assert event.type == topic


@pytest.mark.parametrize("topic", sorted(TOPICS))
@pytest.mark.parametrize("change", [{"type": "email.other"}, {"schema_version": 2}, {"event_id": None}],
                         ids=["another type", "another version", "no event id"])
def test_an_event_not_of_the_topics_type_and_version_is_refused(topic: str, change: dict) -> None:
    from shared.errors import InvalidInput
    from shared.events.envelope import decode_event

    event = _examples(topic)[0] | change
    if change.get("event_id", "") is None:
        del event["event_id"]
    schema = json.loads((ROOT / "schemas" / f"{TOPICS[topic].schema_name}.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(event, schema)
    with pytest.raises(InvalidInput) as refused:
        decode_event(json.dumps(event).encode(), TOPICS[topic].envelope)
    assert refused.value.reason == "schema_error" and next(iter(change)) in str(refused.value)


def test_outbound_rejects_header_injection() -> None:
    from shared.errors import InvalidInput
    from shared.events.envelope import decode_event

    example = _examples("email.outbound")[0]
    for field, value in (("subject", "Hi\r\nBcc: victim@example.com"), ("to", ["a@example.com\r\nX: y"])):
        bad = json.loads(json.dumps(example))
        bad["data"][field] = value
        with pytest.raises(InvalidInput, match="schema"):
            decode_event(json.dumps(bad).encode(), TOPICS["email.outbound"].envelope)


def _outbound_data() -> dict:
    return json.loads(json.dumps(_examples("email.outbound")[0]["data"]))


def _set(data: dict, path: str, value) -> None:
    """``path`` names a field: ``subject``, ``cc.0``, ``headers.<name>``, ``headers:name`` (a header's
    name), ``attachments.0.filename``."""
    if path.startswith("headers:"):
        data["headers"] = {value: "x"}
        return
    *parents, last = path.split(".")
    target = data
    for part in parents:
        if part.isdigit():
            target = target[int(part)]
        elif part == "attachments":
            target = data["attachments"] = data.get("attachments") or [{"filename": "a.txt", "content_base64": "aGk="}]
        else:
            target = target.setdefault(part, [] if part in ("cc", "bcc") else {})
    if isinstance(target, list):
        target[:] = [value]
    else:
        target[last] = value


INJECTABLE = ["idempotency_key", "subject", "sender_email", "to.0", "cc.0", "bcc.0", "headers.X-Campaign", "headers:name",
              "attachments.0.filename", "attachments.0.content_type", "attachments.0.content_id"]


@pytest.mark.parametrize("field", INJECTABLE)
@pytest.mark.parametrize("breaker", ["\r\n", "\n", "\r", "\x00"])
def test_no_field_that_reaches_a_header_takes_a_line_break(field: str, breaker: str) -> None:
    """Every field that may end up in a header refuses CR, LF and NUL: dispatch rejects the request
    (header_injection, or schema_error where the value does not even have its form, as an address),
    and the published
    JSON Schema refuses it too."""
    from services.dispatch.service import _validated
    from shared.errors import InvalidInput

    data = _outbound_data()
    _validated(data)  # the example itself is fine
    value = f"a{breaker}Bcc: victim@example.com" if not field.endswith(("to.0", "cc.0", "bcc.0", "sender_email")) \
        else f"a@example.com{breaker}Bcc: victim@example.com"
    if field == "headers:name":
        value = f"X-Campaign{breaker}Bcc"
    _set(data, field, value)
    with pytest.raises(InvalidInput) as refused:
        _validated(data)
    assert refused.value.reason in ("header_injection", "schema_error")
    if not field.endswith(("to.0", "cc.0", "bcc.0", "sender_email", "content_type")):   # free text, no stricter form
        assert refused.value.reason == "header_injection"
    schema = json.loads((ROOT / "schemas" / "email.outbound.v1.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**_examples("email.outbound")[0], "data": data}, schema)


@pytest.mark.parametrize("change", [
    {"mailbox_id": None, "sender_email": None},
    {"to": [], "cc": [], "bcc": []},
    {"attachments": [{"filename": "a.txt"}]},
    {"attachments": [{"filename": "a.txt", "content_base64": "aGk=", "content_sha256": "0" * 64}]},
])
def test_the_schema_states_the_rules_across_fields(change: dict) -> None:
    from services.dispatch.service import _validated
    from shared.errors import InvalidInput

    data = {**_outbound_data(), **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(InvalidInput):
        _validated(data)
    schema = json.loads((ROOT / "schemas" / "email.outbound.v1.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**_examples("email.outbound")[0], "data": data}, schema)


@pytest.mark.parametrize("field", ["sender_email", "to.0", "cc.0", "bcc.0", "headers.Reply-To"])
@pytest.mark.parametrize("address", ["jos\u00e9@customer.example", "ann\u202egro.elpmaxe@example.com",
                                     "a\u200bnn@example.com", "a@-bad..example", "a b@example.com"])
def test_an_address_that_cannot_be_written_into_a_header_is_refused(field: str, address: str) -> None:
    """A local part outside printable ASCII would be written as an encoded word, which is no address
    for the recipient's client; a bidirectional or zero-width character makes one address look like
    another.  Dispatch and the published schema refuse both, and malformed domains."""
    from services.dispatch.compose import check_headers
    from services.dispatch.service import _validated
    from shared.errors import InvalidInput

    data = _outbound_data()
    _set(data, field, address)
    with pytest.raises(InvalidInput) as refused:
        check_headers(_validated(data).headers)
    assert refused.value.reason in ("schema_error", "bad_address")
    if field != "headers.Reply-To":   # a header's value: its form is dispatch's to check, not the schema's
        schema = json.loads((ROOT / "schemas" / "email.outbound.v1.json").read_text())
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**_examples("email.outbound")[0], "data": data}, schema)


def test_an_address_of_printable_ascii_is_sent() -> None:
    from services.dispatch.service import _validated

    data = _outbound_data()
    data["to"] = ["o'brien+invoices@example.com", "a.b-c_d=e{f}~g#h$i%j&k*l/m?n^o`p|q!@sub.example.org"]
    schema = json.loads((ROOT / "schemas" / "email.outbound.v1.json").read_text())
    jsonschema.validate({**_examples("email.outbound")[0], "data": data}, schema)
    assert _validated(data).to == data["to"]
