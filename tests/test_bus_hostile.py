"""Hostile and broken control-plane input at a running ZeroMQ bus.

Each test starts real buses on a real ``TCPStore`` and feeds them what a party that can write the
(unauthenticated) store, or a member gone wrong, can feed them: garbage records, a hijacked
registration, an absurd incarnation, an absurd sequence number, a 64 MiB message. The bus must
refuse and count each, never crash, and keep honest traffic flowing.
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
import time

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elasticep import metrics
from elasticep.bus import ClusterKeys, EventBus, StoreRendezvous, ZmqTransport
from elasticep.bus.rendezvous import DEFAULT_PREFIX
from elasticep.bus.zmq_transport import KIND_EVENTS
from elasticep.events import Codec, Heartbeat, envelope

KEY = DEFAULT_PREFIX + "rank/{}"


def _write_raw(store, rank: int, value: bytes | str) -> None:
    """What anyone who reaches the store can do: overwrite a rank's record and log the write."""
    store.set(KEY.format(rank), value)
    n = int(store.add(DEFAULT_PREFIX + "count", 1))
    store.set(f"{DEFAULT_PREFIX}log/{n}", str(rank))


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.01)


async def _heartbeats(bus: EventBus, stop: asyncio.Event, period: float = 0.01) -> None:
    step = 0
    while not stop.is_set():
        await bus.publish(Heartbeat(rank=bus.rank, step=step))
        step += 1
        await asyncio.sleep(period)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_garbage_record_is_skipped_and_a_later_join_still_works(tcp_store):
    """Defect 1: ``not json{`` under a rank's key made every poll raise and a new rank's start crash."""
    keys = ClusterKeys.generate(4)
    before = metrics.sample("elasticep_rendezvous_refused_total", {"reason": "malformed"})
    first = EventBus(ZmqTransport(0, keys.for_rank(0), tcp_store, poll_interval_s=0.02), 0)
    async with first:
        _write_raw(tcp_store, 3, "not json{")
        _write_raw(tcp_store, 3, b"\xff\xfe")  # not even text
        tcp_store.set(f"{DEFAULT_PREFIX}log/{int(tcp_store.add(DEFAULT_PREFIX + 'count', 1))}", "rank three")
        # A rank that starts after the garbage: its start() reads every record, garbage included.
        second = EventBus(ZmqTransport(1, keys.for_rank(1), tcp_store, poll_interval_s=0.02), 1)
        async with second:
            stop = asyncio.Event()
            tasks = [asyncio.ensure_future(_heartbeats(b, stop)) for b in (first, second)]
            try:
                await _until(lambda: 1 in first.heard_from() and 0 in second.heard_from(), 10, "0 and 1 hear each other")
                # ... and the running poller keeps reading registrations made after the garbage.
                third = EventBus(ZmqTransport(2, keys.for_rank(2), tcp_store, poll_interval_s=0.02), 2)
                async with third:
                    tasks.append(asyncio.ensure_future(_heartbeats(third, stop)))
                    try:
                        await _until(lambda: 2 in first.heard_from() and 2 in second.heard_from(), 10, "rank 2 heard")
                    finally:
                        stop.set()
                        await asyncio.gather(*tasks)
            finally:
                stop.set()
                await asyncio.gather(*tasks)
            assert first.running and second.running
            assert 3 not in first.transport.peers()
            # the latest record under rank 3 and the log entry (the two writes to rank 3 read as one)
            assert second.transport.rendezvous.refused["malformed"] >= 2
    assert metrics.sample("elasticep_rendezvous_refused_total", {"reason": "malformed"}) - before >= 4
    assert StoreRendezvous(tcp_store, keys=keys.for_rank(0)).lookup(3) is None


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_hijacked_registration_never_cuts_the_real_rank_off(tcp_store):
    """Defect 2: re-registering rank 0 at another endpoint made its peers close their working
    socket to the real rank 0 for good. Three hijacks: unsigned, signed with another rank's key,
    and validly signed (as with a leaked signing key) but at an endpoint that cannot complete the
    CURVE handshake. Rank 1 keeps hearing rank 0 with no silence near 1 s, rank 0 writes its record
    back, and a rank that joins afterwards finds the real rank 0."""
    keys = ClusterKeys.generate(3)
    ctx = zmq.Context()
    impostor = ctx.socket(zmq.PUB)
    public, secret = zmq.curve_keypair()
    impostor.curve_server, impostor.curve_publickey, impostor.curve_secretkey = True, public, secret
    impostor.linger = 0
    impostor.bind("tcp://127.0.0.1:*")
    fake = impostor.last_endpoint.decode()
    # Rank 0 looks at the store only when told (poll_interval_s=0), so rank 1 surely reads each
    # forged record before rank 0 writes its own back; the watcher's path is the same calls.
    real = EventBus(ZmqTransport(0, keys.for_rank(0), tcp_store, poll_interval_s=0), 0)
    peer = EventBus(ZmqTransport(1, keys.for_rank(1), tcp_store, poll_interval_s=0.02), 1)
    arrivals: list[float] = []
    try:
        async with real, peer:
            sub = peer.subscribe(Heartbeat)

            async def record() -> None:
                async for env in sub:
                    if env.sender == 0:
                        arrivals.append(time.monotonic())

            stop = asyncio.Event()
            tasks = [asyncio.ensure_future(_heartbeats(real, stop)), asyncio.ensure_future(record())]
            try:
                await _until(lambda: len(arrivals) > 5, 10, "rank 1 hears rank 0")
                inc = real.transport.incarnation
                unsigned = StoreRendezvous(tcp_store)
                other = StoreRendezvous(tcp_store, keys=keys.for_rank(2))
                leaked = StoreRendezvous(tcp_store, keys=keys.for_rank(0))
                refused = peer.transport.rendezvous.refused
                t_attack = time.monotonic()
                _write_raw(tcp_store, 0, unsigned.record(0, fake, inc + 1))
                await _until(lambda: refused["unsigned"] >= 1, 5, "unsigned record refused")
                forged = json.loads(other.record(2, fake, inc + 1))  # rank 2's signature, rank 0's key
                _write_raw(tcp_store, 0, json.dumps(forged))
                await _until(lambda: refused["bad_signature"] >= 1, 5, "forged signature refused")
                _write_raw(tcp_store, 0, leaked.record(0, fake, inc + 1))
                await _until(lambda: peer.transport.handshake_failures >= 1, 5, "the signed one tried, and failed")
                assert peer.transport.peers() == {0}
                await asyncio.sleep(0.5)
                await real.transport.refresh()  # rank 0 sees the log entries for its own rank
                assert real.transport.reregistrations == 1
                await asyncio.sleep(0.2)
                assert StoreRendezvous(tcp_store, keys=keys.for_rank(1)).lookup(0).endpoint == real.transport.endpoint
                assert not peer.transport._pending  # the candidate went once the real record was back
                # A silent overwrite (no log entry) is caught by the rank's own read-back.
                assert not await real.transport.check_registration()
                tcp_store.set(KEY.format(0), "garbage")
                assert await real.transport.check_registration()
                assert real.transport.reregistrations == 2
                # A rank that joins now finds the real rank 0.
                late = EventBus(ZmqTransport(2, keys.for_rank(2), tcp_store, poll_interval_s=0.02), 2)
                async with late:
                    await _until(lambda: 0 in late.heard_from(), 10, "a late joiner hears rank 0")
                during = [t for t in arrivals if t >= t_attack]
            finally:
                stop.set()
                await asyncio.gather(*tasks[:1])
                tasks[1].cancel()
                await asyncio.gather(tasks[1], return_exceptions=True)
            assert 0 in peer.transport.peers() and 0 in peer.transport.connected()
    finally:
        impostor.close()
        ctx.term()
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert len(during) > 50 and max(gaps) < 0.5, f"rank 0 went silent for {max(gaps):.2f} s"


