"""Every metric Conduit exports is listed in docs/operations.md, and nothing listed there is gone."""
from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import Metric

import shared.metrics as metrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_every_metric_is_documented_and_every_documented_one_exists() -> None:
    exported = set()
    for value in vars(metrics).values():
        collect = getattr(value, "collect", None)
        if collect is not None and hasattr(value, "_name"):
            metric: Metric = next(iter(collect()))
            exported.add(metric.name + ("_total" if metric.type == "counter" else ""))
    documented = set(re.findall(r"^\| `(conduit_[a-z_]+)` \|", DOC.read_text(), flags=re.M))
    assert exported and exported == documented


def test_every_metric_is_set_somewhere() -> None:
    """A metric defined and documented but never set is an empty dashboard (two were, found by an
    operator audit): each one's name appears in the code outside shared/metrics.py."""
    root = DOC.parents[1]
    code = "\n".join(p.read_text() for folder in ("services", "shared", "conduit")
                     for p in (root / folder).rglob("*.py") if p != root / "shared" / "metrics.py")
    names = [name for name, value in vars(metrics).items() if hasattr(value, "collect") and hasattr(value, "_name")]
    assert names and [n for n in names if not re.search(rf"\b{n}\b", code)] == []
