"""Expert-parallel backends: how a MoE layer's tokens reach the physical slots that compute them.

The interface mirrors the CPU kernel (and DeepEP / Mooncake EP on GPUs): ``dispatch`` sends each
token to the physical slots it is routed to and returns, for each slot this process holds, the
tokens that arrived; the caller runs the experts; ``combine`` returns each token's weighted sum
of its experts' outputs. A backend also says which slots this process holds for a placement and
accepts a new view (placement and live ranks) at a step boundary.

:class:`LocalEP` plays every rank inside one process: it holds all slots and moves tokens with
indexing. It is the reference for the kernel path (same routing, same slots, no processes) and
what the single-process tests and a rank without the kernel use.

Shapes: ``x`` ``[T, H]``; ``slots`` ``[T, k]`` ``torch.int64`` physical slot ids (rank of a slot is
``slot // slots_per_rank``); ``weights`` ``[T, k]`` ``torch.float32``; ``recv_x[i]`` ``[n_i, H]`` for
the i-th local slot; ``expert_out[i]`` the same shape as ``recv_x[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from elasticep.eplb.placement import Placement

__all__ = ["Dispatched", "ExpertParallel", "LocalEP", "KernelEP", "DeadSlotRouted", "PeersLost"]


class DeadSlotRouted(RuntimeError):
    """A token was routed to a slot that is empty or on a rank outside the live set.

    A backend must never silently treat such a token as answered by nothing: its output would
    be wrong. Raised by :class:`LocalEP`; the step fails and is replayed after reconfiguration.
    """

    def __init__(self, layer: int, slots: Sequence[int], reason: str):
        self.layer = layer
        self.slots = tuple(int(s) for s in slots)
        super().__init__(f"moe layer {layer}: tokens routed to {reason} slots {list(self.slots[:8])}")


class PeersLost(RuntimeError):
    """Ranks of the current view stopped answering during a step (the kernel marked them inactive).

    The step's outputs left those ranks' experts out, so they are wrong: the caller rolls the step
    back, moves to a view without ``ranks`` and replays it. Raised by :meth:`KernelEP.check_step`.
    """

    def __init__(self, ranks: Sequence[int], epoch: int):
        self.ranks = tuple(int(r) for r in ranks)
        self.epoch = epoch
        super().__init__(f"ranks {list(self.ranks)} stopped answering during a step of epoch {epoch}")


@dataclass
class Dispatched:
    """What :meth:`ExpertParallel.dispatch` returns.

    ``recv_x[i]``: ``[n_i, H]`` tokens for the i-th local slot (``local_slots`` order).
    ``handle``: backend-private state that :meth:`ExpertParallel.combine` needs.
    """

    recv_x: list[torch.Tensor]
    handle: Any = None


@runtime_checkable
class ExpertParallel(Protocol):
    """The contract a :class:`~elasticep.engine.model.RankModel` needs from its EP backend."""

    def local_slots(self, placement: Placement) -> Sequence[int]:
        """Physical slot ids whose experts this process computes, in buffer order."""
        ...

    def set_view(self, placement: Placement, alive: torch.Tensor, epoch: int | None = None) -> None:
        """Adopt a new placement, ``[num_ranks]`` bool live mask and view epoch; between steps."""
        ...

    def check_step(self) -> None:
        """Raise (e.g. :class:`PeersLost`) if the step just run cannot be trusted."""
        ...

    def dispatch(self, x: torch.Tensor, slots: torch.Tensor, *, layer: int) -> Dispatched:
        ...

    def combine(
        self,
        expert_out: list[torch.Tensor],
        slots: torch.Tensor,
        weights: torch.Tensor,
        handle: Dispatched,
        *,
        layer: int,
    ) -> torch.Tensor:
        ...


class LocalEP:
    """Every rank's slots in one process; tokens move by indexing.

    ``dispatch`` refuses (:class:`DeadSlotRouted`) a token routed to an empty slot or to a rank
    the current view marks dead, which is what a kernel must turn into a failed step. ``combine``
    adds each slot's weighted outputs in ascending slot order, the order transformers' own MoE
    adds experts in when slots ascend with experts.
    """

    def __init__(self) -> None:
        self._placement: Placement | None = None
        self._alive_slots: torch.Tensor | None = None
        self._num_slots = 0

    def local_slots(self, placement: Placement) -> Sequence[int]:
        return range(placement.num_slots)

    def set_view(self, placement: Placement, alive: torch.Tensor, epoch: int | None = None) -> None:
        self._placement = placement
        self._num_slots = placement.num_slots
        self._alive_slots = placement.alive_slots(alive)

    def check_step(self) -> None:
        """Nothing to check: every slot is in this process, and dispatch refuses dead ones."""

    def dispatch(self, x: torch.Tensor, slots: torch.Tensor, *, layer: int) -> Dispatched:
        if self._placement is None or self._alive_slots is None:
            raise RuntimeError("LocalEP.dispatch before set_view")
        if x.dim() != 2 or slots.dim() != 2 or slots.shape[0] != x.shape[0]:
            raise ValueError(f"x {tuple(x.shape)} and slots {tuple(slots.shape)} must be [T, H] and [T, k]")
        flat = slots.reshape(-1)
        if flat.numel():
            bad = (flat < 0) | (flat >= self._num_slots)
            if bool(bad.any()):
                raise DeadSlotRouted(layer, flat[bad].unique().tolist(), "masked or out-of-range")
            dead = ~self._alive_slots[flat] | (self._placement.phy2log[layer, flat] < 0)
            if bool(dead.any()):
                raise DeadSlotRouted(layer, flat[dead].unique().tolist(), "dead or empty")
        k = slots.shape[1]
        # sort (token, k) pairs by slot once; each slot's tokens are then one contiguous run
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self._num_slots).tolist()
        token_of = order // k
        recv, routes, start = [], [], 0
        for n in counts:
            pairs = order[start : start + n]
            tokens = token_of[start : start + n]
            recv.append(x[tokens])
            routes.append((tokens, pairs))
            start += n
        return Dispatched(recv_x=recv, handle=routes)

    def combine(
        self,
        expert_out: list[torch.Tensor],
        slots: torch.Tensor,
        weights: torch.Tensor,
        handle: Dispatched,
        *,
        layer: int,
    ) -> torch.Tensor:
        routes = handle.handle
        if len(expert_out) != len(routes):
            raise ValueError(f"{len(expert_out)} expert outputs for {len(routes)} slots")
        t = slots.shape[0]
        hidden = expert_out[0].shape[-1] if expert_out else 0
        out = torch.zeros(t, hidden, dtype=expert_out[0].dtype if expert_out else torch.float32)
        flat_w = weights.reshape(-1)
        for y, (tokens, pairs) in zip(expert_out, routes):
            if tokens.numel() == 0:
                continue
            out.index_add_(0, tokens, (y * flat_w[pairs].unsqueeze(1)).to(out.dtype))
        return out


class KernelEP:
    """Expert parallelism across the rank processes of one host through the CPU kernel.

    Wraps :class:`elasticep.kernel.EPBuffer` (shared memory, bounded waits, an ``active_ranks``
    mask). This process holds the slots of its own rank. Each :meth:`set_view` with a new epoch
    opens the buffer of that epoch (the kernel refuses messages of any other); the live mask is
    the view's. A peer that does not answer within ``timeout_us`` is marked 0 by the kernel and
    treated as sending nothing, so every call returns; :meth:`check_step`, called by
    :meth:`RankModel.step` after the forward, then raises :class:`PeersLost` and the step is
    rolled back and replayed under a view without that peer.

    Args:
        rank: this process's EP rank.
        cluster_id: names the launch (with the epoch, the shared-memory segment).
        max_tokens: the most tokens this rank passes to one dispatch (longest prefill).
        hidden: the model's hidden size.
        topk: experts per token.
        timeout_us: bound on each wait for a peer (``Config.kernel_timeout_us``).

    Every rank of the view must call dispatch/combine for every MoE layer of every step, in the
    same order (a rank without tokens calls :meth:`RankModel.idle_step`).
    """

    def __init__(self, rank: int, *, cluster_id: str, max_tokens: int, hidden: int, topk: int, timeout_us: int = 200_000):
        self.rank = int(rank)
        self.cluster_id = cluster_id
        self.max_tokens = int(max_tokens)
        self.hidden = int(hidden)
        self.topk = int(topk)
        self.timeout_us = int(timeout_us)
        self.epoch = -1
        self._buffer = None
        self._view_alive: torch.Tensor | None = None
        self._shape: tuple[int, int] | None = None

    @property
    def buffer(self):
        """The :class:`elasticep.kernel.EPBuffer` of the current epoch (None before a view)."""
        return self._buffer

    def local_slots(self, placement: Placement) -> Sequence[int]:
        return placement.slots_of_rank(self.rank)

    def set_view(self, placement: Placement, alive: torch.Tensor, epoch: int | None = None) -> None:
        from elasticep.kernel import EPBuffer

        epoch = self.epoch if epoch is None else int(epoch)
        shape = (placement.num_ranks, placement.slots_per_rank)
        mask = torch.as_tensor(alive).to(torch.int32).reshape(-1).contiguous()
        if epoch < 0:
            # not a member of any view yet (a joining rank): no segment to attach to until the
            # reconfiguration that admits it commits its first epoch
            if self._buffer is not None:
                self._buffer.close()
                self._buffer = None
            self.epoch, self._shape, self._view_alive = epoch, None, mask.clone()
            return
        if self._buffer is None or epoch != self.epoch or shape != self._shape:
            if self._buffer is not None:
                self._buffer.close()
            self._buffer = EPBuffer(
                self.rank,
                shape[0],
                slots_per_rank=shape[1],
                max_tokens=self.max_tokens,
                hidden=self.hidden,
                topk=self.topk,
                cluster_id=self.cluster_id,
                epoch=epoch,
                timeout_us=self.timeout_us,
                active_ranks=mask,
            )
            self.epoch = epoch
            self._shape = shape
        else:
            self._buffer.active_ranks.copy_(mask)
        self._view_alive = mask.clone()

    def dispatch(self, x: torch.Tensor, slots: torch.Tensor, *, layer: int) -> Dispatched:
        if self._buffer is None:
            raise RuntimeError("KernelEP.dispatch before set_view")
        recv_x, counts, handle = self._buffer.dispatch(x.contiguous(), slots.contiguous(), layer=layer)
        recv = [recv_x[e, : int(counts[e])] for e in range(recv_x.shape[0])]
        return Dispatched(recv_x=recv, handle=(handle, recv_x))

    def combine(
        self,
        expert_out: list[torch.Tensor],
        slots: torch.Tensor,
        weights: torch.Tensor,
        handle: Dispatched,
        *,
        layer: int,
    ) -> torch.Tensor:
        kernel_handle, recv_x = handle.handle
        # The outputs go over the tokens they were computed from, in recv_x: every expert has
        # run by now, and recv_x lives in this rank's shared return region, so the owners of
        # the tokens reduce straight from it (no staging copy, no zero fill; only the rows
        # routed are read).
        for e, y in enumerate(expert_out):
            n = y.shape[0]
            if n and y.data_ptr() != recv_x[e].data_ptr():
                recv_x[e, :n] = y
        return self._buffer.combine(
            recv_x, slots.contiguous(), weights.to(torch.float32).contiguous(), handle=kernel_handle, layer=layer
        )

    def lost_ranks(self) -> list[int]:
        """Ranks live in the current view that the kernel has since marked inactive."""
        if self._buffer is None or self._view_alive is None:
            return []
        now = self._buffer.active_ranks
        return [r for r in range(now.numel()) if int(self._view_alive[r]) == 1 and int(now[r]) == 0]

    def check_step(self) -> None:
        lost = self.lost_ranks()
        if lost:
            raise PeersLost(lost, self.epoch)

    def close(self) -> None:
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None
