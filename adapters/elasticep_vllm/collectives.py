"""Variable-size all-gather and reduce-scatter for vLLM's CPU device communicator.

With data parallel > 1, every fused-MoE layer of vLLM gathers the tokens of all DP ranks
(``AgRsAll2AllManager.dispatch`` -> ``GroupCoordinator.all_gatherv``) and scatters the summed
expert outputs back (``combine`` -> ``reduce_scatterv``), with each rank's token count as
``sizes``. vLLM 0.32's ``CpuCommunicator`` implements neither (the base class raises
``NotImplementedError``), so DP > 1 of a MoE model fails at the first forward on CPU, with or
without expert parallelism. :func:`install` gives the CPU communicator both, over the gloo group
it already has:

- ``all_gatherv``: each rank pads its part to the largest size, one tensor all-gather,
  then the padding is cut out; rank order is kept, so the result is the concatenation of every
  rank's part in rank order, exactly.
- ``reduce_scatterv``: one ``all_reduce`` of the whole tensor, then this rank's slice. More bytes
  than a true reduce-scatter, but gloo has no variable-size reduce-scatter, and the sum each rank
  keeps is the same sum every rank computed.

After a view change the collectives run over the ranks that serve, not vLLM's group
(:data:`ROUTE`, set by the elasticep commit in every worker): one rank alone waits for no peer
(:data:`SOLO`); two or more meet in elasticep's gloo group of that view
(:class:`~elasticep.groups.HealthyGroup`), where a rank outside the view holds zero rows (the
DP padding all-reduce, :func:`dp_all_reduce`, gives it zero tokens).

A collective that fails (a peer died: gloo reports the closed connection) is counted in
``elasticep_collective_failures_total{op}`` and re-raised.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from elasticep import metrics
from elasticep.errors import InvalidArgument

__all__ = ["ROUTE", "SOLO", "all_gatherv", "dp_all_reduce", "reduce_scatterv", "install", "installed", "route"]

SOLO = {"on": False}
"""Whether this process's rank serves alone (its DP/EP peers are dead; set when elasticep
recovers a vLLM server, :mod:`elasticep_vllm.recovery`): gather and scatter then keep this rank's
own rows and wait for no peer."""

ROUTE: dict[str, Any] = {"group": None}
"""The elasticep group (:class:`~elasticep.groups.HealthyGroup`, its members the DP ranks that
serve) the MoE collectives run over instead of vLLM's, or None (vLLM's group; or :data:`SOLO`)."""


def route(group: Any, solo: bool) -> None:
    """Set what the collectives run over from now on: alone (``solo``), ``group``, or vLLM's
    own group (``group`` None and not ``solo``)."""
    SOLO["on"] = bool(solo)
    ROUTE["group"] = None if solo else group

_OP_GATHER = "vllm_all_gatherv"
_OP_SCATTER = "vllm_reduce_scatterv"


# torch 2.13 renamed all_gather_into_tensor (which now warns) to all_gather_single
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _sizes(sizes: Sequence[int] | None, world: int, local: int, rank: int, op: str) -> list[int]:
    if sizes is None:
        return [local] * world
    sizes = [int(s) for s in sizes]
    if len(sizes) != world or any(s < 0 for s in sizes):
        metrics.COLLECTIVE_FAILURES.labels(op=op).inc()
        raise InvalidArgument(f"{op}: sizes {sizes} must list {world} non-negative counts, one per rank")
    if sizes[rank] != local:
        metrics.COLLECTIVE_FAILURES.labels(op=op).inc()
        raise InvalidArgument(f"{op}: rank {rank} holds {local} rows but sizes says {sizes[rank]}")
    return sizes


def _gather_one(t: torch.Tensor, dim: int, sizes: Sequence[int] | None, group: Any, world: int, rank: int) -> torch.Tensor:
    d = dim + t.dim() if dim < 0 else dim
    rows = t.movedim(d, 0).contiguous()
    counts = _sizes(sizes, world, rows.shape[0], rank, _OP_GATHER)
    width = max(counts) if counts else 0
    padded = rows.new_zeros((width,) + tuple(rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    out = rows.new_empty((world * width,) + tuple(rows.shape[1:]))
    try:
        _gather_into(out, padded, group=group)
    except Exception:
        metrics.COLLECTIVE_FAILURES.labels(op=_OP_GATHER).inc()
        raise
    parts = [out[r * width : r * width + counts[r]] for r in range(world)]
    return torch.cat(parts, dim=0).movedim(0, d)


def all_gatherv(comm: Any, input_: torch.Tensor | list[torch.Tensor], dim: int = 0,
                sizes: Sequence[int] | None = None) -> torch.Tensor | list[torch.Tensor]:
    """``DeviceCommunicatorBase.all_gatherv`` for a communicator with a gloo ``device_group``.

    ``input_`` is one tensor or a list (each gathered the same way); ``sizes[r]`` is rank ``r``'s
    length along ``dim`` (equal lengths when None). Returns the concatenation in rank order.
    """
    world, rank, group = comm.world_size, comm.rank_in_group, comm.device_group
    if SOLO["on"]:
        world = 1
    routed = ROUTE["group"]
    if routed is not None and world > 1:
        # the ranks that serve, in rank order; a rank outside the view holds no rows
        if sizes is not None:
            sizes = [int(sizes[r]) for r in routed.members]
        group, world, rank = routed.process_group(), routed.size, routed.group_rank
    if isinstance(input_, (list, tuple)):
        if world == 1:
            return list(input_)
        return [_gather_one(t, dim, sizes, group, world, rank) for t in input_]
    if world == 1:
        return input_
    return _gather_one(input_, dim, sizes, group, world, rank)


def reduce_scatterv(comm: Any, input_: torch.Tensor, dim: int = -1,
                    sizes: Sequence[int] | None = None) -> torch.Tensor:
    """``DeviceCommunicatorBase.reduce_scatterv``: the sum over ranks of ``input_``, cut along
    ``dim`` into ``sizes`` (equal parts when None); returns this rank's part."""
    world, rank, group = comm.world_size, comm.rank_in_group, comm.device_group
    if world == 1 or SOLO["on"]:
        return input_
    if ROUTE["group"] is not None:
        # the sum over the ranks that serve; the parts stay cut by DP rank (others' are empty)
        group = ROUTE["group"].process_group()
    d = dim + input_.dim() if dim < 0 else dim
    total = input_.shape[d]
    if sizes is None:
        if total % world:
            metrics.COLLECTIVE_FAILURES.labels(op=_OP_SCATTER).inc()
            raise InvalidArgument(f"{_OP_SCATTER}: {total} rows do not split into {world} equal parts")
        counts = [total // world] * world
    else:
        counts = [int(s) for s in sizes]
        if len(counts) != world or sum(counts) != total or any(s < 0 for s in counts):
            metrics.COLLECTIVE_FAILURES.labels(op=_OP_SCATTER).inc()
            raise InvalidArgument(f"{_OP_SCATTER}: sizes {counts} must be {world} counts summing to {total}")
    summed = input_.movedim(d, 0).contiguous().clone()
    try:
        dist.all_reduce(summed, group=group)
    except Exception:
        metrics.COLLECTIVE_FAILURES.labels(op=_OP_SCATTER).inc()
        raise
    start = sum(counts[:rank])
    return summed[start : start + counts[rank]].movedim(0, d).contiguous()


def dp_all_reduce(tensor: torch.Tensor) -> bool:
    """Sum ``tensor`` over the elasticep group in force (vLLM's DP padding all-reduce, each rank
    having filled its own column); False where no elasticep group is in force (alone, or
    vLLM's own group): the caller then does what it did before."""
    group = ROUTE["group"]
    if SOLO["on"] or group is None:
        return False
    try:
        dist.all_reduce(tensor, group=group.process_group())
    except Exception:
        metrics.COLLECTIVE_FAILURES.labels(op="vllm_dp_all_reduce").inc()
        raise
    return True


def installed() -> bool:
    """Whether vLLM's ``CpuCommunicator`` carries this module's methods."""
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    return getattr(CpuCommunicator.all_gatherv, "__elasticep__", False)


def install() -> bool:
    """Give vLLM's ``CpuCommunicator`` :func:`all_gatherv` and :func:`reduce_scatterv` where it
    has none of its own (its method is still the base class's). Idempotent; returns whether the
    communicator now carries them."""
    from vllm.distributed.device_communicators.base_device_communicator import DeviceCommunicatorBase
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    def _all_gatherv(self, input_, dim=0, sizes=None):
        return all_gatherv(self, input_, dim, sizes)

    def _reduce_scatterv(self, input_, dim=-1, sizes=None):
        return reduce_scatterv(self, input_, dim, sizes)

    _all_gatherv.__elasticep__ = True  # type: ignore[attr-defined]
    _reduce_scatterv.__elasticep__ = True  # type: ignore[attr-defined]
    done = False
    if CpuCommunicator.all_gatherv is DeviceCommunicatorBase.all_gatherv:
        CpuCommunicator.all_gatherv = _all_gatherv
        done = True
    if CpuCommunicator.reduce_scatterv is DeviceCommunicatorBase.reduce_scatterv:
        CpuCommunicator.reduce_scatterv = _reduce_scatterv
        done = True
    return done or installed()
