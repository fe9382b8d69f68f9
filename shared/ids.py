"""Random (version 4) UUIDs drawn from the system's CSPRNG in blocks, for hot paths.

``uuid4()`` makes one system call per id and its ``str`` costs more again: dispatch makes six ids
per send (a ledger row, an activity, four events) and ingest one event id per message.  Reading
256 ids' worth of ``os.urandom`` at a time makes an id well under a microsecond.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from uuid import UUID

_IDS_PER_DRAW = 256
# uuid4's variant bits: the nibble after the third dash is 10xx.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


class _RandomIds:
    """``new_id()``: a ``UUID`` object, as ``uuid4()`` gives."""

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def __call__(self) -> UUID:
        if self._at >= len(self._pool):
            self._pool, self._at = os.urandom(16 * _IDS_PER_DRAW), 0
        raw = self._pool[self._at:self._at + 16]
        self._at += 16
        return UUID(bytes=raw, version=4)


new_id = _RandomIds()


def id_texts() -> Iterator[str]:
    """Ids as text, exactly as ``str(uuid4())`` gives them (for JSON written by hand)."""
    while True:
        digits = os.urandom(16 * _IDS_PER_DRAW).hex()
        for at in range(0, len(digits), 32):
            d = digits[at:at + 32]
            yield f"{d[:8]}-{d[8:12]}-4{d[13:16]}-{_VARIANT[d[16]]}{d[17:20]}-{d[20:]}"
