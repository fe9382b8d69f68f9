"""Header injection through RFC 2047 encoded words, and message ids and URLs written verbatim.

Python 3.11.7's email package decodes an encoded word such as ``=?utf-8?q?x=0D=0ABcc:_a@evil?=`` when it
parses a header and writes the decoded CR/LF out raw (CVE-2024-6923, fixed in 3.11.10 / 3.12.5), so
a subject, display name, X- header, file name or Content-ID carrying one became a real ``Bcc`` header.
These tests drive ``compose()`` as the send loop calls it, with requests that got past the payload
model (``model_copy``: a stored request, or a field the model does not see), and the payload model
and ``check_headers`` as the consumer runs them.
"""
from __future__ import annotations

import base64
import uuid
from datetime import datetime, timezone
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from typing import Any

import pytest

from services.dispatch import compose as compose_module
from services.dispatch.compose import _compose_mime, check_headers, compose
from services.dispatch.service import _validated
from shared.errors import InvalidInput
from shared.events.payloads import Attachment, EmailOutboundV1
from shared.tracking import subject_with_token

DATE = datetime(2026, 11, 27, 9, 30, tzinfo=timezone.utc)
MESSAGE_ID = "conduit.0123456789abcdef0123456789abcdef@example.com"
SENDER = "alice@example.com"
TOKEN = "CRM:0001234"
# Decodes to "x", CRLF, "X-Injected: yes", CRLF, "Bcc: attacker@evil.example".
INJECTION = "=?utf-8?q?x=0D=0AX-Injected:_yes=0D=0ABcc:_attacker@evil.example?="
LONG = " and more words, so that the line needs folding past seventy-eight characters"
OUTLOOK_ID = "<AM9PR02MB7654A1B2C3D4E5F6A7B8C9D0E1F2A3B4C5D6@AM9PR02MB7654.eurprd02.prod.outlook.com>"
PDF = base64.b64encode(b"%PDF-1.4 not really").decode()


def _request(**data: Any) -> EmailOutboundV1:
    data.setdefault("to", ["buyer@customer.example"])
    data.setdefault("subject", "Invoice")
    data.setdefault("text", "Hello,\nplease find the invoice attached.\n")
    return EmailOutboundV1(idempotency_key="k", mailbox_id=uuid.uuid4(), **data)


def _past_the_model(request: EmailOutboundV1, **update: Any) -> EmailOutboundV1:
    """The request with fields the payload model would refuse: what a request stored before a rule
    existed looks like to the send loop (compose must not rely on the model)."""
    return request.model_copy(update=update)


def _attachment(*, past_the_model: dict[str, Any] | None = None, **data: Any) -> Attachment:
    data.setdefault("filename", "invoice.pdf")
    data.setdefault("content_type", "application/pdf")
    data.setdefault("content_base64", PDF)
    return Attachment(**data).model_copy(update=past_the_model or {})


def _compose(request: EmailOutboundV1, *, sender_name: str | None = "Alice Example", exchange: bool = False) -> bytes:
    """``compose()`` the way ``DispatchService._send_one`` calls it (the subject with its token)."""
    return compose(request, sender_email=SENDER, sender_name=sender_name, subject=subject_with_token(request.subject, TOKEN),
                   message_id=MESSAGE_ID, attachments={}, date=DATE, max_bytes=25_000_000,
                   bcc_header=exchange).raw


def _field_names(raw: bytes) -> list[str]:
    parsed = message_from_bytes(raw, policy=default)
    return [name.lower() for part in parsed.walk() for name in part.keys()]


def _refused(request: EmailOutboundV1, **kwargs: Any) -> InvalidInput:
    try:
        raw = _compose(request, **kwargs)
    except InvalidInput as exc:
        return exc
    injected = [n for n in _field_names(raw) if n in ("bcc", "x-injected")]
    pytest.fail(f"composed instead of refused (injected header fields: {injected}):\n{raw[:1200].decode(errors='replace')}")


