"""``elasticep bench bus`` runs end to end in its tiny mode and writes every JSON key the issue names.

Figures are not asserted here (timing belongs to the benchmark, not the test suite).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

KEYS = (
    "elasticep_p50_us",
    "elasticep_p99_us",
    "raw_zmq_p50_us",
    "raw_zmq_p99_us",
    "elasticep_events_per_s",
    "raw_zmq_events_per_s",
)


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_bench_bus_tiny_writes_json(tmp_path: Path):
    out = tmp_path / "bus.json"
    proc = subprocess.run(
        [sys.executable, "-m", "elasticep", "bench", "bus", "--tiny", "--json", str(out)],
        capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(figures[key], float) and math.isfinite(figures[key]) and figures[key] > 0, key
    assert figures["elasticep"]["latency_samples"] == figures["latency_samples"]
    assert figures["raw_zmq"]["latency_samples"] == figures["latency_samples"]
    assert figures["elasticep"]["throughput_received"] + figures["elasticep"]["lost_in_gaps"] >= 1
    assert "elasticep" in proc.stdout and "raw_zmq" in proc.stdout
    # The explanatory baselines ran too, in the same alternating rounds, on the same loop.
    for name in ("raw_zmq_asyncio", "curve_task_floor"):
        assert figures[name]["latency_samples"] == figures["latency_samples"], name
        assert math.isfinite(figures[f"{name}_p50_us"]) and figures[f"{name}_p50_us"] > 0, name
    assert figures["event_loop"] in ("uvloop", "asyncio") and figures["rounds"] == 3
