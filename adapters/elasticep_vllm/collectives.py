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

A collective that fails (a peer died: gloo reports the closed connection) is counted in
``elasticep_collective_failures_total{op}`` and re-raised.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from elasticep import metrics
from elasticep.errors import InvalidArgument

__all__ = ["SOLO", "all_gatherv", "reduce_scatterv", "install", "installed"]

SOLO = {"on": False}
"""Whether this process's rank serves alone (its DP/EP peers are dead; set when elasticep
recovers a vLLM server, :mod:`elasticep_vllm.recovery`): gather and scatter then keep this rank's
own rows and wait for no peer."""

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
