"""JSON Schema export of every topic's envelope, for systems that do not use Python."""
from __future__ import annotations

import json
from pathlib import Path

from shared.events.topics import TOPICS


def schema_documents() -> dict[str, str]:
    """File name -> JSON text, deterministic so the checked-in files can be compared."""
    documents = {}
    for topic in TOPICS.values():
        schema = topic.envelope.model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://conduit.invalid/schemas/{topic.schema_name}.json"
        schema["title"] = f"{topic.name} v{topic.schema_version}"
        schema["description"] = topic.description
        documents[f"{topic.schema_name}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return documents


def export_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in schema_documents().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
