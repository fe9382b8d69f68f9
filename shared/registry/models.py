"""Read models of the registry, as the CLI prints them and the admin API will serve them.

Secrets are never part of a read model: only whether one is set.
"""
from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel

ServerType = Literal["imap", "pop3", "exchange_server", "exchange_online", "smtp"]
TlsMode = Literal["implicit", "starttls", "none"]
AuthMethod = Literal["mailbox_credentials", "profile_impersonation", "oauth2"]
IncomingMethod = Literal["none", "server_side_sync", "forward_mailbox"]
OutgoingMethod = Literal["none", "server_side_sync"]
ActMethod = Literal["none", "server_side_sync"]
Tracking = Literal["all", "responses", "known_records", "email_enabled_records"]
TestStatus = Literal["not_run", "success", "failure"]
DirectionName = Literal["incoming", "outgoing", "act"]
RecordKind = Literal["contact", "account", "lead"]


class Organization(BaseModel):
    id: UUID
    name: str
    correlation_order: list[str]
    tracking_token_enabled: bool
    tracking_token_prefix: str
    tracking_token_digits: int
    smart_matching: bool


class Profile(BaseModel):
    id: UUID
    organization_id: UUID
    name: str
    server_type: ServerType
    incoming_host: str | None
    incoming_port: int | None
    incoming_tls: TlsMode
    outgoing_host: str | None
    outgoing_port: int | None
    outgoing_tls: TlsMode
    use_same_settings_for_outgoing: bool
    service_url: str | None
    auth_method: AuthMethod
    profile_username: str | None
    has_profile_secret: bool
    oauth_token_url: str | None
    oauth_client_id: str | None
    has_oauth_client_secret: bool
    oauth_scope: str | None
    tls_ca_file: str | None
    is_default: bool
    max_concurrent_connections: int
    min_polling_interval_seconds: int
    process_email_received_after: datetime | None
    move_failed_to_undeliverable: bool


class User(BaseModel):
    id: UUID
    organization_id: UUID
    full_name: str
    email: str
    incoming_method: IncomingMethod
    outgoing_method: OutgoingMethod
    act_method: ActMethod
    active: bool
    mailbox_id: UUID | None = None


class Queue(BaseModel):
    id: UUID
    organization_id: UUID
    name: str
    email: str
    incoming_method: IncomingMethod
    outgoing_method: OutgoingMethod
    active: bool
    mailbox_id: UUID | None = None


class Alert(BaseModel):
    severity: Literal["information", "warning", "error"]
    direction: DirectionName | None
    code: str
    message: str
    created_at: datetime


class DirectionState(BaseModel):
    status: TestStatus
    tested_at: datetime | None
    test_message: str | None
    error_count: int
    backoff_until: datetime | None


class Mailbox(BaseModel):
    id: UUID
    organization_id: UUID
    name: str
    email: str
    owner_kind: Literal["user", "queue"] | None
    owner_id: UUID | None
    is_forward_mailbox: bool
    profile_id: UUID | None
    profile_name: str | None
    username: str | None
    has_credentials: bool
    active: bool
    email_approved: bool
    incoming: DirectionState
    outgoing: DirectionState
    act: DirectionState
    tracking: Tracking
    convert_to_activities: bool
    delete_after_processing: bool
    tracked_folders: list[str]
    alerts: list[Alert] = []


class Record(BaseModel):
    id: UUID
    organization_id: UUID
    kind: RecordKind
    name: str
    email: str
    email_enabled: bool


class Activity(BaseModel):
    id: UUID
    organization_id: UUID
    message_id: str
    direction: Literal["incoming", "outgoing"]
    status: str
    subject: str
    from_address: str | None
    to_addresses: list[str]
    cc_addresses: list[str]
    regarding_kind: str | None
    regarding_id: UUID | None
    tracking_token: str | None
    correlated_by: str | None
    mailbox_ids: list[UUID]
    created_at: datetime
    parties: list[dict] = []
    preview: str = ""


class Decision(BaseModel):
    mailbox_id: UUID
    mailbox_email: str
    message_id: str
    tracked: bool
    rule: str
    reason: str
    explanation: str
    activity_id: UUID | None
    subject: str
    from_address: str | None
    decided_at: datetime
