"""Sticky repacking: the planner's answer to skewed loads (private; :mod:`elasticep.eplb.planner`
calls it).

On loads where a few experts carry most of the tokens, one changed slot at a time is not enough:
a hot expert that lost replicas needs a new one on a rank that must first shed most of its load.
Repacking decides the replica counts first, then packs the replicas onto the target ranks in
descending load, as a full replan would, except that every replica stays in the slot it holds
now unless its rank is over a target load: only what does not fit moves.

All functions take ``B`` rows (layers, or layers x options) and are vectorised over them; the
Python loops run over eviction rounds (at most ``S``) and placements (the replicas that move).
"""

from __future__ import annotations

import numpy as np

_INF = np.inf


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    B, n = a.shape
    offs = (np.arange(B) * n).reshape((B,) + (1,) * (idx.ndim - 1))
    return np.take(a.reshape(-1), idx + offs)


def _counts(idx: np.ndarray, E1: int) -> np.ndarray:
    B = idx.shape[0]
    flat = (idx + (np.arange(B) * E1)[:, None]).ravel()
    return np.bincount(flat, minlength=B * E1).reshape(B, E1)


def keep_counts(cnt: np.ndarray, w: np.ndarray, live: int) -> np.ndarray:
    """Replica counts ``[B, E]`` summing to ``live``, as close to ``cnt`` (the live replicas
    now) as coverage allows: every expert gets at least one; surplus replicas are taken from the
    experts that lose least by it (smallest load per remaining replica), and spare slots go to
    the experts with the largest load per replica."""
    c = np.maximum(cnt, 1).astype(np.int64)
    rows = np.arange(c.shape[0])
    for _ in range(int(np.abs(c.sum(1) - live).max()) if c.size else 0):
        tot = c.sum(1)
        over, under = tot > live, tot < live
        if not (over.any() or under.any()):
            break
        with np.errstate(divide="ignore"):
            give = np.where(c >= 2, w / np.maximum(c - 1, 1), _INF).argmin(1)
        take = (w / c).argmax(1)
        c[rows[over], give[over]] -= 1
        c[rows[under], take[under]] += 1
    return c


def restore_counts(c: np.ndarray, w: np.ndarray, ceiling: np.ndarray, max_steps: int) -> np.ndarray:
    """Move replicas to the experts whose load per replica exceeds ``ceiling`` ``[B]`` (a rank
    holding one would stand out whatever else it holds) from the experts that lose least by
    giving one up, while that lowers the larger of the two loads per replica; at most
    ``max_steps`` replicas per row (each costs a move)."""
    c = c.copy()
    rows = np.arange(c.shape[0])
    for _ in range(max_steps):
        per = w / c
        take = per.argmax(1)
        top = per[rows, take]
        with np.errstate(divide="ignore"):
            cost = np.where(c >= 2, w / np.maximum(c - 1, 1), _INF)
        cost[rows, take] = _INF
        give = cost.argmin(1)
        act = (top > ceiling) & (cost[rows, give] < top)
        if not act.any():
            break
        c[rows[act], take[act]] += 1
        c[rows[act], give[act]] -= 1
    return c


def minmax_counts(w: np.ndarray, live: int) -> np.ndarray:
    """Replica counts ``[B, E]`` summing to ``live`` that minimise the largest load per replica
    (each extra replica to the expert with the largest load per replica, ties to the lowest id)."""
    B, E = w.shape
    c = np.ones((B, E), dtype=np.int64)
    rows = np.arange(B)
    for _ in range(live - E):
        c[rows, (w / c).argmax(1)] += 1
    return c


