"""The MIME dispatch writes: the fast path equals the email package's output, and nothing injects."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from email import message_from_bytes
from email.policy import default

import pytest

from services.dispatch.compose import _compose_mime, _compose_plain, check_headers, compose, header_allowed
from shared.errors import InvalidInput
from shared.events.payloads import EmailOutboundV1
from shared.tracking import find_tracking_token, make_tracking_token, subject_with_token

DATE = datetime(2026, 11, 27, 9, 30, tzinfo=timezone.utc)


def _request(**data) -> EmailOutboundV1:
    data.setdefault("to", ["a@example.com"])
    return EmailOutboundV1(idempotency_key="k", mailbox_id=uuid.uuid4(), **data)


@pytest.mark.parametrize("request_", [
    _request(subject="Hello", text="line one\nline two\n"),
    _request(to=["a@example.com", "b@example.com"], cc=["c@example.com"], subject="Hi", text="x" * 70, headers={"X-Campaign": "q4"}),
    _request(subject="", html="<p>hi</p>"),
    _request(subject="Tracked", text="", headers={"Reply-To": "billing@example.com"}),
])
def test_fast_path_writes_what_the_email_package_writes(request_: EmailOutboundV1) -> None:
    fast = _compose_plain(request_, "me@example.com", "Me Too", "Subject CRM:0000001", "conduit.1@example.com", DATE)
    slow = _compose_mime(request_, sender_email="me@example.com", sender_name="Me Too", subject="Subject CRM:0000001",
                         message_id="conduit.1@example.com", attachments=None, date=DATE)
    assert fast is not None and fast == slow


def test_unusual_messages_take_the_email_package_path() -> None:
    for request_, name in ((_request(subject="Grüße", text="ä"), "Me"), (_request(text="hi"), "Müller, Hans"),
                           (_request(text="hi", html="<p>hi</p>"), "Me")):
        assert _compose_plain(request_, "me@example.com", name, request_.subject, "id@example.com", DATE) is None
        raw = compose(request_, sender_email="me@example.com", sender_name=name, subject=request_.subject,
                      message_id="id@example.com", date=DATE).raw
        parsed = message_from_bytes(raw, policy=default)
        assert parsed["Subject"] == request_.subject and parsed["Message-ID"] == "<id@example.com>"


def test_header_allow_list() -> None:
    assert header_allowed("X-Campaign") and header_allowed("List-Unsubscribe") and header_allowed("Reply-To")
    for name in ("From", "Bcc", "Subject", "Message-ID", "Content-Type", "X-Conduit-Idempotency-Key", "Bad Name", "X:y"):
        assert not header_allowed(name)
    with pytest.raises(InvalidInput, match="not allowed"):
        check_headers({"Sender": "x@example.com"})
    with pytest.raises(InvalidInput):
        check_headers({"Reply-To": "not an address"})
    with pytest.raises(InvalidInput):
        check_headers({"In-Reply-To": "no-brackets@example.com"})


def test_the_policy_refuses_injection_even_past_the_model() -> None:
    request_ = _request(text="hi").model_copy(update={"headers": {"X-Evil": "a\r\nBcc: victim@example.com"}})
    with pytest.raises(InvalidInput) as info:
        compose(request_, sender_email="me@example.com", sender_name="Me", subject="s", message_id="i@example.com")
    assert info.value.reason == "header_injection"


def test_tracking_token_round_trip() -> None:
    token = make_tracking_token(1234, "CRM:", 7)
    assert token == "CRM:0001234"
    assert find_tracking_token("RE: " + subject_with_token("Invoice", token), "CRM:", 7) == token
    assert find_tracking_token("re: invoice crm: 0001234", "CRM:", 7) == token
    assert find_tracking_token("XCRM:0001234", "CRM:", 7) is None
    assert find_tracking_token("CRM:123", "CRM:", 7) is None
