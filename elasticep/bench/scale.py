"""``elasticep bench scale``: membership at 16 to 4096 ranks, today's all-to-all beside the ring.

Simulated mode only (labelled ``mode: "simulated"``): every rank's pure membership core on a
virtual clock (:class:`elasticep.testing.scale.SimCluster`), 0.1 ms one-way delay plus up to
0.1 ms jitter, 0.5 ms per store operation. For each N and topology: the time until every survivor
installed a view without a killed rank (the launcher reports the exit) and without a hung one
(silence only), p50/p99 over the survivors and the trials; heartbeats and bytes each rank receives
per second in steady state; false evictions over a soak with 1 % loss; the time for N ranks
starting together (all *joining*) to be admitted. All-to-all is skipped above ``--all-max``
ranks (its ``N * (N - 1)`` deliveries would take the simulator too long); its steady-state rate
is then only the formula ``(N - 1) * 1000 / heartbeat_interval_ms``, printed as such.

    elasticep bench scale --ranks 16 64 256 1024 [--json] [--soak-s 60]
"""

from __future__ import annotations

import argparse
import json

from elasticep.config import Config
from elasticep.membership.topology import Topology
from elasticep.testing.scale import SimCluster


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def measure(n: int, topology: str, *, trials: int = 2, soak_s: float = 60.0, seed: int = 1) -> dict:
    config = Config.local(detection_topology=topology)
    kill_ms: list[float] = []
    hang_ms: list[float] = []
    sim = SimCluster(n, config, seed=seed)
    if not sim.run_until(lambda: sim.all_members(n), limit_s=10.0):
        raise RuntimeError(f"{n} ranks were not all admitted within 10 s")
    join_all_s = sim.now
    sim.run_for(0.3)
    d0, b0, t0 = sim.delivered, sim.delivered_bytes, sim.now
    sim.run_for(1.0)
    msgs = (sim.delivered - d0) / n / (sim.now - t0)
    bytes_ = (sim.delivered_bytes - b0) / n / (sim.now - t0)
    victims = list(range(n // 3, n, max(1, n // (2 * trials + 1))))[: 2 * trials]
    for i, victim in enumerate(victims):
        start = sim.now
        (sim.kill if i % 2 == 0 else sim.hang)(victim)
        if not sim.run_until(lambda: sim.all_exclude(victim), limit_s=5.0):
            raise RuntimeError(f"rank {victim} was not removed everywhere within 5 s")
        lat = [(at - start) * 1e3 for at in sim.installed_without(victim).values()]
        (kill_ms if i % 2 == 0 else hang_ms).extend(lat)
        sim.run_for(0.3)
    soak = SimCluster(n, config, seed=seed + 1, loss=0.01)
    soak.run_until(lambda: soak.all_members(n), limit_s=10.0)
    soak.run_for(soak_s)
    return {
        "ranks": n, "mode": "simulated", "topology": topology,
        "kill_to_view_p50_ms": round(_pct(kill_ms, 0.5), 2), "kill_to_view_p99_ms": round(_pct(kill_ms, 0.99), 2),
        "hang_to_view_p50_ms": round(_pct(hang_ms, 0.5), 2), "hang_to_view_p99_ms": round(_pct(hang_ms, 0.99), 2),
        "msgs_per_rank_per_s": round(msgs, 1), "bytes_per_rank_per_s": round(bytes_, 0),
        "false_evictions": len(soak.evicted()), "soak_s": soak_s, "join_all_s": round(join_all_s, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elasticep bench scale", description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--soak-s", type=float, default=60.0, help="virtual seconds of the 1 %% loss soak")
    parser.add_argument("--trials", type=int, default=2, help="kills and hangs per N")
    parser.add_argument("--all-max", type=int, default=64, help="largest N to simulate all-to-all at")
    parser.add_argument("--json", action="store_true", help="print one JSON record per N and topology")
    args = parser.parse_args(argv)
    records = []
    for n in args.ranks:
        for topology in ("all", "ring"):
            if topology == "all" and n > args.all_max:
                rate = Topology("all").messages_per_rank_per_s(n, Config.local().heartbeat_interval_ms)
                records.append({"ranks": n, "mode": "formula", "topology": "all", "msgs_per_rank_per_s": rate})
                continue
            records.append(measure(n, topology, trials=args.trials, soak_s=args.soak_s))
    if args.json:
        for r in records:
            print(json.dumps(r))
        return 0
    print(f"{'N':>5} {'topology':>8} {'mode':>9} {'kill p50/p99 ms':>16} {'hang p50/p99 ms':>16} "
          f"{'msgs/rank/s':>11} {'B/rank/s':>9} {'false ev':>8} {'join all s':>10}")
    for r in records:
        if r["mode"] == "formula":
            print(f"{r['ranks']:>5} {'all':>8} {'formula':>9} {'':>16} {'':>16} {r['msgs_per_rank_per_s']:>11.0f}")
            continue
        print(f"{r['ranks']:>5} {r['topology']:>8} {r['mode']:>9} "
              f"{r['kill_to_view_p50_ms']:>7.1f}/{r['kill_to_view_p99_ms']:<8.1f} "
              f"{r['hang_to_view_p50_ms']:>7.1f}/{r['hang_to_view_p99_ms']:<8.1f} "
              f"{r['msgs_per_rank_per_s']:>11.0f} {r['bytes_per_rank_per_s']:>9.0f} {r['false_evictions']:>8} "
              f"{r['join_all_s']:>10.4f}")
    by = {(r["ranks"], r["topology"]): r for r in records}
    for n in args.ranks:
        a, g = by.get((n, "all")), by.get((n, "ring"))
        if a and g and g["msgs_per_rank_per_s"]:
            print(f"N={n}: all-to-all receives {a['msgs_per_rank_per_s'] / g['msgs_per_rank_per_s']:.1f}x "
                  f"the ring's messages per rank ({a['mode']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
