"""Where every expert lives: the physical-to-logical map of each MoE layer.

A *physical slot* is one expert-sized weight buffer on one EP rank; rank ``r`` owns slots
``r * slots_per_rank ... (r + 1) * slots_per_rank - 1`` (SGLang's layout: physical expert id
divided by ``num_local_physical_experts`` is the rank). A *logical expert* is one of the model's
routed experts. :class:`Placement` holds ``phy2log`` ``[layers, num_ranks * slots_per_rank]``
``torch.int64``: the logical expert each slot holds, ``-1`` for an empty slot (a dead rank's, or a
new rank's before it is filled).

Everything else is derived from ``phy2log`` and cached: SGLang's ``log2phy``
``[layers, experts, max_replicas]`` (padded with -1) and ``logcnt`` ``[layers, experts]``, and the
dispatch table over live replicas that the data plane uses to route tokens.

Who uses it: the planner (:mod:`elasticep.eplb.planner`) takes and returns placements; the
reconfiguration pipeline turns a plan's moves into weight transfers; the engines' adapters convert
with :meth:`Placement.to_sglang` / :meth:`Placement.from_sglang`.
"""

from __future__ import annotations

import operator
from functools import cached_property
from typing import Any, Sequence

import numpy as np
import torch

from elasticep import metrics
from elasticep.errors import InvalidArgument, RedundancyExhausted  # defined with the error family; importable here too

__all__ = ["Placement", "RedundancyExhausted", "EMPTY"]

#: The value of an empty physical slot in ``phy2log`` and of padding in ``log2phy``.
EMPTY = -1


def _as_int64(x: Any, what: str = "phy2log") -> torch.Tensor:
    try:
        if isinstance(x, torch.Tensor):
            return x.detach().to(device="cpu", dtype=torch.int64)
        return torch.as_tensor(np.asarray(x), dtype=torch.int64)
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
        raise InvalidArgument(f"{what} must be an integer array, got {type(x).__name__}: {exc}") from None


def _count_arg(value: Any, what: str) -> int:
    """``value`` as an int > 0 (any integer type; InvalidArgument otherwise)."""
    try:
        n = operator.index(value)
    except TypeError:
        raise InvalidArgument(f"{what} must be an int > 0, not {value!r}") from None
    if n <= 0:
        raise InvalidArgument(f"{what} must be > 0, not {n}")
    return n


def _as_bool(x: Any, n: int, what: str) -> torch.Tensor:
    try:
        t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        t = t.to(torch.bool).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidArgument(f"{what} must be a [R] bool mask, got {type(x).__name__}: {exc}") from None
    if t.numel() != n:
        raise InvalidArgument(f"{what} has {t.numel()} entries, expected {n} (one per rank)")
    return t


