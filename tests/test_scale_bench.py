"""``elasticep bench scale`` at a tiny size, and the simulated cluster behind it."""

from __future__ import annotations

import json

import pytest

from elasticep.cli import main as cli_main
from elasticep.config import Config
from elasticep.testing.scale import SimCluster


@pytest.mark.timeout(60)
def test_bench_scale_tiny_json(capsys) -> None:
    assert cli_main(["bench", "scale", "--ranks", "12", "--real-max", "0", "--soak-s", "0.5", "--trials", "1",
                     "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["ranks"], r["topology"]) for r in records] == [(12, "all"), (12, "ring")]
    for r in records:
        assert r["mode"] == "simulated"
        for key in ("kill_to_view_p99_ms", "hang_to_view_p99_ms", "msgs_per_rank_per_s", "false_evictions", "join_all_s"):
            assert key in r
        assert r["false_evictions"] == 0
        assert 0 < r["kill_to_view_p99_ms"] < r["hang_to_view_p99_ms"] < 1000
    all_, ring = records
    assert all_["msgs_per_rank_per_s"] == pytest.approx(11 * 25, rel=0.1)
    assert ring["msgs_per_rank_per_s"] == pytest.approx(4 * 25, rel=0.1)


@pytest.mark.timeout(60)
def test_sim_ring_keeps_one_view_sequence_everywhere() -> None:
    sim = SimCluster(40, Config.local(detection_topology="ring"), seed=5, loss=0.01)
    assert sim.run_until(lambda: sim.all_members(40), limit_s=2.0)
    sim.run_for(0.2)
    sim.hang(10)
    sim.kill(11)
    assert sim.run_until(lambda: sim.all_exclude(10) and sim.all_exclude(11), limit_s=3.0)
    seen: dict[int, tuple[int, ...]] = {}
    for installs in sim.installs.values():  # invariant 1: one member set per epoch
        for _, view in installs:
            assert seen.setdefault(view.epoch, view.members) == view.members
    assert sim.evicted() == {10, 11}
