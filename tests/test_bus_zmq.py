"""The ZeroMQ transport: real processes, real CURVE sockets, a real TCPStore rendezvous.

One live cluster of three rank processes serves several checks: events flow between all of them in
order, a publisher without the cluster key is never heard, a subscriber without it is refused, a
member forging another rank's sender is refused (``sender_mismatch``), and ``elasticep monitor``
prints the live events with the read-only key.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from elasticep import metrics
from elasticep.bus import (
    ClusterKeys,
    EventBus,
    StoreRendezvous,
    ZmqTransport,
)
from elasticep.bus.transport import TransportClosed
from elasticep.bus.zmq_transport import KIND_EVENTS
from elasticep.events import Codec, Heartbeat, SequenceGap, Suspicion, envelope

BURST = 100
LIVE = 3
# The ranks run on different event loops: the bus must behave the same on both, and interoperate.
LOOPS = ("uvloop", "asyncio", "uvloop")
INTRUDER_RANK = 3  # has a public key in the cluster, but nobody here holds its secret key
FORGER_RANK = 4  # a real member that lies about who it is

WORKER = r'''
import asyncio, json, sys, time
from elasticep.bus import ClusterKeys, EventBus, ZmqTransport, connect_store
from elasticep.bus.loop import run
from elasticep.events import Heartbeat, Suspicion

rank, live, addr, burst, loop = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
peers = set(range(live)) - {rank}


async def main():
    store = connect_store(addr)
    check = lambda key: asyncio.to_thread(store.check, [key])
    transport = ZmqTransport(rank, ClusterKeys.from_env(), store, poll_interval_s=0.02)
    got = {p: [] for p in peers}
    ever_connected = set()
    transport.add_listener(lambda peer, kind: kind == "connected" and ever_connected.add(peer))
    async with EventBus(transport, rank) as bus:
        sub = bus.subscribe(Suspicion)

        async def collect():
            async for env in sub:
                if env.sender in got:
                    got[env.sender].append(env.event.phi)

        collector = asyncio.ensure_future(collect())
        deadline = time.monotonic() + 40
        step = 0
        # Probe until every peer has been heard, then meet the others at a store barrier.
        while not (bus.heard_from() >= peers and await check(f"t/ready/{rank}")):
            if bus.heard_from() >= peers:
                await asyncio.to_thread(store.set, f"t/ready/{rank}", "1")
            await bus.publish(Heartbeat(rank=rank, step=step))
            step += 1
            await asyncio.sleep(0.01)
            assert time.monotonic() < deadline, f"rank {rank} heard only {bus.heard_from()}"
        while not all([await check(f"t/ready/{r}") for r in range(live)]):
            await bus.publish(Heartbeat(rank=rank, step=step))
            step += 1
            await asyncio.sleep(0.01)
            assert time.monotonic() < deadline, "barrier"
        for i in range(1, burst + 1):
            await bus.publish(Suspicion(observer=rank, suspect=(rank + 1) % live, source="test", phi=float(i)))
        # Keep the cluster alive (and publishing) for the monitor and the attacks until told to stop.
        while not await check("t/stop"):
            await bus.publish(Heartbeat(rank=rank, step=step))
            step += 1
            await asyncio.sleep(0.02)
            assert time.monotonic() < deadline, "stop"
        collector.cancel()
        stats = bus.statistics()
        result = {
            "got": {str(p): v for p, v in got.items()},
            "gaps": stats.gaps,
            "refused": stats.refused,
            "heard_from": sorted(bus.heard_from()),
            "peers": sorted(transport.peers()),
            "connected": sorted(ever_connected),
            "handshake_failures": transport.handshake_failures,
            "rendezvous_refused": dict(transport.rendezvous.refused),
            "loop": type(asyncio.get_running_loop()).__module__,
        }
    await asyncio.to_thread(store.set, f"t/result/{rank}", json.dumps(result))

run(main(), kind=loop)
'''


def _wait(store, keys: list[str], procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not store.check(keys):
        for p in procs:
            assert p.poll() is None, f"rank process exited early with {p.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {keys}"
        time.sleep(0.02)


async def _intruder_publisher(store, stop_at: float) -> int:
    """A process without any cluster secret key registers as rank 3 and publishes. Returns frames sent."""
    ctx = zmq.Context()
    public, secret = zmq.curve_keypair()
    pub = ctx.socket(zmq.PUB)
    pub.curve_server = True
    pub.curve_publickey, pub.curve_secretkey = public, secret
    pub.linger = 0
    pub.bind("tcp://127.0.0.1:*")
    StoreRendezvous(store).register(INTRUDER_RANK, pub.last_endpoint.decode(), 1)
    codec, seq = Codec(), 0
    try:
        while time.monotonic() < stop_at:
            seq += 1
            env = codec.encode(envelope(Heartbeat(rank=INTRUDER_RANK), sender=INTRUDER_RANK, epoch=0, seq=seq))
            pub.send(KIND_EVENTS + struct.pack("<QI", 1, len(env)) + env)
            await asyncio.sleep(0.01)
    finally:
        pub.close()
        ctx.term()
    return seq


async def _intruder_subscriber(keys: ClusterKeys, store, stop_at: float) -> int:
    """A subscriber with its own key connects to rank 0's PUB. Returns messages it received."""
    ctx = zmq.Context()
    public, secret = zmq.curve_keypair()
    sub = ctx.socket(zmq.SUB)
    sub.curve_serverkey = keys.public[0]
    sub.curve_publickey, sub.curve_secretkey = public, secret
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    reg = StoreRendezvous(store).lookup(0)
    assert reg is not None
    sub.connect(reg.endpoint)
    received = 0
    try:
        while time.monotonic() < stop_at:
            try:
                sub.recv(zmq.NOBLOCK)
                received += 1
            except zmq.Again:
                await asyncio.sleep(0.01)
    finally:
        sub.close()
        ctx.term()
    return received


