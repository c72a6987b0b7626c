"""Serve the tiny checkpoint with vLLM's ``AsyncLLM`` (one engine-core process per DP rank).

``python -m elasticep_vllm.serve --model DIR --dp 2 --ep --prompts '[[1,2,3]]' --tokens 8``
prints one line ``TOKENS <json>``: the greedy token ids of every prompt, in order. It runs the
front end in this process and the engine cores as vLLM starts them (processes of their own,
talking to the front end over ZeroMQ). Used by the tests and the benchmark; must run in the
environment that has vLLM (``.venv-vllm``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from typing import Any, Sequence

__all__ = ["cpu_env", "engine_args", "generate_all", "main", "set_up_agents", "start_engine"]


def cpu_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment vLLM's CPU backend needs on a small shared machine: 1 GiB of KV cache
    per engine core, no OpenMP thread pinning (several engine cores share few cores)."""
    out = dict(os.environ if env is None else env)
    out.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    out.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    out.setdefault("OMP_NUM_THREADS", "1")
    return out


def engine_args(model: str, dp: int = 1, ep: bool = False, elasticep: bool = False, **extra: Any):
    """``AsyncEngineArgs`` for the tiny model: float32 (where vLLM equals transformers), eager,
    token-id prompts, a short context. ``elasticep``: elasticep's worker extension, and (through
    :func:`start_engine`) the recovery of :mod:`elasticep_vllm.recovery` switched on."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    values: dict[str, Any] = dict(
        model=model, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
        data_parallel_size=dp, enable_expert_parallel=ep, max_model_len=256, max_num_seqs=8,
        max_num_batched_tokens=256,
    )
    if elasticep:
        values.update(worker_extension_cls="elasticep_vllm.worker.ElasticEPWorker")
    values.update(extra)
    args = AsyncEngineArgs(**values)
    args._elasticep_fault_tolerance = elasticep
    return args


_store_server: Any = None


def start_engine(args: Any):
    """``AsyncLLM`` from ``args``. Where :func:`engine_args` asked for elasticep, sets
    :data:`~elasticep_vllm.recovery.ENV_RECOVER` and
    :data:`~elasticep_vllm.core_agent.ENV_AGENT` for this process and the engine cores it starts,
    hosts the agents' ``TCPStore`` in this process (unless
    :data:`~elasticep_vllm.core_agent.ENV_STORE` names one) and generates the cluster's bus keys
    (unless ``ELASTICEP_BUS_KEYS`` holds them). vLLM's own ``enable_fault_tolerance`` cannot be
    used on CPU: vLLM 0.32 refuses it with its internal load balancer and its workers refuse it
    without a GPU all-to-all backend."""
    from vllm.v1.engine.async_llm import AsyncLLM

    from elasticep_vllm.recovery import ENV_RECOVER

    if getattr(args, "_elasticep_fault_tolerance", False):
        os.environ[ENV_RECOVER] = "1"
        set_up_agents(int(args.data_parallel_size))
    engine = AsyncLLM.from_engine_args(args)
    if getattr(args, "_elasticep_fault_tolerance", False):
        # the device ids as given (vLLM's launcher overwrites the config's with a rank's shard);
        # a rejoining engine core is cut its own shard from these
        engine.engine_core._elasticep_device_ids = args._resolve_device_ids()
    return engine


def set_up_agents(ranks: int) -> dict[str, Any]:
    """The environment the engine cores' agents start from (they inherit it): a store and the
    bus keys of ``ranks`` DP ranks. Returns what was set up."""
    global _store_server
    import datetime

    from elasticep.bus import ClusterKeys
    from elasticep.bus.keys import KEYS_ENV
    from elasticep_vllm.core_agent import ENV_AGENT, ENV_STORE

    os.environ[ENV_AGENT] = "1"
    hosted = False
    if not os.environ.get(ENV_STORE):
        from torch.distributed import TCPStore

        _store_server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                 timeout=datetime.timedelta(seconds=30))
        os.environ[ENV_STORE] = f"127.0.0.1:{_store_server.port}"
        hosted = True
    generated = KEYS_ENV not in os.environ
    if generated:
        os.environ[KEYS_ENV] = ClusterKeys.generate(max(ranks, 1)).to_json()
    return {"store": os.environ[ENV_STORE], "store_hosted_here": hosted, "keys_generated": generated}


async def generate_one(engine: Any, prompt: Sequence[int], tokens: int, request_id: str | None = None) -> list[int]:
    """Greedy ``tokens`` token ids continuing ``prompt`` (no EOS stop)."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, detokenize=False)
    rid = request_id or uuid.uuid4().hex
    final: list[int] = []
    async for out in engine.generate({"prompt_token_ids": list(prompt)}, sp, rid):
        final = list(out.outputs[0].token_ids)
    return final


async def generate_all(engine: Any, prompts: Sequence[Sequence[int]], tokens: int) -> list[list[int]]:
    """Every prompt at once (so the DP front end spreads them over the engine cores)."""
    return list(await asyncio.gather(*(generate_one(engine, p, tokens) for p in prompts)))


async def _run(ns: argparse.Namespace) -> list[list[int]]:
    t0 = time.monotonic()
    engine = start_engine(engine_args(ns.model, ns.dp, ns.ep))
    try:
        print(f"STARTED {time.monotonic() - t0:.1f}", flush=True)
        return await generate_all(engine, json.loads(ns.prompts), ns.tokens)
    finally:
        engine.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m elasticep_vllm.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--ep", action="store_true")
    p.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    p.add_argument("--tokens", type=int, default=8)
    ns = p.parse_args(argv)
    for k, v in cpu_env().items():
        os.environ.setdefault(k, v)
    tokens = asyncio.run(_run(ns))
    print("TOKENS " + json.dumps(tokens), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