# One case per place a requester's (or a mailbox's) text reaches a header; each takes the email
# package's path (long, non-ASCII, an attachment, or text and HTML), where the old code injected.
INJECTIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "subject": ({"subject": INJECTION + LONG}, {}),
    "non-ASCII subject": ({"subject": "Grüße " + INJECTION}, {}),
    "subject, text and HTML": ({"subject": INJECTION, "html": "<p>Hello</p>"}, {}),
    "display name": ({}, {"sender_name": INJECTION}),
    "display name, Exchange": ({}, {"sender_name": "Alice " + INJECTION, "exchange": True}),
    "X- header": ({"headers": {"X-Campaign": INJECTION + LONG}}, {}),
    "attachment filename": ({"attachments": [_attachment(past_the_model={"filename": INJECTION})]}, {}),
    "Content-ID": ({"attachments": [_attachment(filename="logo.png", content_type="image/png", inline=True,
                                                past_the_model={"content_id": INJECTION})]}, {}),
    "base64 encoded word": ({"subject": "=?UTF-8?B?eA0KQmNjOiBhdHRhY2tlckBldmlsLmV4YW1wbGU=?=" + LONG}, {}),
}


@pytest.mark.parametrize("case", list(INJECTIONS))
def test_an_encoded_word_that_decodes_to_a_line_break_is_refused_and_injects_nothing(case: str) -> None:
    update, kwargs = INJECTIONS[case]
    request = _past_the_model(_request(), **update)
    refused = _refused(request, **kwargs)
    assert refused.reason == "header_injection"


# The same texts arriving in a request: refused on arrival, before any ledger row.
ARRIVING = {
    "subject": {"subject": "Grüße " + INJECTION},
    "X- header": {"headers": {"X-Campaign": INJECTION}},
    "Reply-To display name": {"headers": {"Reply-To": f'"{INJECTION}" <billing@example.com>'}},
    "In-Reply-To": {"headers": {"In-Reply-To": "<" + INJECTION + "@example.com>"}},
    "attachment filename": {"attachments": [{"filename": INJECTION, "content_base64": PDF}]},
    "Content-ID": {"attachments": [{"filename": "a.png", "inline": True, "content_id": INJECTION, "content_base64": PDF}]},
    "recipient": {"to": [INJECTION.replace(":", "=3A").replace("@", "=40") + "@customer.example"]},
    "base64": {"subject": "=?utf-8?b?eA0KQmNjOiBhdHRhY2tlckBldmlsLmV4YW1wbGU=?="},
    "NUL in another charset": {"subject": "=?iso-8859-1?q?a=00b?="},
    "UTF-7": {"subject": "=?utf-7?q?x+AA0ACg-Bcc:_a@evil.example?="},
    "an encoded word inside a word": {"subject": "Re:=?x?=?utf-8?q?=0D=0ABcc:_a@evil.example?="},
    "a vertical tab as such": {"subject": "a\x0bb"},
    "a Unicode line separator as such": {"headers": {"X-Note": "a\u2028Bcc: a@evil.example"}},
}


@pytest.mark.parametrize("case", list(ARRIVING))
def test_a_request_with_such_a_text_is_refused_on_arrival_as_header_injection(case: str) -> None:
    data = {"idempotency_key": "k", "mailbox_id": str(uuid.uuid4()), "to": ["buyer@customer.example"],
            "subject": "Invoice", "text": "Hello\n", **ARRIVING[case]}
    with pytest.raises(InvalidInput) as refused:
        request = _validated(data)
        check_headers(request.headers)
    assert refused.value.reason == "header_injection"


# Normal text is no false positive: it composes, and decodes back to what was given.
def test_non_ascii_subject_display_name_and_filename_round_trip() -> None:
    request = _request(subject="Grüße aus Köln – Rechnung", html="<p>Grüße</p>",
                       attachments=[_attachment(filename="名前.pdf"), _attachment(filename="Rechnung März 2026.pdf")],
                       headers={"X-Note": "Ünïcödé – ok", "Reply-To": "Jürgen Müller <billing@example.com>"})
    assert _validated(request.model_dump(mode="json")) == request
    check_headers(request.headers)
    parsed = message_from_bytes(_compose(request, sender_name="Ünïcödé Name", exchange=True), policy=default)
    assert parsed["Subject"] == f"Grüße aus Köln – Rechnung {TOKEN}"
    assert parsed["From"].addresses[0].display_name == "Ünïcödé Name"
    assert parsed["X-Note"] == "Ünïcödé – ok"
    assert parsed["Reply-To"].addresses[0].display_name == "Jürgen Müller"
    assert [p.get_filename() for p in parsed.iter_attachments()] == ["名前.pdf", "Rechnung März 2026.pdf"]


