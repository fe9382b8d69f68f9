"""Validated field types shared by the event payloads.

Anything that may end up in a mail header is refused if it holds CR or LF, so no input can inject
a header, whatever later code does with it.
"""
from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

_ADDRESS = re.compile(r"^[^@\s<>()\[\],;:\"\\]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*$")


def _no_line_breaks(value: str) -> str:
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError("must not contain CR, LF or NUL (header injection)")
    return value


def _email_address(value: str) -> str:
    value = _no_line_breaks(value.strip())
    if len(value) > 254 or not _ADDRESS.match(value):
        raise ValueError(f"not a valid email address: {value[:80]!r}")
    local, domain = value.rsplit("@", 1)
    return f"{local}@{domain.lower()}"


# The published JSON Schemas say what the validators enforce, so a producer that checks against
# them learns of a refusal before it publishes (the patterns only describe; the validators decide).
ONE_LINE = {"pattern": "^[^\\r\\n\\u0000]*$"}
EmailAddress = Annotated[str, AfterValidator(_email_address),
                         Field(max_length=254, examples=["alice@example.com"],
                               json_schema_extra={"pattern": "^[^@\\s<>()\\[\\],;:\"\\\\]{1,64}@[A-Za-z0-9.-]+$"})]
HeaderText = Annotated[str, AfterValidator(_no_line_breaks), Field(json_schema_extra=ONE_LINE)]


def is_email_address(value: str) -> bool:
    try:
        _email_address(value)
    except ValueError:
        return False
    return True
