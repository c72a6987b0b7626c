"""``elasticep bench overhead``: what fault tolerance costs when nothing fails.

The reference engine's ranks (the tiny DeepSeek-V3 :class:`~elasticep.engine.model.RankModel`
over the CPU kernel, :class:`~elasticep.engine.ep.KernelEP`, in lockstep, one decoding sequence
per rank) serve steadily in two modes, in the same run, in alternating rounds (off, on, on,
off, off, on, ...: drift in the machine's load falls on both alike):

- ``on``: every rank also runs an :class:`~elasticep.Agent` with the reference engine's own
  hooks (bus with heartbeats, failure detection, membership over a ``TCPStore``, the Mooncake
  weight mover when it is installed) and calls :meth:`Agent.boundary` at every step, and holds a
  :class:`~elasticep.transfer.BackupStore` of the experts :func:`~elasticep.transfer.plan_backups`
  gives it;
- ``off``: the same ranks with none of that.

The kernel's bounded peer waits are the same in both modes (they are the kernel; there is no
unbounded variant to compare with). Each round starts fresh processes; the first ``--warmup``
steps of a round are not counted. Throughput is generated tokens over the slowest rank's wall
time; step latency is the time of one step (boundary included) on each rank.

JSON keys (``--json PATH``): ``tokens_per_s_on``, ``tokens_per_s_off``, ``step_p50_us_on``,
``step_p50_us_off``, ``step_p99_us_on``, ``step_p99_us_off``, ``throughput_ratio`` (on/off),
``p99_ratio`` (on/off), ``meets_target`` (throughput ratio >= 0.99 and p99 ratio <= 1.02),
``ranks``, ``rounds``, ``steps``, ``backup_experts`` (per rank, in the on mode),
``agent_members_on`` / ``agent_members_off`` (each rank's view members: proof of which mode ran),
``tokens_per_cpu_s_on`` / ``_off`` (tokens per CPU second of the ranks' processes, every thread:
steadier than wall time on a shared machine), ``cpu_per_token_ratio`` (on/off CPU per token),
``rounds_tokens_per_s_on`` / ``_off`` (each round's throughput: the spread shows the noise),
``serving_thread_cpu_per_step_us_on`` / ``_off`` (CPU of the serving thread alone per step),
``boundary_p50_us`` / ``boundary_p99_us`` (one :meth:`Agent.boundary` call with no view pending:
the agent's whole cost inside the step loop),
``other_threads_cpu_on`` / ``_off`` (per rank, CPU seconds per second its threads other than
the serving one used during the last round's timed steps: the agent's share of a core).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

_THROUGHPUT_TARGET = 0.99
_P99_TARGET = 1.02


def _pct(values: Sequence[float], q: float) -> float:
    v = sorted(values)
    k = min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))
    return float(v[k])


class _Shim:
    """What the reference engine's hooks read from its rank server, for a rank of this bench."""

    def __init__(self, rank: int, model: Any, ep: Any, model_path: str, config: Any):
        self.rank = rank
        self.model = model
        self.ep = ep
        self._model_config = config
        self.spec = type("Spec", (), {"model_path": model_path})()
        self._timeout_buffer = None
        self._timeout_cursor = 0


