"""The tracking token: a number in the subject of outgoing email that ties replies to it.

Format, as in the reference: the organization's prefix then the number zero-padded to its digit
count, e.g. ``CRM:0001234``.  Numbers come from the ``tracking_token_seq`` sequence, so tokens are
unique across the installation.  Dispatch makes tokens; evaluate finds them in reply subjects
("RE: Invoice CRM:0001234"), tolerating one space after the prefix and any letter case, as mail
clients and people rewrite subjects.
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


def subject_without_token(subject: str, prefix: str, digits: int) -> str:
    return " ".join(token_pattern(prefix, digits).sub(" ", subject).split()) if prefix else " ".join(subject.split())
