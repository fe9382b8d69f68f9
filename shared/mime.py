"""The identity of a message, the same for ingest and evaluate.

One email activity per Message-ID per organization: both ingest (to skip a message moved between
tracked folders) and evaluate (to deduplicate) key on the Message-ID header, normalised, or on a
stable hash of the bytes when a message has none.  Reading only the header block keeps this cheap.
"""
from __future__ import annotations

import hashlib
import re

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FROM = re.compile(rb"^from:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_ADDRESS = re.compile(r"<([^<>\s]+@[^<>\s]+)>|([^\s<>\"',;]+@[^\s<>\"',;]+)")
MAX_ID_LENGTH = 995


def header_block(raw: bytes, limit: int = 256 * 1024) -> bytes:
    end = _HEADER_END.search(raw, 0, limit)
    return raw[: end.start()] if end else raw[:limit]


def normalize_message_id(value: str) -> str | None:
    """`<Abc@Host>` -> `Abc@Host`: angle brackets and folding removed, case kept (it matters)."""
    value = " ".join(value.split())
    match = re.search(r"<([^<>]+)>", value)
    value = (match.group(1) if match else value).strip()
    if not value or len(value) > MAX_ID_LENGTH or any(c in value for c in "\r\n\x00 "):
        return None
    return value


def generated_message_id(raw: bytes) -> str:
    """A stable identity for a message without a usable Message-ID."""
    return f"conduit-{hashlib.sha256(raw).hexdigest()[:32]}@generated.invalid"


def message_key(raw: bytes) -> str:
    """The message's identity: its normalised Message-ID, or a hash of its bytes."""
    match = _MESSAGE_ID.search(header_block(raw))
    if match:
        normalized = normalize_message_id(match.group(1).decode("utf-8", "replace"))
        if normalized:
            return normalized
    return generated_message_id(raw)


def from_address(raw: bytes) -> str | None:
    """The first address in the From header, lower-cased, or None."""
    match = _FROM.search(header_block(raw))
    if not match:
        return None
    found = _ADDRESS.search(match.group(1).decode("utf-8", "replace"))
    if not found:
        return None
    return (found.group(1) or found.group(2)).strip().lower()
