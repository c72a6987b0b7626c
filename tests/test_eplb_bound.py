"""Lower bounds on balance (elasticep.eplb.bound): never above what a plan reaches, checked
against every placement of tiny cases and against the planner's plans on skewed loads; the
replan's counts repair: lower-bound cost, never worse than the slot-by-slot repair."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from elasticep.eplb import (
    balance,
    balance_lower_bound,
    initial,
    layer_balance,
    layer_balance_lower_bound,
    lower_bound,
    moved_slots,
    replan,
)
from elasticep.eplb import planner as P
from elasticep.eplb.bound import _layer_bounds

FAMILIES = [("zipf", 0.8), ("zipf", 1.2), ("zipf", 1.4), ("lognormal", 2.0), ("hot", 0.2)]


def skewed(kind: str, param: float, layers: int, experts: int, seed: int) -> torch.Tensor:
    """As in test_eplb_skewed: Zipf (shuffled per layer), log-normal, or one hot expert."""
    rng = np.random.default_rng(seed)
    if kind == "zipf":
        base = 1.0 / np.arange(1, experts + 1) ** param
        w = np.stack([rng.permutation(base) for _ in range(layers)])
    elif kind == "lognormal":
        w = rng.lognormal(0.0, param, (layers, experts))
    else:
        w = rng.lognormal(0.0, 0.8, (layers, experts))
        hot = rng.integers(0, experts, layers)
        w[np.arange(layers), hot] = 0.0
        w[np.arange(layers), hot] = w.sum(1) * param / (1 - param)
    return torch.from_numpy(w / w.sum(1, keepdims=True) * experts)


def _all_placements(E: int, N: int) -> np.ndarray:
    """Every assignment of an expert or nothing (-1) to each of N slots: ``[(E+1)^N, N]``."""
    return np.array(list(itertools.product(range(-1, E), repeat=N)), dtype=np.int64)


def _brute(w: np.ndarray, cur: np.ndarray, target: np.ndarray, S: int) -> tuple[np.ndarray, np.ndarray]:
    """Balance and moved slots of every covering placement of one layer on the target ranks."""
    E = w.size
    n = int(target.sum())
    cand = _all_placements(E, n * S)
    cnt = np.stack([(cand == e).sum(1) for e in range(E)], 1)
    ok = (cnt >= 1).all(1)
    cand, cnt = cand[ok], cnt[ok]
    u = np.where(cand >= 0, w[np.maximum(cand, 0)] / np.maximum(np.take_along_axis(cnt, np.maximum(cand, 0), 1), 1), 0.0)
    load = u.reshape(-1, n, S).sum(-1)
    bal = load.max(1) / (w.sum() / n)
    cur_t = cur.reshape(-1, S)[target].reshape(-1)
    moved = ((cand != cur_t[None, :]) & (cand >= 0)).sum(1)
    return bal, moved


@pytest.mark.parametrize("seed", range(12))
def test_bound_never_above_the_best_placement_of_a_tiny_case(seed):
    rng = np.random.default_rng(seed)
    E, R, S = 4, 4, 2  # one rank dies: 3 x 2 = 6 live slots for 4 experts
    w = rng.lognormal(0.0, 1.5, E) if seed % 3 else rng.permutation(1.0 / np.arange(1, E + 1) ** 2.0)
    load = torch.from_numpy(w[None, :])
    current = initial(load, R, S)
    alive = torch.tensor([True, False, True, True])
    target = alive.numpy()
    bal, moved = _brute(w, current.phy2log.numpy()[0], target, S)
    bound = float(layer_balance_lower_bound(current, load, alive)[0])
    assert bound <= bal.min() + 1e-9
    assert bound >= 1.0
    lb = lower_bound(current, alive)
    for extra in range(0, 6):
        b = balance_lower_bound(current, load, alive, max_moves=extra)
        assert b >= bound - 1e-12
        assert b <= bal[moved <= lb + extra].min() + 1e-9, (extra, b)
        plan = replan(current, load, alive, max_moves=extra)
        assert balance(plan.placement, load, alive) >= b - 1e-9


def test_bound_is_exact_where_one_expert_dominates():
    # 2 ranks x 2 slots, four experts: each gets one replica; the rank with the 6 carries 6,
    # the mean is 4, and {6, 0} | {1, 1} reaches it
    load = torch.tensor([[6.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    current = initial(load, 2, 2)
    alive = torch.ones(2, dtype=torch.bool)
    assert float(layer_balance_lower_bound(current, load, alive)[0]) == pytest.approx(1.5)
    assert balance(replan(current, load, alive).placement, load, alive) == pytest.approx(1.5)


def test_pigeonhole_raises_the_bound_and_stays_valid():
    # three experts of 1.0 and three slots a rank on two ranks: a replica each fits (T = 1), but
    # three replicas over T/2 on two ranks put two together
    w = np.array([[1.0, 1.0, 1.0, 0.0]])
    t1, mean = _layer_bounds(w, 2, 2, pigeonhole=False)
    t2, _ = _layer_bounds(w, 2, 2)
    assert t2[0] > t1[0]
    # four slots for four experts: one replica each, the best is {1, 1} | {1, 0}, a peak of 2,
    # which the pigeonhole bound reaches (the plain one says 1.5, the mean)
    cur = np.array([0, 1, 2, 3])
    bal, _ = _brute(w[0], cur, np.array([True, True]), 2)
    assert t1[0] / mean[0] == pytest.approx(1.0)
    assert t2[0] / mean[0] == pytest.approx(bal.min())


@pytest.mark.parametrize("kind,param", FAMILIES)
def test_bound_below_every_plan_on_skewed_families(kind, param):
    load = skewed(kind, param, 4, 32, seed=2)
    start = initial(load, 8, 6)
    alive = torch.ones(8, dtype=torch.bool)
    alive[[1, 6]] = False
    per_layer = layer_balance_lower_bound(start, load, alive)
    lb = lower_bound(start, alive)
    for max_moves in (0, lb, 3 * lb, None):
        plan = replan(start, load, alive, max_moves=max_moves)
        got = layer_balance(plan.placement, load, alive)
        assert bool((got >= per_layer - 1e-9).all())
        assert balance(plan.placement, load, alive) >= balance_lower_bound(start, load, alive, max_moves=max_moves) - 1e-9
    # and below the first placement, on all ranks
    assert bool((layer_balance(start, load) >= layer_balance_lower_bound(start, load, torch.ones(8, dtype=torch.bool)) - 1e-9).all())


def test_bound_marks_a_hot_expert_with_too_few_slots():
    # Zipf 1.4 over 256 experts: the hottest carries about 35 % of a layer; 30 ranks x 9 slots
    # leave 14 spare slots, not enough to bring every expert's replicas to the mean
    load = skewed("zipf", 1.4, 2, 256, seed=0)
    start = initial(load, 32, 9)
    alive = torch.ones(32, dtype=torch.bool)
    alive[[8, 24]] = False
    assert balance_lower_bound(start, load, alive) > 1.05


def test_counts_repair_costs_the_lower_bound_and_never_loses_to_the_slot_repair():
    load = skewed("zipf", 1.4, 6, 48, seed=3)
    R, S = 8, 9
    start = initial(load, R, S)
    alive = torch.ones(R, dtype=torch.bool)
    alive[[2, 6]] = False
    target = alive.numpy()
    tslot = np.repeat(target, S)
    cur_p = start.phy2log.numpy()
    p0 = np.where(tslot[None, :], cur_p, -1)
    w = load.numpy()
    slot_repair, lb = P._repair(p0, w, tslot, target, np.ones(R), S)
    both = P._repair_by_counts(slot_repair, p0, cur_p, w, target, np.ones(R), S)
    assert ((both != cur_p) & (both >= 0)).sum() == lb
    assert (P._counts(np.where(both < 0, 48, both), 49)[:, :48] >= 1).all()
    b_slot = P._layer_balance(P._rank_loads(slot_repair, w, S)[0], target, np.ones(R))
    b_both = P._layer_balance(P._rank_loads(both, w, S)[0], target, np.ones(R))
    assert (b_both <= b_slot + 1e-12).all()
    assert (b_both < b_slot - 1e-6).any()  # the counts repair is taken somewhere here
    plan = replan(start, load, alive, max_moves=0)
    assert plan.num_moves == lb == moved_slots(start, plan.placement, alive)
    assert bool((layer_balance(plan.placement, load, alive).numpy() <= b_slot + 1e-9).all())


def test_tight_budget_path_keeps_the_budget_and_is_deterministic():
    # two dead ranks of eight on a skewed load: budgets below what the reseat's repacks need
    load = skewed("zipf", 1.0, 6, 48, seed=4)
    start = initial(load, 8, 9)
    alive = torch.ones(8, dtype=torch.bool)
    alive[[2, 6]] = False
    lb = lower_bound(start, alive)
    prev = None
    for max_moves in (lb // 2, lb, 2 * lb, 3 * lb):
        plan = replan(start, load, alive, max_moves=max_moves)
        assert moved_slots(start, plan.placement, alive) <= lb + max_moves
        assert bool((plan.placement.masked(alive).logcnt >= 1).all())
        assert replan(start, load, alive, max_moves=max_moves).placement == plan.placement
        bal = balance(plan.placement, load, alive)
        if prev is not None:
            assert bal <= prev + 0.02  # more budget does not make it much worse
        prev = bal
