"""``elasticep bench overhead`` runs both modes end to end and writes the keys the docs promise
(no timing asserted: the figures go in docs/benchmarks.md, measured in one run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from elasticep.errors import InvalidArgument

pytestmark = [pytest.mark.multiproc]


@pytest.mark.timeout(240)
def test_bench_overhead_runs_both_modes(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    proc = subprocess.run(
        [sys.executable, "-m", "elasticep.cli", "bench", "overhead", "--rounds", "1", "--steps", "10",
         "--warmup", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=230,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ("tokens_per_s_on", "tokens_per_s_off", "step_p99_us_on", "step_p99_us_off",
                "step_p50_us_on", "step_p50_us_off", "throughput_ratio", "p99_ratio",
                "tokens_per_cpu_s_on", "tokens_per_cpu_s_off", "cpu_per_token_ratio"):
        assert r[key] > 0, key
    assert isinstance(r["meets_target"], bool)
    assert len(r["rounds_tokens_per_s_on"]) == len(r["rounds_tokens_per_s_off"]) == 1
    assert r["agent_members_on"] == [[0, 1], [0, 1]]  # the agent really ran in the on mode
    assert r["agent_members_off"] == [[], []]  # and not in the off mode
    assert all(n > 0 for n in r["backup_experts"])  # backups held while serving


def test_bad_arguments_are_refused() -> None:
    from elasticep.bench.overhead import run

    with pytest.raises(InvalidArgument):
        run(ranks=1)
    with pytest.raises(InvalidArgument):
        run(steps=3)