class Placement:
    """The expert placement of every MoE layer of one EP instance.

    Args:
        phy2log: ``[layers, num_ranks * slots_per_rank]`` integer (tensor, array or nested list),
            the logical expert held by each physical slot, ``-1`` for an empty slot.
        slots_per_rank: physical slots per rank (SGLang's ``num_local_physical_experts``).
        num_experts: logical experts per layer; inferred as ``max(phy2log) + 1`` if omitted (pass
            it whenever some expert might have no replica at all, e.g. after a failure).

    A placement is immutable: ``phy2log`` is a private copy, returned read-only by convention;
    the planner builds new placements instead of editing one.
    """

    @metrics.counts_refusals("placement")
    def __init__(self, phy2log: Any, slots_per_rank: int, num_experts: int | None = None):
        p = _as_int64(phy2log)
        if p.dim() == 1:
            p = p.unsqueeze(0)
        if p.dim() != 2:
            raise InvalidArgument(f"phy2log must be [layers, slots], got shape {tuple(p.shape)}")
        slots_per_rank = _count_arg(slots_per_rank, "slots_per_rank")
        if p.shape[1] % slots_per_rank:
            raise InvalidArgument(
                f"phy2log has {p.shape[1]} slots per layer, not a multiple of slots_per_rank={slots_per_rank}"
            )
        if p.numel() and int(p.min()) < EMPTY:
            raise InvalidArgument(f"phy2log holds {int(p.min())}; experts are >= 0 and -1 marks an empty slot")
        inferred = int(p.max()) + 1 if p.numel() else 0
        if num_experts is None:
            num_experts = inferred
        else:
            try:
                num_experts = operator.index(num_experts)
            except TypeError:
                raise InvalidArgument(f"num_experts must be an int or None, not {num_experts!r}") from None
        if num_experts < 0:
            raise InvalidArgument(f"num_experts must be >= 0, not {num_experts}")
        if inferred > num_experts:
            raise InvalidArgument(f"phy2log names expert {inferred - 1} but num_experts={num_experts}")
        self._phy2log = p.contiguous().clone()
        self._slots_per_rank = slots_per_rank
        self._num_experts = int(num_experts)

    # ------------------------------------------------------------------ shape

    @property
    def phy2log(self) -> torch.Tensor:
        """``[layers, num_slots]`` ``torch.int64``; ``-1`` marks an empty slot. Do not mutate."""
        return self._phy2log

    @property
    def slots_per_rank(self) -> int:
        return self._slots_per_rank

    @property
    def num_layers(self) -> int:
        return int(self._phy2log.shape[0])

    @property
    def num_slots(self) -> int:
        """Physical slots per layer over all ranks (SGLang's ``num_physical_experts``)."""
        return int(self._phy2log.shape[1])

    @property
    def num_ranks(self) -> int:
        return self.num_slots // self._slots_per_rank

    @property
    def num_experts(self) -> int:
        """Logical experts per layer."""
        return self._num_experts

    @cached_property
    def rank_of_slot(self) -> torch.Tensor:
        """``[num_slots]`` ``torch.int64``: the EP rank that owns each physical slot."""
        return torch.arange(self.num_slots, dtype=torch.int64) // self._slots_per_rank

    def slots_of_rank(self, rank: int) -> range:
        """The physical slot ids owned by ``rank``."""
        return range(rank * self._slots_per_rank, (rank + 1) * self._slots_per_rank)

    # ------------------------------------------------------------------ SGLang views

    @cached_property
    def logcnt(self) -> torch.Tensor:
        """``[layers, experts]`` ``torch.int64``: replicas of each logical expert (any rank)."""
        return _count(self._phy2log, self._num_experts)

    @cached_property
    def log2phy(self) -> torch.Tensor:
        """``[layers, experts, max_replicas]`` ``torch.int64``: each expert's slots, ascending,
        padded with -1 (SGLang's ``logical_to_all_physical_map``). ``max_replicas >= 1``."""
        return _log2phy(self._phy2log, self._num_experts, self.logcnt)

    @property
    def max_replicas(self) -> int:
        return int(self.log2phy.shape[2])

    # ------------------------------------------------------------------ liveness

    def alive_slots(self, alive: Any) -> torch.Tensor:
        """``[num_slots]`` bool: slots owned by a rank with ``alive[rank]`` True."""
        return _as_bool(alive, self.num_ranks, "alive")[self.rank_of_slot]

    def masked(self, alive: Any) -> Placement:
        """This placement with every slot of a rank where ``alive`` is False emptied (-1)."""
        keep = self.alive_slots(alive)
        return Placement(
            torch.where(keep.unsqueeze(0), self._phy2log, EMPTY), self._slots_per_rank, self._num_experts
        )

    def missing(self, alive: Any | None = None) -> torch.Tensor:
        """``[k, 2]`` ``(layer, expert)`` pairs with no replica on a live rank (all ranks live when
        ``alive`` is None)."""
        p = self if alive is None else self.masked(alive)
        return torch.nonzero(p.logcnt == 0)

    def dispatch_table(self, alive: Any | None = None, *, strict: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Live replicas of every logical expert, for routing tokens.

        Returns ``(log2phy, count)``: ``log2phy`` ``[layers, experts, max_replicas]`` int64 holds
        the live slots of each expert (ascending, padded with -1) and ``count`` ``[layers,
        experts]`` int64 how many there are. A token routed to logical expert ``e`` on layer ``l``
        goes to slot ``log2phy[l, e, token_index % count[l, e]]``: deterministic on every rank,
        and an even split over replicas, which is the load model the planner balances.

        Raises :class:`RedundancyExhausted` when ``strict`` and some expert has no live replica
        (its count would be 0 and routing to it would be wrong).
        """
        p = self if alive is None else self.masked(alive)
        count = p.logcnt
        if strict and bool((count == 0).any()):
            miss = torch.nonzero(count == 0)
            covered = int((count > 0).sum(dim=1).min())
            raise RedundancyExhausted(
                self._num_experts, covered, [tuple(r) for r in miss.tolist()],
                detail="placement leaves experts without a live replica",
            )
        return p.log2phy, count

    def route(self, layer: int, experts: torch.Tensor, alive: Any | None = None) -> torch.Tensor:
        """Physical slots for token-to-expert ids ``experts`` (``[tokens, topk]`` int64, logical ids)
        on ``layer``: the token in row ``i`` takes replica ``i % count`` of its expert."""
        log2phy, count = self.dispatch_table(alive)
        experts = experts.to(torch.int64)
        rows = torch.arange(experts.shape[0], dtype=torch.int64).view(-1, *([1] * (experts.dim() - 1)))
        which = rows % count[layer][experts]
        return log2phy[layer][experts, which]

    # ------------------------------------------------------------------ SGLang interchange

    def to_sglang(self, fill_empty: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(physical_to_logical_map, logical_to_all_physical_map, logical_count)`` as SGLang's
        ``rebalance_experts`` returns them (all ``torch.int64``).

        SGLang has no empty-slot value in ``physical_to_logical_map`` (it indexes weights with it),
        so empty slots carry ``fill_empty`` there (SGLang's ``elasticity_aware`` uses 0 for a dead
        rank's slots) and are left out of ``logical_to_all_physical_map`` and ``logical_count``,
        which is what routing reads. :meth:`from_sglang` with the same ``log2phy`` restores the
        empty slots.
        """
        if not 0 <= fill_empty < max(self._num_experts, 1):
            raise InvalidArgument(f"fill_empty={fill_empty} is not a logical expert id")
        phy2log = torch.where(self._phy2log == EMPTY, fill_empty, self._phy2log)
        return phy2log, self.log2phy.clone(), self.logcnt.clone()

    @classmethod
    def from_sglang(
        cls,
        physical_to_logical_map: Any,
        logical_to_all_physical_map: Any | None = None,
        logical_count: Any | None = None,
        *,
        slots_per_rank: int | None = None,
        num_ranks: int | None = None,
        num_experts: int | None = None,
    ) -> Placement:
        """Build a placement from SGLang's maps (e.g. ``ExpertLocationMetadata``'s fields).

        A slot that ``logical_to_all_physical_map`` does not list is empty (-1): that is how
        SGLang's ``elasticity_aware`` marks a dead rank's slots. Without it every slot is taken as
        filled. Give ``slots_per_rank`` (``num_local_physical_experts``) or ``num_ranks``
        (``ep_size``). ``logical_count``, if given, is checked against the result. Maps with a
        leading batch dimension (``[1, layers, ...]``) are squeezed.
        """
        p = _as_int64(physical_to_logical_map)
        if p.dim() == 3 and p.shape[0] == 1:
            p = p[0]
        if slots_per_rank is None:
            if num_ranks is None:
                raise InvalidArgument("give slots_per_rank (num_local_physical_experts) or num_ranks (ep_size)")
            if p.shape[1] % num_ranks:
                raise InvalidArgument(f"{p.shape[1]} slots do not divide over {num_ranks} ranks")
            slots_per_rank = p.shape[1] // num_ranks
        if logical_to_all_physical_map is not None:
            l2p = _as_int64(logical_to_all_physical_map)
            if l2p.dim() == 4 and l2p.shape[0] == 1:
                l2p = l2p[0]
            if num_experts is None:
                num_experts = int(l2p.shape[1])
            listed = torch.zeros(p.shape, dtype=torch.bool)
            valid = l2p >= 0
            layer_idx = torch.arange(l2p.shape[0]).view(-1, 1, 1).expand_as(l2p)
            listed[layer_idx[valid], l2p[valid]] = True
            # a listed slot must hold the expert that lists it
            expert_idx = torch.arange(l2p.shape[1]).view(1, -1, 1).expand_as(l2p)
            if not bool((p[layer_idx[valid], l2p[valid]] == expert_idx[valid]).all()):
                raise InvalidArgument("logical_to_all_physical_map disagrees with physical_to_logical_map")
            p = torch.where(listed, p, EMPTY)
        placement = cls(p, slots_per_rank, num_experts)
        if logical_count is not None:
            c = _as_int64(logical_count)
            if c.dim() == 3 and c.shape[0] == 1:
                c = c[0]
            if not torch.equal(c, placement.logcnt):
                raise InvalidArgument("logical_count disagrees with the maps")
        return placement

    # ------------------------------------------------------------------ building and comparing

    def with_ranks(self, num_ranks: int) -> Placement:
        """This placement grown to ``num_ranks`` ranks (new ranks' slots empty), for scale-up."""
        if num_ranks < self.num_ranks:
            raise InvalidArgument(f"cannot shrink {self.num_ranks} ranks to {num_ranks}; mark them dead instead")
        extra = (num_ranks - self.num_ranks) * self._slots_per_rank
        pad = torch.full((self.num_layers, extra), EMPTY, dtype=torch.int64)
        return Placement(torch.cat([self._phy2log, pad], dim=1), self._slots_per_rank, self._num_experts)

    def per_rank(self) -> torch.Tensor:
        """``[layers, num_ranks, slots_per_rank]`` view of ``phy2log``."""
        return self._phy2log.view(self.num_layers, self.num_ranks, self._slots_per_rank)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return (
            self._slots_per_rank == other._slots_per_rank
            and self._num_experts == other._num_experts
            and torch.equal(self._phy2log, other._phy2log)
        )

    def __hash__(self) -> int:
        return hash((self._slots_per_rank, self._num_experts, self._phy2log.numpy().tobytes()))

    def __repr__(self) -> str:
        empty = int((self._phy2log == EMPTY).sum())
        return (
            f"Placement(layers={self.num_layers}, experts={self._num_experts}, ranks={self.num_ranks}, "
            f"slots_per_rank={self._slots_per_rank}, empty_slots={empty})"
        )

    def to_dict(self) -> dict:
        """JSON-ready form: ``{"phy2log": [[...]], "slots_per_rank", "num_experts"}``."""
        return {
            "phy2log": self._phy2log.tolist(),
            "slots_per_rank": self._slots_per_rank,
            "num_experts": self._num_experts,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Placement:
        return cls(d["phy2log"], d["slots_per_rank"], d.get("num_experts"))


def _count(phy2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[layers, experts]`` replicas per expert; empty slots are not counted."""
    layers = phy2log.shape[0]
    # empty slots go to an overflow column that is dropped
    idx = torch.where(phy2log == EMPTY, num_experts, phy2log)
    cnt = torch.zeros(layers, num_experts + 1, dtype=torch.int64)
    cnt.scatter_add_(1, idx, torch.ones_like(idx))
    return cnt[:, :num_experts].contiguous()


def _log2phy(phy2log: torch.Tensor, num_experts: int, logcnt: torch.Tensor) -> torch.Tensor:
    layers, slots = phy2log.shape
    width = max(int(logcnt.max()) if logcnt.numel() else 0, 1)
    out = torch.full((layers, num_experts + 1, width), EMPTY, dtype=torch.int64)
    if slots == 0:
        return out[:, :num_experts].contiguous()
    key = torch.where(phy2log == EMPTY, num_experts, phy2log)
    # stable sort keeps slots of one expert in ascending order: replica k is the k-th lowest slot
    order = torch.sort(key, dim=1, stable=True).indices
    sorted_key = torch.gather(key, 1, order)
    full_cnt = torch.zeros(layers, num_experts + 1, dtype=torch.int64)
    full_cnt.scatter_add_(1, key, torch.ones_like(key))
    start = torch.cumsum(full_cnt, dim=1) - full_cnt
    replica = torch.arange(slots, dtype=torch.int64).expand(layers, -1) - torch.gather(start, 1, sorted_key)
    valid = sorted_key < num_experts
    layer_idx = torch.arange(layers, dtype=torch.int64).unsqueeze(1).expand(-1, slots)
    out[layer_idx[valid], sorted_key[valid], replica[valid]] = order[valid]
    return out[:, :num_experts].contiguous()