def _rank_main(rank: int, mode: str, setup: dict, conn: Any) -> None:
    """One rank of one round: build, report ready, wait for go, step, report the timings."""
    import torch

    torch.set_num_threads(1)
    from elasticep.engine.ep import KernelEP
    from elasticep.engine.model import RankModel, load_config
    from elasticep.eplb.placement import Placement

    try:
        R = setup["ranks"]
        config = load_config(setup["model"])
        placement = Placement.from_dict(setup["placement"])
        ep = KernelEP(rank, cluster_id=setup["cluster"], max_tokens=64, hidden=config.hidden_size,
                      topk=config.num_experts_per_tok, timeout_us=setup["kernel_timeout_us"])
        model = RankModel(setup["model"], placement, ep, alive=[True] * R, rank=rank, epoch=1)
        agent = store = None
        backups = 0
        members: list[int] = []
        if mode == "on":
            from elasticep.agent import Agent
            from elasticep.bus import ClusterKeys
            from elasticep.config import Config
            from elasticep.engine.ep_rank import _RankHooks
            from elasticep.transfer import BackupStore, BackupPlan

            hooks = _RankHooks(_Shim(rank, model, ep, setup["model"], config))
            agent = Agent(rank, hooks, store=setup["store"], cluster=setup["cluster"], members=range(R),
                          config=Config.local(), keys=ClusterKeys.from_json(setup["keys"]).for_rank(rank))
            agent.start(timeout=60.0)
            layout = agent.layout if agent.layout is not None else hooks.expert_layout()
            plan = BackupPlan.from_dict(setup["backup_plan"])
            store = BackupStore(rank, layout, plan.slots,
                                transport=agent.executor.transport if agent.executor is not None else None)

            def load(pairs, weights, slot_of):
                moved = []
                for layer, expert in pairs:
                    t = model.checkpoint.expert(layer, expert)
                    gate, up = t["w13"].chunk(2, dim=0)
                    dst = weights.expert(layer, slot_of[(layer, expert)])
                    dst["gate_proj"].copy_(gate)
                    dst["up_proj"].copy_(up)
                    dst["down_proj"].copy_(t["w2"])
                    moved.append(type("M", (), {"layer": layer, "expert": expert})())
                return type("Report", (), {"moved": moved})()

            backups = len(store.sync(plan, load).added)
            members = list(agent.members)
        seq_rng = torch.Generator().manual_seed(setup["seed"] * 1000 + rank)
        vocab = config.vocab_size

        def fresh():
            prompt = torch.randint(0, vocab, (6,), generator=seq_rng).tolist()
            return model.new_sequence(prompt, setup["max_new_tokens"])

        seq = fresh()  # its prefill is the first (warm-up) step, after every rank got "go"
        conn.send(("ready", backups, members))
        conn.recv()  # go
        times: list[float] = []
        boundary: list[float] = []
        total = setup["warmup"] + setup["steps"]
        t_start = 0.0
        for i in range(total):
            if i == setup["warmup"]:
                t_start = time.perf_counter()
                cpu0, main0 = time.process_time(), time.thread_time()
            t0 = time.perf_counter_ns()
            if agent is not None:
                agent.boundary()
                boundary.append((time.perf_counter_ns() - t0) / 1e3)
            if seq.done:
                seq = fresh()
            model.step(seq)
            if i >= setup["warmup"]:
                times.append((time.perf_counter_ns() - t0) / 1e3)
        wall = time.perf_counter() - t_start
        # CPU the process's other threads (agent loop, bus, transfer engine) took meanwhile
        cpu = time.process_time() - cpu0
        main_cpu = time.thread_time() - main0
        others = cpu - main_cpu
        conn.send(("done", times, wall, others / wall, cpu, main_cpu, boundary[setup["warmup"]:]))
        conn.recv()  # every rank is done: none of them still waits on this one's kernel
        if agent is not None:
            agent.stop(timeout=5.0)
        if store is not None:
            store.close()
        ep.close()
    except BaseException as exc:  # reported to the parent, which fails the round
        conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))
        raise


def _round(ctx: Any, mode: str, setup: dict, timeout_s: float) -> tuple[list[float], float, float, list[tuple], dict]:
    from datetime import timedelta

    from torch.distributed import TCPStore

    R = setup["ranks"]
    server = None
    setup = dict(setup, cluster=uuid.uuid4().hex[:10])
    if mode == "on":
        server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
        setup["store"] = f"127.0.0.1:{server.port}"
    pipes, procs = [], []
    try:
        for r in range(R):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_rank_main, args=(r, mode, setup, child), daemon=True)
            p.start()
            pipes.append(parent)
            procs.append(p)

        def recv(conn):
            if not conn.poll(timeout_s):
                raise TimeoutError(f"{mode} round: a rank did not answer within {timeout_s:g} s")
            msg = conn.recv()
            if msg[0] == "error":
                # a rank that waited on a failed peer reports the peer as lost: name every error
                errors = [msg[1]]
                for other in pipes:
                    if other is not conn and other.poll(1.0):
                        m = other.recv()
                        if m[0] == "error":
                            errors.append(m[1])
                raise RuntimeError(f"{mode} round failed: " + "; ".join(errors))
            return msg

        ready = [tuple(recv(c)[1:]) for c in pipes]
        for c in pipes:
            c.send("go")
        results = [recv(c) for c in pipes]
        for c in pipes:
            c.send("stop")
        for p in procs:
            p.join(15)
        times = [t for msg in results for t in msg[1]]
        extra = {"main_cpu": sum(msg[5] for msg in results), "boundary": [b for msg in results for b in msg[6]]}
        return (times, max(msg[2] for msg in results), sum(msg[4] for msg in results),
                [(*rd, msg[3]) for rd, msg in zip(ready, results)], extra)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        from elasticep.kernel import unlink_segment

        unlink_segment(setup["cluster"], 1)  # ranks that were killed never unlinked it
        if server is not None:
            del server


