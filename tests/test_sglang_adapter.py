"""The SGLang adapter against the real sglang package, on CPU.

SGLang's EPLB algorithms, ``ExpertLocationMetadata`` and its helpers, ``ElasticEPStateManager``
and ``maybe_rebalance_after_rank_fault`` run here as shipped. What cannot run on CPU is a server
(CUDA kernels, Mooncake EP): ``sglang_cpu_runtime`` publishes the configuration a server would.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import elasticep_sglang  # noqa: F401
except ImportError:  # an editable install made before adapters/ existed does not map it
    sys.path.insert(0, str(ROOT / "adapters"))

try:
    import sglang  # noqa: F401

    _SGLANG_MISSING = ""
except ImportError as exc:
    _SGLANG_MISSING = f"sglang is not importable ({exc}); install the sglang extra"

pytestmark = [pytest.mark.sglang, pytest.mark.skipif(bool(_SGLANG_MISSING), reason=_SGLANG_MISSING or "-")]

from elasticep import metrics  # noqa: E402
from elasticep.eplb.placement import EMPTY, Placement, RedundancyExhausted  # noqa: E402
from elasticep.membership import View  # noqa: E402


@pytest.fixture(autouse=True)
def _no_hooks_left():
    from elasticep_sglang import uninstall_hooks

    uninstall_hooks()
    yield
    uninstall_hooks()


def _sglang_rebalance(load, num_ranks, slots_per_rank, algorithm="elasticity_aware"):
    """SGLang's entry point, called the way ``ExpertLocationMetadata.init_by_eplb`` calls it."""
    from sglang.srt.eplb import eplb_algorithms

    return eplb_algorithms.rebalance_experts(
        tokens_per_expert=load,
        num_physical_experts=num_ranks * slots_per_rank,
        num_local_physical_experts=slots_per_rank,
        num_groups=None,
        num_nodes=1,
        algorithm=eplb_algorithms.compute_algorithm(raw_algorithm=algorithm, num_groups=None, num_nodes=1),
    )


def _load(layers, experts, seed=0):
    g = torch.Generator().manual_seed(seed)
    # skewed like real routing: a few hot experts per layer; [windows, layers, experts] as recorded
    return (torch.rand(2, layers, experts, generator=g) ** 4 * 1000).round()


def _metadata_from_eplb(phy2log, log2phy, ep_size):
    """What ``init_by_eplb`` builds from ``rebalance_experts``'s result."""
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    return ExpertLocationMetadata._init_raw(ep_size=ep_size, physical_to_logical_map=phy2log, logical_to_all_physical_map=log2phy)


# ------------------------------------------------------------------------------ version check


def test_version_check_accepts_the_supported_range_and_refuses_others(monkeypatch) -> None:
    from elasticep_sglang import SUPPORTED_SGLANG, UnsupportedSGLangVersion, check_sglang_version, install_hooks
    from elasticep_sglang import compat

    assert SUPPORTED_SGLANG == ">=0.5.23,<0.6"
    assert check_sglang_version() == sglang.__version__ == "0.5.23"
    for ok in ("0.5.23", "0.5.30", "0.5.23.post1", "0.5.23+cu130"):
        assert check_sglang_version(ok) == ok
    for bad in ("0.5.22", "0.6.0", "1.0.0", "0.4.9", "nightly"):
        with pytest.raises(UnsupportedSGLangVersion) as info:
            check_sglang_version(bad)
        assert info.value.found == bad and ">=0.5.23,<0.6" in str(info.value)

    # an unsupported installed release: nothing is patched, the error is typed
    monkeypatch.setattr(compat.metadata, "version", lambda name: "0.6.1")
    from sglang.srt.eplb import eplb_algorithms

    original = eplb_algorithms.rebalance_experts
    with pytest.raises(UnsupportedSGLangVersion):
        install_hooks()
    assert eplb_algorithms.rebalance_experts is original

    from elasticep_sglang.launch_server import main

    assert main(["--elasticep-dry-run", "--model-path", "dummy"]) == 2


# ------------------------------------------------------------------------------ conversion