@pytest.mark.parametrize("sender", ["josé@example.com", "ann\u202e@example.com", "a b@example.com", "no-at-sign"])
def test_a_mailbox_address_that_cannot_be_sent_from_is_refused_as_such(sender: str) -> None:
    """A mailbox registered before the registry refused such addresses: refused as a bad address of
    the mailbox, not reported as header injection by the checks further down."""
    with pytest.raises(InvalidInput) as refused:
        compose(_request(), sender_email=sender, sender_name="Alice", subject="Invoice", message_id=MESSAGE_ID, date=DATE)
    assert refused.value.reason == "bad_address" and "sending mailbox's address" in str(refused.value)


@pytest.mark.parametrize("text", [
    "=?utf-8?q?Gr=C3=BC=C3=9Fe?=",                  # an encoded word that decodes to plain text
    "=?ISO-2022-JP?B?GyRCJEskWyRzJDQbKEI=?=",       # escape sequences in the bytes, none in the text
    "What is x=?y? Price=?=100",                    # "=?" that is no encoded word
    "Tab\tseparated",                               # a literal tab is folding white space, not a break
])
def test_harmless_text_with_encoded_words_or_question_marks_is_sent(text: str) -> None:
    request = _request(subject=text, headers={"X-Note": text}, attachments=[_attachment(filename="a.pdf")])
    _validated(request.model_dump(mode="json"))
    names = _field_names(_compose(request, sender_name=text))
    assert "bcc" not in names and names.count("subject") == 1


# In-Reply-To, References and List-Unsubscribe go out as given (folded at their own spaces only).
VERBATIM = {
    "In-Reply-To": OUTLOOK_ID,
    "References": f"<first.{'a' * 40}@example.com> {OUTLOOK_ID} <conduit.0123456789abcdef@example.com>",
    "List-Unsubscribe": "<https://example.com/unsubscribe?list=news&token=" + "a1b2c3d4" * 12 + ">",
    "List-Unsubscribe, mailto and URL":
        "<mailto:unsubscribe@example.com?subject=unsubscribe>, <https://example.com/u/" + "b" * 70 + ">",
}


@pytest.mark.parametrize("case", list(VERBATIM))
@pytest.mark.parametrize("attached", [False, True], ids=["text", "attachment"])
def test_message_ids_and_urls_are_sent_verbatim_and_parse_back_the_same(case: str, attached: bool) -> None:
    name, value = case.split(",")[0], VERBATIM[case]
    request = _request(headers={name: value}, attachments=[_attachment()] if attached else [])
    check_headers(request.headers)
    raw = _compose(request)
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    assert "=?" not in head
    assert all(len(line) <= 998 for line in head.split("\r\n"))
    unfolded = head.replace("\r\n ", " ").split("\r\n")
    assert f"{name}: {value}" in unfolded
    parsed = message_from_bytes(raw, policy=default)
    assert str(parsed[name]) == value
    if len(f"{name}: {value}") <= 78:
        assert f"{name}: {value}\r\n".encode() in raw


def test_a_long_references_header_is_folded_at_its_spaces_only() -> None:
    ids = [f"<id{i}.{'x' * 30}@example.com>" for i in range(4)]
    value = " ".join([*ids[:2], OUTLOOK_ID, *ids[2:]])
    raw = _compose(_request(headers={"References": value}))
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii").split("\r\n")
    at = next(i for i, line in enumerate(head) if line.startswith("References:"))
    block = [head[at]] + [line for line in head[at + 1:at + 6] if line.startswith(" ")]
    # Two ids do not fit on one line here: one a line, and the Outlook id, longer than 78, stays whole.
    assert [line.split()[-1] for line in block] == value.split()
    assert all(len(line) <= 78 or line.strip() == OUTLOOK_ID for line in block)
    assert "".join(block) == f"References: {value}"


@pytest.mark.parametrize("name", ["In-Reply-To", "References", "List-Unsubscribe"])
def test_non_ascii_in_a_verbatim_header_is_refused(name: str) -> None:
    value = "<grüße@example.com>" if name != "List-Unsubscribe" else "<https://example.com/grüße>"
    with pytest.raises(InvalidInput) as refused:
        check_headers({name: value})
    assert refused.value.reason == "bad_header"
    with pytest.raises(InvalidInput) as refused:
        _compose(_past_the_model(_request(), headers={name: value}))
    assert refused.value.reason == "bad_header"
    with pytest.raises(InvalidInput) as refused:
        check_headers({name: value.replace("ü", "\x01")})
    assert refused.value.reason == "header_injection"


