"""The CPU kernel across real rank processes: MoE equality with transformers, kills, hangs.

Ranks are real processes started from a forkserver that has torch and elasticep.kernel
preloaded (a fork is cheap; a fresh interpreter importing torch costs seconds of the two cores).
Each test kills every process it started and unlinks its segment in a ``finally`` block.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import time
import uuid
from typing import Any

import pytest
import torch

from elasticep.kernel import EPBuffer, unlink_segment

pytestmark = pytest.mark.multiproc

HIDDEN = 64
NUM_EXPERTS = 16
TOPK = 4
INTERMEDIATE = 32
TOKENS_PER_RANK = 12

_CTX: Any = None


def _ctx() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "elasticep.kernel"])
    return _CTX


# --- rank process bodies (run in the children) ------------------------------------------------


def _expert(h: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = torch.nn.functional.linear(h, gate_up).chunk(2, dim=-1)
    return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down)


def _moe_rank(rank: int, num_ranks: int, cluster_id: str, job: dict[str, Any], results: Any) -> None:
    """Expert-parallel MoE forward: dispatch, local experts, combine, plus the local shared expert."""
    torch.set_num_threads(1)
    spr = NUM_EXPERTS // num_ranks
    outs = []
    with EPBuffer(
        rank, num_ranks, slots_per_rank=spr, max_tokens=TOKENS_PER_RANK, hidden=HIDDEN, topk=TOPK,
        cluster_id=cluster_id, epoch=job["epoch"], timeout_us=5_000_000,
    ) as buf:
        for i, (x, idx, w) in enumerate(job["rounds"]):
            recv_x, recv_count, handle = buf.dispatch(x, idx)
            # Odd rounds write the expert outputs over recv_x (combine then moves no rows), even
            # rounds into a tensor of their own (combine copies them into the segment).
            expert_out = recv_x if i % 2 else torch.zeros_like(recv_x)
            for e in range(spr):
                n = int(recv_count[e])
                if n:
                    expert_out[e, :n] = _expert(recv_x[e, :n], job["gate_up"][e], job["down"][e])
            routed = buf.combine(expert_out, idx, w, handle=handle)
            shared = _expert(x, job["shared_gate_up"], job["shared_down"])
            outs.append((routed + shared).numpy())  # by value: the parent reads after we exit
        results.send((rank, {"outs": outs, "mask": buf.active_ranks.tolist(), "stats": buf.stats()}))


def _fault_rank(rank: int, num_ranks: int, cluster_id: str, job: dict[str, Any], results: Any) -> None:
    """One dispatch + combine under a fault; reports timings, the mask and the timeouts seen."""
    torch.set_num_threads(1)
    spr = NUM_EXPERTS // num_ranks
    buf = EPBuffer(
        rank, num_ranks, slots_per_rank=spr, max_tokens=TOKENS_PER_RANK, hidden=HIDDEN, topk=TOPK,
        cluster_id=cluster_id, timeout_us=job["timeout_us"],
    )
    results.send((rank, "ready"))
    go = job["go"][rank]
    if not go.poll(20):
        return
    go.recv()
    if rank == job.get("late_rank"):
        time.sleep(job["late_s"])
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(TOKENS_PER_RANK, HIDDEN, generator=gen)
    idx = torch.rand(TOKENS_PER_RANK, NUM_EXPERTS, generator=gen).argsort(dim=1)[:, :TOPK].contiguous()
    w = torch.rand(TOKENS_PER_RANK, TOPK, generator=gen)
    results.send((rank, "entering"))
    t0 = time.monotonic()
    recv_x, _, handle = buf.dispatch(x, idx, layer=3)
    t1 = time.monotonic()
    timeouts = list(buf.last_timeouts())
    buf.combine(recv_x.clone(), idx, w, handle=handle, layer=3)
    t2 = time.monotonic()
    timeouts += buf.last_timeouts()
    results.send((rank, {
        "dispatch_s": t1 - t0, "combine_s": t2 - t1, "mask": buf.active_ranks.tolist(),
        "timeouts": [(t.peer, t.op, t.layer, t.waited_us) for t in timeouts], "stats": buf.stats(),
    }))
    buf.close()


# --- the parent side ---------------------------------------------------------------------------


class RankGroup:
    """R rank processes of one test; :meth:`stop` kills what is left and unlinks the segment."""

    def __init__(self, target: Any, num_ranks: int, jobs: list[dict[str, Any]], epoch: int = 0) -> None:
        ctx = _ctx()
        self.cluster_id = "t" + uuid.uuid4().hex[:10]
        self.epoch = epoch
        # One pipe per rank, not a shared mp.Queue: a rank killed while it holds the queue's write
        # lock would silence every other rank.
        pipes = [ctx.Pipe(duplex=False) for _ in range(num_ranks)]
        self.readers = [r for r, _ in pipes]
        self.inbox: dict[int, list[Any]] = {r: [] for r in range(num_ranks)}
        self.procs = [
            ctx.Process(target=target, args=(r, num_ranks, self.cluster_id, jobs[r], pipes[r][1]), daemon=True)
            for r in range(num_ranks)
        ]
        for p in self.procs:
            p.start()
        for _, w in pipes:
            w.close()

    def collect(self, want: dict[int, int], deadline_s: float, kind: type = dict) -> dict[int, Any]:
        """Wait until each rank in ``want`` has posted ``want[rank]`` messages of ``kind`` (str or
        dict) since it started; return the latest such message of each."""
        end = time.monotonic() + deadline_s

        def have(r: int) -> list[Any]:
            return [m for m in self.inbox[r] if isinstance(m, kind)]

        open_readers = {id(c): (r, c) for r, c in enumerate(self.readers) if not c.closed}
        while any(len(have(r)) < n for r, n in want.items()):
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"ranks did not report in {deadline_s}s: have {self.inbox}")
            for conn in mp_connection.wait([c for _, c in open_readers.values()], timeout=min(left, 0.5)):
                rank, c = open_readers[id(conn)]
                try:
                    _, msg = c.recv()
                except EOFError:
                    del open_readers[id(conn)]
                    if rank in want and len(have(rank)) < want[rank]:
                        raise AssertionError(f"rank {rank} exited before reporting: {self.procs[rank].exitcode}")
                    continue
                self.inbox[rank].append(msg)
        return {r: have(r)[-1] for r in want}

    def stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                try:  # it may exit between the check and the signal
                    os.kill(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    continue
                p.kill()
        for p in self.procs:
            p.join(5)
        for c in self.readers:
            c.close()
        unlink_segment(self.cluster_id, self.epoch)


def _tiny_moe(seed: int) -> Any:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(
        hidden_size=HIDDEN, n_routed_experts=NUM_EXPERTS, num_experts_per_tok=TOPK,
        moe_intermediate_size=INTERMEDIATE, n_shared_experts=1, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, hidden_act="silu",
    )
    config._experts_implementation = "eager"  # transformers' own per-expert loop
    torch.manual_seed(seed)
    moe = DeepseekV3MoE(config).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.2)
    return moe


def _oracle(moe: Any, x: torch.Tensor, idx: torch.Tensor | None, w: torch.Tensor | None) -> tuple[Any, ...]:
    """transformers' own DeepseekV3MoE forward; with idx/w given, the router's output is replaced by them."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        if idx is None:
            captured["idx"], captured["w"] = output[2], output[1]
            return output
        return output[0], w, idx

    handle = moe.gate.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = moe(x.unsqueeze(0)).squeeze(0)
    finally:
        handle.remove()
    if idx is None:
        idx, w = captured["idx"], captured["w"]
    return out, idx.contiguous(), w.float().contiguous()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_dispatch_compute_combine_equals_transformers_moe(num_ranks: int) -> None:
    moe = _tiny_moe(seed=num_ranks)
    spr = NUM_EXPERTS // num_ranks
    gen = torch.Generator().manual_seed(100 + num_ranks)
    total = num_ranks * TOKENS_PER_RANK
    rounds, oracles = [], []
    for r in range(3):
        x = torch.randn(total, HIDDEN, generator=gen)
        if r == 0:  # the model's own router
            out, idx, w = _oracle(moe, x, None, None)
        else:  # random routing, fed into both sides
            idx = torch.rand(total, NUM_EXPERTS, generator=gen).argsort(dim=1)[:, :TOPK].contiguous()
            w = torch.rand(total, TOPK, generator=gen)
            out, idx, w = _oracle(moe, x, idx, w)
        rounds.append((x, idx, w))
        oracles.append(out)
    gate_up = moe.experts.gate_up_proj.detach()
    down = moe.experts.down_proj.detach()
    se = moe.shared_experts
    shared_gate_up = torch.cat([se.gate_proj.weight, se.up_proj.weight]).detach()
    jobs = []
    for rank in range(num_ranks):
        rows = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
        jobs.append({
            "epoch": 0,
            "rounds": [(x[rows].clone(), idx[rows].clone(), w[rows].clone()) for x, idx, w in rounds],
            "gate_up": gate_up[rank * spr:(rank + 1) * spr].clone(),
            "down": down[rank * spr:(rank + 1) * spr].clone(),
            "shared_gate_up": shared_gate_up.clone(),
            "shared_down": se.down_proj.weight.detach().clone(),
        })
    group = RankGroup(_moe_rank, num_ranks, jobs)
    try:
        res = group.collect({r: 1 for r in range(num_ranks)}, deadline_s=45)
    finally:
        group.stop()
    for rank in range(num_ranks):
        rows = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
        assert res[rank]["mask"] == [1] * num_ranks
        assert res[rank]["stats"]["peer_timeouts"] == 0
        for got, want in zip(res[rank]["outs"], oracles):
            torch.testing.assert_close(torch.from_numpy(got), want[rows], rtol=1e-5, atol=1e-5)


