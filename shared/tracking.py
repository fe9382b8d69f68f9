"""The tracking token: a number in the subject of outgoing email that ties replies to it.

Format, as in the reference: the organization's prefix then the number zero-padded to its digit
count, e.g. ``CRM:0001234``.  Numbers come from the ``tracking_token_seq`` sequence, so tokens are
unique across the installation.  Dispatch makes tokens; evaluate finds them in reply subjects
("RE: Invoice CRM:0001234"), tolerating one space after the prefix and any letter case, as mail
clients and people rewrite subjects.

Also the subject's normalised form, smart matching's key: dispatch records sent mail under it and
evaluate looks replies up by it, so both use this one function.
"""
from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=64)
def token_pattern(prefix: str, digits: int) -> re.Pattern[str]:
    # The prefix must not be glued to a preceding word ("XCRM:..."); the number must be whole
    # and at least `digits` long (a number that outgrew its padding is still found).
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(prefix)}\s?(\d{{{digits},}})(?!\d)", re.IGNORECASE)


def make_tracking_token(number: int, prefix: str, digits: int) -> str:
    """``make_tracking_token(1234, "CRM:", 7) == "CRM:0001234"``."""
    if number < 0:
        raise ValueError("tracking token numbers are not negative")
    if not prefix:
        raise ValueError("a tracking token needs a prefix")
    return f"{prefix}{number:0{digits}d}"


def find_tracking_token(subject: str, prefix: str, digits: int) -> str | None:
    """The token in ``subject`` in canonical form (the configured prefix, no space), or None."""
    if not prefix or not subject:
        return None
    match = token_pattern(prefix, digits).search(subject)
    return prefix + match.group(1) if match else None


def subject_with_token(subject: str, token: str) -> str:
    """The subject an outgoing email carries: the token appended, as the reference does."""
    subject = subject.rstrip()
    return f"{subject} {token}" if subject else token


# --------------------------------------------------------------------------------------------
# Subject normalisation (smart matching key)

# Reply and forward markers of the common mail clients and languages, with optional counters
# ("Re[2]:", "AW(3):"), plus bracketed tags that gateways and lists prepend ("[EXTERNAL]").  A tag
# with a digit in it ("[Ticket #1001]", "[Bug 4711]") names the conversation and is kept: two tickets
# with one title are two threads.  Used with ``match`` from a position (hence no ``^``), so stripping
# many markers costs one pass.
_SUBJECT_PREFIX = re.compile(
    r"\s*(?:"
    r"(?:re|fw|fwd|aw|wg|sv|vs|vb|antw|antwort|tr|rif|r|ref|res|enc|odp|pd|vl|ynt|ilt|ats|atb|"
    r"bls|yan|doorst|rv|"
    r"回复|答复|转发|回覆|轉寄|返信|転送)"
    r"\s*(?:\[\d+\]|\(\d+\))?\s*[:：]"
    r"|\[[^\[\]0-9]{0,64}\]"
    r")\s*",
    re.IGNORECASE,
)
_GENERIC_TOKEN = re.compile(r"(?<![A-Za-z0-9])CRM:\s?\d{4,}(?!\d)", re.IGNORECASE)


# The normalised subject is stored in an indexed column (and looked up by it), and PostgreSQL
# refuses a btree entry over 2,704 bytes: 255 characters are at most 1,020 bytes of UTF-8, and more
# than enough to tell two conversations apart.
MAX_NORMALIZED_SUBJECT = 255


def normalize_subject(subject: str, prefix: str | None = None, digits: int = 0) -> str:
    """The subject with reply/forward markers, tags and the tracking token removed, whitespace
    collapsed, case folded and cut to ``MAX_NORMALIZED_SUBJECT`` characters:
    ``"RE: [EXTERNAL] Fw: Offer  CRM:0001234"`` -> ``"offer"``.  The token is the organization's
    (``prefix`` and ``digits``), or without them any ``CRM:`` and digits.  Evaluate stores and looks
    up inbound mail by it, dispatch stores its sent mail by it: one function, so they meet.

    Linear in the subject's length: a subject is as long as the sender likes (up to the 256 KB
    header block the parser reads).
    """
    if prefix:
        subject = token_pattern(prefix, digits).sub(" ", subject)
    else:
        subject = _GENERIC_TOKEN.sub(" ", subject)
    start = 0
    while (marker := _SUBJECT_PREFIX.match(subject, start)) is not None and marker.end() > start:
        start = marker.end()
    # "(fwd)" at the end, found by hand: a pattern such as r"\s*\(fwd\)\s*$" is tried at every
    # offset and costs quadratic time on a long run of whitespace.
    subject = subject[start:].rstrip()
    tail = subject[-5:].lower()
    if tail.endswith("(fwd)"):
        subject = subject[:-5]
    elif tail.endswith("(fw)"):
        subject = subject[:-4]
    return " ".join(subject.split()).casefold()[:MAX_NORMALIZED_SUBJECT].rstrip()
