"""elasticep's :class:`~elasticep.agent.EngineHooks` for one vLLM worker (one DP/EP rank).

The placement is elasticep's :class:`~elasticep.eplb.Placement` with ``num_experts`` slots per
rank (a rank can come to serve every expert, as a lone survivor must); vLLM's own expert map
fills the first slots of each rank (``--enable-expert-parallel``, linear strategy: rank ``r``
holds experts ``r * L ... r * L + L - 1``), the rest are empty.

:meth:`VllmHooks.commit` applies a :class:`~elasticep.agent.Commit` to every fused-MoE layer of
the worker's model at once, through :mod:`elasticep_vllm.cpu_moe`: the experts this rank serves
in the new placement that vLLM's local weights hold are kept; those it no longer serves (or all,
when ``alive`` says this rank is out) contribute nothing; those it newly serves are read from the
checkpoint's safetensors (``model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight``) and
computed beside vLLM's kernel. vLLM's weight buffers are never edited, so a later commit can
return to vLLM's own placement exactly. Expert weights are read from disk by the hook itself
(:meth:`expert_layout` is None: the agent moves none).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch

from elasticep.agent.hooks import Commit, EngineHooks
from elasticep.eplb.placement import EMPTY, Placement
from elasticep.errors import InvalidArgument

__all__ = ["VllmHooks", "moe_layers", "vllm_placement"]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def moe_layers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """``[(decoder layer index, routed-experts module)]`` of a vLLM model, in layer order: the
    modules with an ``expert_map_manager`` and a ``w13_weight``."""
    found = []
    for name, mod in model.named_modules():
        if hasattr(mod, "expert_map_manager") and hasattr(mod, "w13_weight"):
            m = _LAYER.search(name)
            if m is None:
                raise InvalidArgument(f"MoE module {name!r} has no layers.<n> in its name")
            found.append((int(m.group(1)), mod))
    found.sort(key=lambda x: x[0])
    return found


def _local_experts(mod: torch.nn.Module, num_experts: int) -> list[int]:
    emap = mod.expert_map_manager.expert_map
    if emap is None:
        return list(range(num_experts))
    local = [-1] * int((emap >= 0).sum())
    for g, l in enumerate(emap.tolist()[:num_experts]):
        if l >= 0:
            local[l] = g
    return local


def vllm_placement(local_by_rank: Sequence[Sequence[Sequence[int]]], num_experts: int) -> Placement:
    """The :class:`Placement` of vLLM's own expert maps: ``local_by_rank[r][layer]`` lists the
    global experts of rank ``r``'s local slots; ``num_experts`` slots per rank."""
    ranks = len(local_by_rank)
    layers = len(local_by_rank[0])
    phy2log = torch.full((layers, ranks * num_experts), EMPTY, dtype=torch.int64)
    for r, per_layer in enumerate(local_by_rank):
        for li, experts in enumerate(per_layer):
            phy2log[li, r * num_experts : r * num_experts + len(experts)] = torch.tensor(list(experts))
    return Placement(phy2log, slots_per_rank=num_experts, num_experts=num_experts)


