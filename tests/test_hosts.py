"""Hosts as network namespaces (:mod:`elasticep.testing.hosts`): the faults act on real links and
real packets, etcd members and membership ranks live on separate hosts, and a whole host dies at
once. Needs root, ``ip`` and ``nft`` (skips saying which is missing); the cluster tests need etcd."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from elasticep.testing.hosts import HostCluster, HostNet, NetnsError, netns_available

REASON = netns_available()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=REASON or "")]

_UDP_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(float(sys.argv[3]))
n = 0
try:
    while True:
        s.recv(64)
        n += 1
except socket.timeout:
    pass
print(n)
"""

_UDP_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
    if i % 20 == 19:
        time.sleep(0.001)
"""

_TCP_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(b"hi")
    c.close()
"""

_TCP_CLIENT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(s.recv(2).decode())
except OSError as exc:
    print(type(exc).__name__)
"""


def _udp_received(net: HostNet, sender, receiver, count: int, port: int) -> int:
    sink = net.popen(receiver, [sys.executable, "-c", _UDP_SINK, receiver.addr, str(port), "1.0"],
                     stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    net.run(sender, [sys.executable, "-c", _UDP_SEND, receiver.addr, str(port), str(count)], timeout=30)
    out, _ = sink.communicate(timeout=30)
    return int(out.strip())


def _tcp(net: HostNet, client, server_addr: str, port: int, timeout: float = 1.0) -> str:
    return net.run(client, [sys.executable, "-c", _TCP_CLIENT, server_addr, str(port), str(timeout)],
                   timeout=30).stdout.strip()


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.timeout(120)
def test_links_drops_partitions_and_host_kill_act_on_real_packets() -> None:
    with HostNet(3) as net:
        h0, h1, h2 = net.hosts
        server = net.popen(h1, [sys.executable, "-c", _TCP_SERVER, h1.addr, "9000"])
        deadline = time.monotonic() + 10
        while _tcp(net, h0, h1.addr, 9000) != "hi":
            assert time.monotonic() < deadline, "the server on host 1 never answered"
            time.sleep(0.1)
        # Each host has its own loopback: host 1's service is not on host 0's 127.0.0.1.
        assert _tcp(net, h0, "127.0.0.1", 9000) == "ConnectionRefusedError"
        # The gateway (the caller's namespace) reaches every host.
        here = subprocess.run([sys.executable, "-c", _TCP_CLIENT, h1.addr, "9000", "1.0"], capture_output=True,
                              text=True, timeout=30)
        assert here.stdout.strip() == "hi"

        net.link_down(h1)  # silence, not a refusal: the connect times out
        assert _tcp(net, h0, h1.addr, 9000) == "TimeoutError"
        net.link_up(h1)
        deadline = time.monotonic() + 10
        while _tcp(net, h0, h1.addr, 9000) != "hi":
            assert time.monotonic() < deadline, "host 1 unreachable after its link came back"

        # Asymmetric partition: host 1 receives nothing from host 2, but host 2 hears host 1.
        net.drop(h1, direction="in", peer=h2)
        assert _udp_received(net, h2, h1, 200, 9100) == 0
        assert _udp_received(net, h1, h2, 200, 9101) == 200
        assert _tcp(net, h0, h1.addr, 9000) == "hi"  # other peers are unaffected
        net.clear(h1)
        assert _udp_received(net, h2, h1, 200, 9102) == 200

        # 5 % loss on what host 2 sends: binomial(3000, 0.05) is 150 +- 12 (the rule's own
        # counter; a loaded receiver may lose more from its socket buffer).
        net.drop(h2, percent=5, direction="out")
        got = _udp_received(net, h2, h0, 3000, 9103)
        dropped = net.dropped(h2)
        assert 80 < dropped < 220, dropped
        # the rule also drops the host's other packets (ARP, neighbour discovery) and counts
        # them: a few of the dropped may not be this test's datagrams
        assert got <= 3000 - dropped + 10, (got, dropped)
        net.clear(h2)
        assert net.dropped(h2) == 0

        # A whole host dies at once.
        assert server.pid in net.pids(h1)
        net.kill_host(h1)
        assert server.wait(timeout=10) == -9
        assert net.pids(h1) == []
        assert _tcp(net, h0, h1.addr, 9000) == "ConnectionRefusedError"
        names = [h.name for h in net.hosts]
        assert all(n in _namespaces() for n in names)
    assert not any(n in _namespaces() for n in names)


@pytest.mark.timeout(60)
def test_namespaces_are_removed_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with HostNet(2) as net:
            names = [h.name for h in net.hosts]
            sleeper = net.popen(net.hosts[0], ["sleep", "60"])
            raise RuntimeError("boom")
    assert sleeper.poll() is not None
    listing = _namespaces()
    assert not any(n in listing for n in names)
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert f"ep{net.tag}" not in links


_ORPHAN = """
import sys, time
from elasticep.testing.hosts import HostNet
net = HostNet(2)
print(net.tag, *[h.name for h in net.hosts], flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_namespaces_of_a_killed_process_are_removed_by_the_next_hostnet() -> None:
    orphan = subprocess.Popen([sys.executable, "-c", _ORPHAN], stdout=subprocess.PIPE, text=True)
    try:
        tag, *names = orphan.stdout.readline().split()
        assert names and all(n in _namespaces() for n in names)
    finally:
        orphan.kill()  # SIGKILL: no atexit, nothing cleaned up
        orphan.wait(timeout=10)
        orphan.stdout.close()
    assert all(n in _namespaces() for n in names)
    with HostNet(1):
        listing = _namespaces()
        assert not any(n in listing for n in names)
    assert f"ep{tag}" not in subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout


@pytest.mark.timeout(60)
def test_rate_limit_puts_a_token_bucket_on_the_link_and_clear_removes_it() -> None:
    with HostNet(2) as net:
        a, b = net.hosts
        net.rate_limit(a, rate="2mbit")
        _udp_received(net, a, b, 100, 9200)
        shown = net.run(a, ["tc", "-s", "qdisc", "show", "dev", "eth0"]).stdout
        assert "tbf" in shown and "rate 2Mbit" in shown, shown
        sent = int(shown.split("Sent ")[1].split()[0])
        assert sent >= 100 * 29  # every datagram (1 byte of payload, 28 of headers) went through it
        net.clear(a)
        assert "tbf" not in net.run(a, ["tc", "qdisc", "show", "dev", "eth0"]).stdout


_TCP_TIMED = """
import socket, sys, time
t = time.monotonic()
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
data = s.recv(2)
print(data.decode(), round((time.monotonic() - t) * 1e3, 1))
"""


@pytest.mark.timeout(60)
def test_delay_holds_a_hosts_tcp_both_ways() -> None:
    with HostNet(2) as net:
        a, b = net.hosts
        for host in (a, b):
            net.popen(host, [sys.executable, "-c", _TCP_SERVER, host.addr, "9300"])
        time.sleep(1.0)

        def fetch(client, server) -> float:
            word, ms = net.run(client, [sys.executable, "-c", _TCP_TIMED, server.addr, "9300"], timeout=30).stdout.split()
            assert word == "hi"
            return float(ms)

        net.delay(a, 80)
        assert fetch(a, b) >= 80  # a's outgoing connection: the answer is held on its way back
        assert fetch(b, a) >= 80  # a connection a accepts: its answer is held on its way out
        net.clear(a)
        assert "elasticep_delay" not in net.run(a, ["nft", "list", "tables"]).stdout
        assert fetch(a, b) >= 0  # still connects once the relay is gone
        with pytest.raises(ValueError):
            net.delay(a, 0)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        HostNet(0)
    with HostNet(1) as net:
        with pytest.raises(ValueError):
            net.drop(net.hosts[0], direction="sideways")
        with pytest.raises(ValueError):
            net.drop(net.hosts[0], percent=0)
        with pytest.raises(NetnsError):
            net.run(net.hosts[0], ["ip", "link", "set", "nosuchlink", "down"])
        with pytest.raises(ValueError):
            HostCluster(net, [0, 1])


# --- etcd and membership across hosts -----------------------------------------------------------


def _etcd_on(net: HostNet):
    from elasticep.testing.etcd import EtcdCluster, etcd_available

    reason = etcd_available()
    if reason is not None:
        pytest.skip(reason)
    pytest.importorskip("aetcd", reason="the etcd extra (aetcd) is not installed")
    etcd = EtcdCluster(len(net.hosts), hosts=[h.addr for h in net.hosts],
                       exec_prefix=[h.exec_prefix for h in net.hosts])
    etcd.wait_healthy(30)
    return etcd


def _one_member_set_per_epoch(cluster: HostCluster) -> dict[int, tuple[int, ...]]:
    """Every install report of every rank, dead or alive: each epoch has one member set."""
    seen: dict[int, set[tuple[int, ...]]] = {}
    for rp in cluster._all:
        for x in rp.reports:
            if x["kind"] == "install":
                seen.setdefault(x["epoch"], set()).add(tuple(x["members"]))
    assert all(len(s) == 1 for s in seen.values()), seen
    return {e: next(iter(s)) for e, s in sorted(seen.items())}


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_etcd_commits_through_a_leader_whose_link_is_down() -> None:
    from elasticep.membership.etcd_store import EtcdViewStore
    from elasticep.membership.view import View

    with HostNet(3) as net, _etcd_on(net) as etcd:
        leader = etcd.leader()

        async def commit() -> tuple[View, float, int]:
            store = EtcdViewStore(etcd.endpoints, timeout_s=5.0, prefix="linkdown")
            try:
                await store.compare_and_set(View(epoch=1, members=(0, 1, 2), leader=0))
                store._current = leader  # its next attempt goes to the cut-off leader first
                net.link_down(net.hosts[leader])
                t0 = time.monotonic()
                view = await store.compare_and_set(View(epoch=2, members=(0, 1), leader=0))
                return view, time.monotonic() - t0, store.failovers
            finally:
                await store.close()

        view, seconds, failovers = asyncio.run(commit())
        assert view.members == (0, 1)
        assert failovers >= 1 and seconds < 5.0
        assert etcd.leader() != leader  # the majority elected another


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_a_host_dies_with_its_ranks_and_its_etcd_member() -> None:
    with HostNet(3) as net, _etcd_on(net) as etcd:
        leader = etcd.leader()  # the host that dies carries etcd's leader
        config = {"view_store": "etcd", "etcd_endpoints": etcd.endpoints_csv()}
        # the local profile (store_timeout_s 2 s) keeps the wait below short; these links lose nothing
        with HostCluster(net, [0, 0, 1, 1, 2, 2], config=config, profile="local") as cluster:
            cluster.wait_ready(90)
            cluster.wait_view(lambda v: v["epoch"] == 1, 10)
            dead = cluster.ranks_on(net.hosts[leader])
            cluster.kill_host(net.hosts[leader])
            survivors = [r for r in range(6) if r not in dead]
            cluster.wait_view(lambda v: not set(dead) & set(v["members"]), 30, ranks=survivors)
            time.sleep(3.0)  # past store_timeout_s: a rank cut off from etcd would fence by now
            assert [x for r in survivors for x in cluster.ranks[r].reports if x["kind"] == "fenced"] == []
            seqs = cluster.sequences(survivors)
            first = seqs[survivors[0]]
            assert all(s == first for s in seqs.values()), seqs  # the same views everywhere
            assert first[0] == (1, tuple(range(6))) and first[-1][1] == tuple(survivors), first
            # The host's two ranks may leave in one view or in two (each suspicion is
            # corroborated on its own); every epoch still has one member set.
            assert len(first) in (2, 3), first
            _one_member_set_per_epoch(cluster)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_link_down_fences_the_minority_and_it_rejoins_when_the_link_returns() -> None:
    with HostNet(3) as net, _etcd_on(net) as etcd:
        config = {"view_store": "etcd", "etcd_endpoints": etcd.endpoints_csv()}
        # the local profile: the fence bound below is its store_timeout_s; these links lose nothing
        with HostCluster(net, [0, 0, 1, 1, 2, 2], config=config, profile="local") as cluster:
            cluster.wait_ready(90)
            cluster.wait_view(lambda v: v["epoch"] == 1, 10)
            cut = net.hosts[2]
            minority = cluster.ranks_on(cut)
            majority = [r for r in range(6) if r not in minority]
            t_down = net.link_down(cut)
            for r in minority:
                fenced = cluster.wait_report(r, "fenced", 20)
                # store_timeout_s (2 s) after the last answered poll, plus one poll period
                assert (fenced["wall_ns"] - t_down) / 1e9 < 2.0 + 1.5, fenced
            cluster.wait_view(lambda v: not set(minority) & set(v["members"]), 30, ranks=majority)
            net.link_up(cut)
            for r in minority:
                cluster.restart(r)  # the normal join path
            cluster.wait_view(lambda v: set(minority) <= set(v["members"]), 60, ranks=majority + minority)
            views = _one_member_set_per_epoch(cluster)
            assert views[1] == tuple(range(6))
            assert any(set(m) == set(majority) for m in views.values())


@pytest.mark.multiproc
@pytest.mark.timeout(180)
@pytest.mark.parametrize("direction", ["in", "out"])
def test_asymmetric_partition_ends_the_same_on_every_survivor(direction: str) -> None:
    """Host 2's one rank hears its peers but they do not hear it ("out"), or the reverse ("in");
    the store (etcd at the bridge) stays reachable from everyone. Either way rank 4 ends outside
    the view on every survivor: "out", evicted on its silence; "in", it hears nobody, fences
    itself as isolated after ``store_timeout_s`` and is evicted on its ``Fenced`` event. No
    epoch has two member sets."""
    from elasticep.testing.etcd import EtcdCluster, etcd_available

    reason = etcd_available()
    if reason is not None:
        pytest.skip(reason)
    pytest.importorskip("aetcd", reason="the etcd extra (aetcd) is not installed")
    with HostNet(3) as net, EtcdCluster(3, hosts=[net.gateway] * 3) as etcd:
        etcd.wait_healthy(30)
        config = {"view_store": "etcd", "etcd_endpoints": etcd.endpoints_csv()}
        # the local profile: the 8 s of partition below outlast its store_timeout_s (2 s) several times
        with HostCluster(net, [0, 0, 1, 1, 2], config=config, profile="local") as cluster:
            cluster.wait_ready(90)
            cluster.wait_view(lambda v: v["epoch"] == 1, 10)
            h0, h1, h2 = net.hosts
            for peer in (h0, h1):
                net.drop(h2, direction=direction, peer=peer)
            time.sleep(8.0)  # detection, corroboration and a store round, several times over
            net.clear(h2)
            time.sleep(2.0)
            views = _one_member_set_per_epoch(cluster)
            survivors = cluster.live()
            assert set(range(4)) <= set(survivors), survivors  # the majority side serves on
            last = {r: cluster.sequences([r])[r][-1] for r in survivors}
            assert len(set(last.values())) == 1, last
            epoch, members = next(iter(last.values()))
            assert 4 not in members and 4 not in survivors, (members, survivors)
            assert views[epoch] == members
            fenced = [x for x in cluster.ranks[4].reports if x["kind"] == "fenced"]
            assert fenced and ("isolated" if direction == "in" else "outside committed") in str(fenced), fenced
            print(f"direction={direction}: views {views}, survivors {survivors}")


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_five_percent_loss_on_a_host_evicts_no_one_and_a_kill_there_is_still_seen() -> None:
    """Host 2's TCP held 25 ms each way (about 50 ms more round trip, by the delaying relay)
    and 5 % of its packets lost both ways (nftables on its link) for 60 s at the default
    configuration, which for ranks across hosts is the cluster profile (``Config.for_hosts``):
    no view changes; then one of its ranks is killed and every survivor installs a view without
    it. (The local profile, whose heartbeat silence bound is about TCP's 200 ms minimum
    retransmission timeout, evicted host 2's ranks within seconds under the same faults.)"""
    with HostNet(3) as net:
        lossy = net.hosts[2]
        net.delay(lossy, 25)  # before anything connects: the relay takes new connections only
        with _etcd_on(net) as etcd:
            config = {"view_store": "etcd", "etcd_endpoints": etcd.endpoints_csv()}
            with HostCluster(net, [0, 0, 1, 1, 2, 2], config=config) as cluster:
                assert cluster.profile == "cluster"
                cluster.wait_ready(90)
                cluster.wait_view(lambda v: v["epoch"] == 1, 10)
                net.drop(lossy, percent=5, direction="both")
                time.sleep(60.0)
                assert net.dropped(lossy) > 0
                seqs = cluster.sequences(list(range(6)))
                assert all(s == [(1, tuple(range(6)))] for s in seqs.values()), seqs
                assert [x for rp in cluster._all for x in rp.reports if x["kind"] == "fenced"] == []
                cluster.kill(5)
                cluster.wait_view(lambda v: 5 not in v["members"], 30, ranks=[0, 1, 2, 3, 4])
                _one_member_set_per_epoch(cluster)


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_bench_detect_across_hosts_on_etcd(tmp_path) -> None:
    from elasticep.bench.detect_hosts import unavailable

    reason = unavailable(["etcd"])
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path / "detect.json"
    proc = subprocess.run([sys.executable, "-m", "elasticep", "bench", "detect", "--hosts", "3", "--ranks-per-host", "1",
                           "--trials", "1", "--store", "etcd", "--json", str(out)],
                          capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    (record,) = json.loads(out.read_text())
    assert record["store"] == "etcd" and record["hosts"] == 3 and record["ranks"] == 3
    for key in ("rank_kill_to_view_p99_ms", "host_kill_to_view_p99_ms", "host_silent_to_view_p99_ms",
                "store_leader_kill_to_view_p99_ms"):
        assert record[key] is not None and 0 < record[key] < 30_000, (key, record)
    assert record["false_evictions"] == 0 and record["fences"] == 0, record
