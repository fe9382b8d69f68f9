"""Read models of the registry, as the CLI prints them and the admin API will serve them.

Secrets are never part of a read model: only whether one is set.
"""
from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel

from shared.events.payloads import OutboundStatus

ServerType = Literal["imap", "pop3", "exchange_server", "exchange_online", "smtp"]
TlsMode = Literal["implicit", "starttls", "none"]
AuthMethod = Literal["mailbox_credentials", "profile_impersonation", "oauth2"]
# Hosts whose traffic never leaves the machine: credentials may go there without TLS.
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
IncomingMethod = Literal["none", "server_side_sync", "forward_mailbox"]
OutgoingMethod = Literal["none", "server_side_sync"]
ActMethod = Literal["none", "server_side_sync"]
Tracking = Literal["all", "responses", "known_records", "email_enabled_records"]
TestStatus = Literal["not_run", "success", "failure"]
DirectionName = Literal["incoming", "outgoing", "act"]
RecordKind = Literal["contact", "account", "lead"]
# The SMTP port dispatch uses when a profile names none, per TLS mode (submission, RFC 8314 / 6409).
DEFAULT_SUBMISSION_PORT = {"implicit": 465, "starttls": 587, "none": 25}
# A folder name longer than this cannot travel in `email.received` (its `folder` field's limit).
MAX_FOLDER_NAME = 1000
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def host_problem(host: str) -> str | None:
    """Why ``host`` is no host name or IP address a mail server can be reached at, or None.

    A host name is dot-separated labels of letters, digits, hyphens (not at either end) and
    underscores (found in internal names), at most 253 characters; an internationalised name is
    checked in its IDNA form.  An IP address is written bare (::1, not [::1]): it is handed to the
    socket as it is."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if not host or host != host.strip():
        return "it is empty or has spaces around it"
    if any(c.isspace() for c in host):
        return "it has spaces in it"
    try:
        ascii_host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        return "it is not a valid internationalised domain name"
    name = ascii_host[:-1] if ascii_host.endswith(".") else ascii_host
    if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        return ("a host name is labels of letters, digits and hyphens separated by dots "
                "(or an IP address)")
    return None


def is_inbox(folder: str) -> bool:
    """The Inbox's name is case-insensitive in IMAP (RFC 3501 5.1): inbox, Inbox and INBOX are one."""
    return folder.upper() == "INBOX"


def folder_key(folder: str) -> str:
    """A folder's name as rules and look-ups compare it: INBOX in capitals, also as the first level of
    a folder under it (Inbox/Acme is INBOX/Acme), any other name as it is (IMAP names other than the
    Inbox are case-sensitive; RFC 3501 5.1)."""
    if is_inbox(folder):
        return "INBOX"
    if folder[5:6] in ("/", ".") and is_inbox(folder[:5]):   # the usual hierarchy delimiters
        return "INBOX" + folder[5:]
    return folder


def folder_name_problem(folder: str) -> str | None:
    """Why ``folder`` cannot be a tracked folder's name, or None.  Names are kept as given (spaces
    inside are common: "Sent Items"); control characters and IMAP's list wildcards (* and %) are no
    part of a folder a server can SELECT."""
    if not folder.strip():
        return "a folder name cannot be empty"
    if folder != folder.strip():
        return f"the folder name {folder!r} has spaces around it"
    if len(folder) > MAX_FOLDER_NAME:
        return f"a folder name has at most {MAX_FOLDER_NAME} characters"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in folder):
        return f"the folder name {folder!r} contains control characters"
    if "*" in folder or "%" in folder:
        return f"the folder name {folder!r} contains * or %, IMAP's wildcards"
    return None


