"""A vLLM worker extension (``worker_extension_cls="elasticep_vllm.worker.ElasticEPWorker"``):
the elasticep hooks of each worker, reachable with vLLM's ``collective_rpc``.

``await engine.collective_rpc("elasticep_placement")`` returns the placement one worker serves
(``Placement.to_dict()``); ``collective_rpc("elasticep_commit", args=(epoch, phy2log, alive))``
commits a placement on every worker (:meth:`~elasticep_vllm.hooks.VllmHooks.commit`) and returns
what each serves after it. vLLM mixes this class into its worker class, so ``self`` is the
worker.
"""

from __future__ import annotations

import types
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
            if getattr(self, "_elasticep_group_builder", None) is None:
                from elasticep_vllm.core_agent import view_groups

                self._elasticep_group_builder = view_groups(self.elasticep_hooks().rank, "worker")
            view = types.SimpleNamespace(epoch=int(epoch), members=tuple(members))
            self._elasticep_pending_group = self._elasticep_group_builder.rebuild(view)
        return {"epoch": int(epoch), "members": members, "ms": round((time.monotonic() - t0) * 1000, 1)}

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
