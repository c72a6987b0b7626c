"""``elasticep bench detect --hosts N --store S [S ...]``: detection across namespace hosts.

Each store in turn (``tcpstore``, ``etcd``, in the same run): ``N`` network-namespace hosts
(:class:`~elasticep.testing.hosts.HostNet`) with ``--ranks-per-host`` membership ranks each
(:class:`~elasticep.testing.hosts.HostCluster`: ZeroMQ with CURVE between the namespaces), and
for etcd one etcd member per host (:class:`~elasticep.testing.etcd.EtcdCluster`). Then
``--trials`` times each:

* **rank kill**: SIGKILL one rank (the launcher reports the exit, the certain signal), time to
  the last survivor's view without it; the rank is restarted and re-admitted.
* **host kill**: SIGKILL everything on one host at once (its ranks, unreported, and its etcd
  member), time to the last survivor's view without any of its ranks; the host's ranks and its
  etcd member are started again and re-admitted. The host's kernel lives on and closes the dead
  processes' connections, which the peers' buses see.
* **host silent**: the host's link goes down, then everything on it is killed: nothing more
  arrives from it (a host that lost power or its network), so only heartbeat silence tells;
  time from the link going down. The link comes back before the restart.
* **store-leader kill** (etcd only): SIGKILL etcd's leader and a rank at the same moment, time to
  the view without the rank (the view is committed through the newly elected leader); the
  member is started again. The embedded TCPStore has no replica: its death is a loud stop
  (see the control-plane docs), so its row is ``None``.

The ranks run at ``--profile`` (default ``auto``: the cluster profile, as for any ranks on more
than one host, :meth:`~elasticep.config.Config.for_hosts`), with ``--config`` overrides.

A rank removed from a view without being a victim is a false eviction; a rank that fenced itself
is counted in ``fences``. ``--json PATH`` writes one record per store with the keys ``store``,
``profile``, ``config`` (the ``--config`` overrides), ``hosts``, ``ranks``, ``trials``,
``rank_kill_to_view_p50_ms``, ``rank_kill_to_view_p99_ms``, ``host_kill_to_view_p50_ms``,
``host_kill_to_view_p99_ms``, ``host_silent_to_view_p50_ms``, ``host_silent_to_view_p99_ms``,
``store_leader_kill_to_view_p50_ms``, ``store_leader_kill_to_view_p99_ms``, ``false_evictions``,
``fences`` and the raw times.
"""

from __future__ import annotations

import random
import time
from typing import Any, Sequence

STORES = ("tcpstore", "etcd")


def _pct(values: list[float], q: float) -> float | None:
    """:func:`~elasticep.bench.detect._percentile`, rounded; ``None`` (JSON null) for no values."""
    from elasticep.bench.detect import _percentile

    return round(_percentile(values, q), 2) if values else None


def _floor(cluster, ranks: Sequence[int]) -> int:
    return max((cluster.installs(r)[-1]["epoch"] for r in ranks if cluster.installs(r)), default=0)


def _to_view(cluster, t0_ns: int, gone: set[int], survivors: list[int], timeout: float) -> float:
    """Ms from ``t0_ns`` to the last survivor's first view holding none of ``gone``."""
    floor = _floor(cluster, survivors)
    got = cluster.wait_view(lambda v: v["epoch"] > floor and not gone & set(v["members"]), timeout, ranks=survivors)
    return (max(v["wall_ns"] for v in got.values()) - t0_ns) / 1e6


def _readmit(cluster, ranks: Sequence[int], world: int, timeout: float) -> None:
    for r in ranks:
        cluster.restart(r)
    cluster.wait_view(lambda v: len(v["members"]) == world, timeout, ranks=list(range(world)))


