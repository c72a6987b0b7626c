"""SGLang's side of :class:`elasticep.Agent`: :class:`SGLangEngineHooks`, one per scheduler process.

Each hook maps onto a piece of SGLang (0.5.23) that already exists:

==========================  ================================================  ==========================================
hook                        SGLang symbol                                     contract here
==========================  ================================================  ==========================================
``placement()``             the global ``ExpertLocationMetadata``             its ``physical_to_logical_map_cpu``, with
                            (``get_global_expert_location_metadata()``)       the slots of ranks outside the served view
                                                                              emptied; no I/O
``commit(change)``          ``ExpertLocationMetadata._init_raw`` and          once per epoch (a repeated or older epoch
                            ``.update``; ``update_expert_weights_single_      is refused and counted): the experts move
                            layer`` (the expert location updater);            first (SGLang's updater between live
                            ``ElasticEPState.active_ranks``,                  ranks, a dead rank never a source nor a
                            ``snapshot_active_to_last``,                      destination; experts no live rank holds
                            ``sync_active_to_cpu``                            from SGLang's DRAM backup or disk), then
                                                                              the metadata, then the active-ranks mask,
                                                                              whose snapshot keeps SGLang from
                                                                              rebalancing a second time
``on_view(view)``           ``ElasticEPState.active_ranks``                   a rank the view removed is cleared in the
                                                                              mask at once (1 -> 0 only), so Mooncake EP
                                                                              stops waiting on it
``kernel_timeouts()``       Mooncake EP's marks in ``active_ranks``           :class:`~elasticep.detect.MaskSource` over
                                                                              :class:`~elasticep_sglang.detect.SGLang\
ActiveRanks`: one ``PeerTimeout`` per member the kernel marked
``expert_layout()``         (none)                                            None: SGLang moves its own weights
==========================  ================================================  ==========================================

``commit`` runs on the agent's hook thread while the scheduler thread is parked in
:meth:`Agent.boundary` (called from the step boundary SGLang's model runner already has,
``maybe_rebalance_after_rank_fault``), so nothing of SGLang runs concurrently with it. Every
member runs it after the agent's commit barrier, which is what SGLang's updater needs: its
point-to-point sends and receives pair up between the live ranks.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from elasticep import metrics
from elasticep.agent import EngineHooks
from elasticep.detect import MaskSource
from elasticep.errors import ElasticEPError
from elasticep.eplb.placement import Placement
from elasticep_sglang.active_ranks import ActiveRanksFeed, ElasticEPDisabled
from elasticep_sglang.convert import from_expert_location_metadata, to_expert_location_metadata
from elasticep_sglang.detect import MOONCAKE_EP_TIMEOUT_US, SGLangActiveRanks

__all__ = ["NO_EXPERT", "NoWeightPath", "PlacementMismatch", "SGLangEngineHooks", "UpdatePlan", "plan_expert_update"]

log = logging.getLogger(__name__)

NO_EXPERT = -1
"""What a dead rank's slots hold in the maps handed to SGLang's updater: no logical expert, so
the updater neither reads from them nor sends to them."""


class PlacementMismatch(ElasticEPError, ValueError):
    """A committed placement does not fit SGLang's expert slots (other rank count, slots per
    rank or expert count than the server was started with)."""


class NoWeightPath(ElasticEPError, RuntimeError):
    """A view would change what a live slot of this rank serves, but SGLang runs without EPLB
    (``--enable-eplb``), so nothing could move the weights."""


def _elastic_state() -> Any:
    from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager

    return ElasticEPStateManager.instance()


def _global_metadata() -> Any:
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    return get_global_expert_location_metadata()


@dataclass(frozen=True)
class UpdatePlan:
    """What :func:`plan_expert_update` hands SGLang's updater, and what it leaves to disk.

    Attributes:
        old: ``[layers, slots]`` ``torch.int64``: the map in force, dead slots ``NO_EXPERT``.
        new: ``[layers, slots]`` ``torch.int64``: the committed map, dead slots ``NO_EXPERT``,
            and a slot whose expert has no live source anywhere kept at its old expert (the
            updater then leaves it; it is loaded afterwards).
        missing: ``{layer: [expert, ...]}`` of ``rank``'s slots that no live rank can send.
        moves: ``rank``'s changed slots, by source: ``local`` (a slot of this rank), ``peer``
            (a live rank), ``missing`` (backup or disk).
    """

    old: torch.Tensor
    new: torch.Tensor
    missing: dict[int, list[int]]
    moves: dict[str, int]


def plan_expert_update(old: torch.Tensor, new: torch.Tensor, alive: Any, slots_per_rank: int, rank: int) -> UpdatePlan:
    """The maps SGLang's expert location updater runs on, so that a dead rank is never a source.

    SGLang's updater picks each moved expert's source among the ranks whose slots held it in
    the old map; it cannot tell a dead rank from a live one, and only drops receives from ranks
    inactive in ``active_ranks_cpu`` (then reloading those experts from disk although a live
    replica exists). Here every slot of a dead rank holds ``NO_EXPERT`` in both maps, so every
    source it picks is live; an expert that no live slot held is kept out of the exchange and
    loaded from the backup or the checkpoint. Pure: the same inputs give the same maps on every
    rank, which the updater's pairing of sends and receives relies on.

    Args:
        old: ``[layers, slots]`` integer map in force (SGLang's ``physical_to_logical_map_cpu``).
        new: ``[layers, slots]`` integer map committed.
        alive: ``[ranks]`` bool (or 0/1), the committed view's members.
        slots_per_rank: SGLang's ``num_local_physical_experts``.
        rank: the rank whose ``missing`` and ``moves`` are reported.
    """
    old = old.to(torch.int64)
    new = new.to(torch.int64)
    if tuple(old.shape) != tuple(new.shape):
        raise PlacementMismatch(f"maps of different shapes: {tuple(old.shape)} and {tuple(new.shape)}")
    ranks = old.shape[1] // slots_per_rank
    alive_t = torch.as_tensor(alive).to(torch.bool).flatten()[:ranks]
    live_slot = alive_t.repeat_interleave(slots_per_rank).unsqueeze(0).expand_as(old)
    old_m = torch.where(live_slot, old, NO_EXPERT)
    new_m = torch.where(live_slot, new, NO_EXPERT)
    missing: dict[int, list[int]] = {}
    moves = {"local": 0, "peer": 0, "missing": 0}
    mine = range(rank * slots_per_rank, (rank + 1) * slots_per_rank)
    for layer in range(old.shape[0]):
        held = set(old_m[layer].tolist()) - {NO_EXPERT}
        local = set(old_m[layer, mine.start:mine.stop].tolist()) if rank < ranks else set()
        for slot in range(old.shape[1]):
            want = int(new_m[layer, slot])
            if want == NO_EXPERT or want == int(old_m[layer, slot]) or want in held:
                if slot in mine and want != NO_EXPERT and want != int(old_m[layer, slot]):
                    moves["local" if want in local else "peer"] += 1
                continue
            new_m[layer, slot] = old_m[layer, slot]  # no live source: out of the exchange
            if slot in mine:
                missing.setdefault(layer, [])
                if want not in missing[layer]:
                    missing[layer].append(want)
                moves["missing"] += 1
    return UpdatePlan(old_m, new_m, missing, moves)


class SGLangEngineHooks(EngineHooks):
    """:class:`~elasticep.agent.EngineHooks` over one SGLang scheduler process (module docs).

    Args:
        rank: this process's EP rank (SGLang's global rank with ``--pp-size 1``).
        state: returns SGLang's ``ElasticEPState`` (default ``ElasticEPStateManager.instance``).
        metadata: returns SGLang's global ``ExpertLocationMetadata``.
        eplb_manager: SGLang's ``EPLBManager`` (the model runner's; the step boundary hands it
            over at every call): where the model's expert tensors, the DRAM backup client and
            the disk weight updater are found. Without one the commit refuses to change what a
            live slot of this rank serves (nothing could move the weights).
        admit_joins: write ranks a view admits as active at once (see
            :class:`~elasticep_sglang.active_ranks.ActiveRanksFeed`).
        timeout_us: Mooncake EP's per-call wait bound, reported in ``PeerTimeout.waited_us``.

    Attributes:
        applied: every epoch committed, in order (each exactly once).
        refused: epochs offered again (or older ones), refused.
        moves: expert loads of the last commit on this rank, by source.
    """

    def __init__(
        self,
        rank: int,
        *,
        state: Callable[[], Any] = _elastic_state,
        metadata: Callable[[], Any] = _global_metadata,
        eplb_manager: Any = None,
        admit_joins: bool = False,
        timeout_us: int = MOONCAKE_EP_TIMEOUT_US,
    ) -> None:
        self.rank = int(rank)
        self._state = state
        self._metadata = metadata
        self.eplb_manager = eplb_manager
        self.feed = ActiveRanksFeed(state, admit_joins=admit_joins)
        self.applied: list[int] = []
        self.refused: list[int] = []
        self.moves: dict[str, int] = {}
        self._lock = threading.Lock()
        self._view_members: frozenset[int] | None = None
        # built last: it reads the mask once (the baseline its first diff is taken against)
        self.mask_source = MaskSource(self.rank, SGLangActiveRanks(state, feed=self, timeout_us=timeout_us))

    # ------------------------------------------------------------------ what SGLang serves

    def _require(self) -> tuple[Any, Any]:
        state, md = self._state(), self._metadata()
        if state is None or getattr(state, "active_ranks", None) is None:
            raise ElasticEPDisabled("SGLang has no elastic EP state; launch it with --elastic-ep-backend mooncake")
        if md is None:
            raise RuntimeError("SGLang has no global ExpertLocationMetadata yet (the model runner sets it at load)")
        return state, md

    def served_alive(self, num_ranks: int) -> torch.Tensor:
        """``[num_ranks]`` bool: the members of the epoch served (every rank before the first)."""
        mask = self.feed.members_mask(num_ranks)
        return torch.ones(num_ranks, dtype=torch.bool) if mask is None else mask

    def members_mask(self, capacity: int) -> torch.Tensor | None:
        """``[capacity]`` bool of the newest view's members, for the mask source: ranks outside
        it show as active, so only the kernel's marks on members are reported."""
        members = self._view_members if self._view_members is not None else self.feed.members
        if members is None:
            return None
        out = torch.zeros(capacity, dtype=torch.bool)
        out[[m for m in members if m < capacity]] = True
        return out

    def placement(self) -> Placement:
        _, md = self._require()
        return from_expert_location_metadata(md, alive=self.served_alive(md.ep_size))

    # ------------------------------------------------------------------ the agent's calls

    def on_view(self, view: Any) -> None:
        members = frozenset(int(m) for m in view.members)
        self._view_members = members
        state = self._state()
        if state is None or getattr(state, "active_ranks", None) is None:
            return
        served = self.feed.members if self.feed.members is not None else frozenset(range(state.active_ranks.numel()))
        gone = sorted(r for r in served - members if r < state.active_ranks.numel())
        if gone:
            state.active_ranks[gone] = 0  # only ever 1 -> 0: a kernel waiting on them returns

    def kernel_timeouts(self) -> list:
        return self.mask_source.after("dispatch")

    def commit(self, change: Any) -> None:
        with self._lock:
            self._commit(change)

    def _commit(self, change: Any) -> None:
        epoch = int(change.epoch)
        if self.applied and epoch <= self.applied[-1]:
            self.refused.append(epoch)
            metrics.SGLANG_COMMITS.labels(outcome="duplicate" if epoch == self.applied[-1] else "stale").inc()
            log.warning("rank %d: commit of epoch %d refused: epoch %d already applied", self.rank, epoch,
                        self.applied[-1])
            return
        state, md = self._require()
        placement: Placement = change.placement
        spr = int(md.num_local_physical_experts)
        if (placement.num_ranks != md.ep_size or placement.slots_per_rank != spr
                or placement.num_experts != md.num_logical_experts or placement.num_layers != md.num_layers):
            metrics.SGLANG_COMMITS.labels(outcome="mismatch").inc()
            raise PlacementMismatch(
                f"epoch {epoch}: placement of {placement.num_layers} layers x {placement.num_ranks} ranks x "
                f"{placement.slots_per_rank} slots, {placement.num_experts} experts; SGLang serves "
                f"{md.num_layers} x {md.ep_size} x {spr}, {md.num_logical_experts} experts")
        if state.active_ranks.is_cuda:
            torch.cuda.set_device(state.active_ranks.device)  # the hook thread's device
        old = md.physical_to_logical_map_cpu.clone()
        alive = torch.tensor([bool(a) for a in change.alive], dtype=torch.bool)
        # SGLang's maps name an expert in every slot: a dead slot keeps what it held
        new_md = to_expert_location_metadata(placement, moe_ep_rank=self.rank, narrow=False, fill=old,
                                             device=md.physical_to_logical_map.device)
        plan = plan_expert_update(old, new_md.physical_to_logical_map_cpu, alive, spr, self.rank)
        changed = sum(plan.moves.values())
        if changed and self.eplb_manager is None:
            metrics.SGLANG_COMMITS.labels(outcome="no_weight_path").inc()
            raise NoWeightPath(f"epoch {epoch} changes {changed} experts on rank {self.rank} but SGLang runs "
                               "without EPLB (--enable-eplb): nothing could move their weights")
        if self.eplb_manager is not None:
            self._move_weights(plan, spr)
        md.update(new_md, update_layer_ids=list(range(md.num_layers)))
        if plan.missing:
            self._load_missing(plan.missing)
        outcome = self.feed.apply(change.view)
        if outcome != "applied":  # pragma: no cover - guarded by the epoch check above
            raise RuntimeError(f"epoch {epoch}: the active-ranks feed refused the view ({outcome})")
        state.snapshot_active_to_last()  # SGLang's own step-boundary check sees no change
        state.sync_active_to_cpu()
        self.moves = dict(plan.moves)
        for source, n in plan.moves.items():
            if n:
                metrics.SGLANG_EXPERT_LOADS.labels(source=source).inc(n)
        self.applied.append(epoch)
        metrics.SGLANG_COMMITS.labels(outcome="applied").inc()
        log.info("rank %d: epoch %d committed to SGLang: members %s, experts moved %s", self.rank, epoch,
                 sorted(change.view.members), plan.moves)

    # ------------------------------------------------------------------ weights, SGLang's way

    def _move_weights(self, plan: UpdatePlan, spr: int) -> None:
        """Run SGLang's per-layer updater on the masked maps (sends and receives between live
        ranks over ``torch.distributed``)."""
        import torch.distributed as dist
        from sglang.srt.eplb import expert_location_updater as updater
        from sglang.srt.runtime_context import get_parallel

        weights = self.eplb_manager._get_model().routed_experts_weights_of_layer
        layer_ids = sorted(weights)
        if not layer_ids:
            return
        world = dist.get_world_size()
        nnodes = max(int(getattr(get_parallel(), "nnodes", 1) or 1), 1)
        temp = updater.create_temp_buffers(weights[layer_ids[0]])
        for layer in layer_ids:
            updater.update_expert_weights_single_layer(
                routed_experts_weights=weights[layer],
                temp_buffers=temp,
                old_physical_to_logical_map=plan.old[layer].tolist(),
                new_physical_to_logical_map=plan.new[layer].tolist(),
                num_local_physical_experts=spr,
                num_gpu_per_node=max(world // nnodes, 1),
                rank=self.rank,
                world_size=world,
                missing_logical_experts_info=None,  # no dead peer is in these maps
            )

    def _load_missing(self, missing: dict[int, list[int]]) -> None:
        """Experts no live rank holds: SGLang's DRAM backup if it keeps one, else the checkpoint
        (what ``update_expert_location_with_recovery`` does with the updater's missing list)."""
        model = self.eplb_manager._get_model()
        name_filter = model.generate_weight_name_filter(missing) if callable(
            getattr(model, "generate_weight_name_filter", None)) else None
        backup = self.eplb_manager._get_expert_backup_client()
        if backup is not None and getattr(backup, "use_backup", False):
            backup.update_weights(name_filter)
            return
        from sglang.srt.runtime_context import get_model

        self.eplb_manager._get_weight_updater().update_weights_from_disk(
            get_model().model_path, get_model().load_format, weight_name_filter=name_filter)
