"""Membership worker processes over a real ZeroMQ bus with the view chain on a real 3-member etcd
cluster: the store's leader dies and the ranks keep agreeing views (no rank fences), where the
same death of a TCPStore is a loud, typed stop. Every survivor installs the identical sequence of
views (invariant 1); the chain in etcd is that sequence (invariant 2)."""

from __future__ import annotations

import asyncio
import time

import pytest

from elasticep.membership.etcd_store import EtcdViewStore
from elasticep.membership.local_cluster import LocalCluster

pytest.importorskip("aetcd", reason="the etcd extra (aetcd) is not installed")
pytestmark = [pytest.mark.multiproc]

WORLD = 4
START_TIMEOUT = 90.0


def _identical(cluster: LocalCluster, ranks: list[int]) -> list[tuple[int, tuple[int, ...]]]:
    seqs = cluster.sequences(ranks)
    first = seqs[ranks[0]]
    for r in ranks[1:]:
        assert seqs[r] == first, f"rank {r} installed {seqs[r]}, rank {ranks[0]} installed {first}"
    return first


def _chain(endpoints: list[str]) -> list[tuple[int, tuple[int, ...]]]:
    async def read() -> list[tuple[int, tuple[int, ...]]]:
        store = EtcdViewStore(endpoints, timeout_s=5.0)
        try:
            out, epoch = [], 1
            while (view := await store.read(epoch)) is not None:
                out.append((view.epoch, view.members))
                epoch += 1
            return out
        finally:
            await store.close()
    return asyncio.run(read())


def _fenced(cluster: LocalCluster) -> list[dict]:
    return [x for r in cluster.ranks for x in cluster.ranks[r].reports if x["kind"] == "fenced"]


@pytest.mark.timeout(180)
def test_etcd_leader_dies_then_a_rank_and_views_keep_being_agreed(etcd_cluster) -> None:
    config = {"view_store": "etcd", "etcd_endpoints": etcd_cluster.endpoints_csv()}
    with LocalCluster(WORLD, config=config) as cluster:
        cluster.wait_ready(START_TIMEOUT)
        cluster.wait_view(lambda v: v["epoch"] == 1, 10)
        first = etcd_cluster.leader()
        etcd_cluster.kill(first)
        time.sleep(0.2)  # the ranks' polls now meet the election
        cluster.kill(3)
        cluster.wait_view(lambda v: 3 not in v["members"], 10, ranks=[0, 1, 2])
        # The killed member rejoins; then the new leader dies too, and another rank.
        etcd_cluster.start(first)
        etcd_cluster.wait_healthy(30)
        etcd_cluster.kill(etcd_cluster.leader())
        cluster.kill(0)
        cluster.wait_view(lambda v: 0 not in v["members"], 10, ranks=[1, 2])
        time.sleep(3.0)  # longer than store_timeout_s (2 s): a rank cut off from etcd would fence now
        assert _fenced(cluster) == []
        seq = _identical(cluster, [1, 2])
        assert seq == [(1, (0, 1, 2, 3)), (2, (0, 1, 2)), (3, (1, 2))]
        assert _chain(etcd_cluster.endpoints) == seq


@pytest.mark.timeout(120)
def test_tcpstore_death_is_a_loud_stop() -> None:
    with LocalCluster(3) as cluster:
        cluster.wait_ready(START_TIMEOUT)
        cluster.wait_view(lambda v: v["epoch"] == 1, 10)
        cluster.store = None  # the launcher's store server goes away with its host
        fenced = [cluster.wait_report(r, "fenced", 15) for r in range(3)]
        assert all("view store unreachable" in f["reason"] for f in fenced), fenced
        assert all(len(cluster.installs(r)) == 1 for r in range(3))  # nothing installed without the store
