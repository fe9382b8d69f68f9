"""Every guard, every tracking option's tracked and not-tracked paths, and batch behaviour."""
from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from services.evaluate.chains import CHAINS, GUARDS, chain_for, list_rules, may_process
from services.evaluate.context import MailboxContext
from services.evaluate.correlation import CorrelationSettings
from services.evaluate.decision import BatchItem, evaluate, evaluate_batch
from services.evaluate.lookups import Lookups, Party, TrackedRef
from services.evaluate.parsing import parse_email
from services.evaluate.rules import REASONS

OWNER = "owner@conduit.example"
SETTINGS = CorrelationSettings()


def message(
    *,
    sender: str = "Carla Contact <carla@customer.example>",
    to: str = OWNER,
    subject: str = "Quote",
    message_id: str = "<m1@customer.example>",
    extra: str = "",
    date: str = "Mon, 06 Jan 2025 10:00:00 +0000",
) -> bytes:
    head = f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {date}\r\nMessage-ID: {message_id}\r\n{extra}"
    return (head + "\r\nHello.\r\n").encode()


def mailbox(**changes) -> MailboxContext:
    base = MailboxContext("mbx-1", "user", "user-1", OWNER, tracking="all")
    return replace(base, **changes)


CONTACT = Party("contact", "c-1", "carla@customer.example")
COLLEAGUE = Party("user", "u-2", "colin@conduit.example")
OWNER_PARTY = Party("user", "user-1", OWNER)
DISABLED_CONTACT = Party("contact", "c-2", "dora@customer.example", email_enabled=False)
TRACKED = TrackedRef("act-1", "opportunity", "opp-1", "Quote", frozenset({OWNER, "carla@customer.example"}))


def lookups(**changes) -> Lookups:
    base = Lookups(
        parties_by_address={
            CONTACT.email: (CONTACT,),
            COLLEAGUE.email: (COLLEAGUE,),
            OWNER: (OWNER_PARTY,),
            DISABLED_CONTACT.email: (DISABLED_CONTACT,),
        }
    )
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def decide(raw: bytes, box: MailboxContext | None = None, found: Lookups | None = None, **kwargs):
    return evaluate(parse_email(raw), box or mailbox(), found or lookups(), SETTINGS, **kwargs)


# ---------------------------------------------------------------------------------------------
# Guards


@pytest.mark.parametrize(
    ("change", "reason", "held"),
    [
        ({"active": False}, "mailbox_inactive", True),
        ({"has_profile": False}, "mailbox_no_profile", True),
        ({"approved": False}, "mailbox_not_approved", True),
        ({"incoming_enabled": False}, "incoming_disabled", True),
        ({"holds_messages": True}, "behind_held_messages", True),
        ({"owner_kind": "queue", "convert": False}, "queue_conversion_off", False),
        ({"received_after": datetime(2025, 2, 1, tzinfo=UTC)}, "received_before_cutoff", False),
    ],
)
@pytest.mark.parametrize("option", ["all", "responses", "known_records", "email_enabled_records"])
def test_guard_stops_every_chain(change, reason, held, option):
    """A mailbox paused for now holds the message (no decision yet); a deliberate setting decides."""
    decision = decide(message(), mailbox(tracking=option, **change))
    assert not decision.tracked
    assert decision.reason == reason
    assert decision.rule == reason
    assert decision.held is held
    if held:
        assert decision.explanation.startswith("Held:") and "evaluated" in decision.explanation
    else:
        assert decision.explanation.startswith("Not tracked:")


def test_a_paused_mailbox_wins_over_waiting_behind_held_messages():
    decision = decide(message(), mailbox(incoming_enabled=False, holds_messages=True))
    assert decision.held and decision.reason == "incoming_disabled"
    assert decision.explanation == ("Held: incoming email synchronization is disabled for this mailbox; "
                                    "it will be evaluated when the mailbox may process email again.")


def test_queue_conversion_off_is_decided_not_held():
    decision = decide(message(), mailbox(owner_kind="queue", convert=False))
    assert not decision.held and decision.reason == "queue_conversion_off"


