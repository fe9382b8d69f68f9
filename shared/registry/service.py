"""The registry's service layer: every change to profiles, users, queues, mailboxes and records.

The CLI calls it today and the admin API will tomorrow, so all rules live here: validation with
clear errors, one default profile per organization, the automatic mailbox for a user or queue that
uses server-side synchronization (linked to the default profile, or flagged with an error alert when
there is none), encrypted credentials, and an event in the outbox for every change.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, AsyncIterator, get_args
from uuid import UUID

import asyncpg
from pydantic import SecretStr, ValidationError

from shared.crypto import CredentialCipher
from shared.errors import AuthenticationFailed, Conflict, InvalidInput, NotFound
from shared.events.envelope import Envelope
from shared.events.fields import breaks_header, is_email_address, is_sendable_address
from shared.events.payloads import EmailOutboundV1, MailboxEventV1, RegistryChangeV1
from shared.events.topics import MAILBOX_EVENTS, REGISTRY_CHANGES
from shared.outbox import enqueue
from shared.registry import folder_rules, models, repository as repo
from shared.tls import check_ca_file

log = logging.getLogger(__name__)

DEFAULT_ORGANIZATION = "default"
# Back-off after a mailbox-level failure: 30 s, 60 s, 120 s ... capped at one hour.
BACKOFF_BASE_SECONDS = 30.0
BACKOFF_CAP_SECONDS = 3600.0
# A profile's `stop_after_refused_logins`: at most this many refused sign-ins in a row (the schema's CHECK).
MAX_REFUSED_LOGINS = 100
# Profile columns stored encrypted: never echoed in a change event.
_PROFILE_SECRETS = ("profile_secret", "oauth_client_secret")
_TOKEN_PREFIX = re.compile(r"(?=.*[^0-9])[^\s\x00-\x1f\x7f]{1,20}")
# Profile settings that may be reset to none (`conduit profile set --clear`), and the command's
# option names for those whose column is named otherwise.
_PROFILE_CLEARABLE = frozenset({
    "incoming_host", "incoming_port", "outgoing_host", "outgoing_port", "service_url", "profile_username",
    "profile_secret", "oauth_token_url", "oauth_client_id", "oauth_client_secret", "oauth_scope", "tls_ca_file",
    "process_email_received_after", "stop_after_refused_logins"})
_PROFILE_ALIASES = {"received_after": "process_email_received_after", "profile_user": "profile_username"}


@dataclass(frozen=True)
class ProfileInput:
    name: str
    server_type: models.ServerType
    incoming_host: str | None = None
    incoming_port: int | None = None
    incoming_tls: models.TlsMode = "implicit"
    outgoing_host: str | None = None
    outgoing_port: int | None = None
    outgoing_tls: models.TlsMode = "starttls"
    use_same_settings_for_outgoing: bool = True
    service_url: str | None = None
    auth_method: models.AuthMethod = "mailbox_credentials"
    profile_username: str | None = None
    profile_secret: SecretStr | None = None
    oauth_token_url: str | None = None
    oauth_client_id: str | None = None
    oauth_client_secret: SecretStr | None = None
    oauth_scope: str | None = None
    tls_ca_file: str | None = None
    max_concurrent_connections: int = 10
    min_polling_interval_seconds: int = 60
    process_email_received_after: datetime | None = None
    move_failed_to_undeliverable: bool = False
    # Stop a mailbox's direction after this many refused sign-ins in a row, until Test & Enable
    # succeeds again (an account-lockout policy counts every retry).  None or 0: never stop.
    stop_after_refused_logins: int | None = None


@dataclass(frozen=True)
class MailboxWork:
    """A mailbox that may be processed now, with its profile; secrets decrypted only on demand."""

    row: asyncpg.Record
    profile: dict[str, Any]
    cipher: CredentialCipher

    @property
    def id(self) -> UUID:
        return self.row["id"]

    @property
    def organization_id(self) -> UUID:
        return self.row["organization_id"]

    @property
    def email(self) -> str:
        return self.row["email"]

    def __getitem__(self, key: str) -> Any:
        return self.row[key]

    def login_name(self) -> str:
        """The account whose mail the mailbox reads (nothing decrypted): with impersonation too, the
        mailbox's user, whom the profile's account acts as."""
        return self.row["username"] or self.row["email"]

    def login(self) -> tuple[str, SecretStr]:
        """The user name and secret to sign in with, per the profile's authentication method: with
        impersonation, the profile's account (IMAP and POP3 then act as the mailbox's user)."""
        if self.profile["auth_method"] == "profile_impersonation":
            secret = self.profile.get("profile_secret")
            if not secret:
                raise InvalidInput("the profile uses impersonation but has no profile credentials", reason="missing_credentials")
            return self.profile["profile_username"], self.cipher.decrypt(decode_bytea(secret))
        if self.row["secret"] is None:
            raise InvalidInput("the mailbox has no credentials: run `conduit mailbox set-credentials`", reason="missing_credentials")
        return self.row["username"] or self.row["email"], self.cipher.decrypt(self.row["secret"])


def decode_bytea(value: Any) -> bytes:
    # to_jsonb renders bytea as a "\\x..." hex string.
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return bytes.fromhex(value[2:]) if value.startswith("\\x") else value.encode()


@dataclass(frozen=True)
class OwnerEdit:
    """What an edit of a user or a queue did (``Registry.update_user``, ``update_queue``), as the
    CLI says it: each changed field as (before, after), and what became of its mailbox."""

    owner: models.User | models.Queue
    changed: dict[str, tuple[Any, Any]]
    mailbox: models.Mailbox | None
    mailbox_created: bool = False
    address_moved: bool = False          # its address changed (not only its case): so did its mailbox's
    approval_withdrawn: bool = False     # the mailbox's address was approved until this edit
    tests_reset: tuple[str, ...] = ()    # directions whose Test & Enable result was forgotten
    processed: tuple[str, ...] = ()      # directions its mailbox is processed for now (mailboxes_to_process)
    waits_for: tuple[str, ...] = ()      # why its mailbox is not processed, each with what to do


class Registry:
    """Registry operations scoped by organization; ``producer`` names who made the change."""

    def __init__(self, pool: asyncpg.Pool, cipher: CredentialCipher, *, producer: str = "registry") -> None:
        self._pool = pool
        self._cipher = cipher
        self._producer = producer

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    @property
    def cipher(self) -> CredentialCipher:
        return self._cipher

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._pool.acquire() as conn:
            try:
                async with conn.transaction():
                    yield conn
            except asyncpg.UniqueViolationError as exc:
                raise Conflict(_constraint_message(exc)) from exc
            except (asyncpg.CheckViolationError, asyncpg.NotNullViolationError, asyncpg.ForeignKeyViolationError) as exc:
                raise InvalidInput(_constraint_message(exc)) from exc

    # --- organizations -------------------------------------------------------------------------

    async def organization(self, name: str = DEFAULT_ORGANIZATION) -> models.Organization:
        """The named organization; the default one is created on first use."""
        async with self._tx() as conn:
            row = await repo.organization_by_name(conn, name)
            if row is None:
                if name != DEFAULT_ORGANIZATION:
                    raise NotFound(f"no organization named {name!r}: create it with `conduit org add {name}`")
                row = await repo.insert_organization(conn, name)
            return models.Organization(**dict(row))

    async def add_organization(self, name: str) -> models.Organization:
        if not name.strip():
            raise InvalidInput("an organization needs a name")
        async with self._tx() as conn:
            if await repo.organization_by_name(conn, name) is not None:
                raise Conflict(f"an organization named {name!r} already exists")
            row = await repo.insert_organization(conn, name)
            await self._changed(conn, row["id"], "organization", row["id"], "created", {"name": name})
            return models.Organization(**dict(row))

    async def configure_correlation(self, org: models.Organization, **fields: Any) -> models.Organization:
        allowed = {"correlation_order", "tracking_token_enabled", "tracking_token_prefix", "tracking_token_digits", "smart_matching",
                   "smart_matching_min_recipients"}
        fields = {k: v for k, v in fields.items() if v is not None}
        unknown = set(fields) - allowed
        if unknown:
            raise InvalidInput(f"unknown correlation settings: {', '.join(sorted(unknown))}")
        if not fields:
            raise InvalidInput("nothing to change (see `conduit org set-correlation --help`)")
        order = fields.get("correlation_order")
        valid = {"in_reply_to", "tracking_token", "thread_index", "smart_matching"}
        if order is not None and (not order or set(order) - valid or len(set(order)) != len(order)):
            raise InvalidInput(f"correlation order must list distinct methods from: {', '.join(sorted(valid))}")
        prefix = fields.get("tracking_token_prefix")
        if prefix is not None and not _TOKEN_PREFIX.fullmatch(prefix):
            # Dispatch puts it in subjects and evaluate searches subjects for it: an empty, spaced or
            # all-digit prefix would make no token, or match any number.
            raise InvalidInput("a tracking token prefix is 1-20 characters without spaces or control characters, "
                               f"not only digits (got {prefix!r:.40})")
        async with self._tx() as conn:
            row = await repo.update_organization(conn, org.id, fields)
            await self._changed(conn, org.id, "organization", org.id, "updated", fields)
            return models.Organization(**dict(row))

    # --- profiles ------------------------------------------------------------------------------

    async def add_profile(self, org: models.Organization, spec: ProfileInput, *, make_default: bool = False) -> models.Profile:
        fields = self._profile_fields(spec)
        async with self._tx() as conn:
            if await repo.profile_by_name_or_id(conn, org.id, spec.name) is not None:
                raise Conflict(f"a profile named {spec.name!r} already exists")
            row = await repo.insert_profile(conn, {"organization_id": org.id, **fields})
            # Exactly one default per organization: the first profile becomes it.
            if make_default or await repo.default_profile(conn, org.id) is None:
                await self._make_default(conn, org.id, row["id"])
                row = await repo.profile_by_id(conn, row["id"])
            await self._changed(conn, org.id, "profile", row["id"], "created", {"name": spec.name, "server_type": spec.server_type})
            return _profile(row)

    async def update_profile(self, org: models.Organization, ref: str, *, clear: Iterable[str] = (),
                             **changes: Any) -> models.Profile:
        """Change a profile's settings (None: unchanged) and reset those named in ``clear`` to none.
        The result is checked as a whole, as a new profile would be; secrets are replaced only when
        given.  Running services take the change at their next look at the registry: dispatch within
        ``mailbox_refresh_seconds`` (its connection pools resized), ingest within ``refresh_seconds``
        (the profile's mailboxes start new sessions).  Where the server or sign-in of a direction changed,
        its mailboxes' back-offs end and their refused sign-ins are counted afresh
        (``_retry_with_new_settings``)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        cleared = {_PROFILE_ALIASES.get(name, name) for name in (c.strip().replace("-", "_") for c in clear)}
        unknown = set(changes) - set(ProfileInput.__dataclass_fields__)
        if unknown:
            raise InvalidInput(f"unknown profile settings: {', '.join(sorted(unknown))}")
        if cleared - _PROFILE_CLEARABLE:
            raise InvalidInput(f"cannot clear {', '.join(sorted(cleared - _PROFILE_CLEARABLE))}: only "
                               f"{', '.join(sorted(_PROFILE_CLEARABLE))} can be")
        if cleared & set(changes):
            raise InvalidInput(f"both set and cleared: {', '.join(sorted(cleared & set(changes)))}")
        if not changes and not cleared:
            raise InvalidInput("nothing to change (see `conduit profile set --help`)")
        async with self._tx() as conn:
            # Locked: a concurrent edit could otherwise make what is checked here stale when written.
            row = await repo.lock_profile(conn, (await self._profile_row(conn, org, ref))["id"])
            if "name" in changes and changes["name"] != row["name"] \
                    and await repo.profile_by_name_or_id(conn, org.id, changes["name"]) is not None:
                raise Conflict(f"a profile named {changes['name']!r} already exists")
            same = changes.get("use_same_settings_for_outgoing", row["use_same_settings_for_outgoing"])
            if same and "incoming_host" in changes and "outgoing_host" not in changes.keys() | cleared \
                    and row["outgoing_host"] in (None, row["incoming_host"]):
                changes["outgoing_host"] = changes["incoming_host"]   # it follows, as `profile add` set it
            changes |= dict.fromkeys(cleared)
            current = {k: row[k] for k in ProfileInput.__dataclass_fields__ if k not in _PROFILE_SECRETS}
            # A secret kept stands for itself in the check: only its presence matters there.
            kept = {k: SecretStr("kept") for k in _PROFILE_SECRETS if row[k] is not None}
            spec = ProfileInput(**{**current, **kept, **changes})
            unused = _unused_settings(spec, [k for k, v in changes.items() if v is not None])
            if unused:
                raise InvalidInput(_unused_message(spec, unused), reason="unused_setting")
            fields = self._profile_fields(spec)
            # Only what differs is written and announced (a new secret always does: it is encrypted anew).
            fields = {k: v for k, v in fields.items() if k in changes and (k in _PROFILE_SECRETS or row[k] != v)}
            if not fields:
                return _profile(row)
            before, row = row, await repo.update_profile(conn, row["id"], fields)
            await self._retry_with_new_settings(conn, org.id, _sign_in_changed(before, row, fields), profile_id=row["id"],
                                                why=f"profile {row['name']} changed")
            await self._changed(conn, org.id, "profile", row["id"], "updated",
                                {k: "changed" if k in _PROFILE_SECRETS and v is not None else v for k, v in fields.items()})
            return _profile(row)

    def _profile_fields(self, spec: ProfileInput) -> dict[str, Any]:
        if not spec.name.strip():
            raise InvalidInput("a profile needs a name")
        if spec.server_type in ("imap", "pop3") and not (spec.incoming_host and spec.incoming_port is not None):
            raise InvalidInput(f"an {spec.server_type.upper()} profile needs --incoming-host and --incoming-port")
        if spec.server_type in ("imap", "pop3", "smtp") and not spec.use_same_settings_for_outgoing and not (spec.outgoing_host and spec.outgoing_port is not None):
            raise InvalidInput("outgoing settings differ from incoming: give --outgoing-host and --outgoing-port")
        if spec.server_type == "smtp" and not (spec.outgoing_host and spec.outgoing_port is not None):
            raise InvalidInput("an SMTP profile needs --outgoing-host and --outgoing-port")
        if spec.server_type in ("exchange_server", "exchange_online") and not spec.service_url:
            raise InvalidInput("an Exchange profile needs --service-url (the EWS URL, or the Graph base URL)")
        if spec.auth_method == "profile_impersonation" and not (spec.profile_username and spec.profile_secret):
            raise InvalidInput("impersonation needs the profile's user name and password (--profile-user, and the "
                               "password from CONDUIT_PROFILE_SECRET or the prompt)")
        if spec.auth_method == "oauth2" and not (spec.oauth_token_url and spec.oauth_client_id and spec.oauth_client_secret):
            raise InvalidInput("OAuth 2.0 needs --oauth-token-url, --oauth-client-id and the client secret")
        _require_https("--service-url", spec.service_url)
        _require_https("--oauth-token-url", spec.oauth_token_url)
        for option, host in (("--incoming-host", spec.incoming_host), ("--outgoing-host", spec.outgoing_host)):
            if host is not None and (problem := models.host_problem(host)) is not None:
                raise InvalidInput(f"{option} {host!r:.80} is not a host name or IP address: {problem}", reason="bad_host")
        if spec.tls_ca_file is not None and (problem := check_ca_file(spec.tls_ca_file)) is not None:
            raise InvalidInput(f"--tls-ca-file {spec.tls_ca_file} cannot be used: {problem}")
        stop_after = spec.stop_after_refused_logins
        if stop_after is not None and not 0 <= stop_after <= MAX_REFUSED_LOGINS:
            raise InvalidInput(_REFUSED_LOGINS_RANGE, reason="bad_limit")
        fields = {k: v for k, v in spec.__dict__.items() if k not in ("profile_secret", "oauth_client_secret")}
        fields["stop_after_refused_logins"] = stop_after or None   # 0 and none both mean never stop
        if spec.tls_ca_file is not None:
            # Stored absolute: services read it from their own working directory, not the caller's.
            fields["tls_ca_file"] = os.path.abspath(os.path.expanduser(spec.tls_ca_file))
        fields["profile_secret"] = self._cipher.encrypt(spec.profile_secret) if spec.profile_secret else None
        fields["oauth_client_secret"] = self._cipher.encrypt(spec.oauth_client_secret) if spec.oauth_client_secret else None
        return fields

    async def _make_default(self, conn: asyncpg.Connection, org_id: UUID, profile_id: UUID) -> None:
        await repo.set_default_profile(conn, org_id, profile_id)
        for mailbox_id in await repo.link_profileless_mailboxes(conn, org_id, profile_id):
            await self._mailbox_event(conn, org_id, mailbox_id, "updated", code="profile_linked",
                                      message="linked to the default email server profile")

    async def profiles(self, org: models.Organization) -> list[models.Profile]:
        async with self._pool.acquire() as conn:
            return [_profile(r) for r in await repo.profiles(conn, org.id)]

    async def profile(self, org: models.Organization, ref: str) -> models.Profile:
        async with self._pool.acquire() as conn:
            return _profile(await self._profile_row(conn, org, ref))

    async def _profile_row(self, conn: asyncpg.Connection, org: models.Organization, ref: str) -> asyncpg.Record:
        row = await repo.profile_by_name_or_id(conn, org.id, ref)
        if row is None:
            raise NotFound(f"no email server profile {ref!r} (see `conduit profile list`)")
        return row

    async def set_default_profile(self, org: models.Organization, ref: str) -> models.Profile:
        async with self._tx() as conn:
            row = await self._profile_row(conn, org, ref)
            await self._make_default(conn, org.id, row["id"])
            await self._changed(conn, org.id, "profile", row["id"], "updated", {"is_default": True})
            return _profile(await repo.profile_by_id(conn, row["id"]))

    # --- users and queues ------------------------------------------------------------------------

    async def add_user(self, org: models.Organization, full_name: str, email: str, *,
                       incoming: models.IncomingMethod = "server_side_sync", outgoing: models.OutgoingMethod = "server_side_sync",
                       act: models.ActMethod = "none") -> models.User:
        _require_address(email, sends=True)
        _require_name(full_name, "a user")
        async with self._tx() as conn:
            if any(r["email"].lower() == email.lower() for r in await repo.users(conn, org.id)):
                raise Conflict(f"a user with the address {email} already exists")
            row = await repo.insert_user(conn, org.id, full_name, email, incoming, outgoing, act)
            await self._changed(conn, org.id, "user", row["id"], "created", {"email": email, "full_name": full_name})
            mailbox_id = None
            # A forward-mailbox user gets a mailbox too: it is never polled, but holds the tracking
            # options for the mail the forward mailbox receives on the user's behalf.
            if _wants_mailbox(incoming, outgoing, act):
                mailbox_id = await self._auto_mailbox(conn, org, name=full_name, email=email, owner_user_id=row["id"])
            return models.User(**dict(row), mailbox_id=mailbox_id)

    async def add_queue(self, org: models.Organization, name: str, email: str, *,
                        incoming: models.IncomingMethod = "server_side_sync",
                        outgoing: models.OutgoingMethod = "server_side_sync") -> models.Queue:
        _require_address(email, sends=True)
        _require_name(name, "a queue")
        async with self._tx() as conn:
            if any(r["email"].lower() == email.lower() or r["name"] == name for r in await repo.queues(conn, org.id)):
                raise Conflict(f"a queue named {name!r} or with the address {email} already exists")
            row = await repo.insert_queue(conn, org.id, name, email, incoming, outgoing)
            await self._changed(conn, org.id, "queue", row["id"], "created", {"email": email, "name": name})
            mailbox_id = None
            if _wants_mailbox(incoming, outgoing):
                mailbox_id = await self._auto_mailbox(conn, org, name=name, email=email, owner_queue_id=row["id"])
            return models.Queue(**dict(row), mailbox_id=mailbox_id)

    async def _auto_mailbox(self, conn: asyncpg.Connection, org: models.Organization, **fields: Any) -> UUID:
        """The reference's rule: a user or queue on server-side sync gets a mailbox on the default profile."""
        default = await repo.default_profile(conn, org.id)
        row = await repo.insert_mailbox(conn, {"organization_id": org.id, "profile_id": default["id"] if default else None, **fields})
        await self._mailbox_event(conn, org.id, row["id"], "created")
        if default is None:
            await self._alert(conn, org.id, row["id"], "error", None, "no_default_profile",
                              "the mailbox has no email server profile because the organization has no default "
                              "profile; add one with `conduit profile add` and it will be linked")
        return row["id"]

    async def users(self, org: models.Organization) -> list[models.User]:
        async with self._pool.acquire() as conn:
            return [models.User(**dict(r)) for r in await repo.users(conn, org.id)]

    async def queues(self, org: models.Organization) -> list[models.Queue]:
        async with self._pool.acquire() as conn:
            return [models.Queue(**dict(r)) for r in await repo.queues(conn, org.id)]

    async def update_user(self, org: models.Organization, ref: str, *, email: str | None = None,
                          incoming_method: str | None = None, outgoing_method: str | None = None,
                          act_method: str | None = None, active: bool | None = None) -> OwnerEdit:
        """Change a user's address, delivery methods or active flag (None: unchanged); see ``_update_owner``."""
        return await self._update_owner(org, "user", ref, email=email, incoming_method=incoming_method,
                                        outgoing_method=outgoing_method, act_method=act_method, active=active)

    async def update_queue(self, org: models.Organization, ref: str, *, email: str | None = None,
                           incoming_method: str | None = None, outgoing_method: str | None = None,
                           active: bool | None = None) -> OwnerEdit:
        """Change a queue's address, delivery methods or active flag (None: unchanged); see ``_update_owner``."""
        return await self._update_owner(org, "queue", ref, email=email, incoming_method=incoming_method,
                                        outgoing_method=outgoing_method, active=active)

    async def _update_owner(self, org: models.Organization, kind: str, ref: str, **fields: Any) -> OwnerEdit:
        """The reference's rules for an edit of a user or a queue, in one transaction:

        - A new address is its mailbox's too.  The mailbox then reaches another account: its approval
          is withdrawn and its Test & Enable results are forgotten (as when it moves to a profile with
          another server), so it is not processed until both are done again for the new address.  A
          sign-in name that was the old address (what ``set_credentials`` stores when given none)
          follows it; the password stays.  A change of case only is the same address: the new spelling
          is written, approval and tests stay.
        - A delivery method that now uses server-side sync (or a forward mailbox) gives an owner
          without a mailbox one on the default profile, as ``add_user`` does.
        - An inactive owner's mailbox is not processed (``mailboxes_to_process``); nothing else changes.

        Only what differs is written; the owner's change goes on ``registry.changes``, the mailbox's
        on ``mailbox.events``."""
        fields = {k: v for k, v in fields.items() if v is not None}
        if not fields:
            raise InvalidInput(f"nothing to change (see `conduit {kind} set --help`)")
        for name, values in _OWNER_METHODS.items():
            if name in fields and fields[name] not in get_args(values):
                direction = name.removesuffix("_method")
                raise InvalidInput(f"{fields[name]!r} is no {direction} delivery method: choose from "
                                   f"{', '.join(get_args(values))}", reason="bad_method")
        if "email" in fields:
            _require_address(fields["email"], sends=True)
        async with self._tx() as conn:
            row = await repo.lock_owner(conn, kind, org.id, ref)
            if row is None:
                what = "address or id" if kind == "user" else "address, name or id"
                raise NotFound(f"no {kind} {ref!r} (give its {what}; see `conduit {kind} list`)")
            new_email = fields.get("email")
            moved = new_email is not None and new_email.lower() != row["email"].lower()
            if moved:
                await self._require_free_address(conn, org, kind, new_email)
            changes = {k: v for k, v in fields.items() if row[k] != v}
            changed = {k: (row[k], v) for k, v in changes.items()}
            mailbox = await repo.lock_owners_mailbox(conn, kind, row["id"])
            if not changes:
                return await self._owner_edit(conn, kind, row["id"], {}, mailbox and mailbox["id"])
            owner = await repo.update_owner(conn, kind, row["id"], changes)
            await self._changed(conn, org.id, kind, row["id"], "updated", changes)
            edit: dict[str, Any] = {}
            if mailbox is None and _wants_mailbox(owner["incoming_method"], owner["outgoing_method"],
                                                  owner.get("act_method", "none")):
                name = owner["full_name"] if kind == "user" else owner["name"]
                mailbox_id = await self._auto_mailbox(conn, org, name=name, email=owner["email"],
                                                      **{f"owner_{kind}_id": owner["id"]})
                return await self._owner_edit(conn, kind, row["id"], changed, mailbox_id, mailbox_created=True)
            if mailbox is None:
                return await self._owner_edit(conn, kind, row["id"], changed, None)
            if "email" in changes:
                edit = await self._readdress_mailbox(conn, org, mailbox, owner["email"], moved=moved)
            said = {k: v for k, v in changes.items() if k != "email"}
            if said:
                await self._mailbox_event(conn, org.id, mailbox["id"], "updated", code="owner_changed",
                                          message=f"its {kind} {owner['email']} changed: "
                                                  + ", ".join(f"{k} {v}" for k, v in said.items()))
            return await self._owner_edit(conn, kind, row["id"], changed, mailbox["id"], **edit)

    async def _require_free_address(self, conn: asyncpg.Connection, org: models.Organization, kind: str,
                                    email: str) -> None:
        """A user's or a queue's new address is no other's of its kind, nor any mailbox's (it becomes its
        mailbox's address; the schema's unique indexes back this up for concurrent edits)."""
        other = await repo.owner_with_address(conn, kind, org.id, email)
        if other is not None:
            raise Conflict(f"a {kind} with the address {email} already exists", reason="address_taken")
        box = await repo.mailbox_with_address(conn, org.id, email)
        if box is not None:
            whose = f"{box['owner_kind']} {box['owner_id']}'s mailbox" if box["owner_kind"] else "a forward mailbox"
            raise Conflict(f"{email} is already the address of {whose} ({box['id']})", reason="address_taken")

    async def _readdress_mailbox(self, conn: asyncpg.Connection, org: models.Organization, mailbox: asyncpg.Record,
                                 email: str, *, moved: bool) -> dict[str, Any]:
        """The owner's new address made its mailbox's; with ``moved`` (not only a change of case), its
        approval withdrawn and its Test & Enable results reset."""
        fields: dict[str, Any] = {"email": email}
        if mailbox["username"] is not None and mailbox["username"].lower() == mailbox["email"].lower():
            fields["username"] = email
        if moved:
            fields["email_approved"] = False
        await repo.update_mailbox(conn, mailbox["id"], fields)
        if not moved:
            await self._mailbox_event(conn, org.id, mailbox["id"], "updated", message="email (spelling)")
            return {}
        retest = [d for d in repo.DIRECTIONS if mailbox[f"{d}_status"] != "not_run"]
        await repo.reset_tests(conn, mailbox["id"], retest, f"not tested with the address {email} the mailbox "
                               "moved to: run Test & Enable again")
        await self._mailbox_event(conn, org.id, mailbox["id"], "updated", code="address_changed",
                                  message=f"address changed from {mailbox['email']} to {email}: not processed until "
                                          "approved again" + (" and tested" if retest else ""))
        if retest:
            await self._mailbox_event(conn, org.id, mailbox["id"], "updated", code="tests_reset",
                                      message=f"address changed to {email}: Test & Enable needed again for "
                                              f"{', '.join(retest)}")
        await self._changed(conn, org.id, "mailbox", mailbox["id"], "updated", {"email": email, "email_approved": False})
        return {"address_moved": True, "approval_withdrawn": mailbox["email_approved"], "tests_reset": tuple(retest)}

    async def _owner_edit(self, conn: asyncpg.Connection, kind: str, owner_id: UUID,
                          changed: dict[str, tuple[Any, Any]], mailbox_id: UUID | None, **edit: Any) -> OwnerEdit:
        """The edit's answer, read after its writes (in its transaction): the owner, what changed, its
        mailbox, and whether (and if not, why not) that mailbox is processed now."""
        row = await repo.owner_by_id(conn, kind, owner_id)
        owner = models.User(**dict(row)) if kind == "user" else models.Queue(**dict(row))
        if mailbox_id is None:
            return OwnerEdit(owner=owner, changed=changed, mailbox=None, **edit)
        mailbox = await repo.mailbox_by_id(conn, mailbox_id)
        processed = tuple([d for d in repo.DIRECTIONS
                           if await repo.mailboxes_to_process(conn, d, mailbox_ids=[mailbox["id"]])])
        return OwnerEdit(owner=owner, changed=changed, mailbox=await self._mailbox_model(conn, mailbox),
                         processed=processed, waits_for=() if processed else _waits_for(kind, row, mailbox, changed),
                         **edit)

    # --- mailboxes -------------------------------------------------------------------------------

    async def add_forward_mailbox(self, org: models.Organization, name: str, email: str,
                                  profile: str | None = None) -> models.Mailbox:
        """A mailbox that belongs to no user or queue and receives mail forwarded by many."""
        _require_address(email, sends=True)
        _require_name(name, "a mailbox")
        async with self._tx() as conn:
            profile_row = await self._profile_row(conn, org, profile) if profile else await repo.default_profile(conn, org.id)
            row = await repo.insert_mailbox(conn, {
                "organization_id": org.id, "name": name, "email": email,
                "profile_id": profile_row["id"] if profile_row else None,
            })
            await self._mailbox_event(conn, org.id, row["id"], "created")
            if profile_row is None:
                await self._alert(conn, org.id, row["id"], "error", None, "no_default_profile",
                                  "the forward mailbox has no email server profile; add a default profile")
            return await self._mailbox_model(conn, row)

    async def mailboxes(self, org: models.Organization) -> list[models.Mailbox]:
        async with self._pool.acquire() as conn:
            return [await self._mailbox_model(conn, r, alerts=False) for r in await repo.mailboxes(conn, org.id)]

    async def mailbox(self, org: models.Organization, ref: str, *, sync: bool = False) -> models.Mailbox:
        """A mailbox; with ``sync``, also where ingest stands with it."""
        async with self._pool.acquire() as conn:
            mailbox = await self._mailbox_model(conn, await self._mailbox_row(conn, org, ref))
            if sync:
                summary, folders = await repo.mailbox_sync(conn, mailbox.id)
                mailbox.sync = models.MailboxSync(**dict(summary), folders=[models.FolderSync(**dict(f)) for f in folders])
            return mailbox

    async def _mailbox_row(self, conn: asyncpg.Connection, org: models.Organization, ref: str) -> asyncpg.Record:
        row = await repo.mailbox_by_ref(conn, org.id, ref)
        if row is None:
            raise NotFound(f"no mailbox {ref!r} (see `conduit mailbox list`)")
        return row

    async def _mailbox_model(self, conn: asyncpg.Connection, row: asyncpg.Record, *, alerts: bool = True) -> models.Mailbox:
        mailbox = _mailbox(row, [dict(a) for a in await repo.mailbox_alerts(conn, row["id"])] if alerts else [])
        if alerts:   # one mailbox shown (not a list): its folder rules too
            mailbox.folder_rules = [folder_rules.folder_rule(r) for r in await repo.folder_rules(conn, row["id"])]
        return mailbox

    async def update_mailbox(self, org: models.Organization, ref: str, **fields: Any) -> models.Mailbox:
        """Change mailbox settings: profile, tracking, folders, queue options, active, approval."""
        fields = {k: v for k, v in fields.items() if v is not None}
        allowed = {"profile", "tracking", "tracked_folders", "convert_to_activities", "delete_after_processing",
                   "active", "email_approved", "name"}
        unknown = set(fields) - allowed
        if unknown:
            raise InvalidInput(f"unknown mailbox settings: {', '.join(sorted(unknown))}")
        if "name" in fields:
            _require_name(fields["name"], "a mailbox")
        if "tracked_folders" in fields:
            fields["tracked_folders"] = _tracked_folders(fields["tracked_folders"])
        if not fields:
            raise InvalidInput("nothing to change (see `conduit mailbox configure --help`)")
        async with self._tx() as conn:
            row = await self._mailbox_row(conn, org, ref)
            retest: list[str] = []
            if "profile" in fields:
                new_profile = await self._profile_row(conn, org, fields.pop("profile"))
                fields["profile_id"] = new_profile["id"]
                if new_profile["id"] != row["profile_id"]:
                    old_profile = await repo.profile_by_id(conn, row["profile_id"]) if row["profile_id"] else None
                    retest = [d for d in repo.DIRECTIONS if row[f"{d}_status"] != "not_run"
                              and _server_of(old_profile, d) != _server_of(new_profile, d)]
            if "delete_after_processing" in fields and fields["delete_after_processing"] and row["owner_kind"] != "queue":
                raise InvalidInput("only a queue's mailbox can delete email from the server after processing")
            if "convert_to_activities" in fields and row["owner_kind"] != "queue":
                raise InvalidInput("only a queue's mailbox converts its email to activities or not (a user's "
                                   "mailbox follows its tracking option)")
            # Only what differs is written and announced: deactivating an inactive mailbox changes nothing.
            fields = {k: v for k, v in fields.items() if row[k] != v}
            if not fields:
                return await self._mailbox_model(conn, row)
            row = await repo.update_mailbox(conn, row["id"], fields)
            if retest:
                # Test & Enable vouched for the old server only: until it is run against the new
                # one, the mailbox is not processed (mailboxes_to_process wants 'success').
                await repo.reset_tests(conn, row["id"], retest, f"not tested with the profile {row['profile_name']} "
                                       "the mailbox moved to: run Test & Enable again")
                row = await repo.mailbox_by_id(conn, row["id"])
                await self._mailbox_event(conn, org.id, row["id"], "updated", code="tests_reset",
                                          message=f"moved to profile {row['profile_name']}: Test & Enable needed again "
                                                  f"for {', '.join(retest)}")
            await self._mailbox_event(conn, org.id, row["id"], "updated", message=", ".join(sorted(fields)))
            return await self._mailbox_model(conn, row)

    # --- folder-level tracking rules ------------------------------------------------------------

    async def add_folder_rule(self, org: models.Organization, ref: str, folder: str,
                              record: str) -> tuple[models.FolderRule, bool]:
        """Map the mailbox's ``folder`` to ``record`` (``KIND:ID`` or ``KIND:ADDRESS``).  Returns the
        rule and whether the folder was added to the mailbox's tracked folders (a folder not tracked
        is added: a rule on a folder that is never read would do nothing)."""
        async with self._tx() as conn:
            # Locked: two rules added at once must not each write the tracked folders without the other's.
            row = await repo.lock_mailbox(conn, (await self._mailbox_row(conn, org, ref))["id"])
            profile = await repo.profile_by_id(conn, row["profile_id"]) if row["profile_id"] else None
            folder_rules.check_rule_folder(row, profile, folder)
            folder = folder_rules.as_tracked(list(row["tracked_folders"]), folder)
            target = await folder_rules.resolve_record(conn, org.id, record)
            existing = await repo.folder_rule(conn, row["id"], folder)
            if existing is not None:
                raise Conflict(f"the folder {folder!r} of {row['email']} is already mapped to {existing['regarding_kind']} "
                               f"{existing['regarding_email']} ({existing['regarding_id']}); remove that rule first")
            rule = await repo.insert_folder_rule(conn, row["id"], folder, target["kind"], target["id"])
            tracked = folder_rules.tracked_with(list(row["tracked_folders"]), folder)
            if tracked is not None:
                await repo.update_mailbox(conn, row["id"], {"tracked_folders": tracked})
            await self._mailbox_event(conn, org.id, row["id"], "updated", code="folder_rule_added",
                                      message=f"folder {folder} tracked regarding {target['kind']} {target['id']}"
                                              + ("; folder added to the tracked folders" if tracked else ""))
            await self._changed(conn, org.id, "mailbox", row["id"], "updated",
                                {"folder_rule": {"folder": folder, "regarding_kind": target["kind"],
                                                 "regarding_id": str(target["id"])}}
                                | ({"tracked_folders": tracked} if tracked else {}))
            return folder_rules.folder_rule(rule), tracked is not None

    async def folder_rules(self, org: models.Organization, ref: str) -> list[models.FolderRule]:
        async with self._pool.acquire() as conn:
            row = await self._mailbox_row(conn, org, ref)
            return [folder_rules.folder_rule(r) for r in await repo.folder_rules(conn, row["id"])]

    async def remove_folder_rule(self, org: models.Organization, ref: str, folder: str) -> models.FolderRule:
        """Remove the rule of ``folder``; the folder stays tracked (``configure --folders`` changes that)."""
        async with self._tx() as conn:
            row = await self._mailbox_row(conn, org, ref)
            folder = folder_rules.as_tracked(list(row["tracked_folders"]), folder)   # as the rule was stored
            rule = await repo.folder_rule(conn, row["id"], folder)
            if rule is None or not await repo.delete_folder_rule(conn, row["id"], folder):
                raise NotFound(f"no folder-level tracking rule for the folder {folder!r} of {row['email']} "
                               f"(see `conduit mailbox folder-rule list {row['email']}`)")
            await self._mailbox_event(conn, org.id, row["id"], "updated", code="folder_rule_removed",
                                      message=f"folder {folder} no longer tracked regarding a record")
            await self._changed(conn, org.id, "mailbox", row["id"], "updated",
                                {"folder_rule_removed": {"folder": folder}})
            return folder_rules.folder_rule(rule)

    async def set_credentials(self, org: models.Organization, ref: str, username: str | None, secret: SecretStr) -> models.Mailbox:
        async with self._tx() as conn:
            row = await self._mailbox_row(conn, org, ref)   # first: "no mailbox" says more than "empty"
            if not secret.get_secret_value():
                raise InvalidInput("the password or token is empty")
            await repo.update_mailbox(conn, row["id"], {"username": username or row["email"],
                                                        "secret": self._cipher.encrypt(secret)})
            await self._mailbox_event(conn, org.id, row["id"], "updated", message="credentials changed")
            # Every direction signs in with them (with impersonation, as this mailbox's user).
            await self._retry_with_new_settings(conn, org.id, list(repo.DIRECTIONS), mailbox_id=row["id"],
                                                why="credentials changed")
            return await self._mailbox_model(conn, await repo.mailbox_by_id(conn, row["id"]))

    async def _retry_with_new_settings(self, conn: asyncpg.Connection, org_id: UUID, directions: list[str], *,
                                       why: str, mailbox_id: UUID | None = None, profile_id: UUID | None = None) -> None:
        """The one place an edit of the server or the credentials of ``directions`` (one mailbox's, or
        every mailbox's on a profile) takes effect on scheduling: the refused sign-ins counted so far
        were refused to other credentials or by another server, so the count starts afresh; and a
        back-off earned with the old settings ends now, so the next registry refresh (ingest's 5 s,
        dispatch's 2 s) starts sessions with the new ones instead of waiting up to an hour.  A direction
        stopped after refused sign-ins stays stopped until Test & Enable.  The error count stays: the
        first session that works records the recovery, as after any back-off.  Each direction whose
        back-off ended is announced on ``mailbox.events`` (an ``updated`` event with code
        ``backoff_cleared``): the ``backoff`` event before it said when it would retry."""
        for changed in await repo.retry_with_new_settings(conn, directions=directions, mailbox_id=mailbox_id,
                                                          profile_id=profile_id):
            for direction in changed["backed_off"]:
                await self._mailbox_event(conn, org_id, changed["id"], "updated", direction=direction,
                                          code="backoff_cleared",
                                          message=f"{why}: back-off cleared, retrying now with the new settings")

    async def record_test(self, mailbox_id: UUID, direction: str, ok: bool, message: str) -> None:
        """Test & Enable's result for one direction; success enables the direction."""
        async with self._tx() as conn:
            row = await repo.mailbox_by_id(conn, mailbox_id)
            fields: dict[str, Any] = {
                f"{direction}_status": "success" if ok else "failure",
                f"{direction}_tested_at": datetime.now().astimezone(),
                f"{direction}_test_message": message,
                f"{direction}_stopped_at": None,   # this result is the direction's word now
            }
            if ok:
                fields.update({f"{direction}_error_count": 0, f"{direction}_backoff_until": None,
                               f"{direction}_refused_logins": 0})
            await repo.update_mailbox(conn, mailbox_id, fields)
            await self._mailbox_event(conn, row["organization_id"], mailbox_id, "tested", direction=direction,
                                      severity="information" if ok else "error",
                                      code="test_succeeded" if ok else "test_failed", message=message)
            if not ok:
                await self._alert(conn, row["organization_id"], mailbox_id, "error", direction, "test_failed", message)

    async def record_failure(self, mailbox_id: UUID, direction: str, reason: str, message: str) -> datetime:
        """A mailbox-level failure: count it, back off exponentially, raise an alert. Returns back-off end.

        A refused sign-in (``authentication_failed``) on a profile with ``stop_after_refused_logins``
        that makes that many in a row stops the direction instead: its Test & Enable result becomes a
        failure saying why and what to do, with an error alert (``stopped_refused_logins``), so no
        service signs in again until Test & Enable succeeds.  Other failures never count toward it."""
        refused = reason == AuthenticationFailed.reason
        async with self._tx() as conn:
            row = await repo.mailbox_by_id(conn, mailbox_id)
            state = await repo.record_direction_failure(conn, mailbox_id, direction, BACKOFF_BASE_SECONDS,
                                                        BACKOFF_CAP_SECONDS, refused_login=refused)
            limit = state["stop_after_refused_logins"]
            # Only a direction being processed is stopped: one that a test failed or that was stopped
            # already (a send another replica began before the stop) is left as it is.
            if refused and limit and state["refused_logins"] >= limit and state["status"] == "success":
                await self._stop_direction(conn, row, direction, state["refused_logins"], message)
                return state["backoff_until"]
            severity = "warning" if state["error_count"] < 3 else "error"
            text = f"{message} (failure {state['error_count']}; retrying after {state['backoff_until']:%H:%M:%S} UTC)"
            await self._alert(conn, row["organization_id"], mailbox_id, severity, direction, reason, text)
            # After the alert, so a reader of mailbox.events (the health aggregate) sees the direction
            # waiting, not only failed.
            await self._mailbox_event(conn, row["organization_id"], mailbox_id, "backoff", direction=direction,
                                      severity=severity, code=reason,
                                      message=f"retrying after {state['backoff_until']:%Y-%m-%d %H:%M:%S} UTC")
            return state["backoff_until"]

    async def _stop_direction(self, conn: asyncpg.Connection, row: asyncpg.Record, direction: str, refused: int,
                              message: str) -> None:
        profile = await repo.profile_by_id(conn, row["profile_id"]) if row["profile_id"] else None
        text = (f"{direction} stopped after {refused} refused sign-ins in a row, so that retrying does not lock the "
                f"account ({message.rstrip('.')}): {_credentials_fix(row, profile)}, then run `conduit mailbox "
                f"test-enable {row['email']} --direction {direction}`")
        await repo.stop_direction(conn, row["id"], direction, text)
        # As a failed Test & Enable reads on mailbox.events (the health aggregate: failing), then its alert.
        await self._mailbox_event(conn, row["organization_id"], row["id"], "tested", direction=direction,
                                  severity="error", code="stopped_refused_logins", message=text)
        await self._alert(conn, row["organization_id"], row["id"], "error", direction, "stopped_refused_logins", text)

    async def raise_alert(self, mailbox_id: UUID, severity: str, direction: str | None, code: str, message: str) -> None:
        """An alert, unless the mailbox's latest alert already says exactly this (no repeats at every poll)."""
        async with self._tx() as conn:
            latest = await conn.fetchrow(
                "SELECT code, message FROM mailbox_alert WHERE mailbox_id = $1 ORDER BY id DESC LIMIT 1", mailbox_id)
            if latest is not None and (latest["code"], latest["message"]) == (code, message):
                return
            org_id = await conn.fetchval("SELECT organization_id FROM mailbox WHERE id = $1", mailbox_id)
            await self._alert(conn, org_id, mailbox_id, severity, direction, code, message)

    async def record_success(self, mailbox_id: UUID, direction: str) -> None:
        """Clear a failing mailbox's errors; an information alert says it recovered."""
        async with self._pool.acquire() as conn:
            # Cheap check first: this runs after every successful poll.
            failing = await conn.fetchval(f"SELECT {direction}_error_count > 0 FROM mailbox WHERE id = $1", mailbox_id) \
                if direction in repo.DIRECTIONS else False
        if not failing:
            return
        async with self._tx() as conn:
            if await repo.record_direction_success(conn, mailbox_id, direction):
                row = await repo.mailbox_by_id(conn, mailbox_id)
                await self._alert(conn, row["organization_id"], mailbox_id, "information", direction, "recovered",
                                  f"{direction} synchronization works again")

    async def mailboxes_to_process(self, direction: str, *, organization_id: UUID | None = None,
                                   mailbox_ids: list[UUID] | None = None) -> list[MailboxWork]:
        async with self._pool.acquire() as conn:
            rows = await repo.mailboxes_to_process(conn, direction, organization_id=organization_id, mailbox_ids=mailbox_ids)
        return [MailboxWork(r, r["profile"], self._cipher) for r in rows]

    # --- CRM records, activities, decisions -----------------------------------------------------------

    async def add_record(self, org: models.Organization, kind: models.RecordKind, name: str, email: str,
                         *, email_enabled: bool = True) -> models.Record:
        _require_address(email)
        async with self._tx() as conn:
            # One record of a kind per address: a second contact with Bea's address would leave
            # "which contact sent this?" to chance.  Kinds may share one (a contact and the
            # account it works for); sender resolution then prefers contact, account, lead.
            same = [r for r in await repo.records_with_address(conn, org.id, email) if r["kind"] == kind]
            if same:
                raise Conflict(f"a {kind} with the address {email} already exists: {same[0]['name']} ({same[0]['id']})",
                               reason="duplicate_record")
            row = await repo.insert_record(conn, org.id, kind, name, email, email_enabled)
            await self._changed(conn, org.id, kind, row["id"], "created", {"email": email, "name": name})
            return models.Record(**dict(row))

    async def parties_with_address(self, org: models.Organization, email: str) -> list[tuple[str, UUID, str]]:
        """(kind, id, name) of every user, contact, account, lead and queue with this address, the one
        mail from it is resolved to first (docs/inbound.md, "Parties")."""
        async with self._pool.acquire() as conn:
            return [(r["kind"], r["id"], r["name"]) for r in await repo.parties_with_address(conn, org.id, email)]

    async def records(self, org: models.Organization, kind: str | None = None) -> list[models.Record]:
        async with self._pool.acquire() as conn:
            return [models.Record(**dict(r)) for r in await repo.records(conn, org.id, kind)]

    async def activities(self, org: models.Organization, limit: int = 50) -> list[models.Activity]:
        async with self._pool.acquire() as conn:
            return [models.Activity(**_activity(r)) for r in await repo.activities(conn, org.id, limit)]

    async def activity(self, org: models.Organization, ref: str) -> models.Activity:
        async with self._pool.acquire() as conn:
            row = await repo.activity_by_ref(conn, org.id, ref)
        if row is None:
            raise NotFound(f"no email activity {ref!r} (give its id or Message-ID)")
        return models.Activity(**_activity(row))

    async def decisions(self, org: models.Organization, message_id: str) -> list[models.Decision]:
        async with self._pool.acquire() as conn:
            return [models.Decision(**dict(r)) for r in await repo.decisions_for_message(conn, org.id, message_id.strip())]

    async def outbound_requests(self, org: models.Organization, status: str | None = None,
                                limit: int = 50) -> list[models.OutboundRequest]:
        async with self._pool.acquire() as conn:
            return [_outbound(r) for r in await repo.outbound_requests(conn, org.id, status, limit)]

    async def outbound_request(self, org: models.Organization, ref: str) -> models.OutboundRequest:
        async with self._pool.acquire() as conn:
            row = await repo.outbound_request_by_ref(conn, org.id, ref.strip())
        if row is None:
            raise NotFound(f"no request to send {ref!r} (give its idempotency key, request id or Message-ID)")
        return _outbound(row)

    async def sent_message(self, org: models.Organization, message_id: str) -> models.OutboundRequest | None:
        """The request Conduit sent (or was asked to send) this Message-ID for; None when it is not ours."""
        async with self._pool.acquire() as conn:
            row = await repo.outbound_request_by_message_id(conn, org.id, message_id.strip())
        return None if row is None else _outbound(row)

    async def resend_request(self, org: models.Organization, ref: str, key: str | None = None) -> EmailOutboundV1:
        """A failed request, as a new request to publish on ``email.outbound``: the same data as
        dispatch accepted it, under ``key`` (by default the first key + ``.resend``), without the
        first deadline.  Refused (``Conflict``) unless it failed, and when that key is already used:
        so resending by the default key twice sends once."""
        request = await self.outbound_request(org, ref)
        if request.status == "sent":
            raise Conflict(f"{request.idempotency_key!r} was sent (Message-ID <{request.message_id}>); sending it again "
                           "would deliver it twice. `conduit send` sends a new email")
        if request.status == "rejected":
            raise Conflict(f"{request.idempotency_key!r} was rejected ({request.reason}) and never sent: once that is "
                           "mended, `conduit dead-letters replay email.outbound` sends it under its own key")
        if request.status != "failed":
            raise Conflict(f"{request.idempotency_key!r} is still {request.status}: dispatch is working on it")
        key = key or f"{request.idempotency_key}.resend"
        async with self._pool.acquire() as conn:
            body = await repo.outbound_request_body(conn, request.id)
        # A resend under a key already used is the same request again: `conduit send`'s ledger check
        # answers it with where that resend stands, and publishes nothing (or refuses a key that a
        # different request holds).
        if not body:
            raise NotFound(f"request {request.idempotency_key!r} has no stored request to send again")
        body = {**body, "idempotency_key": key}
        body.pop("deadline", None)   # the first request's deadline has passed, or it would not have failed so
        try:
            return EmailOutboundV1.model_validate(body)
        except ValidationError as exc:
            raise InvalidInput(f"cannot resend it as {key!r}: {exc.errors()[0]['msg']}") from None

    # --- events ------------------------------------------------------------------------------------

    async def _alert(self, conn: asyncpg.Connection, org_id: UUID, mailbox_id: UUID, severity: str,
                     direction: str | None, code: str, message: str) -> None:
        await repo.insert_alert(conn, mailbox_id, severity, direction, code, message)
        await self._mailbox_event(conn, org_id, mailbox_id, "alert", direction=direction, severity=severity,
                                  code=code, message=message)
        log.log(logging.WARNING if severity != "information" else logging.INFO,
                "mailbox %s %s: %s", mailbox_id, code, message)

    async def _mailbox_event(self, conn: asyncpg.Connection, org_id: UUID, mailbox_id: UUID, kind: str, **fields: Any) -> None:
        event = Envelope[MailboxEventV1](
            type=MAILBOX_EVENTS.name, schema_version=1, producer=self._producer, organization_id=org_id,
            data=MailboxEventV1(mailbox_id=mailbox_id, kind=kind, **fields),
        )
        await enqueue(conn, MAILBOX_EVENTS.name, str(mailbox_id), event)

    async def _changed(self, conn: asyncpg.Connection, org_id: UUID, entity: str, entity_id: UUID, change: str,
                       fields: dict[str, Any]) -> None:
        event = Envelope[RegistryChangeV1](
            type=REGISTRY_CHANGES.name, schema_version=1, producer=self._producer, organization_id=org_id,
            data=RegistryChangeV1(entity=entity, entity_id=entity_id, change=change, fields=fields),
        )
        await enqueue(conn, REGISTRY_CHANGES.name, str(entity_id), event)


def _require_name(name: str, who: str) -> None:
    """A name becomes the display name of the mail a mailbox sends: one that would break the From
    header (a line break, as such or in an encoded word) is refused here, not at every send."""
    if not name.strip():
        raise InvalidInput(f"{who} needs a name")
    if breaks_header(name):
        raise InvalidInput(f"{who}'s name must not contain line breaks or control characters, "
                           "as such or in an encoded word", reason="bad_name")


# A user's and a queue's delivery methods, and the values each takes (a queue has no act method).
_OWNER_METHODS = {"incoming_method": models.IncomingMethod, "outgoing_method": models.OutgoingMethod,
                  "act_method": models.ActMethod}


def _wants_mailbox(incoming: str, outgoing: str, act: str = "none") -> bool:
    """The reference's rule: a user or queue on server-side sync has a mailbox; one whose mail comes
    by a forward mailbox too (never polled, it holds the tracking options for that mail)."""
    return "server_side_sync" in (incoming, outgoing, act) or incoming == "forward_mailbox"


def _waits_for(kind: str, owner: asyncpg.Record, mailbox: asyncpg.Record,
               changed: dict[str, tuple[Any, Any]] | None = None) -> tuple[str, ...]:
    """Why ``mailboxes_to_process`` leaves a user's or queue's mailbox out, each reason with what to
    do, in the CLI's words (empty when it names none: it is processed, or backing off).  ``changed``:
    the edit's changes, so that the way back names the direction it just took off server-side sync."""
    email = mailbox["email"]
    methods = {"incoming": owner["incoming_method"], "outgoing": owner["outgoing_method"],
               "act": owner.get("act_method", "none")}
    synced = [d for d, method in methods.items() if method == "server_side_sync"]
    # Appointments, contacts and tasks have no Test & Enable yet (`--direction act` is refused): not
    # something to wait for, and said as it is.
    tested = [d for d in synced if d != "act"]
    reasons = []
    if not owner["active"]:
        reasons.append(f"the {kind} is inactive (`conduit {kind} activate {owner['email']}`)")
    if not synced:
        off = [d for d in methods if (changed or {}).get(f"{d}_method", (None,))[0] == "server_side_sync"]
        ways = [f"--{d} server_side_sync" for d in (off or ["incoming", "outgoing"])]
        reasons.append(f"the {kind} uses server-side sync for no direction (`conduit {kind} set {owner['email']} "
                       + "` or `".join(ways) + "`)")
    if not mailbox["active"]:
        reasons.append(f"the mailbox is inactive (`conduit mailbox activate {email}`)")
    if mailbox["profile_id"] is None:
        reasons.append("the mailbox has no email server profile (`conduit mailbox configure --profile`)")
    if not mailbox["email_approved"]:
        reasons.append(f"its address is not approved (`conduit mailbox approve {email}`)")
    untested = [d for d in tested if mailbox[f"{d}_status"] != "success"]
    if untested:
        reasons.append(f"Test & Enable has not succeeded for {', '.join(untested)} "
                       f"(`conduit mailbox test-enable {email}`)")
    if "act" in synced:
        reasons.append("act (appointments, contacts and tasks) is not synchronized yet and has no Test & Enable")
    now = datetime.now(timezone.utc)
    if tested and not untested and all(mailbox[f"{d}_backoff_until"] and mailbox[f"{d}_backoff_until"] > now
                                       for d in tested):
        reasons.append("it is backing off after failures (`conduit mailbox show` says until when)")
    return tuple(reasons)


def _tracked_folders(folders: Iterable[str]) -> list[str]:
    """The folders to track, as given: blanks dropped, each name once (the Inbox in any case is one
    folder), first mention first; refused when none is left or a name cannot be a folder's."""
    kept: dict[str, str] = {}
    for folder in (f.strip() for f in folders):
        if not folder:
            continue
        if (problem := models.folder_name_problem(folder)) is not None:
            raise InvalidInput(problem, reason="bad_folder")
        kept.setdefault(models.folder_key(folder), "INBOX" if models.is_inbox(folder) else folder)
    if not kept:
        raise InvalidInput("a mailbox tracks at least one folder: --folders names none (e.g. --folders INBOX,Projects)",
                           reason="bad_folder")
    return list(kept.values())


# How each authentication method signs in: the profile settings it reads, and the secret among them.
_SIGN_IN_SETTINGS = {"mailbox_credentials": (), "profile_impersonation": ("profile_username", "profile_secret"),
                     "oauth2": ("oauth_token_url", "oauth_client_id", "oauth_scope", "oauth_client_secret")}
_EXCHANGE = ("exchange_server", "exchange_online")
# The profile settings that only some server types or authentication methods use, by their options' names.
_OPTIONAL_SETTINGS = {"service_url": "--service-url", "profile_username": "--profile-user",
                      "profile_secret": "--new-profile-secret", "oauth_token_url": "--oauth-token-url",
                      "oauth_client_id": "--oauth-client-id", "oauth_scope": "--oauth-scope",
                      "oauth_client_secret": "--new-client-secret"}


def _sign_in_method(profile: Any, direction: str) -> str:
    """How ``direction`` of a profile's mailboxes signs in: Microsoft Graph (Exchange Online's
    outgoing) always with the profile's OAuth client, every other server as the profile says."""
    if direction == "outgoing" and profile["server_type"] == "exchange_online":
        return "oauth2"
    return profile["auth_method"]


def _unused_settings(spec: ProfileInput, given: Iterable[str]) -> list[str]:
    """Of the settings ``given``, those no direction of a profile like ``spec`` uses: an EWS or Graph
    URL on a profile that is not Exchange, the profile password without impersonation, OAuth
    settings without OAuth (Graph always uses them)."""
    methods = {spec.auth_method} | ({"oauth2"} if spec.server_type == "exchange_online" else set())
    used = {s for m in methods for s in _SIGN_IN_SETTINGS[m]} | ({"service_url"} if spec.server_type in _EXCHANGE else set())
    return [k for k in _OPTIONAL_SETTINGS if k in given and k not in used]


def _unused_message(spec: ProfileInput, unused: list[str]) -> str:
    why = []
    if "service_url" in unused:
        why.append(f"a service URL only for Exchange (exchange_server, exchange_online), and it is {spec.server_type}")
    if {"profile_username", "profile_secret"} & set(unused):
        why.append(f"a profile user and password only with --auth profile_impersonation, and it signs in with "
                   f"{spec.auth_method}")
    if {"oauth_token_url", "oauth_client_id", "oauth_scope", "oauth_client_secret"} & set(unused):
        why.append(f"OAuth settings only with --auth oauth2 (or on exchange_online), and it signs in with "
                   f"{spec.auth_method}")
    return (f"{', '.join(_OPTIONAL_SETTINGS[k] for k in unused)}: not used by the profile {spec.name} "
            f"({'; '.join(why)}); nothing changed")


def _server_of(profile: asyncpg.Record | None, direction: str) -> tuple[Any, ...] | None:
    """What Test & Enable checked for ``direction``: the server reached and how the mailbox signs in
    there, made only of the settings that direction's server type and authentication method use (an
    EWS URL on an IMAP profile, OAuth settings beside a password, are no part of it).  Two profiles
    that agree on it need no new test when a mailbox moves between them; an edit that leaves it as it
    was leaves the direction's back-off running."""
    if profile is None:
        return None
    kind = profile["server_type"]
    if direction == "incoming":
        if kind not in ("imap", "pop3"):
            return (kind,)   # no incoming email over this server type yet: nothing is reached
        server: tuple[Any, ...] = (kind, (profile["incoming_host"] or "").lower(), profile["incoming_port"],
                                   profile["incoming_tls"])
        tls = profile["incoming_tls"] != "none"
    elif direction == "outgoing" and kind in _EXCHANGE:
        server, tls = ("ews" if kind == "exchange_server" else "graph", profile["service_url"]), True
    elif direction == "outgoing":
        # IMAP, POP3 and SMTP profiles all send by SMTP (the incoming host when no outgoing one is named).
        host = (profile["outgoing_host"] or profile["incoming_host"] or "").lower()
        port = profile["outgoing_port"] or models.DEFAULT_SUBMISSION_PORT[profile["outgoing_tls"]]
        server, tls = ("smtp", host, port, profile["outgoing_tls"]), profile["outgoing_tls"] != "none"
    else:
        server, tls = (kind, profile["service_url"] if kind in _EXCHANGE else None), True
    method = _sign_in_method(profile, direction)
    sign_in = (method, *(profile[k] for k in _SIGN_IN_SETTINGS[method] if k not in _PROFILE_SECRETS))
    # The CA file is read for TLS, and for an OAuth token endpoint.
    ca_file = profile["tls_ca_file"] if tls or method == "oauth2" else None
    return (*server, *sign_in, ca_file)


def _sign_in_changed(before: asyncpg.Record, after: asyncpg.Record, written: dict[str, Any]) -> list[str]:
    """The directions whose next session, after a profile edit, reaches another server or signs in
    otherwise: its server or sign-in (``_server_of``), or a new secret that its sign-in uses."""
    def new_secret(d: str) -> bool:
        return any(k in written for k in _SIGN_IN_SETTINGS[_sign_in_method(after, d)] if k in _PROFILE_SECRETS)
    return [d for d in repo.DIRECTIONS if new_secret(d) or _server_of(before, d) != _server_of(after, d)]


def _require_address(email: str, *, sends: bool = False) -> None:
    """``sends``: the address of a user, queue or mailbox, which Conduit writes as From: printable
    ASCII before the @, as every address it sends (shared.events.fields)."""
    if not is_email_address(email):
        raise InvalidInput(f"not a valid email address: {email!r}", reason="bad_address")
    if sends and not is_sendable_address(email):
        raise InvalidInput(f"{email!r} has characters outside printable ASCII before the @: Conduit could not send "
                           "from it (internationalised addresses, RFC 6531, are not sent yet)", reason="bad_address")


_REFUSED_LOGINS_RANGE = (f"--stop-after-refused-logins must be between 1 and {MAX_REFUSED_LOGINS} refused sign-ins, "
                         "or 0 to never stop")


def _credentials_fix(mailbox: asyncpg.Record, profile: asyncpg.Record | None) -> str:
    """What to correct for a refused sign-in, in the CLI's words: the account that signs in is the
    mailbox's own, or with impersonation or OAuth the profile's."""
    auth = profile["auth_method"] if profile is not None else "mailbox_credentials"
    if auth == "profile_impersonation":
        return f"correct the profile's password (`conduit profile set {profile['name']} --new-profile-secret`)"
    if auth == "oauth2":
        return (f"correct the profile's OAuth client (`conduit profile set {profile['name']} --new-client-secret`) "
                "or the account's consent")
    return f"correct the credentials (`conduit mailbox set-credentials {mailbox['email']}`)"


def _constraint_message(exc: asyncpg.PostgresError) -> str:
    constraint = getattr(exc, "constraint_name", None) or ""
    known = {
        "mailbox_owner_user_id_key": "this user already has a mailbox (a user has at most one)",
        "mailbox_owner_queue_id_key": "this queue already has a mailbox (a queue has at most one)",
        "mailbox_email": "a mailbox with this address already exists",
        "crm_user_email": "a user with this address already exists",
        "queue_email": "a queue with this address already exists",
        "email_server_profile_one_default": "the organization already has a default profile",
        # Ranges the schema holds, in the words of the options that set them.
        "email_server_profile_incoming_port_check": "--incoming-port must be between 1 and 65535",
        "email_server_profile_outgoing_port_check": "--outgoing-port must be between 1 and 65535",
        "email_server_profile_max_concurrent_connections_check": "--max-connections must be between 1 and 1000",
        "email_server_profile_min_polling_interval_seconds_check": "--polling-interval must be between 1 and 86400 seconds",
        "email_server_profile_stop_after_refused_logins_check": _REFUSED_LOGINS_RANGE,
        "organization_tracking_token_digits_check": "--token-digits must be between 4 and 12",
        "organization_smart_matching_min_recipients_check": "--smart-matching-min-recipients must be between 1 and 50",
        "organization_name_check": "a name must have 1 to 200 characters",
        "email_server_profile_name_check": "a name must have 1 to 200 characters",
    }
    return known.get(constraint, f"rejected by the database ({constraint or type(exc).__name__})")


def _profile(row: asyncpg.Record) -> models.Profile:
    data = dict(row)
    data["has_profile_secret"] = data.pop("profile_secret") is not None
    data["has_oauth_client_secret"] = data.pop("oauth_client_secret") is not None
    return models.Profile(**data)


def _direction(row: asyncpg.Record, d: str) -> models.DirectionState:
    return models.DirectionState(
        status=row[f"{d}_status"], tested_at=row[f"{d}_tested_at"], test_message=row[f"{d}_test_message"],
        error_count=row[f"{d}_error_count"], backoff_until=row[f"{d}_backoff_until"],
        refused_logins=row[f"{d}_refused_logins"], stopped_at=row[f"{d}_stopped_at"],
    )


def _mailbox(row: asyncpg.Record, alerts: list[dict[str, Any]]) -> models.Mailbox:
    return models.Mailbox(
        id=row["id"], organization_id=row["organization_id"], name=row["name"], email=row["email"],
        owner_kind=row["owner_kind"], owner_id=row["owner_id"], is_forward_mailbox=row["owner_kind"] is None,
        profile_id=row["profile_id"], profile_name=row["profile_name"], username=row["username"],
        has_credentials=row["secret"] is not None, active=row["active"], email_approved=row["email_approved"],
        incoming=_direction(row, "incoming"), outgoing=_direction(row, "outgoing"), act=_direction(row, "act"),
        tracking=row["tracking"], convert_to_activities=row["convert_to_activities"],
        delete_after_processing=row["delete_after_processing"], tracked_folders=list(row["tracked_folders"]),
        alerts=[models.Alert(**{k: a[k] for k in ("severity", "direction", "code", "message", "created_at")}) for a in alerts],
    )


def _activity(row: asyncpg.Record) -> dict[str, Any]:
    data = dict(row)
    return {k: data[k] for k in models.Activity.model_fields if k in data}


def _outbound(row: asyncpg.Record) -> models.OutboundRequest:
    data = dict(row)
    # A rejected request's body may be anything its sender published: keep only addresses.
    to = data["to"]
    data["to"] = [a for a in to if isinstance(a, str)] if isinstance(to, list) else []
    return models.OutboundRequest(**data)




def _require_https(option: str, url: str | None) -> None:
    """A URL that carries credentials (EWS Basic, a Graph token, an OAuth client secret) is https,
    so they never travel in clear; http only on the loopback (a local simulator, a sidecar)."""
    if url is None:
        return
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip())
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname in models.LOOPBACK:
        return
    where = f"{parts.scheme}://{parts.hostname}" if parts.scheme and parts.hostname else "it"
    raise InvalidInput(f"{option} must be an https:// URL ({where} would send credentials in clear); "
                       "http:// is taken only for 127.0.0.1, ::1 or localhost")