async def _pair(tcp_store, keys):
    sender = ZmqTransport(0, keys.for_rank(0), tcp_store)
    receiver = EventBus(ZmqTransport(1, keys.for_rank(1), tcp_store), 1)
    await sender.start()
    await receiver.start()
    await receiver.transport.refresh()
    await receiver.transport.wait_connected([0], timeout=10)
    return sender, receiver


class _Honest:
    """Rank 0's honest traffic, sent raw through its authenticated transport."""

    def __init__(self, sender: ZmqTransport, receiver: EventBus) -> None:
        self.sender, self.receiver, self.codec, self.seq = sender, receiver, Codec(), 0
        self.sub = receiver.subscribe(Heartbeat, maxsize=100_000)

    def frame(self, seq: int | None = None) -> bytes:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return self.codec.encode(envelope(Heartbeat(rank=0, step=seq), sender=0, epoch=0, seq=seq))

    async def round_trip(self, timeout: float = 10) -> None:
        """Send the next honest heartbeat until it arrives (the first may beat the subscription)."""
        self.sender.send(self.frame())
        want, deadline = self.seq, time.monotonic() + timeout
        while True:
            try:
                env = await asyncio.wait_for(self.sub.receive(), 0.2)
                if env.event.step == want:
                    return
            except asyncio.TimeoutError:
                assert time.monotonic() < deadline, f"honest heartbeat {want} never arrived"
                self.sender.send(self.frame())
                want = self.seq


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_an_absurd_incarnation_or_sequence_number_does_not_poison_a_sender(tcp_store):
    """Defect 3: one message with incarnation 2**64-1 made every later real frame of that rank
    ``stale_incarnation``; likewise one envelope with seq 2**62 would make them ``duplicate``."""
    keys = ClusterKeys.generate(2)
    sender, receiver = await _pair(tcp_store, keys)
    try:
        honest = _Honest(sender, receiver)
        await honest.round_trip()
        assert sender._pub is not None
        frame = honest.frame(seq=honest.seq + 1)
        sender._pub.send(KIND_EVENTS + struct.pack("<QI", (1 << 64) - 1, len(frame)) + frame)
        sender._pub.send(KIND_EVENTS + struct.pack("<QI", sender.incarnation - 1, len(frame)) + frame)  # below the registration
        sender.send(honest.frame(seq=1 << 62))
        for _ in range(3):
            await honest.round_trip()
        stats = receiver.statistics()
        assert receiver.transport.refused == {"unregistered_incarnation": 1, "stale_incarnation": 1}
        assert stats.refused.get("seq_out_of_bounds") == 1 and stats.refused.get("duplicate", 0) == 0
        assert stats.senders[0][0] == sender.incarnation
    finally:
        await receiver.close()
        await sender.close()


