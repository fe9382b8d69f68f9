"""`email.received` events of one batch, encoded byte for byte as ``encode_event`` would encode them.

Ingest announces up to 500 messages at a time.  Building an ``Envelope[EmailReceivedV1]`` per
message and serialising it (pydantic validation of two models, a ``uuid4``, ``model_dump_json``) was
~11 us a message, a fifth of ingest's CPU (bench/ingest_pipeline.py, docs/benchmarks.md "Ingest").
Here what the batch's events share (type, producer, organization, mailbox, source, time) is
serialised once, and each message's own fields are checked against the model's constraints and
written into that template.

The model stays the authority:
- a message whose fields the template cannot vouch for (a value out of range, an unusual type) is
  built through the model, which encodes it or raises ``ValidationError`` exactly as before;
- the first event of every batch is also built through the model and compared byte for byte; if
  they differ (the model or pydantic changed), the whole batch goes through the model and an error
  is logged.
Strings are written by hand only when they are printable ASCII without ``"`` or ``\\``; any other
string, and every datetime, is serialised by pydantic-core itself.

The events of one batch share one ``occurred_at`` (the time the batch is announced), where the
per-event model took the clock once per event, microseconds apart.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import get_args
from uuid import UUID

from pydantic import TypeAdapter
from pydantic_core import to_json

from shared.events.envelope import Envelope, encode_event, utcnow
from shared.events.fields import EmailAddress
from shared.events.payloads import EmailReceivedV1
from shared.events.topics import EMAIL_RECEIVED
from shared.ids import id_texts as event_ids

log = logging.getLogger(__name__)

# Parametrised once: ``Envelope[...]`` looks its class up in pydantic's generic cache at every use.
EmailReceivedEvent = Envelope[EmailReceivedV1]
PRODUCER = "ingest"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_EMAIL_ADDRESS = TypeAdapter(EmailAddress)
# The field limits of EmailReceivedV1 the template checks (a test keeps them equal to the model's).
MAX_FOLDER = 1000
MAX_UIDL = 200
MAX_MESSAGE_ID = 1000
MAX_UID = 2**32 - 1
SOURCES = frozenset(get_args(EmailReceivedV1.model_fields["source"].annotation))


def _json_text(value: str) -> str:
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    return to_json(value).decode()


def _optional_text(value: str | None, limit: int) -> str | None:
    """The JSON of an optional string field with a length limit, or None if the model must decide."""
    if value is None:
        return "null"
    if type(value) is str and len(value) <= limit and "\x00" not in value:
        return _json_text(value)
    return None


class ReceivedBatch:
    """Encodes the `email.received` events of one batch: one organization, mailbox and source."""

    def __init__(self, organization_id: UUID, mailbox_id: UUID, source: str, *,
                 occurred_at: datetime | None = None, ids: Iterator[str] | None = None) -> None:
        self._organization_id = organization_id
        self._mailbox_id = mailbox_id
        self._source = source
        self._occurred_at = (occurred_at or utcnow()).astimezone(timezone.utc)   # as the envelope keeps it
        self._ids = ids or event_ids()
        self._checked = False
        # Anything else shared by the batch is for the model to accept or refuse, event by event.
        # (asyncpg hands out its own UUID subclass: the first event's check covers its text.)
        self._template = (isinstance(organization_id, UUID) and isinstance(mailbox_id, UUID)
                          and type(source) is str and source in SOURCES)
        self._shared = (
            f'","type":{_json_text(EMAIL_RECEIVED.name)},"schema_version":1,'
            f'"occurred_at":{to_json(self._occurred_at).decode()},"producer":{_json_text(PRODUCER)},'
            f'"correlation_id":null,"organization_id":"{organization_id}",'
            f'"data":{{"mailbox_id":"{mailbox_id}","source":{_json_text(source)},"folder":'
        )

    def encode(self, folder: str, uid: int | None, uidl: str | None, raw_sha256: str, size: int,
               message_id: str | None, received_at: datetime | None, forwarded_by: str | None, *,
               refiled: bool = False) -> bytes:
        """One event; raises ``ValidationError`` for fields the model refuses.  ``refiled``: a
        message ingested before, announced again from another folder (``EmailReceivedV1.refiled``)."""
        event_id = next(self._ids)
        fast = self._template and self._fill(event_id, folder, uid, uidl, raw_sha256, size, message_id,
                                             received_at, forwarded_by, refiled)
        if not fast:
            return self._through_model(event_id, folder, uid, uidl, raw_sha256, size, message_id,
                                       received_at, forwarded_by, refiled)
        if not self._checked:
            self._checked = True
            expected = self._through_model(event_id, folder, uid, uidl, raw_sha256, size, message_id,
                                           received_at, forwarded_by, refiled)
            if fast != expected:
                log.error("email.received template differs from the model's encoding; batch encoded "
                          "through the model: %r != %r", fast[:300], expected[:300])
                self._template = False
                return expected
        return fast

    def _fill(self, event_id: str, folder: str, uid: int | None, uidl: str | None, raw_sha256: str,
              size: int, message_id: str | None, received_at: datetime | None,
              forwarded_by: str | None, refiled: bool = False) -> bytes | None:
        """The event written into the template, or None when a field needs the model's judgement."""
        if type(folder) is not str or len(folder) > MAX_FOLDER or "\x00" in folder:
            return None
        if type(refiled) is not bool:
            return None
        if uid is not None and (type(uid) is not int or not 1 <= uid <= MAX_UID):
            return None
        if type(size) is not int or size < 0:
            return None
        if type(raw_sha256) is not str or not _SHA256.fullmatch(raw_sha256):
            return None
        uidl_json = _optional_text(uidl, MAX_UIDL)
        message_id_json = _optional_text(message_id, MAX_MESSAGE_ID)
        if uidl_json is None or message_id_json is None:
            return None
        if received_at is None:
            received_json = "null"
        elif type(received_at) is datetime and received_at.utcoffset() is not None:
            received_json = to_json(received_at).decode()
        else:
            return None
        if forwarded_by is None:
            forwarded_json = "null"
        elif type(forwarded_by) is str and _is_normal_address(forwarded_by):
            forwarded_json = _json_text(forwarded_by)
        else:
            return None
        return (
            f'{{"event_id":"{event_id}{self._shared}{_json_text(folder)},'
            f'"uid":{"null" if uid is None else uid},"uidl":{uidl_json},"raw_sha256":"{raw_sha256}",'
            f'"size":{size},"message_id":{message_id_json},"received_at":{received_json},'
            f'"forwarded_by":{forwarded_json},"refiled":{"true" if refiled else "false"}}}}}'
        ).encode()

    def _through_model(self, event_id: str, folder: str, uid: int | None, uidl: str | None, raw_sha256: str,
                       size: int, message_id: str | None, received_at: datetime | None,
                       forwarded_by: str | None, refiled: bool = False) -> bytes:
        return encode_event(EmailReceivedEvent(
            event_id=UUID(event_id), occurred_at=self._occurred_at,
            type=EMAIL_RECEIVED.name, schema_version=1, producer=PRODUCER, organization_id=self._organization_id,
            data=EmailReceivedV1(
                mailbox_id=self._mailbox_id, source=self._source, folder=folder, uid=uid, uidl=uidl,
                raw_sha256=raw_sha256, size=size, message_id=message_id, received_at=received_at,
                forwarded_by=forwarded_by, refiled=refiled,
            ),
        ))


def _is_normal_address(value: str) -> bool:
    """An address the model accepts and keeps as it is (the validator strips it and lower-cases
    the domain; ingest's ``from_address`` already has)."""
    try:
        return _EMAIL_ADDRESS.validate_python(value) == value
    except ValueError:
        return False
