"""Kill one engine core of a running vLLM ``AsyncLLM`` mid-stream and record what happens.

``python -m elasticep_vllm.kill --model DIR --requests 6 --tokens 48 --kill-after 4``

starts the front end here and data parallel 2 with expert parallelism (one engine-core process
per DP rank), warms both engine cores up, then streams ``--requests`` greedy requests at once.
When every request has streamed ``--kill-after`` tokens, engine core DP rank ``--victim`` gets
SIGKILL (with ``--idle S``: before any request is sent, and the requests follow S seconds
later). Every request's outcome is recorded (``completed``; ``cut``: the stream ended without an
error but short of its tokens; ``error``; ``no answer``), with its tokens, its finish reason or
error, and how long after the kill it ended; then one more request is sent after the kill with a bound of
``--after-timeout`` s (answered, failed, or no answer: a hang). One line ``RESULT <json>`` goes
to stdout. Must run in the environment that has vLLM (``.venv-vllm``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from typing import Any, Sequence

from elasticep_vllm.serve import cpu_env, engine_args, generate_one, start_engine

__all__ = ["engine_core_pids", "main"]


def engine_core_pids(engine: Any) -> dict[int, int]:
    """``{dp_rank: pid}`` of the engine-core processes an ``AsyncLLM`` started (local ones)."""
    manager = engine.engine_core.resources.engine_manager
    out: dict[int, int] = {}
    for proc in manager.processes:
        # vLLM names them EngineCore_DP<rank>
        name = proc.name
        rank = int(name.rsplit("DP", 1)[1]) if "DP" in name else 0
        out[rank] = proc.pid
    return out


async def _stream(engine: Any, rid: str, prompt: Sequence[int], tokens: int, seen: dict[str, int],
                  record: dict[str, Any], killed: dict[str, float], retries: int, bound_s: float) -> None:
    """One request; with ``retries``, a request cut after the kill is sent again (a new id),
    from its prompt, until it completes or the retries or ``bound_s`` run out."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, detokenize=False)
    attempt = 0
    record["attempts"] = []
    start = time.monotonic()
    while True:
        outcome: dict[str, Any] = {}
        got: list[int] = []
        try:
            async for out in engine.generate({"prompt_token_ids": list(prompt)}, sp, f"{rid}-{attempt}"):
                got = list(out.outputs[0].token_ids)
                seen[rid] = len(got)
                outcome["finish_reason"] = out.outputs[0].finish_reason
                if "at" in killed and "first_token_after_kill_ms" not in outcome and attempt > 0:
                    outcome["first_token_after_kill_ms"] = round((time.monotonic() - killed["at"]) * 1000, 1)
            # a stream that ends without an error but short of max_tokens was cut (an abort)
            outcome["outcome"] = "completed" if len(got) == tokens else "cut"
        except Exception as exc:  # the outcome is what is measured
            outcome["outcome"] = "error"
            outcome["error"] = f"{type(exc).__name__}: {exc}"[:300]
        outcome["tokens"] = got
        if "at" in killed:
            outcome["ended_after_kill_ms"] = round((time.monotonic() - killed["at"]) * 1000, 1)
        record["attempts"].append(outcome)
        record.update(outcome)
        if outcome["outcome"] == "completed" or attempt >= retries or time.monotonic() - start > bound_s:
            return
        attempt += 1
        await asyncio.sleep(0.05 * attempt)


async def _run(ns: argparse.Namespace) -> dict[str, Any]:
    prompts = [[1 + i, 2 + 3 * i, 3 + 5 * i] for i in range(ns.requests)]
    t0 = time.monotonic()
    engine = start_engine(engine_args(ns.model, 2, True, elasticep=ns.elasticep))
    result: dict[str, Any] = {"start_s": round(time.monotonic() - t0, 1), "plugins": os.environ.get("VLLM_PLUGINS")}
    try:
        pids = engine_core_pids(engine)
        # before the kill: the killed engine core's worker is re-parented to init after it
        family = _descendants(os.getpid())
        result["engine_cores"] = {str(k): v for k, v in pids.items()}
        # warm up both engine cores (prompts spread over the DP ranks)
        await asyncio.gather(*(generate_one(engine, p, 2) for p in prompts[:2]))
        if ns.measure:
            result["throughput_before"] = await _throughput(engine, prompts, ns.tokens)
        seen: dict[str, int] = {}
        killed: dict[str, float] = {}
        records = [{"prompt": p} for p in prompts]
        if ns.idle is not None:
            # the kill lands between requests: nothing is in flight, then the requests come
            os.kill(pids[ns.victim], signal.SIGKILL)
            killed["at"] = time.monotonic()
            result["tokens_at_kill"] = {}
            await asyncio.sleep(ns.idle)
        tasks = [asyncio.create_task(_stream(engine, f"r{i}", p, ns.tokens, seen, records[i], killed,
                                             ns.retries, ns.timeout))
                 for i, p in enumerate(prompts)]
        if ns.idle is None:
            deadline = time.monotonic() + ns.timeout
            while (len(seen) < len(prompts) or min(seen.values()) < ns.kill_after) and time.monotonic() < deadline:
                if all(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.005)
            result["tokens_at_kill"] = dict(seen)
            os.kill(pids[ns.victim], signal.SIGKILL)
            killed["at"] = time.monotonic()
        done, pending = await asyncio.wait(tasks, timeout=ns.timeout)
        for t in pending:
            t.cancel()
        for i, t in enumerate(tasks):
            if t in pending:
                records[i]["outcome"] = "no answer"
        result["requests"] = records
        after: dict[str, Any] = {}
        t1 = time.monotonic()
        try:
            after["tokens"] = await asyncio.wait_for(generate_one(engine, prompts[0], 4), ns.after_timeout)
            after["outcome"] = "completed"
        except asyncio.TimeoutError:
            after["outcome"] = "no answer"
        except Exception as exc:
            after["outcome"] = "error"
            after["error"] = f"{type(exc).__name__}: {exc}"[:300]
        after["ms"] = round((time.monotonic() - t1) * 1000, 1)
        result["after_kill"] = after
        if ns.measure and after["outcome"] == "completed":
            result["throughput_after"] = await _throughput(engine, prompts, ns.tokens)
        if ns.rejoin:
            result["rejoin"] = await _rejoin(engine, ns, prompts)
        result["engine_cores_alive"] = {str(r): _alive(pid) for r, pid in pids.items()}
        result["recoveries"] = [
            {k: v for k, v in rec.items() if k != "result"}
            for rec in getattr(engine.engine_core, "_elasticep_recoveries", [])
        ]
    finally:
        family = sorted(set(locals().get("family", [])) | set(_descendants(os.getpid())))
        try:
            engine.shutdown()
        except Exception as exc:
            result["shutdown_error"] = f"{type(exc).__name__}: {exc}"[:200]
        # vLLM's shutdown after a dead engine core leaves the survivor and its worker running, and
        # the killed engine core's worker outlives it
        time.sleep(1.0)
        left = [pid for pid in family if _alive(pid)]
        result["left_running_after_shutdown"] = len(left)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return result


