"""Placement: the physical-to-logical map, its SGLang views and the dispatch table."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticep.eplb import EMPTY, Placement, RedundancyExhausted


def naive_log2phy(phy2log: list[list[int]], num_experts: int) -> tuple[list, list]:
    """Reference: each expert's slots in ascending order, by plain loops."""
    log2phy, logcnt = [], []
    for row in phy2log:
        slots = [[s for s, e in enumerate(row) if e == x] for x in range(num_experts)]
        log2phy.append(slots)
        logcnt.append([len(s) for s in slots])
    return log2phy, logcnt


@st.composite
def placements(draw):
    layers = draw(st.integers(1, 4))
    ranks = draw(st.integers(1, 6))
    spr = draw(st.integers(1, 5))
    experts = draw(st.integers(1, ranks * spr))
    rows = [
        draw(st.lists(st.integers(-1, experts - 1), min_size=ranks * spr, max_size=ranks * spr))
        for _ in range(layers)
    ]
    return rows, spr, experts


@settings(max_examples=60, deadline=None)
@given(placements())
def test_views_match_reference(case):
    rows, spr, experts = case
    p = Placement(rows, spr, experts)
    ref_l2p, ref_cnt = naive_log2phy(rows, experts)
    assert p.logcnt.tolist() == ref_cnt
    assert p.log2phy.shape[:2] == (len(rows), experts)
    assert p.log2phy.shape[2] == max(1, max(max(c) for c in ref_cnt))
    for layer, per_expert in enumerate(ref_l2p):
        for e, slots in enumerate(per_expert):
            got = p.log2phy[layer, e].tolist()
            assert got[: len(slots)] == slots
            assert all(v == EMPTY for v in got[len(slots):])
    assert p.num_layers == len(rows) and p.num_slots == len(rows[0])
    assert p.num_ranks * spr == p.num_slots
    assert p.rank_of_slot.tolist() == [s // spr for s in range(p.num_slots)]


@settings(max_examples=60, deadline=None)
@given(placements())
def test_sglang_round_trip(case):
    rows, spr, experts = case
    p = Placement(rows, spr, experts)
    phy2log, log2phy, logcnt = p.to_sglang()
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert bool((phy2log >= 0).all()), "SGLang's map has no empty value"
    back = Placement.from_sglang(phy2log, log2phy, logcnt, slots_per_rank=spr)
    assert back == p
    back2 = Placement.from_sglang(phy2log.unsqueeze(0), log2phy.unsqueeze(0), num_ranks=p.num_ranks)
    assert back2 == p
    assert Placement.from_dict(p.to_dict()) == p


def test_inferred_experts_and_bad_input():
    p = Placement([[0, 1, 2, 2]], 2)
    assert p.num_experts == 3 and p.num_ranks == 2
    with pytest.raises(ValueError, match="multiple of slots_per_rank"):
        Placement([[0, 1, 2]], 2)
    with pytest.raises(ValueError, match="-1 marks an empty slot"):
        Placement([[0, -2]], 1)
    with pytest.raises(ValueError, match="names expert 5"):
        Placement([[5, 0]], 1, num_experts=3)
    with pytest.raises(ValueError, match="disagrees"):
        Placement.from_sglang([[0, 1]], [[[1], [0]]], slots_per_rank=1)
    with pytest.raises(ValueError, match="logical_count"):
        Placement.from_sglang([[0, 1]], [[[0], [1]]], [[2, 1]], slots_per_rank=1)


def test_masked_missing_and_growth():
    p = Placement([[0, 1, 2, 0, 3, 1]], 2, 4)
    alive = torch.tensor([True, False, True])
    m = p.masked(alive)
    assert m.phy2log.tolist() == [[0, 1, -1, -1, 3, 1]]
    assert p.missing(alive).tolist() == [[0, 2]]
    assert p.missing().numel() == 0
    g = p.with_ranks(4)
    assert g.num_ranks == 4 and g.phy2log[0, 6:].tolist() == [-1, -1]
    with pytest.raises(ValueError):
        p.with_ranks(2)


def test_dispatch_table_and_route():
    p = Placement([[0, 1, 2, 0, 3, 1]], 2, 4)
    table, count = p.dispatch_table()
    assert count.tolist() == [[2, 2, 1, 1]]
    assert table[0, 0].tolist() == [0, 3] and table[0, 1].tolist() == [1, 5]
    # tokens 0..3 routed to expert 0 alternate between its replicas
    slots = p.route(0, torch.tensor([[0], [0], [0], [1]]))
    assert slots.flatten().tolist() == [0, 3, 0, 5]
    # rank 1 (slots 2, 3) dead: expert 0 has one live replica, expert 2 none
    with pytest.raises(RedundancyExhausted) as info:
        p.dispatch_table(torch.tensor([True, False, True]))
    assert info.value.needed == 4 and info.value.missing == ((0, 2),)
    table, count = p.dispatch_table(torch.tensor([True, False, True]), strict=False)
    assert count.tolist() == [[1, 2, 0, 1]] and table[0, 0].tolist() == [0, -1]


def test_redundancy_exhausted_pickles():
    exc = RedundancyExhausted(256, 252, [(0, 3)], "28 ranks")
    back = pickle.loads(pickle.dumps(exc))
    assert (back.needed, back.live, back.missing, back.detail) == (256, 252, ((0, 3),), "28 ranks")
    assert "256 slots needed per layer, 252 live" in str(back)


def test_package_exports():
    import elasticep.eplb as eplb

    assert sorted(eplb.__all__) == sorted(set(eplb.__all__))
    for name in eplb.__all__:
        assert getattr(eplb, name) is not None, name
    public = {n for n in dir(eplb) if not n.startswith("_") and n not in {"placement", "planner", "cli", "bound"}}
    assert public <= set(eplb.__all__), public - set(eplb.__all__)
