"""elasticep inside vLLM (work in progress): so far only the tiny Qwen3-MoE checkpoint that
vLLM's CPU backend serves and transformers' greedy reference on it
(:mod:`~elasticep_vllm.checkpoint`). Importing this package does not import vLLM.
"""

from elasticep_vllm.checkpoint import TINY_QWEN3_MOE, make_tiny_qwen3_moe, reference_greedy

__all__ = ["TINY_QWEN3_MOE", "make_tiny_qwen3_moe", "reference_greedy"]
