"""Conversion between elasticep's :class:`~elasticep.eplb.Placement` and SGLang's
``ExpertLocationMetadata``, built with SGLang's own helpers.

The two describe the same thing in the same layout (slot ``s`` lives on rank
``s // num_local_physical_experts``). They differ in one point: a ``Placement`` marks an empty
slot (a dead rank's) with -1, while SGLang's ``physical_to_logical_map`` always names an expert
(it indexes weights with it) and leaves a dead rank's slots out of
``logical_to_all_physical_map``, which is what routing reads. ``elasticity_aware`` writes expert
0 into them; the adapter writes whatever the slot held before (``fill``), so SGLang's expert
location updater sees those slots as unchanged and sends nothing towards the dead rank.

Who calls it: the rebalance hook (:mod:`elasticep_sglang.rebalance`) reads the placement in force
with :func:`placement_of` and hands its result back in SGLang's form; users call
:func:`to_expert_location_metadata` to start SGLang from an elasticep placement.
"""

from __future__ import annotations

from typing import Any

import torch

from elasticep import metrics
from elasticep.eplb.placement import EMPTY, Placement, RedundancyExhausted

__all__ = [
    "from_expert_location_metadata",
    "logical_to_all_physical_map",
    "physical_to_logical_map",
    "placement_of",
    "to_expert_location_metadata",
]


def physical_to_logical_map(placement: Placement, fill: torch.Tensor | int | None = None) -> torch.Tensor:
    """SGLang's ``physical_to_logical_map`` ``[layers, num_slots]`` ``torch.int64`` (CPU).

    Empty slots take ``fill``: a ``[layers, num_slots]`` tensor (the map in force, so that they
    read as unchanged), an expert id, or None for 0 (``elasticity_aware``'s convention).
    """
    empty = placement.phy2log == EMPTY
    if fill is None:
        fill = 0
    if isinstance(fill, int):
        if not 0 <= fill < placement.num_experts:
            raise ValueError(f"fill={fill} is not a logical expert id")
        return torch.where(empty, fill, placement.phy2log)
    fill_t = fill.detach().to(device="cpu", dtype=torch.int64)
    if tuple(fill_t.shape) != tuple(placement.phy2log.shape):
        raise ValueError(f"fill has shape {tuple(fill_t.shape)}, expected {tuple(placement.phy2log.shape)}")
    if bool(((fill_t < 0) | (fill_t >= placement.num_experts))[empty].any()):
        raise ValueError("fill names no logical expert for some empty slot")
    return torch.where(empty, fill_t, placement.phy2log)


def logical_to_all_physical_map(placement: Placement, moe_ep_rank: int | None = None) -> torch.Tensor:
    """SGLang's ``logical_to_all_physical_map`` ``[layers, experts, X]`` ``torch.int64``, -1 padded,
    computed by SGLang's ``_compute_logical_to_all_physical_map``.

    That helper has no notion of an empty slot (it would file a -1 slot under the last expert), so
    empty slots are filed under one extra logical expert that is dropped afterwards. With
    ``moe_ep_rank`` (and an all-to-all backend configured) SGLang keeps, per expert, only the
    replica nearest to that rank, as it does for its own maps.
    """
    from sglang.srt.eplb.expert_location import _compute_logical_to_all_physical_map

    E = placement.num_experts
    keyed = torch.where(placement.phy2log == EMPTY, E, placement.phy2log)
    full = _compute_logical_to_all_physical_map(
        physical_to_logical_map=keyed,
        num_logical_experts=E + 1,
        ep_size=placement.num_ranks,
        moe_ep_rank=moe_ep_rank,
    )
    log2phy = full[:, :E, :].to(torch.int64)
    # the dropped overflow expert may have been the widest row: trim all -1 columns
    width = max(int((log2phy != EMPTY).sum(dim=-1).max()) if log2phy.numel() else 0, 1)
    return log2phy[..., :width].contiguous()


