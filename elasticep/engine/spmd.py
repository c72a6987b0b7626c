"""Kernel-backed ranks that decode in lockstep: expert parallelism across real processes.

Each rank process holds only its own rank's expert slots (:class:`~elasticep.engine.ep.KernelEP`
over the CPU kernel) and decodes its own request; every rank runs the same number of steps, so
every MoE layer's dispatch and combine meet across all ranks. When a peer dies, the kernel's
bounded waits mark it inactive, the step fails its check (:class:`~elasticep.engine.ep.PeersLost`),
the KV cache is rolled back, and the rank moves to the next epoch's view without the peer and
replays the step, routing to the surviving replicas.

Here each survivor takes the new view from its own kernel mask: all of them wait on the dead
peer in the same step, so they agree. This module is the data plane alone, kept as the smallest
runnable form of the lockstep; the serving engine (``Launcher(backend="kernel")``,
:mod:`elasticep.engine.ep_rank`) agrees on every view through the membership service instead, so
a hung-but-alive peer cannot split it, and reconfigures through the pipeline.

:func:`run_spmd_rank` is a zygote target (``"elasticep.engine.spmd:run_spmd_rank"``); results go
to the launcher's store under :func:`result_key` as JSON ``{"tokens", "views", "steps"}``.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import time

__all__ = ["run_spmd_rank", "result_key"]


def result_key(cluster: str, rank: int) -> str:
    return f"elasticep/{cluster}/spmd/{rank}/result"


def _barrier(store, key: str, world: int, timeout_s: float) -> None:
    """Wait until ``world`` ranks have arrived at ``key`` (the kernel's first wait is bounded,
    so no rank may start dispatching while a peer is still loading its model)."""
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < world:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {store.add(key, 0)} of {world} ranks reached {key}")
        time.sleep(0.005)


def run_spmd_rank(
    store_host: str,
    store_port: int,
    cluster: str,
    rank: int,
    model_path: str,
    placement: dict,
    prompt: list[int],
    max_new_tokens: int,
    kill_at_step: int = -1,
    timeout_us: int = 1_000_000,
) -> int:
    """Decode ``prompt`` greedily as EP rank ``rank``; returns the exit code (0).

    ``placement`` is :meth:`Placement.to_dict` output; every rank must get the same one and a
    prompt of the same length. ``kill_at_step >= 0`` makes this rank SIGKILL itself before that
    step (the fault the survivors must absorb).
    """
    import torch
    from torch.distributed import TCPStore

    from elasticep.engine.ep import KernelEP, PeersLost
    from elasticep.engine.model import RankModel, load_config
    from elasticep.engine.rank import _die_with_parent
    from elasticep.eplb.placement import Placement

    _die_with_parent()
    torch.set_num_threads(1)
    store = TCPStore(store_host, store_port, is_master=False, timeout=datetime.timedelta(seconds=30), use_libuv=True)
    plan = Placement.from_dict(placement)
    config = load_config(model_path)
    ep = KernelEP(
        rank,
        cluster_id=cluster,
        max_tokens=max(64, len(prompt)),
        hidden=config.hidden_size,
        topk=config.num_experts_per_tok,
        timeout_us=timeout_us,
    )
    model = RankModel(model_path, plan, ep, rank=rank, epoch=0)
    seq = model.new_sequence(prompt, max_new_tokens)
    _barrier(store, f"elasticep/{cluster}/spmd/ready", plan.num_ranks, 60.0)
    views = []
    step = 0
    try:
        while not seq.done:
            if step == kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            try:
                model.step(seq)
            except PeersLost as lost:
                alive = model.alive
                alive[list(lost.ranks)] = False
                # RedundancyExhausted propagates: serving on would give wrong outputs
                model.set_placement(plan, alive, epoch=ep.epoch + 1)
                views.append({"epoch": ep.epoch, "alive": alive.tolist(), "at_step": step})
                continue
            step += 1
        store.set(result_key(cluster, rank), json.dumps({"tokens": seq.generated, "views": views, "steps": step}))
    finally:
        ep.close()
    return 0
