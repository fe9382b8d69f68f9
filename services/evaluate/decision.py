"""Decide whether a message becomes an email activity, and say why.

``evaluate`` runs the mailbox's chain over one message; ``evaluate_batch`` runs a whole batch in
order, recording each newly tracked message in the batch's ``Lookups`` so that a later reply in the
same batch correlates to it and a second copy of it (another mailbox of the organization) is linked
to the same activity instead of creating a second one.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from .chains import chain_for
from .context import EvaluationContext, MailboxContext, ResolvedParties
from .correlation import Correlation, CorrelationSettings
from .lookups import Lookups, TrackedRef
from .parsing import ParsedEmail

__all__ = ["BatchItem", "Decision", "evaluate", "evaluate_batch"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to "why was this email (not) tracked?".

    ``activity_id`` is the existing activity when the message already is one (``existing_activity``:
    ``already_tracked``, or a folder rule that sets the regarding record of an activity there is);
    ``evaluate_batch`` also sets it to the new activity's id for every other tracked message.  A
    ``held`` decision is no decision yet: the mailbox may not process email for now, and the message
    is evaluated again once it may.
    """

    tracked: bool
    rule: str
    reason: str
    explanation: str
    correlation: Correlation | None
    regarding: tuple[str, str] | None
    parties: ResolvedParties
    direction: Literal["incoming", "outgoing"]
    chain: str
    activity_id: str | None = None
    held: bool = False
    existing_activity: bool = False

    @property
    def creates_activity(self) -> bool:
        return self.tracked and not self.existing_activity


def evaluate(
    parsed: ParsedEmail,
    mailbox: MailboxContext,
    lookups: Lookups,
    settings: CorrelationSettings,
    *,
    received_at: datetime | None = None,
    folder_regarding: tuple[str, str] | None = None,
) -> Decision:
    """Run the mailbox's chain over one message.

    ``received_at`` is the server's receive time (IMAP INTERNALDATE), else the Date header is used;
    ``folder_regarding`` is the record a folder-level tracking rule maps the message's folder to.
    """
    ctx = EvaluationContext.build(
        parsed, mailbox, lookups, settings, received_at=received_at, folder_regarding=folder_regarding
    )
    chain = chain_for(mailbox)
    for rule in chain.rules:
        result = rule.check(ctx)
        if result is None:
            continue
        regarding = result.regarding
        if regarding is None and result.tracked and ctx.correlation is not None:
            regarding = ctx.correlation.ref.regarding
        existing = None
        if result.tracked and parsed.message_id is not None and (
                ref := lookups.tracked_by_message_id.get(parsed.message_id)) is not None:
            existing = ref.activity_id   # one activity per message: a folder rule re-files it
        return Decision(
            tracked=result.tracked,
            rule=rule.name,
            reason=result.reason,
            explanation=result.explanation,
            correlation=ctx.correlation,
            regarding=regarding,
            parties=ctx.parties,
            direction=ctx.direction,
            chain=chain.name,
            activity_id=existing,
            held=result.held,
            existing_activity=existing is not None,
        )
    # Unreachable with the built-in chains (each ends with a deciding rule); kept for custom chains.
    return Decision(
        tracked=False,
        rule="",
        reason="no_rule_decided",
        explanation=f'Not tracked: no rule of the "{chain.name}" chain decided.',
        correlation=ctx.correlation,
        regarding=None,
        parties=ctx.parties,
        direction=ctx.direction,
        chain=chain.name,
    )


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One message of a batch as it reached one mailbox."""

    parsed: ParsedEmail
    mailbox: MailboxContext
    received_at: datetime | None = None
    folder_regarding: tuple[str, str] | None = None


def evaluate_batch(
    items: Iterable[BatchItem],
    lookups: Lookups,
    settings: CorrelationSettings,
    new_activity_id: Callable[[ParsedEmail], str],
) -> list[Decision]:
    """Evaluate a batch in order (per-mailbox order is the topic's order).

    ``new_activity_id`` gives the id of the activity a newly tracked message will become (the lead
    pre-allocates UUIDs); it is recorded in ``lookups`` at once so later messages see it.
    """
    decisions = []
    for item in items:
        decision = evaluate(
            item.parsed,
            item.mailbox,
            lookups,
            settings,
            received_at=item.received_at,
            folder_regarding=item.folder_regarding,
        )
        if decision.creates_activity:
            parsed = item.parsed
            activity_id = new_activity_id(parsed)
            regarding_kind, regarding_id = decision.regarding or (None, None)
            ref = TrackedRef(activity_id, regarding_kind, regarding_id, parsed.subject, parsed.participants)
            lookups.add_tracked_email(parsed, ref, settings)
            decision = replace(decision, activity_id=activity_id)
        decisions.append(decision)
    return decisions