class Organization(BaseModel):
    id: UUID
    name: str
    correlation_order: list[str]
    tracking_token_enabled: bool
    tracking_token_prefix: str
    tracking_token_digits: int
    smart_matching: bool
    smart_matching_min_recipients: int = 1


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
    # A mailbox's direction stops after this many refused sign-ins in a row, until Test & Enable
    # succeeds again; None: never (it backs off and retries, and recovers by itself).
    stop_after_refused_logins: int | None = None

    def cleartext_servers(self) -> list[str]:
        """The mail servers (``host:port``) the profile reaches without TLS, other than the loopback:
        what it signs in with crosses the network in clear there (Exchange is https only)."""
        if self.server_type in ("exchange_server", "exchange_online"):
            return []
        servers: list[str] = []
        for host, port, tls in ((self.incoming_host, self.incoming_port, self.incoming_tls),
                                (self.outgoing_host, self.outgoing_port, self.outgoing_tls)):
            server = f"{host}:{port}" if port else str(host)
            if host and tls == "none" and host.lower() not in LOOPBACK and server not in servers:
                servers.append(server)
        return servers


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
    refused_logins: int = 0     # sign-ins the server refused in a row (counted toward the profile's stop)
    stopped_at: datetime | None = None   # stopped after refused sign-ins (status failure) until Test & Enable

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None


class FolderSync(BaseModel):
    folder: str
    uidvalidity: int
    last_uid: int
    highestmodseq: int | None
    changed_at: datetime        # when this state last moved (an unchanged folder is not written)


class MailboxSync(BaseModel):
    """Where ingest stands with a mailbox: who works it, how far each folder is read, what came in."""

    worked_by: str | None       # the ingest replica holding its lease now (None: no live lease)
    lease_expires_at: datetime | None
    folders: list[FolderSync]
    pop3_seen: int              # POP3 unique ids recorded as read
    ingested: int               # messages stored and announced from this mailbox
    last_ingested_at: datetime | None
    held: int = 0               # messages evaluate holds until the mailbox may process email again
    held_since: datetime | None = None
    held_for: str | None = None  # the guard that holds the oldest (mailbox_inactive, incoming_disabled ...)


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
    folder_rules: list[FolderRule] = []   # with ``Registry.mailbox(...)``
    alerts: list[Alert] = []
    sync: MailboxSync | None = None   # with ``Registry.mailbox(..., sync=True)``


class FolderRule(BaseModel):
    """A folder-level tracking rule: the email of ``folder`` is tracked regarding the record."""

    mailbox_id: UUID
    folder: str
    folder_id: str | None = None      # the server's own id for the folder (Exchange), when it has one
    regarding_kind: RecordKind
    regarding_id: UUID
    regarding_name: str
    regarding_email: str
    created_at: datetime
    # The mail read from the folder before the rule came is filed once (ingest's onboarding):
    # done at ``onboarded_at``; until then, done up to ``onboarded_uid`` (None: not begun).
    onboarded_at: datetime | None = None
    onboarded_uid: int | None = None

    def earlier_mail(self) -> str:
        """Where the filing of the folder's earlier mail stands, as the CLI says it."""
        if self.onboarded_at is not None:
            return "filed"
        if self.onboarded_uid is not None:
            return f"being filed (up to UID {self.onboarded_uid})"
        return "filed at the folder's next sync"


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


# A pending request with one of these reasons waits for its mailbox, not after a failed attempt (the
# same set as dispatch's ``services.dispatch.ledger.WAITING_FOR_MAILBOX``): the command that mends each.
WAITING_FOR_MAILBOX = {
    "mailbox_backoff": "`conduit mailbox show {email}` says why it backs off; new credentials (`conduit mailbox "
                       "set-credentials`) or server settings (`conduit profile set`) end the back-off at once",
    "mailbox_inactive": "`conduit mailbox activate {email}`",
    "no_profile": "`conduit mailbox configure {email} --profile NAME`",
    "email_not_approved": "`conduit mailbox approve {email}`",
    "owner_inactive": "`conduit user activate {email}` (`conduit queue activate` for a queue's mailbox)",
    "outgoing_not_enabled": "`conduit mailbox test-enable {email} --direction outgoing`",
}
def waiting_cause(detail: str | None) -> str:
    """What a waiting request waits for, from its detail ("waiting: the mailbox ... is inactive; sent
    once ..." gives "the mailbox ... is inactive")."""
    return (detail or "").removeprefix("waiting: ").split("; ")[0]


