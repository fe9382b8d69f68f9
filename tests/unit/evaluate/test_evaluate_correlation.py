"""Correlation: each method, the configured order, tokens, subject normalisation, batch keys."""
from __future__ import annotations

import base64

import pytest

from services.evaluate.correlation import (
    CorrelationSettings,
    correlate,
    find_tracking_token,
    make_tracking_token,
    normalize_subject,
)
from services.evaluate.lookups import Lookups, TrackedRef, keys_for
from services.evaluate.parsing import parse_email

ROOT = bytes(range(22))
THREAD_INDEX = base64.b64encode(ROOT + b"\x01\x02\x03\x04\x05").decode()
THREAD_ROOT = base64.b64encode(ROOT).decode()

A = TrackedRef("act-a", "account", "acc-1", "Offer", frozenset({"owner@conduit.example", "carla@customer.example"}))
B = TrackedRef("act-b", "opportunity", "opp-1", "Offer")
C = TrackedRef("act-c", "case", "case-1", "Offer")
D = TrackedRef("act-d", "lead", "lead-1", "Offer", frozenset({"carla@customer.example"}))


def reply(
    *, in_reply_to: str = "", references: str = "", subject: str = "RE: Offer", thread_index: str = ""
) -> bytes:
    lines = [
        "From: Carla <carla@customer.example>",
        "To: owner@conduit.example",
        f"Subject: {subject}",
        "Message-ID: <reply@customer.example>",
    ]
    if in_reply_to:
        lines.append(f"In-Reply-To: {in_reply_to}")
    if references:
        lines.append(f"References: {references}")
    if thread_index:
        lines.append(f"Thread-Index: {thread_index}")
    return ("\r\n".join(lines) + "\r\n\r\nbody\r\n").encode()


def everything() -> Lookups:
    return Lookups(
        tracked_by_message_id={"parent@conduit.example": A, "grand@conduit.example": D, "old@conduit.example": C},
        tracked_by_token={"CRM:0001234": B},
        tracked_by_thread_root={THREAD_ROOT: C},
        tracked_by_subject={"offer": (D, A)},
    )


FULL = reply(
    in_reply_to="<parent@conduit.example>",
    references="<old@conduit.example> <grand@conduit.example>",
    subject="RE: Offer CRM:0001234",
    thread_index=THREAD_INDEX,
)


def test_in_reply_to_first_by_default():
    found = correlate(parse_email(FULL), everything(), CorrelationSettings(smart_matching=True))
    assert found is not None and found.method == "in_reply_to" and found.ref is A


def test_references_newest_first():
    raw = reply(references="<old@conduit.example> <grand@conduit.example> <unknown@x.example>")
    found = correlate(parse_email(raw), everything(), CorrelationSettings())
    assert found.method == "references" and found.ref is D


def test_tracking_token():
    found = correlate(parse_email(reply(subject="RE: Offer CRM:0001234")), everything(), CorrelationSettings())
    assert found.method == "tracking_token" and found.ref is B


def test_tracking_token_disabled():
    settings = CorrelationSettings(tracking_token_enabled=False)
    assert correlate(parse_email(reply(subject="RE: Offer CRM:0001234")), everything(), settings) is None


def test_thread_index():
    found = correlate(parse_email(reply(thread_index=THREAD_INDEX)), everything(), CorrelationSettings())
    assert found.method == "thread_index" and found.ref is C


def test_smart_matching_off_by_default():
    assert correlate(parse_email(reply()), everything(), CorrelationSettings()) is None


def test_smart_matching_newest_candidate_with_shared_participants():
    found = correlate(parse_email(reply()), everything(), CorrelationSettings(smart_matching=True))
    assert found.method == "smart_matching" and found.ref is D


def test_smart_matching_needs_enough_shared_participants():
    settings = CorrelationSettings(smart_matching=True, smart_matching_min_shared_recipients=2)
    found = correlate(parse_email(reply()), everything(), settings)
    assert found.ref is A  # D shares only one participant


def test_smart_matching_does_not_count_the_receiving_mailbox_as_shared():
    """Every customer's "Offer" to one mailbox shares the mailbox's address: that is no thread."""
    only_the_mailbox = TrackedRef("act-e", "account", "acc-2", "Offer", frozenset({"owner@conduit.example"}))
    found = Lookups(tracked_by_subject={"offer": (only_the_mailbox,)})
    settings = CorrelationSettings(smart_matching=True)
    assert correlate(parse_email(reply()), found, settings, own_address="owner@conduit.example") is None
    assert correlate(parse_email(reply()), found, settings).ref is only_the_mailbox   # another mailbox's copy
    with_carla = Lookups(tracked_by_subject={"offer": (only_the_mailbox, D)})
    assert correlate(parse_email(reply()), with_carla, settings, own_address="owner@conduit.example").ref is D


def test_a_bracketed_tag_with_a_number_names_the_conversation():
    assert normalize_subject("RE: [Ticket #1001] Printer broken") == "[ticket #1001] printer broken"
    assert normalize_subject("[Ticket #2002] Printer broken") != normalize_subject("[Ticket #1001] Printer broken")
    assert normalize_subject("RE: [EXTERNAL] [sales-list] Printer broken") == "printer broken"
    assert normalize_subject("Fw: [TKT#00042] help", CorrelationSettings(tracking_token_prefix="TKT#",
                                                                       tracking_token_digits=5)) == "help"