RECEIVER = r'''
import asyncio, json, sys, time
from elasticep.bus import ClusterKeys, EventBus, ZmqTransport, connect_store
from elasticep.events import Heartbeat

def hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

async def main():
    store = connect_store(sys.argv[1])
    bus = EventBus(ZmqTransport(1, ClusterKeys.from_env(), store, poll_interval_s=0.02), 1)
    async with bus:
        sub = bus.subscribe(Heartbeat, maxsize=100_000)
        while 0 not in bus.heard_from():
            await asyncio.sleep(0.01)
        await asyncio.to_thread(store.set, "t/hwm0", str(hwm_kib()))
        steps = []
        deadline = time.monotonic() + 30
        while not steps or steps[-1] != -1:  # the sender's last honest heartbeat has step -1
            env = await asyncio.wait_for(sub.receive(), max(0.1, deadline - time.monotonic()))
            steps.append(env.event.step)
        await asyncio.to_thread(store.set, "t/result", json.dumps({"hwm1": hwm_kib(), "honest": len(steps)}))

asyncio.run(main())
'''


@pytest.mark.multiproc
@pytest.mark.timeout(60)
def test_a_64_mib_message_is_refused_before_it_is_read(tcp_store, tmp_path):
    """Defect 4: without ``ZMQ_MAXMSGSIZE`` a member's 64 MiB message was read whole before the
    codec's 1 MiB check (the receiver grew by the message). The receiver's peak memory must not
    grow by anything near it, and the sender's honest traffic must still arrive."""
    keys = ClusterKeys.generate(2)
    script = tmp_path / "receiver.py"
    script.write_text(RECEIVER)
    proc = subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{tcp_store.port}"],
                            env=keys.for_rank(1).to_env())

    async def send() -> None:
        sender = ZmqTransport(0, keys.for_rank(0), tcp_store, poll_interval_s=0.02)
        await sender.start()
        honest = Codec()
        seq = 0

        def heartbeat(step: int) -> None:
            nonlocal seq
            seq += 1
            sender.send(honest.encode(envelope(Heartbeat(rank=0, step=step), sender=0, epoch=0, seq=seq)))

        try:
            deadline = time.monotonic() + 30
            while not tcp_store.check(["t/hwm0"]):
                assert proc.poll() is None and time.monotonic() < deadline
                heartbeat(0)
                await asyncio.sleep(0.02)
            assert sender._pub is not None
            big = bytes(64 << 20)
            sender._pub.send(KIND_EVENTS + struct.pack("<QI", sender.incarnation, len(big)) + big)
            del big
            # The receiver dropped the connection; ZeroMQ reconnects and honest traffic resumes.
            while not tcp_store.check(["t/result"]):
                assert proc.poll() is None and time.monotonic() < deadline, "the receiver stopped"
                for _ in range(5):
                    heartbeat(1)
                heartbeat(-1)
                await asyncio.sleep(0.1)
        finally:
            await sender.close()

    try:
        asyncio.run(send())
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = json.loads(tcp_store.get("t/result"))
    grown_mib = (result["hwm1"] - int(tcp_store.get("t/hwm0"))) / 1024
    assert grown_mib < 16, f"the receiver grew by {grown_mib:.0f} MiB"
    assert result["honest"] >= 1


