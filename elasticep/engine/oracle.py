"""The reference every engine output must equal: transformers' own DeepSeek-V3 on the same weights.

:class:`Oracle` loads ``DeepseekV3ForCausalLM.from_pretrained`` from the directory
:func:`~elasticep.engine.model.make_tiny_model` wrote (transformers converts the per-expert
tensors into its fused expert layout itself) and decodes greedily with ``generate(do_sample=False)``.
Nothing here shares code with :class:`~elasticep.engine.model.RankModel`'s expert path, so an
error in routing, placement, dispatch or combine shows up as a mismatch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

__all__ = ["Oracle"]


class Oracle:
    """Greedy reference decoding with ``transformers.DeepseekV3ForCausalLM``.

    Results are memoised per ``(prompt, max_new_tokens)``: the demo and the tests check many
    outputs of the same prompts.
    """

    def __init__(self, path: str | Path):
        from transformers import DeepseekV3ForCausalLM

        self.path = Path(path)
        self.model = DeepseekV3ForCausalLM.from_pretrained(str(self.path), dtype=torch.float32)
        self.model.eval()
        self.config = self.model.config
        self._memo: dict[tuple[tuple[int, ...], int], list[int]] = {}

    @torch.no_grad()
    def generate(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """The ``max_new_tokens`` greedy token ids after ``prompt`` (fewer if the model has an EOS
        and emits it)."""
        key = (tuple(int(t) for t in prompt), int(max_new_tokens))
        if key in self._memo:
            return list(self._memo[key])
        if max_new_tokens == 0:
            return []
        ids = torch.tensor([key[0]], dtype=torch.int64)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.config.pad_token_id if self.config.pad_token_id is not None else 0,
        )
        tokens = out[0, ids.shape[1] :].tolist()
        self._memo[key] = tokens
        return list(tokens)

    @torch.no_grad()
    def generate_many(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, batch: int = 64) -> list[list[int]]:
        """:meth:`generate` for many prompts at once: prompts of one length go through
        transformers' ``generate`` together (no padding, so each row is the same computation as
        alone), which is many times faster than one call per prompt. Memoised like :meth:`generate`."""
        keys = [(tuple(int(t) for t in p), int(max_new_tokens)) for p in prompts]
        todo: dict[int, list[tuple[int, ...]]] = {}
        for key in dict.fromkeys(keys):
            if key not in self._memo and max_new_tokens > 0:
                todo.setdefault(len(key[0]), []).append(key[0])
        for rows in todo.values():
            for i in range(0, len(rows), batch):
                chunk = rows[i : i + batch]
                ids = torch.tensor(chunk, dtype=torch.int64)
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.config.pad_token_id if self.config.pad_token_id is not None else 0,
                )
                for row, prompt in zip(out[:, ids.shape[1] :].tolist(), chunk):
                    self._memo[(prompt, int(max_new_tokens))] = row
        return [list(self._memo[k]) if max_new_tokens > 0 else [] for k in keys]

    @torch.no_grad()
    def logits(self, input_ids: Sequence[int]) -> torch.Tensor:
        """Logits ``[S, vocab]`` float32 of one full forward over ``input_ids`` (no cache)."""
        ids = torch.tensor([list(input_ids)], dtype=torch.int64)
        return self.model(input_ids=ids).logits[0]
