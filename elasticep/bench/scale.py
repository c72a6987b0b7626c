"""``elasticep bench scale``: membership at 16 to 4096 ranks, today's all-to-all beside the ring.

Two modes, labelled in every record. ``"real"`` (N up to ``--real-max``): every rank's CURVE
ZeroMQ bus, detector and membership service with real sockets, a real ``TCPStore`` and the real
clock, many ranks per process (:class:`elasticep.testing.scale.RealCluster`); a kill closes the
rank's sockets (no launcher report: the neighbours' disconnects are the only signal), a hang
leaves them open and silent; loss is dropped at the receiver. Also reported for real runs:
CPU per rank (% of one core, every thread of the harness processes, the store server not
counted), file descriptors, threads and ZeroMQ sockets per rank, and the most peers one rank
subscribes to. ``"simulated"``: every rank's pure membership core on a
virtual clock (:class:`elasticep.testing.scale.SimCluster`), 0.1 ms one-way delay plus up to
0.1 ms jitter, 0.5 ms per store operation; the launcher reports a kill to every rank. For each N and topology: the time until every survivor
installed a view without a killed rank (the launcher reports the exit) and without a hung one
(silence only), p50/p99 over the survivors and the trials; heartbeats and bytes each rank receives
per second in steady state; false evictions over a soak with 1 % loss; the time for N ranks
starting together (all *joining*) to be admitted. All-to-all is skipped above ``--all-max``
ranks (its ``N * (N - 1)`` deliveries would take the simulator too long) and with real sockets
above ``--real-all-max``; its steady-state rate is then only the formula
``(N - 1) * 1000 / heartbeat_interval_ms``, printed as such. In real mode the soak runs on the
same cluster after the kills and hangs (over the survivors), with 1 % loss from then on.

    elasticep bench scale --ranks 16 64 256 1024 [--json] [--soak-s 60] [--real-max 256] [--config FIELD=VALUE]
"""

from __future__ import annotations

import argparse
import json
import time

from elasticep.config import Config
from elasticep.membership.topology import Topology
from elasticep.testing.scale import RealCluster, SimCluster


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def measure(n: int, topology: str, *, trials: int = 2, soak_s: float = 60.0, seed: int = 1,
            overrides: dict | None = None) -> dict:
    config = Config.local(**{**(overrides or {}), "detection_topology": topology})
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
    victims = _victims(n, trials)
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


