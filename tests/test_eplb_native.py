"""The planner's C++ core (csrc/eplb_planner.cpp) against the numpy reference: the same plans.

``planner._plan_core(..., native=True)`` runs ``elasticep._C.eplb_plan_core``; ``native=False``
runs ``planner._plan_reference``. Both must return the same placement, repaired placement, lower
bound, balances (to the bit) and coverage on every seeded case: small random shapes with uniform
and uneven rank speeds, arbitrary and balanced current placements, budgets and none, and the
skewed load families of ``elasticep bench plan --families`` at both model shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elasticep import _C
from elasticep.bench.plan import FAMILIES, SHAPES, family_load
from elasticep.eplb import initial, lower_bound, replan
from elasticep.eplb import planner


def both(cur, w, target, speed, S, budget, tolerance=0.01):
    ref = planner._plan_core(cur, w, target, speed, S, budget, tolerance, native=False)
    nat = planner._plan_core(cur, w, target, speed, S, budget, tolerance, native=True)
    return ref, nat


def assert_same(ref, nat, what):
    p, repaired, lb, before, after, covered = ref
    assert np.array_equal(nat[0], p), f"{what}: placements differ in layers {np.flatnonzero((nat[0] != p).any(1))}"
    assert np.array_equal(nat[1], repaired), f"{what}: repaired placements differ"
    assert nat[2:] == (lb, before, after, covered), f"{what}: {nat[2:]} != {ref[2:]}"


def random_case(rng: np.random.Generator):
    L = int(rng.integers(1, 5))
    R = int(rng.integers(2, 9))
    S = int(rng.integers(1, 6))
    target = rng.random(R) < 0.75
    if not target.any():
        target[0] = True
    E = int(rng.integers(1, int(target.sum()) * S + 1))
    kind = int(rng.integers(0, 4))
    if kind == 0:
        w = rng.uniform(0, 100, (L, E))
    elif kind == 1:
        w = rng.lognormal(0, 2, (L, E))
    elif kind == 2:
        w = np.round(rng.uniform(0, 3, (L, E)))  # ties and zero loads
    else:
        w = np.tile(rng.permutation(1.0 / np.arange(1, E + 1)), (L, 1))  # identical layers
    if rng.random() < 0.5:
        cur = initial(w + 1e-3, R, S).phy2log.numpy()
    else:
        cur = rng.integers(-1, E, (L, R * S))
    speed = np.ones(R) if rng.random() < 0.6 else rng.uniform(0.25, 2.0, R)
    budget = None if rng.random() < 0.3 else int(rng.integers(0, 30))
    return cur, w, target, speed, S, budget


def test_the_extension_has_the_core():
    assert hasattr(_C, "eplb_plan_core"), "rebuild the extension: bash scripts/setup.sh"
    assert planner._NATIVE is _C.eplb_plan_core or planner._native_core() is None


@pytest.mark.parametrize("seed", range(6))
def test_same_plans_on_random_small_cases(seed):
    rng = np.random.default_rng(1000 + seed)
    for i in range(150):
        cur, w, target, speed, S, budget = random_case(rng)
        ref, nat = both(cur, w, target, speed, S, budget)
        assert_same(ref, nat, f"seed {seed} case {i}")


@pytest.mark.parametrize("tolerance", [0.0, 0.05])
def test_same_plans_at_other_tolerances(tolerance):
    rng = np.random.default_rng(7)
    for i in range(100):
        cur, w, target, speed, S, budget = random_case(rng)
        ref, nat = both(cur, w, target, speed, S, budget, tolerance)
        assert_same(ref, nat, f"case {i}")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"{f[0]}-{f[1]}")
def test_same_plans_on_the_bench_families(shape, family):
    """The families of ``bench plan --families`` (8 layers instead of all), one and two dead
    ranks, at the bench's budgets and without one."""
    L, E, R, S = SHAPES[shape]
    load = family_load(family[0], family[1], 8, E, 0)
    start = initial(load, R, S)
    for dead in ([R // 4], [R // 4, 3 * R // 4]):
        alive = np.ones(R, dtype=bool)
        alive[dead] = False
        lb = lower_bound(start, torch.from_numpy(alive))
        for budget in (lb, 3 * lb, lb // 2, None):
            ref, nat = both(start.phy2log.numpy(), load.numpy(), alive, np.ones(R), S, budget)
            assert_same(ref, nat, f"{shape} {family} dead {dead} budget {budget}")


def test_replan_runs_the_core_and_the_reference_alike(monkeypatch):
    """``replan`` gives the same plan with the core and with the reference (the path taken when
    the extension lacks the core or ``ELASTICEP_PLANNER=python``)."""
    L, E, R, S = SHAPES["qwen3_moe"]
    load = family_load("zipf", 1.2, 6, E, 3)
    start = initial(load, R, S)
    alive = torch.ones(R, dtype=torch.bool)
    alive[[2, 9]] = False
    calls = []
    real = planner._NATIVE

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(planner, "_NATIVE", counting)
    fast = replan(start, load, alive, max_moves=200)
    assert calls, "replan did not use the C++ core"
    monkeypatch.setattr(planner, "_NATIVE", None)
    slow = replan(start, load, alive, max_moves=200)
    assert fast.placement == slow.placement
    assert torch.equal(fast.move_slot, slow.move_slot) and torch.equal(fast.move_expert, slow.move_expert)
    assert (fast.balance_before, fast.balance_after, fast.reason) == (slow.balance_before, slow.balance_after, slow.reason)


def test_environment_selects_the_reference(monkeypatch):
    monkeypatch.setenv("ELASTICEP_PLANNER", "python")
    assert planner._native_core() is None
    monkeypatch.setenv("ELASTICEP_PLANNER", "")
    assert planner._native_core() is _C.eplb_plan_core


def test_huge_budgets_go_to_the_reference(monkeypatch):
    monkeypatch.setattr(planner, "_NATIVE", lambda *a: pytest.fail("the core got a budget past its range"))
    cur = initial(torch.ones(2, 6), 3, 3).phy2log.numpy()
    target = np.array([True, False, True])
    p, _, lb, *_, covered = planner._plan_core(cur, np.ones((2, 6)), target, np.ones(3), 3, 1 << 62, 0.01)
    assert lb > 0 and covered and (p[:, 3:6] == -1).all()


def test_core_refuses_inconsistent_shapes():
    cur = np.zeros((2, 6), dtype=np.int64)
    with pytest.raises(ValueError):
        _C.eplb_plan_core(cur, np.ones((2, 3)), np.ones(4, dtype=bool), np.ones(4), 2, -1, 0.01)  # 4 x 2 != 6
    with pytest.raises(ValueError):
        _C.eplb_plan_core(cur, np.ones((3, 3)), np.ones(3, dtype=bool), np.ones(3), 2, -1, 0.01)  # layers
    with pytest.raises(ValueError):
        _C.eplb_plan_core(cur, np.ones((2, 3)), np.zeros(3, dtype=bool), np.ones(3), 2, -1, 0.01)  # no target
