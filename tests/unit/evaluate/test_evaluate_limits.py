"""Every value evaluate writes into an indexed column fits a PostgreSQL btree entry (at most 2,704
bytes; random text does not compress below that), whatever the message carries."""
from __future__ import annotations

import random
import time

from services.evaluate.correlation import CorrelationSettings, find_tracking_token, normalize_subject
from services.evaluate.parsing import generated_message_id, parse_email
from shared import mime

BTREE_LIMIT = 2704


def _random_cjk(count: int) -> str:
    rng = random.Random(count)
    return "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(count))


def test_normalized_subject_is_capped():
    subject = "RE: " + _random_cjk(7000)
    for settings in (None, CorrelationSettings()):
        normalized = normalize_subject(subject, settings)
        assert len(normalized) == 255 and normalized == subject[4:259]
    assert normalize_subject("Re: " + "a " * 300) == ("a " * 128)[:255].rstrip()


def test_normalize_subject_is_linear_on_long_whitespace():
    started = time.perf_counter()
    assert normalize_subject(" " * 200_000 + "x (fwd)  ") == "x"
    assert normalize_subject("Re: " * 50_000 + "Offer") == "offer"
    assert time.perf_counter() - started < 1.0


def test_a_bracket_followed_by_blanks_and_no_close_is_read_in_linear_time():
    """The id pattern backtracked cubically: 4,000 blanks took 16 s, a crafted header's 256 KB hours."""
    started = time.perf_counter()
    raw = (b"From: a@customer.example\r\nMessage-ID: <m@x>\r\nIn-Reply-To: <" + b" " * 200_000 + b"x\r\n"
           b"References: < a@b >  <c\r\n @d> <\r\n\r\nHi.\r\n")
    parsed = parse_email(raw)
    assert time.perf_counter() - started < 1.0
    assert (parsed.in_reply_to, parsed.references) == ((), ("a@b", "c@d"))


def test_a_long_references_header_keeps_the_threads_root():
    ids = [f"<{n}@thread.example>" for n in range(61)]
    parsed = parse_email(("From: a@customer.example\r\nReferences: " + " ".join(ids) + "\r\n\r\nHi.\r\n").encode())
    assert len(parsed.references) == 50
    assert parsed.references[0] == "0@thread.example" and parsed.references[-1] == "60@thread.example"
    assert parsed.references[1] == "12@thread.example"


def test_overlong_tracking_token_is_no_token():
    settings = CorrelationSettings()
    assert find_tracking_token("RE: CRM:" + "1" * 20, settings) == "CRM:" + "1" * 20
    assert find_tracking_token("RE: CRM:" + "1" * 21, settings) is None
    assert find_tracking_token("RE: CRM:" + "\u0661" * 3000, settings) is None  # Arabic-Indic digits: 2 bytes each


def test_message_ids_too_long_in_bytes_are_dropped():
    wide = _random_cjk(900) + "@h"
    raw = (f"Message-ID: <{wide}>\r\nIn-Reply-To: <{wide}>\r\nReferences: <ok@h> <{wide}>\r\n\r\n").encode()
    parsed = parse_email(raw)
    assert parsed.message_id is None and "invalid_message_id" in parsed.defects
    assert parsed.in_reply_to == () and parsed.references == ("ok@h",)
    assert parse_email(raw, generate_missing_id=True).message_id == mime.message_key(raw)
    assert all(len(i.encode()) <= mime.MAX_ID_LENGTH for i in (*parsed.in_reply_to, *parsed.references))


def test_thread_root_is_bounded():
    raw = b"Thread-Index: " + b"A" * 200_000 + b"\r\n\r\n"
    assert len(parse_email(raw).thread_root) == 32  # 22 bytes, base64


def test_one_generated_id_for_ingest_and_evaluate():
    assert generated_message_id is mime.generated_message_id