def test_may_process_is_what_held_messages_wait_for():
    assert may_process(mailbox())
    for change in ({"active": False}, {"has_profile": False}, {"approved": False}, {"incoming_enabled": False}):
        assert not may_process(mailbox(**change)), change
    # Neither waiting behind held messages nor a deliberate setting keeps a mailbox from its held mail.
    assert may_process(mailbox(holds_messages=True))
    assert may_process(mailbox(owner_kind="queue", convert=False))


@pytest.mark.parametrize("option", ["all", "responses", "known_records", "email_enabled_records"])
def test_a_copy_of_an_email_conduit_is_still_recording_as_sent_is_held(option):
    """Whatever the option, and before a folder rule or the correlation: once the send is recorded,
    its outgoing activity is what the copy is linked to (already tracked), not an activity of its own."""
    sending = lookups(being_sent={"m1@customer.example": "quote-17"})
    decision = decide(message(), mailbox(tracking=option), sending, folder_regarding=("account", "a-1"))
    assert (decision.tracked, decision.reason, decision.held) == (False, "being_sent", True)
    assert decision.explanation == ("Held: Conduit is sending this message (request quote-17) and has not recorded "
                                    "it as sent yet; it will be evaluated once the send is recorded.")
    # Another message of the batch is not held for it; the paused mailbox's own guard comes first.
    other = decide(message(message_id="<m2@customer.example>"), mailbox(tracking=option), sending)
    assert not other.held and other.reason != "being_sent"
    assert decide(message(), mailbox(active=False), sending).reason == "mailbox_inactive"


def test_guards_come_first_in_every_chain():
    for chain in CHAINS.values():
        assert chain.rules[: len(GUARDS)] == GUARDS


def test_guard_order_inactive_wins_over_no_profile():
    decision = decide(message(), mailbox(active=False, has_profile=False))
    assert decision.reason == "mailbox_inactive"


def test_queue_with_conversion_on_is_evaluated():
    decision = decide(message(), mailbox(owner_kind="queue", convert=True))
    assert decision.tracked and decision.reason == "tracked_all"


def test_user_mailbox_ignores_convert_flag():
    decision = decide(message(), mailbox(convert=False))
    assert decision.tracked


def test_cutoff_uses_server_receive_time_over_date_header():
    box = mailbox(received_after=datetime(2025, 2, 1, tzinfo=UTC))
    late = datetime(2025, 3, 1, tzinfo=UTC)
    assert decide(message(), box, received_at=late).tracked
    assert decide(message(date="Sat, 01 Mar 2025 00:00:00 +0000"), box).tracked


def test_cutoff_does_not_skip_message_without_any_time():
    box = mailbox(received_after=datetime(2025, 2, 1, tzinfo=UTC))
    raw = message().replace(b"Date: Mon, 06 Jan 2025 10:00:00 +0000\r\n", b"")
    assert decide(raw, box).tracked


def test_naive_cutoff_is_read_as_utc():
    box = mailbox(received_after=datetime(2025, 1, 6, 10, 0, 1))
    assert decide(message(), box).reason == "received_before_cutoff"


# ---------------------------------------------------------------------------------------------
# Options


def test_all_tracks_everything():
    decision = decide(message(sender="stranger@nowhere.example"), mailbox(tracking="all"))
    assert decision.tracked and decision.reason == "tracked_all" and decision.rule == "track_all"
    assert "All email messages" in decision.explanation


def test_all_keeps_correlation_regarding():
    raw = message(extra="In-Reply-To: <sent-1@conduit.example>\r\n")
    decision = decide(raw, mailbox(tracking="all"), lookups(tracked_by_message_id={"sent-1@conduit.example": TRACKED}))
    assert decision.reason == "tracked_all"
    assert decision.correlation is not None and decision.correlation.method == "in_reply_to"
    assert decision.regarding == ("opportunity", "opp-1")


def test_responses_tracks_a_reply():
    raw = message(extra="In-Reply-To: <sent-1@conduit.example>\r\n")
    decision = decide(raw, mailbox(tracking="responses"), lookups(tracked_by_message_id={"sent-1@conduit.example": TRACKED}))
    assert decision.tracked and decision.reason == "correlated_in_reply_to"
    assert decision.regarding == ("opportunity", "opp-1")
    assert "act-1" in decision.explanation


