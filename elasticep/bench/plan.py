"""``elasticep bench plan``: the EPLB planner against SGLang's ``elasticity_aware`` rebalance.

DeepSeek-V3's shape: 58 MoE layers x 256 routed experts on 32 ranks x 9 slots (288 physical
experts per layer, 32 redundant). The load is skewed and synthetic: per layer, each expert's
load is drawn from a log-normal distribution (``--sigma``, default 0.8: the hottest expert of a
layer carries about six times the mean), seeded. The starting placement is
:func:`elasticep.eplb.initial` on that load (balanced, every rank within a fraction of a percent).

Cases, each from its own ``current`` placement:

* ``one_dead``: rank 7 dies.
* ``four_dead``: ranks 3, 11, 19, 27 die. On 32 x 9 slots that leaves 252 live slots for 256
  experts: no planner can cover every expert, elasticep raises ``RedundancyExhausted`` and
  SGLang's algorithm fails; the row ``four_dead_9_slots`` records that, and ``four_dead`` runs on
  32 ranks x 10 slots (64 redundant experts) instead.
* ``rejoin``: rank 7 comes back with empty slots, starting from elasticep's unlimited plan for
  ``one_dead``. The lower bound is 0 there, so budgets are multiples of the rejoined rank's empty
  slots instead (the moves needed to use it at all); ``budget_moves`` says what was allowed.

For elasticep, budgets of 2x and 4x the lower bound (``max_moves`` = 1x and 3x, on top of the
repair) and unlimited; SGLang's ``elasticity_aware`` (a full replan over the live ranks) once
per case, in the same run. For each: planning time (median of ``--repeat`` runs, wall clock,
``replan`` returning the new placement and its move table), moved slots (live slots whose
expert changes and that hold an expert afterwards) and balance (mean over layers of the most
loaded live rank over the mean live rank, each expert's load split evenly over its live
replicas).

``--json PATH`` writes ``{"cases": [{"name", "budget", "elasticep_ms", "elasticep_moved_slots",
"elasticep_balance", "lower_bound_moves", "sglang_ms", "sglang_moved_slots", "sglang_balance",
...}]}`` (plus ``budget_moves``, ``num_slots_per_rank`` and ``error`` where a case cannot be
planned), and a ``targets`` section with the one-dead targets and whether they were met.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from elasticep.eplb import (
    Placement, RedundancyExhausted, balance, balance_lower_bound, initial, lower_bound, moved_slots, replan,
)

LAYERS, EXPERTS, RANKS, SLOTS = 58, 256, 32, 9


def skewed_load(layers: int, experts: int, sigma: float, seed: int) -> torch.Tensor:
    """``[layers, experts]`` float64 log-normal loads (mean-one scale), seeded."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.lognormal(0.0, sigma, size=(layers, experts)))


