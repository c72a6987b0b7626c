"""``elasticep bench kernel``: the CPU dispatch/combine kernel against its bound and against gloo.

R rank processes on this host each hold ``--tokens`` tokens of ``--hidden`` values routed to
``--topk`` of ``R * --slots-per-rank`` expert slots at random (seeded; every rank knows every
rank's routing, so all byte counts are exact). In one run, on the same processes, it measures:

* **kernel**: :meth:`EPBuffer.dispatch` then :meth:`EPBuffer.combine` with identity experts, per
  step, two ways: the expert outputs are ``recv_x`` itself (an expert that writes its outputs in
  place; combine moves no rows, the figure under ``dispatch_combine_p50_us``), and the expert
  outputs are a tensor of their own (combine copies them into the segment once,
  ``dispatch_combine_copy_out_p50_us``);
* **shm_copy** (the bound): each rank copies the same bytes it sends in that step (dispatch rows,
  one per (token, destination rank); combine rows, one per (token, slot)) into a shared-memory
  region with one ``memcpy`` each way, and the bytes it receives out of another rank's region, with
  no synchronisation at all: what a zero-overhead exchange through shared memory would cost;
* **gloo**: ``torch.distributed.all_to_all_single`` on a gloo group, once for the dispatch rows and
  once for the combine rows, with the exact per-peer split sizes (the packed send buffers are built
  outside the timed region, and neither the permutation into per-expert order nor the weighted sum
  is timed, all of which favours gloo).

The kernel and gloo steps alternate in ``--rounds`` rounds, so that on a shared host both see the
same background load.

Each figure is the p50 over steps of one rank's step time, taking the slowest rank. ``--json
PATH`` writes ``ranks``, ``tokens``, ``hidden``, ``dispatch_combine_p50_us``, ``shm_copy_p50_us``,
``gloo_all_to_all_p50_us`` and details. The step is timed with every rank running concurrently, so
with more ranks than cores all three share the cores the same way.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import socket
import sys
import time
import uuid
from typing import Any

GLOO_OP = "all_to_all_single"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _routing(args: argparse.Namespace, rank: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(1000 + rank)
    num_slots = args.ranks * args.slots_per_rank
    idx = torch.rand(args.tokens, num_slots, generator=gen).argsort(dim=1)[:, : args.topk].contiguous()
    w = torch.rand(args.tokens, args.topk, generator=gen)
    return idx, w


def _rows(args: argparse.Namespace, idx: Any) -> tuple[list[int], list[int]]:
    """Per destination rank: dispatch rows (tokens with a slot there), combine rows ((token, slot) pairs)."""
    owner = idx // args.slots_per_rank
    dispatch = [int((owner == d).any(dim=1).sum()) for d in range(args.ranks)]
    combine = [int((owner == d).sum()) for d in range(args.ranks)]
    return dispatch, combine


def _rank_main(rank: int, args: argparse.Namespace, port: int, cluster_id: str, copy_path: str, conn: Any) -> None:
    import torch
    import torch.distributed as dist

    from elasticep.kernel import EPBuffer

    torch.set_num_threads(1)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    esize = torch.tensor([], dtype=dtype).element_size()
    row = args.hidden * esize
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ranks
    )
    try:
        routes = [_routing(args, r) for r in range(args.ranks)]
        idx, w = routes[rank]
        per_rank = [_rows(args, routes[r][0]) for r in range(args.ranks)]
        d_out, c_in = per_rank[rank]  # rows this rank sends per dst / gets back per owner
        d_in = [per_rank[s][0][rank] for s in range(args.ranks)]  # rows each src sends here
        c_out = [per_rank[s][1][rank] for s in range(args.ranks)]  # rows this rank returns per src
        sent_bytes = (sum(d_out) + sum(c_out)) * row
        recv_bytes = (sum(d_in) + sum(c_in)) * row
        x = torch.randn(args.tokens, args.hidden).to(dtype)

        # kernel and gloo, interleaved in rounds so that both see the same background load
        buf = EPBuffer(
            rank, args.ranks, slots_per_rank=args.slots_per_rank, max_tokens=args.tokens,
            hidden=args.hidden, topk=args.topk, cluster_id=cluster_id, timeout_us=args.timeout_us,
        )
        send_d = torch.randn(sum(d_out), args.hidden).to(dtype)
        recv_d = torch.empty(sum(d_in), args.hidden, dtype=dtype)
        send_c = torch.randn(sum(c_out), args.hidden).to(dtype)
        recv_c = torch.empty(sum(c_in), args.hidden, dtype=dtype)
        separate: list[Any] = []  # expert outputs outside recv_x, allocated at the first step

        def kernel_step(in_place: bool) -> float:
            t0 = time.perf_counter_ns()
            recv_x, _, handle = buf.dispatch(x, idx)
            if in_place:
                expert_out = recv_x
            else:
                if not separate or separate[0].shape != recv_x.shape:
                    separate[:] = [torch.zeros_like(recv_x)]
                expert_out = separate[0]
            buf.combine(expert_out, idx, w, handle=handle)
            return (time.perf_counter_ns() - t0) / 1e3

        def gloo_step() -> float:
            t0 = time.perf_counter_ns()
            dist.all_to_all_single(recv_d, send_d, output_split_sizes=d_in, input_split_sizes=d_out)
            dist.all_to_all_single(recv_c, send_c, output_split_sizes=c_in, input_split_sizes=c_out)
            return (time.perf_counter_ns() - t0) / 1e3

        dist.barrier()
        for _ in range(args.warmup):
            kernel_step(True)
            kernel_step(False)
        for _ in range(args.gloo_warmup):
            gloo_step()
        kernel_us: list[float] = []
        copy_out_us: list[float] = []
        gloo_us: list[float] = []
        rounds = max(1, min(args.rounds, args.iters, args.gloo_iters))
        for r in range(rounds):
            n_kernel = args.iters * (r + 1) // rounds - args.iters * r // rounds
            n_gloo = args.gloo_iters * (r + 1) // rounds - args.gloo_iters * r // rounds
            dist.barrier()
            kernel_us += [kernel_step(True) for _ in range(n_kernel)]
            dist.barrier()
            copy_out_us += [kernel_step(False) for _ in range(n_kernel)]
            dist.barrier()
            gloo_us += [gloo_step() for _ in range(n_gloo)]
        mask_ok = buf.active_ranks.tolist() == [1] * args.ranks
        buf.close()

        # shm copy bound
        region = max(sent_bytes, recv_bytes)
        # one region size for all (each rank's own max differs with its routing), so that every
        # rank's region starts where the others expect it
        agreed = torch.tensor([region], dtype=torch.int64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        region = int(agreed.item())
        # rank 0 creates and sizes the file before anyone maps it: no rank resizes a file another
        # rank already writes through
        if rank == 0:
            shm = torch.from_file(copy_path, shared=True, size=region * args.ranks, dtype=torch.uint8)
        dist.barrier()
        if rank != 0:
            shm = torch.from_file(copy_path, shared=True, size=region * args.ranks, dtype=torch.uint8)
        mine = shm[rank * region : rank * region + sent_bytes]
        theirs = shm[((rank + 1) % args.ranks) * region : ((rank + 1) % args.ranks) * region + recv_bytes]
        src = torch.randint(0, 255, (sent_bytes,), dtype=torch.uint8)
        dst = torch.empty(recv_bytes, dtype=torch.uint8)
        for _ in range(args.warmup):
            mine.copy_(src)
            dst.copy_(theirs)
        dist.barrier()
        copy_us = []
        start = time.perf_counter_ns()
        for _ in range(args.iters):
            t0 = time.perf_counter_ns()
            mine.copy_(src)
            dst.copy_(theirs)
            copy_us.append((time.perf_counter_ns() - t0) / 1e3)
        copy_loop_us = (time.perf_counter_ns() - start) / 1e3
        dist.barrier()
        conn.send({
            "rank": rank,
            "kernel_p50_us": _percentile(kernel_us, 50),
            "kernel_p99_us": _percentile(kernel_us, 99),
            "copy_p50_us": _percentile(copy_us, 50),
            "copy_loop_us": copy_loop_us,
            "kernel_mean_us": sum(kernel_us) / len(kernel_us),
            "copy_out_p50_us": _percentile(copy_out_us, 50),
            "gloo_p50_us": _percentile(gloo_us, 50),
            "sent_bytes": sent_bytes,
            "recv_bytes": recv_bytes,
            "mask_ok": mask_ok,
        })
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start ``args.ranks`` processes, measure, and return the figures (also what ``--json`` writes)."""
    from elasticep.kernel import unlink_segment

    ctx = mp.get_context("spawn")
    cluster_id = "bench" + uuid.uuid4().hex[:8]
    copy_path = f"/dev/shm/elasticep-benchcopy-{cluster_id}"
    port = _free_port()
    pipes = [ctx.Pipe(duplex=False) for _ in range(args.ranks)]
    procs = [
        ctx.Process(target=_rank_main, args=(r, args, port, cluster_id, copy_path, pipes[r][1]), daemon=True)
        for r in range(args.ranks)
    ]
    results: dict[int, dict[str, Any]] = {}
    try:
        for p in procs:
            p.start()
        for _, w in pipes:
            w.close()
        readers = {id(r): r for r, _ in pipes}
        deadline = time.monotonic() + args.deadline_s
        while len(results) < args.ranks:
            left = deadline - time.monotonic()
            if left <= 0 or not readers:
                codes = {r: p.exitcode for r, p in enumerate(procs)}
                raise RuntimeError(f"bench ranks did not finish: results from {sorted(results)}, exit codes {codes}")
            for c in mp_connection.wait(list(readers.values()), timeout=min(left, 1.0)):
                try:
                    msg = c.recv()
                except EOFError:
                    del readers[id(c)]
                    continue
                results[msg["rank"]] = msg
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
        unlink_segment(cluster_id, 0)
        if os.path.exists(copy_path):
            os.unlink(copy_path)
    per_rank = [results[r] for r in range(args.ranks)]
    kernel = max(r["kernel_p50_us"] for r in per_rank)
    copy = max(r["copy_p50_us"] for r in per_rank)
    gloo = max(r["gloo_p50_us"] for r in per_rank)
    copy_out = max(r["copy_out_p50_us"] for r in per_rank)
    return {
        "ranks": args.ranks,
        "tokens": args.tokens,
        "hidden": args.hidden,
        "dispatch_combine_p50_us": round(kernel, 1),
        "shm_copy_p50_us": round(copy, 1),
        "gloo_all_to_all_p50_us": round(gloo, 1),
        "gloo_op": GLOO_OP,
        "dtype": args.dtype,
        "topk": args.topk,
        "slots_per_rank": args.slots_per_rank,
        "iters": args.iters,
        "gloo_iters": args.gloo_iters,
        "cpus": os.cpu_count(),
        "dispatch_combine_p99_us": round(max(r["kernel_p99_us"] for r in per_rank), 1),
        "dispatch_combine_mean_us": round(max(r["kernel_mean_us"] for r in per_rank), 1),
        # Expert outputs in a tensor of their own: combine copies them into the segment once.
        "dispatch_combine_copy_out_p50_us": round(copy_out, 1),
        "gloo_over_kernel_copy_out": round(gloo / copy_out, 2),
        "rounds": max(1, min(args.rounds, args.iters, args.gloo_iters)),
        # All ranks copying at once for `iters` steps: the slowest rank's loop / iters. With more
        # ranks than cores this, not the per-copy p50, is what one exchange step can cost at least.
        "shm_copy_concurrent_step_us": round(max(r["copy_loop_us"] for r in per_rank) / args.iters, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "bytes_sent_per_rank_step": max(r["sent_bytes"] for r in per_rank),
        "kernel_over_copy": round(kernel / copy, 2),
        "kernel_over_concurrent_copy": round(kernel / (max(r["copy_loop_us"] for r in per_rank) / args.iters), 2),
        "gloo_over_kernel": round(gloo / kernel, 2),
        "masks_all_active": all(r["mask_ok"] for r in per_rank),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="elasticep bench kernel", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank per step")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--slots-per-rank", type=int, default=4)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--gloo-iters", type=int, default=60)
    p.add_argument("--gloo-warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=6,
                   help="kernel and gloo steps alternate in this many rounds (same background load for both)")
    p.add_argument("--timeout-us", type=int, default=10_000_000, help="kernel wait bound (no faults here)")
    p.add_argument("--deadline-s", type=float, default=300.0, help="give up on the whole run after this")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.topk > args.ranks * args.slots_per_rank:
        p.error("--topk must be <= ranks * slots-per-rank")
    res = run(args)
    print(
        f"ranks={res['ranks']} tokens={res['tokens']} hidden={res['hidden']} dtype={res['dtype']} "
        f"topk={res['topk']} slots/rank={res['slots_per_rank']} cpus={res['cpus']}\n"
        f"  kernel dispatch+combine p50   {res['dispatch_combine_p50_us']:>10.1f} us"
        f"  (p99 {res['dispatch_combine_p99_us']:.1f} us; expert outputs in recv_x)\n"
        f"  ... expert outputs elsewhere  {res['dispatch_combine_copy_out_p50_us']:>10.1f} us"
        f"  (combine copies them once; {res['gloo_over_kernel_copy_out']:.1f}x faster than gloo)\n"
        f"  shm memcpy of the same bytes  {res['shm_copy_p50_us']:>10.1f} us  (bound, p50 of one copy; "
        f"kernel is {res['kernel_over_copy']:.2f}x)\n"
        f"  ... all ranks copying at once {res['shm_copy_concurrent_step_us']:>10.1f} us  (per step; kernel is "
        f"{res['kernel_over_concurrent_copy']:.2f}x)\n"
        f"  gloo {GLOO_OP} x2        {res['gloo_all_to_all_p50_us']:>10.1f} us  (kernel is "
        f"{res['gloo_over_kernel']:.1f}x faster)\n"
        f"  bytes sent per rank per step  {res['bytes_sent_per_rank_step']}  "
        f"(1-min load average {res['load_average_1m']})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
