"""elasticep inside vLLM: the tiny Qwen3-MoE checkpoint vLLM's CPU backend serves and
transformers' greedy reference on it (:mod:`~elasticep_vllm.checkpoint`); the vLLM plugins
(:mod:`~elasticep_vllm.plugin`) whose CPU collectives (:mod:`~elasticep_vllm.collectives`) and
expert-map translation (:mod:`~elasticep_vllm.cpu_moe`) let data parallel with expert
parallelism run on CPU, and whose recovery (:mod:`~elasticep_vllm.recovery`) keeps a server
answering when an engine core dies; elasticep's engine hooks over vLLM's MoE layers
(:mod:`~elasticep_vllm.hooks`, reached through the worker extension
:mod:`~elasticep_vllm.worker`); the supported releases (:mod:`~elasticep_vllm.compat`); scripts
that serve, kill and drive a leave (:mod:`~elasticep_vllm.serve`, :mod:`~elasticep_vllm.kill`,
:mod:`~elasticep_vllm.leave`). Importing this package does not import vLLM.
"""

from elasticep_vllm.checkpoint import TINY_QWEN3_MOE, make_tiny_qwen3_moe, reference_greedy
from elasticep_vllm.compat import SUPPORTED_VLLM, UnsupportedVLLMVersion, VLLMNotInstalled, check_vllm_version

__all__ = [
    "SUPPORTED_VLLM",
    "TINY_QWEN3_MOE",
    "UnsupportedVLLMVersion",
    "VLLMNotInstalled",
    "check_vllm_version",
    "make_tiny_qwen3_moe",
    "reference_greedy",
]