def test_responses_does_not_track_unrelated_mail_even_from_a_contact():
    decision = decide(message(), mailbox(tracking="responses"))
    assert not decision.tracked and decision.reason == "no_correlation_match"
    assert "in response to tracked email" in decision.explanation
    assert "in_reply_to" in decision.explanation


@pytest.mark.parametrize("option", ["known_records", "email_enabled_records"])
def test_every_option_tracks_responses(option):
    raw = message(sender="stranger@nowhere.example", extra="In-Reply-To: <sent-1@conduit.example>\r\n")
    decision = decide(raw, mailbox(tracking=option), lookups(tracked_by_message_id={"sent-1@conduit.example": TRACKED}))
    assert decision.tracked and decision.reason == "correlated_in_reply_to"


def test_known_records_tracks_a_contact():
    decision = decide(message(), mailbox(tracking="known_records"))
    assert decision.tracked and decision.reason == "sender_known_record"
    assert "carla@customer.example" in decision.explanation and "contact c-1" in decision.explanation


@pytest.mark.parametrize("kind", ["account", "lead"])
def test_known_records_tracks_accounts_and_leads(kind):
    party = Party(kind, "r-1", "buyer@customer.example")
    found = lookups(parties_by_address={party.email: (party,)})
    decision = decide(message(sender="buyer@customer.example"), mailbox(tracking="known_records"), found)
    assert decision.tracked and decision.reason == "sender_known_record"


def test_known_records_does_not_track_a_colleague():
    decision = decide(message(sender="colin@conduit.example"), mailbox(tracking="known_records"))
    assert not decision.tracked and decision.reason == "sender_not_known_record"
    assert "user" in decision.explanation


def test_known_records_does_not_track_an_unknown_sender():
    decision = decide(message(sender="stranger@nowhere.example"), mailbox(tracking="known_records"))
    assert not decision.tracked and decision.reason == "sender_unknown"
    assert "stranger@nowhere.example" in decision.explanation


def test_known_records_counts_a_contact_even_if_not_email_enabled():
    decision = decide(message(sender="dora@customer.example"), mailbox(tracking="known_records"))
    assert decision.tracked and decision.reason == "sender_known_record"


def test_missing_from_is_its_own_reason():
    raw = message().replace(b"From: Carla Contact <carla@customer.example>\r\n", b"")
    for option in ("known_records", "email_enabled_records"):
        decision = decide(raw, mailbox(tracking=option))
        assert not decision.tracked and decision.reason == "sender_missing"


def test_email_enabled_tracks_a_contact_and_a_colleague():
    assert decide(message(), mailbox(tracking="email_enabled_records")).reason == "sender_email_enabled"
    decision = decide(message(sender="colin@conduit.example"), mailbox(tracking="email_enabled_records"))
    assert decision.tracked and decision.reason == "sender_email_enabled"
    assert "email-enabled user u-2" in decision.explanation


def test_email_enabled_refuses_a_record_not_enabled_for_email():
    decision = decide(message(sender="dora@customer.example"), mailbox(tracking="email_enabled_records"))
    assert not decision.tracked and decision.reason == "sender_not_email_enabled"


def test_email_enabled_refuses_unknown_sender():
    decision = decide(message(sender="stranger@nowhere.example"), mailbox(tracking="email_enabled_records"))
    assert not decision.tracked and decision.reason == "sender_unknown"


def test_a_sender_shared_by_several_records_is_the_first_of_users_contacts_accounts_leads_queues():
    """The reference resolves the From field to one record: a colleague's address that a lead also
    has is the colleague's, and mail from it is not from a known record."""
    shared = (Party("user", "u-9", "shared@customer.example"), Party("lead", "l-9", "shared@customer.example"))
    found = lookups(parties_by_address={"shared@customer.example": shared})
    decision = decide(message(sender="shared@customer.example"), mailbox(tracking="known_records"), found)
    assert not decision.tracked and decision.reason == "sender_not_known_record"
    assert decision.parties.from_.parties == shared[:1]
    contact_first = (Party("contact", "c-9", "shared@customer.example"), Party("lead", "l-9", "shared@customer.example"))
    found = lookups(parties_by_address={"shared@customer.example": contact_first})
    decision = decide(message(sender="shared@customer.example"), mailbox(tracking="known_records"), found)
    assert decision.tracked and "contact c-9" in decision.explanation


