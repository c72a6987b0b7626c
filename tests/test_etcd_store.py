"""The view chain on a real 3-member etcd cluster (``etcd_cluster`` fixture): compare-and-set by
transaction, linearizable reads, failover past a killed leader, a typed error when quorum is
lost, the watch; then membership worker processes over a real ZeroMQ bus agreeing views while
etcd's leader is killed (invariants 1 and 2 on etcd)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import pytest

from elasticep import metrics
from elasticep.config import Config
from elasticep.membership import CorruptView, StoreUnavailable, TCPStoreViewStore, View
from elasticep.membership.etcd_store import EtcdViewStore, parse_endpoints
from elasticep.membership.store import open_view_store

pytest.importorskip("aetcd", reason="the etcd extra (aetcd) is not installed")


def _etcdctl(cluster, *args: str) -> str:
    env = dict(os.environ, ETCDCTL_API="3")
    out = subprocess.run(["etcdctl", "--endpoints", cluster.endpoints_csv(), *args], env=env,
                         capture_output=True, text=True, timeout=20, check=True)
    return out.stdout


def test_endpoints_and_config_choose_the_store() -> None:
    assert parse_endpoints("http://10.0.0.1:2379, 10.0.0.2:2380/") == ["10.0.0.1:2379", "10.0.0.2:2380"]
    for bad in ("", "10.0.0.1", "host:port"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)
    with pytest.raises(ValueError, match="etcd_endpoints"):
        Config.local(view_store="etcd")
    with pytest.raises(ValueError, match="view_store"):
        Config.local(view_store="zookeeper")
    assert isinstance(open_view_store(Config.local(), tcpstore="127.0.0.1:1"), TCPStoreViewStore)
    with pytest.raises(ValueError):
        open_view_store(Config.local())
    config = Config.cluster(view_store="etcd", etcd_endpoints="127.0.0.1:1,127.0.0.1:2")
    store = open_view_store(config)
    assert isinstance(store, EtcdViewStore)
    assert store.endpoints == ["127.0.0.1:1", "127.0.0.1:2"] and store.timeout_s == config.store_timeout_s


def test_config_view_store_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("ELASTICEP_VIEW_STORE", "etcd")
    monkeypatch.setenv("ELASTICEP_ETCD_ENDPOINTS", "127.0.0.1:2379")
    config = Config.local()
    assert config.view_store == "etcd" and config.etcd_endpoints == "127.0.0.1:2379"


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_rival_proposals_for_one_epoch_cannot_both_win(etcd_cluster) -> None:
    eps = etcd_cluster.endpoints
    # Four ranks' stores, each talking first to a different member.
    stores = [EtcdViewStore(eps[i % 3:] + eps[:i % 3], timeout_s=5.0) for i in range(4)]
    try:
        for epoch in range(1, 9):
            proposals = [View.of(epoch, [r for r in range(4) if r != (epoch + i) % 4] or [0], proposer=i)
                         for i in range(4)]
            results = await asyncio.gather(*(s.compare_and_set(p, rank=i)
                                             for i, (s, p) in enumerate(zip(stores, proposals))))
            assert len(set(results)) == 1, results
            assert results[0] in proposals
            fresh = EtcdViewStore(eps, timeout_s=5.0)
            try:
                assert await fresh.read(epoch) == results[0]
            finally:
                await fresh.close()
        assert sum(s.conflicts for s in stores) == 8 * 3
        assert await stores[0].head() == 8
        # The chain is plain JSON under the prefix, one key per epoch, readable with etcdctl.
        keys = _etcdctl(etcd_cluster, "get", "--prefix", "--keys-only", "elasticep/view/").split()
        assert keys == [f"elasticep/view/{e:012d}" for e in range(1, 9)]
    finally:
        for s in stores:
            await s.close()


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_read_absent_and_corrupt_values(etcd_cluster) -> None:
    store = EtcdViewStore(etcd_cluster.endpoints)
    try:
        assert await store.read(1) is None
        assert await store.head() == 0
        _etcdctl(etcd_cluster, "put", store.key(2).decode(), "not a view")
        before = metrics.sample("elasticep_view_store_corrupt_total")
        with pytest.raises(CorruptView):
            await store.read(2)
        assert metrics.sample("elasticep_view_store_corrupt_total") == before + 1
        with pytest.raises(CorruptView):
            await store.compare_and_set(View.of(2, (0, 1)))
        # A valid view under another epoch's key is refused too.
        _etcdctl(etcd_cluster, "put", store.key(3).decode(), '{"epoch":4,"members":[0],"leader":0}')
        with pytest.raises(CorruptView, match="holds epoch 4"):
            await store.read(3)
    finally:
        await store.close()


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_the_chain_survives_the_death_of_the_leader(etcd_cluster) -> None:
    leader = etcd_cluster.leader()
    eps = etcd_cluster.endpoints
    # Talk to the leader first, so its death forces a failover.
    store = EtcdViewStore([eps[leader]] + [e for i, e in enumerate(eps) if i != leader], timeout_s=4.0)
    try:
        assert await store.compare_and_set(View.of(1, (0, 1, 2))) == View.of(1, (0, 1, 2))
        before = metrics.sample("elasticep_view_store_failovers_total")
        etcd_cluster.kill(leader)
        t0 = time.monotonic()
        view = View.of(2, (0, 1), proposer=0, reason="rank 2 exited")
        assert await store.compare_and_set(view) == view
        elapsed = time.monotonic() - t0
        assert elapsed < store.timeout_s
        assert store.failovers >= 1
        assert metrics.sample("elasticep_view_store_failovers_total") >= before + 1
        assert etcd_cluster.leader() != leader
        # A second client, not warmed up, reads the whole chain from the survivors.
        other = EtcdViewStore(eps, timeout_s=4.0)
        try:
            assert [await other.read(e) for e in (1, 2, 3)] == [View.of(1, (0, 1, 2)), view, None]
        finally:
            await other.close()
        # The killed member comes back with its data directory and catches up.
        etcd_cluster.start(leader)
        etcd_cluster.wait_healthy(30)
        alone = EtcdViewStore([eps[leader]], timeout_s=5.0)
        try:
            assert await alone.read(2) == view
        finally:
            await alone.close()
    finally:
        await store.close()


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_lost_quorum_is_a_typed_error_within_the_bound(etcd_cluster) -> None:
    store = EtcdViewStore(etcd_cluster.endpoints, timeout_s=1.5)
    try:
        await store.compare_and_set(View.of(1, (0, 1)))
        etcd_cluster.kill(0)
        etcd_cluster.kill(1)
        # The survivor alone is a minority: it can neither commit nor serve a linearizable read.
        for op in (store.compare_and_set(View.of(2, (0,))), store.read(2)):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="every endpoint"):
                await op
            assert time.monotonic() - t0 < 1.5 + 0.5
        # Views already seen are immutable and still answered from the cache.
        assert await store.read(1) == View.of(1, (0, 1))
    finally:
        await store.close()


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_watch_delivers_the_chain_in_order_across_a_leader_death(etcd_cluster) -> None:
    writer = EtcdViewStore(etcd_cluster.endpoints, timeout_s=4.0)
    watcher = EtcdViewStore(etcd_cluster.endpoints, timeout_s=4.0)
    try:
        await writer.compare_and_set(View.of(1, (0, 1, 2, 3)))
        seen: list[int] = []
        done = asyncio.Event()

        async def follow() -> None:
            async for view in watcher.watch():
                seen.append(view.epoch)
                if view.epoch == 4:
                    done.set()
                    return

        task = asyncio.create_task(follow())
        await writer.compare_and_set(View.of(2, (0, 1, 2)))
        etcd_cluster.kill(etcd_cluster.leader())
        await writer.compare_and_set(View.of(3, (0, 1)))
        await writer.compare_and_set(View.of(4, (0,)))
        await asyncio.wait_for(done.wait(), 10)
        await task
        assert seen == [1, 2, 3, 4]
        # The watch filled the watcher's cache: reading the chain costs no round trip.
        ops = watcher.operations
        assert [v.epoch for v in [await watcher.read(e) for e in (1, 2, 3, 4)]] == [1, 2, 3, 4]
        assert watcher.operations == ops
    finally:
        await writer.close()
        await watcher.close()


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_hung_leader_is_raced_past_and_copies_commit_once(etcd_cluster) -> None:
    with pytest.raises(ValueError):
        EtcdViewStore(etcd_cluster.endpoints, retry_interval_s=0)
    leader = etcd_cluster.leader()
    store = EtcdViewStore(etcd_cluster.endpoints, timeout_s=5.0, prefix="hung")
    try:
        await store.compare_and_set(View.of(1, (0, 1, 2)))
        store._current = leader
        etcd_cluster.stop(leader)  # SIGSTOP: its sockets stay open and it answers nothing
        try:
            committed = await store.compare_and_set(View.of(2, (0, 1)))
        finally:
            etcd_cluster.cont(leader)
        assert committed == View.of(2, (0, 1))
        assert store.endpoint != etcd_cluster.members[leader].endpoint and store.failovers >= 1
        # Copies of the transaction were sent to several members; one key was created, once.
        out = _etcdctl(etcd_cluster, "get", "hung/view/000000000002", "-w", "json")
        kv = json.loads(out)["kvs"][0]
        assert kv["version"] == 1 and kv["create_revision"] == kv["mod_revision"]
    finally:
        await store.close()
