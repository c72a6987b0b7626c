"""A vLLM worker extension (``worker_extension_cls="elasticep_vllm.worker.ElasticEPWorker"``):
the elasticep hooks of each worker, reachable with vLLM's ``collective_rpc``.

``await engine.collective_rpc("elasticep_placement")`` returns the placement one worker serves
(``Placement.to_dict()``); ``collective_rpc("elasticep_commit", args=(epoch, phy2log, alive))``
commits a placement on every worker (:meth:`~elasticep_vllm.hooks.VllmHooks.commit`) and returns
what each serves after it. vLLM mixes this class into its worker class, so ``self`` is the
worker.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["ElasticEPWorker"]


class ElasticEPWorker:
    _elasticep_hooks: Any = None

    def elasticep_hooks(self):
        """This worker's :class:`~elasticep_vllm.hooks.VllmHooks` (built on first use)."""
        if self._elasticep_hooks is None:
            from vllm.distributed.parallel_state import get_ep_group

            from elasticep_vllm.hooks import VllmHooks

            ep = get_ep_group()
            self._elasticep_hooks = VllmHooks(self.model_runner.model, self.vllm_config.model_config.model,
                                              ep.rank_in_group, ep.world_size)
        return self._elasticep_hooks

    def elasticep_placement(self) -> dict:
        hooks = self.elasticep_hooks()
        return {"rank": hooks.rank, "epoch": hooks.epoch, "placement": hooks.placement().to_dict()}

    def elasticep_commit(self, epoch: int, phy2log: Sequence[Sequence[int]], alive: Sequence[bool]) -> dict:
        from elasticep.agent.hooks import Commit
        from elasticep.eplb.placement import Placement

        hooks = self.elasticep_hooks()
        placement = Placement(phy2log, slots_per_rank=hooks.num_experts, num_experts=hooks.num_experts)
        # a direct commit (no agent, no membership view): the call tests and operators use
        hooks.commit(Commit(epoch=int(epoch), view=None, placement=placement, alive=tuple(bool(a) for a in alive)))
        return self.elasticep_placement()

    def elasticep_regroup(self, epoch: int, members: Sequence[int]) -> dict:
        """The groups phase of view ``epoch`` in this worker: a gloo group over ``members`` (the
        DP ranks that serve) in elasticep's store, met by every member's worker (bounded); none
        for a rank alone. In force from :meth:`elasticep_apply`. Returns ``{"epoch", "members",
        "ms"}``."""
        import time

        t0 = time.monotonic()
        members = sorted(int(m) for m in members)
        self._elasticep_pending_group = None
        if len(members) > 1:
            self._elasticep_pending_group = self._elasticep_groups().rebuild(_ViewOf(epoch, members))
        return {"epoch": int(epoch), "members": members, "ms": round((time.monotonic() - t0) * 1000, 1)}

    def _elasticep_groups(self):
        builder = getattr(self, "_elasticep_group_builder", None)
        if builder is None:
            import os

            from elasticep.agent import connect_store
            from elasticep.groups import GlooGroups
            from elasticep_vllm.core_agent import ENV_CLUSTER, ENV_STORE

            builder = GlooGroups(connect_store(os.environ[ENV_STORE]), self.elasticep_hooks().rank,
                                 op_timeout_s=30.0, rendezvous_timeout_s=20.0,
                                 prefix=f"elasticep/{os.environ.get(ENV_CLUSTER, 'vllm')}/groups/worker")
            self._elasticep_group_builder = builder
        return builder

    def elasticep_apply(self, epoch: int, phy2log: Sequence[Sequence[int]], alive: Sequence[bool]) -> dict:
        """The engine core's agent commits a view: :meth:`elasticep_commit`, and the MoE
        gather/scatter and the DP padding all-reduce run over the ranks ``alive`` says serve:
        alone (wait for no peer), the group :meth:`elasticep_regroup` built for this view, or
        vLLM's own group while every original rank serves and no view changed the group."""
        from elasticep_vllm import collectives

        out = self.elasticep_commit(epoch, phy2log, alive)
        serving = [r for r, a in enumerate(alive) if a]
        group = getattr(self, "_elasticep_pending_group", None)
        if group is not None and list(group.members) != serving:
            group = None
        collectives.route(group, solo=serving == [self.elasticep_hooks().rank])
        out["group"] = None if group is None else list(group.members)
        return out


class _ViewOf:
    """The two fields of a view a group builder reads."""

    def __init__(self, epoch: int, members: Sequence[int]) -> None:
        self.epoch, self.members = int(epoch), tuple(members)
