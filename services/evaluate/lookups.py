"""The in-memory slice of the registry that the rules of one batch consult.

Evaluate works a batch at a time: parse every message, ask ``keys_for`` for every key the batch
needs, run one bulk query per key kind (the lead's repository does that), fill ``Lookups`` and then
evaluate each message synchronously against it.  No rule ever touches the database.

Contract for the fillers:
- addresses are normalised with ``parsing.normalize_email_address`` (lower-case, IDNA domain);
- ``tracked_by_subject`` candidates are ordered newest first;
- when a message of the batch is tracked, ``add_tracked_email`` (or ``add_tracked``) records it so a
  later message of the same batch correlates to it, and a second copy of it (another mailbox)
  becomes ``already_tracked`` instead of a second activity.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from .correlation import CorrelationSettings, find_tracking_token, normalize_subject
from .parsing import ParsedEmail

__all__ = ["LookupKeys", "Lookups", "Party", "PartyKind", "TrackedRef", "keys_for"]

PartyKind = Literal["user", "queue", "contact", "account", "lead"]
KNOWN_RECORD_KINDS: frozenset[str] = frozenset({"contact", "account", "lead"})


@dataclass(frozen=True, slots=True)
class Party:
    """A registry record an address resolves to.  ``email_enabled`` is the reference's "records
    enabled for email" notion (the record's entity may receive and send email)."""

    kind: PartyKind
    id: str
    email: str
    email_enabled: bool = True


@dataclass(frozen=True, slots=True)
class TrackedRef:
    """An email already tracked as an activity, and the record it regards."""

    activity_id: str
    regarding_kind: str | None
    regarding_id: str | None
    subject: str = ""
    participants: frozenset[str] = frozenset()

    @property
    def regarding(self) -> tuple[str, str] | None:
        if self.regarding_kind is None or self.regarding_id is None:
            return None
        return (self.regarding_kind, self.regarding_id)


@dataclass(frozen=True)
class LookupKeys:
    """Every key a batch needs, one set per bulk query."""

    addresses: frozenset[str]
    message_ids: frozenset[str]
    tracking_tokens: frozenset[str]
    thread_roots: frozenset[str]
    normalized_subjects: frozenset[str]
    # The batch's own Message-IDs (not those it answers): the ones a send of Conduit's may still be
    # recording (``Lookups.being_sent``).
    own_message_ids: frozenset[str] = frozenset()


def keys_for(parsed: Iterable[ParsedEmail], settings: CorrelationSettings) -> LookupKeys:
    """Collect the lookup keys of a batch.  ``message_ids`` includes each message's own id so that
    a message tracked earlier (through another mailbox) is found as already tracked."""
    addresses: set[str] = set()
    message_ids: set[str] = set()
    own: set[str] = set()
    tokens: set[str] = set()
    roots: set[str] = set()
    subjects: set[str] = set()
    use_ids = settings.uses("in_reply_to")
    use_tokens = settings.uses("tracking_token")
    use_roots = settings.uses("thread_index")
    use_subjects = settings.uses("smart_matching")
    for email in parsed:
        addresses.update(a.email for a in email.all_addresses)
        if email.message_id is not None:
            own.add(email.message_id)
        if use_ids:
            message_ids.update(email.in_reply_to)
            message_ids.update(email.references)
        if use_tokens:
            token = find_tracking_token(email.subject, settings)
            if token is not None:
                tokens.add(token)
        if use_roots and email.thread_root is not None:
            roots.add(email.thread_root)
        if use_subjects:
            subject = normalize_subject(email.subject, settings)
            if subject:
                subjects.add(subject)
    return LookupKeys(
        addresses=frozenset(addresses),
        message_ids=frozenset(message_ids | own),
        tracking_tokens=frozenset(tokens),
        thread_roots=frozenset(roots),
        normalized_subjects=frozenset(subjects),
        own_message_ids=frozenset(own),
    )


@dataclass
class Lookups:
    """What the registry says about a batch's keys.  Missing key = not found."""

    parties_by_address: dict[str, tuple[Party, ...]] = field(default_factory=dict)
    tracked_by_message_id: dict[str, TrackedRef] = field(default_factory=dict)
    tracked_by_token: dict[str, TrackedRef] = field(default_factory=dict)
    tracked_by_thread_root: dict[str, TrackedRef] = field(default_factory=dict)
    tracked_by_subject: dict[str, tuple[TrackedRef, ...]] = field(default_factory=dict)
    # Message-IDs of sends of Conduit's under way (on their way to the server, or accepted and not yet
    # recorded as sent), each with its request's idempotency key: a copy delivered to a tracked
    # mailbox waits for the send's outgoing activity (``rules.BeingSent``).
    being_sent: dict[str, str] = field(default_factory=dict)

    def parties(self, email: str) -> tuple[Party, ...]:
        return self.parties_by_address.get(email, ())

    def add_tracked(
        self,
        message_id: str | None,
        ref: TrackedRef,
        *,
        tracking_token: str | None = None,
        thread_root: str | None = None,
        normalized_subject: str | None = None,
    ) -> None:
        """Record an email tracked during this batch; it becomes the newest candidate everywhere."""
        if message_id:
            self.tracked_by_message_id[message_id] = ref
        if tracking_token:
            self.tracked_by_token.setdefault(tracking_token, ref)  # a token names one activity
        if thread_root:
            self.tracked_by_thread_root[thread_root] = ref
        if normalized_subject:
            self.tracked_by_subject[normalized_subject] = (ref,) + self.tracked_by_subject.get(
                normalized_subject, ()
            )

    def add_tracked_email(self, parsed: ParsedEmail, ref: TrackedRef, settings: CorrelationSettings) -> None:
        """``add_tracked`` with every key derived from the parsed message."""
        self.add_tracked(
            parsed.message_id,
            ref,
            tracking_token=find_tracking_token(parsed.subject, settings),
            thread_root=parsed.thread_root,
            normalized_subject=normalize_subject(parsed.subject, settings) if settings.smart_matching else None,
        )
