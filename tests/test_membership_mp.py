"""Real rank processes on loopback: ZeroMQ bus with CURVE, a TCPStore hosted by the test process
(as a launcher hosts it), SIGKILL and SIGSTOP. Every survivor must install the identical sequence
of views (invariant 1)."""

from __future__ import annotations

import pytest

from elasticep.membership.local_cluster import LocalCluster

pytestmark = [pytest.mark.multiproc]

WORLD = 4
START_TIMEOUT = 90.0  # four processes importing torch on two cores


def _identical(cluster: LocalCluster, ranks: list[int]) -> list[tuple[int, tuple[int, ...]]]:
    seqs = cluster.sequences(ranks)
    first = seqs[ranks[0]]
    for r in ranks[1:]:
        assert seqs[r] == first, f"rank {r} installed {seqs[r]}, rank {ranks[0]} installed {first}"
    return first


@pytest.mark.timeout(150)
def test_sigkill_one_rank_then_the_leader() -> None:
    with LocalCluster(WORLD) as cluster:
        cluster.wait_ready(START_TIMEOUT)
        cluster.wait_view(lambda v: v["epoch"] == 1, 10)
        cluster.kill(2)
        got = cluster.wait_view(lambda v: 2 not in v["members"], 5, ranks=[0, 1, 3])
        assert {tuple(v["members"]) for v in got.values()} == {(0, 1, 3)}
        cluster.kill(0)
        got = cluster.wait_view(lambda v: 0 not in v["members"], 5, ranks=[1, 3])
        assert {tuple(v["members"]) for v in got.values()} == {(1, 3)}
        seq = _identical(cluster, [1, 3])
        assert seq == [(1, (0, 1, 2, 3)), (2, (0, 1, 3)), (3, (1, 3))]
        # The new leader's view says why: a certain signal (exit or closed socket), not silence.
        reason = cluster.installs(1)[-1]["reason"]
        assert "exit" in reason or "disconnect" in reason, reason


@pytest.mark.timeout(150)
def test_sigstop_past_grace_evicts_and_the_sleeper_fences_itself() -> None:
    with LocalCluster(WORLD) as cluster:
        cluster.wait_ready(START_TIMEOUT)
        cluster.wait_view(lambda v: v["epoch"] == 1, 10)
        cluster.stop(3)
        got = cluster.wait_view(lambda v: 3 not in v["members"], 5, ranks=[0, 1, 2])
        assert {tuple(v["members"]) for v in got.values()} == {(0, 1, 2)}
        assert "heartbeat" in got[0]["reason"]
        cluster.cont(3)
        fenced = cluster.wait_report(3, "fenced", 10)
        assert "outside committed view 2" in fenced["reason"]
        assert _identical(cluster, [0, 1, 2]) == [(1, (0, 1, 2, 3)), (2, (0, 1, 2))]
        assert cluster.sequences([3])[3] == [(1, (0, 1, 2, 3))]


@pytest.mark.timeout(150)
def test_restarted_rank_rejoins_and_a_rank_leaves_gracefully() -> None:
    with LocalCluster(WORLD) as cluster:
        cluster.wait_ready(START_TIMEOUT)
        cluster.kill(1)
        cluster.wait_view(lambda v: 1 not in v["members"], 5, ranks=[0, 2, 3])
        cluster.restart(1)
        cluster.wait_view(lambda v: v["members"] == [0, 1, 2, 3] and v["epoch"] > 1, 60, ranks=[0, 1, 2, 3])
        cluster.send(2, "leave")
        left = cluster.wait_report(2, "left", 10)
        assert 2 not in left["members"]
        cluster.wait_view(lambda v: v["members"] == [0, 1, 3], 5, ranks=[0, 1, 3])
        seq = _identical(cluster, [0, 3])
        assert seq == [(1, (0, 1, 2, 3)), (2, (0, 2, 3)), (3, (0, 1, 2, 3)), (4, (0, 1, 3))]
        assert cluster.sequences([1])[1] == [(3, (0, 1, 2, 3)), (4, (0, 1, 3))]
