"""Drive elasticep's vLLM hooks in a running vLLM server: rank 1 leaves, then rejoins.

``python -m elasticep_vllm.leave --model DIR --tokens 8``

starts ``AsyncLLM`` with data parallel 2, expert parallelism and the worker extension
:class:`~elasticep_vllm.worker.ElasticEPWorker`, then through vLLM's ``collective_rpc``:

1. reads the placement each worker serves (vLLM's own: experts 0-3 on rank 0, 4-7 on rank 1);
2. greedy tokens of the prompts (``before``);
3. commits epoch 1, where rank 0 serves all 8 experts (4-7 read from the checkpoint) and rank 1
   is out (``alive = (True, False)``): ``after_leave``;
4. commits epoch 2, where rank 0 keeps all 8 *and* rank 1 serves its own again: experts 4-7
   have two replicas, each computes half of their tokens: ``replicated``, which must equal;
5. commits epoch 3, a wrong one on purpose (expert 7 served nowhere): ``missing``, which must
   differ, or the check proves nothing;
6. commits epoch 4, vLLM's own placement again (rank 1 back): ``after_rejoin``.

Prints ``RESULT <json>``. Must run in the environment that has vLLM (``.venv-vllm``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any, Sequence

from elasticep_vllm.serve import cpu_env, engine_args, generate_all, start_engine

__all__ = ["main"]

PROMPTS = [[1, 2, 3, 4], [10, 20, 30], [5, 99, 7, 300, 2], [7, 7, 7]]


async def _run(ns: argparse.Namespace) -> dict[str, Any]:
    engine = start_engine(engine_args(ns.model, 2, True, worker_extension_cls="elasticep_vllm.worker.ElasticEPWorker"))
    out: dict[str, Any] = {"prompts": PROMPTS}
    try:
        first = (await engine.collective_rpc("elasticep_placement"))[0]
        out["placement"] = first["placement"]
        phy2log = first["placement"]["phy2log"]
        layers, slots = len(phy2log), len(phy2log[0])
        experts = slots // 2
        out["before"] = await generate_all(engine, PROMPTS, ns.tokens)
        everything_on_0 = [list(range(experts)) + [-1] * experts for _ in range(layers)]
        t0 = time.monotonic()
        out["leave_commit"] = (await engine.collective_rpc("elasticep_commit", args=(1, everything_on_0, [True, False])))[0]
        out["leave_commit_ms"] = round((time.monotonic() - t0) * 1000, 1)
        out["after_leave"] = await generate_all(engine, PROMPTS, ns.tokens)
        # rank 0 keeps all 8 and rank 1 serves its own 4-7 again: two replicas of each of 4-7
        both = [list(range(experts)) + list(range(experts // 2, experts)) + [-1] * (experts // 2) for _ in range(layers)]
        await engine.collective_rpc("elasticep_commit", args=(2, both, [True, True]))
        out["replicated"] = await generate_all(engine, PROMPTS, ns.tokens)
        # the last expert served by no rank: its share of every token is lost
        missing = [list(range(experts // 2)) + [-1] * (experts // 2) + list(range(experts // 2, experts - 1))
                   + [-1] * (experts // 2 + 1) for _ in range(layers)]
        await engine.collective_rpc("elasticep_commit", args=(3, missing, [True, True]))
        out["missing"] = await generate_all(engine, PROMPTS, ns.tokens)
        out["rejoin_commit"] = (await engine.collective_rpc("elasticep_commit", args=(4, phy2log, [True, True])))[0]
        out["after_rejoin"] = await generate_all(engine, PROMPTS, ns.tokens)
    finally:
        engine.shutdown()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m elasticep_vllm.leave", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", type=int, default=8)
    ns = p.parse_args(argv)
    for k, v in cpu_env().items():
        os.environ.setdefault(k, v)
    result = asyncio.run(_run(ns))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
