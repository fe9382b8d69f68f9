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


def test_outbound_rejects_header_injection() -> None:
    from shared.errors import InvalidInput
    from shared.events.envelope import decode_event

    example = _examples("email.outbound")[0]
    for field, value in (("subject", "Hi\r\nBcc: victim@example.com"), ("to", ["a@example.com\r\nX: y"])):
        bad = json.loads(json.dumps(example))
        bad["data"][field] = value
        with pytest.raises(InvalidInput, match="schema"):
            decode_event(json.dumps(bad).encode(), TOPICS["email.outbound"].envelope)
