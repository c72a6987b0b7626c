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
def test_bench_scale_config_applies_to_both_topologies_and_bad_fields_are_refused(capsys) -> None:
    assert cli_main(["bench", "scale", "--ranks", "12", "--real-max", "0", "--soak-s", "0.5", "--trials", "1",
                     "--config", "heartbeat_interval_ms=100", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["config"] for r in records] == [{"heartbeat_interval_ms": 100.0}] * 2
    all_, ring = records
    assert all_["msgs_per_rank_per_s"] == pytest.approx(11 * 10, rel=0.1)  # 10 heartbeats a second
    assert ring["msgs_per_rank_per_s"] == pytest.approx(4 * 10, rel=0.1)
    for bad in ("no_such_field=1", "heartbeat_interval_ms=fast", "grace_ms=1"):  # the last: below min_suspect_ms
        with pytest.raises(SystemExit) as exc:
            cli_main(["bench", "scale", "--ranks", "12", "--real-max", "0", "--config", bad])
        assert exc.value.code == 2, bad


def test_sim_ring_with_a_pushing_store_reaches_every_rank_in_one_store_round_trip() -> None:
    # The ranks beside a killed one propose; the ranks across the ring hear none of them on the
    # bus, yet install the view one store operation after the commit (the store's push).
    sim = SimCluster(64, Config.local(detection_topology="ring"), seed=2, store_ms=0.5)
    assert sim.run_until(lambda: sim.all_members(64), limit_s=2.0)
    sim.run_for(0.3)
    start = sim.now
    sim.kill(5)
    assert sim.run_until(lambda: sim.all_exclude(5), limit_s=1.0)
    latest = max(sim.installed_without(5).values()) - start
    polled = SimCluster(64, Config.local(detection_topology="ring"), seed=2, store_ms=0.5, pushes=False)
    assert polled.run_until(lambda: polled.all_members(64), limit_s=2.0)
    polled.run_for(0.3)
    start = polled.now
    polled.kill(5)
    assert polled.run_until(lambda: polled.all_exclude(5), limit_s=1.0)
    assert latest < 0.01 < max(polled.installed_without(5).values()) - start  # vs up to one store_poll_ms


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
