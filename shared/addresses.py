"""Splitting an address-list header field (From, To, Cc, ...) into (display name, address) pairs.

The one place both evaluate (every party of a message) and ingest (who forwarded a message to a
forward mailbox) read addresses, so the two never disagree.  The usual shapes (``a@b``,
``Name <a@b>``, ``"Last, First" <a@b>``) are split by a regular expression; anything else
(comments, groups, broken lists) goes to ``email.utils.getaddresses``, with two corrections:

- **The same answer on every Python patch release.**  Python 3.11.10, 3.12.6 and 3.13 made
  ``getaddresses`` strict by default (CVE-2023-27043): a list it finds ambiguous, such as Outlook's
  ``"Smith, Bob" <bob@x.example>; "Ann" <ann@y.example>``, then yields no address at all, silently.
  The production image takes the newest 3.11, the test machines may run an older one: the lenient
  reading is asked for where the parameter exists, so both read mail alike.
- **No address out of a display name.**  The lenient reading takes ``"ceo@example.com"`` (a quoted
  display name and no address) as the address ceo@example.com, which the strict reading and
  ``email.policy.default`` do not: a sender could pose as anyone.  An address that appears only
  inside quotes or comments is returned as a display name without an address.
"""
from __future__ import annotations

import inspect
import re
from email.utils import getaddresses

_ADDR_SPEC = r"[^<>\s\"(),;:\\@\[\]]+@[^<>\s\"(),;:\\@]+"
_SIMPLE_ADDRESS = re.compile(
    rf'(?:"((?:[^"\\]|\\.)*)"|([^"<>,;:()\\]*?))\s*<\s*({_ADDR_SPEC})\s*>|({_ADDR_SPEC})'
)
_COMMA_OUTSIDE_QUOTES = re.compile(r'(?:"(?:[^"\\]|\\.)*"|[^,"])+')
_QUOTED_PAIR = re.compile(r"\\(.)")
_LENIENT = {"strict": False} if "strict" in inspect.signature(getaddresses).parameters else {}


def address_pairs(value: str) -> list[tuple[str, str]]:
    """(display name, address) pairs of one unfolded field value; ("", "") or (name, "") for what
    holds no address.  Raises what ``getaddresses`` raises on hostile input (RecursionError on
    nested comments): the callers decide what that means."""
    pairs = _pairs_fast(value)
    if pairs is not None:
        return pairs
    pairs = getaddresses([value], **_LENIENT)
    if '"' not in value and "(" not in value:
        return pairs
    bare = _bare(value)
    return [(name, address) if "@" not in address or "".join(address.split()).lower() in bare
            else (address, "") for name, address in pairs]   # a name holding "@": an invalid address


def _bare(value: str) -> str:
    """The value without its quoted strings, comments and white space, lower-cased: where an address
    the lenient parser found must be, as it joined it (it drops the spaces and comments between an
    address's parts).  One pass, whatever the nesting of comments."""
    kept: list[str] = []
    depth, quoted, escaped = 0, False, False
    for c in value:
        if escaped:
            escaped = False
        elif c == "\\" and (quoted or depth):
            escaped = True
        elif quoted:
            quoted = c != '"'
        elif depth:
            depth += {"(": 1, ")": -1}.get(c, 0)
        elif c == '"':
            quoted = True
        elif c == "(":
            depth = 1
        elif not c.isspace():
            kept.append(c)
    return "".join(kept).lower()


def _pairs_fast(value: str) -> list[tuple[str, str]] | None:
    """Split the common shapes (``a@b``, ``Name <a@b>``, ``"Last, First" <a@b>``) quickly; None for
    anything else."""
    if "(" in value or ":" in value:  # comments and groups: leave them to the stdlib
        return None
    pairs = []
    for item in _COMMA_OUTSIDE_QUOTES.findall(value):
        item = item.strip()
        if not item:
            continue
        m = _SIMPLE_ADDRESS.fullmatch(item)
        if m is None:
            return None
        quoted, plain, bracketed, bare = m.groups()
        if bare is not None:
            pairs.append(("", bare))
        elif quoted is not None:
            pairs.append((_QUOTED_PAIR.sub(r"\1", quoted), bracketed))
        else:
            pairs.append((plain.strip(), bracketed))
    return pairs
