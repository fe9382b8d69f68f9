"""The envelope every event travels in, and its JSON encoding.

Envelope fields (event id, type, schema version, UTC time, producer, correlation id, organization)
are the same on every topic; ``data`` is the topic's payload model.  The Kafka key is the mailbox id
(or the organization for organization-wide events) so each mailbox's events stay in order.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Generic, TypeVar
from uuid import UUID, uuid4

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.errors import InvalidInput

DataT = TypeVar("DataT", bound=BaseModel)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Envelope(BaseModel, Generic[DataT]):
    """One event: who produced it, when, why (correlation id), and its payload."""

    model_config = ConfigDict(extra="forbid")

    event_id: UUID = Field(default_factory=uuid4, description="Unique per event; consumers deduplicate on it.")
    type: str = Field(description="The event type, e.g. 'email.received'.")
    schema_version: int = Field(ge=1, description="Version of the payload schema.")
    occurred_at: AwareDatetime = Field(default_factory=utcnow, description="When it happened, UTC.")
    producer: str = Field(min_length=1, max_length=200, description="The service or system that produced it.")
    correlation_id: str | None = Field(None, max_length=200, description="Ties events of one piece of work together.")
    organization_id: UUID
    data: DataT

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        try:
            return value.astimezone(timezone.utc)
        except OverflowError:   # 0001-01-01T00:00+01:00 is before year 1 in UTC: pydantic only reports ValueError
            raise ValueError("is out of range once in UTC") from None


def encode_event(event: Envelope[Any]) -> bytes:
    return event.model_dump_json(exclude_none=False).encode()


def decode_event(raw: bytes | None, model: type[Envelope[Any]]) -> Envelope[Any]:
    """Parse and validate one event; an undecodable one is ``InvalidInput`` with a readable reason."""
    if raw is None:
        raise InvalidInput("event has no value", reason="empty_event")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'event'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise InvalidInput(f"event does not match its schema: {problems}", reason="schema_error") from exc
    except Exception as exc:  # noqa: BLE001 - a validator's own failure: still this one event's fault
        # Anything else would leave the consumer's decoding, stop the service, and stop it again at
        # every restart on the same uncommitted event.
        raise InvalidInput(f"event could not be read ({type(exc).__name__})", reason="schema_error") from exc
