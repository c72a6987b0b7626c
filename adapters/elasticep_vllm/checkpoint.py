"""A tiny Qwen3-MoE checkpoint that vLLM loads from a local folder, and its reference outputs.

vLLM's CPU attention refuses head sizes under 64 and its CPU MoE path serves Qwen3-MoE's plain
top-k softmax routing, so the tiny model is a Qwen3-MoE (``Qwen3MoeConfig``: GQA attention with
q/k norms, every layer sparse, ``norm_topk_prob``) rather than the reference engine's DeepSeek-V3
(MLA, which vLLM's CPU backend does not serve). The weights are seeded and written by
transformers' ``save_pretrained``; no tokenizer is written: vLLM is started with
``skip_tokenizer_init=True`` and prompts are token ids.

:func:`reference_greedy` is the oracle: transformers' own ``Qwen3MoeForCausalLM`` forward on the
same files, greedy, in float32 (the dtype in which vLLM's CPU path and transformers agree token
for token on this model; see ``docs/vllm.md``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["TINY_QWEN3_MOE", "make_tiny_qwen3_moe", "reference_greedy"]

#: The tiny model's shape: two sparse layers of 8 experts, top-2, head_dim 64 (vLLM's CPU floor).
TINY_QWEN3_MOE: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    num_experts=8,
    num_experts_per_tok=2,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
    max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=0,
    # no EOS: every request generates exactly max_tokens
    eos_token_id=None,
    pad_token_id=None,
)


def _init_std(name: str, shape: torch.Size) -> tuple[float, float]:
    """(mean, std): unit-variance activations, and an LM head wide enough that greedy choices
    are not near-ties between two implementations' float rounding."""
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if name.endswith("embed_tokens.weight"):
        return 0.0, 1.0
    std = 1.0 / math.sqrt(shape[-1])
    if name == "lm_head.weight":
        std *= 4.0
    if name.endswith("mlp.gate.weight"):
        std *= 4.0  # router logits far apart: the top-k choice is not a near-tie either
    return 0.0, std


def make_tiny_qwen3_moe(path: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny ``Qwen3MoeForCausalLM`` with seeded random weights to ``path``; return it.

    ``config.json`` + ``model.safetensors`` through ``save_pretrained`` (the layout both
    transformers and vLLM read), plus a ``generation_config.json`` without sampling defaults.
    ``overrides`` are ``Qwen3MoeConfig`` fields. Same seed and overrides, same weights.
    """
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    path = Path(path)
    values = dict(TINY_QWEN3_MOE)
    values.update(overrides)
    config = Qwen3MoeConfig(**values)
    gen = torch.Generator().manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        state = model.state_dict()
        for name in sorted(state):  # sorted: the random stream does not depend on module order
            t = state[name]
            if not t.is_floating_point():
                continue
            mean, std = _init_std(name, t.shape)
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * std + mean)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"_from_model_config": True}))
    return path


def reference_greedy(
    path: str | Path, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> list[list[int]]:
    """transformers' greedy continuation (``max_new_tokens`` token ids) of each prompt, float32.

    Each prompt runs alone (no padding), so the result is the model's, not a batching artefact.
    """
    from transformers import Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    out: list[list[int]] = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([list(prompt)], dtype=torch.long)
            gen = model.generate(
                ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=0,
            )
            out.append(gen[0, len(prompt):].tolist())
    return out
