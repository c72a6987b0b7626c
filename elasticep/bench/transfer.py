"""``elasticep bench transfer``: expert weights between two rank processes, elasticep vs raw Mooncake.

A source rank process holds ``--count`` experts of each size in ``--sizes`` (MiB per expert, as
gate/up/down bf16 projections), registered with its transfer engine. The receiving rank (this
process) loads all of them into its empty slots three ways, in the same run, alternating:

- ``elasticep``: :meth:`TransferExecutor.run` on the planner-style moves (one batched read per
  peer, the job thread, the result bookkeeping);
- ``raw read``: one ``batch_transfer_async_read`` of the same extents plus its status wait;
- ``raw write``: the source process pushes the same extents with one
  ``batch_transfer_async_write`` plus its status wait, timed there.

Each figure is the total bytes over the sum, across sizes, of the median time of ``--repeats``
runs. The destination's bytes are checked against the source's CRC-32 after the elasticep runs.
JSON keys: ``bytes`` (moved per method and repeat), ``elasticep_gib_s``, ``raw_mooncake_gib_s``
(the write baseline the target is stated against), ``raw_mooncake_read_gib_s``, ``ratio``
(elasticep over raw write), ``ratio_read`` and per-size rows.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
import zlib
from typing import Any

GIB = float(1 << 30)
HIDDEN = 1024


def _layout(size_mib: float, count: int):
    import torch

    from elasticep.transfer import ExpertLayout

    # three [inter, hidden]-sized bf16 tensors: 6 * inter * hidden bytes per expert
    inter = max(1, round(size_mib * (1 << 20) / (6 * HIDDEN)))
    return ExpertLayout.deepseek(
        num_layers=1, slots_per_rank=count, hidden_size=HIDDEN, moe_intermediate_size=inter, dtype=torch.bfloat16
    )


def _crc(weights) -> int:
    """CRC-32 of every buffer of layer 0, in layout order."""
    import torch

    crc = 0
    for t in weights.layout.tensors:
        buf = weights.buffers[weights.layout.buffer_name(0, t.name)]
        crc = zlib.crc32(buf.view(-1).view(torch.uint8).numpy(), crc)
    return crc


def _source_main(conn, sizes: list[float], count: int, host: str) -> None:
    """The source rank: hold the experts, announce them, push on request."""
    import torch

    from elasticep.transfer import ExpertWeights, MooncakeTransport, TransferExecutor

    transport = MooncakeTransport(host)
    held = []
    announced = []
    for i, size in enumerate(sizes):
        weights = ExpertWeights.allocate(_layout(size, count))
        g = torch.Generator().manual_seed(i)
        weights.arena.copy_(torch.randint(0, 256, weights.arena.shape, dtype=torch.uint8, generator=g))
        executor = TransferExecutor(0, weights, transport)
        held.append(weights)
        announced.append((executor.endpoint(epoch=0), _crc(weights)))
    conn.send(announced)
    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            return
        _, i, peer, remote = cmd
        weights = held[i]
        local, lengths = [], []
        for slot in range(count):
            for t in weights.layout.tensors:
                addr, n = weights.address(0, slot, t.name)
                local.append(addr)
                lengths.append(n)
        started = time.perf_counter()
        ok = transport.wait(transport.submit_write(peer, local, remote, lengths))
        conn.send((ok, time.perf_counter() - started))


def run(sizes: list[float], count: int, repeats: int, host: str = "127.0.0.1") -> dict[str, Any]:
    """Run the benchmark; return the JSON-ready result (see module docs)."""
    # Fork the source before this process starts its own engine: a process forked from one that
    # runs a Mooncake engine cannot start another.
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_source_main, args=(child, sizes, count, host), daemon=True)
    proc.start()
    try:
        from elasticep.transfer import ExpertMove, ExpertWeights, MooncakeTransport, TransferExecutor

        transport = MooncakeTransport(host)
        rows = []
        epoch = 0
        if not parent.poll(120):
            raise RuntimeError("the source rank did not start within 120 s")
        announced = parent.recv()
        for i, size in enumerate(sizes):
            endpoint, source_crc = announced[i]
            layout = _layout(size, count)
            weights = ExpertWeights.allocate(layout)
            executor = TransferExecutor(1, weights, transport)
            executor.learn(endpoint)
            moves = [ExpertMove(0, count + j, j, (j,)) for j in range(count)]
            local, remote, lengths = [], [], []
            for j in range(count):
                for t in layout.tensors:
                    addr, n = weights.address(0, j, t.name)
                    base, _ = endpoint.buffers[layout.buffer_name(0, t.name)]
                    local.append(addr)
                    remote.append(base + j * t.nbytes)
                    lengths.append(n)
            nbytes = sum(lengths)
            times: dict[str, list[float]] = {"elasticep": [], "raw_read": [], "raw_write": []}
            verified = False
            for rep in range(repeats + 1):  # the first round warms connections up, not counted
                order = ["elasticep", "raw_read", "raw_write"]
                if rep % 2:
                    order.reverse()
                for method in order:
                    weights.arena.zero_()
                    if method == "elasticep":
                        epoch += 1
                        started = time.perf_counter()
                        report = executor.run(moves, epoch=epoch, timeout=300)
                        seconds = time.perf_counter() - started
                        if report.bytes != nbytes:
                            raise RuntimeError(f"executor moved {report.bytes} bytes, expected {nbytes}")
                        if not verified:
                            if _crc(weights) != source_crc:
                                raise RuntimeError("destination bytes differ from the source after the elasticep run")
                            verified = True
                    elif method == "raw_read":
                        started = time.perf_counter()
                        ok = transport.wait(transport.submit_read(endpoint.peer, local, remote, lengths))
                        seconds = time.perf_counter() - started
                        if not ok:
                            raise RuntimeError("raw batch read failed")
                    else:
                        parent.send(("write", i, transport.peer, local))
                        ok, seconds = parent.recv()
                        if not ok:
                            raise RuntimeError("raw batch write failed")
                    if rep:
                        times[method].append(seconds)
            executor.close()
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append(
                {
                    "expert_mib": round(layout.expert_nbytes / (1 << 20), 3),
                    "count": count,
                    "bytes": nbytes,
                    **{f"{k}_s": round(v, 6) for k, v in med.items()},
                    **{f"{k}_gib_s": round(nbytes / v / GIB, 3) for k, v in med.items()},
                }
            )
        parent.send(("stop",))
        total = sum(r["bytes"] for r in rows)
        sums = {k: sum(r[f"{k}_s"] for r in rows) for k in ("elasticep", "raw_read", "raw_write")}
        result = {
            "bytes": total,
            "elasticep_gib_s": round(total / sums["elasticep"] / GIB, 3),
            "raw_mooncake_gib_s": round(total / sums["raw_write"] / GIB, 3),
            "raw_mooncake_read_gib_s": round(total / sums["raw_read"] / GIB, 3),
            "ratio": round(sums["raw_write"] / sums["elasticep"], 3),
            "ratio_read": round(sums["raw_read"] / sums["elasticep"], 3),
            "repeats": repeats,
            "host": host,
            "sizes": rows,
        }
        return result
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="elasticep bench transfer", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[4.0, 16.0, 44.0], help="MiB per expert (default 4 16 44)")
    ap.add_argument("--count", type=int, default=4, help="experts moved per size (default 4)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per method and size (default 5)")
    ap.add_argument("--host", default="127.0.0.1", help="address the transfer engines listen on")
    ap.add_argument("--json", metavar="PATH", help="write the result as JSON")
    args = ap.parse_args(argv)
    if args.count < 1 or args.repeats < 1 or any(s <= 0 for s in args.sizes):
        ap.error("--count, --repeats and --sizes must be positive")
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
    result = run(args.sizes, args.count, args.repeats, args.host)
    print(f"{'expert MiB':>10} {'count':>5} {'elasticep':>10} {'raw read':>10} {'raw write':>10}  (GiB/s, median)")
    for r in result["sizes"]:
        print(
            f"{r['expert_mib']:>10.2f} {r['count']:>5} {r['elasticep_gib_s']:>10.3f} "
            f"{r['raw_read_gib_s']:>10.3f} {r['raw_write_gib_s']:>10.3f}"
        )
    print(
        f"total {result['bytes'] / (1 << 20):.0f} MiB per run: elasticep {result['elasticep_gib_s']} GiB/s, "
        f"raw Mooncake write {result['raw_mooncake_gib_s']} GiB/s (ratio {result['ratio']}), "
        f"raw read {result['raw_mooncake_read_gib_s']} GiB/s (ratio {result['ratio_read']})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
