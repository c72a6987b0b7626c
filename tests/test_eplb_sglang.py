"""elasticep placements through SGLang's own EPLB code (the sglang extra)."""

from __future__ import annotations

import pytest
import torch

from elasticep.eplb import Placement, balance, initial, moved_slots, replan

pytestmark = pytest.mark.sglang

try:
    from sglang.srt.eplb import expert_location as sg_loc
    from sglang.srt.eplb import expert_location_dispatch as sg_dispatch
    from sglang.srt.eplb.eplb_algorithms import deepseek, elasticity_aware
except Exception as exc:  # the optional extra is not installed
    pytest.skip(f"sglang is not importable ({type(exc).__name__}: {exc})", allow_module_level=True)


def skewed(layers: int, experts: int, seed: int, sigma: float = 0.8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(sigma * torch.randn(layers, experts, generator=g, dtype=torch.float64))


def metadata(p: Placement, ep_size: int) -> "sg_loc.ExpertLocationMetadata":
    """SGLang's ExpertLocationMetadata holding ``p`` (built as its ``_init_raw`` does, without the
    server-wide config that ``_init_raw`` reads for the static dispatch map)."""
    phy2log, log2phy, _ = p.to_sglang()
    padded = torch.nn.functional.pad(log2phy, (0, phy2log.shape[1] - log2phy.shape[-1]), value=-1)
    return sg_loc.ExpertLocationMetadata(
        physical_to_logical_map=phy2log,
        physical_to_logical_map_cpu=phy2log.clone(),
        logical_to_all_physical_map=padded,
        logical_to_all_physical_map_cpu=padded.clone(),
        logical_to_all_physical_map_num_valid=torch.count_nonzero(padded != -1, dim=-1),
        ep_size=ep_size,
        logical_to_rank_dispatch_physical_map=None,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_initial_at_least_as_balanced_as_deepseek(seed):
    load = skewed(6, 64, seed)
    for groups, nodes in ((None, 1), (8, 2)):
        ours = initial(load, 8, 10, num_groups=groups, num_nodes=nodes)
        phy2log, log2phy, logcnt = deepseek.rebalance_experts(
            load.float(), 80, groups or 1, nodes, 8, enable_hierarchical=groups is not None
        )
        theirs = Placement.from_sglang(phy2log, log2phy, logcnt, slots_per_rank=10)
        assert balance(ours, load) <= balance(theirs, load) + 1e-9


def test_log2phy_matches_sglang_helper():
    load = skewed(4, 32, 3)
    p = initial(load, 6, 7)
    l2p = sg_loc._compute_logical_to_all_physical_map(p.phy2log, num_logical_experts=32, ep_size=6, moe_ep_rank=None)
    assert torch.equal(l2p, p.log2phy)


def test_round_trip_through_expert_location_metadata():
    load = skewed(4, 32, 4)
    start = initial(load, 6, 8)
    alive = torch.tensor([True, True, False, True, True, True])
    p = replan(start, load, alive).placement
    meta = metadata(p, ep_size=6)
    assert meta.num_layers == 4 and meta.num_logical_experts == 32 and meta.num_local_physical_experts == 8
    back = Placement.from_sglang(
        meta.physical_to_logical_map, meta.logical_to_all_physical_map,
        meta.logical_to_all_physical_map_num_valid, slots_per_rank=meta.num_local_physical_experts,
    )
    assert back == p
    for layer in range(4):
        for e in range(32):
            assert meta.logical_to_all_physical(layer, e) == [s for s in p.log2phy[layer, e].tolist() if s >= 0]
    # SGLang's own layer-wise update moves the old metadata onto the new placement
    old = metadata(start, ep_size=6)
    old.update(meta, update_layer_ids=[0, 2])
    assert torch.equal(old.physical_to_logical_map[0], meta.physical_to_logical_map[0])
    assert torch.equal(old.physical_to_logical_map[1], metadata(start, 6).physical_to_logical_map[1])
    diff = sg_loc.format_expert_location_layout_diff(metadata(start, 6), meta)
    changed = int((start.to_sglang()[0] != p.to_sglang()[0]).sum())
    assert diff.splitlines()[0] == f"changed_physical_slots={changed}/{4 * 48}"


def test_sglang_dispatch_matches_route():
    load = skewed(2, 16, 5)
    p = initial(load, 4, 6)
    meta = metadata(p, ep_size=4)
    topk = torch.randint(0, 16, (32, 4), generator=torch.Generator().manual_seed(0))
    for layer in range(2):
        info = sg_dispatch.ExpertLocationDispatchInfo(
            ep_dispatch_algorithm="dynamic",
            partial_logical_to_rank_dispatch_physical_map=None,
            partial_logical_to_all_physical_map=meta.logical_to_all_physical_map[layer],
            partial_logical_to_all_physical_map_num_valid=meta.logical_to_all_physical_map_num_valid[layer],
            num_physical_experts=meta.num_physical_experts,
            rank_invariant=True,
        )
        theirs = sg_dispatch.topk_ids_logical_to_physical(topk, info)
        assert torch.equal(theirs, p.route(layer, topk))


def test_elasticity_aware_output_reads_as_placement():
    load = skewed(4, 32, 6)
    alive = torch.tensor([True, False, True, True, True, True])
    phy2log, log2phy, logcnt = elasticity_aware.rebalance_experts(load.float(), 48, 1, 1, 6, False, alive)
    p = Placement.from_sglang(phy2log, log2phy, logcnt, slots_per_rank=8)
    assert bool((p.phy2log[:, 8:16] == -1).all()), "the dead rank's slots are empty"
    assert bool((p.masked(alive).logcnt >= 1).all())
    # elasticep plans the same failure from the old placement with far fewer moves
    start = initial(load, 6, 8)
    ours = replan(start, load, alive)
    assert moved_slots(start, ours.placement, alive) < moved_slots(start, p, alive)
