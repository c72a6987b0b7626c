"""The EPLB planner: a balanced first placement, and replanning from the current one.

Everything here is pure: tensors in, a :class:`Placement` and a move list out; no clock, no I/O.
Shapes use ``L`` layers, ``E`` logical experts, ``R`` ranks, ``S`` slots per rank and
``N = R * S`` physical slots per layer.

Replanning after a membership change works in two phases, each vectorised over all layers:

1. **Coverage repair** moves the fewest experts possible: every logical expert that lost its last
   replica on a target rank (alive and not leaving) gets exactly one slot, taken from an empty
   live slot or from a redundant replica (an expert with two or more replicas). In batches, each
   target rank offers its best slot, ranked by the peak it leaves (the rank without the slot's
   current share, and the worst other host of the evicted expert, which takes that share), and
   the heaviest missing experts take the best offers. That is one move per missing (layer,
   expert) pair: the lower bound. A second repair at the same cost decides replica counts
   first (the surplus comes from the experts that lose least by giving a replica up, on their
   most loaded host; the missing experts, heaviest first, take the freed slots on the least
   loaded ranks); each layer keeps the better balanced of the two.
2. **Rebalance** is a local search within the move budget. Each round pairs, in every layer, the
   k-th most loaded rank with the k-th least loaded one and tries, per pair, to *replicate* an
   expert of the hot rank into a slot of the cold rank (one changed slot: the hot rank and every
   other host of that expert shed load) or to *swap* an expert of the hot rank for a lighter one
   of the cold rank (two changed slots). Steps are scored by how much they lower the sum of
   squared rank loads per changed slot, may never lift a rank to the hot rank's level, and are
   checked exactly before they are applied. With a budget, the steps on the ranks that stand out
   most across all layers go first, and the search first works the two hottest ranks of each
   layer only (up to twice the lower bound), then eight; where the budget does not bind, the
   eight-pair search alone is kept if it ends better balanced. A layer stops when it is within
   ``tolerance`` of perfect balance or nothing improves it. Its peak never rises, so the result is never less balanced
   than the repair alone; and where filling the holes in id order happens to do better on a
   layer, that layer takes it (it costs the lower bound only).
3. **Reseat** (skewed loads): a layer the search leaves more than ``max(1.5 * tolerance, 0.015)``
   off balance is repacked from the current placement (:mod:`elasticep.eplb._repack`: replica
   counts first, then every replica stays unless its rank is over the mean) and searched again;
   it takes the result where that is better balanced and the budget allows. Under a budget, each
   such layer is also repacked with slacks of 5, 10 and 20 % (a rank sheds load only above
   that much over the mean, keeping its largest replica where its others make up the excess:
   fewer moves), the options of all layers are taken by gain per extra move while they fit and
   the search spends what is left on the chosen layers; where the plain repacks all fit, the
   better of the two results is kept.
4. **Descent** (under a budget, uniform rank speed): from the repaired placement, each layer
   works its most loaded rank step by step (replicate one of its experts into, or swap it with,
   a slot of one of the least loaded ranks: the largest drop per changed slot), recording moves
   and balance after each step; each layer then keeps its plan or takes a point of its descent,
   chosen by gain per extra move over all layers while the budget allows (:func:`_descend`).

Phases 1 to 4 are written twice: in numpy here (:func:`_plan_reference`, the reference, which
documents the semantics) and in C++ (``csrc/eplb_planner.cpp``, ``elasticep._C.eplb_plan_core``),
which :func:`replan` runs. The C++ core loops per layer instead of vectorising over layers and
computes the same plans to the bit (its sums run in numpy's order, its candidate scores in
float32 where the reference's do); ``tests/test_eplb_native.py`` checks it against the reference.
``ELASTICEP_PLANNER=python`` runs the reference instead.

:mod:`elasticep.eplb.bound` gives balances no plan can beat (with or without a budget), which
``elasticep bench plan --families`` uses to tell infeasible targets from missed ones.

Who calls it: the reconfiguration pipeline on every new view (``replan``), the engines at start
(``initial``), ``elasticep plan`` and ``elasticep bench plan``.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from elasticep import metrics
from elasticep.eplb import _repack
from elasticep.errors import InvalidArgument
from elasticep.eplb.placement import EMPTY, Placement, RedundancyExhausted, _count_arg

__all__ = [
    "Move",
    "Plan",
    "initial",
    "replan",
    "balance",
    "layer_balance",
    "moved_slots",
    "lower_bound",
]

_INF = np.inf
# relative improvement below which a move is not worth a weight transfer
_MIN_GAIN = 1e-9
# slack of the repack options tried for the stuck layers when their full repacks do not fit the
# budget: a rank sheds load only above (1 + slack) x the mean, so a larger slack moves fewer slots
_RESEAT_SLACK = (0.0, 0.05, 0.1, 0.2)
# ranks a descent step may trade with: the least loaded target ranks of the layer
_DESCENT_PARTNERS = 8


def _native_core():
    """``elasticep._C.eplb_plan_core``, or None (an extension built before it, or
    ``ELASTICEP_PLANNER=python``)."""
    if os.environ.get("ELASTICEP_PLANNER", "").lower() == "python":
        return None
    try:
        from elasticep import _C
    except ImportError:
        return None
    return getattr(_C, "eplb_plan_core", None)


_NATIVE = _native_core()
# budgets beyond this go to the reference (the core counts moves in int64)
_NATIVE_MAX_BUDGET = 1 << 40


# ---------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Move:
    """One physical slot that must load a new expert's weights.

    Attributes:
        layer: MoE layer index.
        slot: physical slot id (rank = ``slot // slots_per_rank``).
        expert: logical expert the slot holds after the plan (the weights to load).
        previous: logical expert it held before (-1 if it was empty).
        sources: slots of the *current* placement, on live ranks, that hold ``expert`` (read them
            before the commit overwrites anything); slots that keep their expert come first.
            Empty when no live rank has it: load from a host copy or from disk.
    """

    layer: int
    slot: int
    expert: int
    previous: int
    sources: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """A planner's decision. ``placement`` is the new placement; ``moves`` lists its changed slots.

    Attributes:
        placement: the new :class:`Placement` (slots of dead and leaving ranks are -1).
        current: the placement planned from (grown to ``placement.num_ranks`` for scale-up).
        alive: ``[R]`` bool, ranks alive for this plan (leaving ranks included).
        target: ``[R]`` bool, ranks that hold experts after the plan (alive and not leaving).
        lower_bound: moves any valid plan needs: (layer, expert) pairs with no replica on a target
            rank.
        repair_moves: moves spent on coverage (equals ``lower_bound``).
        rebalance_moves: further changed slots spent on balance (at most ``max_moves``).
        balance_before: mean over layers of max/mean live-rank load after the repair alone.
        balance_after: the same for ``placement``.
        reason: one readable line saying what happened and why.
        move_layer, move_slot, move_expert: ``[M]`` int64, the moves in tensor form (layer-major,
            ascending slot), for callers that do not want Python objects.
    """

    placement: Placement
    current: Placement
    alive: torch.Tensor
    target: torch.Tensor
    lower_bound: int
    repair_moves: int
    rebalance_moves: int
    balance_before: float
    balance_after: float
    reason: str
    move_layer: torch.Tensor = field(repr=False)
    move_slot: torch.Tensor = field(repr=False)
    move_expert: torch.Tensor = field(repr=False)

    @property
    def num_moves(self) -> int:
        return int(self.move_slot.numel())

    @cached_property
    def moves(self) -> list[Move]:
        """The changed slots as :class:`Move` objects, layer-major, ascending slot."""
        cur = self.current.phy2log
        new = self.placement.phy2log
        live_src = self.current.alive_slots(self.alive).unsqueeze(0) & (cur >= 0)
        # sources that keep their expert after the commit are the safest to read from
        keeps = live_src & (cur == new)
        out: list[Move] = []
        layers = self.move_layer.tolist()
        slots = self.move_slot.tolist()
        experts = self.move_expert.tolist()
        cur_np = cur.numpy()
        live_np = live_src.numpy()
        keeps_np = keeps.numpy()
        for layer, slot, expert in zip(layers, slots, experts):
            holders = np.flatnonzero((cur_np[layer] == expert) & live_np[layer])
            if holders.size > 1:
                holders = holders[np.argsort(~keeps_np[layer, holders], kind="stable")]
            out.append(Move(layer, slot, expert, int(cur_np[layer, slot]), tuple(int(s) for s in holders)))
        return out

    def summary(self) -> dict:
        """JSON-ready summary (no per-slot data)."""
        return {
            "layers": self.placement.num_layers,
            "experts": self.placement.num_experts,
            "ranks": self.placement.num_ranks,
            "slots_per_rank": self.placement.slots_per_rank,
            "alive_ranks": int(self.alive.sum()),
            "target_ranks": int(self.target.sum()),
            "lower_bound": self.lower_bound,
            "repair_moves": self.repair_moves,
            "rebalance_moves": self.rebalance_moves,
            "moves": self.num_moves,
            "balance_before": self.balance_before,
            "balance_after": self.balance_after,
            "reason": self.reason,
        }


# ---------------------------------------------------------------------------------- inputs
#
# The planner computes in numpy (the reference) or in its single-threaded C++ core: its arrays
# are small (tens of thousands of elements), where numpy's single-threaded kernels beat torch's
# intra-op thread pool, and it must not compete for cores with the engine it runs inside.
# Placements and plans still speak torch.


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _load_array(load: Any, num_layers: int | None, num_experts: int | None) -> np.ndarray:
    try:
        w = np.array(_to_numpy(load), dtype=np.float64)
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
        raise InvalidArgument(f"load must be a [layers, experts] array of numbers, got {type(load).__name__}: {exc}") from None
    if w.ndim == 1:
        w = w[None, :]
    if w.ndim != 2:
        raise InvalidArgument(f"load must be [layers, experts], got shape {tuple(w.shape)}")
    if num_layers is not None and w.shape[0] == 1 and num_layers > 1:
        w = np.repeat(w, num_layers, axis=0)
    if num_layers is not None and w.shape[0] != num_layers:
        raise InvalidArgument(f"load has {w.shape[0]} layers, the placement {num_layers}")
    if num_experts is not None and w.shape[1] != num_experts:
        raise InvalidArgument(f"load has {w.shape[1]} experts, the placement {num_experts}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise InvalidArgument("load must be finite and non-negative")
    return np.ascontiguousarray(w)


def _refuse(message: str) -> InvalidArgument:
    return InvalidArgument(message)


def _flat(x: Any, what: str) -> np.ndarray:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return _to_numpy(x).reshape(-1)
    if isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
        raise _refuse(f"{what} must be a [R] mask or a collection of rank ids, got {type(x).__name__}")
    items = list(x)
    if any(isinstance(v, (torch.Tensor, np.ndarray)) and np.ndim(v) > 0 for v in items):
        raise _refuse(f"{what} must be flat: a [R] mask or a collection of rank ids")
    try:
        return np.asarray([v.item() if hasattr(v, "item") else v for v in items]).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise _refuse(f"{what}: {exc}") from None


def _mask_arg(x: Any, num_ranks: int, what: str, *, grow: bool) -> np.ndarray:
    """A bool mask from a ``[R]`` mask: bool, or integer 0/1 (SGLang's and Mooncake EP's
    ``active_ranks`` is ``torch.int32``). ``R`` must be ``num_ranks``, or more when ``grow``."""
    a = _flat(x, what)
    if a.dtype != bool:
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise _refuse(f"{what} must be a bool or 0/1 integer mask, got dtype {a.dtype}")
        if a.size and not np.isin(a, (0, 1)).all():
            raise _refuse(f"{what} is a mask and holds values other than 0 and 1 (rank ids go in alive_ranks=)")
        a = a.astype(bool)
    if a.size < num_ranks:
        raise _refuse(f"{what} has {a.size} entries but the placement has {num_ranks} ranks; mark ranks dead, never drop them")
    if a.size > num_ranks and not grow:
        raise _refuse(f"{what} has {a.size} entries, expected {num_ranks}")
    return a.copy()


def _ids_arg(x: Any, num_ranks: int, what: str, *, grow: bool) -> np.ndarray:
    """A bool mask from a collection of distinct rank ids; with ``grow``, an id at or beyond
    ``num_ranks`` adds ranks (scale-up), else it is refused."""
    a = _flat(x, what)
    if a.size == 0:
        return np.zeros(num_ranks, dtype=bool)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise _refuse(f"{what} must hold integer rank ids, got dtype {a.dtype} (a bool mask goes in alive_mask=)")
    if a.min() < 0:
        raise _refuse(f"{what} names a negative rank ({int(a.min())})")
    if np.unique(a).size != a.size:
        raise _refuse(
            f"{what} names a rank twice: rank ids must be distinct (a 0/1 mask such as SGLang's active_ranks goes in alive_mask=)"
        )
    if a.max() >= num_ranks and not grow:
        raise _refuse(f"{what} names ranks outside 0..{num_ranks - 1}")
    mask = np.zeros(max(num_ranks, int(a.max()) + 1), dtype=bool)
    mask[a] = True
    return mask


def _is_mask_like(x: Any) -> bool | None:
    """For the positional ``alive``: True for a bool mask, False for rank ids, None when ambiguous."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        a = _to_numpy(x)
        if a.dtype == bool:
            return True
        if np.issubdtype(a.dtype, np.integer):
            return None
        return False  # refused with its dtype by _ids_arg
    if isinstance(x, (list, tuple)) and x and all(isinstance(v, (bool, np.bool_)) for v in x):
        return True
    return False


def _alive_arg(num_ranks: int, alive: Any, alive_mask: Any, alive_ranks: Any, *, grow: bool = True) -> np.ndarray:
    """The live ranks as a ``[R]`` bool mask, ``R >= num_ranks``, from exactly one of the forms."""
    given = [name for name, v in (("alive", alive), ("alive_mask", alive_mask), ("alive_ranks", alive_ranks)) if v is not None]
    if len(given) != 1:
        raise _refuse(
            "give the live ranks once: alive_mask= ([R] bool or 0/1 mask) or alive_ranks= (rank ids)"
            + (f", not {' and '.join(given)}" if given else "")
        )
    if alive_mask is not None:
        return _mask_arg(alive_mask, num_ranks, "alive_mask", grow=grow)
    if alive_ranks is not None:
        return _ids_arg(alive_ranks, num_ranks, "alive_ranks", grow=grow)
    kind = _is_mask_like(alive)
    if kind is None:
        raise _refuse(
            "alive is an integer tensor, which reads both as a 0/1 mask (SGLang's int32 active_ranks) and as "
            "rank ids: pass it as alive_mask= or alive_ranks= (or as a bool tensor)"
        )
    if kind:
        return _mask_arg(alive, num_ranks, "alive", grow=grow)
    return _ids_arg(alive, num_ranks, "alive", grow=grow)


def _leaving_arg(leaving: Any, num_ranks: int) -> np.ndarray:
    if leaving is None:
        return np.zeros(num_ranks, dtype=bool)
    kind = _is_mask_like(leaving)
    if kind is None:
        raise _refuse("leaving is an integer tensor, which reads both as a 0/1 mask and as rank ids: "
                      "pass a bool mask or a list of rank ids")
    if kind:
        return _mask_arg(leaving, num_ranks, "leaving", grow=False)
    return _ids_arg(leaving, num_ranks, "leaving", grow=False)


def _speed(rank_speed: Any, num_ranks: int) -> np.ndarray:
    if rank_speed is None:
        return np.ones(num_ranks, dtype=np.float64)
    try:
        s = np.array(_to_numpy(rank_speed), dtype=np.float64).reshape(-1)
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
        raise InvalidArgument(f"rank_speed must be [R] positive numbers, got {type(rank_speed).__name__}: {exc}") from None
    if s.size != num_ranks:
        raise InvalidArgument(f"rank_speed has {s.size} entries, expected {num_ranks}")
    if not np.isfinite(s).all() or (s <= 0).any():
        raise InvalidArgument("rank_speed must be finite and positive (mark a rank dead instead of speed 0)")
    return s


# ---------------------------------------------------------------------------------- metrics


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[l, idx[l, ...]]`` for each row ``l``: ``np.take_along_axis`` on axis 1 without its
    per-call overhead (this runs a few hundred times per plan)."""
    L, n = a.shape
    offs = (np.arange(L) * n).reshape((L,) + (1,) * (idx.ndim - 1))
    return np.take(a.reshape(-1), idx + offs)


def _counts(idx: np.ndarray, E1: int) -> np.ndarray:
    """``[L, E1]`` occurrences of each value of ``idx`` ``[L, N]`` (values in ``0..E1-1``)."""
    L = idx.shape[0]
    flat = (idx + (np.arange(L) * E1)[:, None]).ravel()
    return np.bincount(flat, minlength=L * E1).reshape(L, E1)


def _rank_loads(p: np.ndarray, w: np.ndarray, S: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rank_load [L, R], count [L, E])`` with each expert's load split evenly over the replicas
    present in ``p`` (empty slots and experts without a replica carry nothing)."""
    L, N = p.shape
    E = w.shape[1]
    idx = np.where(p < 0, E, p)
    cnt = _counts(idx, E + 1)[:, :E]
    u = np.zeros((L, E + 1))
    u[:, :E] = w / np.maximum(cnt, 1)
    slot_load = _take(u, idx)
    return slot_load.reshape(L, N // S, S).sum(-1), cnt


def _layer_balance(rank_load: np.ndarray, target: np.ndarray, speed: np.ndarray) -> np.ndarray:
    """``[L]`` max over target ranks of load/speed, over total load / total target speed."""
    eff = (rank_load / speed)[:, target]
    total = rank_load[:, target].sum(1)
    mean = total / speed[target].sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        out = eff.max(1) / mean
    return np.where(total > 0, out, 1.0)


def layer_balance(placement: Placement, load: Any, alive: Any | None = None, rank_speed: Any | None = None) -> torch.Tensor:
    """``[layers]`` ``torch.float64``: per layer, the largest live-rank load over the mean
    live-rank load.

    Each expert's load (``load[l, e]``, any unit, e.g. tokens per step) is split evenly over its
    replicas on live ranks; an expert with no live replica contributes nothing. With
    ``rank_speed`` (``[R]``, relative throughput) a rank's load is divided by its speed and the
    mean is the total over the total live speed. A layer without load has balance 1.0.
    """
    R = placement.num_ranks
    alive_m = np.ones(R, dtype=bool) if alive is None else _alive_arg(R, alive, None, None, grow=False)
    if not alive_m.any():
        raise InvalidArgument("no live rank")
    w = _load_array(load, placement.num_layers, placement.num_experts)
    p = placement.masked(torch.from_numpy(alive_m)).phy2log.numpy()
    rank_load, _ = _rank_loads(p, w, placement.slots_per_rank)
    return torch.from_numpy(_layer_balance(rank_load, alive_m, _speed(rank_speed, R)))


def balance(placement: Placement, load: Any, alive: Any | None = None, rank_speed: Any | None = None) -> float:
    """A placement's balance: the mean over layers of :func:`layer_balance` (1.0 is perfect)."""
    return float(layer_balance(placement, load, alive, rank_speed).mean())


def moved_slots(a: Placement, b: Placement, alive: Any | None = None) -> int:
    """Slots on live ranks whose logical expert differs between ``a`` and ``b`` and that hold an
    expert in ``b``: each is one expert's weights crossing the network. A slot emptied (a leaving
    rank's) loads nothing and is not counted. The placement with fewer ranks is grown with empty
    ranks first."""
    if a.slots_per_rank != b.slots_per_rank:
        raise InvalidArgument("placements differ in slots_per_rank")
    if a.num_layers != b.num_layers:
        raise InvalidArgument("placements differ in layers")
    if a.num_ranks < b.num_ranks:
        a = a.with_ranks(b.num_ranks)
    elif a.num_ranks > b.num_ranks:
        b = b.with_ranks(a.num_ranks)
    live = torch.ones(a.num_slots, dtype=torch.bool) if alive is None else a.alive_slots(alive)
    changed = (a.phy2log != b.phy2log) & (b.phy2log >= 0) & live.unsqueeze(0)
    return int(changed.sum())


def lower_bound(current: Placement, alive: Any, leaving: Any | None = None) -> int:
    """Moves any valid plan needs: (layer, expert) pairs with no replica on a rank that is alive
    and not leaving."""
    alive_m = _alive_arg(current.num_ranks, alive, None, None)
    R = alive_m.size
    cur = current.with_ranks(R) if R > current.num_ranks else current
    target = alive_m & ~_leaving_arg(leaving, R)
    return int((cur.masked(torch.from_numpy(target)).logcnt == 0).sum())


# ---------------------------------------------------------------------------------- initial


def _replicate(w: np.ndarray, num_slots: int) -> np.ndarray:
    """``[B, E]`` replica counts summing to ``num_slots`` per row, minimising the largest
    per-replica load: each extra replica goes to the expert with the largest load per replica
    (ties to the lowest id)."""
    B, E = w.shape
    cnt = np.ones((B, E), dtype=np.int64)
    rows = np.arange(B)
    for _ in range(num_slots - E):
        e = (w / cnt).argmax(1)
        cnt[rows, e] += 1
    return cnt


def _pack(items_load: np.ndarray, num_packs: int, capacity: int) -> np.ndarray:
    """Greedy longest-processing-time packing, vectorised over rows.

    ``items_load`` ``[B, n]`` with ``n == num_packs * capacity``; returns ``[B, n]``, the pack of
    each item: items in descending load each go to the lightest pack with room (ties to the lowest
    pack id), then swaps with the heaviest pack improve the result (:func:`_improve_packing`).
    """
    B, n = items_load.shape
    order = np.argsort(-items_load, axis=1, kind="stable")
    pack_load = np.zeros((B, num_packs))
    pack_fill = np.zeros((B, num_packs), dtype=np.int64)
    pack_of = np.empty((B, n), dtype=np.int64)
    rows = np.arange(B)
    for k in range(n):
        item = order[:, k]
        pk = np.where(pack_fill < capacity, pack_load, _INF).argmin(1)
        pack_of[rows, item] = pk
        pack_load[rows, pk] += items_load[rows, item]
        pack_fill[rows, pk] += 1
    return _improve_packing(items_load, pack_of, num_packs, capacity)


def _improve_packing(items_load: np.ndarray, pack_of: np.ndarray, num_packs: int, capacity: int, rounds: int = 64) -> np.ndarray:
    """Swap an item of the heaviest pack with an item of another pack while that strictly lowers
    the largest pack load (both packs of the swap end below the old maximum, and so does every
    other pack); vectorised over rows, at most ``rounds`` swaps."""
    B, n = items_load.shape
    if num_packs < 2 or capacity == 0:
        return pack_of
    rows = np.arange(B)
    pack_of = pack_of.copy()
    active = np.ones(B, dtype=bool)
    for _ in range(rounds):
        pack_load = _counts_weighted(pack_of, items_load, num_packs)
        order = np.argsort(-pack_load, axis=1, kind="stable")[:, :3]
        top = _take(pack_load, order)
        hmax, h = top[:, 0], order[:, 0]
        hot = np.argsort(pack_of != h[:, None], axis=1, kind="stable")[:, :capacity]  # items of h
        wi = _take(items_load, hot)
        other = _take(pack_load, pack_of)  # [B, n] load of each item's pack
        d = items_load[:, None, :] - wi[:, :, None]  # [B, i, j]: w_j - w_i
        third = top[:, 2:3] if num_packs > 2 else np.full((B, 1), -_INF)
        rest = np.where(pack_of == order[:, 1:2], third, top[:, 1:2])  # max over packs but h, j's
        score = np.maximum(np.maximum(hmax[:, None, None] + d, other[:, None, :] - d), rest[:, None, :])
        ok = (pack_of != h[:, None])[:, None, :] & (d < 0)
        score = np.where(ok, score, _INF).reshape(B, -1)
        arg = score.argmin(1)
        best = score[rows, arg]
        apply = active & (best < hmax - _MIN_GAIN * np.abs(hmax))
        active = apply
        if not apply.any():
            break
        i = hot[rows, arg // n]
        j = arg % n
        pi, pj = pack_of[rows, i], pack_of[rows, j]
        pack_of[rows, i] = np.where(apply, pj, pi)
        pack_of[rows, j] = np.where(apply, pi, pj)
    return pack_of


def _counts_weighted(idx: np.ndarray, weights: np.ndarray, K: int) -> np.ndarray:
    L = idx.shape[0]
    flat = (idx + (np.arange(L) * K)[:, None]).ravel()
    return np.bincount(flat, weights=weights.ravel(), minlength=L * K).reshape(L, K)


@metrics.counts_refusals("planner")
def initial(load: Any, num_ranks: int, slots_per_rank: int, num_groups: int | None = None, num_nodes: int = 1) -> Placement:
    """A balanced first placement for ``load`` ``[layers, experts]`` (or ``[experts]``).

    Hierarchical when ``num_groups`` is given, ``num_nodes > 1`` and the groups divide evenly over
    the nodes (DeepSeek's policy: pack expert groups onto nodes, replicate within each node, then
    pack each node's replicas onto its ranks, so that group-limited routing stays inside a node);
    global otherwise (replicate over all slots, pack onto all ranks). Replica counts minimise the
    largest per-replica load; packing is greedy by descending load, then improved by swaps with
    the heaviest rank, so it is never less balanced than the greedy packing alone.

    Raises :class:`RedundancyExhausted` if ``num_ranks * slots_per_rank < experts``, and
    :class:`~elasticep.errors.InvalidArgument` (a ``ValueError``) for a load that is not a
    non-empty array of finite non-negative numbers or counts that are not positive integers.
    """
    w = _load_array(load, None, None)
    L, E = w.shape
    if L == 0 or E == 0:
        raise InvalidArgument(f"load must have at least one layer and one expert, got shape {tuple(w.shape)}")
    R, S = _count_arg(num_ranks, "num_ranks"), _count_arg(slots_per_rank, "slots_per_rank")
    if num_groups is not None:
        num_groups = _count_arg(num_groups, "num_groups")
    num_nodes = _count_arg(num_nodes, "num_nodes")
    N = R * S
    if N < E:
        raise RedundancyExhausted(E, N, detail=f"{R} ranks x {S} slots for {E} experts")
    hierarchical = (
        num_groups is not None and num_nodes > 1 and num_groups % num_nodes == 0
        and E % num_groups == 0 and R % num_nodes == 0
    )
    if hierarchical:
        phy2log = _initial_hierarchical(w, R, S, int(num_groups), int(num_nodes))
    else:
        phy2log = _assemble(w, R, S)
    return Placement(torch.from_numpy(phy2log), S, E)


def _assemble(w: np.ndarray, R: int, S: int) -> np.ndarray:
    """Replicate experts ``w`` ``[B, E]`` onto ``R * S`` slots and pack them onto ``R`` ranks;
    ``[B, R*S]`` expert of each slot, each rank's slots in ascending expert order."""
    B, E = w.shape
    N = R * S
    # Replica counts that minimise the largest load per replica can still pack badly on very
    # skewed loads (a hot expert split into more pieces than there are ranks, each over half a
    # rank's share, so that some rank holds two); other candidates hold back k of the extra
    # replicas from that rule and give them to the lightest experts instead. Each candidate is
    # packed and every row keeps its best (k = 0 first on ties: the plain rule).
    extra = N - E
    ks = sorted({0, *(k for k in (R // 4, R // 2, R) if 0 < k <= min(extra, E))})
    best_p, best_peak = None, None
    for k in ks:
        cnt = _replicate(w, N - k)
        if k:
            light = np.argsort(w / cnt, axis=1, kind="stable")[:, :k]
            np.put_along_axis(cnt, light, np.take_along_axis(cnt, light, 1) + 1, 1)
        rep = np.repeat(np.tile(np.arange(E), B), cnt.ravel()).reshape(B, N)
        rep_load = _take(w / cnt, rep)
        pack_of = _pack(rep_load, R, S)
        order = np.argsort(pack_of * (E + 1) + rep, axis=1, kind="stable")
        cand = _take(rep, order)
        peak = _counts_weighted(pack_of, rep_load, R).max(1)
        if best_p is None:
            best_p, best_peak = cand, peak
        else:
            better = peak < best_peak * (1 - 1e-9)
            best_p = np.where(better[:, None], cand, best_p)
            best_peak = np.where(better, peak, best_peak)
    return best_p


def _initial_hierarchical(w: np.ndarray, R: int, S: int, G: int, nodes: int) -> np.ndarray:
    L, E = w.shape
    gsize = E // G
    node_of_group = _pack(w.reshape(L, G, gsize).sum(-1), nodes, G // nodes)  # [L, G]
    node_of_expert = np.repeat(node_of_group, gsize, axis=1)
    order = np.argsort(node_of_expert * E + np.arange(E), axis=1, kind="stable")  # node-major
    E_node, R_node = E // nodes, R // nodes
    node_experts = order.reshape(L * nodes, E_node)
    node_load = _take(w, order).reshape(L * nodes, E_node)
    local = _assemble(node_load, R_node, S)  # [L*nodes, R_node*S], index into node_experts
    return _take(node_experts, local).reshape(L, R * S)


# ---------------------------------------------------------------------------------- replan


@metrics.counts_refusals("planner")
def replan(
    current: Placement,
    load: Any,
    alive: Any = None,
    *,
    alive_mask: Any = None,
    alive_ranks: Any = None,
    max_moves: int | None = None,
    rank_speed: Any | None = None,
    leaving: Any | None = None,
    tolerance: float = 0.01,
) -> Plan:
    """Plan the placement for a new membership, starting from ``current``.

    Args:
        current: the placement in force (slots of dead ranks may still show their old expert;
            they are ignored).
        load: ``[layers, experts]`` (or ``[experts]``, the same for every layer) non-negative
            expected load per expert, e.g. tokens routed to it over the last window.
        alive: the live ranks, given once in one of three forms. ``alive_mask=``: ``[R]`` bool, or
            0/1 integers (SGLang's ``torch.int32`` ``active_ranks``). ``alive_ranks=``: distinct
            rank ids; an id at or past ``current.num_ranks`` adds ranks (scale-up). Positional
            ``alive``: a bool mask or a list/range of ids; an integer tensor is refused as
            ambiguous (:class:`~elasticep.errors.InvalidArgument`).
            ``R`` may exceed ``current.num_ranks`` (scale-up: the new ranks start empty). A rank
            alive again after a failure (rejoin) holds what ``current`` says for it; pass its
            slots as -1 if its weights were lost.
        max_moves: live slots that may change beyond the coverage repair (None: no limit; 0:
            repair only). The repair itself always takes exactly ``lower_bound`` moves.
        rank_speed: ``[R]`` positive relative throughput; a rank at 0.5 is given about half the
            load of a rank at 1.0 (gray, slow ranks).
        leaving: ``[R]`` bool mask or rank ids of ranks that are alive but leaving (graceful
            scale-down): their slots become -1, every expert only they held is re-homed on the
            remaining ranks, and moves may copy from them while they are still up.
        tolerance: a layer whose most loaded rank is within this fraction of the mean is left as
            it is: one more expert crossing the network would buy less than it costs.

    Returns:
        a :class:`Plan`; the same inputs always give the same plan.

    Raises:
        RedundancyExhausted: the remaining ranks have fewer slots than there are experts
            (counted in ``elasticep_redundancy_exhausted_total``).
        InvalidArgument: inconsistent shapes or values, or an argument of the wrong type (a
            ``ValueError``, as before).
    """
    S = current.slots_per_rank
    alive_m = _alive_arg(current.num_ranks, alive, alive_mask, alive_ranks)
    R = alive_m.size
    cur = current.with_ranks(R) if R > current.num_ranks else current
    leaving_m = _leaving_arg(leaving, R)
    target = alive_m & ~leaving_m
    speed = _speed(rank_speed, R)
    L, E, N = cur.num_layers, cur.num_experts, cur.num_slots
    w = _load_array(load, L, E)
    live_slots = int(target.sum()) * S
    if live_slots < E:
        metrics.REDUNDANCY_EXHAUSTED.inc()
        raise RedundancyExhausted(
            E, live_slots,
            detail=f"{int(target.sum())} ranks to hold experts x {S} slots "
            f"({int(alive_m.sum())} alive, {int((alive_m & leaving_m).sum())} of them leaving)",
        )
    if max_moves is not None:
        try:
            max_moves = operator.index(max_moves)
        except TypeError:
            raise InvalidArgument(f"max_moves must be an int >= 0 or None, not {max_moves!r}") from None
        if max_moves < 0:
            raise InvalidArgument(f"max_moves must be an int >= 0 or None, not {max_moves}")
    budget = max_moves

    cur_p = cur.phy2log.numpy()
    p, _, lb, before, after, covered = _plan_core(cur_p, w, target, speed, S, budget, float(tolerance))
    if not covered:  # impossible when live_slots >= E: a guard on invariant 4
        raise AssertionError("planner left an expert without a live replica")

    move_layer, move_slot = np.nonzero((p != cur_p) & (p >= 0))
    move_expert = p[move_layer, move_slot]
    rebalance_moves = int(move_slot.size) - lb
    return Plan(
        placement=Placement(torch.from_numpy(p), S, E),
        current=cur,
        alive=torch.from_numpy(alive_m),
        target=torch.from_numpy(target),
        lower_bound=lb,
        repair_moves=lb,
        rebalance_moves=rebalance_moves,
        balance_before=before,
        balance_after=after,
        reason=_reason(cur, alive_m, leaving_m, lb, rebalance_moves, budget, before, after),
        move_layer=torch.from_numpy(move_layer.astype(np.int64)),
        move_slot=torch.from_numpy(move_slot.astype(np.int64)),
        move_expert=torch.from_numpy(move_expert.astype(np.int64)),
    )


def _plan_core(
    cur_p: np.ndarray, w: np.ndarray, target: np.ndarray, speed: np.ndarray, S: int, budget: int | None,
    tolerance: float, native: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, int, float, float, bool]:
    """Repair, rebalance and reseat ``cur_p`` ``[L, N]`` for the ``target`` ranks: ``(placement,
    repaired, lower_bound, balance_before, balance_after, covered)``, where ``repaired`` is the
    placement after the coverage repair alone, the balances are those of ``repaired`` and of the
    placement (means over layers) and ``covered`` says every expert has a replica.

    ``native`` None: the C++ core (``elasticep._C.eplb_plan_core``, csrc/eplb_planner.cpp) when
    the extension has it and ``ELASTICEP_PLANNER`` is not ``python``, else
    :func:`_plan_reference`. The two compute the same plans (tests/test_eplb_native.py); the
    Python one is the reference and documents the semantics."""
    if native is None:
        native = _NATIVE is not None and (budget is None or budget <= _NATIVE_MAX_BUDGET)
    if native:
        if _NATIVE is None:
            raise RuntimeError("elasticep._C has no eplb_plan_core: rebuild the extension (scripts/setup.sh)")
        b = -1 if budget is None else int(budget)
        try:
            p, repaired, lb, before, after, covered = _NATIVE(
                np.ascontiguousarray(cur_p, dtype=np.int64), np.ascontiguousarray(w, dtype=np.float64),
                np.ascontiguousarray(target, dtype=bool), np.ascontiguousarray(speed, dtype=np.float64),
                int(S), b, float(tolerance))
        except RuntimeError as exc:  # a broken invariant in the core, as the reference's guards raise it
            raise AssertionError(str(exc)) from None
        return p, repaired, int(lb), float(before), float(after), bool(covered)
    p, repaired, lb = _plan_reference(cur_p, w, target, speed, S, budget, tolerance)
    before = float(_layer_balance(_rank_loads(repaired, w, S)[0], target, speed).mean())
    rank_load, cnt = _rank_loads(p, w, S)
    after = float(_layer_balance(rank_load, target, speed).mean())
    return p, repaired, lb, before, after, bool((cnt > 0).all())


def _plan_reference(
    cur_p: np.ndarray, w: np.ndarray, target: np.ndarray, speed: np.ndarray, S: int, budget: int | None,
    tolerance: float,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The replan core in numpy, vectorised over layers (the reference; see :func:`_plan_core`)."""
    E = w.shape[1]
    tslot = np.repeat(target, S)  # [N]
    p = np.where(tslot[None, :], cur_p, EMPTY)
    start = p
    p, lb = _repair(start, w, tslot, target, speed, S)
    if lb:
        p = _repair_by_counts(p, start, cur_p, w, target, speed, S)
    # under a budget, fewer pairs per layer and round first: the moves go to the hottest ranks
    # of each layer; the wider search (8 pairs) takes what that leaves
    repaired = p
    if budget is None:
        p = _rebalance(p, cur_p, w, tslot, target, speed, S, None, tolerance)
    else:
        p = _rebalance(p, cur_p, w, tslot, target, speed, S, min(budget, 2 * lb), tolerance, 2)
        left = budget - (int(((p != cur_p) & (p >= 0)).sum()) - lb)
        if left > 0:
            p = _rebalance(p, cur_p, w, tslot, target, speed, S, left, tolerance)
            left = budget - (int(((p != cur_p) & (p >= 0)).sum()) - lb)
        if left > budget // 20:
            # the budget did not bind (a twentieth or more unspent): the wide search alone may
            # end in a better place
            wide = _rebalance(repaired, cur_p, w, tslot, target, speed, S, budget, tolerance)
            if _layer_balance(_rank_loads(wide, w, S)[0], target, speed).mean() < \
                    _layer_balance(_rank_loads(p, w, S)[0], target, speed).mean() - 1e-12:
                p = wide
    p = _reseat_stuck(p, start, cur_p, w, tslot, target, speed, S, budget, lb, tolerance)
    p = _descend(p, repaired, cur_p, w, target, speed, S, budget, lb, tolerance)
    # a safety net: where simply filling the holes in order happens to balance a layer better
    # than the search did (small layers with few ranks, where a greedy step can get stuck), take
    # it; it costs the lower bound only, so the budget still holds
    for prefer_empty in (True, False):
        plain = _fill_in_order(start, tslot, E, prefer_empty)
        peak = _layer_balance(_rank_loads(p, w, S)[0], target, speed)
        plain_peak = _layer_balance(_rank_loads(plain, w, S)[0], target, speed)
        better = plain_peak < peak - 1e-12
        if better.any():
            p = np.where(better[:, None], plain, p)
    return p, repaired, lb


def _reason(cur: Placement, alive: np.ndarray, leaving: np.ndarray, lb: int, reb: int, budget: int | None, before: float, after: float) -> str:
    parts = [f"{int(alive.sum())}/{cur.num_ranks} ranks alive"]
    dead = np.flatnonzero(~alive).tolist()
    left = np.flatnonzero(alive & leaving).tolist()
    if dead:
        parts.append(f"dead {_ranks(dead)}")
    if left:
        parts.append(f"leaving {_ranks(left)}")
    live_slot = np.repeat(alive & ~leaving, cur.slots_per_rank)
    empty_live = int(((cur.phy2log.numpy() < 0) & live_slot[None, :]).sum())
    if empty_live:
        parts.append(f"{empty_live} empty live slots over all layers")
    budget_s = "unlimited" if budget is None else str(budget)
    return (
        f"{', '.join(parts)}: {lb} moves restore every expert (the lower bound), {reb} more "
        f"rebalance (budget {budget_s}); balance {before:.3f} -> {after:.3f}"
    )


def _ranks(ids: list[int]) -> str:
    return "[" + ",".join(str(i) for i in ids[:8]) + (",..." if len(ids) > 8 else "") + "]"


class _State:
    """Per-slot and per-rank quantities of a working placement ``p`` ``[L, N]``, recomputed from
    scratch each round: cheap at these sizes, and no incremental bookkeeping to get wrong.
    ``full`` adds what the rebalance scores need beyond the repair's."""

    def __init__(self, p: np.ndarray, w_ext: np.ndarray, speed: np.ndarray, S: int, full: bool = True):
        L, N = p.shape
        E1 = w_ext.shape[1]
        E = E1 - 1
        R = N // S
        uniform = bool((speed == 1.0).all())
        # working placements hold -1 on every slot of a rank that is not a target
        self.idx = idx = np.where(p < 0, E, p)
        flat = (idx + (np.arange(L) * E1)[:, None]).ravel()
        cnt = np.bincount(flat, minlength=L * E1).reshape(L, E1).astype(np.float64)
        cnt[:, E] = 0
        self.cnt = cnt
        self.u = w_ext / np.maximum(cnt, 1)  # [L, E+1] load per replica now
        # rise of each remaining replica's load if one replica goes; inf where none may go
        spare = cnt >= 2
        delta = np.full((L, E1), _INF)
        np.divide(w_ext, cnt - 1, out=delta, where=spare)
        np.subtract(delta, self.u, out=delta, where=spare)
        delta[:, E] = 0.0  # an empty slot can always be taken
        self.slot_u = self.u.ravel()[flat].reshape(L, N)
        self.load = self.slot_u.reshape(L, R, S).sum(-1)  # [L, R]
        self.eff = self.load if uniform else self.load / speed
        self.eff_slot = np.repeat(self.eff, S, axis=1)  # [L, N] effective load of each slot's rank
        self.slot_delta = delta.ravel()[flat].reshape(L, N)
        self.spd_slot = np.repeat(speed, S)
        # worst host of each expert once it loses one replica (a rank holding two replicas is
        # counted once: an estimate; every step is checked exactly before it is applied); only
        # experts with a replica to spare matter
        movable = (p >= 0) & spare.ravel()[flat].reshape(L, N)
        host_val = self.eff_slot[movable] + (self.slot_delta[movable] if uniform else self.slot_delta[movable] / np.broadcast_to(self.spd_slot, (L, N))[movable])
        host_max = np.full(L * E1, -_INF)
        np.maximum.at(host_max, flat[movable.ravel()], host_val)
        self.host_max = host_max.reshape(L, E1)
        self.full = full
        if full:
            self.u_plus = w_ext / (cnt + 1)  # with one more replica
            # per expert, over its replicas' ranks: sum of eff/speed and of 1/speed^2, so that
            # the change in the sum of squared rank loads when every replica's share moves by d
            # is -2 d A1 + d^2 A2 (d > 0 a drop) or 2 d A1 + d^2 A2 (a rise)
            if uniform:
                self.A1 = np.bincount(flat, weights=self.eff_slot.ravel(), minlength=L * E1).reshape(L, E1)
                self.A2 = cnt
            else:
                inv = np.where(p >= 0, 1.0 / self.spd_slot, 0.0)
                self.A1 = np.bincount(flat, weights=(self.eff_slot * inv).ravel(), minlength=L * E1).reshape(L, E1)
                self.A2 = np.bincount(flat, weights=(inv * inv).ravel(), minlength=L * E1).reshape(L, E1)

    def exact(self, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``[L]`` each: peak effective load over target ranks, sum of squared effective loads,
        and whether every expert has a replica."""
        eff = self.eff[:, target]
        return eff.max(1), (eff * eff).sum(1), (self.cnt[:, :-1] > 0).all(1)

    def merge(self, other: _State, rows: np.ndarray, at: np.ndarray | None = None) -> None:
        """Take ``other``'s values for its layers where ``rows`` is True; ``at`` maps ``other``'s
        layers to this state's (``other`` may hold a subset of them)."""
        dest = np.flatnonzero(rows) if at is None else at[rows]
        for name, value in vars(self).items():
            if isinstance(value, np.ndarray) and value.ndim == 2:  # per-layer rows
                value[dest] = getattr(other, name)[rows]

    def rows(self, sub: np.ndarray) -> _State:
        """A state of the layers ``sub`` only (copies; ``self`` when ``sub`` is every layer)."""
        if sub.size == self.eff.shape[0]:
            return self
        out = object.__new__(_State)
        for name, value in vars(self).items():
            setattr(out, name, value[sub] if isinstance(value, np.ndarray) and value.ndim == 2 else value)
        return out


def _fill_in_order(p: np.ndarray, tslot: np.ndarray, E: int, prefer_empty: bool = True) -> np.ndarray:
    """The plainest coverage repair: each missing expert, in id order, takes the first empty
    target slot, else the first target slot whose expert has another replica (with
    ``prefer_empty=False``: the first target slot that is either). Vectorised over layers; one
    step per missing expert of the layer with the most."""
    L, N = p.shape
    p = p.copy()
    rows = np.arange(L)
    idx = np.where(p < 0, E, p)
    cnt = _counts(idx, E + 1)
    missing = cnt[:, :E] == 0
    per_layer = missing.sum(1)
    order = np.argsort(~missing, axis=1, kind="stable")  # missing ids first, ascending
    for k in range(int(per_layer.max()) if L else 0):
        act = per_layer > k
        e = order[:, k]
        idx = np.where(p < 0, E, p)
        cnt = _counts(idx, E + 1)
        spare = _take(cnt, idx) >= 2
        legal = tslot[None, :] & ((p < 0) | spare)
        # first empty target slot if any, else the first spare replica
        empty = tslot[None, :] & (p < 0)
        t = np.where(empty.any(1), empty.argmax(1), legal.argmax(1)) if prefer_empty else legal.argmax(1)
        p[rows[act], t[act]] = e[act]
    return p


def _repair(p: np.ndarray, w: np.ndarray, tslot: np.ndarray, target: np.ndarray, speed: np.ndarray, S: int) -> tuple[np.ndarray, int]:
    """Give every uncovered expert one slot: exactly one move per uncovered (layer, expert).

    In batches, each placing at most one missing expert per rank: every target rank offers its
    best legal slot (an empty one, or a replica of an expert that keeps another, at most one
    eviction per expert per batch), ranked by the peak it leaves (the rank without the slot's
    current share, and the worst other host of the evicted expert, which takes that share); the
    heaviest missing experts go to the best offers. A batch is usually enough after one failure.
    """
    L, N = p.shape
    E = w.shape[1]
    R = N // S
    _, cnt = _rank_loads(p, w, S)
    missing = cnt == 0  # [L, E]
    left = missing.sum(1)
    lb = int(left.sum())
    if lb == 0:
        return p, 0
    p = p.copy()
    w_ext = np.concatenate([w, np.zeros((L, 1))], 1)
    # missing experts of each layer, heaviest first; `done` of them are placed
    miss_order = np.argsort(-np.where(missing, w, -1.0), axis=1, kind="stable")
    done = np.zeros(L, dtype=np.int64)
    rows1 = np.arange(L)[:, None]
    while left.any():
        st = _State(p, w_ext, speed, S, full=False)
        x_host = _take(st.host_max, st.idx)
        base = np.maximum(st.eff_slot - st.slot_u / st.spd_slot, x_host)
        legal = tslot[None, :] & np.isfinite(st.slot_delta)
        score = np.where(legal, base, _INF).reshape(L, R, S)
        col = score.argmin(-1)  # each rank's best slot
        offer = np.take_along_axis(score, col[:, :, None], -1)[:, :, 0]  # [L, R]
        slot = np.arange(R) * S + col
        evicted = _take(st.idx, slot)
        # best offers first; only the best offer evicting a given expert stays in this batch
        order = np.argsort(offer, axis=1, kind="stable")
        offer, slot, evicted = _take(offer, order), _take(slot, order), _take(evicted, order)
        key = np.where(evicted < E, evicted, E + np.arange(R)[None, :])
        kord = np.argsort(key, axis=1, kind="stable")
        skey = _take(key, kord)
        first = np.ones((L, R), dtype=bool)
        first[:, 1:] = skey[:, 1:] != skey[:, :-1]
        keep = np.zeros((L, R), dtype=bool)
        np.put_along_axis(keep, kord, first, 1)
        ok = keep & np.isfinite(offer)
        # the j-th heaviest missing expert takes the j-th best usable offer
        rank_in = np.cumsum(ok, axis=1) - 1
        use = ok & (rank_in < left[:, None])
        e_pos = np.minimum(done[:, None] + rank_in, E - 1)
        experts = _take(miss_order, e_pos)
        p[np.broadcast_to(rows1, use.shape)[use], slot[use]] = experts[use]
        placed = use.sum(1)
        if ((left > 0) & (placed == 0)).any():  # live slots >= experts guarantees an offer
            raise AssertionError("coverage repair found no legal slot")
        done += placed
        left -= placed
    return p, lb


def _repair_by_counts(p: np.ndarray, start: np.ndarray, cur_p: np.ndarray, w: np.ndarray, target: np.ndarray,
                      speed: np.ndarray, S: int) -> np.ndarray:
    """The repair decided by replica counts instead of slot by slot, also at the lower bound's
    cost; each layer keeps the better balanced of the two (``p``, the slot-by-slot repair).

    On skewed loads the slot-by-slot repair can take the slots of one hot expert's replicas
    again and again. Here the counts come first: every missing expert gets one replica and the
    surplus is given up by the experts that lose least by it (smallest load per remaining
    replica, :func:`elasticep.eplb._repack.keep_counts`); each gives up its replica on its most
    loaded host, and the missing experts, heaviest first, take the freed slots on the least
    loaded ranks (:func:`elasticep.eplb._repack.repack` with no eviction for load and no bumps:
    one move per missing expert)."""
    L, E = w.shape
    live = int(target.sum()) * S
    miss = (_counts(np.where(p < 0, E, p), E + 1)[:, :E] == 0).any(1)  # guard: p covers all
    if miss.any():
        raise AssertionError("coverage repair left an expert without a replica")
    cc = _counts(np.where(start < 0, E, start), E + 1)[:, :E]
    need = (cc == 0).any(1)
    if not need.any():
        return p
    sub = np.flatnonzero(need)
    c = _repack.keep_counts(cc[sub], w[sub], live)
    # a cap no rank can reach (a rank carries at most the whole layer: n times the mean)
    q = _repack.repack(start[sub], w[sub], c, target, speed, S, np.full(sub.size, 1e12), max_bumps=0)
    same_cost = ((q != cur_p[sub]) & (q >= 0)).sum(1) <= ((p[sub] != cur_p[sub]) & (p[sub] >= 0)).sum(1)
    bq = _layer_balance(_rank_loads(q, w[sub], S)[0], target, speed)
    bp = _layer_balance(_rank_loads(p[sub], w[sub], S)[0], target, speed)
    better = same_cost & (bq < bp - 1e-12)
    if not better.any():
        return p
    p = p.copy()
    p[sub[better]] = q[better]
    return p


def _rebalance(
    p: np.ndarray,
    cur_p: np.ndarray,
    w: np.ndarray,
    tslot: np.ndarray,
    target: np.ndarray,
    speed: np.ndarray,
    S: int,
    budget: int | None,
    tolerance: float,
    max_pairs: int = 8,
) -> np.ndarray:
    """Pairwise local search within ``budget`` changed slots.

    Each round pairs, in every layer, the k-th most loaded target rank with the k-th least loaded
    one (k < ``max_pairs``) and scores two kinds of step for each pair: *replicate* (one changed
    slot) puts one more replica of an expert of the hot rank into a slot of the cold rank that is
    empty or holds a replica its expert can spare; *swap* (two changed slots) trades an expert of
    the hot rank for a lighter one of the cold rank. A step must bring the hot rank down without
    lifting anything to its level; among those, the one that lowers the sum of squared rank loads
    the most per changed slot wins. A layer's steps are checked exactly (its peak may not rise,
    its sum of squares must fall, every expert keeps a replica) before they are applied; when
    they fail together, the hottest pair's step alone is tried, and when that fails too its cold
    slot is set aside. A layer stops when nothing is left to try or it is within ``tolerance``.
    With a budget, steps go first to the pairs whose hot rank stands out most.
    """
    L, N = p.shape
    E = w.shape[1]
    n_target = int(target.sum())
    K = min(max_pairs, n_target // 2)
    if budget == 0 or K == 0:
        return p
    p = p.copy()
    w_ext = np.concatenate([w, np.zeros((L, 1))], 1)
    active = np.ones(L, dtype=bool)
    banned = np.zeros((L, N), dtype=bool)  # cold slots whose step failed the exact check
    remaining = budget
    ar_s = np.arange(S)
    tgt_ids = np.flatnonzero(target)
    mean_all = w.sum(1) / speed[target].sum()  # [L] mean effective rank load
    scale_all = np.maximum(mean_all, 1e-300)
    KS = K * S
    f32 = np.float32
    st_all = _State(p, w_ext, speed, S)
    for _ in range(4 * N):
        eff_all = st_all.eff[:, tgt_ids]
        # a layer within `tolerance` of perfect balance is not worth another transfer
        active &= eff_all.max(1) > (1.0 + tolerance) * mean_all
        if not active.any():
            break
        # the round works on the layers still active only: late rounds touch a few
        sub = np.flatnonzero(active)
        Ls = sub.size
        rows = np.arange(Ls)
        rows1 = rows[:, None]
        st = st_all.rows(sub)
        ps, curs, bans = p[sub], cur_p[sub], banned[sub]
        mean, scale = mean_all[sub], scale_all[sub]
        eps = _MIN_GAIN * scale
        eff_t = eff_all[sub]
        old_max = eff_t.max(1)
        old_ss = (eff_t * eff_t).sum(1)
        order = tgt_ids[np.argsort(-eff_t, axis=1, kind="stable")]  # [Ls, n_target], hottest first
        hot, cold = order[:, :K], order[:, ::-1][:, :K]  # [Ls, K]
        e_h = _take(st.eff, hot)
        e_q = _take(st.eff, cold)
        sp_h, sp_q = speed[hot][:, :, None], speed[cold][:, :, None]  # [Ls, K, 1]
        hs = (hot[:, :, None] * S + ar_s).reshape(Ls, KS)
        qs = (cold[:, :, None] * S + ar_s).reshape(Ls, KS)
        a = _take(st.idx, hs).reshape(Ls, K, S).astype(np.int32)
        ua = _take(st.slot_u, hs).reshape(Ls, K, S)
        ua_plus = _take(st.u_plus, a.reshape(Ls, KS)).reshape(Ls, K, S)
        x = _take(st.idx, qs).reshape(Ls, K, S).astype(np.int32)
        ux = _take(st.slot_u, qs).reshape(Ls, K, S)
        dx = _take(st.slot_delta, qs).reshape(Ls, K, S)
        x_host = _take(st.host_max, x.reshape(Ls, KS)).reshape(Ls, K, S)
        # Scores are [Ls, K, i (hot slot), j (cold slot)]; every term that depends on i or j
        # alone is folded in first, so only a few operations run on the full array, in float32
        # (the step chosen is checked exactly in float64 afterwards).
        eh3 = e_h[:, :, None]
        eq3 = e_q[:, :, None]
        thr = eh3 - eps[:, None, None]  # a step must leave everything below this
        banned_j = _take(bans, qs).reshape(Ls, K, S)
        # replicas of a on the hot rank
        n_a = (a[:, :, :, None] == a[:, :, None, :]).view(np.uint8).sum(-1, dtype=np.uint8).astype(np.float64)
        # replicate a into j: the hot rank and every other host of a shed d_a per replica,
        # j's rank trades x for a, and x's other hosts take its freed share dx
        d_a = ua - ua_plus
        nh1 = eh3 - n_a * d_a / sp_h
        a_flat = a.reshape(Ls, KS)
        a_rest = (-2.0 * d_a * _take(st.A1, a_flat).reshape(Ls, K, S) + d_a * d_a * _take(st.A2, a_flat).reshape(Ls, K, S)
                  - n_a * (-2.0 * eh3 * d_a / sp_h + d_a * d_a / (sp_h * sp_h)))
        term_i = nh1 * nh1 - eh3 * eh3 + a_rest
        ok_i = (a < E) & (nh1 < thr)
        dxf = np.where(np.isfinite(dx), dx, 0.0)
        x_flat = x.reshape(Ls, KS)
        term_j = (2.0 * dxf * _take(st.A1, x_flat).reshape(Ls, K, S) + dxf * dxf * _take(st.A2, x_flat).reshape(Ls, K, S)
                  - (2.0 * eq3 * dxf / sp_q + dxf * dxf / (sp_q * sp_q)))
        x_peak = np.where(dxf > 0, np.where(np.isfinite(x_host), x_host, -_INF), -_INF)
        ok_j = np.isfinite(dx) & ~banned_j & (x_peak < thr)
        P = (ua_plus / sp_q).astype(f32)[:, :, :, None]
        Q = (ux / sp_q).astype(f32)[:, :, None, :]
        eq4 = eq3.astype(f32)[:, :, :, None]
        dq = P - Q  # [Ls, K, S, S] change of j's rank
        dphi1 = dq * (2.0 * eq4 + dq)
        dphi1 += term_i.astype(f32)[:, :, :, None] + term_j.astype(f32)[:, :, None, :]
        differ = a[:, :, :, None] != x[:, :, None, :]
        ok1 = (dq < (thr - eq3).astype(f32)[:, :, :, None]) & differ
        ok1 &= ok_i[:, :, :, None] & ok_j[:, :, None, :]
        # swap a and x: the hot rank gains d2 = ux - ua (< 0), the cold one loses it
        d2 = ux.astype(f32)[:, :, None, :] - ua.astype(f32)[:, :, :, None]
        dh = d2 * (1.0 / sp_h).astype(f32)[:, :, :, None]
        dc = d2 * (1.0 / sp_q).astype(f32)[:, :, :, None]
        dphi2 = 0.5 * (dh * (2.0 * eh3.astype(f32)[:, :, :, None] + dh) + dc * (dc - 2.0 * eq4))
        ok2 = (dh < (thr - eh3).astype(f32)[:, :, :, None]) & (-dc < (thr - eq3).astype(f32)[:, :, :, None]) & differ
        # (never into an empty slot: that would leave a live slot empty; replicate fills those)
        ok2 &= ((x < E) & ~banned_j)[:, :, None, :]
        score = np.empty((Ls, K, 2, S, S), dtype=f32)
        np.copyto(score[:, :, 0], np.where(ok1, dphi1, np.inf))
        np.copyto(score[:, :, 1], np.where(ok2, dphi2, np.inf))
        score = score.reshape(Ls, K, 2 * S * S)
        arg = score.argmin(-1)  # [Ls, K]
        best = score.reshape(Ls * K, -1)[np.arange(Ls * K), arg.ravel()].reshape(Ls, K).astype(np.float64)
        good = best < -1e-6 * scale[:, None] * scale[:, None]
        some = good.any(1)
        active[sub[~some]] = False  # nothing left to try in these layers
        if not some.any():
            break
        kind = arg // (S * S)
        i_col, j_col = (arg % (S * S)) // S, arg % S
        kk = np.arange(K) * S
        slot_i = _take(hs, kk + i_col)
        slot_j = _take(qs, kk + j_col)
        e_i = _take(ps, slot_i)
        e_j = _take(ps, slot_j)
        new_j = np.where(good, e_i, e_j)  # slot j takes the hot rank's expert
        new_i = np.where(good & (kind == 1), e_j, e_i)  # and on a swap slot i the cold one's
        if remaining is not None:
            cost = _slot_cost(_take(curs, slot_j), e_j, new_j) + _slot_cost(_take(curs, slot_i), e_i, new_i)
            # the budget goes first to the pairs whose hot rank stands out most, over all layers
            pri = np.where(good, e_h / scale[:, None], -_INF).ravel()
            ordr = np.argsort(-pri, kind="stable")
            ordr = ordr[good.ravel()[ordr]]
            take = np.cumprod(np.cumsum(cost.ravel()[ordr]) <= remaining).astype(bool)
            chosen = np.zeros(Ls * K, dtype=bool)
            chosen[ordr[take]] = True
            good &= chosen.reshape(Ls, K)
            if not good.any():
                break
            new_j = np.where(good, new_j, e_j)
            new_i = np.where(good, new_i, e_i)
        trial = ps.copy()
        trial[rows1, slot_j] = new_j
        trial[rows1, slot_i] = new_i
        st_trial = _State(trial, w_ext[sub], speed, S)
        t_max, t_ss, t_cov = st_trial.exact(target)
        some = good.any(1)
        passed = some & t_cov & (t_max <= old_max) & (t_ss < old_ss - eps * scale)
        retry = some & ~passed
        if retry.any():
            # where the layer's steps fail together, try the first good pair's step alone
            first = np.argmax(good, axis=1)
            solo = np.zeros_like(good)
            solo[rows, first] = True
            solo &= good & retry[:, None]
            trial2 = ps.copy()
            trial2[rows1, slot_j] = np.where(solo, new_j, e_j)
            trial2[rows1, slot_i] = np.where(solo, new_i, e_i)
            st_trial2 = _State(trial2, w_ext[sub], speed, S)
            t2_max, t2_ss, t2_cov = st_trial2.exact(target)
            ok_solo = retry & t2_cov & (t2_max <= old_max) & (t2_ss < old_ss - eps * scale)
            trial[ok_solo] = trial2[ok_solo]
            st_trial.merge(st_trial2, ok_solo)
            passed |= ok_solo
            good = np.where(ok_solo[:, None], solo, good)
            # a step that fails alone too sets its cold slot aside; the layer tries again
            failed = rows[retry & ~ok_solo]
            banned[sub[failed], slot_j[failed, first[failed]]] = True
        if remaining is not None:
            remaining -= int(cost[passed[:, None] & good].sum())
        p[sub[passed]] = trial[passed]
        if passed.all() and sub.size == L:
            st_all = st_trial
        else:
            st_all.merge(st_trial, passed, sub)
    return p


def _reseat_stuck(
    p: np.ndarray,
    start: np.ndarray,
    cur_p: np.ndarray,
    w: np.ndarray,
    tslot: np.ndarray,
    target: np.ndarray,
    speed: np.ndarray,
    S: int,
    budget: int | None,
    lb: int,
    tolerance: float,
) -> np.ndarray:
    """Second chance for the layers the local search left well off balance (skewed loads, where
    a hot expert that lost replicas needs a new one on a rank that must first shed most of its
    load: no single step of one or two slots gets there).

    Those layers are repacked from ``start`` (sticky: replicas stay where they are unless their
    rank is over the mean; see :mod:`elasticep.eplb._repack`), the local search runs again from
    there within what the budget leaves, and each such layer takes the result if it is better
    balanced; under a budget, layers are switched best gain first while the total fits. Under a
    budget each such layer is also repacked at the slacks of ``_RESEAT_SLACK`` (without bumps),
    options are taken by gain per extra move over all layers while they fit, and the search
    spends the rest on the chosen layers; where both were computed, the better is kept.
    """
    L, E = w.shape
    rank_load, _ = _rank_loads(p, w, S)
    bal = _layer_balance(rank_load, target, speed)
    stuck = bal > 1.0 + max(1.5 * tolerance, 0.015)
    if not stuck.any():
        return p
    moves = ((p != cur_p) & (p >= 0)).sum(1)
    sub = np.flatnonzero(stuck)
    live = int(target.sum()) * S
    st0 = start[sub]
    cc = _counts(np.where(st0 < 0, E, st0), E + 1)[:, :E]
    mean = w[sub].sum(1) / speed[target].sum()
    c = _repack.restore_counts(_repack.keep_counts(cc, w[sub], live), w[sub], 0.5 * mean, S)
    q = _repack.repack(st0, w[sub], c, target, speed, S, np.zeros(sub.size))
    q_moves = ((q != cur_p[sub]) & (q >= 0)).sum(1)
    allowed = None if budget is None else lb + budget - int(moves[~stuck].sum())  # for the stuck layers
    fits = allowed is None or allowed >= int(q_moves.sum())
    out = p
    q0 = q  # the repacks without slack (the search below works on copies)
    if fits:
        # every repack fits: search on from all of them, then keep the layers that gained
        sub_budget = None if allowed is None else allowed - int(q_moves.sum())
        q = _rebalance(q, cur_p[sub], w[sub], tslot, target, speed, S, sub_budget, tolerance, 8 if budget is None else 2)
        if sub_budget is not None:
            sub_left = sub_budget - (int(((q != cur_p[sub]) & (q >= 0)).sum()) - int(q_moves.sum()))
            if sub_left > 0:
                q = _rebalance(q, cur_p[sub], w[sub], tslot, target, speed, S, sub_left, tolerance)
        q_moves = ((q != cur_p[sub]) & (q >= 0)).sum(1)
        q_bal = _layer_balance(_rank_loads(q, w[sub], S)[0], target, speed)
        take = q_bal < bal[sub] - 1e-12
        if allowed is not None:
            # start from the old layers, switch the best gains per extra move first while they fit
            spare = allowed - int(moves[sub].sum())
            extra = q_moves - moves[sub]
            gain = bal[sub] - q_bal
            eff = np.where(extra > 0, gain / np.maximum(extra, 1), _INF)
            take_now = np.zeros(sub.size, dtype=bool)
            for i in np.argsort(-eff, kind="stable"):
                if take[i] and extra[i] <= spare:
                    take_now[i] = True
                    spare -= int(extra[i])
            take = take_now
        if take.any():
            out = p.copy()
            out[sub[take]] = q[take]
        if allowed is None:
            return out
    # under a budget: each stuck layer is repacked at several slacks (a larger slack sheds less
    # load and moves fewer slots), and the options are taken by gain per extra move over all
    # layers while they fit (a layer may trade up to a dearer option); the search spends what is
    # left on the chosen layers. It never lifts a layer's peak, so every chosen layer stays
    # better than before (and an option that costs fewer moves than the layer's plan now is
    # always taken first: the budget holds). Where the full repacks fit too, the better of the
    # two results (over the stuck layers) is kept.
    spare = allowed - int(moves[sub].sum())
    n, T = sub.size, len(_RESEAT_SLACK)
    q_t = np.empty((n, T, q0.shape[1]), dtype=q0.dtype)
    q_t[:, 0] = q0  # _RESEAT_SLACK[0] is 0: the repacks above
    # (with slack and no bumps: what does not fit goes to the free slots, fewer moves)
    q_t[:, 1:] = _repack.repack(np.repeat(st0, T - 1, axis=0), np.repeat(w[sub], T - 1, axis=0),
                                np.repeat(c, T - 1, axis=0), target, speed, S,
                                np.tile(np.asarray(_RESEAT_SLACK[1:]), n), max_bumps=0).reshape(n, T - 1, -1)
    q_t = q_t.reshape(n * T, -1)
    qm_t = ((q_t != np.repeat(cur_p[sub], T, axis=0)) & (q_t >= 0)).sum(1).reshape(n, T)
    qb_t = _layer_balance(_rank_loads(q_t, np.repeat(w[sub], T, axis=0), S)[0], target, speed).reshape(n, T)
    extra_t = qm_t - moves[sub][:, None]
    gain_t = bal[sub][:, None] - qb_t
    pick, spare = _pick_by_gain(gain_t, extra_t, spare)
    ci = np.flatnonzero(pick >= 0)
    if ci.size == 0:
        return out
    q = q_t.reshape(n, T, -1)[ci, pick[ci]]
    q_moves = qm_t[ci, pick[ci]]
    q = _rebalance(q, cur_p[sub[ci]], w[sub[ci]], tslot, target, speed, S, spare, tolerance, 2)
    spare -= int(((q != cur_p[sub[ci]]) & (q >= 0)).sum()) - int(q_moves.sum())
    if spare > 0:
        q = _rebalance(q, cur_p[sub[ci]], w[sub[ci]], tslot, target, speed, S, spare, tolerance)
    alt = p.copy()
    alt[sub[ci]] = q
    if fits:
        b_out = _layer_balance(_rank_loads(out[sub], w[sub], S)[0], target, speed).sum()
        b_alt = _layer_balance(_rank_loads(alt[sub], w[sub], S)[0], target, speed).sum()
        if not b_alt < b_out - 1e-12:
            return out
    return alt


def _descend(
    p: np.ndarray,
    repaired: np.ndarray,
    cur_p: np.ndarray,
    w: np.ndarray,
    target: np.ndarray,
    speed: np.ndarray,
    S: int,
    budget: int | None,
    lb: int,
    tolerance: float,
) -> np.ndarray:
    """Under a budget of at least twice the repair's moves (``lb``; uniform rank speed only): a
    descent on each layer's most loaded rank from the repaired placement, and the budget spread
    over the layers by gain per move.

    Each step works on the layer's most loaded target rank ``h`` (the first on ties) and takes,
    over every expert ``a`` of ``h`` and every slot ``j`` of one of the ``_DESCENT_PARTNERS``
    least loaded target ranks ``q``, the best of two steps: *replicate* ``a`` into ``j`` (empty,
    or holding an expert with a replica to spare: one changed slot; every host of ``a`` sheds
    load, the evicted expert's hosts take its share) and *swap* ``a`` with the expert of ``j``
    (two changed slots; replica counts stay). A step may not involve an expert already on the
    other rank. Its gain is how far the largest of the ranks it changes ends below ``h``'s load
    now (the evicted expert's hosts counted at their most loaded one); gains are taken per
    changed slot (a slot returning to its expert counts as half a move). Each layer records the
    moves and the balance (peak over mean) after every step, until it is within ``tolerance``,
    nothing gains, or it has spent ``1.5 * ceil(budget / L) + 4`` moves beyond its repair. Only
    the layers that the earlier phases (``p``) left above ``tolerance`` descend.

    Then each layer either keeps what the earlier phases gave it or takes a point of its descent:
    options are taken by gain in balance per extra move, over all layers, while the budget allows
    (a layer may trade up to a dearer point, and a point that costs fewer moves than the layer
    spends now is always taken first), as the reseat chooses its options."""
    L, N = p.shape
    E = w.shape[1]
    R = N // S
    tgt = np.flatnonzero(target)
    # a budget under twice the repair's moves goes to the earlier phases: the descent's points
    # cost more than they leave room for there
    if budget is None or budget == 0 or budget < 2 * lb or tgt.size < 2 or not (speed == 1.0).all():
        return p
    E1 = E + 1
    mean = w.sum(1) / speed[target].sum()  # [L]
    eps = _MIN_GAIN * np.maximum(mean, 1e-300)
    lim = (1.0 + tolerance) * mean
    rank_of = np.arange(N) // S
    tslot = np.repeat(target, S)
    ar_s = np.arange(S)
    avg = -(-budget // L)
    cap = ((repaired != cur_p) & (repaired >= 0)).sum(1) + avg + avg // 2 + 4

    def peaks(x: np.ndarray, wx: np.ndarray) -> np.ndarray:
        rl, _ = _rank_loads(x, wx, S)
        return np.where(target[None, :], rl, -_INF).max(1)

    def bal(pk: np.ndarray) -> np.ndarray:  # a layer without load has balance 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(mean > 0, pk / mean, 1.0)

    q = repaired.copy()
    moves_now = ((q != cur_p) & (q >= 0)).sum(1)
    peak_now = peaks(q, w)
    hist_m, hist_b = [moves_now.copy()], [bal(peak_now)]
    hist_steps: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    # only the layers the earlier phases left off balance descend
    peak_p = peaks(p, w)
    active = peak_p > lim
    mult = np.array([2.0, 2.0, 2.0, 1.0, 0.5])  # per changed slots -2..2: powers of two, exact
    while True:
        active &= (peak_now > lim) & (moves_now < cap)
        if not active.any():
            break
        sub = np.flatnonzero(active)
        Ls = sub.size
        rows = np.arange(Ls)
        qs, ws, cs = q[sub], w[sub], cur_p[sub]
        idx = np.where(qs < 0, E, qs)
        cnt = _counts(idx, E1)
        cnt[:, E] = 0
        cntf = cnt.astype(np.float64)
        w_ext = np.concatenate([ws, np.zeros((Ls, 1))], 1)
        u = w_ext / np.maximum(cntf, 1.0)
        slot_u = _take(u, idx)
        load = slot_u.reshape(Ls, R, S).sum(-1)
        eff = np.where(target[None, :], load, -_INF)
        h = eff.argmax(1)
        pk = eff[rows, h]
        # which rank holds which expert, and each expert's most loaded host
        holds = np.zeros((Ls, R, E1), dtype=bool)
        holds[rows[:, None], rank_of[None, :], idx] = True
        holds[:, :, E] = False  # an empty slot holds no expert
        slot_load = load[:, rank_of]  # [Ls, N]
        hm = np.full((Ls, E1), -_INF)
        np.maximum.at(hm, (np.broadcast_to(rows[:, None], (Ls, N)), idx), slot_load)
        hs = h[:, None] * S + ar_s  # [Ls, S]
        a = _take(idx, hs)  # [Ls, S]
        a_now = _take(qs, hs)
        ua = _take(u, a)
        x = idx  # [Ls, N]
        ux = slot_u
        cx = _take(cntf, x)
        # partners: the least loaded target ranks
        eff_c = np.where(target[None, :], load, _INF)
        cold = np.argsort(eff_c, axis=1, kind="stable")[:, :min(_DESCENT_PARTNERS, tgt.size - 1)]
        partner = np.zeros((Ls, R), dtype=bool)
        partner[rows[:, None], cold] = True
        # steps never touch an expert already on the other rank
        ok = (a[:, :, None] < E) & (a[:, :, None] != x[:, None, :])
        ok &= tslot[None, None, :] & partner[:, rank_of][:, None, :] & (rank_of[None, None, :] != h[:, None, None])
        ok &= ~holds[rows[:, None, None], rank_of[None, None, :], a[:, :, None]]
        ok &= ~_take(holds.reshape(Ls, R * E1), h[:, None] * E1 + x)[:, None, :]
        pk3 = pk[:, None, None]
        lq = slot_load[:, None, :]
        # replicate a into j
        up = _take(w_ext, a) / (_take(cntf, a) + 1.0)
        da = ua - up
        nah = (a[:, :, None] == a[:, None, :]).sum(-1).astype(np.float64)
        new_h0 = pk[:, None] - nah * da  # [Ls, S]
        new_q0 = lq - ux[:, None, :] + up[:, :, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            rise = np.where(cx >= 2.0, _take(w_ext, x) / (cx - 1.0) - ux, 0.0)
        x_pk = np.where(x < E, _take(hm, x) + rise, -_INF)  # [Ls, N]
        ok0 = ok & ((x == E) | (cx >= 2.0))[:, None, :]
        g0 = pk3 - np.maximum(np.maximum(new_h0[:, :, None], new_q0), x_pk[:, None, :])
        # swap a and x
        d = ua[:, :, None] - ux[:, None, :]
        g1 = pk3 - np.maximum(pk3 - d, lq + d)
        ok1 = ok & (x < E)[:, None, :]
        # changed slots of each step
        a_b = np.broadcast_to(a_now[:, :, None], (Ls, S, N))
        cj = _slot_cost(np.broadcast_to(cs[:, None, :], (Ls, S, N)), np.broadcast_to(qs[:, None, :], (Ls, S, N)), a_b)
        ci = _slot_cost(np.broadcast_to(_take(cs, hs)[:, :, None], (Ls, S, N)), a_b,
                        np.broadcast_to(qs[:, None, :], (Ls, S, N)))
        sc0 = g0 * mult[np.clip(cj, -2, 2) + 2]
        sc1 = g1 * mult[np.clip(cj + ci, -2, 2) + 2]
        eps3 = eps[sub][:, None, None]
        score = np.empty((Ls, 2, S, N))
        score[:, 0] = np.where(ok0 & (g0 > eps3), sc0, -_INF)
        score[:, 1] = np.where(ok1 & (g1 > eps3), sc1, -_INF)
        score = score.reshape(Ls, -1)
        arg = score.argmax(1)  # the first best: [kind, i, j] in that order
        found = score[rows, arg] > -_INF
        kind = arg // (S * N)
        i_col = (arg % (S * N)) // N
        j = arg % N
        slot_i = hs[rows, i_col]
        e_a = a_now[rows, i_col]
        e_x = qs[rows, j]
        trial = qs.copy()
        trial[rows, j] = np.where(found, e_a, e_x)
        trial[rows, slot_i] = np.where(found & (kind == 1), e_x, e_a)
        t_pk = peaks(trial, ws)
        passed = found & (t_pk <= pk)
        # a layer whose best step finds nothing (or fails the exact check) is done
        active[sub[~passed]] = False
        if not passed.any():
            break
        sj = np.full(L, -1)
        si = np.full(L, -1)
        nj = np.full(L, -1)
        ni = np.full(L, -1)
        sj[sub[passed]] = j[passed]
        nj[sub[passed]] = e_a[passed]
        swp = passed & (kind == 1)
        si[sub[swp]] = slot_i[swp]
        ni[sub[swp]] = e_x[swp]
        q[sub[passed]] = trial[passed]
        peak_now[sub[passed]] = t_pk[passed]
        moves_now[sub[passed]] = ((trial[passed] != cs[passed]) & (trial[passed] >= 0)).sum(1)
        hist_steps.append((sj, nj, si, ni))
        hist_m.append(moves_now.copy())
        hist_b.append(bal(peak_now))
    if not hist_steps:
        return p
    # each layer: its plan now, or a point of its descent, by gain per extra move
    m_l = ((p != cur_p) & (p >= 0)).sum(1)
    b_l = bal(peak_p)
    extra = np.stack(hist_m, 1) - m_l[:, None]  # [L, steps + 1]
    gain = b_l[:, None] - np.stack(hist_b, 1)
    pick, _ = _pick_by_gain(gain, extra, lb + budget - int(m_l.sum()))
    chosen = np.flatnonzero(pick >= 0)
    if chosen.size == 0:
        return p
    out = p.copy()
    out[chosen] = repaired[chosen]
    for t, (sj, nj, si, ni) in enumerate(hist_steps):
        do = chosen[(pick[chosen] > t) & (sj[chosen] >= 0)]
        out[do, sj[do]] = nj[do]
        sw = do[si[do] >= 0]
        out[sw, si[sw]] = ni[sw]
    return out


def _pick_by_gain(gain: np.ndarray, extra: np.ndarray, spare: int) -> tuple[np.ndarray, int]:
    """Per layer (row), one option (column) or none (-1): options are taken greedily by the
    balance they gain per extra move over the layer's option so far, while the extra moves fit
    in ``spare`` (an option with no extra move goes first). Returns the picks and what is left
    of ``spare``."""
    n, width = gain.shape
    pick = np.full(n, -1)
    g_now = np.zeros(n)
    x_now = np.zeros(n, dtype=np.int64)
    while True:
        dg = gain - g_now[:, None]
        dx = extra - x_now[:, None]
        fit = (dg > 1e-12) & (dx <= spare)
        if not fit.any():
            return pick, spare
        ratio = np.where(fit, np.where(dx > 0, dg / np.maximum(dx, 1), _INF), -_INF)
        i, t = divmod(int(ratio.argmax()), width)
        spare -= int(dx[i, t])
        pick[i], g_now[i], x_now[i] = t, gain[i, t], extra[i, t]


def _slot_cost(cur: np.ndarray, now: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Change in moved slots when slots holding ``now`` take ``new`` (``cur``: what they hold in
    the current placement): +1 for a slot still unchanged, 0 for one changed already, -1 for one
    going back to what it held."""
    before = (now != cur) & (now >= 0)
    after = (new != cur) & (new >= 0)
    return after.astype(np.int64) - before.astype(np.int64)