def _victims(n: int, trials: int) -> list[int]:
    return list(range(n // 3, n, max(1, n // (2 * trials + 1))))[: 2 * trials]


def measure_real(n: int, topology: str, *, trials: int = 2, soak_s: float = 60.0, procs: int | None = None,
                 steady_s: float = 3.0, seed: int = 1, overrides: dict | None = None, ranks_per_host: int = 0) -> dict:
    """One N and topology over real sockets (:class:`RealCluster`); the keys of :func:`measure`
    plus ``cpu_pct_per_rank``, ``fds_per_rank``, ``threads_per_rank``, ``sockets_per_rank``,
    ``peers_max``, ``procs``, ``soak_ranks``, ``ranks_per_host`` (0: every rank heartbeats over
    the bus; H: ranks ``r // H`` share a host board)."""
    config = Config.local(**{**(overrides or {}), "detection_topology": topology})
    procs = procs or max(1, min(8, n // 32))
    kill_ms: list[float] = []
    hang_ms: list[float] = []
    with RealCluster(n, config, procs=procs, seed=seed, ranks_per_host=ranks_per_host) as cluster:
        join_all_s = cluster.start()
        time.sleep(1.0)
        s0 = cluster.stats()
        time.sleep(steady_s)
        s1 = cluster.stats()
        dt = s1["time"] - s0["time"]
        victims = _victims(n, trials)
        for i, victim in enumerate(victims):
            if victim in cluster.stats()["removed"]:
                continue  # already out (a false eviction, counted below): nothing to measure
            t0 = (cluster.kill if i % 2 == 0 else cluster.hang)(victim)
            at = cluster.wait_excluded(victim, 10.0)
            (kill_ms if i % 2 == 0 else hang_ms).extend((t - t0) * 1e3 for t in at.values())
            time.sleep(0.5)
        cluster.set_loss(0.01)
        time.sleep(soak_s)
        s2 = cluster.stats()
    # any rank but the victims removed from some rank's view, during the trials or the soak
    false = set(s2["removed"]) - set(victims)
    return {
        "ranks": n, "mode": "real", "topology": topology,
        "kill_to_view_p50_ms": round(_pct(kill_ms, 0.5), 2), "kill_to_view_p99_ms": round(_pct(kill_ms, 0.99), 2),
        "hang_to_view_p50_ms": round(_pct(hang_ms, 0.5), 2), "hang_to_view_p99_ms": round(_pct(hang_ms, 0.99), 2),
        "msgs_per_rank_per_s": round((s1["frames"] - s0["frames"]) / s1["ranks"] / dt, 1),
        "bytes_per_rank_per_s": round((s1["bytes"] - s0["bytes"]) / s1["ranks"] / dt, 0),
        "false_evictions": len(false), "false_evicted": sorted(false),
        "changes": [s2["reasons"][e] for e in sorted(s2["reasons"]) if e > 1] if false else [],
        "soak_s": soak_s, "soak_ranks": s2["ranks"], "join_all_s": round(join_all_s, 3),
        "cpu_pct_per_rank": round(100 * (s1["cpu"] - s0["cpu"]) / dt / s1["ranks"], 3),
        "fds_per_rank": round(s1["fds"] / s1["ranks"], 1), "threads_per_rank": round(s1["threads"] / s1["ranks"], 2),
        "sockets_per_rank": round(s1["sockets"] / s1["ranks"], 1), "peers_max": s1["peers_max"], "procs": procs,
        "loop_lag_max_ms": round(s2["lag_max_ms"], 1), "loop_stalls_over_100ms": s2["lag_over_100ms"],
        "ranks_per_host": ranks_per_host,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elasticep bench scale", description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--soak-s", type=float, default=60.0, help="seconds of the 1 %% loss soak")
    parser.add_argument("--sim-soak-s", type=float, default=None,
                        help="virtual seconds of the simulated soak (default: --soak-s)")
    parser.add_argument("--trials", type=int, default=2, help="kills and hangs per N")
    parser.add_argument("--real-max", type=int, default=256,
                        help="largest N run with real sockets (0: simulate every N)")
    parser.add_argument("--real-all-max", type=int, default=16, help="largest N to run all-to-all at with real sockets")
    parser.add_argument("--all-max", type=int, default=64, help="largest N to simulate all-to-all at")
    parser.add_argument("--procs", type=int, default=None, help="processes of a real run (default N / 32, 1 to 8)")
    parser.add_argument("--config", action="append", default=[], metavar="FIELD=VALUE",
                        help="a Config.local() field for every run, both topologies (repeatable), "
                             "e.g. heartbeat_interval_ms=100")
    parser.add_argument("--ranks-per-host", type=int, nargs="+", default=[0], metavar="H",
                        help="real runs: ranks r // H share a host and heartbeat each other on its shared-memory "
                             "board (0: all over the bus); several values are run one after another")
    parser.add_argument("--json", action="store_true", help="print one JSON record per N, topology and mode")
    args = parser.parse_args(argv)
    from elasticep.bench.detect import _config, _overrides

    if any(h < 0 for h in args.ranks_per_host):
        parser.error(f"--ranks-per-host takes values >= 0, not {args.ranks_per_host}")
    overrides = _overrides(parser, args.config)
    overrides.pop("detection_topology", None)  # both are run
    base = _config(parser, "local", 1, overrides)  # an impossible config fails here
    sim_soak = args.soak_s if args.sim_soak_s is None else args.sim_soak_s
    records = []
    if not args.json:
        print(_HEADER, flush=True)
    for n in args.ranks:
        real = n <= args.real_max
        for topology in ("all", "ring"):
            if topology == "all" and n > (args.real_all_max if real else args.all_max):
                rate = Topology("all").messages_per_rank_per_s(n, base.heartbeat_interval_ms)
                records.append({"ranks": n, "mode": "formula", "topology": "all", "msgs_per_rank_per_s": rate})
            elif real:
                for h in args.ranks_per_host:
                    records.append(measure_real(n, topology, trials=args.trials, soak_s=args.soak_s, procs=args.procs,
                                                overrides=overrides, ranks_per_host=h))
                    records[-1]["config"] = overrides
                    if not args.json:
                        print(_row(records[-1]), flush=True)
                continue
            else:
                records.append(measure(n, topology, trials=args.trials, soak_s=sim_soak, overrides=overrides))
            records[-1]["config"] = overrides
            if not args.json:
                print(_row(records[-1]), flush=True)
    if args.json:
        for r in records:
            print(json.dumps(r))
        return 0
    by = {(r["ranks"], r["topology"]): r for r in records if not r.get("ranks_per_host")}
    for r in records:
        g = by.get((r["ranks"], r["topology"]))
        if r.get("ranks_per_host") and g and r["msgs_per_rank_per_s"]:
            print(f"N={r['ranks']} {r['topology']}: hosts of {r['ranks_per_host']} on shared-memory boards carry "
                  f"{g['msgs_per_rank_per_s'] / r['msgs_per_rank_per_s']:.1f}x fewer bus messages per rank, "
                  f"{g['cpu_pct_per_rank'] / max(r['cpu_pct_per_rank'], 1e-9):.2f}x less CPU (same run)")
    for n in args.ranks:
        a, g = by.get((n, "all")), by.get((n, "ring"))
        if a and g and g["msgs_per_rank_per_s"]:
            print(f"N={n}: all-to-all receives {a['msgs_per_rank_per_s'] / g['msgs_per_rank_per_s']:.1f}x "
                  f"the ring's messages per rank ({a['mode']} beside {g['mode']})")
    return 0


_HEADER = (f"{'N':>5} {'topology':>8} {'mode':>9} {'kill p50/p99 ms':>16} {'hang p50/p99 ms':>16} "
           f"{'msgs/rank/s':>11} {'B/rank/s':>9} {'false ev':>8} {'join all s':>10} "
           f"{'cpu %/rank':>10} {'fds/rank':>8} {'socks/rank':>10} {'peers max':>9}")


def _row(r: dict) -> str:
    if r["mode"] == "formula":
        return f"{r['ranks']:>5} {'all':>8} {'formula':>9} {'':>16} {'':>16} {r['msgs_per_rank_per_s']:>11.0f}"
    topology = r["topology"] + (f"/h{r['ranks_per_host']}" if r.get("ranks_per_host") else "")
    line = (f"{r['ranks']:>5} {topology:>8} {r['mode']:>9} "
            f"{r['kill_to_view_p50_ms']:>7.1f}/{r['kill_to_view_p99_ms']:<8.1f} "
            f"{r['hang_to_view_p50_ms']:>7.1f}/{r['hang_to_view_p99_ms']:<8.1f} "
            f"{r['msgs_per_rank_per_s']:>11.0f} {r['bytes_per_rank_per_s']:>9.0f} {r['false_evictions']:>8} "
            f"{r['join_all_s']:>10.3f}")
    if r["mode"] == "real":
        line += (f" {r['cpu_pct_per_rank']:>10.2f} {r['fds_per_rank']:>8.1f} {r['sockets_per_rank']:>10.1f} "
                 f"{r['peers_max']:>9}")
    return line


if __name__ == "__main__":
    raise SystemExit(main())
