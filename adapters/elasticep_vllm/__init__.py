"""elasticep inside vLLM: the tiny Qwen3-MoE checkpoint vLLM's CPU backend serves and
transformers' greedy reference on it (:mod:`~elasticep_vllm.checkpoint`); the vLLM plugin
(:mod:`~elasticep_vllm.plugin`) whose CPU collectives (:mod:`~elasticep_vllm.collectives`) and
expert-map translation (:mod:`~elasticep_vllm.cpu_moe`) let data parallel with expert
parallelism run on CPU; the supported releases (:mod:`~elasticep_vllm.compat`). Importing this
package does not import vLLM.
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
