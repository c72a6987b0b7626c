"""The reference engine's model: a tiny DeepSeek-V3 and the per-rank model that serves it.

Two halves:

* :func:`make_tiny_model` writes a small DeepSeek-V3 (transformers' ``DeepseekV3Config``: MLA
  attention, a dense first layer, routed experts with grouped top-k routing, one shared expert)
  with seeded random weights as ``model.safetensors`` + ``config.json`` in transformers' layout.
  Routed experts are stored per expert (``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``),
  as DeepSeek's own checkpoints are, so a rank can read exactly the experts it holds.

* :class:`RankModel` is what one EP rank runs. Everything except the routed experts (embeddings,
  MLA attention, norms, the dense MLP, shared experts, the router, the LM head) is transformers'
  own module code, replicated on every rank (data-parallel attention). Each MoE layer's routed
  experts are replaced by :class:`EPExperts`, which holds only this process's physical slots and
  hands tokens to an expert-parallel backend (:mod:`elasticep.engine.ep`): logical expert ids from
  the router become physical slots through the placement's dispatch table over live replicas.

Layer numbering: a :class:`~elasticep.eplb.placement.Placement` here has one row per *MoE* layer,
``moe_layer = decoder_layer - first_k_dense_replace`` (the dense layers have no experts).

Decoding is greedy with transformers' ``DynamicCache`` (a KV cache of MLA latents). A step that
fails half-way (a peer died inside dispatch) is replayed by cropping the cache back to its length
before the step (:meth:`RankModel.step`), so replay never double-appends.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from elasticep.eplb.placement import EMPTY, Placement

if TYPE_CHECKING:  # transformers is imported lazily: it costs seconds and ranks fork from a warm parent
    from transformers import DeepseekV3Config

__all__ = [
    "TINY_DEFAULTS",
    "tiny_config",
    "make_tiny_model",
    "load_config",
    "moe_layer_ids",
    "round_robin_placement",
    "ExpertCheckpoint",
    "EPExperts",
    "RankModel",
    "DecodeState",
    "SlotNotLoaded",
    "PlacementMismatch",
]

WEIGHTS_FILE = "model.safetensors"

#: The tiny model's shape. Small enough that a forward takes milliseconds on one core, large
#: enough to exercise everything DeepSeek-V3 has: MLA with LoRA-compressed Q and KV, decoupled
#: RoPE heads, a dense first layer, grouped top-k routing with a correction bias, a shared expert.
TINY_DEFAULTS: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    max_position_embeddings=512,
    num_nextn_predict_layers=0,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    bos_token_id=0,
    # no EOS: every request generates exactly max_new_tokens, so load is predictable
    eos_token_id=None,
    pad_token_id=None,
    tie_word_embeddings=False,
)


class SlotNotLoaded(RuntimeError):
    """A placement names an expert for a local slot whose weights were never loaded or staged.

    Raised by :meth:`RankModel.set_placement`; nothing is applied. ``missing`` lists
    ``(moe_layer, slot, expert)``.
    """

    def __init__(self, missing: Sequence[tuple[int, int, int]]):
        self.missing = tuple(missing)
        head = list(self.missing[:8])
        more = f" and {len(self.missing) - 8} more" if len(self.missing) > 8 else ""
        super().__init__(f"no weights loaded or staged for (moe_layer, slot, expert) {head}{more}")


class PlacementMismatch(ValueError):
    """A placement does not fit the model (layers, experts) or this process's slots."""


def tiny_config(**overrides: Any) -> "DeepseekV3Config":
    """``DeepseekV3Config`` for the tiny model: :data:`TINY_DEFAULTS` updated by ``overrides``."""
    from transformers import DeepseekV3Config

    values = dict(TINY_DEFAULTS)
    values.update(overrides)
    config = DeepseekV3Config(**values)
    if config.n_routed_experts % config.n_group:
        raise ValueError(f"n_routed_experts={config.n_routed_experts} must divide into n_group={config.n_group}")
    if config.topk_group > config.n_group:
        raise ValueError(f"topk_group={config.topk_group} > n_group={config.n_group}")
    # grouped routing picks top-2 per group, then top-k among the chosen groups' experts
    per_group = config.n_routed_experts // config.n_group
    if per_group < 2 or config.num_experts_per_tok > config.topk_group * per_group:
        raise ValueError("num_experts_per_tok exceeds the experts in topk_group groups")
    return config