class _Go:
    """A start signal per rank over its own pipe (an mp.Event deadlocks its setter if a waiter is
    killed or stopped)."""

    def __init__(self, num_ranks: int) -> None:
        pipes = [_ctx().Pipe(duplex=False) for _ in range(num_ranks)]
        self.readers = [r for r, _ in pipes]
        self.writers = [w for _, w in pipes]

    def set(self, ranks: list[int] | None = None) -> None:
        for r in range(len(self.writers)) if ranks is None else ranks:
            self.writers[r].send("go")


def _fault_jobs(num_ranks: int, timeout_us: int, **extra: Any) -> tuple[list[dict[str, Any]], _Go]:
    go = _Go(num_ranks)
    return [dict(timeout_us=timeout_us, go=go.readers, **extra) for _ in range(num_ranks)], go


TIMEOUT_US = 400_000
BOUND_S = 0.25  # slack over timeout_us for scheduling on two shared cores


def _check_survivors(res: dict[int, Any], victim: int, num_ranks: int, late_s: float = 0.0) -> None:
    want_mask = [0 if r == victim else 1 for r in range(num_ranks)]
    for rank, r in res.items():
        assert r["mask"] == want_mask, f"rank {rank}: {res}"
        peers = {t[0] for t in r["timeouts"]}
        assert peers == {victim}, f"rank {rank}: timeouts {r['timeouts']}"
        for peer, op, layer, waited_us in r["timeouts"]:
            assert op in ("dispatch", "combine") and layer == 3
            assert TIMEOUT_US <= waited_us < TIMEOUT_US + BOUND_S * 1e6
        assert r["dispatch_s"] + r["combine_s"] < late_s + TIMEOUT_US / 1e6 + BOUND_S, f"rank {rank}: {r}"
        assert r["stats"]["peer_timeouts"] == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_sigkill_before_dispatch(num_ranks: int) -> None:
    victim = num_ranks - 1
    jobs, go = _fault_jobs(num_ranks, TIMEOUT_US)
    group = RankGroup(_fault_rank, num_ranks, jobs)
    try:
        group.collect({r: 1 for r in range(num_ranks)}, deadline_s=30, kind=str)
        os.kill(group.procs[victim].pid, signal.SIGKILL)
        group.procs[victim].join(5)
        go.set()
        survivors = [r for r in range(num_ranks) if r != victim]
        res = group.collect({r: 1 for r in survivors}, deadline_s=10)
    finally:
        group.stop()
    _check_survivors(res, victim, num_ranks)
    for r in res.values():  # it never posted: every survivor gave up on it in dispatch
        assert [t[1] for t in r["timeouts"]] == ["dispatch"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_sigkill_during_dispatch(num_ranks: int) -> None:
    # Rank 0 starts its dispatch late, so the victim is blocked inside dispatch (having posted its
    # tokens) when it is killed; the survivors then lose it in combine.
    victim, late_s = num_ranks - 1, 0.1
    jobs, go = _fault_jobs(num_ranks, TIMEOUT_US, late_rank=0, late_s=late_s)
    group = RankGroup(_fault_rank, num_ranks, jobs)
    try:
        group.collect({r: 1 for r in range(num_ranks)}, deadline_s=30, kind=str)
        go.set()
        group.collect({victim: 2}, deadline_s=10, kind=str)  # "ready", then "entering"
        time.sleep(0.03)
        assert group.procs[victim].is_alive()
        os.kill(group.procs[victim].pid, signal.SIGKILL)
        survivors = [r for r in range(num_ranks) if r != victim]
        res = group.collect({r: 1 for r in survivors}, deadline_s=10)
    finally:
        group.stop()
    _check_survivors(res, victim, num_ranks, late_s=late_s)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_sigstop_one_rank(num_ranks: int) -> None:
    victim = num_ranks // 2
    jobs, go = _fault_jobs(num_ranks, TIMEOUT_US)
    group = RankGroup(_fault_rank, num_ranks, jobs)
    try:
        group.collect({r: 1 for r in range(num_ranks)}, deadline_s=30, kind=str)
        os.kill(group.procs[victim].pid, signal.SIGSTOP)
        go.set()
        survivors = [r for r in range(num_ranks) if r != victim]
        res = group.collect({r: 1 for r in survivors}, deadline_s=10)
        # Resumed, the hung rank finds every peer gone on to the next step: it gives up on all of
        # them within its own timeout instead of hanging.
        os.kill(group.procs[victim].pid, signal.SIGCONT)
        late = group.collect({victim: 1}, deadline_s=10)[victim]
    finally:
        group.stop()
    _check_survivors(res, victim, num_ranks)
    assert late["mask"] == [1 if r == victim else 0 for r in range(num_ranks)]
    assert late["dispatch_s"] + late["combine_s"] < TIMEOUT_US / 1e6 + BOUND_S
