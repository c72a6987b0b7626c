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

The same wrapper applies what the elasticep hooks committed (:class:`LayerServing`, per layer):
local experts that moved away get weight 0, and experts adopted from another rank (read from the
checkpoint) are computed here and added, so a placement change needs no change to vLLM's own
(prepacked) weight buffers.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["LayerServing", "localize", "install", "installed", "serving_of", "set_serving"]


class LayerServing:
    """What one MoE layer of this rank computes, set by a commit of the elasticep hooks.

    ``keep``: ``[global experts]`` bool, the experts of vLLM's own local weights this rank still
    serves (False: the expert moved away, its choices get weight 0 here). ``adopted``: experts
    this rank serves beyond vLLM's local ones, ``{expert: (gate [I, H], up [I, H], down [H, I])}``,
    computed by this module (a SiLU-gated MLP in the layer's dtype) and added to the output.
    """

    __slots__ = ("keep", "adopted", "share")

    def __init__(self, keep: torch.Tensor, adopted: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 share: torch.Tensor | None = None):
        self.keep = keep.to(torch.bool)
        self.adopted = dict(adopted)
        self.share = None if share is None else share.to(torch.long)
        """``[global experts, 2]``: for an expert served by ``n`` ranks (replicas), this rank's
        index among them and ``n``; the rank computes that expert for the gathered tokens ``t``
        with ``t % n == index`` only, so each choice is computed exactly once over the ranks
        (every rank holds the same gathered tokens in the same order). None: no replicas."""


# keyed by the data pointer of the layer's w13 weight, the tensor vLLM hands the experts kernel
_SERVING: dict[int, LayerServing] = {}


def set_serving(w13: torch.Tensor, serving: LayerServing | None) -> None:
    """Install (or with None, clear) what the layer whose ``w13_weight`` is ``w13`` computes."""
    if serving is None:
        _SERVING.pop(w13.data_ptr(), None)
    else:
        _SERVING[w13.data_ptr()] = serving


def serving_of(w13: torch.Tensor) -> LayerServing | None:
    """What :func:`set_serving` installed for this layer, or None (vLLM's own placement)."""
    return _SERVING.get(w13.data_ptr())


def _add_adopted(output: torch.Tensor, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, adopted: dict) -> None:
    for expert, (gate, up, down) in adopted.items():
        rows, cols = torch.nonzero(topk_ids == expert, as_tuple=True)
        if rows.numel() == 0:
            continue
        x = hidden[rows]
        y = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
        output.index_add_(0, rows, y * topk_weights[rows, cols].unsqueeze(1).to(y.dtype))


def _own_share(topk_ids: torch.Tensor, topk_weights: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """``topk_weights`` with 0 where the chosen expert is replicated and token ``t`` is another
    replica's (``t % n != index``)."""
    ids = topk_ids.to(torch.long)
    index, n = share[ids, 0], share[ids, 1]
    t = torch.arange(ids.shape[0], dtype=torch.long).unsqueeze(1)
    return torch.where(t % n == index, topk_weights, torch.zeros_like(topk_weights))


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
        serving = _SERVING.get(w1.data_ptr())
        if serving is not None and serving.share is not None:
            topk_weights = _own_share(topk_ids, topk_weights, serving.share)
        global_ids, global_weights = topk_ids, topk_weights
        if serving is not None:
            topk_weights = torch.where(serving.keep[topk_ids.to(torch.long)], topk_weights,
                                       torch.zeros_like(topk_weights))
        if expert_map is not None:
            topk_ids, topk_weights = localize(topk_ids, topk_weights, expert_map)
        result = original(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                          global_num_experts, expert_map, *rest, **kw)
        if serving is not None and serving.adopted:
            _add_adopted(output, hidden_states, global_ids, global_weights, serving.adopted)
        return result

    apply.__elasticep__ = True  # type: ignore[attr-defined]
    CPUUnquantizedExperts.apply = apply
    return True
