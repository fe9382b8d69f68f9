"""Correlation: link a message to an email already tracked, so a reply lands on the same thread
and regards the same record.

The methods, in the reference's documented default order (configurable per organization):

1. ``in_reply_to``: the In-Reply-To id, then the References ids newest first, against the
   Message-IDs of tracked email (incoming and outgoing).  Reported as ``in_reply_to`` or
   ``references``.
2. ``tracking_token``: a token such as ``CRM:0001234`` that outgoing mail carries in its subject.
3. ``thread_index``: Outlook's conversation index; its first 22 bytes name the conversation.
4. ``smart_matching``: normalised subject equal and at least N shared participants.  Off by
   default, as the reference recommends: it links unrelated mail that happens to share a subject.

Pure functions over the batch's in-memory ``Lookups``; no I/O.
"""
from __future__ import annotations

from shared import tracking

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .lookups import Lookups, TrackedRef
    from .parsing import ParsedEmail

__all__ = [
    "CORRELATION_METHODS",
    "Correlation",
    "CorrelationSettings",
    "correlate",
    "find_tracking_token",
    "make_tracking_token",
    "normalize_subject",
]

CORRELATION_METHODS = ("in_reply_to", "tracking_token", "thread_index", "smart_matching")


@dataclass(frozen=True, slots=True)
class CorrelationSettings:
    """An organization's correlation settings (the reference's System Settings > Email)."""

    order: tuple[str, ...] = CORRELATION_METHODS
    tracking_token_enabled: bool = True
    tracking_token_prefix: str = "CRM:"
    tracking_token_digits: int = 7
    smart_matching: bool = False
    smart_matching_min_shared_recipients: int = 1

    def __post_init__(self) -> None:
        unknown = [m for m in self.order if m not in CORRELATION_METHODS]
        if unknown:
            raise ValueError(f"unknown correlation method(s) {unknown}; known: {CORRELATION_METHODS}")
        if len(set(self.order)) != len(self.order):
            raise ValueError("correlation order names a method twice")
        if not 1 <= self.tracking_token_digits <= 20:
            raise ValueError("tracking_token_digits must be between 1 and 20")
        if self.smart_matching_min_shared_recipients < 1:
            raise ValueError("smart_matching_min_shared_recipients must be at least 1")

    def uses(self, method: str) -> bool:
        """Whether ``method`` takes part in correlation under these settings."""
        if method not in self.order:
            return False
        if method == "tracking_token":
            return self.tracking_token_enabled and bool(self.tracking_token_prefix)
        if method == "smart_matching":
            return self.smart_matching
        return True


@dataclass(frozen=True, slots=True)
class Correlation:
    """How a message was linked to a tracked email: ``method`` is one of ``in_reply_to``,
    ``references``, ``tracking_token``, ``thread_index``, ``smart_matching``."""

    method: str
    ref: TrackedRef


# --------------------------------------------------------------------------------------------
# Tracking token


def make_tracking_token(number: int, settings: CorrelationSettings) -> str:
    """The token an outgoing email carries in its subject, e.g. ``CRM:0001234`` (shared with dispatch)."""
    return tracking.make_tracking_token(number, settings.tracking_token_prefix, settings.tracking_token_digits)


# The longest number a token made by dispatch can carry: ``tracking_token_digits`` is at most 20 and
# the sequence is a bigint (19 digits).  The pattern takes any run of digits, Unicode ones too, and
# the token is stored in an indexed column: thousands of digits would not fit a btree entry.
MAX_TRACKING_NUMBER_DIGITS = 20


def find_tracking_token(subject: str, settings: CorrelationSettings) -> str | None:
    """The tracking token in ``subject`` in canonical form (the configured prefix), or None."""
    if not settings.tracking_token_enabled:
        return None
    token = tracking.find_tracking_token(subject, settings.tracking_token_prefix, settings.tracking_token_digits)
    if token is not None and len(token) - len(settings.tracking_token_prefix) > MAX_TRACKING_NUMBER_DIGITS:
        return None  # no token dispatch made
    return token


# --------------------------------------------------------------------------------------------
# Subject normalisation (smart matching key)

def normalize_subject(subject: str, settings: CorrelationSettings | None = None) -> str:
    """Smart matching's key (``shared.tracking.normalize_subject``) with the organization's token form."""
    if settings is not None and settings.tracking_token_prefix:
        return tracking.normalize_subject(subject, settings.tracking_token_prefix, settings.tracking_token_digits)
    return tracking.normalize_subject(subject)


# --------------------------------------------------------------------------------------------
# Correlate


def correlate(parsed: ParsedEmail, lookups: Lookups, settings: CorrelationSettings,
              own_address: str | None = None) -> Correlation | None:
    """The first match of the configured methods, in the configured order, or None.
    ``own_address``: the receiving mailbox's, which smart matching does not count as shared."""
    for method in settings.order:
        if not settings.uses(method):
            continue
        if method == "in_reply_to":
            found = _by_message_ids(parsed, lookups)
        elif method == "tracking_token":
            found = _by_tracking_token(parsed, lookups, settings)
        elif method == "thread_index":
            found = _by_thread_root(parsed, lookups)
        else:
            found = _by_smart_matching(parsed, lookups, settings, own_address)
        if found is not None:
            return found
    return None


def _by_message_ids(parsed: ParsedEmail, lookups: Lookups) -> Correlation | None:
    tracked = lookups.tracked_by_message_id
    if not tracked:
        return None
    for message_id in parsed.in_reply_to:
        ref = tracked.get(message_id)
        if ref is not None:
            return Correlation("in_reply_to", ref)
    for message_id in reversed(parsed.references):  # the last reference is the direct parent
        ref = tracked.get(message_id)
        if ref is not None:
            return Correlation("references", ref)
    return None


def _by_tracking_token(parsed: ParsedEmail, lookups: Lookups, settings: CorrelationSettings) -> Correlation | None:
    if not lookups.tracked_by_token:
        return None
    token = find_tracking_token(parsed.subject, settings)
    if token is None:
        return None
    ref = lookups.tracked_by_token.get(token)
    return Correlation("tracking_token", ref) if ref is not None else None


def _by_thread_root(parsed: ParsedEmail, lookups: Lookups) -> Correlation | None:
    if parsed.thread_root is None:
        return None
    ref = lookups.tracked_by_thread_root.get(parsed.thread_root)
    return Correlation("thread_index", ref) if ref is not None else None


def _by_smart_matching(parsed: ParsedEmail, lookups: Lookups, settings: CorrelationSettings,
                       own_address: str | None = None) -> Correlation | None:
    if not lookups.tracked_by_subject:
        return None
    subject = normalize_subject(parsed.subject, settings)
    if not subject:
        return None  # every blank-subject message would "match": never correlate on nothing
    candidates = lookups.tracked_by_subject.get(subject)
    if not candidates:
        return None
    # The mailbox that received both is no evidence that they are one conversation: every customer's
    # "Invoice" to the support queue shares the queue's address.
    participants = parsed.participants - {own_address}
    needed = settings.smart_matching_min_shared_recipients
    for ref in candidates:  # newest first, by the Lookups contract
        if len(ref.participants & participants) >= needed:
            return Correlation("smart_matching", ref)
    return None