def run_store(store: str, n_hosts: int, per_host: int, trials: int, seed: int, log=print,
              etcd_heartbeat_ms: int = 10, etcd_election_ms: int = 100, profile: str = "auto",
              overrides: dict[str, object] | None = None) -> dict[str, Any]:
    """One store's series on fresh hosts; returns its record. ``etcd_heartbeat_ms`` and
    ``etcd_election_ms`` are the members' raft timers (etcd's ``--heartbeat-interval`` and
    ``--election-timeout``): a dead leader is replaced about one election timeout later.
    ``profile`` and ``overrides``: the ranks' :class:`~elasticep.config.Config` profile
    (``"auto"``: the default for ranks on ``n_hosts`` hosts) and field overrides."""
    from contextlib import ExitStack

    from elasticep.testing.hosts import HostCluster, HostNet

    rng = random.Random(seed)
    world = n_hosts * per_host
    placement = [h for h in range(n_hosts) for _ in range(per_host)]
    rank_ms: list[float] = []
    host_ms: list[float] = []
    silent_ms: list[float] = []
    leader_ms: list[float] = []
    victims: set[int] = set()
    with ExitStack() as stack:
        net = stack.enter_context(HostNet(n_hosts))
        etcd = None
        config: dict[str, object] = dict(overrides or {})
        if store == "etcd":
            from elasticep.testing.etcd import EtcdCluster

            etcd = stack.enter_context(EtcdCluster(n_hosts, hosts=[h.addr for h in net.hosts],
                                                   exec_prefix=[h.exec_prefix for h in net.hosts],
                                                   heartbeat_ms=etcd_heartbeat_ms, election_ms=etcd_election_ms))
            etcd.wait_healthy(30)
            config.update(view_store="etcd", etcd_endpoints=etcd.endpoints_csv())
        cluster = stack.enter_context(HostCluster(net, placement, config=config, profile=profile))
        cluster.wait_ready(90)
        cluster.wait_view(lambda v: v["epoch"] >= 1, 30, ranks=list(range(world)))
        log(f"[{store}] {world} ranks on {n_hosts} hosts up, {cluster.profile} profile")
        for i in range(trials):
            victim = rng.randrange(world)
            victims.add(victim)
            survivors = [r for r in range(world) if r != victim]
            t0 = cluster.kill(victim)
            rank_ms.append(_to_view(cluster, t0, {victim}, survivors, 30))
            log(f"[{store}] rank kill {i + 1}/{trials}: rank {victim} -> view in {rank_ms[-1]:.1f} ms")
            _readmit(cluster, [victim], world, 90)
            time.sleep(0.3)
        first = rng.randrange(n_hosts)
        for series, times in (("host kill", host_ms), ("host silent", silent_ms)):
            for i in range(trials):
                h = (first + i) % n_hosts  # every host in turn
                host = net.hosts[h]
                dead = cluster.ranks_on(host)
                victims.update(dead)
                survivors = [r for r in range(world) if r not in dead]
                if series == "host silent":
                    t0 = net.link_down(host)  # nothing more leaves it, not even the closing of its sockets
                    cluster.kill_host(host)
                else:
                    t0 = cluster.kill_host(host)
                times.append(_to_view(cluster, t0, set(dead), survivors, 30))
                log(f"[{store}] {series} {i + 1}/{trials}: host {h} (ranks {dead}) -> view in {times[-1]:.1f} ms")
                if series == "host silent":
                    net.link_up(host)
                if etcd is not None:
                    etcd.start(h)
                    etcd.wait_healthy(30)
                _readmit(cluster, dead, world, 120)
                time.sleep(0.3)
        if etcd is not None:
            for i in range(trials):
                leader = etcd.leader()
                victim = rng.choice([r for r in range(world) if placement[r] != leader])
                victims.add(victim)
                survivors = [r for r in range(world) if r != victim]
                t0 = time.time_ns()
                etcd.kill(leader)
                cluster.kill(victim)
                leader_ms.append(_to_view(cluster, t0, {victim}, survivors, 30))
                log(f"[{store}] store-leader kill {i + 1}/{trials}: etcd member {leader} and rank {victim} -> "
                    f"view in {leader_ms[-1]:.1f} ms")
                etcd.start(leader)
                etcd.wait_healthy(30)
                _readmit(cluster, [victim], world, 90)
                time.sleep(0.3)
        false_evictions = 0
        fences = 0
        for rp in cluster._all:
            for x in rp.reports:
                if x["kind"] == "install":
                    false_evictions += len(set(range(world)) - set(x["members"]) - victims)
                elif x["kind"] == "fenced":
                    fences += 1
    return {
        "store": store,
        "profile": cluster.profile,
        "config": dict(overrides or {}),
        "hosts": n_hosts,
        "ranks": world,
        "trials": trials,
        "etcd_heartbeat_ms": etcd_heartbeat_ms if store == "etcd" else None,
        "etcd_election_ms": etcd_election_ms if store == "etcd" else None,
        "rank_kill_to_view_p50_ms": _pct(rank_ms, 50),
        "rank_kill_to_view_p99_ms": _pct(rank_ms, 99),
        "host_kill_to_view_p50_ms": _pct(host_ms, 50),
        "host_kill_to_view_p99_ms": _pct(host_ms, 99),
        "host_silent_to_view_p50_ms": _pct(silent_ms, 50),
        "host_silent_to_view_p99_ms": _pct(silent_ms, 99),
        "store_leader_kill_to_view_p50_ms": _pct(leader_ms, 50),
        "store_leader_kill_to_view_p99_ms": _pct(leader_ms, 99),
        "false_evictions": false_evictions,
        "fences": fences,
        "rank_kill_to_view_ms": [round(x, 2) for x in rank_ms],
        "host_kill_to_view_ms": [round(x, 2) for x in host_ms],
        "host_silent_to_view_ms": [round(x, 2) for x in silent_ms],
        "store_leader_kill_to_view_ms": [round(x, 2) for x in leader_ms],
    }


def run(stores: Sequence[str], n_hosts: int, per_host: int, trials: int, seed: int, log=print,
        **options: Any) -> list[dict[str, Any]]:
    """Every store's series in turn (the same seed, so the same victims); ``options`` as for
    :func:`run_store`."""
    return [run_store(s, n_hosts, per_host, trials, seed, log=log, **options) for s in stores]


def unavailable(stores: Sequence[str]) -> str | None:
    """Why this machine cannot run the series (no network namespaces, no etcd), or None."""
    from elasticep.testing.hosts import netns_available

    reason = netns_available()
    if reason is None and "etcd" in stores:
        from elasticep.testing.etcd import etcd_available

        reason = etcd_available()
        if reason is None:
            try:
                import aetcd  # noqa: F401
            except ImportError:
                reason = "the etcd extra (aetcd) is not installed"
    return reason
