"""Evaluate's address caches stay small whatever senders write: a cache bounded only by its number
of entries, keyed by whole header values, held ~400 MiB after 1,024 distinct 64 KiB Cc lists (a
review's tracemalloc measurement), past the 512 Mi a pod may use.  Long values are read each time,
not kept; the results are the same."""
from __future__ import annotations

from services.evaluate import parsing


def _long_cc(i: int) -> str:
    return ", ".join(f'"Person {i}-{j}" <p{i}x{j}@customer{j % 50}.example>' for j in range(300))


def test_long_address_lists_are_read_but_not_kept() -> None:
    parsing._cached_address_value.cache_clear()
    parsing._normalize_email_address.cache_clear()
    for i in range(50):
        defects: list[str] = []
        found = parsing._addresses([_long_cc(i)], "cc", defects)
        assert len(found) == 300 and not defects
        assert found[0].email == f"p{i}x0@customer0.example" and found[0].name == f"Person {i}-0"
    assert parsing._cached_address_value.cache_info().currsize == 0
    # A short value, the usual To: or From:, is kept and read once.
    for _ in range(3):
        parsing._addresses(["Ann <ann@example.com>"], "to", [])
    info = parsing._cached_address_value.cache_info()
    assert (info.currsize, info.hits) == (1, 2)


def test_what_the_caches_may_hold_is_bounded_in_bytes() -> None:
    value_bytes = parsing._VALUE_CACHE_SIZE * parsing.CACHED_VALUE_LENGTH
    assert value_bytes <= 4 * 2**20
    parsing._normalize_email_address.cache_clear()
    assert parsing.normalize_email_address("x" * 70_000 + "@example.com") is None
    assert parsing._normalize_email_address.cache_info().currsize == 0   # never looked at, never kept
    assert parsing.normalize_email_address("  Ann@Example.COM ") == "ann@example.com"