def _median_ms(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def _sglang():
    try:
        from sglang.srt.eplb.eplb_algorithms import elasticity_aware
    except Exception as exc:  # the sglang extra is optional
        return None, f"{type(exc).__name__}: {exc}"
    return elasticity_aware, None


def _sglang_plan(mod, load: torch.Tensor, alive: torch.Tensor, slots_per_rank: int) -> Placement:
    """Run SGLang's elasticity_aware rebalance on the live ranks; returns its placement with the
    dead ranks' slots empty (SGLang lists them nowhere in its logical-to-physical map)."""
    R = alive.numel()
    phy2log, log2phy, logcnt = mod.rebalance_experts(
        load.float(), R * slots_per_rank, 1, 1, R, False, alive.to(torch.bool)
    )
    return Placement.from_sglang(phy2log, log2phy, logcnt, slots_per_rank=slots_per_rank)


def run(sigma: float = 0.8, seed: int = 0, repeat: int = 3, with_sglang: bool = True, layers: int = LAYERS) -> dict:
    load = skewed_load(layers, EXPERTS, sigma, seed)
    sg_mod, sg_err = _sglang() if with_sglang else (None, "disabled")
    cases: list[dict] = []

    def alive_without(R: int, dead: list[int]) -> torch.Tensor:
        a = torch.ones(R, dtype=torch.bool)
        a[dead] = False
        return a

    def one_case(name: str, current: Placement, alive: torch.Tensor, ref: int | None = None) -> dict[str, Placement]:
        lb = lower_bound(current, alive)
        unit = lb if ref is None else ref
        sg = {"sglang_ms": None, "sglang_moved_slots": None, "sglang_balance": None}
        if sg_mod is not None:
            ms, sp = _median_ms(lambda: _sglang_plan(sg_mod, load, alive, current.slots_per_rank), repeat)
            sg = {
                "sglang_ms": ms,
                "sglang_moved_slots": moved_slots(current, sp, alive),
                "sglang_balance": balance(sp, load, alive),
            }
        plans = {}
        for budget, max_moves in (("2x", unit), ("4x", 3 * unit), ("unlimited", None)):
            ms, plan = _median_ms(lambda: replan(current, load, alive, max_moves=max_moves), repeat)
            plans[budget] = plan.placement
            cases.append({
                "name": name,
                "budget": budget,
                "budget_moves": None if max_moves is None else lb + max_moves,
                "num_slots_per_rank": current.slots_per_rank,
                "elasticep_ms": ms,
                "elasticep_moved_slots": moved_slots(current, plan.placement, alive),
                "elasticep_balance": balance(plan.placement, load, alive),
                "lower_bound_moves": lb,
                **sg,
            })
        return plans

    start = initial(load, RANKS, SLOTS)
    one = alive_without(RANKS, [7])
    plans_one = one_case("one_dead", start, one)

    four_dead = [3, 11, 19, 27]
    four = alive_without(RANKS, four_dead)
    error = None
    try:
        replan(start, load, four)
    except RedundancyExhausted as exc:
        error = str(exc)
    sg_error = None
    if sg_mod is not None:
        try:
            _sglang_plan(sg_mod, load, four, SLOTS)
        except Exception as exc:  # SGLang asserts when slots are fewer than experts
            sg_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cases.append({
        "name": "four_dead_9_slots", "budget": "any", "budget_moves": None, "num_slots_per_rank": SLOTS,
        "elasticep_ms": None, "elasticep_moved_slots": None, "elasticep_balance": None,
        "lower_bound_moves": None, "sglang_ms": None, "sglang_moved_slots": None, "sglang_balance": None,
        "error": f"elasticep: {error}; sglang: {sg_error or sg_err}",
    })
    start10 = initial(load, RANKS, SLOTS + 1)
    one_case("four_dead", start10, four)

    back = torch.ones(RANKS, dtype=torch.bool)
    after_failure = plans_one["unlimited"]
    one_case("rejoin", after_failure, back, ref=int((after_failure.phy2log < 0).sum()))

    report = {
        "shape": {"layers": layers, "experts": EXPERTS, "ranks": RANKS, "slots_per_rank": SLOTS},
        "load": {"distribution": "lognormal", "sigma": sigma, "seed": seed},
        "repeat": repeat,
        "sglang": "elasticity_aware" if sg_mod is not None else f"unavailable ({sg_err})",
        "cases": cases,
    }
    report["targets"] = _targets(cases)
    return report


SHAPES = {"deepseek_v3": (58, 256, 32, 9), "qwen3_moe": (48, 128, 16, 10)}
FAMILIES = [("zipf", 0.8), ("zipf", 1.0), ("zipf", 1.2), ("zipf", 1.4), ("lognormal", 1.5),
            ("lognormal", 2.0), ("hot_expert", 0.2)]


def family_load(kind: str, param: float, layers: int, experts: int, seed: int) -> torch.Tensor:
    """``[layers, experts]`` float64 skewed loads, seeded, each layer summing to ``experts``:
    ``zipf`` (expert of popularity rank k carries 1/k^param, ranks shuffled per layer),
    ``lognormal`` (sigma ``param``), ``hot_expert`` (one expert takes ``param`` of its layer,
    the rest log-normal with sigma 0.8)."""
    rng = np.random.default_rng(seed)
    if kind == "zipf":
        base = 1.0 / np.arange(1, experts + 1) ** param
        w = np.stack([rng.permutation(base) for _ in range(layers)])
    elif kind == "lognormal":
        w = rng.lognormal(0.0, param, (layers, experts))
    elif kind == "hot_expert":
        w = rng.lognormal(0.0, 0.8, (layers, experts))
        hot = rng.integers(0, experts, layers)
        w[np.arange(layers), hot] = 0.0
        w[np.arange(layers), hot] = w.sum(1) * param / (1 - param)
    else:
        raise ValueError(f"unknown load family {kind!r}")
    return torch.from_numpy(w / w.sum(1, keepdims=True) * experts)


def run_families(seed: int = 0, repeat: int = 3, layers: int | None = None) -> list[dict]:
    """Every shape x family x (one, two dead ranks): SGLang's full replan and elasticep at 2x,
    4x the lower bound, at a quarter of SGLang's moved slots and unlimited, in the same run.

    Each row also has ``balance_lower_bound`` (no plan on the live ranks is better balanced,
    whatever its budget) and ``balance_lower_bound_by_budget`` (the same within each budget;
    :mod:`elasticep.eplb.bound`). A balance target whose floor lies above it is recorded as
    ``"infeasible"`` in ``targets``, not as met or missed; the others are True (met) or False."""
    sg_mod, _ = _sglang()
    rows: list[dict] = []
    for shape, (L, E, R, S) in SHAPES.items():
        L = L if layers is None else layers
        for kind, param in FAMILIES:
            load = family_load(kind, param, L, E, seed)
            start = initial(load, R, S)
            for dead in ([R // 4], [R // 4, 3 * R // 4]):
                alive = torch.ones(R, dtype=torch.bool)
                alive[dead] = False
                lb = lower_bound(start, alive)
                row: dict[str, Any] = {"shape": shape, "family": kind, "param": param, "dead": len(dead),
                                       "lower_bound_moves": lb, "sglang_ms": None,
                                       "sglang_moved_slots": None, "sglang_balance": None}
                if sg_mod is not None:
                    ms, sp = _median_ms(lambda: _sglang_plan(sg_mod, load, alive, S), repeat)
                    row.update(sglang_ms=ms, sglang_moved_slots=moved_slots(start, sp, alive),
                               sglang_balance=balance(sp, load, alive))
                budgets = [("2x", lb), ("4x", 3 * lb), ("unlimited", None)]
                if row["sglang_moved_slots"] is not None:
                    budgets.insert(2, ("quarter_of_sglang", max(0, row["sglang_moved_slots"] // 4 - lb)))
                for name, mm in budgets:
                    ms, plan = _median_ms(lambda: replan(start, load, alive, max_moves=mm), repeat)
                    row[f"elasticep_{name}_ms"] = ms
                    row[f"elasticep_{name}_moved_slots"] = moved_slots(start, plan.placement, alive)
                    row[f"elasticep_{name}_balance"] = balance(plan.placement, load, alive)
                # provable floors on the balance (elasticep.eplb.bound): unbudgeted, and within
                # each budget; a target below its floor is out of reach of any planner
                bound = balance_lower_bound(start, load, alive)
                floors = {name: bound if mm is None else balance_lower_bound(start, load, alive, max_moves=mm)
                          for name, mm in budgets}
                row["balance_lower_bound"] = bound
                row["balance_lower_bound_by_budget"] = floors

                def judge(value: float, limit: float, floor: float) -> bool | str:
                    return "infeasible" if floor > limit + 1e-12 else bool(value <= limit)

                t: dict[str, bool | str] = {
                    "balance_2x_max_1.15": judge(row["elasticep_2x_balance"], 1.15, floors["2x"]),
                    "balance_4x_max_1.05": judge(row["elasticep_4x_balance"], 1.05, floors["4x"]),
                }
                if row["sglang_balance"] is not None:
                    t["quarter_moves_balance_within_0.01"] = judge(
                        row["elasticep_quarter_of_sglang_balance"], row["sglang_balance"] + 0.01,
                        floors["quarter_of_sglang"])
                    t["time_at_most_third_of_sglang"] = max(
                        row[f"elasticep_{n}_ms"] for n, _ in budgets) <= row["sglang_ms"] / 3
                row["targets"] = t
                rows.append(row)
    return rows


def run_backups(seed: int = 0, repeat: int = 3, layers: int = LAYERS, ranks_per_host: int = 8) -> list[dict]:
    """Host-backup planning (:func:`~elasticep.transfer.plan_backups`) at DeepSeek-V3's shape,
    hosts of ``ranks_per_host`` ranks, two copies, one spare slot per rank and layer beyond the
    ``2 * experts / ranks`` two copies need: from nothing, after one rank dies, after a whole host
    dies (each from the plan before). Each row: planning time (median), backups placed and
    missing, and how many the view change makes the ranks copy (``changes``)."""
    from elasticep.transfer import plan_backups

    load = skewed_load(layers, EXPERTS, 0.8, seed)
    placement = initial(load, RANKS, SLOTS)
    hosts = [r // ranks_per_host for r in range(RANKS)]
    slots = -(-2 * EXPERTS // RANKS) + 1
    rows: list[dict] = []
    plans: dict[str, Any] = {}
    # the host dies after the rank did: both changes start from the one-dead plan's predecessor
    # chain, as views follow one another
    for name, dead, before in (("initial", [], None), ("one_dead", [7], "initial"),
                               ("host_dead", [7, *range(8, 8 + ranks_per_host)], "one_dead")):
        alive = torch.ones(RANKS, dtype=torch.bool)
        alive[dead] = False
        prev = plans.get(before)
        ms, plan = _median_ms(lambda: plan_backups(placement, alive, slots=slots, hosts=hosts, previous=prev), repeat)
        plans[name] = plan
        newly_dead = [r for r in dead if prev is None or r not in rows[-1]["dead"]]
        rows.append({"case": name, "dead": dead, "slots": slots, "ms": round(ms, 1),
                     "placed": int(plan.holders.ge(0).sum()), "missing": plan.missing(),
                     "changes": plan.changes(prev),
                     "held_by_newly_dead": 0 if prev is None else sum(len(prev.held_by(r)) for r in newly_dead)})
    return rows


def print_families(rows: list[dict], out=None) -> None:
    out = sys.stdout if out is None else out
    print("skewed families: balance/moved per budget | sglang; targets missed", file=out)
    for r in rows:
        cells = [f"{n} {r[f'elasticep_{n}_balance']:.4f}/{r[f'elasticep_{n}_moved_slots']}/{r[f'elasticep_{n}_ms']:.0f}ms"
                 for n in ("2x", "4x", "quarter_of_sglang", "unlimited") if f"elasticep_{n}_balance" in r]
        sg = "-" if r["sglang_balance"] is None else f"{r['sglang_balance']:.4f}/{r['sglang_moved_slots']}/{r['sglang_ms']:.0f}ms"
        missed = [k for k, v in r["targets"].items() if v is False]
        infeasible = [k for k, v in r["targets"].items() if v == "infeasible"]
        print(f"{r['shape']:<12}{r['family']:<11}{r['param']:<4} dead {r['dead']} lb {r['lower_bound_moves']:>4} "
              f"floor {r['balance_lower_bound']:.4f} | "
              + " ".join(cells) + f" | sglang {sg} | missed: {', '.join(missed) or 'none'}"
              + (f" | infeasible: {', '.join(infeasible)}" if infeasible else ""), file=out)
    met = sum(all(v is True for v in r["targets"].values()) for r in rows)
    feasible_met = sum(all(v is not False for v in r["targets"].values()) for r in rows)
    n_inf = sum(any(v == "infeasible" for v in r["targets"].values()) for r in rows)
    print(f"rows meeting every target: {met} of {len(rows)}; every feasible target: {feasible_met}; "
          f"rows with an infeasible target: {n_inf}", file=out)


def _targets(cases: list[dict]) -> dict:
    rows = {c["budget"]: c for c in cases if c["name"] == "one_dead"}
    out: dict[str, Any] = {
        "balance_2x_max_1.15": rows["2x"]["elasticep_balance"] <= 1.15,
        "balance_4x_max_1.05": rows["4x"]["elasticep_balance"] <= 1.05,
    }
    un = rows["unlimited"]
    if un["sglang_balance"] is not None:
        out["unlimited_balance_within_0.01_of_sglang"] = un["elasticep_balance"] <= un["sglang_balance"] + 0.01
        out["unlimited_moves_at_most_quarter_of_sglang"] = un["elasticep_moved_slots"] <= un["sglang_moved_slots"] / 4
        out["time_at_most_third_of_sglang"] = all(
            r["elasticep_ms"] <= r["sglang_ms"] / 3 for r in rows.values()
        )
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(report: dict, out=None) -> None:
    out = sys.stdout if out is None else out  # at call time: the caller may have replaced it
    print(f"elasticep bench plan: {report['shape']['layers']} layers x {report['shape']['experts']} experts, "
          f"{report['shape']['ranks']} ranks, lognormal load sigma={report['load']['sigma']}, "
          f"median of {report['repeat']}; baseline: SGLang {report['sglang']}", file=out)
    head = f"{'case':<18}{'slots':>5} {'budget':<10}{'lower':>6}{'allowed':>8} | {'ms':>7}{'moved':>7}{'balance':>9} | {'sglang ms':>9}{'moved':>7}{'balance':>9}"
    print(head, file=out)
    print("-" * len(head), file=out)
    for c in report["cases"]:
        if c.get("error"):
            print(f"{c['name']:<18}{c['num_slots_per_rank']:>5} {c['error']}", file=out)
            continue
        print(
            f"{c['name']:<18}{c['num_slots_per_rank']:>5} {c['budget']:<10}{c['lower_bound_moves']:>6}"
            f"{_fmt(c['budget_moves'], 'd'):>8} | {c['elasticep_ms']:>7.1f}{c['elasticep_moved_slots']:>7d}"
            f"{c['elasticep_balance']:>9.4f} | {_fmt(c['sglang_ms'], '.1f'):>9}{_fmt(c['sglang_moved_slots'], 'd'):>7}"
            f"{_fmt(c['sglang_balance'], '.4f'):>9}",
            file=out,
        )
    print("targets (one_dead): " + ", ".join(f"{k}={'met' if v else 'MISSED'}" for k, v in report["targets"].items()), file=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="elasticep bench plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    ap.add_argument("--sigma", type=float, default=0.8, help="log-normal sigma of the expert loads (default 0.8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per planner and case; the median is reported")
    ap.add_argument("--no-sglang", action="store_true", help="skip the SGLang baseline")
    ap.add_argument("--layers", type=int, default=LAYERS, help=f"MoE layers (default {LAYERS}, DeepSeek-V3's)")
    ap.add_argument("--backups", action="store_true",
                    help="also time host-backup planning (plan_backups) at DeepSeek-V3's shape")
    ap.add_argument("--families", action="store_true",
                    help="also run the skewed families (Zipf, log-normal, hot expert) at DeepSeek-V3's and Qwen3-MoE's shapes")
    args = ap.parse_args(argv)
    report = run(args.sigma, args.seed, args.repeat, with_sglang=not args.no_sglang, layers=args.layers)
    print_table(report)
    if args.families:
        report["families"] = run_families(args.seed, args.repeat, None if args.layers == LAYERS else args.layers)
        print_families(report["families"])
    if args.backups:
        report["backups"] = run_backups(args.seed, args.repeat, args.layers)
        for row in report["backups"]:
            print("backups " + " ".join(f"{k} {v}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