def test_a_sender_more_than_a_hundred_records_share_is_unresolved():
    shared = tuple(Party("contact", f"c-{n}", "noreply@customer.example") for n in range(101))
    found = lookups(parties_by_address={"noreply@customer.example": shared})
    decision = decide(message(sender="noreply@customer.example"), mailbox(tracking="known_records"), found)
    assert not decision.tracked and decision.reason == "sender_unknown"
    assert decide(message(sender="noreply@customer.example"), mailbox(tracking="known_records"),
                  lookups(parties_by_address={"noreply@customer.example": shared[:100]})).tracked


def test_any_of_several_records_of_a_recipient_counts():
    shared = (Party("user", "u-9", "shared@customer.example"), Party("lead", "l-9", "shared@customer.example"))
    found = lookups(parties_by_address={"shared@customer.example": shared})
    decision = decide(message(sender=OWNER, to="shared@customer.example"), mailbox(tracking="known_records"), found)
    assert decision.tracked and decision.reason == "recipient_known_record"


# ---------------------------------------------------------------------------------------------
# Mail the mailbox sent: judged on its recipients


def test_outgoing_is_judged_on_recipients():
    raw = message(sender=OWNER, to="Carla <carla@customer.example>")
    decision = decide(raw, mailbox(tracking="known_records"))
    assert decision.direction == "outgoing"
    assert decision.tracked and decision.reason == "recipient_known_record"


def test_outgoing_to_strangers_is_not_tracked():
    raw = message(sender=OWNER, to="stranger@nowhere.example")
    decision = decide(raw, mailbox(tracking="email_enabled_records"))
    assert not decision.tracked and decision.reason == "recipients_unknown"


def test_outgoing_to_self_only_is_not_tracked_for_the_owner_being_known():
    raw = message(sender=OWNER, to=OWNER)
    decision = decide(raw, mailbox(tracking="email_enabled_records"))
    assert not decision.tracked and decision.reason == "recipients_unknown"


def test_outgoing_to_colleague_under_known_records():
    raw = message(sender=OWNER, to="colin@conduit.example")
    decision = decide(raw, mailbox(tracking="known_records"))
    assert not decision.tracked and decision.reason == "recipients_not_known_record"


def test_outgoing_to_disabled_contact_under_email_enabled():
    raw = message(sender=OWNER, to="dora@customer.example")
    decision = decide(raw, mailbox(tracking="email_enabled_records"))
    assert not decision.tracked and decision.reason == "recipients_not_email_enabled"


def test_outgoing_email_enabled_recipient():
    raw = message(sender=OWNER, to="colin@conduit.example")
    decision = decide(raw, mailbox(tracking="email_enabled_records"))
    assert decision.tracked and decision.reason == "recipient_email_enabled"


def test_owner_address_compared_normalised():
    raw = message(sender="OWNER@Conduit.Example", to="carla@customer.example")
    decision = decide(raw, mailbox(owner_email=" Owner@CONDUIT.example ", tracking="known_records"))
    assert decision.direction == "outgoing"


# ---------------------------------------------------------------------------------------------
# Prelude rules: already tracked, folder tracking


def test_already_tracked_message_links_to_its_activity_under_any_option():
    found = lookups(tracked_by_message_id={"m1@customer.example": TRACKED})
    decision = decide(message(sender="stranger@nowhere.example"), mailbox(tracking="responses"), found)
    assert decision.tracked and decision.reason == "already_tracked"
    assert decision.activity_id == "act-1"
    assert not decision.creates_activity
    assert decision.regarding == ("opportunity", "opp-1")


def test_guards_win_over_already_tracked():
    found = lookups(tracked_by_message_id={"m1@customer.example": TRACKED})
    decision = decide(message(), mailbox(active=False), found)
    assert decision.reason == "mailbox_inactive"


def test_folder_tracking_rule_tracks_regarding_the_folder_record():
    decision = decide(
        message(sender="stranger@nowhere.example"),
        mailbox(tracking="responses"),
        folder_regarding=("account", "acc-7"),
    )
    assert decision.tracked and decision.reason == "tracked_folder_rule"
    assert decision.regarding == ("account", "acc-7")


