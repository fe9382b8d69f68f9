"""Payload models, one per topic and schema version.

Additive changes stay within a version; a breaking change gets a new model (``...V2``) and both are
published side by side until consumers move.  JSON Schema is exported from these models to
``schemas/`` (``conduit schemas export``) and a test keeps the checked-in files equal to the models.
"""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from shared.events.fields import ONE_LINE, EmailAddress, HeaderText, SendableAddress, bounded_header_text

Direction = Literal["incoming", "outgoing", "act"]


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


# Text without NUL: PostgreSQL cannot store it, so an event carrying one is refused as it is read
# (a schema error naming the field) rather than where it would be stored.
Text = Annotated[str, AfterValidator(_no_nul), Field(json_schema_extra={"pattern": "^[^\\u0000]*$"})]


class EmailReceivedV1(BaseModel):
    """A message pulled from a mailbox; the raw MIME is stored before this is published."""

    model_config = ConfigDict(extra="ignore")

    mailbox_id: UUID
    source: Literal["imap", "pop3", "ews", "graph"]
    folder: Text = Field("INBOX", max_length=1000)
    uid: int | None = Field(None, ge=1, le=2**32 - 1, description="IMAP UID in the folder, when IMAP.")
    uidl: Text | None = Field(None, max_length=200, description="POP3 unique id, when POP3.")
    raw_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Reference to the stored raw MIME.")
    size: int = Field(ge=0)
    message_id: Text | None = Field(None, max_length=1000, description="The Message-ID header, when present.")
    received_at: AwareDatetime | None = Field(None, description="Server's arrival time (IMAP INTERNALDATE).")
    forwarded_by: EmailAddress | None = Field(
        None, description="Forward mailbox: the address of the user or queue that forwarded the message."
    )
    refiled: bool = Field(
        False, description="A message ingested before, announced again from the folder named (moved or copied into a "
                           "folder a folder-level tracking rule maps, or already there when its rule was added): "
                           "to be filed under the rule's record; not newly received mail.")


class PartyRef(BaseModel):
    kind: Literal["user", "queue", "contact", "account", "lead"]
    id: UUID
    email: str


class RegardingRef(BaseModel):
    kind: str = Field(max_length=100, pattern=r"^[A-Za-z0-9_.-]+$", examples=["account"])
    id: UUID


class ActivityCreatedV1(BaseModel):
    """An email activity was recorded (incoming tracked email, or outgoing email sent)."""

    model_config = ConfigDict(extra="ignore")

    activity_id: UUID
    message_id: str
    direction: Literal["incoming", "outgoing"]
    status: Literal["received", "sent"]
    subject: str
    from_address: str | None
    to_addresses: list[str]
    cc_addresses: list[str] = []
    mailbox_ids: list[UUID]
    regarding: RegardingRef | None = None
    correlated_by: str | None = None
    raw_sha256: str | None = None
    # Added within version 1 (optional, so events published before them still validate): what the
    # reference's email entity holds too (CorrelatedActivityId, bcc, TrackingToken, its times).
    correlated_activity_id: UUID | None = Field(
        None, description="The activity this one was correlated to (the email it answers), by the method "
                          "`correlated_by` names; null when it was not correlated.")
    bcc_addresses: list[str] = Field(
        [], description="The Bcc recipients: of an email dispatch sent, the request's; of mail evaluate "
                        "tracked, the Bcc header (which a copy in a Sent folder keeps).")
    tracking_token: str | None = Field(
        None, description="The tracking token: the one dispatch put in the subject of an email it sent; of mail "
                          "evaluate tracked, a token found in its subject (evaluate assigns none).")
    received_at: AwareDatetime | None = Field(
        None, description="Incoming: when the mail server received it (IMAP INTERNALDATE), else its Date header.")
    sent_at: AwareDatetime | None = Field(
        None, description="Outgoing: when the server accepted it from dispatch; of mail found in a Sent folder, "
                          "its Date header, else when the server received the copy.")


class ActivityUpdatedV1(BaseModel):
    """An email activity's regarding record changed: a folder-level tracking rule re-filed it (the
    message was moved or copied into a mapped folder, or read there while already an activity)."""

    model_config = ConfigDict(extra="ignore")

    activity_id: UUID
    message_id: str
    regarding: RegardingRef
    previous_regarding: RegardingRef | None = None
    reason: Literal["folder_tracking_rule"] = Field(
        description="What changed it: a folder-level tracking rule of the mailbox, for the folder named.")
    mailbox_id: UUID
    folder: str


# No NUL in a body: SMTP cannot carry it (RFC 5321 4.1.1.4).
Body = Text


def _only(present: str, absent: str) -> dict:
    return {"required": [present], "properties": {present: {"type": "string"}, absent: {"type": "null"}}}


class Attachment(BaseModel):
    """Small attachments travel inline (base64); large ones by a reference to the raw store."""

    # The schema states ``_one_content`` too: exactly one of the two contents.
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "oneOf": [_only("content_base64", "content_sha256"), _only("content_sha256", "content_base64")]})

    filename: HeaderText = Field(min_length=1, max_length=255)
    # RFC 6838's restricted names, ASCII only and without parameters (the pattern is what the
    # published schema states, too: it is not a HeaderText, whose schema pattern would replace it).
    content_type: str = Field("application/octet-stream", max_length=255,
                              pattern=r"^[A-Za-z0-9!#$&^_.+-]{1,127}/[A-Za-z0-9!#$&^_.+-]{1,127}$")
    content_base64: str | None = Field(None, description="Inline content, base64.")
    content_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="Reference to stored content.")
    inline: bool = Field(False, description="Inline part (for example an image an HTML body shows).")
    content_id: HeaderText | None = Field(None, max_length=200)

    @model_validator(mode="after")
    def _one_content(self) -> "Attachment":
        if (self.content_base64 is None) == (self.content_sha256 is None):
            raise ValueError("exactly one of content_base64 and content_sha256 is required")
        return self