def to_expert_location_metadata(
    placement: Placement,
    *,
    moe_ep_rank: int | None = None,
    narrow: bool = True,
    fill: torch.Tensor | int | None = None,
    device: torch.device | str | None = None,
) -> Any:
    """An ``ExpertLocationMetadata`` for ``placement``, built by SGLang's ``_init_raw`` (the
    constructor behind ``init_by_mapping`` and ``init_by_eplb``).

    Needs SGLang's published configuration (a running server has it; on CPU see
    :func:`elasticep_sglang.testing.sglang_cpu_runtime`): with ``--ep-dispatch-algorithm static``
    SGLang also computes the per-rank dispatch map for ``moe_ep_rank`` (default: this process's
    ``torch.distributed`` rank).

    Raises:
        RedundancyExhausted: some logical expert has no replica in ``placement`` (SGLang could
            not route its tokens).

    Args:
        placement: the elasticep placement; its rank count is SGLang's ``ep_size``.
        moe_ep_rank: this process's EP rank, as ``init_by_mapping`` takes it.
        narrow: with ``moe_ep_rank``, let SGLang narrow each expert's replicas to the nearest one
            (what ``init_by_mapping`` does); False keeps every replica listed (what
            ``init_by_eplb`` does) and uses ``moe_ep_rank`` only for the dispatch map.
        fill: what empty slots hold in ``physical_to_logical_map`` (see
            :func:`physical_to_logical_map`).
        device: where the metadata's main tensors live (default: SGLang's configured device).
    """
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    # SGLang would route tokens of an uncovered expert nowhere (or fail deep inside the dispatch
    # map computation): refuse such a placement with the typed error instead.
    try:
        placement.dispatch_table(strict=True)
    except RedundancyExhausted:
        metrics.REDUNDANCY_EXHAUSTED.inc()
        raise
    if device is None:
        from sglang.srt.runtime_context import get_device

        device = get_device().device
    phy2log = physical_to_logical_map(placement, fill).to(device)
    log2phy = logical_to_all_physical_map(placement, moe_ep_rank if narrow else None).to(device)
    return ExpertLocationMetadata._init_raw(
        ep_size=placement.num_ranks,
        physical_to_logical_map=phy2log,
        logical_to_all_physical_map=log2phy,
        moe_ep_rank=moe_ep_rank,
    )


def from_expert_location_metadata(metadata: Any, *, alive: Any | None = None) -> Placement:
    """The elasticep placement that an ``ExpertLocationMetadata`` describes.

    Without ``alive``, a slot is empty when ``logical_to_all_physical_map`` lists it for no
    expert (how SGLang leaves out a dead rank's slots): exact for maps built without per-rank
    narrowing (``init_by_eplb``, or :func:`to_expert_location_metadata` without
    ``moe_ep_rank``). SGLang narrows each expert to its nearest replica when it builds a rank's
    map with an all-to-all backend; for those give ``alive`` (``[ep_size]``, e.g. the
    ``active_ranks`` mask) and every slot of a dead rank is empty, every other slot filled.
    """
    phy2log = metadata.physical_to_logical_map_cpu
    if alive is not None:
        return Placement(phy2log, metadata.num_local_physical_experts, metadata.num_logical_experts).masked(alive)
    return Placement.from_sglang(
        phy2log,
        metadata.logical_to_all_physical_map_cpu,
        slots_per_rank=metadata.num_local_physical_experts,
    )


def placement_of(metadata: Any, num_experts: int | None = None) -> Placement:
    """Every slot of ``metadata`` as SGLang's updater sees it (no empty slots): the ``current``
    that the planner starts from; it masks dead ranks itself."""
    return Placement(
        metadata.physical_to_logical_map_cpu,
        metadata.num_local_physical_experts,
        num_experts if num_experts is not None else metadata.num_logical_experts,
    )
