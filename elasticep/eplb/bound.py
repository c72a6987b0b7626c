"""Lower bounds on the balance any plan can reach: how far a planner is from the best possible.

Balance is the mean over layers of the most loaded target rank over the mean target rank, each
expert's load split evenly over its replicas (:func:`elasticep.eplb.balance`, uniform rank speed).
With ``n`` target ranks of ``S`` slots, ``K = n * S`` live slots per layer and a layer's loads
``w_e`` summing to ``W``, every plan gives each expert ``r_e >= 1`` replicas with
``sum r_e <= K``, and then:

* the most loaded rank carries at least the mean, ``W / n``;
* it carries at least the largest replica, ``max_e w_e / r_e``: some rank holds it;
* (pigeonhole) if more than ``n`` replicas are each over ``T / 2``, two of them share a rank,
  which then carries over ``T``.

:func:`layer_balance_lower_bound` is, per layer, the smallest ``T`` for which replica counts
passing all three exist (the third through a relaxation that can only make ``T`` smaller, see
:func:`_pigeonhole_ok`), over ``W / n``. Every plan's layer balance is at least this.

A budget bounds the replica counts too: a plan that changes at most ``M`` slots can raise the
replicas of the experts by at most ``M`` in all (each changed slot writes one expert), so
``sum_e max(0, r_e - c_e) <= M`` with ``c_e`` the live replicas now. :func:`balance_lower_bound`
with ``max_moves`` spreads the moves over the layers the way that lowers the (convex envelope of
the) per-layer bounds most, which is again never above what any plan within the budget reaches.
It counts only the moves that create replicas, not those that reseat them, so it is weak where
the budget is spent packing, and never below the unbudgeted bound.

Pure numpy; no clock, no I/O. Uniform rank speed only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from elasticep.eplb.placement import Placement
from elasticep.eplb.planner import _alive_arg, _leaving_arg, _load_array
from elasticep.errors import InvalidArgument

__all__ = ["balance_lower_bound", "layer_balance_lower_bound"]


def _candidates(w: np.ndarray, kmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``[L, E * kmax]`` values ``w_e / k`` sorted descending, and the ``k`` of each."""
    L, E = w.shape
    k = np.arange(1, kmax + 1, dtype=np.float64)
    cand = (w[:, :, None] / k[None, None, :]).reshape(L, E * kmax)
    kk = np.broadcast_to(np.arange(1, kmax + 1), (L, E, kmax)).reshape(L, E * kmax)
    ee = np.broadcast_to(np.arange(E)[:, None], (E, kmax)).reshape(E * kmax)
    order = np.argsort(-cand, axis=1, kind="stable")
    return np.take_along_axis(cand, order, 1), np.take_along_axis(kk, order, 1), ee[order]


def _pigeonhole_ok(w: np.ndarray, T: np.ndarray, n: int, K: int) -> np.ndarray:
    """``[B]`` False where no replica counts give every replica at most ``T`` with at most ``n``
    replicas over ``T / 2`` in ``K`` slots (a necessary condition for a peak at most ``T``: two
    replicas over ``T / 2`` on one rank make it exceed ``T``). True may still be infeasible.

    Per expert, ``a = ceil(w / T)`` replicas are the fewest that keep each at most ``T``, and
    ``b = ceil(2 w / T)`` the fewest that keep each at most ``T / 2``. Counts in ``[a, b)`` make
    ``r >= a`` big replicas at ``r >= a`` slots, so ``a`` is the best of them; counts ``>= b``
    make none at ``b`` slots or more. Choosing the experts that stay big is a knapsack (save
    ``b - a`` slots at ``a`` big replicas, at most ``n`` in all); its fractional relaxation saves
    at least as much as any choice, so ``sum b - saving > K`` proves infeasibility.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.maximum(np.ceil(w / T[:, None] - 1e-12), 1.0)
        b = np.maximum(np.ceil(2.0 * w / T[:, None] - 1e-12), 1.0)
    # the 1e-12 keeps w/T = 3.0000000001 (rounding) from reading as 4: it can only lower a and
    # b, so only loosen the check
    save = b - a  # >= 0
    ratio = np.where(save > 0, save / a, -1.0)
    order = np.argsort(-ratio, axis=1, kind="stable")
    s_sorted = np.take_along_axis(save, order, 1)
    a_sorted = np.take_along_axis(np.where(save > 0, a, 0.0), order, 1)
    cum_a = np.cumsum(a_sorted, 1)
    prev = cum_a - a_sorted
    room = np.clip(n - prev, 0.0, None)
    frac = np.where(a_sorted > 0, np.minimum(1.0, room / np.maximum(a_sorted, 1e-300)), 0.0)
    saving = (s_sorted * frac).sum(1)
    return b.sum(1) - saving <= K + 1e-9


def _layer_bounds(w: np.ndarray, n: int, S: int, pigeonhole: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``([L] bound on the peak rank load, [L] mean rank load)``."""
    L, E = w.shape
    K = n * S
    mean = w.sum(1) / n
    kmax = K - E + 1
    cand, _, _ = _candidates(w, kmax)
    # sum_e ceil(w_e / T) <= K  <=>  at most K - E candidates w_e / k lie above T
    t1 = np.maximum(cand[:, K - E], mean)
    if not pigeonhole or n < 1:
        return t1, mean
    # the pigeonhole check changes value only where some w_e / k or 2 w_e / k is crossed: scan
    # those points upwards from t1 (the check fails below t1 already); the bound is the first
    # one passing (or t1 itself)
    peak = t1.copy()
    ok = _pigeonhole_ok(w, peak, n, K)
    if ok.all():
        return peak, mean
    kk = np.arange(1, 2 * kmax + 2, dtype=np.float64)
    pts = np.concatenate([(w[:, :, None] / kk).reshape(L, -1), (2.0 * w[:, :, None] / kk).reshape(L, -1)], 1)
    pts = np.sort(pts, axis=1)
    todo = np.flatnonzero(~ok)
    for l in todo:
        row = pts[l][pts[l] > t1[l]]
        row = np.unique(row)
        # blocks of points, in order, until one passes
        found = None
        for s in range(0, row.size, 256):
            blk = row[s:s + 256]
            okb = _pigeonhole_ok(np.broadcast_to(w[l], (blk.size, E)), blk, n, K)
            if okb.any():
                found = blk[int(np.argmax(okb))]
                break
        # no point passes: the largest load per replica with one replica each passes always
        # (a = b = 1 for every expert once T >= 2 max w), so this does not happen
        peak[l] = found if found is not None else max(t1[l], 2.0 * w[l].max())
    return peak, mean