# ---------------------------------------------------------------------------------------------
# Parties


def test_parties_are_resolved_and_unresolved_kept():
    raw = message(to=f"{OWNER}, stranger@nowhere.example", extra="Cc: colin@conduit.example\r\n")
    decision = decide(raw)
    parties = decision.parties
    assert parties.from_ is not None and parties.from_.parties == (CONTACT,)
    assert [m.address.email for m in parties.to] == [OWNER, "stranger@nowhere.example"]
    assert parties.to[0].parties == (OWNER_PARTY,)
    assert parties.cc[0].parties == (COLLEAGUE,)
    assert parties.unresolved == ("stranger@nowhere.example",)


# ---------------------------------------------------------------------------------------------
# Batch


def test_batch_same_message_to_two_mailboxes_makes_one_activity():
    parsed = parse_email(message())
    other = mailbox(mailbox_id="mbx-2", owner_id="user-2", owner_email="other@conduit.example")
    found = lookups()
    ids = iter(["new-1", "new-2"])
    decisions = evaluate_batch(
        [BatchItem(parsed, mailbox()), BatchItem(parsed, other)], found, SETTINGS, lambda p: next(ids)
    )
    assert [d.reason for d in decisions] == ["tracked_all", "already_tracked"]
    assert [d.activity_id for d in decisions] == ["new-1", "new-1"]
    assert decisions[0].creates_activity and not decisions[1].creates_activity


def test_batch_reply_correlates_to_message_tracked_earlier_in_the_batch():
    first = parse_email(message())
    reply = parse_email(
        message(
            sender=OWNER,
            to="stranger@nowhere.example",
            subject="RE: Quote",
            message_id="<r1@conduit.example>",
            extra="In-Reply-To: <m1@customer.example>\r\n",
        )
    )
    found = lookups()
    decisions = evaluate_batch(
        [BatchItem(first, mailbox(tracking="known_records")), BatchItem(reply, mailbox(tracking="responses"))],
        found,
        SETTINGS,
        lambda p: f"act-{p.message_id}",
    )
    assert decisions[0].reason == "sender_known_record"
    assert decisions[1].reason == "correlated_in_reply_to"
    assert decisions[1].correlation.ref.activity_id == "act-m1@customer.example"


def test_batch_not_tracked_messages_are_not_recorded():
    found = lookups()
    decisions = evaluate_batch(
        [BatchItem(parse_email(message()), mailbox(tracking="responses"))], found, SETTINGS, lambda p: "x"
    )
    assert not decisions[0].tracked and decisions[0].activity_id is None
    assert found.tracked_by_message_id == {}


# ---------------------------------------------------------------------------------------------
# Chains as data


def test_chain_for_each_option():
    for option in ("all", "responses", "known_records", "email_enabled_records"):
        assert chain_for(mailbox(tracking=option)).name == option


def test_every_chain_ends_with_a_rule_that_always_decides():
    empty = parse_email(b"")
    for chain in CHAINS.values():
        from services.evaluate.context import EvaluationContext

        ctx = EvaluationContext.build(empty, mailbox(tracking=chain.name), Lookups(), SETTINGS)
        assert chain.rules[-1].check(ctx) is not None


def test_rules_list_names_and_descriptions():
    listed = dict(list_rules())
    assert "mailbox_inactive" in listed and "correlated" in listed
    assert all(description.strip() for description in listed.values())
    assert "not a known record" in listed["from_known_record"]


def test_unknown_tracking_option_is_refused():
    with pytest.raises(ValueError):
        MailboxContext("m", "user", "u", OWNER, tracking="everything")  # type: ignore[arg-type]


def test_every_reason_produced_is_documented():
    produced = {
        decide(message(), mailbox(active=False)).reason,
        decide(message(), mailbox(tracking="responses")).reason,
        decide(message(sender="stranger@nowhere.example"), mailbox(tracking="known_records")).reason,
    }
    assert produced <= set(REASONS)
    assert len(REASONS) == len(set(REASONS))


def test_empty_message_never_breaks_evaluation():
    for option in ("all", "responses", "known_records", "email_enabled_records"):
        decision = evaluate(parse_email(b""), mailbox(tracking=option), Lookups(), SETTINGS)
        assert decision.reason in REASONS