def test_smart_matching_never_on_blank_subject():
    found = Lookups(tracked_by_subject={"": (A,)})
    assert correlate(parse_email(reply(subject="RE:")), found, CorrelationSettings(smart_matching=True)) is None


def test_configured_order_is_honoured():
    settings = CorrelationSettings(order=("thread_index", "tracking_token", "in_reply_to"))
    found = correlate(parse_email(FULL), everything(), settings)
    assert found.method == "thread_index"
    settings = CorrelationSettings(order=("tracking_token", "in_reply_to"))
    assert correlate(parse_email(FULL), everything(), settings).method == "tracking_token"


def test_method_left_out_of_order_is_not_used():
    settings = CorrelationSettings(order=("tracking_token",))
    assert correlate(parse_email(reply(in_reply_to="<parent@conduit.example>")), everything(), settings) is None


def test_settings_validation():
    with pytest.raises(ValueError):
        CorrelationSettings(order=("in_reply_to", "telepathy"))
    with pytest.raises(ValueError):
        CorrelationSettings(order=("in_reply_to", "in_reply_to"))
    with pytest.raises(ValueError):
        CorrelationSettings(tracking_token_digits=0)


def test_make_and_find_tracking_token():
    settings = CorrelationSettings()
    assert make_tracking_token(1234, settings) == "CRM:0001234"
    assert find_tracking_token("RE: Offer crm:0001234", settings) == "CRM:0001234"
    assert find_tracking_token("RE: Offer CRM: 0001234 x", settings) == "CRM:0001234"
    assert find_tracking_token("RE: Offer CRM:12", settings) is None
    assert find_tracking_token("RE: Offer XCRM:0001234", settings) is None
    custom = CorrelationSettings(tracking_token_prefix="TKT#", tracking_token_digits=5)
    assert make_tracking_token(42, custom) == "TKT#00042"
    assert find_tracking_token("Fw: [TKT#00042] help", custom) == "TKT#00042"
    assert find_tracking_token("CRM:0001234", CorrelationSettings(tracking_token_enabled=False)) is None


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("RE: Offer", "offer"),
        ("Re: RE: Fwd: offer", "offer"),
        ("AW: WG: SV: Offer", "offer"),
        ("[EXTERNAL] RE: Offer", "offer"),
        ("RE[2]: Offer", "offer"),
        ("Re(3): Offer", "offer"),
        ("RE: Offer CRM:0001234", "offer"),
        ("  Offer   for   you ", "offer for you"),
        ("回复: Offer", "offer"),
        ("Offer (fwd)", "offer"),
        ("Review: the reply", "review: the reply"),
        ("", ""),
    ],
)
def test_normalize_subject(subject, expected):
    assert normalize_subject(subject) == expected


def test_keys_for_collects_every_kind():
    parsed = [parse_email(FULL), parse_email(reply(subject="Fw: Other"))]
    keys = keys_for(parsed, CorrelationSettings(smart_matching=True))
    assert keys.addresses == {"carla@customer.example", "owner@conduit.example"}
    assert keys.message_ids == {"reply@customer.example", "parent@conduit.example", "old@conduit.example", "grand@conduit.example"}
    assert keys.tracking_tokens == {"CRM:0001234"}
    assert keys.thread_roots == {THREAD_ROOT}
    assert keys.normalized_subjects == {"offer", "other"}


def test_keys_for_skips_disabled_methods():
    keys = keys_for([parse_email(FULL)], CorrelationSettings(tracking_token_enabled=False))
    assert keys.tracking_tokens == frozenset() and keys.normalized_subjects == frozenset()


def test_add_tracked_makes_later_messages_correlate():
    found = Lookups()
    first = parse_email(reply(subject="Offer CRM:0007777", thread_index=THREAD_INDEX).replace(b"reply@", b"first@"))
    settings = CorrelationSettings(smart_matching=True)
    ref = TrackedRef("act-new", None, None, first.subject, first.participants)
    found.add_tracked_email(first, ref, settings)
    assert correlate(parse_email(reply(in_reply_to="<first@customer.example>")), found, settings).method == "in_reply_to"
    assert correlate(parse_email(reply(subject="RE: x CRM:0007777")), found, settings).method == "tracking_token"
    assert correlate(parse_email(reply(thread_index=THREAD_INDEX)), found, settings).method == "thread_index"
    assert correlate(parse_email(reply(subject="RE: Offer")), found, settings).method == "smart_matching"
    newer = TrackedRef("act-newer", None, None, "Offer", first.participants)
    found.add_tracked("x@y", newer, normalized_subject="offer")
    assert found.tracked_by_subject["offer"][0] is newer


@pytest.mark.parametrize("sent, reply", [
    ("Your invoice CRM:0001234", "RE: Your invoice CRM:0001234"),
    ("[EXTERNAL] Offer for Q3 CRM:0000042", "AW: Offer for Q3 CRM:0000042"),
    ("Tickets (fwd)", "Fw: Tickets"),
    ("Straße   Plan", "re: STRASSE plan"),
])
def test_dispatch_records_sent_mail_under_the_key_evaluate_looks_replies_up_by(sent: str, reply: str) -> None:
    """Smart matching finds a reply to sent mail only if both sides normalise the subject alike:
    dispatch with the token it put in (shared.tracking), evaluate with the organization's settings."""
    from shared.tracking import normalize_subject as dispatch_key

    assert dispatch_key(sent, "CRM:", 7) == normalize_subject(reply, CorrelationSettings())
