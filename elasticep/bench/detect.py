"""``elasticep bench detect``: time from a rank's death or hang to every survivor's new view.

Starts ``--ranks`` real rank processes (``python -m elasticep.membership.worker``: ZeroMQ bus with
CURVE, ``TCPStore`` view store hosted by this process, which also plays the launcher). Then:

* **kill series**: ``--trials`` times, SIGKILL a random rank and measure from the signal to the
  moment the last survivor installed a view without it (install wall-clock times are reported by
  the ranks themselves); the rank is restarted and re-admitted before the next trial.
* **hang series**: the same with SIGSTOP (the process stays, silent); then it is killed and
  restarted.
* **soak** (``--soak-s``): a CPU hog beside the ranks and random SIGSTOP pauses shorter than the
  grace period; every rank removed from a view during the soak is a false eviction.

Baselines measured in the same run: how long the launcher takes to see a SIGKILLed child exit
(the floor for the certain signal), and the configured ``grace_ms`` (the floor for silence).

``--json PATH`` writes ``ranks``, ``trials``, ``kill_to_view_p50_ms``, ``kill_to_view_p99_ms``,
``hang_to_view_p50_ms``, ``hang_to_view_p99_ms``, ``false_evictions`` plus the baselines.

``--hosts N`` runs the series across network-namespace hosts instead, once per ``--store``
(:mod:`elasticep.bench.detect_hosts`), at the cluster profile unless ``--profile`` names another:
the default for ranks on more than one host (:meth:`~elasticep.config.Config.for_hosts`).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time

from elasticep.config import PROFILES, Config
from elasticep.errors import InvalidArgument


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100]; NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _epoch(cluster, rank: int) -> int:
    installs = cluster.installs(rank)
    return installs[-1]["epoch"] if installs else 0


def _readmit(cluster, rank: int, world: int, timeout: float) -> list[int]:
    """Restart ``rank`` and any other rank that is gone, fenced or stopped (as a launcher would),
    and wait until all ``world`` ranks share one view again. Returns the other ranks restarted."""
    others = [r for r in range(world) if r != rank and r not in cluster.live()]
    for r in [rank, *others]:
        cluster.restart(r)
    cluster.wait_view(lambda v: len(v["members"]) == world and v["epoch"] > 1, timeout, ranks=list(range(world)))
    return others


def _trial(cluster, rng: random.Random, world: int, how: str, timeout: float) -> tuple[float, int, str]:
    live = cluster.live()
    victim = rng.choice(live)
    survivors = [r for r in live if r != victim]
    floor = max(_epoch(cluster, r) for r in survivors)
    fenced_before = {r: _fences(cluster, r) for r in survivors}
    t0 = cluster.kill(victim) if how == "kill" else cluster.stop(victim)
    # Every rank still serving must install it; one that fenced itself meanwhile is reported.
    got = cluster.wait_view(lambda v: v["epoch"] > floor and victim not in v["members"], timeout)
    for r in survivors:
        for report in _fences(cluster, r)[len(fenced_before[r]):]:
            print(f"      rank {r} fenced during the trial: {report['reason']}", flush=True)
    ms = (max(v["wall_ns"] for r, v in got.items() if r in survivors) - t0) / 1e6
    return ms, victim, next(iter(got.values()))["reason"]


def _fences(cluster, rank: int) -> list[dict]:
    return [x for x in cluster.ranks[rank].reports if x["kind"] == "fenced"]


def _hog() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"])


def _soak(cluster, rng: random.Random, world: int, seconds: float, grace_ms: float) -> tuple[int, int, int]:
    """Returns (false evictions, fences, pauses)."""
    start_epochs = {r: _epoch(cluster, r) for r in range(world)}
    hog = _hog()
    pauses = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.2, 1.0))
            victim = rng.randrange(world)
            pause_s = rng.uniform(0.1, 0.66) * grace_ms / 1e3
            cluster.stop(victim)
            time.sleep(pause_s)
            cluster.cont(victim)
            pauses += 1
    finally:
        hog.send_signal(signal.SIGKILL)
        hog.wait()
    time.sleep(0.5)  # let a late eviction, if any, land before counting
    removed: set[tuple[int, int]] = set()
    fences = 0
    for r in range(world):
        for report in cluster.ranks[r].reports:
            if report["kind"] == "install" and report["epoch"] > start_epochs[r]:
                for gone in set(range(world)) - set(report["members"]):
                    removed.add((report["epoch"], gone))
            if report["kind"] == "fenced":
                fences += 1
    return len(removed), fences, pauses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elasticep bench detect", description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--soak-s", type=float, default=0.0)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-launcher", action="store_true",
                        help="do not report exits to the ranks (detect kills from the ranks' own signals)")
    parser.add_argument("--config", action="append", default=[], metavar="FIELD=VALUE",
                        help="Config overrides passed to every rank (of the --profile profile)")
    parser.add_argument("--profile", choices=PROFILES, default="auto",
                        help="the ranks' Config profile; auto (the default): cluster with --hosts, local without "
                             "(cluster needs --hosts)")
    parser.add_argument("--hosts", type=int, default=0,
                        help="run across this many network-namespace hosts instead (elasticep.bench.detect_hosts)")
    parser.add_argument("--ranks-per-host", type=int, default=2)
    parser.add_argument("--store", nargs="+", default=None, choices=("tcpstore", "etcd"),
                        help="with --hosts: the view stores to compare in the same run (default: both)")
    parser.add_argument("--etcd-heartbeat-ms", type=int, default=10, help="with --hosts: etcd's raft heartbeat")
    parser.add_argument("--etcd-election-ms", type=int, default=100, help="with --hosts: etcd's election timeout")
    args = parser.parse_args(argv)
    if args.hosts:
        return _main_hosts(parser, args)
    if args.store:
        parser.error("--store needs --hosts")
    if args.profile == "cluster":
        parser.error("--profile cluster needs --hosts (ranks on this host run at the local profile)")
    from elasticep.membership.local_cluster import LocalCluster

    overrides = _overrides(parser, args.config)
    config = _config(parser, "local", 0, overrides)
    rng = random.Random(args.seed)
    world = args.ranks
    kills: list[float] = []
    hangs: list[float] = []
    exit_seen: list[float] = []
    collateral: list[int] = []  # ranks that lost their place during a trial without being its victim
    t_start = time.monotonic()
    with LocalCluster(world, config=overrides, report_exits=not args.no_launcher) as cluster:
        cluster.wait_ready(timeout=60 + 15 * world)
        cluster.wait_view(lambda v: v["epoch"] >= 1, 30, ranks=list(range(world)))
        print(f"{world} ranks up in {time.monotonic() - t_start:.1f} s", flush=True)
        time.sleep(0.5)
        for i in range(args.trials):
            ms, victim, reason = _trial(cluster, rng, world, "kill", timeout=10)
            kills.append(ms)
            print(f"kill  {i + 1:3d}/{args.trials}: rank {victim} -> view in {ms:7.1f} ms  [{reason}]", flush=True)
            collateral += _readmit(cluster, victim, world, timeout=120)
            time.sleep(0.3)
        for i in range(args.trials):
            ms, victim, reason = _trial(cluster, rng, world, "hang", timeout=10)
            hangs.append(ms)
            print(f"hang  {i + 1:3d}/{args.trials}: rank {victim} -> view in {ms:7.1f} ms  [{reason}]", flush=True)
            collateral += _readmit(cluster, victim, world, timeout=120)
            time.sleep(0.3)
        # Baseline: how soon the launcher itself sees a SIGKILLed child exit (no membership).
        for _ in range(min(3, args.trials) or 1):
            victim = rng.choice(cluster.live())
            n_exits = len(cluster.exits)
            t0 = cluster.kill(victim)
            cluster.wait(lambda: len(cluster.exits) > n_exits, 10, "the exit")
            exit_seen.append((cluster.exits[-1][2] - t0) / 1e6)
            cluster.wait_view(lambda v, victim=victim: victim not in v["members"], 10,
                              ranks=[r for r in cluster.live() if r != victim])
            collateral += _readmit(cluster, victim, world, timeout=120)
        false_evictions = fences = pauses = 0
        if args.soak_s > 0:
            time.sleep(0.5)
            print(f"soak: {args.soak_s:g} s with a CPU hog and SIGSTOP pauses < {0.66 * config.grace_ms:.0f} ms",
                  flush=True)
            false_evictions, fences, pauses = _soak(cluster, rng, world, args.soak_s, config.grace_ms)
    result = {
        "ranks": world,
        "trials": args.trials,
        "kill_to_view_p50_ms": round(_percentile(kills, 50), 2),
        "kill_to_view_p99_ms": round(_percentile(kills, 99), 2),
        "hang_to_view_p50_ms": round(_percentile(hangs, 50), 2),
        "hang_to_view_p99_ms": round(_percentile(hangs, 99), 2),
        "false_evictions": false_evictions,
        "soak_s": args.soak_s,
        "soak_pauses": pauses,
        "soak_fences": fences,
        "trial_collateral_evictions": len(collateral),
        "baseline_exit_seen_p50_ms": round(_percentile(exit_seen, 50), 2),
        "baseline_grace_ms": config.grace_ms,
        "launcher_reports_exits": not args.no_launcher,
        "kill_to_view_ms": [round(x, 2) for x in kills],
        "hang_to_view_ms": [round(x, 2) for x in hangs],
    }
    print(f"kill -> view: p50 {result['kill_to_view_p50_ms']:.1f} ms, p99 {result['kill_to_view_p99_ms']:.1f} ms "
          f"(launcher sees the exit after {result['baseline_exit_seen_p50_ms']:.1f} ms p50)")
    print(f"hang -> view: p50 {result['hang_to_view_p50_ms']:.1f} ms, p99 {result['hang_to_view_p99_ms']:.1f} ms "
          f"(grace_ms {config.grace_ms:g})")
    if collateral:
        print(f"during the trials {len(collateral)} other rank(s) lost their place too: {collateral}")
    if args.soak_s > 0:
        print(f"soak: {false_evictions} false evictions, {fences} fences in {pauses} pauses over {args.soak_s:g} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _overrides(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, object]:
    """``FIELD=VALUE`` options as typed :class:`Config` overrides; unknown fields are refused."""
    out: dict[str, object] = {}
    for item in items:
        name, sep, value = item.partition("=")
        default = getattr(Config, name, None) if sep else None
        if default is None or name.startswith("_") or callable(default):
            parser.error(f"--config {item!r}: expected FIELD=VALUE with FIELD a Config field")
        try:
            out[name] = type(default)(value)
        except ValueError:
            parser.error(f"--config {item!r}: {value!r} is not a valid {type(default).__name__}")
    return out


def _config(parser: argparse.ArgumentParser, profile: str, hosts: int, overrides: dict[str, object]) -> Config:
    try:
        return Config.named(profile, hosts=hosts, **overrides)
    except InvalidArgument as exc:
        parser.error(f"--config: {exc}")


def _main_hosts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from elasticep.bench import detect_hosts

    stores = args.store or list(detect_hosts.STORES)
    if args.hosts < 3 or args.ranks_per_host < 1 or args.trials < 1:
        parser.error("--hosts needs at least 3 hosts, --ranks-per-host >= 1 and --trials >= 1")
    if not 0 < args.etcd_heartbeat_ms * 5 <= args.etcd_election_ms:
        parser.error("--etcd-election-ms must be at least 5 x --etcd-heartbeat-ms (and both > 0)")
    reason = detect_hosts.unavailable(stores)
    if reason is not None:
        print(f"elasticep bench detect: cannot run across hosts here: {reason}", file=sys.stderr)
        return 2
    overrides = _overrides(parser, args.config)
    _config(parser, args.profile, args.hosts, overrides)  # an impossible config fails here, not in every rank
    results = detect_hosts.run(stores, args.hosts, args.ranks_per_host, args.trials, args.seed,
                               log=lambda line: print(line, flush=True),
                               etcd_heartbeat_ms=args.etcd_heartbeat_ms, etcd_election_ms=args.etcd_election_ms,
                               profile=args.profile, overrides=overrides)
    for r in results:
        print(f"{r['store']:>8} ({r['profile']} profile): "
              f"rank kill p50/p99 {r['rank_kill_to_view_p50_ms']} / {r['rank_kill_to_view_p99_ms']} ms, "
              f"host kill {r['host_kill_to_view_p50_ms']} / {r['host_kill_to_view_p99_ms']} ms, "
              f"host silent {r['host_silent_to_view_p50_ms']} / {r['host_silent_to_view_p99_ms']} ms, "
              f"store-leader kill {r['store_leader_kill_to_view_p50_ms']} / {r['store_leader_kill_to_view_p99_ms']} ms, "
              f"{r['false_evictions']} false evictions, {r['fences']} fences")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
