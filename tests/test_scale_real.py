"""Membership at scale over real sockets: the transport's peer filter, the ring hooked into the
membership service end to end, and ``elasticep bench scale`` in real mode at a small size."""

from __future__ import annotations

import asyncio
import json

import pytest

from elasticep.bus import ClusterKeys, EventBus, ZmqTransport
from elasticep.bus.zmq_transport import SharedContext
from elasticep.cli import main as cli_main
from elasticep.config import Config
from elasticep.events import Heartbeat
from elasticep.testing.scale import RealCluster


async def _until(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_peer_filter_opens_only_wanted_subscriptions(tcp_store) -> None:
    keys = ClusterKeys.generate(4)
    shared = SharedContext(keys)
    wanted = {1}
    t0 = ZmqTransport(0, keys.for_rank(0), tcp_store, poll_interval_s=0.02)
    assert t0.set_peer_filter(lambda r: r in wanted)
    events: list[tuple[int, str]] = []
    t0.add_listener(lambda rank, kind: events.append((rank, kind)))
    buses = [EventBus(t0, 0)] + [
        EventBus(ZmqTransport(r, keys.for_rank(r), tcp_store, poll_interval_s=0.02, context=shared), r)
        for r in (1, 2)]
    for bus in buses:
        await bus.start()
    try:
        await buses[0].transport.refresh()
        await _until(lambda: t0.connected() == {1})
        assert t0.peers() == {1} and t0.socket_count() == 4  # PUB + monitor, one SUB + monitor
        assert t0._unread == {2}  # rank 2's record was not even read
        for _ in range(20):  # rank 0 hears rank 1 and never rank 2
            buses[1].publish_nowait(Heartbeat(rank=1, incarnation=0))
            buses[2].publish_nowait(Heartbeat(rank=2, incarnation=0))
            await asyncio.sleep(0.01)
        await buses[0].wait_heard_from([1], 5.0)
        assert 2 not in buses[0].heard_from()

        wanted.clear()
        wanted.update({2, 3})  # the member set changed: rank 1 dropped, rank 2 and a later rank 3 wanted
        t0.apply_peer_filter()
        assert t0.peers() == set() and t0.filtered_out == 1
        await _until(lambda: t0.connected() == {2})
        late = EventBus(ZmqTransport(3, keys.for_rank(3), tcp_store, poll_interval_s=0.02, context=shared), 3)
        await late.start()
        buses.append(late)
        await _until(lambda: t0.connected() == {2, 3})
        for _ in range(20):
            buses[2].publish_nowait(Heartbeat(rank=2, incarnation=0))
            late.publish_nowait(Heartbeat(rank=3, incarnation=0))
            await asyncio.sleep(0.01)
        await buses[0].wait_heard_from([2, 3], 5.0)
        assert (1, "disconnected") not in events  # dropping a peer is not a peer failure

        wanted.add(1)  # back again: connected from the record kept, no store read
        t0.apply_peer_filter()
        await _until(lambda: t0.connected() == {1, 2, 3})
    finally:
        for bus in buses:
            await bus.close()
        shared.close()


def test_monitor_transport_refuses_a_filter(tcp_store) -> None:
    keys = ClusterKeys.generate(2)
    monitor = ZmqTransport.monitor(keys.for_monitor(), tcp_store)
    with pytest.raises(ValueError, match="monitor"):
        monitor.set_peer_filter(lambda r: r == 0)


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_ring_over_real_sockets_keeps_per_rank_cost_bounded() -> None:
    """16 ranks in two processes with the ring: each holds its 4 neighbours' subscriptions, not
    15; a killed and a hung rank leave every survivor's view, and the ring closes over them."""
    with RealCluster(16, Config.local(detection_topology="ring"), procs=2) as cluster:
        cluster.start(limit_s=60.0)
        stats = cluster.stats()
        assert stats["peers_max"] == 4 and stats["sockets"] == 16 * (2 + 2 * 4)
        assert cluster.coverage() == {}  # every watched neighbour's stream is connected
        t0 = cluster.kill(7)
        assert min(cluster.wait_excluded(7, 15.0).values()) >= t0
        cluster.hang(8)
        cluster.wait_excluded(8, 15.0)
        stats = cluster.stats()
        assert stats["ranks"] == 14 and stats["fenced"] == 0 and stats["removed"] == [7, 8]
        # the survivors next to the gap now hear 5 and 6 / 9 and 10 (the ring closed), plus the
        # two removed ranks' old endpoints (sponsors of a rank that may rejoin): never more than 4 + 2
        assert stats["peers_max"] <= 6


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_bench_scale_real_tiny_json(capsys) -> None:
    assert cli_main(["bench", "scale", "--ranks", "12", "--real-max", "12", "--real-all-max", "12",
                     "--soak-s", "2", "--trials", "1", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["ranks"], r["topology"], r["mode"]) for r in records] == [(12, "all", "real"), (12, "ring", "real")]
    all_, ring = records
    for r in records:
        for key in ("kill_to_view_p99_ms", "hang_to_view_p99_ms", "msgs_per_rank_per_s", "false_evictions",
                    "join_all_s", "cpu_pct_per_rank", "fds_per_rank", "sockets_per_rank"):
            assert key in r
        assert r["false_evictions"] == 0
    assert all_["peers_max"] == 11 and ring["peers_max"] <= 6
    assert ring["sockets_per_rank"] < all_["sockets_per_rank"]
    # a rank receives from its 4 watched neighbours only (rates are not timed: only the ratio)
    assert ring["msgs_per_rank_per_s"] < 0.6 * all_["msgs_per_rank_per_s"]


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_ring_with_hosts_on_boards_sends_fewer_bus_messages_and_still_evicts(capsys) -> None:
    """16 ranks as two hosts of 8 in two processes: ring neighbours on the same host heartbeat on
    its board, so the bus carries fewer messages per rank than without hosts (same run); a
    killed and a hung rank still leave every survivor's view, with no false eviction."""
    assert cli_main(["bench", "scale", "--ranks", "16", "--real-max", "16", "--real-all-max", "0",
                     "--ranks-per-host", "0", "8", "--soak-s", "2", "--trials", "1", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    real = [r for r in records if r["mode"] == "real"]
    assert [(r["topology"], r["ranks_per_host"]) for r in real] == [("ring", 0), ("ring", 8)]
    plain, hosts = real
    for r in real:
        assert r["false_evictions"] == 0
        assert r["kill_to_view_p99_ms"] > 0 and r["hang_to_view_p99_ms"] > 0  # both victims left every view
    # within a host of 8, ranks 2 to 5 have all 4 watchers on their board: half the ranks send nothing
    assert hosts["msgs_per_rank_per_s"] < 0.75 * plain["msgs_per_rank_per_s"]
