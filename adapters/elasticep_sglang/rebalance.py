"""elasticep's planner as SGLang's EPLB algorithm when ranks are dead.

SGLang rebalances through one function, ``sglang.srt.eplb.eplb_algorithms.rebalance_experts``,
which ``ExpertLocationMetadata.init_by_eplb`` looks up on its module at call time. It runs every
``--eplb-rebalance-num-iterations`` steps, and once more at the step after the
``ElasticEPState.active_ranks`` mask changes (``maybe_rebalance_after_rank_fault``). Its
``elasticity_aware`` algorithm then plans from scratch over the live ranks and ignores where the
experts are: after one of 32 ranks dies it changes about 97 % of the live slots, each one an
expert's weights crossing the network.

:class:`ElasticRebalance` takes its place. While some rank is dead in the active-ranks state it
calls :func:`elasticep.eplb.planner.replan` from the placement in force (SGLang's global
``ExpertLocationMetadata``), which re-homes only the experts that lost their last replica and
then rebalances within a move budget. Otherwise (every rank alive) it hands the call to SGLang's
own algorithm, unless ``periodic="elasticep"``.

It returns what ``init_by_eplb`` passes on to ``ExpertLocationMetadata._init_raw`` and, through
it, to the expert location updater: ``physical_to_logical_map`` ``[layers, num_physical_experts]``
``torch.int64`` with a logical expert in every slot (a dead rank's slots keep the expert they
held, so the updater sees them unchanged), ``logical_to_all_physical_map`` ``[layers,
num_logical_experts, X]`` ``torch.int64`` listing only live slots, padded with -1, and
``logical_count`` ``[layers, num_logical_experts]`` ``torch.int64``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from elasticep import metrics
from elasticep.eplb.placement import RedundancyExhausted
from elasticep.eplb.planner import replan
from elasticep_sglang.convert import physical_to_logical_map, placement_of

__all__ = ["ElasticRebalance", "RebalanceRecord", "active_ranks_of", "changed_live_slots"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebalanceRecord:
    """One call of the rebalance entry point, as served.

    Attributes:
        planner: ``"elasticep"`` or ``"sglang"`` (handed to SGLang's own algorithm).
        dead: ranks dead in the active-ranks state at the call.
        moved: live slots whose expert changed (each is one expert's weights to load).
        seconds: wall time of the planning.
        reason: the planner's one-line account, or why SGLang's algorithm was used.
    """

    planner: str
    dead: tuple[int, ...]
    moved: int
    seconds: float
    reason: str


def active_ranks_of(state: Any, num_ranks: int) -> torch.Tensor | None:
    """``[num_ranks]`` bool on CPU from an ``ElasticEPState`` (None when elastic EP is off).

    Reads ``active_ranks``, the tensor the Mooncake EP kernel and the view feed write and that
    SGLang's own ``elasticity_aware`` reads; its capacity (``--max-ep-size``) may exceed the
    ranks that hold experts.
    """
    if state is None or getattr(state, "active_ranks", None) is None:
        return None
    mask = state.active_ranks.detach().to("cpu")
    if mask.numel() < num_ranks:
        raise ValueError(f"active_ranks has {mask.numel()} entries for {num_ranks} EP ranks")
    return mask[:num_ranks] != 0


def changed_live_slots(old_phy2log: torch.Tensor, new_phy2log: torch.Tensor, alive: torch.Tensor, slots_per_rank: int) -> int:
    """Slots on live ranks whose logical expert differs between two SGLang maps ``[layers, slots]``."""
    live = alive.to(torch.bool).repeat_interleave(slots_per_rank).unsqueeze(0)
    return int(((old_phy2log.cpu() != new_phy2log.cpu()) & live).sum())


def _elastic_state() -> Any:
    from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager

    return ElasticEPStateManager.instance()


def _metadata_in_force() -> Any:
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    return get_global_expert_location_metadata()


class ElasticRebalance:
    """A drop-in for ``sglang.srt.eplb.eplb_algorithms.rebalance_experts``.

    Args:
        fallback: SGLang's own ``rebalance_experts`` (used when every rank is alive, and when no
            placement is in force yet).
        periodic: ``"sglang"`` (default) leaves all-alive rebalancing to SGLang's algorithm;
            ``"elasticep"`` uses the planner then too, changing at most ``max_moves`` slots.
        max_moves: changed live slots allowed beyond the coverage repair: an int, None (no
            limit), or ``"auto"`` (default): four ranks' worth of slots over all layers
            (``4 * layers * num_local_physical_experts``), which brings a DeepSeek-V3-shaped
            placement back to a balance near 1.04 while moving about 15 % of what
            ``elasticity_aware`` moves.
        state: returns the ``ElasticEPState`` (default: ``ElasticEPStateManager.instance``).
        metadata: returns the ``ExpertLocationMetadata`` in force (default: SGLang's global one).

    Called by SGLang on its scheduler thread, never concurrently with itself. ``records`` keeps
    the last 64 calls.
    """

    def __init__(
        self,
        fallback: Callable[..., Any],
        *,
        periodic: str = "sglang",
        max_moves: int | str | None = "auto",
        state: Callable[[], Any] = _elastic_state,
        metadata: Callable[[], Any] = _metadata_in_force,
    ) -> None:
        if not (max_moves is None or max_moves == "auto" or (isinstance(max_moves, int) and max_moves >= 0)):
            raise ValueError(f"max_moves must be a non-negative int, None or 'auto', got {max_moves!r}")
        if periodic not in ("sglang", "elasticep"):
            raise ValueError(f"periodic must be 'sglang' or 'elasticep', got {periodic!r}")
        self.fallback = fallback
        self.periodic = periodic
        self.max_moves = max_moves
        self._state = state
        self._metadata = metadata
        self.records: list[RebalanceRecord] = []

    def _record(self, record: RebalanceRecord) -> None:
        self.records.append(record)
        del self.records[:-64]
        metrics.SGLANG_REBALANCES.labels(planner=record.planner).inc()
        log.info(
            "rebalance by %s: dead=%s moved=%d in %.3fs: %s",
            record.planner, list(record.dead), record.moved, record.seconds, record.reason,
        )

    def __call__(
        self,
        tokens_per_expert: torch.Tensor,
        num_physical_experts: int,
        num_local_physical_experts: int,
        num_groups: int | None,
        num_nodes: int,
        algorithm: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Same arguments and results as SGLang's ``rebalance_experts``.

        ``tokens_per_expert`` is ``[windows, layers, experts]`` (or ``[layers, experts]``) routed
        token counts; the planner balances their sum over windows.

        Raises:
            RedundancyExhausted: the live ranks have fewer slots than there are experts; serving
                on would return wrong outputs.
        """
        t0 = time.perf_counter()
        num_ranks, rem = divmod(int(num_physical_experts), int(num_local_physical_experts))
        if rem:
            raise ValueError(f"{num_physical_experts} physical experts do not divide over {num_local_physical_experts} per rank")
        alive = active_ranks_of(self._state(), num_ranks)
        dead = tuple(int(r) for r in torch.nonzero(~alive).flatten()) if alive is not None else ()
        current_meta = self._metadata() if (dead or self.periodic == "elasticep") else None

        def by_sglang(reason: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            out = self.fallback(
                tokens_per_expert=tokens_per_expert,
                num_physical_experts=num_physical_experts,
                num_local_physical_experts=num_local_physical_experts,
                num_groups=num_groups,
                num_nodes=num_nodes,
                algorithm=algorithm,
            )
            moved = 0
            if current_meta is not None and alive is not None:
                moved = changed_live_slots(current_meta.physical_to_logical_map_cpu, out[0], alive, num_local_physical_experts)
            self._record(RebalanceRecord("sglang", dead, moved, time.perf_counter() - t0, reason))
            return out

        if not dead and self.periodic == "sglang":
            return by_sglang("every rank alive")
        if current_meta is None:
            return by_sglang("no expert placement in force yet")
        if tuple(current_meta.physical_to_logical_map_cpu.shape[1:]) != (num_physical_experts,):
            return by_sglang("placement in force has another slot count (scaling)")

        load = tokens_per_expert.detach().to("cpu", torch.float64)
        if load.dim() == 3:
            load = load.sum(dim=0)
        current = placement_of(current_meta, num_experts=int(load.shape[-1]))
        if alive is None:
            alive = torch.ones(num_ranks, dtype=torch.bool)
        try:
            budget = 4 * current.num_layers * current.slots_per_rank if self.max_moves == "auto" else self.max_moves
            plan = replan(current, load, alive, max_moves=budget)
        except RedundancyExhausted:
            # replan counted it; SGLang's scheduler must stop rather than serve wrong outputs
            log.error("redundancy exhausted with dead ranks %s: cannot cover every expert", list(dead))
            raise
        new = plan.placement
        phy2log = physical_to_logical_map(new, fill=current.phy2log)
        moved = changed_live_slots(current.phy2log, phy2log, alive, num_local_physical_experts)
        self._record(RebalanceRecord("elasticep", dead, moved, time.perf_counter() - t0, plan.reason))
        return phy2log, new.log2phy.clone(), new.logcnt.clone()

