"""``elasticep bench store``: the view store's commit latency and what its host's death costs, TCPStore beside etcd.

Both stores run in the same invocation on the same machine, each as it runs in a cluster: the
``TCPStore`` server in a process of its own (as the launcher hosts it), etcd as a 3-member
cluster (:class:`~elasticep.testing.etcd.EtcdCluster`: heartbeat 50 ms, election timeout
500 ms, data on ``/dev/shm``). The client is the view store the membership service uses
(:class:`~elasticep.membership.TCPStoreViewStore`, :class:`~elasticep.membership.EtcdViewStore`),
bounded by ``store_timeout_s`` of ``--profile`` (default ``auto``: the local profile's 2 s on
loopback, the cluster profile's 10 s with ``--hosts``, as for ranks across hosts,
:meth:`~elasticep.config.Config.for_hosts`). Figures:

* ``commit_p50_ms`` / ``commit_p99_ms``: one compare-and-set of a new epoch's view, issued one
  after another (``--commits`` of them);
* ``kill_to_commit_*_ms``: the store's process killed (etcd: the raft leader, with the client
  talking to it), then the next compare-and-set, from the SIGKILL to its commit (``--kills``
  trials; etcd restarts the member and waits for health between trials);
* for the TCPStore that next commit never happens: ``kill_outcome`` names the typed error and
  ``kill_to_error_ms`` how long it took (a killed process on a live host resets the connection,
  so the error comes at once);
* with ``--hosts``, ``host_down_*``: the link of the store's host (etcd: the leader's) taken
  down, a silent failure; etcd's next commit waits out one attempt at the silent member and an
  election, the TCPStore's ends in ``StoreUnavailable`` after ``store_timeout_s``.

``--hosts 3`` places the store on network namespaces (:class:`~elasticep.testing.hosts.HostNet`,
needs root): the TCPStore server on host 0, etcd member ``i`` on host ``i``, the client at the
bridge, so that every round trip crosses veth links.

    elasticep bench store [--commits 300] [--kills 5] [--hosts 3] [--profile auto] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from typing import Any, Sequence

__all__ = ["measure_etcd", "measure_tcpstore", "main"]

_TCPSTORE_SERVER = """
import sys, time
from torch.distributed import TCPStore
store = TCPStore(sys.argv[1], 0, is_master=True, wait_for_workers=False, use_libuv=True)
print(store.port, flush=True)
time.sleep(1e9)
"""


def _pct(values: Sequence[float], q: float) -> float | None:
    values = sorted(values)
    if not values:
        return None
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 2)


async def _commits(store, first_epoch: int, count: int) -> list[float]:
    from elasticep.membership.view import View

    lat = []
    for e in range(first_epoch, first_epoch + count):
        t = time.perf_counter()
        got = await store.compare_and_set(View(epoch=e, members=(0, 1, 2), leader=0))
        lat.append(time.perf_counter() - t)
        if got.epoch != e:
            raise RuntimeError(f"compare-and-set of epoch {e} returned epoch {got.epoch}")
    return lat


def measure_tcpstore(commits: int, *, timeout_s: float, net=None) -> dict[str, Any]:
    """The TCPStore view store: commit latency, then the server SIGKILLed and one more commit."""
    from elasticep.membership.store import StoreUnavailable, TCPStoreViewStore
    from elasticep.membership.view import View

    bind = net.hosts[0].addr if net is not None else "127.0.0.1"
    argv = [sys.executable, "-c", _TCPSTORE_SERVER, bind]
    server = (net.popen(net.hosts[0], argv, stdout=subprocess.PIPE, text=True) if net is not None
              else subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
    try:
        line = server.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"the TCPStore server did not start (said {line!r})")
        port = int(line)

        async def run() -> dict[str, Any]:
            prefix = f"bench/{uuid.uuid4().hex[:8]}"
            store = TCPStoreViewStore(bind, port, timeout_s=timeout_s, prefix=prefix)
            await _commits(store, 1, min(10, commits))  # connect, warm up
            lat = await _commits(store, 100, commits)
            down: dict[str, Any] = {}
            if net is not None:
                # The store's host goes silent (its link down): no reset, only a timeout.
                t_down = time.perf_counter()
                net.link_down(net.hosts[0])
                try:
                    await store.compare_and_set(View(epoch=99, members=(0, 1), leader=0))
                    down = {"outcome": "committed (unexpected)"}
                except StoreUnavailable:
                    down = {"outcome": "StoreUnavailable"}
                down["after"] = time.perf_counter() - t_down
                net.link_up(net.hosts[0])
                store = TCPStoreViewStore(bind, port, timeout_s=timeout_s, prefix=prefix)
                await _commits(store, 100 + commits + 1, 1)
            t_kill = time.perf_counter()
            os.kill(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
            try:
                await store.compare_and_set(View(epoch=100 + commits, members=(0, 1), leader=0))
                outcome, after = "committed (unexpected)", time.perf_counter() - t_kill
            except StoreUnavailable as exc:
                outcome, after = f"StoreUnavailable: {exc}", time.perf_counter() - t_kill
            return {"lat": lat, "outcome": outcome, "after": after, "down": down}

        got = asyncio.run(run())
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=10)
        server.stdout.close()
    lat = got["lat"]
    return {
        "store": "tcpstore", "where": "hosts" if net is not None else "loopback", "commits": len(lat),
        "commit_p50_ms": _ms(_pct(lat, 0.5)), "commit_p99_ms": _ms(_pct(lat, 0.99)),
        "kills": 1, "kill_to_commit_p50_ms": None, "kill_to_commit_p99_ms": None, "kill_to_commit_max_ms": None,
        "kill_outcome": got["outcome"].split(":")[0], "kill_to_error_ms": _ms(got["after"]),
        "host_down_outcome": got["down"].get("outcome"), "host_down_to_commit_ms": None,
        "host_down_to_error_ms": _ms(got["down"].get("after")), "store_timeout_s": timeout_s,
    }


def measure_etcd(commits: int, kills: int, *, timeout_s: float, net=None) -> dict[str, Any]:
    """A 3-member etcd cluster: commit latency, then ``kills`` times: kill the leader the client
    talks to, time the next commit, restart the member."""
    from elasticep.membership.etcd_store import EtcdViewStore
    from elasticep.testing.etcd import EtcdCluster

    kwargs: dict[str, Any] = {}
    if net is not None:
        kwargs = {"hosts": [h.addr for h in net.hosts[:3]], "exec_prefix": [h.exec_prefix for h in net.hosts[:3]]}
    with EtcdCluster(3, **kwargs) as etcd:
        etcd.wait_healthy(30)

        async def run() -> dict[str, Any]:
            store = EtcdViewStore(etcd.endpoints, timeout_s=timeout_s, prefix=f"bench/{uuid.uuid4().hex[:8]}")
            try:
                await _commits(store, 1, min(10, commits))
                lat = await _commits(store, 100, commits)
                after: list[float] = []
                epoch = 100 + commits
                failovers0 = store.failovers
                for _ in range(kills):
                    await asyncio.to_thread(etcd.wait_healthy, 30)
                    leader = await asyncio.to_thread(etcd.leader)
                    store._current = leader  # the worst case: the client talks to the leader
                    await _commits(store, epoch, 1)
                    epoch += 1
                    t_kill = time.perf_counter()
                    await asyncio.to_thread(etcd.kill, leader)
                    await _commits(store, epoch, 1)
                    after.append(time.perf_counter() - t_kill)
                    epoch += 1
                    await asyncio.to_thread(etcd.start, leader)
                down: list[float] = []
                for _ in range(kills if net is not None else 0):
                    # The leader's host goes silent (its link down): the client's attempt there
                    # times out (attempt_timeout_s) before it moves on.
                    await asyncio.to_thread(etcd.wait_healthy, 30)
                    leader = await asyncio.to_thread(etcd.leader)
                    store._current = leader
                    await _commits(store, epoch, 1)
                    epoch += 1
                    t_down = time.perf_counter()
                    net.link_down(net.hosts[leader])
                    await _commits(store, epoch, 1)
                    down.append(time.perf_counter() - t_down)
                    epoch += 1
                    net.link_up(net.hosts[leader])
                return {"lat": lat, "after": after, "down": down, "failovers": store.failovers - failovers0}
            finally:
                await store.close()

        got = asyncio.run(run())
    lat, after = got["lat"], got["after"]
    return {
        "store": "etcd", "where": "hosts" if net is not None else "loopback", "commits": len(lat),
        "commit_p50_ms": _ms(_pct(lat, 0.5)), "commit_p99_ms": _ms(_pct(lat, 0.99)),
        "kills": len(after), "kill_to_commit_p50_ms": _ms(_pct(after, 0.5)),
        "kill_to_commit_p99_ms": _ms(_pct(after, 0.99)), "kill_to_commit_max_ms": _ms(max(after) if after else None),
        "kill_outcome": "committed" if after else "not measured", "kill_to_error_ms": None,
        "host_down_outcome": "committed" if got["down"] else None,
        "host_down_to_commit_ms": _ms(_pct(got["down"], 0.99)), "host_down_to_error_ms": None,
        "failovers": got["failovers"], "election_ms": etcd.election_ms, "store_timeout_s": timeout_s,
    }


def main(argv: Sequence[str] | None = None) -> int:
    from elasticep.config import PROFILES, Config

    parser = argparse.ArgumentParser(prog="elasticep bench store", description=__doc__.split("\n")[0])
    parser.add_argument("--commits", type=int, default=300, help="compare-and-sets timed per store")
    parser.add_argument("--kills", type=int, default=5, help="etcd leader kills timed")
    parser.add_argument("--hosts", type=int, default=0,
                        help="place the stores on this many network-namespace hosts (3 or more; needs root)")
    parser.add_argument("--profile", choices=PROFILES, default="auto",
                        help="the Config profile whose store_timeout_s bounds each operation; auto (the default): "
                             "cluster with --hosts, local without")
    parser.add_argument("--json", action="store_true", help="one JSON record per store")
    args = parser.parse_args(argv)
    if args.commits < 1 or args.kills < 0:
        parser.error("--commits must be >= 1 and --kills >= 0")
    if args.hosts not in (0,) and args.hosts < 3:
        parser.error("--hosts needs 3 or more (one etcd member per host)")
    from elasticep.testing.etcd import etcd_available

    reason = etcd_available()
    if reason is not None:
        print(f"elasticep bench store: {reason}", file=sys.stderr)
        return 2
    timeout_s = Config.named(args.profile, hosts=args.hosts).store_timeout_s
    with ExitStack() as stack:
        net = None
        if args.hosts:
            from elasticep.testing.hosts import HostNet, netns_available

            why = netns_available()
            if why is not None:
                print(f"elasticep bench store --hosts: {why}", file=sys.stderr)
                return 2
            net = stack.enter_context(HostNet(args.hosts))
        records = [measure_tcpstore(args.commits, timeout_s=timeout_s, net=net),
                   measure_etcd(args.commits, args.kills, timeout_s=timeout_s, net=net)]
    if args.json:
        for r in records:
            print(json.dumps(r))
        return 0
    print(f"{'store':>9} {'where':>8} {'commits':>7} {'commit p50/p99 ms':>18} {'kill -> next commit':>26}")
    for r in records:
        if r["kill_to_commit_p50_ms"] is not None:
            kill = (f"{r['kill_to_commit_p50_ms']:.0f}/{r['kill_to_commit_p99_ms']:.0f} ms p50/p99 "
                    f"({r['kills']} kills)")
        else:
            kill = f"never: {r['kill_outcome']} after {r['kill_to_error_ms']:.0f} ms"
        print(f"{r['store']:>9} {r['where']:>8} {r['commits']:>7} "
              f"{r['commit_p50_ms']:>8.2f}/{r['commit_p99_ms']:<9.2f} {kill}")
        if r["host_down_outcome"] is not None:
            if r["host_down_to_commit_ms"] is not None:
                print(f"{'':>9} link of the store's host down -> next commit: {r['host_down_to_commit_ms']:.0f} ms "
                      f"(worst of {r['kills']})")
            else:
                print(f"{'':>9} link of the store's host down -> never: {r['host_down_outcome']} after "
                      f"{r['host_down_to_error_ms']:.0f} ms")
    t, e = records
    print(f"etcd commit p50 is {e['commit_p50_ms'] / t['commit_p50_ms']:.1f}x the TCPStore's; "
          f"after its store's death the TCPStore cluster commits nothing, etcd's next commit lands "
          f"{e['kill_to_commit_p99_ms']} ms (p99) after the leader's SIGKILL")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