def run(ranks: int = 2, rounds: int = 2, steps: int = 200, warmup: int = 20, seed: int = 0,
        max_new_tokens: int = 48, timeout_s: float = 120.0) -> dict:
    """Run both modes ``rounds`` times each, alternating; returns the JSON-ready figures."""
    import math

    import torch

    from elasticep.bus import ClusterKeys
    from elasticep.engine.model import load_config, make_tiny_model, moe_layer_ids, round_robin_placement
    from elasticep.transfer import plan_backups

    from elasticep.errors import InvalidArgument

    if ranks < 2 or rounds < 1 or steps < 10 or warmup < 1:
        raise InvalidArgument(f"need ranks >= 2, rounds >= 1, steps >= 10, warmup >= 1 (the prefill); "
                              f"got {ranks}, {rounds}, {steps}, {warmup}")
    workdir = Path(tempfile.mkdtemp(prefix="elasticep-bench-overhead-"))
    model = make_tiny_model(workdir / "model", seed=seed)
    config = load_config(model)
    experts = config.n_routed_experts
    # one redundant slot per rank: the experts a death leaves without a live replica come back
    # from the backups, which is what lets the ranks hold fewer replicas
    spr = math.ceil(experts / ranks) + 1
    placement = round_robin_placement(len(moe_layer_ids(config)), experts, ranks, spr)
    # each rank its own host; two copies' worth of slots per rank
    backup_plan = plan_backups(placement, slots=math.ceil(2 * experts / ranks))
    setup = dict(ranks=ranks, model=str(model), placement=placement.to_dict(), keys=ClusterKeys.generate(ranks).to_json(),
                 kernel_timeout_us=10_000_000, steps=steps, warmup=warmup, seed=seed, max_new_tokens=max_new_tokens,
                 backup_plan=backup_plan.to_dict())
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "elasticep.engine.model", "elasticep.agent"])
    order = []
    for i in range(rounds):
        order += ["off", "on"] if i % 2 == 0 else ["on", "off"]
    times: dict[str, list[float]] = {"on": [], "off": []}
    walls: dict[str, float] = {"on": 0.0, "off": 0.0}
    cpus: dict[str, float] = {"on": 0.0, "off": 0.0}
    main_cpus: dict[str, float] = {"on": 0.0, "off": 0.0}
    boundary: list[float] = []
    per_round: dict[str, list[float]] = {"on": [], "off": []}
    ready: dict[str, list] = {}
    for mode in order:
        t, wall, cpu, ready[mode], extra = _round(ctx, mode, setup, timeout_s)
        main_cpus[mode] += extra["main_cpu"]
        boundary += extra["boundary"]
        times[mode] += t
        walls[mode] += wall
        cpus[mode] += cpu
        per_round[mode].append(round(ranks * steps / wall, 1))
    tokens = ranks * steps * rounds
    out: dict[str, Any] = {
        "ranks": ranks, "rounds": rounds, "steps": steps,
        "backup_experts": [b for b, _, _ in ready["on"]],
        "agent_members_on": [m for _, m, _ in ready["on"]],
        "agent_members_off": [m for _, m, _ in ready["off"]],
        "other_threads_cpu_on": [round(c, 4) for _, _, c in ready["on"]],
        "other_threads_cpu_off": [round(c, 4) for _, _, c in ready["off"]],
    }
    for mode in ("on", "off"):
        out[f"tokens_per_s_{mode}"] = round(tokens / walls[mode], 1)
        out[f"step_p50_us_{mode}"] = round(_pct(times[mode], 50), 1)
        out[f"step_p99_us_{mode}"] = round(_pct(times[mode], 99), 1)
        out[f"tokens_per_cpu_s_{mode}"] = round(tokens / cpus[mode], 1)
        out[f"serving_thread_cpu_per_step_us_{mode}"] = round(main_cpus[mode] / tokens * 1e6, 1)
        out[f"rounds_tokens_per_s_{mode}"] = per_round[mode]
    out["throughput_ratio"] = round(out["tokens_per_s_on"] / out["tokens_per_s_off"], 4)
    out["p99_ratio"] = round(out["step_p99_us_on"] / out["step_p99_us_off"], 4)
    out["boundary_p50_us"] = round(_pct(boundary, 50), 2)
    out["boundary_p99_us"] = round(_pct(boundary, 99), 2)
    out["cpu_per_token_ratio"] = round(out["tokens_per_cpu_s_off"] / out["tokens_per_cpu_s_on"], 4)
    out["meets_target"] = out["throughput_ratio"] >= _THROUGHPUT_TARGET and out["p99_ratio"] <= _P99_TARGET
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elasticep bench overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode (alternating)")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps at the start of each round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    out = run(args.ranks, args.rounds, args.steps, args.warmup, args.seed)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
