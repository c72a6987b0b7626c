"""The reconfiguration pipeline: phases in order, commit barrier, supersession, the epoch fence.

The planner is the real one, the barrier runs on a real TCPStore, phase events travel on the
real in-process bus; the engine is a minimal application that records what it is told to commit.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from elasticep import metrics
from elasticep.bus import EventBus, InProcessNetwork
from elasticep.eplb.placement import Placement, RedundancyExhausted
from elasticep.eplb.planner import initial, replan
from elasticep.events import ReconfigPhase
from elasticep.membership.view import View
from elasticep.reconfig import (
    CommitTimeout,
    EpochFence,
    ReconfigPipeline,
    StaleEpoch,
    StoreBarrier,
)

LAYERS, EXPERTS, RANKS, SLOTS = 2, 8, 4, 3


def _load() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(LAYERS, EXPERTS, generator=g) + 0.1


@dataclass
class ServingEngine:
    """The application side of the pipeline: serves ``placement`` and swaps it on commit."""

    placement: Placement
    epoch: int = 1
    commits: list[tuple[int, Placement, Any]] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)

    def current_placement(self) -> Placement:
        return self.placement

    def commit(self, epoch: int, plan: Any, staged: Any, group: Any) -> None:
        self.placement = plan.placement
        self.epoch = epoch
        self.commits.append((epoch, plan.placement, staged))

    def resume(self, epoch: int) -> None:
        self.resumed.append(epoch)


def _planner(view: View, current: Placement) -> Any:
    alive = torch.zeros(current.num_ranks, dtype=torch.bool)
    alive[list(view.members)] = True
    return replan(current, _load(), alive)


class StagedMoves:
    """Stages the plan's moves as (layer, slot, expert) triples; optionally waits on a gate."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.gate = gate

    async def stage(self, plan: Any, epoch: int) -> list[tuple[int, int, int]]:
        if self.gate is not None:
            await self.gate.wait()
        return [(m.layer, m.slot, m.expert) for m in plan.moves]


def test_fence_refuses_and_counts_old_epochs() -> None:
    fence = EpochFence(3)
    before = metrics.sample("elasticep_stale_epoch_refused_total", {"channel": "dispatch"})
    assert fence.admits(3, "dispatch") and fence.admits(4, "dispatch")
    assert not fence.admits(2, "dispatch")
    with pytest.raises(StaleEpoch, match="epoch 1 is older than the installed epoch 3"):
        fence.check(1, "dispatch")
    assert metrics.sample("elasticep_stale_epoch_refused_total", {"channel": "dispatch"}) == before + 2
    with pytest.raises(StaleEpoch):
        fence.advance(2)  # epochs never go back
    fence.advance(5)
    assert fence.epoch == 5


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_pipeline_commits_and_publishes_phases_in_order() -> None:
    net = InProcessNetwork(seed=0)
    bus = EventBus(net.transport(0), rank=0)
    await bus.start()
    try:
        sub = bus.subscribe(ReconfigPhase)
        engine = ServingEngine(initial(_load(), RANKS, SLOTS))
        pipeline = ReconfigPipeline(
            0,
            planner=_planner,
            engine=engine,
            weights=StagedMoves(),
            publish=bus.publish,
        )
        view = View.of(2, [0, 1, 3], reason="rank 2 exited")
        result = await pipeline.run(view)
        assert result.status == "committed", result.error
        assert pipeline.fence.epoch == 2 and engine.epoch == 2 and engine.resumed == [2]
        new = engine.placement
        assert (new.phy2log[:, 2 * SLOTS : 3 * SLOTS] == -1).all()  # the dead rank's slots are empty
        assert not new.missing([True, True, False, True]).any()  # every expert has a live replica
        assert engine.commits[0][2] == [(m.layer, m.slot, m.expert) for m in result.plan.moves]
        seen = []
        while True:
            try:
                seen.append(sub.receive_nowait().event)
            except Exception:
                break
        assert [(e.phase, e.status) for e in seen] == [
            (p, s) for p in ("plan", "groups", "weights", "commit", "resume") for s in ("start", "end")
        ]
        assert all(e.epoch == 2 and e.rank == 0 for e in seen)
        assert set(result.timeline()) == {"plan", "groups", "weights", "commit", "resume"}
    finally:
        await bus.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_newer_view_abandons_the_running_pipeline_and_applies_nothing() -> None:
    gate = asyncio.Event()
    engine = ServingEngine(initial(_load(), RANKS, SLOTS))
    before = engine.placement
    pipeline = ReconfigPipeline(0, planner=_planner, engine=engine, weights=StagedMoves(gate))
    running = asyncio.create_task(pipeline.run(View.of(2, [0, 1, 3])))
    await asyncio.sleep(0.05)  # the pipeline is now blocked in its weights phase
    pipeline.supersede(3)
    result = await asyncio.wait_for(running, 5)
    assert result.status == "abandoned"
    assert [p.status for p in result.phases][-1] == "abandoned"
    assert engine.commits == [] and engine.placement == before and pipeline.fence.epoch == 0
    # the newer view then commits normally
    gate.set()
    result3 = await pipeline.run(View.of(3, [0, 1, 2]))
    assert result3.status == "committed", result3.error
    assert engine.epoch == 3 and pipeline.fence.epoch == 3


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_all_members_commit_together_through_the_store_barrier(tcp_store) -> None:
    engines = {r: ServingEngine(initial(_load(), RANKS, SLOTS)) for r in (0, 1, 3)}
    pipelines = {
        r: ReconfigPipeline(r, planner=_planner, engine=e, barrier=StoreBarrier(tcp_store, r, prefix="t3/"))
        for r, e in engines.items()
    }
    view = View.of(2, [0, 1, 3])
    results = await asyncio.gather(*(p.run(view) for p in pipelines.values()))
    assert [r.status for r in results] == ["committed"] * 3
    placements = [e.placement for e in engines.values()]
    assert placements[0] == placements[1] == placements[2]  # one plan everywhere


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_missing_member_times_out_the_commit_and_nothing_is_applied(tcp_store) -> None:
    engine = ServingEngine(initial(_load(), RANKS, SLOTS))
    pipeline = ReconfigPipeline(
        0,
        planner=_planner,
        engine=engine,
        barrier=StoreBarrier(tcp_store, 0, prefix="t4/"),
        commit_timeout_s=0.2,
    )
    result = await pipeline.run(View.of(2, [0, 1, 3]))
    assert result.status == "failed"
    assert isinstance(result.error, CommitTimeout) and result.error.missing == (1, 3)
    assert engine.commits == [] and pipeline.fence.epoch == 0


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_redundancy_exhausted_fails_loudly_and_applies_nothing() -> None:
    engine = ServingEngine(initial(_load(), RANKS, SLOTS))
    pipeline = ReconfigPipeline(0, planner=_planner, engine=engine)
    before = metrics.sample("elasticep_redundancy_exhausted_total")
    result = await pipeline.run(View.of(2, [0, 1]))  # 6 live slots for 8 experts
    assert result.status == "failed"
    assert isinstance(result.error, RedundancyExhausted)
    assert (result.error.needed, result.error.live) == (8, 6)
    assert metrics.sample("elasticep_redundancy_exhausted_total") == before + 1
    assert engine.commits == [] and engine.resumed == []
