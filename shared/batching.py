"""Splitting a batch by the bytes it stands for, so memory stays bounded whatever the messages weigh."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def by_size(items: Sequence[T], size: Callable[[T], int], budget: int) -> list[list[T]]:
    """``items`` in order, in parts of at most ``budget`` bytes each (a larger item is a part alone)."""
    parts: list[list[T]] = [[]]
    total = 0
    for item in items:
        if parts[-1] and total + size(item) > budget:
            parts.append([])
            total = 0
        parts[-1].append(item)
        total += size(item)
    return parts
