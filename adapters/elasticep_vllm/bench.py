"""Benchmark: SIGKILL one of two engine cores of a real vLLM server (DP 2 + EP, CPU), with
elasticep's recovery and without it, in the same run.

``python -m elasticep_vllm.bench [--runs N] [--requests 4] [--tokens 32] [--json]``

Each run starts a server (:mod:`elasticep_vllm.kill`), measures tokens/s, kills engine core
DP 1 mid-stream, retries cut requests (with elasticep) and measures tokens/s again. The outputs
are checked against transformers' greedy output on the same weights. Figures (``--json`` keys):

- ``kill_to_serving_p50_ms`` / ``kill_to_serving_p99_ms``: from the kill seen by the front end to
  the survivor serving again (elasticep's recovery record), over the runs;
- ``requests_lost``: requests that never completed, retries included (with elasticep);
- ``outputs_wrong``: completed requests whose tokens differ from transformers';
- ``throughput_before`` / ``throughput_after``: tokens/s, mean over the runs (after: one engine
  core serving all 8 experts);
- ``rejoin_failed``, ``rejoin_ready_p50_s``, ``rejoin_admitted_p99_ms``: after each kill the
  killed rank is brought back (:mod:`elasticep_vllm.rejoin`): rejoins that failed, the new
  engine core's start-up, and from its readiness to the admitting view's committed placement;
  the prompts served again after it count in ``outputs_wrong`` too;
- ``baseline_recovered``: whether vLLM alone answered any request after the kill;
- ``baseline_requests_lost``, ``baseline_after_kill``: what vLLM alone did.

Runs in the environment that has vLLM (``.venv-vllm``); each server start takes 45 s or more on
2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "run"]


def _kill_run(model: Path, requests: int, tokens: int, elasticep: bool, timeout_s: float) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    cmd = [sys.executable, "-m", "elasticep_vllm.kill", "--model", str(model), "--requests", str(requests),
           "--tokens", str(tokens), "--kill-after", "3", "--timeout", "30", "--after-timeout", "15"]
    if elasticep:
        cmd += ["--elasticep", "--retries", "3", "--measure", "--rejoin", "--rejoin-timeout", "240"]
    else:
        env["VLLM_PLUGINS"] = "elasticep_cpu_collectives"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"kill run printed no result (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[0][len("RESULT "):])


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(round(q * (len(v) - 1))))], 1)


def run(runs: int = 1, requests: int = 4, tokens: int = 32, timeout_s: float = 560.0) -> dict[str, Any]:
    from elasticep_vllm.checkpoint import make_tiny_qwen3_moe, reference_greedy

    with tempfile.TemporaryDirectory(prefix="elasticep-bench-vllm-") as d:
        model = make_tiny_qwen3_moe(Path(d) / "m")
        prompts = [[1 + i, 2 + 3 * i, 3 + 5 * i] for i in range(requests)]
        ref = reference_greedy(model, prompts, tokens)
        serving, before, after = [], [], []
        lost = wrong = rejoin_failed = 0
        ready: list[float] = []
        admitted: list[float] = []
        for _ in range(runs):
            r = _kill_run(model, requests, tokens, True, timeout_s)
            serving += [rec["serving_ms"] for rec in r.get("recoveries", [])]
            for q, want in zip(r["requests"], ref):
                if q["outcome"] != "completed":
                    lost += 1
                elif q["tokens"] != want:
                    wrong += 1
            rj = r.get("rejoin", {})
            if "error" in rj or "record" not in rj:
                rejoin_failed += 1
            else:
                ready.append(rj["record"]["ready_s"])
                admitted.append(rj["record"]["admitted_ms"])
                wrong += sum(1 for got, want in zip(rj.get("tokens", []), ref) if got != want)
            before += [r["throughput_before"]] if "throughput_before" in r else []
            after += [r["throughput_after"]] if "throughput_after" in r else []
        base = _kill_run(model, requests, tokens, False, timeout_s)
    return {
        "runs": runs,
        "requests": requests * runs,
        "kill_to_serving_p50_ms": _pct(serving, 0.5),
        "kill_to_serving_p99_ms": _pct(serving, 0.99),
        "requests_lost": lost,
        "outputs_wrong": wrong,
        "throughput_before": round(sum(before) / len(before), 1) if before else None,
        "throughput_after": round(sum(after) / len(after), 1) if after else None,
        "rejoin_failed": rejoin_failed,
        "rejoin_ready_p50_s": _pct(ready, 0.5),
        "rejoin_admitted_p99_ms": _pct(admitted, 0.99),
        "baseline_recovered": base["after_kill"]["outcome"] == "completed",
        "baseline_requests_lost": sum(1 for q in base["requests"] if q["outcome"] != "completed"),
        "baseline_after_kill": base["after_kill"].get("error", base["after_kill"]["outcome"])[:80],
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m elasticep_vllm.bench", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1, help="servers started and killed with elasticep")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--json", action="store_true")
    ns = p.parse_args(argv)
    out = run(ns.runs, ns.requests, ns.tokens)
    if ns.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