# --- fuzz ---------------------------------------------------------------------------------------

_records = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200),
    st.dictionaries(st.sampled_from(["endpoint", "incarnation", "sig", "x"]),
                    st.one_of(st.integers(), st.text(max_size=40), st.none(), st.floats(allow_nan=False)),
                    max_size=4).map(json.dumps),
    st.builds(lambda inc, sig: json.dumps({"endpoint": "tcp://127.0.0.1:1", "incarnation": inc, "sig": sig}),
              st.integers(min_value=-2, max_value=1 << 70), st.text(max_size=90)),
    st.binary(min_size=4097, max_size=5000),
)


@pytest.mark.timeout(120)
def test_a_record_read_again_is_not_verified_again_and_a_changed_one_is(tcp_store):
    """A rank reads its own record back every second: the same bytes are checked once. Any
    other bytes under the key (a forged or damaged record) go through the whole check."""
    keys = ClusterKeys.generate(2)
    StoreRendezvous(tcp_store, keys=keys.for_rank(0)).register(0, "tcp://127.0.0.1:5000", 7)
    reader = StoreRendezvous(tcp_store, keys=keys.for_rank(1))
    calls: list[int] = []

    class Counting:  # the reader's keys, counting signature checks
        def __init__(self, inner: ClusterKeys) -> None:
            self.inner = inner

        def __getattr__(self, name: str):
            return getattr(self.inner, name)

        def verify(self, rank: int, message: bytes, signature: bytes) -> bool:
            calls.append(rank)
            return self.inner.verify(rank, message, signature)

    reader.keys = Counting(reader.keys)
    first = reader.lookup(0)
    assert first is not None and first.incarnation == 7 and calls == [0]
    for _ in range(5):
        assert reader.lookup(0) == first
    assert calls == [0]  # checked once
    record = json.loads(tcp_store.get(f"{DEFAULT_PREFIX}rank/0"))
    record["incarnation"] = 8  # the old signature over new contents
    tcp_store.set(f"{DEFAULT_PREFIX}rank/0", json.dumps(record).encode())
    assert reader.lookup(0) is None and calls == [0, 0] and reader.refused["bad_signature"] == 1


def test_fuzzed_store_records_never_break_the_rendezvous(tcp_store):
    """Whatever lies under a rank's key or in the log: no exception, each refusal counted, the
    honest records (ranks 0 and 1) still read."""
    keys = ClusterKeys.generate(3)
    StoreRendezvous(tcp_store, keys=keys.for_rank(0)).register(0, "tcp://127.0.0.1:5000", 7)
    StoreRendezvous(tcp_store, keys=keys.for_rank(1)).register(1, "tcp://127.0.0.1:5001", 8)
    reader = StoreRendezvous(tcp_store, keys=keys.for_rank(1))
    seen = reader.changed_since(0)[0]
    runs: list[int] = []

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(rank=st.integers(min_value=2, max_value=40), value=_records, log=st.one_of(st.none(), st.binary(max_size=20)))
    def fuzz(rank, value, log):
        nonlocal seen
        runs.append(rank)
        _write_raw(tcp_store, rank, value)
        if log is not None:
            tcp_store.set(f"{DEFAULT_PREFIX}log/{int(tcp_store.add(DEFAULT_PREFIX + 'count', 1))}", log)
        before = sum(reader.refused.values())
        seen, found = reader.changed_since(seen)
        assert found.get(rank) is None  # nothing here is signed by the rank whose key holds it
        assert sum(reader.refused.values()) > before
        assert reader.lookup(0).incarnation == 7 and reader.lookup(1).incarnation == 8

    fuzz()
    assert len(runs) >= 100