async def _rejoin(engine: Any, ns: argparse.Namespace, prompts: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Bring the killed rank back (:func:`~elasticep_vllm.rejoin.rejoin`), then serve every prompt
    again with both ranks: the record, and each prompt's tokens and which engine core served it."""
    from elasticep_vllm.rejoin import rejoin

    out: dict[str, Any] = {}
    try:
        out["record"] = await asyncio.wait_for(rejoin(engine, ns.victim), ns.rejoin_timeout)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:400]
        import faulthandler

        faulthandler.dump_traceback(all_threads=True)  # where the front end waited, on stderr
        return out
    client = engine.engine_core
    out["routing_before"] = {"lb_engines": [list(c) for c in getattr(client, "lb_engines", [])],
                             "inflight": {str(client.core_engines.index(e)): n
                                          for e, n in getattr(client, "engine_inflight", {}).items()}}
    served: dict[str, int] = {}
    original_pick = client.get_core_engine_for_request

    def pick(request):
        chosen = original_pick(request)
        served[request.request_id] = client.core_engines.index(chosen)
        return chosen

    client.get_core_engine_for_request = pick
    try:
        outs = await asyncio.wait_for(
            asyncio.gather(*(generate_one(engine, p, ns.tokens, f"j{i}") for i, p in enumerate(prompts))),
            ns.timeout)
        out["tokens"] = [list(o) for o in outs]
    except Exception as exc:
        out["error"] = f"after the rejoin: {type(exc).__name__}: {exc}"[:400]
    finally:
        del client.get_core_engine_for_request
    out["served_by"] = sorted(served.values())
    return out


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (from /proc), children first found first."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out: list[int] = []
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == pid]
        out.extend(kids)
        frontier.extend(kids)
    return out


async def _throughput(engine: Any, prompts: Sequence[Sequence[int]], tokens: int) -> float:
    """Generated tokens per second, all ``prompts`` at once."""
    t0 = time.monotonic()
    outs = await asyncio.gather(*(generate_one(engine, p, tokens) for p in prompts))
    return round(sum(len(o) for o in outs) / (time.monotonic() - t0), 1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m elasticep_vllm.kill", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--kill-after", type=int, default=4, help="kill when every request streamed this many tokens")
    p.add_argument("--victim", type=int, default=1, help="DP rank whose engine core is killed")
    p.add_argument("--timeout", type=float, default=60.0, help="bound on each wait, s")
    p.add_argument("--after-timeout", type=float, default=20.0, help="bound on the request sent after the kill, s")
    p.add_argument("--elasticep", action="store_true",
                   help="vLLM fault tolerance on and elasticep's worker extension (the recovery needs both)")
    p.add_argument("--retries", type=int, default=0, help="send a request cut by the kill again, up to this often")
    p.add_argument("--measure", action="store_true", help="tokens/s of all the prompts before the kill and after")
    p.add_argument("--idle", type=float, default=None, metavar="S",
                   help="kill while no request is in flight, then send the requests S seconds later")
    p.add_argument("--rejoin", action="store_true",
                   help="after the kill, bring the killed rank back and serve the prompts again (with --elasticep)")
    p.add_argument("--rejoin-timeout", type=float, default=300.0, help="bound on the rejoin, s")
    ns = p.parse_args(argv)
    for k, v in cpu_env().items():
        os.environ.setdefault(k, v)
    result = asyncio.run(_run(ns))
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # engine-core children of a half-dead engine must not hold the interpreter's exit


if __name__ == "__main__":
    sys.exit(main())