def repack(
    p0: np.ndarray,
    w: np.ndarray,
    c: np.ndarray,
    target: np.ndarray,
    speed: np.ndarray,
    S: int,
    tau: np.ndarray,
    max_bumps: int | None = None,
) -> np.ndarray:
    """Pack ``c`` replicas of each expert onto the target ranks, moving as few as it can.

    Args:
        p0: ``[B, N]`` int64, the working placement (-1 on empty slots and on every slot of a
            rank that is not a target).
        w: ``[B, E]`` expert loads; ``c``: ``[B, E]`` replica counts (each >= 1, summing to the
            target slots).
        target: ``[R]`` bool; ``speed``: ``[R]`` relative throughput.
        tau: ``[B]`` slack: a rank may carry ``(1 + tau) * speed * mean`` before it sheds load.

    Steps: surplus replicas leave the most loaded ranks; a rank over its target load then evicts,
    per round, its smallest replica that brings it under (else its largest; where ``tau`` > 0
    and the rank's other replicas add up to its excess, the largest stays and the choice is
    among the others); every replica left
    to place (lost experts, new replicas, evicted ones), heaviest first, goes to the least loaded
    rank with a free slot where it fits under the target, else to a full rank where it fits in
    place of a smaller replica (which is then placed in turn), else wherever it lands lowest.
    Returns ``[B, N]``: every target slot filled.
    """
    B, N = p0.shape
    E = w.shape[1]
    R = N // S
    rows = np.arange(B)
    u = w / c  # [B, E] load per replica
    u_ext = np.concatenate([u, np.zeros((B, 1))], 1)
    tslot = np.repeat(target, S)
    p = p0.copy()
    idx = np.where(p < 0, E, p)
    cc = _counts(idx, E + 1)[:, :E]
    spd = speed[None, :]
    mean = w.sum(1) / speed[target].sum()
    cap = ((1.0 + tau) * mean)[:, None] * spd  # [B, R] load a rank may carry
    cap = np.where(target[None, :], cap, -_INF)

    # 1. surplus replicas leave the most loaded ranks
    slot_u = _take(u_ext, idx)
    load = slot_u.reshape(B, R, S).sum(-1)
    surplus = np.maximum(cc - c, 0)
    if surplus.any():
        slot_eff = np.repeat(load / spd, S, axis=1)
        order = np.lexsort((-slot_eff, idx), axis=-1)  # by expert, most loaded rank first
        sidx = _take(idx, order)
        start = np.ones((B, N), dtype=bool)
        start[:, 1:] = sidx[:, 1:] != sidx[:, :-1]
        pos = np.arange(N)[None, :] - np.maximum.accumulate(np.where(start, np.arange(N)[None, :], 0), axis=1)
        drop_sorted = (sidx < E) & (pos < _take(np.concatenate([surplus, np.zeros((B, 1), np.int64)], 1), sidx))
        drop = np.zeros((B, N), dtype=bool)
        np.put_along_axis(drop, order, drop_sorted, 1)
        p[drop] = -1
        idx = np.where(p < 0, E, p)
        slot_u = _take(u_ext, idx)
        load = slot_u.reshape(B, R, S).sum(-1)
    pool = c - _counts(idx, E + 1)[:, :E]  # [B, E] replicas still to place (>= 0)

    # 2. ranks over their target load evict
    keep_top = tau > 0
    for _ in range(S):
        excess = load - cap  # [B, R]
        over = (excess > 1e-12 * mean[:, None]) & target[None, :]
        if not over.any():
            break
        su = slot_u.reshape(B, R, S)
        occ = (p.reshape(B, R, S) >= 0)
        if keep_top.any():
            # with slack, a rank whose other replicas can make up its excess keeps its largest
            # (a hot expert's replica would only land on another loaded rank)
            top = np.where(occ, su, -_INF).argmax(-1)
            rest = occ.copy()
            np.put_along_axis(rest, top[:, :, None], False, -1)
            rest_sum = np.where(rest, su, 0.0).sum(-1)
            occ = np.where(((rest_sum >= excess) & keep_top[:, None])[:, :, None], rest, occ)
        fits = occ & (su >= excess[:, :, None])
        smallest_fit = np.where(fits, su, _INF).argmin(-1)
        largest = np.where(occ, su, -_INF).argmax(-1)
        col = np.where(fits.any(-1), smallest_fit, largest)
        b, r = np.nonzero(over)
        s = r * S + col[b, r]
        e = p[b, s]
        load[b, r] -= slot_u[b, s]
        np.add.at(pool, (b, e), 1)
        p[b, s] = -1
        idx[b, s] = E
        slot_u[b, s] = 0.0

    # 3. place the pool, heaviest first
    free = (p.reshape(B, R, S) < 0) & target[None, :, None]
    nfree = free.sum(-1)  # [B, R]
    limit = int(pool.sum(1).max()) if B else 0
    # each placement into a free slot shrinks the pool, a bump keeps it: at most 2 * limit rounds
    bumps_left = pool.sum(1) if max_bumps is None else np.full(B, max_bumps)
    BIG = 4.0 * (mean.max() + 1.0) * float(speed.max()) / float(speed.min()) + 1.0
    for _ in range(limit + int(bumps_left.max(initial=0)) + 1):
        todo = pool.sum(1) > 0
        if not todo.any():
            break
        e_star = np.where(pool > 0, u, -_INF).argmax(1)  # [B]
        x = u[rows, e_star]
        has_free = nfree > 0
        if bumps_left.any():
            su = slot_u.reshape(B, R, S)
            occ = p.reshape(B, R, S) >= 0
            # the smallest replica of each full rank that is lighter than x (bumping it costs a move)
            vcol = np.where(occ & (su < x[:, None, None] * (1 - 1e-9)), su, _INF).argmin(-1)
            v = np.take_along_axis(su, vcol[:, :, None], -1)[:, :, 0]
            can_bump = ~has_free & np.isfinite(v) & (bumps_left[:, None] > 0) & target[None, :]
        else:  # no bumps left anywhere: the same choice without the per-slot work
            vcol = np.zeros((B, R), dtype=np.int64)
            v = np.full((B, R), _INF)
            can_bump = np.zeros((B, R), dtype=bool)
        new_free = np.where(has_free, load + x[:, None], _INF)
        new_bump = np.where(can_bump, load + x[:, None] - np.where(np.isfinite(v), v, 0.0), _INF)
        fit_free = new_free <= cap
        fit_bump = new_bump <= cap
        # category 0: a free slot under the cap; 1: a bump under the cap; 2: lowest of the rest
        s_free = np.where(fit_free, 0.0, 2.0 * BIG) + new_free / spd
        s_bump = np.where(fit_bump, BIG, 2.0 * BIG) + new_bump / spd
        s_free = np.where(has_free, s_free, _INF)
        s_bump = np.where(can_bump, s_bump, _INF)
        # a bump outside the cap is taken only if it lands clearly lower than any free slot
        best_free = s_free.min(1)
        best_bump = s_bump.min(1)
        use_bump = best_bump < best_free
        r = np.where(use_bump, s_bump.argmin(1), s_free.argmin(1))
        act = todo & (np.isfinite(best_free) | np.isfinite(best_bump))
        b = rows[act]
        r = r[act]
        ub = use_bump[act]
        fcol = free[b, r].argmax(-1)
        col = np.where(ub, vcol[b, r], fcol)
        s = r * S + col
        e_new = e_star[act]
        old = p[b, s]
        # bumped replica goes back to the pool
        bb = b[ub]
        np.add.at(pool, (bb, old[ub]), 1)
        bumps_left[bb] -= 1
        load[b, r] += x[act] - np.where(ub, slot_u[b, s], 0.0)
        p[b, s] = e_new
        idx[b, s] = e_new
        slot_u[b, s] = x[act]
        fb, fr = b[~ub], r[~ub]
        free[fb, fr, fcol[~ub]] = False
        nfree[fb, fr] -= 1
        np.add.at(pool, (b, e_new), -1)
    if (pool > 0).any():  # the free slots always equal the pool: a guard
        raise AssertionError("repack left replicas unplaced")
    return p