def test_placement_converts_into_metadata_that_sglang_accepts_and_back() -> None:
    from sglang.srt.eplb.expert_location import (
        ExpertLocationMetadata,
        compute_logical_to_rank_dispatch_physical_map,
        format_expert_location_layout,
        format_expert_location_layout_diff,
    )

    from elasticep.eplb.planner import replan
    from elasticep_sglang import from_expert_location_metadata, logical_to_all_physical_map, to_expert_location_metadata
    from elasticep_sglang.testing import sglang_cpu_runtime

    L, E, R, S = 3, 16, 4, 6
    # an elasticep placement: replicas of the hottest experts, laid out rank by rank
    hot = torch.argsort(_load(L, E).sum(0), dim=1, descending=True)[:, : R * S - E]
    p = Placement(torch.cat([torch.arange(E).expand(L, E), hot], dim=1), S, E)

    with sglang_cpu_runtime(ep_size=R, num_redundant_experts=R * S - E, ep_dispatch_algorithm="static"):
        # SGLang's helper agrees with elasticep's own log2phy
        assert torch.equal(logical_to_all_physical_map(p), p.log2phy)

        for rank in range(R):
            meta = to_expert_location_metadata(p, moe_ep_rank=rank, narrow=False)
            assert isinstance(meta, ExpertLocationMetadata)
            assert (meta.num_layers, meta.num_physical_experts, meta.num_logical_experts) == (L, R * S, E)
            assert meta.num_local_physical_experts == S and meta.ep_size == R
            # the static dispatch map SGLang computed: every expert sent to a slot that holds it,
            # the rank's own copy when it has one
            dispatch = meta.logical_to_rank_dispatch_physical_map
            assert dispatch.shape == (L, E) and dispatch.dtype == torch.int64
            assert torch.equal(p.phy2log.gather(1, dispatch), torch.arange(E).expand(L, E))
            assert torch.equal(
                dispatch,
                compute_logical_to_rank_dispatch_physical_map(
                    logical_to_all_physical_map=meta.logical_to_all_physical_map, ep_size=R,
                    num_physical_experts=R * S, ep_rank=rank,
                ),
            )
            assert from_expert_location_metadata(meta) == p
            narrowed = to_expert_location_metadata(p, moe_ep_rank=rank)
            assert from_expert_location_metadata(narrowed, alive=[1] * R) == p

        layout = format_expert_location_layout(meta)
        for layer in range(L):
            chunks = " ".join(
                f"ep{r}=" + json.dumps(p.per_rank()[layer, r].tolist(), separators=(",", ":")) for r in range(R)
            )
            assert f"layer={layer}: {chunks}" in layout
        assert format_expert_location_layout_diff(meta, meta).startswith(f"changed_physical_slots=0/{L * R * S}")

        # a rank dies: the repaired placement has -1 on it; SGLang's map keeps an expert there
        alive = torch.tensor([True, True, False, True])
        repaired = replan(p, _load(L, E).sum(0), alive, max_moves=0).placement
        assert bool((repaired.per_rank()[:, 2] == EMPTY).all())
        meta_dead = to_expert_location_metadata(repaired, moe_ep_rank=0, narrow=False, fill=p.phy2log)
        assert not bool((meta_dead.physical_to_logical_map_cpu == EMPTY).any())
        assert torch.equal(meta_dead.physical_to_logical_map_cpu[:, 2 * S : 3 * S], p.phy2log[:, 2 * S : 3 * S])
        listed = meta_dead.logical_to_all_physical_map_cpu
        assert not bool(((listed >= 2 * S) & (listed < 3 * S)).any()), "a dead rank's slot is routable"
        assert not bool(((meta_dead.logical_to_rank_dispatch_physical_map // S) == 2).any())
        assert from_expert_location_metadata(meta_dead) == repaired
        narrowed_dead = to_expert_location_metadata(repaired, moe_ep_rank=3, fill=p.phy2log)
        assert from_expert_location_metadata(narrowed_dead, alive=alive) == repaired

        # SGLang's in-place update (what the expert location updater does) takes the new metadata
        meta0 = to_expert_location_metadata(p, moe_ep_rank=0, narrow=False)
        meta0.update(meta_dead, update_layer_ids=list(range(L)))
        assert from_expert_location_metadata(meta0) == repaired

        # a placement that leaves an expert uncovered is refused with the typed error
        assert p.masked(alive).missing().numel() > 0
        before = metrics.sample("elasticep_redundancy_exhausted_total")
        with pytest.raises(RedundancyExhausted):
            to_expert_location_metadata(p.masked(alive), moe_ep_rank=0)
        assert metrics.sample("elasticep_redundancy_exhausted_total") == before + 1


# ------------------------------------------------------------------------------ rebalance hook


@pytest.mark.timeout(120)
def test_rebalance_hook_with_a_dead_rank_moves_far_fewer_slots_than_elasticity_aware() -> None:
    from sglang.srt.eplb import eplb_algorithms

    from elasticep.eplb.planner import balance
    from elasticep_sglang import ElasticRebalance, changed_live_slots, from_expert_location_metadata, install_hooks
    from elasticep_sglang.testing import sglang_cpu_runtime

    # DeepSeek-V3's layer shape (256 experts, 288 slots over 32 ranks), 12 of its 58 layers
    L, E, R, S, dead = 12, 256, 32, 9, 5
    load = _load(L, E)
    with sglang_cpu_runtime(ep_size=R, num_redundant_experts=R * S - E, ep_dispatch_algorithm="dynamic") as rt:
        # the placement in force: SGLang's own EPLB with every rank alive
        meta0 = _metadata_from_eplb(*_sglang_rebalance(load, R, S)[:2], R)
        from sglang.srt.runtime_context import get_resources

        get_resources().expert_location_metadata = meta0
        old = meta0.physical_to_logical_map_cpu.clone()
        rt.state.active_ranks[dead] = 0  # what Mooncake EP's kernel (or the view feed) writes
        alive = rt.state.active_ranks != 0

        theirs = _sglang_rebalance(load, R, S)
        moved_theirs = changed_live_slots(old, theirs[0], alive, S)

        hooks = install_hooks()
        assert isinstance(eplb_algorithms.rebalance_experts, ElasticRebalance)
        phy2log, log2phy, logcnt = _sglang_rebalance(load, R, S)
        record = hooks.rebalance.records[-1]
        assert record.planner == "elasticep" and record.dead == (dead,)

        # what init_by_eplb hands to _init_raw and the updater: same shapes and dtypes as SGLang's
        assert phy2log.shape == theirs[0].shape == (L, R * S) and phy2log.dtype == theirs[0].dtype == torch.int64
        assert log2phy.dim() == 3 and log2phy.shape[:2] == (L, E) and log2phy.dtype == torch.int64
        assert logcnt.shape == theirs[2].shape == (L, E) and logcnt.dtype == torch.int64
        assert int(phy2log.min()) >= 0 and int(phy2log.max()) < E, "physical_to_logical_map must name an expert"
        valid = log2phy != EMPTY
        assert torch.equal(valid.sum(-1), logcnt) and bool((logcnt >= 1).all())
        assert not bool((valid & (log2phy // S == dead)).any()), "a dead rank's slot is listed for routing"
        assert bool((phy2log.gather(1, log2phy.clamp(min=0).view(L, -1)).view(L, E, -1) == torch.arange(E).view(1, E, 1))[valid].all())
        # the dead rank's slots read as unchanged to the updater
        assert torch.equal(phy2log[:, dead * S : (dead + 1) * S], old[:, dead * S : (dead + 1) * S])

        # init_by_eplb's next step accepts it, and it converts back to the planner's placement
        meta1 = _metadata_from_eplb(phy2log, log2phy, R)
        placement = from_expert_location_metadata(meta1)
        assert bool((placement.per_rank()[:, dead] == EMPTY).all())
        assert placement.missing().numel() == 0

        moved_ours = changed_live_slots(old, phy2log, alive, S)
        lost = int((Placement(old, S, E).masked(alive).logcnt == 0).sum())
        assert record.moved == moved_ours >= lost > 0
        live_slots = int(alive.sum()) * S * L
        assert moved_theirs > 0.8 * live_slots, "elasticity_aware re-plans (almost) everything"
        assert moved_ours * 5 < moved_theirs, (moved_ours, moved_theirs)
        w = load.sum(0)
        ours_balance = balance(placement, w, alive)
        theirs_balance = balance(Placement.from_sglang(theirs[0], theirs[1], slots_per_rank=S), w, alive)
        print(f"\n{L}x{E} experts, {R} ranks x {S} slots, rank {dead} dead: elasticity_aware changes "
              f"{moved_theirs}/{live_slots} live slots (balance {theirs_balance:.3f}); elasticep "
              f"{moved_ours} (lower bound {lost}, balance {ours_balance:.3f}) in {record.seconds * 1e3:.0f} ms")
        assert ours_balance < 1.25

        # every rank alive again: SGLang's own algorithm serves the periodic rebalance
        rt.state.active_ranks.fill_(1)
        assert torch.equal(_sglang_rebalance(load, R, S)[0], hooks.rebalance.fallback(
            tokens_per_expert=load, num_physical_experts=R * S, num_local_physical_experts=S, num_groups=None,
            num_nodes=1, algorithm=eplb_algorithms.EplbAlgorithm.elasticity_aware)[0])
        assert hooks.rebalance.records[-1].planner == "sglang"


def test_rebalance_hook_refuses_when_redundancy_is_exhausted() -> None:
    from elasticep_sglang import install_hooks
    from elasticep_sglang.testing import sglang_cpu_runtime

    L, E, R, S = 2, 16, 4, 5
    load = _load(L, E)
    with sglang_cpu_runtime(ep_size=R, num_redundant_experts=R * S - E, ep_dispatch_algorithm="dynamic") as rt:
        from sglang.srt.runtime_context import get_resources

        get_resources().expert_location_metadata = _metadata_from_eplb(*_sglang_rebalance(load, R, S)[:2], R)
        install_hooks()
        rt.state.active_ranks[1] = 0
        rt.state.active_ranks[2] = 0  # 10 live slots for 16 experts
        before = metrics.sample("elasticep_redundancy_exhausted_total")
        with pytest.raises(RedundancyExhausted) as info:
            _sglang_rebalance(load, R, S)
        assert info.value.needed == E and info.value.live == 2 * S
        assert metrics.sample("elasticep_redundancy_exhausted_total") == before + 1


# ------------------------------------------------------------------------------ views -> active ranks


class RecordingEPLBManager:
    """Stands in for SGLang's ``EPLBManager`` (whose construction needs a loaded model): its
    ``rebalance()`` generator computes the new placement with SGLang's entry point as the real
    one does, and records each call instead of moving GPU weights."""

    def __init__(self, num_ranks: int, slots_per_rank: int, load: torch.Tensor) -> None:
        self.num_ranks, self.slots_per_rank, self.load = num_ranks, slots_per_rank, load
        self.rebalanced: list[torch.Tensor] = []

    def rebalance(self):
        result = _sglang_rebalance(self.load, self.num_ranks, self.slots_per_rank)
        self.rebalanced.append(result[0])
        yield


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_membership_change_updates_sglang_active_ranks_once() -> None:
    """A rank dies: Mooncake's mask on rank 0 marks it, elasticep's membership agrees on a view
    without it, the view is written into SGLang's active-ranks state once, and SGLang rebalances
    once, on the agreed member set, through elasticep's planner."""
    from sglang.srt.elastic_ep import elastic_ep

    from elasticep.bus import EventBus, InProcessNetwork
    from elasticep.config import Config
    from elasticep.membership import InMemoryViewStore
    from elasticep.membership.service import MembershipService
    from elasticep_sglang import ActiveRanksFeed, install_hooks, mooncake_mask_source
    from elasticep_sglang.testing import sglang_cpu_runtime

    R, S, E = 4, 8, 16
    load = _load(2, E)
    net, store = InProcessNetwork(), InMemoryViewStore()
    services = [
        MembershipService(r, EventBus(net.transport(r), r), store, Config.local(), initial_members=tuple(range(R)))
        for r in range(R)
    ]
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task] = []
    with sglang_cpu_runtime(ep_size=R, num_redundant_experts=R * S - E, ep_dispatch_algorithm="dynamic") as rt:
        from sglang.srt.runtime_context import get_resources

        get_resources().expert_location_metadata = _metadata_from_eplb(*_sglang_rebalance(load, R, S)[:2], R)
        try:
            await asyncio.gather(*(s.start(ready_timeout=5) for s in services))
            feed = ActiveRanksFeed()
            # two subscriptions deliver every view twice; each epoch must still be written once
            tasks = [asyncio.create_task(feed.run(services[0].views())) for _ in range(2)]
            timeouts: list = []

            def to_membership(events: list) -> None:  # the scheduler thread hands kernel timeouts over
                timeouts.extend(events)
                for event in events:
                    loop.call_soon_threadsafe(services[0].report, event)

            hooks = install_hooks(feed=feed, mask_source=mooncake_mask_source(0, feed=feed, num_ranks=R),
                                  on_peer_timeout=to_membership, view_wait_s=10.0)
            manager = RecordingEPLBManager(R, S, load)

            def step() -> bool:  # the model runner, after each forward pass, on its own thread
                return elastic_ep.maybe_rebalance_after_rank_fault(eplb_manager=manager)

            await asyncio.sleep(0.05)
            assert await asyncio.to_thread(step) is False
            assert feed.applied == [1] and manager.rebalanced == []

            # rank 2 dies: its heartbeats stop and rank 0's Mooncake kernel marks it
            await services[2].close()
            rt.state.active_ranks[2] = 0
            assert await asyncio.to_thread(step) is True
            assert [e.peer for e in timeouts] == [2]
            assert feed.applied == [1, 2] and feed.members == {0, 1, 3}
            assert services[0].current.epoch == 2 and services[0].current.members == (0, 1, 3)
            assert rt.state.active_ranks.tolist() == [1, 1, 0, 1]
            assert len(manager.rebalanced) == 1
            assert hooks.rebalance.records[-1].planner == "elasticep" and hooks.rebalance.records[-1].dead == (2,)

            await asyncio.sleep(0.05)  # the second subscription's copy of epoch 2 has arrived
            assert await asyncio.to_thread(step) is False
            assert feed.applied == [1, 2] and len(manager.rebalanced) == 1
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for s in services:
                await s.close()
                await s.bus.close()


def test_a_view_is_never_written_twice_for_one_epoch() -> None:
    from sglang.srt.elastic_ep import elastic_ep

    from elasticep_sglang import ActiveRanksFeed, install_hooks, mooncake_mask_source
    from elasticep_sglang.testing import sglang_cpu_runtime

    R, S, E = 4, 8, 16  # two ranks' slots still cover every expert
    load = _load(2, E)
    with sglang_cpu_runtime(ep_size=R, num_redundant_experts=R * S - E, ep_dispatch_algorithm="dynamic") as rt:
        from sglang.srt.runtime_context import get_resources

        get_resources().expert_location_metadata = _metadata_from_eplb(*_sglang_rebalance(load, R, S)[:2], R)
        feed = ActiveRanksFeed()
        timeouts: list = []
        install_hooks(feed=feed, mask_source=mooncake_mask_source(0, feed=feed, num_ranks=R),
                      on_peer_timeout=timeouts.extend, view_wait_s=0.2)
        manager = RecordingEPLBManager(R, S, load)

        def step() -> bool:
            return elastic_ep.maybe_rebalance_after_rank_fault(eplb_manager=manager)

        applied0 = metrics.sample("elasticep_sglang_views_total", {"outcome": "applied"})
        dup0 = metrics.sample("elasticep_sglang_views_total", {"outcome": "duplicate"})
        stale0 = metrics.sample("elasticep_sglang_views_total", {"outcome": "stale"})
        v1 = View(epoch=1, members=(0, 1, 2, 3), leader=0)
        v2 = View(epoch=2, members=(0, 1, 3), leader=0)
        for v in (v1, v2, v2):
            feed.offer(v)
        assert step() is True and feed.applied == [1, 2] and len(manager.rebalanced) == 1
        assert rt.state.active_ranks.tolist() == [1, 1, 0, 1]

        # the kernel marks rank 1 during a step; epoch 2 arrives once more: rank 1 must stay marked
        rt.state.active_ranks[1] = 0
        feed.offer(v2)
        feed.offer(v1)
        assert step() is True  # no newer view in time: SGLang acts on the local mask, and re-runs
        assert [e.peer for e in timeouts] == [1] and timeouts[0].waited_us == 10_000_000
        assert feed.applied == [1, 2], "an epoch was written twice"
        assert rt.state.active_ranks.tolist() == [1, 0, 0, 1]
        assert len(manager.rebalanced) == 2
        assert metrics.sample("elasticep_sglang_views_total", {"outcome": "applied"}) == applied0 + 2
        assert metrics.sample("elasticep_sglang_views_total", {"outcome": "duplicate"}) == dup0 + 2
        assert metrics.sample("elasticep_sglang_views_total", {"outcome": "stale"}) == stale0 + 1

        # the next view (rank 1 evicted) is written once; the feed's own write is no kernel timeout
        feed.offer(View(epoch=3, members=(0, 3), leader=0))
        assert step() is False  # the mask already showed rank 1 down: nothing new to rebalance
        assert feed.applied == [1, 2, 3] and len(timeouts) == 1


def test_view_admitting_a_rank_is_left_to_sglang_recovery_unless_asked() -> None:
    from elasticep_sglang import ActiveRanksFeed
    from elasticep_sglang.testing import sglang_cpu_runtime

    with sglang_cpu_runtime(ep_size=4) as rt:
        feed = ActiveRanksFeed()
        assert feed.apply(View(epoch=4, members=(0, 1, 3), leader=0)) == "applied"
        assert rt.state.active_ranks.tolist() == [1, 1, 0, 1]
        assert feed.apply(View(epoch=5, members=(0, 1, 2, 3), leader=0)) == "applied"
        assert rt.state.active_ranks.tolist() == [1, 1, 0, 1]  # SGLang's recovery path admits it
        eager = ActiveRanksFeed(admit_joins=True)
        eager.apply(View(epoch=5, members=(0, 1, 2, 3), leader=0))
        assert rt.state.active_ranks.tolist() == [1, 1, 1, 1]
        with pytest.raises(ValueError, match="beyond the active-ranks capacity"):
            eager.apply(View(epoch=6, members=(0, 7), leader=0))
        assert eager.applied == [5]


# ------------------------------------------------------------------------------ detection source


def test_mooncake_mask_is_a_detection_source() -> None:
    from elasticep.detect import MaskProvider
    from elasticep_sglang import ActiveRanksFeed, SGLangActiveRanks, mooncake_mask_source
    from elasticep_sglang.testing import sglang_cpu_runtime

    with sglang_cpu_runtime(ep_size=4) as rt:
        feed = ActiveRanksFeed()
        assert isinstance(SGLangActiveRanks(), MaskProvider)
        source = mooncake_mask_source(3, feed=feed)
        assert source.after("dispatch") == []
        rt.state.active_ranks[2] = 0  # Mooncake EP's kernel gave up waiting on rank 2
        events = source.after("combine", layer=7)
        assert [(e.observer, e.peer, e.op, e.layer, e.waited_us) for e in events] == [(3, 2, "combine", 7, 10_000_000)]
        assert source.after("dispatch") == []  # reported once
        feed.apply(View(epoch=2, members=(0, 1, 3), leader=0))
        feed.apply(View(epoch=3, members=(0, 3), leader=0))  # the view evicts rank 1 too
        assert source.after("dispatch") == []  # the feed's writes are not kernel timeouts


# ------------------------------------------------------------------------------ activation


def test_install_rebinds_copies_of_the_step_function_and_uninstall_restores() -> None:
    from sglang.srt.eplb import eplb_algorithms
    from sglang.srt.elastic_ep import elastic_ep

    from elasticep_sglang import ActiveRanksFeed, StepBoundary, install_hooks, installed_hooks, uninstall_hooks

    original_step = elastic_ep.maybe_rebalance_after_rank_fault
    original_rebalance = eplb_algorithms.rebalance_experts
    copy = types.ModuleType("esg_model_runner_copy")  # a module that did `from ... import` it
    copy.maybe_rebalance_after_rank_fault = original_step
    sys.modules[copy.__name__] = copy
    try:
        hooks = install_hooks(feed=ActiveRanksFeed())
        assert install_hooks() is hooks is installed_hooks()
        assert isinstance(copy.maybe_rebalance_after_rank_fault, StepBoundary)
        assert elastic_ep.maybe_rebalance_after_rank_fault is hooks.step
        uninstall_hooks()
        assert copy.maybe_rebalance_after_rank_fault is original_step
        assert elastic_ep.maybe_rebalance_after_rank_fault is original_step
        assert eplb_algorithms.rebalance_experts is original_rebalance
        assert installed_hooks() is None
    finally:
        del sys.modules[copy.__name__]


def _wrapper(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "adapters"), env.get("PYTHONPATH", "")])
    env.pop("ELASTICEP_SGLANG_HOOKS", None)
    return subprocess.run(
        [sys.executable, "-m", "elasticep_sglang.launch_server", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_launch_wrapper_installs_hooks_in_itself_and_in_spawned_schedulers() -> None:
    result = _wrapper(
        "--elasticep-dry-run", "--elasticep-max-moves", "300",
        "--model-path", "deepseek-ai/DeepSeek-V3", "--tp-size", "8", "--ep-size", "8",
        "--moe-a2a-backend", "mooncake", "--elastic-ep-backend", "mooncake", "--enable-eplb",
        "--eplb-algorithm", "elasticity_aware", "--ep-num-redundant-experts", "32",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for side in ("wrapper", "spawned_child"):
        assert report[side]["installed"] is True
        assert report[side]["rebalance_entry"] == "ElasticRebalance"
        assert report[side]["max_moves"] == 300
    assert report["wrapper"]["pid"] != report["spawned_child"]["pid"]
    # SGLang's own parser read the arguments
    assert report["server_args"]["ep_size"] == 8 and report["server_args"]["elastic_ep_backend"] == "mooncake"


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_launch_wrapper_hands_the_rest_to_sglang_launch_server() -> None:
    result = _wrapper("--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--elastic-ep-backend" in result.stdout and "--eplb-algorithm" in result.stdout
    ours = _wrapper("--elasticep-help", timeout=60)
    assert ours.returncode == 0 and "--elasticep-max-moves" in ours.stdout


def test_environment_and_plugin_activation() -> None:
    from sglang.srt.eplb import eplb_algorithms

    from elasticep_sglang import ElasticRebalance, install_from_env, installed_hooks
    from elasticep_sglang.plugin import load

    assert install_from_env({}) is None and installed_hooks() is None
    hooks = install_from_env({"ELASTICEP_SGLANG_HOOKS": "1", "ELASTICEP_SGLANG_MAX_MOVES": "none",
                              "ELASTICEP_SGLANG_PERIODIC": "elasticep"})
    assert isinstance(eplb_algorithms.rebalance_experts, ElasticRebalance)
    assert hooks.rebalance.max_moves is None and hooks.rebalance.periodic == "elasticep"
    load()  # SGLang's plugin loader calling it again changes nothing
    assert installed_hooks() is hooks
    with pytest.raises(ValueError, match="max_moves"):
        ElasticRebalance(eplb_algorithms.rebalance_experts, max_moves=-1)


def test_public_names() -> None:
    import elasticep_sglang

    assert sorted(elasticep_sglang.__all__) == sorted(set(elasticep_sglang.__all__))
    for name in elasticep_sglang.__all__:
        assert getattr(elasticep_sglang, name) is not None, name