_INCARNATIONS = st.sampled_from(["own", "older", "huge", "ahead"]) | st.integers(min_value=0, max_value=(1 << 64) - 1)
_messages = st.one_of(
    st.tuples(st.just("bytes"), st.binary(max_size=60)),
    st.tuples(st.just("body"), _INCARNATIONS, st.binary(max_size=200)),
    st.tuples(st.just("lengths"), _INCARNATIONS, st.integers(min_value=0, max_value=(1 << 32) - 1), st.binary(max_size=100)),
    st.tuples(st.just("envelope"), _INCARNATIONS, st.integers(min_value=0, max_value=(1 << 64) - 1),
              st.integers(min_value=0, max_value=3)),
)


@pytest.mark.timeout(120)
def test_fuzzed_raw_messages_at_a_running_bus(tcp_store):
    """Raw messages from an authenticated member, each followed by an honest heartbeat: the bus
    never stops, every message is refused and counted (by the transport or the bus) unless it
    carried a valid envelope, and the honest heartbeat after it still arrives."""
    keys = ClusterKeys.generate(2)
    loop = asyncio.new_event_loop()
    sender, receiver = loop.run_until_complete(_pair(tcp_store, keys))
    honest = _Honest(sender, receiver)
    loop.run_until_complete(honest.round_trip())
    codec = Codec()
    runs: list[str] = []

    def counted() -> int:
        return sum(receiver.statistics().refused.values()) + sum(receiver.transport.refused.values())

    def incarnation(kind) -> int:
        own = sender.incarnation
        return {"own": own, "older": own - 1, "huge": (1 << 64) - 1, "ahead": own + 10**9}.get(kind, kind)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(message=_messages)
    def fuzz(message):
        assert sender._pub is not None
        runs.append(message[0])
        kind, accepted_seq = message[0], None
        if kind == "bytes":
            raw = message[1]
        elif kind == "body":
            raw = KIND_EVENTS + struct.pack("<Q", incarnation(message[1])) + message[2]
        elif kind == "lengths":
            raw = KIND_EVENTS + struct.pack("<QI", incarnation(message[1]), message[2]) + message[3]
        else:
            _, inc, seq, claimed = message
            data = codec.encode(envelope(Heartbeat(rank=claimed, step=-5), sender=claimed, epoch=0, seq=seq))
            raw = KIND_EVENTS + struct.pack("<QI", incarnation(inc), len(data)) + data
            if claimed == 0 and incarnation(inc) == sender.incarnation and 0 < seq - honest.seq <= 1 << 32:
                accepted_seq = seq  # a real heartbeat after a gap (or from a "restarted" sender)
        before, received = counted(), receiver.statistics().received
        sender._pub.send(raw)
        if accepted_seq is not None:
            honest.seq = accepted_seq
        loop.run_until_complete(honest.round_trip())
        assert receiver.running
        got = receiver.statistics().received - received
        assert counted() > before or got >= 2, (message, receiver.statistics().refused, receiver.transport.refused)

    try:
        fuzz()
        assert len(runs) >= 100 and receiver.statistics().received >= len(runs)
    finally:
        loop.run_until_complete(receiver.close())
        loop.run_until_complete(sender.close())
        loop.close()


def test_a_burst_of_registrations_is_read_in_two_round_trips_and_an_unwritten_entry_waits(tcp_store):
    keys = ClusterKeys.generate(8)
    for r in range(6):
        StoreRendezvous(tcp_store, keys=keys.for_rank(r)).register(r, f"tcp://127.0.0.1:{5000 + r}", r + 1)

    class Counting:  # the real store, its calls counted
        def __init__(self, store):
            self.store, self.calls = store, []

        def __getattr__(self, name):
            fn = getattr(self.store, name)
            return lambda *a: (self.calls.append(name), fn(*a))[1]

    counted = Counting(tcp_store)
    reader = StoreRendezvous(counted, keys=keys.for_rank(7))
    assert reader.ranks_since(0) == (6, set(range(6)))
    assert counted.calls == ["add", "check", "multi_get"]  # count, then the burst at once
    # a registration counted whose log entry is not written yet: read up to it, then it later
    n = int(tcp_store.add(DEFAULT_PREFIX + "count", 1))
    StoreRendezvous(tcp_store, keys=keys.for_rank(6)).register(6, "tcp://127.0.0.1:5006", 9)
    assert reader.ranks_since(6) == (6, set())  # entry n is missing: nothing past it is taken
    tcp_store.set(f"{DEFAULT_PREFIX}log/{n}", "6")
    assert reader.ranks_since(6) == (8, {6})
    assert reader.lookup(6).incarnation == 9
