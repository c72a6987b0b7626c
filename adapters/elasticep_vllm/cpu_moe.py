"""Expert parallelism for vLLM's CPU fused-MoE experts.

With ``--enable-expert-parallel`` each rank holds only its local experts (``w13``/``w2`` of
``local_num_experts`` rows) and the fused-MoE layer hands the experts kernel an ``expert_map``:
global expert id -> local slot, ``-1`` where the expert lives on another rank. vLLM 0.32's
``CPUUnquantizedExperts.apply`` ignores that map and passes the *global* ``topk_ids`` to the
``cpu_fused_moe`` kernel, which indexes its local weight array with them: out of bounds, the
worker dies with a segmentation fault at the first forward.

:func:`install` wraps ``apply``: with a map, each chosen expert is translated to its local slot;
a choice whose expert is not local keeps a valid slot (0) with routing weight 0, so it adds an
exact 0 to the token's output. Each rank's output is then the sum over its own experts, and the
combine step (``reduce_scatterv``, :mod:`elasticep_vllm.collectives`) sums the ranks.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["localize", "install", "installed"]


def localize(topk_ids: torch.Tensor, topk_weights: torch.Tensor,
             expert_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local ids, weights)``: global ``topk_ids`` through ``expert_map`` (``-1`` = not here);
    choices not served here get slot 0 and weight 0."""
    local = expert_map.to(torch.long)[topk_ids.to(torch.long)]
    here = local >= 0
    ids = torch.where(here, local, torch.zeros_like(local)).to(topk_ids.dtype)
    weights = torch.where(here, topk_weights, torch.zeros_like(topk_weights))
    return ids, weights


def installed() -> bool:
    """Whether ``CPUUnquantizedExperts.apply`` carries the expert-map translation."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    return getattr(CPUUnquantizedExperts.apply, "__elasticep__", False)


def install() -> bool:
    """Wrap ``CPUUnquantizedExperts.apply`` (idempotent); returns True."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    if installed():
        return True
    original = CPUUnquantizedExperts.apply

    @functools.wraps(original)
    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
              global_num_experts, expert_map, *rest, **kw):
        if expert_map is not None:
            topk_ids, topk_weights = localize(topk_ids, topk_weights, expert_map)
        return original(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                        global_num_experts, expert_map, *rest, **kw)

    apply.__elasticep__ = True  # type: ignore[attr-defined]
    CPUUnquantizedExperts.apply = apply
    return True