# The layers behind the text check: each one alone keeps an injection from being sent.
@pytest.mark.parametrize("case", list(INJECTIONS))
def test_without_the_text_check_the_written_headers_are_still_checked(case: str, monkeypatch) -> None:
    monkeypatch.setattr(compose_module, "check_header_text", lambda *a, **k: None)
    update, kwargs = INJECTIONS[case]
    assert _refused(_past_the_model(_request(), **update), **kwargs).reason == "header_injection"
    # And without the check of each written header, the check of the header blocks.
    monkeypatch.setattr(compose_module, "_checked_fold", lambda name, folded, linesep: folded)
    assert _refused(_past_the_model(_request(), **update), **kwargs).reason == "header_injection"


def test_the_policy_refuses_a_header_written_across_lines() -> None:
    with pytest.raises(InvalidInput) as refused:
        compose_module._POLICY.fold_binary("Subject", "x\r\nBcc: attacker@evil.example")
    assert refused.value.reason == "header_injection"
    with pytest.raises(InvalidInput):
        compose_module._POLICY.fold_binary("Subject", "x\r\n\r\nbody")
    assert compose_module._POLICY.fold_binary("Subject", "folded\r\n line") == b"Subject: folded\r\n line\r\n"


@pytest.mark.parametrize("tamper", [
    lambda raw: raw.replace(b"Subject: Invoice\r\n", b"Subject: Invoice\r\nBcc: attacker@evil.example\r\n"),
    lambda raw: raw.replace(b"Subject: Invoice\r\n", b"Subject: Invoice\r\n\r\n"),
    lambda raw: raw.replace(b'filename="invoice.pdf"\r\n', b'filename="invoice.pdf"\r\nX-Injected: yes\r\n'),
    lambda raw: raw.replace(b'filename="invoice.pdf"\r\n', b'filename="x"\nBcc: attacker@evil.example\r\n'),
], ids=["top-level field", "blank line", "field in a part", "bare LF in a part"])
def test_the_header_blocks_must_hold_exactly_the_fields_written(tamper) -> None:
    request = _request(html="<p>Hi</p>", attachments=[_attachment()])
    raw = _compose_mime(request, sender_email=SENDER, sender_name="Alice", subject=request.subject,
                        message_id=MESSAGE_ID, attachments={}, date=DATE)
    # The message compose built, rebuilt to compare against (same structure, same boundaries).
    msg = message_from_bytes(raw, policy=compose_module._POLICY)
    compose_module._check_header_blocks(msg, raw)
    tampered = tamper(raw)
    assert tampered != raw
    with pytest.raises(InvalidInput) as refused:
        compose_module._check_header_blocks(msg, tampered)
    assert refused.value.reason == "header_injection"


def test_header_write_error_of_newer_pythons_is_header_injection(monkeypatch) -> None:
    class HeaderWriteError(Exception):
        pass

    monkeypatch.setattr(compose_module, "_HEADER_WRITE_ERRORS", (HeaderWriteError,))

    def refuse(self, *args, **kwargs):
        raise HeaderWriteError("folded header contained newline")

    monkeypatch.setattr(EmailMessage, "as_bytes", refuse)
    with pytest.raises(InvalidInput) as refused:
        _compose(_request(subject="Grüße"))
    assert refused.value.reason == "header_injection"


def test_an_over_long_header_value_is_refused_by_its_length_before_any_encoded_word_is_scanned() -> None:
    """The scan for encoded words looks at every "=?"; a megabyte of them must not reach it (the scan
    was quadratic in such a text before its parts were bounded)."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        EmailOutboundV1.model_validate({"idempotency_key": "k", "sender_email": "a@example.com", "to": ["b@example.com"],
                                        "headers": {"X-Note": "=?a?q?x" * 150_000}})
    assert [e["type"] for e in caught.value.errors()] == ["string_too_long"]


@pytest.mark.parametrize("text", [
    "Hello,\n" * 10 + "é" * 800_000,                       # quoted-printable: three bytes for each
    "Grüße " * 50_000, "a=b " * 100_000, "plain ascii line\n" * 20_000, "x" * 5_000,
    "名前" * 100_000 + "\n",
])
def test_the_size_estimate_is_never_below_the_built_message(text: str) -> None:
    """The size checks on arrival (25 MB, and Graph's 4 MB of base64 MIME) run on the estimate: one
    below the built message lets a request through that then fails at send time."""
    request = _request(text=text, html=text if len(text) < 200_000 else None)
    assert compose_module.estimated_size(request) >= len(_compose(request))
