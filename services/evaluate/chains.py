"""The rule chains: which rules run, in which order, for each tracking option.

Chains are data, as in GNU Mailman 3's ``chains/builtin.py``: a tuple of rule instances tried in
order until one decides.  Every chain starts with the same guards (may this mailbox process email at
all?), then the facts that decide whatever the option (a copy of an email Conduit is still recording
as sent waits for it; a folder-level tracking rule, which also sets the regarding record of a message
that already is an activity, as the reference does; already tracked),
then the option's own rules, and ends with a rule that always decides, so every message gets a
reason.  The guards that refuse only for now (``PAUSED_MAILBOX``), the one that keeps a mailbox's
order behind its held messages (``rules.MailboxGuard.holds``) and ``rules.BeingSent`` hold a message
instead of deciding it.

The options follow the reference: a response to tracked email is tracked under every option
(the correlation rule comes first in each option's rules); "known records" adds email from leads,
contacts and accounts; "email enabled records" adds email from any record enabled for email.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import rules
from .context import TRACKING_OPTIONS, MailboxContext

__all__ = ["CHAINS", "GUARDS", "OPTION_RULES", "PAUSED_MAILBOX", "PRELUDE", "Chain", "chain_for", "list_rules", "may_process"]


@dataclass(frozen=True, slots=True)
class Chain:
    name: str
    description: str
    rules: tuple[rules.Rule, ...]


# The mailbox may not process email for now: what a held message waits for.
PAUSED_MAILBOX: tuple[rules.MailboxGuard, ...] = (
    rules.MailboxInactive(),
    rules.MailboxNoProfile(),
    rules.MailboxNotApproved(),
    rules.IncomingDisabled(),
)
GUARDS: tuple[rules.Rule, ...] = PAUSED_MAILBOX + (
    rules.BehindHeldMessages(),
    rules.QueueConversionOff(),
    rules.ReceivedBeforeCutoff(),
)
PRELUDE: tuple[rules.Rule, ...] = (rules.BeingSent(), rules.FolderTracking(), rules.AlreadyTracked())

CHAINS: dict[str, Chain] = {
    "all": Chain("all", TRACKING_OPTIONS["all"], GUARDS + PRELUDE + (rules.TrackAll(),)),
    "responses": Chain(
        "responses",
        TRACKING_OPTIONS["responses"],
        GUARDS + PRELUDE + (rules.Correlated(), rules.NoCorrelationMatch()),
    ),
    "known_records": Chain(
        "known_records",
        TRACKING_OPTIONS["known_records"],
        GUARDS + PRELUDE + (rules.Correlated(), rules.FromKnownRecord(), rules.NotFromKnownRecord()),
    ),
    "email_enabled_records": Chain(
        "email_enabled_records",
        TRACKING_OPTIONS["email_enabled_records"],
        GUARDS + PRELUDE + (rules.Correlated(), rules.FromEmailEnabledRecord(), rules.NotFromEmailEnabledRecord()),
    ),
}


# The rules of the tracking options themselves (after the guards and the prelude): what they decide
# "not tracked" becomes *already tracked* once the message is an activity all the same (another
# replica's batch made it one at the same moment: ``repository.link_to_activities``).
OPTION_RULES: frozenset[str] = frozenset(
    rule.name for chain in CHAINS.values() for rule in chain.rules[len(GUARDS) + len(PRELUDE):])


def chain_for(mailbox: MailboxContext) -> Chain:
    """The chain of the mailbox's tracking option (a queue's 'convert' option uses the same chains)."""
    return CHAINS[mailbox.tracking]


def may_process(mailbox: MailboxContext) -> bool:
    """Whether the mailbox may process email now, so that its held messages can be evaluated again."""
    return all(guard.allows(mailbox) for guard in PAUSED_MAILBOX)


def list_rules() -> list[tuple[str, str]]:
    """(name, description) of every rule used by any chain, in first-use order: ``conduit rules list``."""
    seen: dict[str, str] = {}
    for chain in CHAINS.values():
        for rule in chain.rules:
            seen.setdefault(rule.name, rule.description)
    return list(seen.items())
