"""What a rule may look at: the message, the mailbox it reached, the batch's lookups, and the
facts derived from them once per message (resolved parties, correlation, direction)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from .correlation import Correlation, CorrelationSettings, correlate
from .lookups import Lookups, Party
from .parsing import Address, ParsedEmail, normalize_email_address

__all__ = [
    "TRACKING_OPTIONS",
    "EvaluationContext",
    "MailboxContext",
    "PartyMatch",
    "ResolvedParties",
    "TrackingOption",
    "resolve_parties",
]

TrackingOption = Literal["all", "responses", "known_records", "email_enabled_records"]
# The reference's labels, used in explanations so an administrator recognises the setting.
TRACKING_OPTIONS: dict[str, str] = {
    "all": "All email messages",
    "responses": "Email messages in response to tracked email",
    "known_records": "Email messages from leads, contacts and accounts",
    "email_enabled_records": "Email messages from records that are email enabled",
}
Direction = Literal["incoming", "outgoing"]


@dataclass(frozen=True, slots=True)
class MailboxContext:
    """The mailbox a message reached, as far as relevance is concerned.

    ``owner_kind`` None is a forward mailbox (it belongs to no user or queue).  ``convert`` is the
    queue setting "convert incoming email to activities"; users always convert.  ``holds_messages``:
    older messages of the mailbox are held (waiting for it), so this one waits behind them.
    """

    mailbox_id: str
    owner_kind: Literal["user", "queue"] | None
    owner_id: str | None
    owner_email: str
    active: bool = True
    has_profile: bool = True
    approved: bool = True
    incoming_enabled: bool = True
    tracking: TrackingOption = "responses"  # the reference's default for new users
    convert: bool = True
    received_after: datetime | None = None
    holds_messages: bool = False

    def __post_init__(self) -> None:
        if self.tracking not in TRACKING_OPTIONS:
            raise ValueError(f"unknown tracking option {self.tracking!r}; known: {tuple(TRACKING_OPTIONS)}")
        if self.owner_kind not in ("user", "queue", None):
            raise ValueError(f"mailbox owner must be a user, a queue or None, not {self.owner_kind!r}")

    @property
    def normalized_email(self) -> str:
        return normalize_email_address(self.owner_email) or self.owner_email.strip().lower()


@dataclass(frozen=True, slots=True)
class PartyMatch:
    """One address of the message and the registry records it resolved to (maybe none)."""

    address: Address
    parties: tuple[Party, ...]

    @property
    def resolved(self) -> bool:
        return bool(self.parties)


@dataclass(frozen=True, slots=True)
class ResolvedParties:
    """Sender and recipients mapped to registry records; unresolved addresses are kept."""

    from_: PartyMatch | None
    to: tuple[PartyMatch, ...]
    cc: tuple[PartyMatch, ...]
    bcc: tuple[PartyMatch, ...]

    @property
    def recipients(self) -> tuple[PartyMatch, ...]:
        return self.to + self.cc + self.bcc

    @property
    def unresolved(self) -> tuple[str, ...]:
        head = (self.from_,) if self.from_ is not None else ()
        return tuple(m.address.email for m in head + self.recipients if not m.parties)


# The reference leaves a sender whose address more records than this share unresolved.
MAX_SENDER_MATCHES = 100


def resolve_parties(parsed: ParsedEmail, lookups: Lookups) -> ResolvedParties:
    """Every record each recipient's address belongs to; the sender, as the reference resolves the
    From field, to one record only: the first of users, contacts, accounts, leads, queues (the order
    ``parties_by_address`` keeps), none when more than ``MAX_SENDER_MATCHES`` share the address."""
    table = lookups.parties_by_address

    def match(address: Address) -> PartyMatch:
        return PartyMatch(address, table.get(address.email, ()))

    def sender(address: Address) -> PartyMatch:
        found = table.get(address.email, ())
        return PartyMatch(address, found[:1] if len(found) <= MAX_SENDER_MATCHES else ())

    return ResolvedParties(
        from_=sender(parsed.from_) if parsed.from_ is not None else None,
        to=tuple(match(a) for a in parsed.to),
        cc=tuple(match(a) for a in parsed.cc),
        bcc=tuple(match(a) for a in parsed.bcc),
    )


@dataclass(frozen=True, slots=True)
class EvaluationContext:
    """Everything the rules of a chain see; derived facts are computed once, here."""

    parsed: ParsedEmail
    mailbox: MailboxContext
    lookups: Lookups
    settings: CorrelationSettings
    parties: ResolvedParties
    correlation: Correlation | None
    direction: Direction
    received_at: datetime | None
    folder_regarding: tuple[str, str] | None

    @classmethod
    def build(
        cls,
        parsed: ParsedEmail,
        mailbox: MailboxContext,
        lookups: Lookups,
        settings: CorrelationSettings,
        *,
        received_at: datetime | None = None,
        folder_regarding: tuple[str, str] | None = None,
    ) -> EvaluationContext:
        own = mailbox.normalized_email
        outgoing = parsed.from_ is not None and parsed.from_.email == own
        return cls(
            parsed=parsed,
            mailbox=mailbox,
            lookups=lookups,
            settings=settings,
            parties=resolve_parties(parsed, lookups),
            correlation=correlate(parsed, lookups, settings, own),
            direction="outgoing" if outgoing else "incoming",
            received_at=received_at if received_at is not None else parsed.date,
            folder_regarding=folder_regarding,
        )

    @property
    def option_label(self) -> str:
        return TRACKING_OPTIONS[self.mailbox.tracking]

    @property
    def counterparties(self) -> tuple[PartyMatch, ...]:
        """Whom relevance is judged on: the sender of incoming mail, the recipients (other than the
        mailbox itself) of mail the mailbox sent."""
        if self.direction == "incoming":
            return (self.parties.from_,) if self.parties.from_ is not None else ()
        own = self.mailbox.normalized_email
        return tuple(m for m in self.parties.recipients if m.address.email != own)