# outgoing_not_enabled because the owner's outgoing method is not server-side synchronization.
_OWNER_METHOD_MEND = "`conduit user set {email} --outgoing server_side_sync` (`conduit queue set` for a queue's mailbox)"


class OutboundRequest(BaseModel):
    """One request to send, as the send ledger holds it (dispatch writes it; this only reads)."""

    id: UUID
    idempotency_key: str
    status: OutboundStatus
    mailbox_id: UUID | None
    mailbox_email: str | None
    to: list[str]
    subject: str | None
    message_id: str | None
    transport: str | None
    attempts: int
    reason: str | None
    detail: str | None
    smtp_code: int | None
    smtp_reply: str | None
    activity_id: UUID | None
    worker_id: int | None
    started_at: datetime | None = None
    next_attempt_at: datetime | None
    deadline: datetime | None
    requested_at: datetime | None
    sent_at: datetime | None
    created_at: datetime
    updated_at: datetime

    def explanation(self) -> str:
        """What the status means for the requester, in one sentence."""
        mid = f"<{self.message_id}>" if self.message_id else "(none yet)"
        if self.status == "sent":
            reply = " ".join(str(p) for p in (self.smtp_code, self.smtp_reply) if p)
            when = f" at {self.sent_at:%Y-%m-%d %H:%M:%S %Z}" if self.sent_at else ""
            return f"Sent: the server accepted it{when}" + (f" ({reply})." if reply else ".")
        if self.status == "sending" and self.started_at is None:
            return (f"Claimed by dispatch worker {self.worker_id} (attempt {self.attempts}), waiting for a session; "
                    "if that worker dies now, another sends it.")
        if self.status == "sending":
            return (f"Being sent by dispatch worker {self.worker_id} (attempt {self.attempts}); if that worker dies, "
                    "it becomes failed with outcome_unknown, never sent twice.")
        if self.status == "pending_send":
            return self._waiting()
        if self.status == "rejected":
            return f"Rejected before any attempt ({self.reason}): {self.detail}"
        if self.reason == "outcome_unknown":
            return (f"Failed with an unknown outcome: the server may have accepted it, so it is not resent (it must "
                    f"never arrive twice). Look for Message-ID {mid} at the recipient or in the Sent folder; if it "
                    "is not there, `conduit outbound resend` sends it again under a new idempotency key.")
        detail = (self.detail or "no detail").rstrip(".")
        said = f" The server said: {self.smtp_code} {self.smtp_reply}" \
            if self.smtp_code and (self.smtp_reply or "") not in detail else ""
        return f"Failed ({self.reason}): {detail}.{said}"

    def _waiting(self) -> str:
        """A pending request: when it is tried next, and why it waits (its mailbox, or a failed attempt)."""
        when = f" at {self.next_attempt_at:%Y-%m-%d %H:%M:%S %Z}" if self.next_attempt_at else ""
        done = f"after {self.attempts} attempt(s)"
        if self.reason in WAITING_FOR_MAILBOX:
            cause = waiting_cause(self.detail)
            mend = _OWNER_METHOD_MEND if self.reason == "outgoing_not_enabled" and "server-side synchronization" in cause \
                else WAITING_FOR_MAILBOX[self.reason]
            mend = mend.format(email=self.mailbox_email or "MAILBOX")
            if self.reason == "mailbox_backoff":
                return f"Waiting to be sent{when}, {done}; waiting for its mailbox ({self.reason}): {cause}. {mend}."
            return (f"Waiting to be sent, {done}; waiting for its mailbox ({self.reason}): {cause}; sent once it may "
                    f"send again, until the deadline (looked at again{when}). Mended by {mend}.")
        if self.reason == "worker_stopped":
            return f"Waiting to be sent{when}, {done}: {self.detail}."
        if self.reason == "recipients_deferred":
            return (f"Waiting to be sent{when} to the recipients the server deferred, {done} ({self.reason}): "
                    f"{self.detail}.")
        last = f"; the last attempt failed ({self.reason}): {self.detail}" if self.reason else ""
        return f"Waiting to be sent{when}, {done}{last}."