class VllmHooks(EngineHooks):
    """Hooks over ``model`` (a vLLM worker's ``model_runner.model``) of EP rank ``rank`` of
    ``num_ranks``, whose weights are the safetensors under ``checkpoint``."""

    def __init__(self, model: torch.nn.Module, checkpoint: str | Path, rank: int, num_ranks: int) -> None:
        from elasticep_vllm import cpu_moe

        if not cpu_moe.installed():
            cpu_moe.install()
        self.rank, self.num_ranks = int(rank), int(num_ranks)
        if not 0 <= self.rank < self.num_ranks:
            raise InvalidArgument(f"rank {rank} is not one of {num_ranks} ranks")
        self.checkpoint = Path(checkpoint)
        self.layers = moe_layers(model)
        if not self.layers:
            raise InvalidArgument("the model has no fused-MoE layer")
        self.num_experts = int(self.layers[0][1].expert_map_manager.expert_map.numel()
                               if self.layers[0][1].expert_map_manager.expert_map is not None
                               else self.layers[0][1].w13_weight.shape[0])
        self.local = [_local_experts(mod, self.num_experts) for _, mod in self.layers]
        per = len(self.local[0])
        # vLLM's linear strategy gives every rank the same count, contiguous and in rank order
        others = [[list(range(r * per, (r + 1) * per)) for _ in self.layers] for r in range(self.num_ranks)]
        if any(others[self.rank][i] != self.local[i] for i in range(len(self.layers))):
            raise InvalidArgument(f"rank {rank}'s expert map {self.local[0]} is not vLLM's linear placement")
        self._served = vllm_placement(others, self.num_experts)
        self.epoch = 0

    def placement(self) -> Placement:
        return self._served

    def commit(self, change: Commit) -> None:
        from elasticep_vllm import cpu_moe

        p = change.placement
        if p.num_layers != len(self.layers) or p.num_experts != self.num_experts or p.slots_per_rank != self.num_experts:
            raise InvalidArgument(
                f"placement of {p.num_layers} layers x {p.num_experts} experts x {p.slots_per_rank} slots does not "
                f"fit this model ({len(self.layers)} MoE layers, {self.num_experts} experts)")
        if len(change.alive) <= self.rank:
            raise InvalidArgument(f"alive has {len(change.alive)} entries; rank {self.rank} needs one")
        serving = []
        mine = p.slots_of_rank(self.rank) if self.rank < p.num_ranks else range(0)
        weights = None
        for li, (layer, mod) in enumerate(self.layers):
            served = {int(e) for e in p.phy2log[li, mine.start : mine.stop].tolist() if e != EMPTY}
            if not change.alive[self.rank]:
                served = set()
            keep = torch.zeros(self.num_experts, dtype=torch.bool)
            for e in self.local[li]:
                keep[e] = e in served
            adopted = sorted(served - set(self.local[li]))
            tensors = {}
            if adopted:
                if weights is None:
                    weights = _Checkpoint(self.checkpoint)
                dtype = _layer_dtype(mod)
                for e in adopted:
                    tensors[e] = tuple(weights.get(f"model.layers.{layer}.mlp.experts.{e}.{w}_proj.weight").to(dtype)
                                       for w in ("gate", "up", "down"))
            serving.append((mod, cpu_moe.LayerServing(keep, tensors, _shares(p, li, self.rank, change.alive))))
        # everything read and built: now switch every layer at once
        for mod, s in serving:
            cpu_moe.set_serving(mod.w13_weight, s)
        self._served = p
        self.epoch = change.epoch


def _shares(p: Placement, layer: int, rank: int, alive: Sequence[bool]) -> torch.Tensor | None:
    """``[experts, 2]`` (this rank's index among the live ranks serving each expert, how many
    serve it) for MoE layer ``layer``; None when no expert has a second live copy."""
    holders: dict[int, list[int]] = {}
    for r in range(p.num_ranks):
        if r < len(alive) and alive[r]:
            for e in {int(x) for x in p.phy2log[layer, list(p.slots_of_rank(r))].tolist() if x != EMPTY}:
                holders.setdefault(e, []).append(r)
    if all(len(h) < 2 for h in holders.values()):
        return None
    share = torch.zeros(p.num_experts, 2, dtype=torch.long)
    share[:, 1] = 1
    for e, h in holders.items():
        if rank in h:
            share[e, 0], share[e, 1] = h.index(rank), len(h)
    return share


def _layer_dtype(mod: torch.nn.Module) -> torch.dtype:
    dtype = getattr(getattr(mod, "moe_config", None), "in_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


class _Checkpoint:
    """Tensors by name from every ``*.safetensors`` file under a folder."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self._files: dict[str, Any] = {}
        for f in sorted(folder.glob("*.safetensors")):
            h = safe_open(str(f), framework="pt")
            for k in h.keys():
                self._files[k] = h
        if not self._files:
            raise InvalidArgument(f"no safetensors under {folder}")

    def get(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise InvalidArgument(f"checkpoint has no tensor {name!r}")
        return self._files[name].get_tensor(name)