async def _forger(keys: ClusterKeys, store, stop_at: float) -> int:
    """Rank 4 holds its real key but sends envelopes that claim to come from rank 0."""
    transport = ZmqTransport(FORGER_RANK, keys.for_rank(FORGER_RANK), store)
    codec, seq = Codec(), 0
    await transport.start()
    try:
        while time.monotonic() < stop_at:
            seq += 1
            transport.send(codec.encode(envelope(Heartbeat(rank=0), sender=0, epoch=0, seq=10_000 + seq)))
            await asyncio.sleep(0.01)
    finally:
        await transport.close()
    return seq


async def _attacks(keys: ClusterKeys, store) -> tuple[int, int, int]:
    stop_at = time.monotonic() + 1.5
    return await asyncio.gather(
        _intruder_publisher(store, stop_at), _intruder_subscriber(keys, store, stop_at), _forger(keys, store, stop_at)
    )


@pytest.mark.multiproc
@pytest.mark.timeout(90)
def test_three_processes_over_curve_with_intruders_and_monitor(tcp_store, tmp_path: Path):
    keys = ClusterKeys.generate(5)
    addr = f"127.0.0.1:{tcp_store.port}"
    worker = tmp_path / "rank.py"
    worker.write_text(WORKER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(r), str(LIVE), addr, str(BURST), LOOPS[r]], env=keys.for_rank(r).to_env()
        )
        for r in range(LIVE)
    ]
    monitor = None
    try:
        _wait(tcp_store, [f"t/ready/{r}" for r in range(LIVE)], procs, 60)
        monitor_keys = keys.for_monitor().save(tmp_path / "monitor.json")
        assert oct(os.stat(monitor_keys).st_mode & 0o777) == "0o600"
        monitor = subprocess.Popen(
            [sys.executable, "-m", "elasticep", "monitor", "--store", addr, "--keys", str(monitor_keys),
             "--types", "heartbeat", "--count", "6", "--seconds", "30"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        sent_by_intruder, intruder_received, forged = asyncio.run(_attacks(keys, tcp_store))
        out, err = monitor.communicate(timeout=40)
        tcp_store.set("t/stop", "1")
        _wait(tcp_store, [f"t/result/{r}" for r in range(LIVE)], procs, 30)
        for p in procs:
            assert p.wait(timeout=20) == 0
    finally:
        for p in [*procs, *([monitor] if monitor else [])]:
            if p.poll() is None:
                p.kill()
                p.wait()

    results = {r: json.loads(tcp_store.get(f"t/result/{r}")) for r in range(LIVE)}
    for r, res in results.items():
        assert res["loop"].split(".")[0] == LOOPS[r]
        # Every peer's burst arrived complete and in order, with no gap.
        for p in set(range(LIVE)) - {r}:
            assert res["got"][str(p)] == [float(i) for i in range(1, BURST + 1)], (r, p)
        assert res["gaps"] == 0
        assert set(range(LIVE)) - {r} <= set(res["connected"])
        # The intruder's registration carries no signature of rank 3: refused and counted, never
        # connected to, nothing of it ever accepted ...
        assert INTRUDER_RANK not in res["peers"] and res["rendezvous_refused"].get("unsigned", 0) >= 1
        assert INTRUDER_RANK not in res["connected"] and INTRUDER_RANK not in res["heard_from"]
        # ... the forger's (a real member's, validly signed) was tried and connected, but its
        # frames were refused for claiming another sender.
        assert FORGER_RANK in res["peers"]
        assert FORGER_RANK in res["connected"] and FORGER_RANK not in res["heard_from"]
        assert res["refused"].get("sender_mismatch", 0) >= 1
    assert sent_by_intruder > 10 and forged > 10
    assert intruder_received == 0  # rank 0's ZAP handler refused the unknown subscriber key
    assert results[0]["handshake_failures"] >= 1

    lines = out.strip().splitlines()
    assert len(lines) == 6, (out, err)
    for line in lines:
        assert "heartbeat" in line and " r" in line
    assert {line.split()[1] for line in lines} <= {"r0", "r1", "r2"}


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_gap_when_subscriber_is_paused_past_high_water_mark(tcp_store):
    """A ``block`` subscription nobody reads stops the bus reading; ZeroMQ fills to its
    high-water mark and drops; when the reader resumes the bus reports the hole."""
    keys = ClusterKeys.generate(2)
    hwm = 10
    pub_bus = EventBus(ZmqTransport(0, keys.for_rank(0), tcp_store, endpoint="ipc", hwm=hwm), 0)
    sub_bus = EventBus(ZmqTransport(1, keys.for_rank(1), tcp_store, endpoint="ipc", hwm=hwm), 1)
    gaps_before = metrics.sample("elasticep_bus_gaps_total", {"sender": "0"})
    async with pub_bus, sub_bus:
        await sub_bus.transport.refresh()
        sub = sub_bus.subscribe(Heartbeat, SequenceGap, maxsize=4, overflow="block")
        while not sub_bus.heard_from():
            await pub_bus.publish(Heartbeat(rank=0, step=-1))
            await asyncio.sleep(0.01)
        while sub.statistics().queued:
            sub.receive_nowait()
        # The reader pauses: nothing reads ``sub``. One event per loop iteration, so each is its
        # own ZeroMQ message and the high-water mark (in messages) is what bounds the queues.
        sent = 5_000
        for step in range(sent):
            await pub_bus.publish(Heartbeat(rank=0, step=step))
            await asyncio.sleep(0)
        assert sub.statistics().queued == 4
        # The reader resumes and catches up with whatever survived.
        got = []
        while True:
            try:
                got.append(await asyncio.wait_for(sub.receive(), 0.5))
            except asyncio.TimeoutError:
                break
        final = await pub_bus.publish(Heartbeat(rank=0, step=sent))
        while not got or got[-1].seq != final.seq:
            got.append(await asyncio.wait_for(sub.receive(), 5))
    steps = [e.event.step for e in got if isinstance(e.event, Heartbeat)]
    gaps = [e.event for e in got if isinstance(e.event, SequenceGap)]
    assert steps == sorted(steps) and steps[-1] == sent
    assert gaps, "the bus must report the events ZeroMQ dropped"
    lost = sum(g.got - g.expected for g in gaps)
    assert lost == sent + 1 - len([s for s in steps if s >= 0])
    assert lost > 0 and sub_bus.statistics().lost == lost
    assert metrics.sample("elasticep_bus_gaps_total", {"sender": "0"}) - gaps_before == lost
    assert sub.statistics().dropped == 0  # ``block`` itself never drops; the transport did


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_restarted_rank_is_picked_up_with_a_new_incarnation(tcp_store):
    keys = ClusterKeys.generate(2)
    listener = EventBus(ZmqTransport(1, keys.for_rank(1), tcp_store, poll_interval_s=0.02), 1)
    async with listener:
        sub = listener.subscribe(Heartbeat)
        first = EventBus(ZmqTransport(0, keys.for_rank(0), tcp_store), 0)
        async with first:
            while 0 not in listener.heard_from():
                await first.publish(Heartbeat(rank=0, incarnation=0))
                await asyncio.sleep(0.01)
            for _ in range(5):
                await first.publish(Heartbeat(rank=0, incarnation=0))
        # The same rank comes back in a new process (new endpoint, new incarnation): the
        # watcher reconnects and the sequence starts over at 1 without being taken for duplicates.
        second = EventBus(ZmqTransport(0, keys.for_rank(0), tcp_store), 0)
        async with second:
            assert second.transport.incarnation > first.transport.incarnation
            deadline = time.monotonic() + 10
            while listener.statistics().senders[0][0] != second.transport.incarnation:
                await second.publish(Heartbeat(rank=0, incarnation=1))
                await asyncio.sleep(0.02)
                assert time.monotonic() < deadline
        events = []
        while sub.statistics().queued:
            events.append(sub.receive_nowait())
    old = [e for e in events if e.event.incarnation == 0]
    fresh = [e for e in events if e.event.incarnation == 1]
    # The new process's numbering restarted below where the old one stopped: without the
    # incarnation these would all have been dropped as duplicates. (Its first one or two may
    # precede the reconnect; the first seen sets the baseline.)
    assert fresh and fresh[0].seq < old[-1].seq
    assert [e.seq for e in fresh] == list(range(fresh[0].seq, fresh[0].seq + len(fresh)))
    assert listener.statistics().refused.get("duplicate", 0) == 0


def test_keys_serialize_and_hold_only_what_each_process_needs(tmp_path: Path):
    keys = ClusterKeys.generate(3)
    assert keys.world == 3 and len(keys.secret) == 3 and keys.monitor_secret
    rank1 = keys.for_rank(1)
    assert set(rank1.secret) == {1} and rank1.monitor_secret is None and rank1.public == keys.public
    assert ClusterKeys.from_env(rank1.to_env({})) == rank1
    assert ClusterKeys.load(keys.save(tmp_path / "k.json")) == keys
    monitor = keys.for_monitor()
    assert monitor.secret == {} and monitor.monitor_secret == keys.monitor_secret
    with pytest.raises(KeyError):
        rank1.rank_secret(0)
    with pytest.raises(KeyError):
        rank1.for_monitor()
    with pytest.raises(ValueError):
        ClusterKeys.from_json('{"format": 1, "public": {"0": "short"}, "monitor_public": "x"}')
    with pytest.raises(KeyError):
        ZmqTransport(0, monitor, store=None)
    assert zmq.has("curve")


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_malformed_messages_from_a_member_are_counted(tcp_store):
    keys = ClusterKeys.generate(2)
    sender = ZmqTransport(0, keys.for_rank(0), tcp_store)
    receiver = EventBus(ZmqTransport(1, keys.for_rank(1), tcp_store), 1)
    await sender.start()
    try:
        async with receiver:
            await receiver.transport.refresh()
            await receiver.transport.wait_connected([0], timeout=10)
            codec = Codec()
            good = codec.encode(envelope(Heartbeat(rank=0), sender=0, epoch=0, seq=1))
            deadline = time.monotonic() + 10
            while 0 not in receiver.heard_from():  # subscription propagated: the probe arrived
                sender.send(good)
                await asyncio.sleep(0.01)
                assert time.monotonic() < deadline
            before = receiver.statistics().refused.get("malformed", 0)
            assert sender._pub is not None
            sender._pub.send(b"short")  # no room for the header
            sender._pub.send(KIND_EVENTS + struct.pack("<QI", sender.incarnation, 999) + good)  # length overruns
            sender._pub.send(KIND_EVENTS + struct.pack("<QI", sender.incarnation, 3) + b"\xc1\xc1\xc1")  # not msgpack
            while receiver.statistics().refused.get("malformed", 0) - before < 3:
                await asyncio.sleep(0.01)
                assert time.monotonic() < deadline
            assert receiver.running
    finally:
        await sender.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_subscriber_can_take_a_peers_events_without_its_heartbeats(tcp_store):
    """set_beats(peer, False): the peer's socket stops sending this subscriber its heartbeats
    (the B topic) while its other events (E) still arrive, with no hole reported in them, since
    heartbeats are numbered apart; set_beats(peer, True) brings the beats back, and the ones
    left out are not reported lost. Another subscriber of the same peer keeps both all along."""
    keys = ClusterKeys.generate(3)
    buses = [EventBus(ZmqTransport(r, keys.for_rank(r), tcp_store, poll_interval_s=0.01), r) for r in range(3)]
    async with buses[0], buses[1], buses[2]:
        beats = [b.subscribe(Heartbeat, maxsize=10_000) for b in buses]
        events = [b.subscribe(Suspicion, maxsize=10_000) for b in buses]
        gaps = [b.subscribe(SequenceGap, maxsize=100) for b in buses]
        while not (buses[1].heard_from() >= {0} and buses[2].heard_from() >= {0}):
            await buses[0].publish(Heartbeat(rank=0, step=-1))
            await asyncio.sleep(0.01)

        async def drain(sub) -> list:
            out = []
            while True:
                try:
                    out.append(sub.receive_nowait())
                except Exception:
                    return out

        async def exchange(rounds: int) -> tuple[list, list, list, list]:
            for i in range(rounds):
                buses[0].publish_nowait(Heartbeat(rank=0, step=i))
                await asyncio.sleep(0.005)
                buses[0].publish_nowait(Suspicion(observer=0, suspect=9, source="test", phi=float(i)))
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.2)
            return (await drain(beats[1]), await drain(events[1]), await drain(beats[2]), await drain(events[2]))

        assert buses[1].set_beats(0, False)
        await asyncio.sleep(0.2)  # the subscription change reaches rank 0's socket
        for sub in (*beats, *events):
            await drain(sub)
        b1, e1, b2, e2 = await exchange(50)
        assert b1 == [] and [e.event.phi for e in e1] == [float(i) for i in range(50)]
        assert [e.event.step for e in b2] == list(range(50)) and len(e2) == 50
        assert [e.seq for e in e1] == list(range(e1[0].seq, e1[0].seq + 50))  # no holes...
        assert await drain(gaps[1]) == [] and buses[1].statistics().gaps == 0  # ...and none reported
        assert buses[1].set_beats(0, True)
        await asyncio.sleep(0.2)
        b1, e1, b2, e2 = await exchange(20)
        assert [e.event.step for e in b1] == list(range(20)) and len(e1) == 20 and len(b2) == 20
        assert [e.seq for e in b1] == list(range(b1[0].seq, b1[0].seq + 20))
        assert await drain(gaps[1]) == [] and buses[1].statistics().gaps == buses[2].statistics().gaps == 0


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_severed_transport_is_seen_disconnected_at_once_and_still_closes(tcp_store):
    """sever() closes the publishing socket as a killed process's kernel would: a subscriber
    hears 'disconnected' within a moment, nothing more can be sent, and close() then ends the
    transport as usual."""
    keys = ClusterKeys.generate(2)
    victim = ZmqTransport(0, keys.for_rank(0), tcp_store)
    watcher = ZmqTransport(1, keys.for_rank(1), tcp_store)
    await victim.start()
    await watcher.start()
    heard: list[tuple[int, str, float]] = []
    watcher.add_listener(lambda rank, kind: heard.append((rank, kind, time.monotonic())))
    try:
        await watcher.refresh()
        await watcher.wait_connected([0], timeout=10)
        t0 = time.monotonic()
        victim.sever()
        async with asyncio.timeout(5):
            while (0, "disconnected") not in [(r, k) for r, k, _ in heard]:
                await asyncio.sleep(0.001)
        assert next(t for r, k, t in heard if k == "disconnected") - t0 < 1.0
        with pytest.raises(TransportClosed):
            victim.send(b"late")
        await victim.close()
        assert victim.socket_count() == 0
    finally:
        await victim.close()
        await watcher.close()


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_backlog_larger_than_one_batch_arrives_whole_and_in_order(tcp_store, monkeypatch):
    """Hundreds of messages waiting when the reader wakes: the callback reads one batch, the
    pump reads the rest in later iterations, and no envelope is lost, reordered or repeated,
    while a second peer's events keep their turn."""
    from elasticep.bus import zmq_transport

    monkeypatch.setattr(zmq_transport, "_RECEIVE_BATCH", 8)
    pumped = []
    pump = zmq_transport.ZmqTransport._pump
    monkeypatch.setattr(zmq_transport.ZmqTransport, "_pump", lambda self: (pumped.append(self.rank), pump(self))[1])
    keys = ClusterKeys.generate(3)
    buses = [EventBus(ZmqTransport(r, keys.for_rank(r), tcp_store, poll_interval_s=0.01), r) for r in range(3)]
    async with buses[0], buses[1], buses[2]:
        sub = buses[2].subscribe(Suspicion, maxsize=10_000)
        while not buses[2].heard_from() >= {0, 1}:
            for b in buses[:2]:
                await b.publish(Heartbeat(rank=b.rank, step=-1))
            await asyncio.sleep(0.01)
        # Each envelope as its own ZeroMQ message, all sent before the reader's loop runs again.
        sent = 400
        for i in range(1, sent + 1):
            for b in buses[:2]:
                env = b._envelope(Suspicion(observer=b.rank, suspect=2, source="test", phi=float(i)))
                b.transport.send(b.codec.encode(env))
        got: dict[int, list[float]] = {0: [], 1: []}
        async with asyncio.timeout(20):
            while len(got[0]) + len(got[1]) < 2 * sent:
                env = await sub.receive()
                got[env.sender].append(env.event.phi)
        assert got[0] == got[1] == [float(i) for i in range(1, sent + 1)]
        assert pumped.count(2) >= 2 * sent // 8 - 2  # the backlog really went batch by batch
        # A wake-up with nothing behind it (ZeroMQ's FD also fires for other state changes) is
        # harmless: the read finds no message, delivers nothing and raises nothing.
        await asyncio.sleep(0.05)
        received = buses[2].statistics().received
        transport = buses[2].transport
        transport._on_sub_readable(0, transport._peers[0].sock)
        assert buses[2].statistics().received == received and sub.statistics().queued == 0
        assert buses[2].statistics().gaps == 0 and buses[2].statistics().duplicates == 0
