"""The relevance rules: small classes, each answering one question about a message.

Modelled on GNU Mailman 3's rules: a rule has a ``name``, a ``description`` (shown by
``conduit rules list``) and ``check(ctx)``.  ``check`` returns a ``RuleResult`` when the rule
*decides* (tracked or not, with a stable reason code and one human sentence) and None when it has
nothing to say, so the chain moves on to the next rule.  Which rules run, and in which order, is
data: see ``chains.py``.

Direction.  A message whose From is the mailbox's own address (mail the mailbox sent, seen again
through a Sent folder, a Bcc to self or a forward) is still evaluated, as *outgoing*: the options
that look at "who sent it" judge its recipients instead, because the mailbox owner is trivially a
known, email-enabled record and would otherwise make every such message relevant.

Held.  Some guards refuse only *for now*: an inactive mailbox, one without a profile, one whose
address is not approved, one with incoming disabled is often so for a minute (an administrator's
toggle, a Test & Enable re-run) while a backlog of messages already ingested is evaluated.  Such a
guard (``holds = True``) decides nothing for good: its result is *held*, and the message is evaluated
again, through the whole chain, once the mailbox may process email again (``release.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar

from .context import EvaluationContext, MailboxContext, PartyMatch
from .lookups import KNOWN_RECORD_KINDS

__all__ = [
    "REASONS",
    "AlreadyTracked",
    "BehindHeldMessages",
    "BeingSent",
    "Correlated",
    "FolderTracking",
    "FromEmailEnabledRecord",
    "FromKnownRecord",
    "IncomingDisabled",
    "MailboxGuard",
    "MailboxInactive",
    "MailboxNoProfile",
    "MailboxNotApproved",
    "NoCorrelationMatch",
    "NotFromEmailEnabledRecord",
    "NotFromKnownRecord",
    "QueueConversionOff",
    "ReceivedBeforeCutoff",
    "Rule",
    "RuleResult",
    "TrackAll",
]


@dataclass(frozen=True, slots=True)
class RuleResult:
    """A rule's decision.  ``regarding`` overrides the correlation's record when set; ``held`` says
    the message waits for its mailbox instead of being decided (never tracked then)."""

    tracked: bool
    reason: str
    explanation: str
    regarding: tuple[str, str] | None = None
    held: bool = False


class Rule:
    """Base of every rule; subclasses set ``name``, ``description``, ``reasons`` and ``check``."""

    name: ClassVar[str]
    description: ClassVar[str]
    reasons: ClassVar[tuple[str, ...]] = ()

    def check(self, ctx: EvaluationContext) -> RuleResult | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<rule {self.name}>"


def _not_tracked(reason: str, explanation: str) -> RuleResult:
    return RuleResult(False, reason, explanation)


# --------------------------------------------------------------------------------------------
# Guards: the mailbox may not process email at all.  First in every chain.


class MailboxGuard(Rule):
    """A guard decides "not tracked" when the mailbox fails ``allows``; its reason code is its name.
    A guard that ``holds`` refuses only for now: the message is held, not decided."""

    explanation: ClassVar[str]
    holds: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.reasons = (cls.name,)

    @staticmethod
    def allows(mailbox: MailboxContext) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, ctx: EvaluationContext) -> RuleResult | None:
        if self.allows(ctx.mailbox):
            return None
        return RuleResult(False, self.name, self.explanation, held=self.holds)


_UNTIL_IT_MAY = "it will be evaluated when the mailbox may process email again."


class MailboxInactive(MailboxGuard):
    name = "mailbox_inactive"
    description = ("An inactive mailbox (or one whose owner is inactive) processes no email (the reference's rule); "
                   "its messages are held until it is active again.")
    explanation = f"Held: the mailbox is inactive; {_UNTIL_IT_MAY}"
    holds = True
    allows = staticmethod(lambda mailbox: mailbox.active)


class MailboxNoProfile(MailboxGuard):
    name = "mailbox_no_profile"
    description = ("A mailbox without an email server profile processes no email (the reference's rule); "
                   "its messages are held until it has one.")
    explanation = f"Held: the mailbox has no email server profile; {_UNTIL_IT_MAY}"
    holds = True
    allows = staticmethod(lambda mailbox: mailbox.has_profile)


class MailboxNotApproved(MailboxGuard):
    name = "mailbox_not_approved"
    description = ("The mailbox's email address must be approved before its email is processed; "
                   "its messages are held until it is.")
    explanation = f"Held: the mailbox's email address has not been approved yet; {_UNTIL_IT_MAY}"
    holds = True
    allows = staticmethod(lambda mailbox: mailbox.approved)


class IncomingDisabled(MailboxGuard):
    name = "incoming_disabled"
    description = ("Incoming email is processed only when the mailbox's incoming delivery method is enabled; "
                   "its messages are held until it is again.")
    explanation = f"Held: incoming email synchronization is disabled for this mailbox; {_UNTIL_IT_MAY}"
    holds = True
    allows = staticmethod(lambda mailbox: mailbox.incoming_enabled)


class BehindHeldMessages(MailboxGuard):
    name = "behind_held_messages"
    description = ("While a mailbox has held messages, its newer email waits behind them: a mailbox's email is "
                   "decided in the order it was received, so a reply is never evaluated before the message it answers.")
    explanation = ("Held: older messages of this mailbox are held and are evaluated first; "
                   "it will be evaluated right after them.")
    holds = True
    allows = staticmethod(lambda mailbox: not mailbox.holds_messages)


class QueueConversionOff(MailboxGuard):
    # A deliberate setting, not a passing state: decided for good, not held.
    name = "queue_conversion_off"
    description = "A queue mailbox whose 'convert incoming email to activities' setting is off tracks nothing."
    explanation = "Not tracked: the queue does not convert incoming email to activities."
    allows = staticmethod(lambda mailbox: mailbox.owner_kind != "queue" or mailbox.convert)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class ReceivedBeforeCutoff(Rule):
    name = "received_before_cutoff"
    description = (
        "Email received before the mailbox's 'process email received after' date is skipped. The receive "
        "time is the one the mail server reported, else the Date header; a message with neither is not skipped."
    )
    reasons = ("received_before_cutoff",)

    def check(self, ctx: EvaluationContext) -> RuleResult | None:
        cutoff = ctx.mailbox.received_after
        if cutoff is None or ctx.received_at is None:
            return None
        received, cutoff = _aware(ctx.received_at), _aware(cutoff)
        if received >= cutoff:
            return None
        return _not_tracked(
            "received_before_cutoff",
            f"Not tracked: it was received at {received.isoformat()}, before the mailbox processes email "
            f"(received after {cutoff.isoformat()}).",
        )


# --------------------------------------------------------------------------------------------
# Before the option: facts that decide whatever the option says.


class BeingSent(Rule):
    name = "being_sent"
    description = (
        "A copy of an email Conduit is sending (delivered to a tracked mailbox of the organization, or "
        "seen in the sender's Sent folder) before dispatch has recorded the send is held until it has: "
        "then it is linked to the send's outgoing activity, as one activity per message, not tracked "
        "on its own as incoming mail."
    )
    reasons = ("being_sent",)

    def check(self, ctx: EvaluationContext) -> RuleResult | None:
        message_id = ctx.parsed.message_id
        key = ctx.lookups.being_sent.get(message_id) if message_id is not None else None
        if key is None:
            return None
        return RuleResult(False, "being_sent",
                          f"Held: Conduit is sending this message (request {key}) and has not recorded it as sent "
                          "yet; it will be evaluated once the send is recorded.", held=True)


class AlreadyTracked(Rule):
    name = "already_tracked"
    description = (
        "A message whose Message-ID is already an email activity (it reached another tracked mailbox, or "
        "arrived twice) is linked to that activity: one activity per message, never a second one."
    )
    reasons = ("already_tracked",)

    def check(self, ctx: EvaluationContext) -> RuleResult | None:
        message_id = ctx.parsed.message_id
        if message_id is None:
            return None
        ref = ctx.lookups.tracked_by_message_id.get(message_id)
        if ref is None:
            return None
        return RuleResult(
            True,
            "already_tracked",
            f"Tracked: this message (Message-ID <{message_id}>) is already the email activity {ref.activity_id}.",
            ref.regarding,
        )


class FolderTracking(Rule):
    name = "folder_tracking"
    description = (
        "A message in a mailbox folder mapped to a record by a folder-level tracking rule is tracked "
        "regarding that record, whatever the tracking option."
    )
    reasons = ("tracked_folder_rule",)

    def check(self, ctx: EvaluationContext) -> RuleResult | None:
        if ctx.folder_regarding is None:
            return None
        kind, record_id = ctx.folder_regarding
        return RuleResult(
            True,
            "tracked_folder_rule",
            f"Tracked: the message is in a folder that a folder-level tracking rule maps to {kind} {record_id}.",
            ctx.folder_regarding,
        )


# --------------------------------------------------------------------------------------------
# The tracking options


class TrackAll(Rule):
    name = "track_all"
    description = "Option 'all email': every message is tracked."
    reasons = ("tracked_all",)

    def check(self, ctx: EvaluationContext) -> RuleResult | None:
        return RuleResult(True, "tracked_all", f'Tracked: the mailbox tracks "{ctx.option_label}".')


_HOW = {
    "in_reply_to": "replies (In-Reply-To) to",
    "references": "belongs to the thread (References) of",
    "tracking_token": "carries the tracking token of",
    "thread_index": "belongs to the Outlook conversation (Thread-Index) of",
    "smart_matching": "matches by subject and participants (smart matching)",
}


class Correlated(Rule):
    name = "correlated"
    description = (
        "A response to an already tracked email is tracked, found by the organization's correlation methods "
        "in its order (In-Reply-To/References, tracking token, conversation index, smart matching)."
    )
    reasons = tuple(f"correlated_{m}" for m in _HOW)

    def check(self, ctx: EvaluationContext) -> RuleResult | None:
        found = ctx.correlation
        if found is None:
            return None
        return RuleResult(
            True,
            f"correlated_{found.method}",
            f'Tracked: the mailbox tracks "{ctx.option_label}" and this email {_HOW[found.method]} '
            f"the tracked email activity {found.ref.activity_id}.",
        )


class NoCorrelationMatch(Rule):
    name = "no_correlation_match"
    description = "Option 'responses': a message that correlates to no tracked email is not tracked."
    reasons = ("no_correlation_match",)

    def check(self, ctx: EvaluationContext) -> RuleResult | None:
        methods = [m for m in ctx.settings.order if ctx.settings.uses(m)]
        tried = ", ".join(methods) if methods else "no method (all correlation is off)"
        return _not_tracked(
            "no_correlation_match",
            f'Not tracked: the mailbox tracks "{ctx.option_label}" and no tracked email matched it (tried {tried}).',
        )


def _who(ctx: EvaluationContext) -> str:
    return "the sender" if ctx.direction == "incoming" else "a recipient"


def _first_party(ctx: EvaluationContext, wanted) -> tuple[PartyMatch, object] | None:
    for match in ctx.counterparties:
        for party in match.parties:
            if wanted(party):
                return match, party
    return None


class FromKnownRecord(Rule):
    name = "from_known_record"
    description = (
        "Option 'known records': tracked when the sender (for mail the mailbox sent: a recipient) resolves "
        "to a lead, contact or account. As in the reference, another user or queue of the organization is "
        "not a known record: email between colleagues is tracked only as a response to tracked email."
    )
    reasons = ("sender_known_record", "recipient_known_record")

    def check(self, ctx: EvaluationContext) -> RuleResult | None:
        found = _first_party(ctx, lambda p: p.kind in KNOWN_RECORD_KINDS)
        if found is None:
            return None
        match, party = found
        role = "sender" if ctx.direction == "incoming" else "recipient"
        return RuleResult(
            True,
            f"{role}_known_record",
            f'Tracked: the mailbox tracks "{ctx.option_label}" and {_who(ctx)} {match.address.email} '
            f"is the {party.kind} {party.id}.",
        )


class FromEmailEnabledRecord(Rule):
    name = "from_email_enabled_record"
    description = (
        "Option 'email enabled records': tracked when the sender (for mail the mailbox sent: a recipient) "
        "resolves to any record enabled for email: user, queue, contact, account or lead. Email from another "
        "user or queue of the organization is therefore tracked under this option."
    )
    reasons = ("sender_email_enabled", "recipient_email_enabled")

    def check(self, ctx: EvaluationContext) -> RuleResult | None:
        found = _first_party(ctx, lambda p: p.email_enabled)
        if found is None:
            return None
        match, party = found
        role = "sender" if ctx.direction == "incoming" else "recipient"
        return RuleResult(
            True,
            f"{role}_email_enabled",
            f'Tracked: the mailbox tracks "{ctx.option_label}" and {_who(ctx)} {match.address.email} '
            f"is the email-enabled {party.kind} {party.id}.",
        )


def _unmatched(ctx: EvaluationContext, qualifier: str, reason_suffix: str) -> RuleResult:
    """The terminal 'no' of the options that look at who the counterparty is."""
    label = ctx.option_label
    if ctx.direction == "incoming":
        sender = ctx.parties.from_
        if sender is None:
            return _not_tracked(
                "sender_missing", f'Not tracked: the mailbox tracks "{label}" and the email has no valid From address.'
            )
        if not sender.parties:
            return _not_tracked(
                "sender_unknown",
                f'Not tracked: the mailbox tracks "{label}" and the sender {sender.address.email} matches no record.',
            )
        kinds = ", ".join(sorted({p.kind for p in sender.parties}))
        return _not_tracked(
            f"sender_{reason_suffix}",
            f'Not tracked: the mailbox tracks "{label}" and the sender {sender.address.email} resolves only to '
            f"{kinds}, not to {qualifier}.",
        )
    others = ctx.counterparties
    if not any(m.parties for m in others):
        return _not_tracked(
            "recipients_unknown",
            f'Not tracked: the mailbox tracks "{label}", the mailbox sent this email and none of its recipients '
            "matches a record.",
        )
    return _not_tracked(
        f"recipients_{reason_suffix}",
        f'Not tracked: the mailbox tracks "{label}", the mailbox sent this email and none of its recipients is '
        f"{qualifier}.",
    )


class NotFromKnownRecord(Rule):
    name = "not_from_known_record"
    description = "Option 'known records': anything else is not tracked (reason names what the sender was)."
    reasons = ("sender_missing", "sender_unknown", "sender_not_known_record", "recipients_unknown",
               "recipients_not_known_record")

    def check(self, ctx: EvaluationContext) -> RuleResult | None:
        return _unmatched(ctx, "a lead, contact or account", "not_known_record")


class NotFromEmailEnabledRecord(Rule):
    name = "not_from_email_enabled_record"
    description = "Option 'email enabled records': anything else is not tracked (reason names what the sender was)."
    reasons = ("sender_missing", "sender_unknown", "sender_not_email_enabled", "recipients_unknown",
               "recipients_not_email_enabled")

    def check(self, ctx: EvaluationContext) -> RuleResult | None:
        return _unmatched(ctx, "a record enabled for email", "not_email_enabled")


_ALL_RULES: tuple[type[Rule], ...] = (
    MailboxInactive, MailboxNoProfile, MailboxNotApproved, IncomingDisabled, BehindHeldMessages, QueueConversionOff,
    ReceivedBeforeCutoff, BeingSent, AlreadyTracked, FolderTracking, TrackAll, Correlated, NoCorrelationMatch,
    FromKnownRecord, NotFromKnownRecord, FromEmailEnabledRecord, NotFromEmailEnabledRecord,
)
# Every reason code a Decision can carry, for docs, metrics labels and tests.
REASONS: tuple[str, ...] = tuple(dict.fromkeys(r for rule in _ALL_RULES for r in rule.reasons)) + ("no_rule_decided",)