def _targets(current: Placement, alive: Any, leaving: Any | None) -> tuple[Placement, np.ndarray]:
    alive_m = _alive_arg(current.num_ranks, alive, None, None)
    R = alive_m.size
    cur = current.with_ranks(R) if R > current.num_ranks else current
    target = alive_m & ~_leaving_arg(leaving, R)
    if not target.any():
        raise InvalidArgument("no rank to hold experts")
    return cur, target


def layer_balance_lower_bound(current: Placement, load: Any, alive: Any, *, leaving: Any | None = None) -> torch.Tensor:
    """``[layers]`` ``torch.float64``: per layer, a balance no plan on the target ranks (alive,
    not leaving) can beat, whatever its budget. A layer without load has bound 1.0."""
    cur, target = _targets(current, alive, leaving)
    w = _load_array(load, cur.num_layers, cur.num_experts)
    n = int(target.sum())
    if n * cur.slots_per_rank < cur.num_experts:
        raise InvalidArgument("fewer live slots than experts: no plan exists")
    peak, mean = _layer_bounds(w, n, cur.slots_per_rank)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(mean > 0, peak / mean, 1.0)
    return torch.from_numpy(out)


def balance_lower_bound(
    current: Placement, load: Any, alive: Any, *, max_moves: int | None = None, leaving: Any | None = None
) -> float:
    """A balance (mean over layers, as :func:`~elasticep.eplb.balance`) that no plan on the
    target ranks reaches below; with ``max_moves`` (as :func:`~elasticep.eplb.replan`: moves on
    top of the coverage repair), none within that budget."""
    per_layer = layer_balance_lower_bound(current, load, alive, leaving=leaving).numpy()
    if max_moves is None:
        return float(per_layer.mean())
    cur, target = _targets(current, alive, leaving)
    w = _load_array(load, cur.num_layers, cur.num_experts)
    L, E = w.shape
    n, S = int(target.sum()), cur.slots_per_rank
    K = n * S
    masked = cur.masked(torch.from_numpy(target))
    c0 = masked.logcnt.numpy().astype(np.int64)  # [L, E] live replicas now
    mean = w.sum(1) / n
    cand, kk, ee = _candidates(w, K - E + 1)
    J = K - E + 1  # prefixes j = 0..K-E keep sum a_e <= K
    cand, kk, ee = cand[:, :J], kk[:, :J], ee[:, :J]
    # crossing w_e / k below lifts a_e from k to k + 1: a move unless e has k + 1 replicas now
    flag = kk >= np.take_along_axis(c0, ee, 1)
    m = np.concatenate([np.zeros((L, 1), np.int64), np.cumsum(flag, 1)[:, :-1]], 1)  # before j
    # with equal values, the prefix count at j also crosses the equal ones; the first of the
    # run is exact for that value
    first = np.ones((L, J), dtype=bool)
    first[:, 1:] = cand[:, 1:] != cand[:, :-1]
    pos = np.where(first, np.arange(J)[None, :], 0)
    pos = np.maximum.accumulate(pos, 1)
    m = np.take_along_axis(m, pos, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        val = np.where(mean[:, None] > 0, np.maximum(cand, mean[:, None]) / mean[:, None], 1.0)
    # each layer's points (moves, value) are never better than the unbudgeted bound's
    val = np.maximum(val, per_layer[:, None])
    # lower convex envelope of each layer's points, then the moves go to the steepest slopes
    segs: list[tuple[float, float, int]] = []  # (slope per move, moves, layer)
    base = 0.0
    for l in range(L):
        xs, ys = m[l].astype(np.float64), val[l]
        # the best value at each move count
        ux, inv = np.unique(xs, return_inverse=True)
        uy = np.full(ux.size, np.inf)
        np.minimum.at(uy, inv, ys)
        uy = np.minimum.accumulate(uy)
        hull: list[int] = []
        for i in range(ux.size):
            while len(hull) >= 2:
                i0, i1 = hull[-2], hull[-1]
                # drop i1 if it lies on or above the chord i0 -> i
                if (uy[i1] - uy[i0]) * (ux[i] - ux[i0]) >= (uy[i] - uy[i0]) * (ux[i1] - ux[i0]):
                    hull.pop()
                else:
                    break
            hull.append(i)
        base += uy[hull[0]]
        for a, b in zip(hull[:-1], hull[1:]):
            dx = ux[b] - ux[a]
            if dx > 0 and uy[b] < uy[a]:
                segs.append(((uy[b] - uy[a]) / dx, dx, l))
    left = float(max_moves)
    total = base
    for slope, dx, _ in sorted(segs):  # steepest (most negative) first: convex, so in order
        if left <= 0:
            break
        take = min(dx, left)
        total += slope * take
        left -= take
    return float(total / L)
