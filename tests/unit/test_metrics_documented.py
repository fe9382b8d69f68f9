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