def _init_std(name: str, shape: torch.Size) -> tuple[float, float]:
    """(mean, std) of the seeded weights: unit-variance activations through every projection,
    and an LM head wide enough that greedy choices are not near-ties (float rounding between
    the oracle and the engine must not flip an argmax)."""
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return 1.0, 0.1
    if name.endswith("e_score_correction_bias"):
        return 0.0, 0.05
    if name.endswith("embed_tokens.weight"):
        return 0.0, 1.0
    fan_in = shape[-1]
    std = 1.0 / math.sqrt(fan_in)
    if name == "lm_head.weight":
        std *= 4.0
    return 0.0, std


def make_tiny_model(path: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny DeepSeek-V3 with seeded random weights to directory ``path``; return it.

    Produces ``config.json`` and ``model.safetensors`` via transformers' ``save_pretrained``,
    so routed experts are stored one tensor per expert and projection, the layout
    ``DeepseekV3ForCausalLM.from_pretrained`` reads. Same ``seed`` and overrides, same bytes.
    ``overrides`` are ``DeepseekV3Config`` fields (e.g. ``n_routed_experts=32``).
    Called by the ``tiny_model`` fixture, the demo and benchmarks; takes well under a second.
    """
    from transformers import DeepseekV3ForCausalLM

    path = Path(path)
    config = tiny_config(**overrides)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM._from_config(config, dtype=torch.float32)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # names sorted so the stream of random numbers does not depend on module order
        tensors = dict(model.named_parameters())
        tensors.update(dict(model.named_buffers()))
        persistent = set(model.state_dict().keys())
        for name in sorted(tensors):
            t = tensors[name]
            if name not in persistent:
                continue
            mean, std = _init_std(name, t.shape)
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * std + mean)
    # rotary inverse frequencies are computed buffers; rebuild them on the CPU
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    model.model.rotary_emb = DeepseekV3RotaryEmbedding(config=config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return path


def load_config(path: str | Path) -> "DeepseekV3Config":
    """The ``DeepseekV3Config`` saved in model directory ``path``."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config.from_pretrained(str(path))


def moe_layer_ids(config: "DeepseekV3Config") -> list[int]:
    """Decoder-layer indices of the MoE layers, in placement-row order."""
    return list(range(config.first_k_dense_replace, config.num_hidden_layers))


def round_robin_placement(
    num_layers: int, num_experts: int, num_ranks: int, slots_per_rank: int, *, shift_per_layer: int = 0
) -> Placement:
    """A simple first placement: slot ``s`` of layer ``l`` holds expert ``(s + l * shift) % E``.

    With ``num_ranks * slots_per_rank > num_experts`` the extra slots are redundant replicas of
    the first experts; as long as ``num_experts >= slots_per_rank`` the replicas of one expert
    sit on different ranks, so any one rank can die without losing an expert. The planner's
    balanced ``initial`` placement replaces this where load is known.
    """
    total = num_ranks * slots_per_rank
    if total < num_experts:
        raise ValueError(f"{num_ranks} ranks x {slots_per_rank} slots cannot hold {num_experts} experts")
    slots = torch.arange(total, dtype=torch.int64)
    rows = [(slots + layer * shift_per_layer) % num_experts for layer in range(num_layers)]
    return Placement(torch.stack(rows), slots_per_rank, num_experts)


# ------------------------------------------------------------------------------------------------
# reading the checkpoint


class ExpertCheckpoint:
    """Reads tensors from a tiny model's ``model.safetensors`` without loading the whole file.

    ``safetensors.safe_open`` memory-maps the file; :meth:`expert` touches only one expert's
    three projections. Used by :class:`RankModel` at start and as the "disk" weight source of
    the reconfiguration pipeline (the slowest of live replica > host copy > disk).
    """

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self.config = load_config(self.path)
        self._file = safe_open(str(self.path / WEIGHTS_FILE), framework="pt")
        self._lock = threading.Lock()
        self._moe = moe_layer_ids(self.config)

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def tensor(self, key: str) -> torch.Tensor:
        with self._lock:
            return self._file.get_tensor(key)

    @staticmethod
    def expert_prefix(decoder_layer: int, expert: int) -> str:
        return f"model.layers.{decoder_layer}.mlp.experts.{expert}."

    def is_routed_expert_key(self, key: str) -> bool:
        return ".mlp.experts." in key

    def expert(self, moe_layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One routed expert as ``{"w13": [2*I, H], "w2": [H, I]}`` (gate and up stacked, as
        transformers' fused ``gate_up_proj`` rows are)."""
        if not 0 <= moe_layer < len(self._moe):
            raise PlacementMismatch(f"moe_layer {moe_layer} out of range (model has {len(self._moe)})")
        if not 0 <= expert < self.config.n_routed_experts:
            raise PlacementMismatch(f"expert {expert} out of range (model has {self.config.n_routed_experts})")
        p = self.expert_prefix(self._moe[moe_layer], expert)
        gate = self.tensor(p + "gate_proj.weight")
        up = self.tensor(p + "up_proj.weight")
        down = self.tensor(p + "down_proj.weight")
        return {"w13": torch.cat([gate, up], dim=0), "w2": down}

    def replicated_state(self) -> dict[str, torch.Tensor]:
        """Every tensor but the routed experts, keyed as in ``DeepseekV3ForCausalLM.state_dict()``."""
        return {k: self.tensor(k) for k in self.keys() if not self.is_routed_expert_key(k)}


# ------------------------------------------------------------------------------------------------
# the expert-parallel MoE layer


class EPExperts(nn.Module):
    """Drop-in for transformers' ``DeepseekV3Experts`` that runs through an EP backend.

    ``DeepseekV3MoE.forward`` calls ``experts(hidden_states [T, H], top_k_index [T, k] int64
    logical ids, top_k_weights [T, k] float32)`` and adds the shared expert; this module maps
    the logical ids to physical slots with the owner's current dispatch table, dispatches,
    runs the local slots' experts on what arrives and combines. It holds no parameters (so the
    model's ``state_dict`` has no routed experts); the weights live in :class:`_SlotWeights`.
    """

    def __init__(self, owner: "RankModel", moe_layer: int):
        super().__init__()
        # a plain attribute, not a submodule: the owner is not an nn.Module
        object.__setattr__(self, "_owner", owner)
        self.moe_layer = moe_layer

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return self._owner._moe_forward(self.moe_layer, hidden_states, top_k_index, top_k_weights)


@dataclass
class _SlotWeights:
    """The routed-expert weights of one MoE layer on this process.

    ``w13`` ``[n_local, 2*I, H]`` and ``w2`` ``[n_local, H, I]`` are contiguous, so a transfer
    engine can register them once; ``expert`` ``[n_local]`` int64 is the logical expert each local
    slot holds (-1 empty). ``staged`` holds weights loaded for the next placement, keyed by local
    index, until :meth:`RankModel.set_placement` applies them.
    """

    w13: torch.Tensor
    w2: torch.Tensor
    expert: torch.Tensor
    staged: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class DecodeState:
    """One request's decoding state on a rank: its tokens so far and its KV cache.

    ``prompt`` and ``generated`` are token ids; ``cache`` is transformers' ``DynamicCache``
    (created on the first step).
    """

    prompt: list[int]
    max_new_tokens: int
    generated: list[int] = field(default_factory=list)
    cache: Any = None

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.max_new_tokens

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)


class RankModel:
    """The model one EP rank serves: replicated dense parts, routed experts by physical slot.

    Args:
        path: directory written by :func:`make_tiny_model` (or any DeepSeek-V3 checkpoint with
            per-expert tensors).
        placement: the current :class:`~elasticep.eplb.placement.Placement`, one row per MoE layer.
        backend: the expert-parallel backend (:class:`~elasticep.engine.ep.LocalEP` or the
            kernel's); ``backend.local_slots(placement)`` names the physical slots this process
            computes, and only their experts are read from disk.
        alive: ``[num_ranks]`` bool, the ranks whose slots may receive tokens; all when None.
        rank: this process's EP rank (also spreads decode tokens over replicas).
        epoch: the view epoch the backend starts in.

    Thread-safety: :meth:`step`, :meth:`set_placement` and :meth:`load_slot` take one lock, so a
    placement swap happens between steps, never inside one.
    """

    def __init__(
        self,
        path: str | Path,
        placement: Placement,
        backend: Any,
        *,
        alive: Any | None = None,
        rank: int = 0,
        epoch: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import DeepseekV3ForCausalLM
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE, DeepseekV3RotaryEmbedding

        self.path = Path(path)
        self.checkpoint = ExpertCheckpoint(self.path)
        self.config = self.checkpoint.config
        self.backend = backend
        self.rank = int(rank)
        self.dtype = dtype
        self.moe_layers = moe_layer_ids(self.config)
        self._lock = threading.RLock()
        self._check_fits(placement)

        with torch.device("meta"):
            model = DeepseekV3ForCausalLM._from_config(self.config, dtype=dtype, attn_implementation="sdpa")
        for i, decoder in enumerate(self.moe_layers):
            mlp = model.model.layers[decoder].mlp
            if not isinstance(mlp, DeepseekV3MoE):
                raise PlacementMismatch(f"decoder layer {decoder} is not an MoE layer")
            mlp.experts = EPExperts(self, i)
        model.to_empty(device="cpu")
        model.model.rotary_emb = DeepseekV3RotaryEmbedding(config=self.config)
        state = self.checkpoint.replicated_state()
        result = model.load_state_dict(state, strict=False, assign=False)
        if result.unexpected_keys or result.missing_keys:
            raise PlacementMismatch(
                f"checkpoint does not fit: missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}"
            )
        model.eval()
        self.model = model

        self._placement = placement
        self._alive = self._alive_tensor(alive, placement)
        self._local = list(self.backend.local_slots(placement))
        self._slot_index = {s: i for i, s in enumerate(self._local)}
        self._weights = [self._empty_weights(len(self._local)) for _ in self.moe_layers]
        for layer in range(len(self.moe_layers)):
            for i, slot in enumerate(self._local):
                expert = int(placement.phy2log[layer, slot])
                if expert != EMPTY:
                    self._write_slot(layer, i, expert, self.checkpoint.expert(layer, expert))
        # epoch < 0: a joining rank outside every view; it routes nothing until its first
        # set_placement, whose table is strict again
        self._table = placement.dispatch_table(self._alive, strict=epoch >= 0)
        self.backend.set_view(placement, self._alive, epoch)

    # -------------------------------------------------------------- placement and weights

    @property
    def placement(self) -> Placement:
        return self._placement

    @property
    def alive(self) -> torch.Tensor:
        """``[num_ranks]`` bool: ranks whose slots receive tokens under the current view."""
        return self._alive.clone()

    @property
    def local_slots(self) -> list[int]:
        """Physical slot ids this process holds weights for, in buffer order."""
        return list(self._local)

    def slot_expert(self, layer: int, slot: int) -> int:
        """Logical expert whose weights local ``slot`` of MoE ``layer`` holds now (-1 empty)."""
        return int(self._weights[layer].expert[self._slot_index[slot]])

    def slot_tensors(self, layer: int, slot: int) -> dict[str, torch.Tensor]:
        """Views of local ``slot``'s weights, ``{"w13": [2I, H], "w2": [H, I]}``: the source a peer
        copies from when this slot is a live replica of an expert it needs."""
        i = self._slot_index[slot]
        w = self._weights[layer]
        return {"w13": w.w13[i], "w2": w.w2[i]}

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every routed-expert buffer by name (``"L{layer}.w13"``, ``"L{layer}.w2"``), for a
        transfer engine to register; shapes ``[n_local, 2I, H]`` and ``[n_local, H, I]``."""
        out = {}
        for layer, w in enumerate(self._weights):
            out[f"L{layer}.w13"] = w.w13
            out[f"L{layer}.w2"] = w.w2
        return out

    def load_slot(self, layer: int, slot: int, expert: int, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Stage ``expert``'s weights for local physical ``slot`` of MoE ``layer``.

        ``tensors`` is ``{"w13": [2I, H], "w2": [H, I]}`` (from a live replica or a host copy);
        None reads them from the checkpoint on disk. Staged weights are invisible to serving
        until :meth:`set_placement` names ``expert`` for that slot: the reconfiguration pipeline
        stages every move, then commits once at a step boundary.
        """
        if slot not in self._slot_index:
            raise PlacementMismatch(f"slot {slot} is not local to this process (local: {self._local[:4]}...)")
        if not 0 <= expert < self.config.n_routed_experts:
            raise PlacementMismatch(f"expert {expert} out of range")
        if tensors is None:
            tensors = self.checkpoint.expert(layer, expert)
        w13 = tensors["w13"].to(self.dtype)
        w2 = tensors["w2"].to(self.dtype)
        ref = self._weights[layer]
        if w13.shape != ref.w13.shape[1:] or w2.shape != ref.w2.shape[1:]:
            raise PlacementMismatch(
                f"expert tensors have shapes {tuple(w13.shape)}, {tuple(w2.shape)}; "
                f"slots hold {tuple(ref.w13.shape[1:])}, {tuple(ref.w2.shape[1:])}"
            )
        with self._lock:
            ref.staged[self._slot_index[slot]] = (int(expert), w13.clone(), w2.clone())

    def set_placement(self, placement: Placement, alive: Any | None = None, *, epoch: int | None = None) -> None:
        """Switch atomically to ``placement`` (and the ``alive`` mask, and view ``epoch`` for
        backends that stamp it) between two steps.

        Every local slot must end up holding the expert ``placement`` names: either it already
        does, or weights for it were staged with :meth:`load_slot`. Otherwise
        :class:`SlotNotLoaded` is raised and nothing changes. Slots that become empty drop their
        expert. The dispatch table is rebuilt over live replicas; an expert without one raises
        :class:`~elasticep.eplb.placement.RedundancyExhausted`, also before anything changes.
        """
        self._check_fits(placement)
        alive_t = self._alive_tensor(alive, placement)
        with self._lock:
            local = list(self.backend.local_slots(placement))
            if local != self._local:
                raise PlacementMismatch(
                    "the new placement changes which slots this process holds; start a new rank instead"
                )
            table = placement.dispatch_table(alive_t)  # raises RedundancyExhausted first
            missing = []
            for layer, w in enumerate(self._weights):
                for i, slot in enumerate(local):
                    want = int(placement.phy2log[layer, slot])
                    have = int(w.expert[i])
                    staged = w.staged.get(i)
                    if want == EMPTY or want == have or (staged is not None and staged[0] == want):
                        continue
                    missing.append((layer, slot, want))
            if missing:
                raise SlotNotLoaded(missing)
            for layer, w in enumerate(self._weights):
                for i, slot in enumerate(local):
                    want = int(placement.phy2log[layer, slot])
                    staged = w.staged.get(i)
                    if want == EMPTY:
                        w.expert[i] = EMPTY
                        w.w13[i].zero_()
                        w.w2[i].zero_()
                    elif staged is not None and staged[0] == want and want != int(w.expert[i]):
                        self._write_slot(layer, i, want, {"w13": staged[1], "w2": staged[2]})
                w.staged.clear()
            self._placement = placement
            self._alive = alive_t
            self._table = table
            self.backend.set_view(placement, alive_t, epoch)

    def _check_fits(self, placement: Placement) -> None:
        if placement.num_layers != len(self.moe_layers):
            raise PlacementMismatch(
                f"placement has {placement.num_layers} layers; the model has {len(self.moe_layers)} MoE layers"
            )
        if placement.num_experts != self.config.n_routed_experts:
            raise PlacementMismatch(
                f"placement has {placement.num_experts} experts; the model has {self.config.n_routed_experts}"
            )

    @staticmethod
    def _alive_tensor(alive: Any | None, placement: Placement) -> torch.Tensor:
        if alive is None:
            return torch.ones(placement.num_ranks, dtype=torch.bool)
        t = torch.as_tensor(alive).to(torch.bool).reshape(-1).clone()
        if t.numel() != placement.num_ranks:
            raise PlacementMismatch(f"alive has {t.numel()} entries; the placement has {placement.num_ranks} ranks")
        return t

    def _empty_weights(self, n: int) -> _SlotWeights:
        h, i = self.config.hidden_size, self.config.moe_intermediate_size
        return _SlotWeights(
            w13=torch.zeros(n, 2 * i, h, dtype=self.dtype),
            w2=torch.zeros(n, h, i, dtype=self.dtype),
            expert=torch.full((n,), EMPTY, dtype=torch.int64),
        )

    def _write_slot(self, layer: int, i: int, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        w = self._weights[layer]
        w.w13[i].copy_(tensors["w13"])
        w.w2[i].copy_(tensors["w2"])
        w.expert[i] = expert

    # -------------------------------------------------------------- forward

    def _moe_forward(self, layer: int, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """One MoE layer's routed experts for ``x`` ``[T, H]``; called from transformers' MoE block."""
        log2phy, count = self._table
        topk_idx = topk_idx.to(torch.int64)
        key = self._route_key
        if key is None or key.numel() != topk_idx.shape[0]:
            key = torch.arange(topk_idx.shape[0], dtype=torch.int64)
        # replica choice: deterministic per token, spread over the live replicas
        which = key.unsqueeze(1) % count[layer][topk_idx]
        slots = log2phy[layer][topk_idx, which]
        return self.expert_parallel(layer, x, slots, topk_weights)

    def expert_parallel(self, layer: int, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Dispatch ``x`` ``[T, H]`` to physical ``slots`` ``[T, k]`` int64, run the local slots'
        experts on what arrives, combine with ``weights`` ``[T, k]``; returns ``[T, H]``.

        A rank with no tokens of its own still calls this (``T == 0``) so that a collective
        backend sees every rank at every layer.
        """
        handle = self.backend.dispatch(x, slots, layer=layer)
        w = self._weights[layer]
        outs = []
        for i, recv in enumerate(handle.recv_x):
            if recv.shape[0] == 0:
                outs.append(recv)
                continue
            if int(w.expert[i]) == EMPTY:
                # the dispatch table never routes to an empty slot; a backend that does is broken
                raise PlacementMismatch(f"tokens arrived for empty slot {self._local[i]} of moe layer {layer}")
            gate, up = nn.functional.linear(recv, w.w13[i]).chunk(2, dim=-1)
            outs.append(nn.functional.linear(nn.functional.silu(gate) * up, w.w2[i]))
        return self.backend.combine(outs, slots, weights, handle, layer=layer)

    _route_key: torch.Tensor | None = None

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: Any = None) -> torch.Tensor:
        """Logits ``[B, S, vocab]`` for ``input_ids`` ``[B, S]`` int64, appending to ``cache``."""
        with self._lock:
            past = cache.get_seq_length() if cache is not None else 0
            b, s = input_ids.shape
            positions = torch.arange(past, past + s, dtype=torch.int64)
            self._route_key = (positions.unsqueeze(0).expand(b, s).reshape(-1) + self.rank).contiguous()
            try:
                out = self.model(input_ids=input_ids, cache=cache, use_cache=cache is not None)
            finally:
                self._route_key = None
            return out.logits

    @torch.no_grad()
    def idle_step(self) -> None:
        """Take part in one step with no tokens of this rank's own: every MoE layer is dispatched
        and combined with ``T == 0``, so peers' tokens routed to local slots are still served."""
        h = self.config.hidden_size
        k = self.config.num_experts_per_tok
        with self._lock:
            for layer in range(len(self.moe_layers)):
                self.expert_parallel(
                    layer,
                    torch.zeros(0, h, dtype=self.dtype),
                    torch.zeros(0, k, dtype=torch.int64),
                    torch.zeros(0, k, dtype=torch.float32),
                )

    def new_sequence(self, prompt: Sequence[int], max_new_tokens: int) -> DecodeState:
        """A fresh decoding state for ``prompt`` (token ids, each < vocab_size)."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("empty prompt")
        if min(prompt) < 0 or max(prompt) >= self.config.vocab_size:
            raise ValueError(f"prompt token out of range [0, {self.config.vocab_size})")
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if len(prompt) + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt + max_new_tokens = {len(prompt) + max_new_tokens} exceeds "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        return DecodeState(prompt=prompt, max_new_tokens=int(max_new_tokens))

    def step(self, seq: DecodeState) -> int:
        """One greedy decoding step of ``seq``: prefill on the first call, then one token at a time.

        Returns the new token. If the forward raises (a peer failed inside the EP backend), the
        KV cache is cropped back to its length before the step and the exception propagates; the
        caller replays the same step after reconfiguration and gets the same token.
        """
        from transformers import DynamicCache

        if seq.done:
            raise ValueError("sequence already finished")
        if seq.cache is None:
            seq.cache = DynamicCache(config=self.config)
        before = seq.cache.get_seq_length()
        if before == 0:
            ids = seq.prompt + seq.generated
        else:
            ids = (seq.prompt + seq.generated)[before:]
        try:
            logits = self.forward(torch.tensor([ids], dtype=torch.int64), seq.cache)
            # a backend that lost a peer mid-step returned incomplete sums: do not keep them
            self.backend.check_step()
        except BaseException:
            _rollback(seq, before)
            raise
        token = int(torch.argmax(logits[0, -1]).item())
        seq.generated.append(token)
        eos = self.config.eos_token_id
        if eos is not None and token in (eos if isinstance(eos, list) else [eos]):
            seq.max_new_tokens = len(seq.generated)
        return token

    def generate(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of ``prompt``: ``max_new_tokens`` token ids (fewer if EOS)."""
        seq = self.new_sequence(prompt, max_new_tokens)
        while not seq.done:
            self.step(seq)
        return list(seq.generated)

    def __repr__(self) -> str:
        return (
            f"RankModel(rank={self.rank}, moe_layers={len(self.moe_layers)}, local_slots={len(self._local)}, "
            f"experts={self.config.n_routed_experts}, backend={type(self.backend).__name__})"
        )


def _rollback(seq: DecodeState, length: int) -> None:
    """Cut every layer of ``seq``'s KV cache back to ``length`` tokens after a failed step.

    A step that failed inside layer L has appended to the caches of layers 0..L only, so each
    layer is cut on its own; a failed prefill drops the cache."""
    if length == 0:
        seq.cache = None
        return
    for layer in seq.cache.layers:
        extra = layer.get_seq_length() - length
        if extra > 0:
            layer.crop(-extra)


def describe(path: str | Path) -> dict[str, Any]:
    """The shape of the model at ``path`` as a small dict (for logs and the demo's banner)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    keys = ("num_hidden_layers", "first_k_dense_replace", "hidden_size", "n_routed_experts",
            "num_experts_per_tok", "n_shared_experts", "vocab_size")
    return {k: cfg.get(k) for k in keys}