class EmailOutboundV1(BaseModel):
    """A request from any system to send an email through a mailbox."""

    # The schema states ``_sender_and_recipients`` too: a sender, and at least one recipient.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"allOf": [
        {"anyOf": [{"required": [f], "properties": {f: {"type": "string"}}} for f in ("mailbox_id", "sender_email")]},
        {"anyOf": [{"required": [f], "properties": {f: {"minItems": 1}}} for f in ("to", "cc", "bcc")]},
    ]})

    idempotency_key: HeaderText = Field(min_length=1, max_length=200, description="Chosen by the client; one send per key.")
    mailbox_id: UUID | None = Field(None, description="The sending mailbox; or give sender_email.")
    sender_email: SendableAddress | None = Field(None, description="Address of the sending user, queue or mailbox.")
    to: list[SendableAddress] = Field(default_factory=list, max_length=500)
    cc: list[SendableAddress] = Field(default_factory=list, max_length=500)
    bcc: list[SendableAddress] = Field(default_factory=list, max_length=500)
    subject: HeaderText = Field("", max_length=998)
    text: Body | None = Field(None, max_length=10_000_000)
    html: Body | None = Field(None, max_length=10_000_000)
    attachments: list[Attachment] = Field(default_factory=list, max_length=100)
    headers: dict[bounded_header_text(76), bounded_header_text(998)] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="Extra headers; only names on the allow-list are accepted.",
        json_schema_extra={"propertyNames": ONE_LINE},
    )
    regarding: RegardingRef | None = None
    track: bool = Field(True, description="Record an outgoing email activity (with tracking token when enabled).")
    deadline: AwareDatetime | None = Field(None, description="Give up retrying temporary failures after this time.")

    @model_validator(mode="after")
    def _sender_and_recipients(self) -> "EmailOutboundV1":
        if self.mailbox_id is None and self.sender_email is None:
            raise ValueError("one of mailbox_id and sender_email is required")
        if not (self.to or self.cc or self.bcc):
            raise ValueError("at least one recipient (to, cc or bcc) is required")
        return self


OutboundStatus = Literal["pending_send", "sending", "sent", "failed", "rejected"]


class EmailStatusV1(BaseModel):
    """Where an outbound request stands; the last one for a key is final when sent/failed/rejected."""

    model_config = ConfigDict(extra="ignore")

    idempotency_key: str
    status: OutboundStatus
    request_id: UUID | None = None
    mailbox_id: UUID | None = None
    reason: str | None = Field(None, description="Machine-readable reason code: why it failed or was rejected, or, while pending_send, what it waits for (docs/topics/email.status.md).")
    detail: str | None = Field(None, description="One human sentence.")
    smtp_code: int | None = None
    smtp_reply: str | None = None
    message_id: str | None = None
    activity_id: UUID | None = None
    attempt: int = 0


class MailboxEventV1(BaseModel):
    """Something happened to a mailbox: created, changed, tested, an alert, a back-off."""

    model_config = ConfigDict(extra="ignore")

    mailbox_id: UUID
    kind: Literal["created", "updated", "tested", "alert", "backoff", "recovered"]
    direction: Direction | None = None
    severity: Literal["information", "warning", "error"] | None = None
    code: str | None = None
    message: str | None = None
    occurred_at: datetime | None = None


class RegistryChangeV1(BaseModel):
    """A registry or CRM-side record changed; an external CRM subscribes to mirror it."""

    model_config = ConfigDict(extra="ignore")

    entity: Literal["organization", "profile", "user", "queue", "mailbox", "contact", "account", "lead", "activity"]
    entity_id: UUID
    change: Literal["created", "updated", "deleted"]
    fields: dict[str, object] = Field(default_factory=dict, description="Changed fields; never a secret.")


HealthState = Literal["healthy", "degraded", "failing", "backing_off"]


class MailboxHealthV1(BaseModel):
    """A mailbox's health as the health aggregate sees it; the latest event per key is the current view."""

    model_config = ConfigDict(extra="ignore")

    mailbox_id: UUID
    state: HealthState = Field(description="The worst of the directions' states.")
    direction_states: dict[Literal["incoming", "outgoing", "act", "mailbox"], HealthState] = Field(
        default_factory=dict, description="State per direction that reported one; 'mailbox' for mailbox-wide events."
    )
    failure_count: int = Field(0, ge=0, description="Failures since the last recovery or successful test, all directions.")
    last_success_at: AwareDatetime | None = Field(
        None, description="Last successful test, recovery or received message."
    )
    last_alert_code: str | None = None
    last_alert_message: str | None = None
    last_alert_severity: Literal["information", "warning", "error"] | None = None
    last_alert_at: AwareDatetime | None = None
    messages_received: int = Field(0, ge=0, description="Messages received since the aggregate began.")
    activities_created: int = Field(0, ge=0, description="Email activities recorded through this mailbox.")
    window_seconds: int = Field(ge=1, description="Length of the tumbling window the rates are counted in.")
    window_start: AwareDatetime | None = Field(None, description="Start of the current (still open) window.")
    messages_received_per_minute: float = Field(0.0, ge=0, description="Rate over the last complete window.")
    activities_created_per_minute: float = Field(0.0, ge=0, description="Rate over the last complete window.")
    updated_at: AwareDatetime = Field(description="Time of the last event that changed this view.")
