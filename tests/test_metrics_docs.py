"""docs/metrics.md lists every metric elasticep registers, and nothing it does not."""

from __future__ import annotations

import re
from pathlib import Path

import elasticep.metrics as m

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def _base(name: str) -> str:
    # prometheus-client describes a counter by its name without the _total suffix
    return name[: -len("_total")] if name.endswith("_total") else name


def test_metrics_page_lists_every_metric() -> None:
    registered = {metric.name for c in m.REGISTRY._collector_to_names for metric in c.describe()}
    documented = {_base(n) for n in re.findall(r"`(elasticep_[a-z_]+)`", DOC.read_text())}
    assert registered, "no metrics registered"
    assert registered - documented == set(), f"undocumented: {sorted(registered - documented)}"
    assert documented - registered == set(), f"documented but not registered: {sorted(documented - registered)}"
