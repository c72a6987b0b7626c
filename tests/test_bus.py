"""EventBus over the in-process network: ordering, duplicates, gaps, partitions, overflow, refusals."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

import elasticep.bus as bus_pkg
from elasticep import metrics
from elasticep.bus import (
    BusClosed,
    EndOfStream,
    EventBus,
    InProcessNetwork,
    WouldBlock,
)
from elasticep.events import Codec, Heartbeat, SequenceGap, Suspicion, envelope

pytestmark = pytest.mark.timeout(20)


@contextlib.asynccontextmanager
async def cluster(net: InProcessNetwork, n: int):
    buses = [EventBus(net.transport(r), r) for r in range(n)]
    for b in buses:
        await b.start()
    try:
        yield buses
    finally:
        for b in buses:
            await b.close()


async def drain(sub, *, settle: float = 0.02) -> list:
    """Everything that arrives at ``sub`` until it stays quiet for ``settle`` seconds."""
    out = []
    while True:
        try:
            out.append(await asyncio.wait_for(sub.receive(), settle))
        except asyncio.TimeoutError:
            return out


def refused(reason: str) -> float:
    return metrics.sample("elasticep_frames_refused_total", {"reason": reason})


def test_all_names_exported():
    for name in bus_pkg.__all__:
        assert hasattr(bus_pkg, name), name
    public = {n for n in dir(bus_pkg) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(bus_pkg.__all__), public - set(bus_pkg.__all__)


@pytest.mark.asyncio
async def test_publish_reaches_peers_and_local_subscribers_with_envelope():
    net = InProcessNetwork(seed=0)
    async with cluster(net, 3) as (b0, b1, b2):
        b0.epoch = 4
        s0, s1, s2 = b0.subscribe(Heartbeat), b1.subscribe(Heartbeat), b2.subscribe()
        sent = await b0.publish(Heartbeat(rank=0, step=9))
        assert (sent.sender, sent.epoch, sent.seq) == (0, 4, 1)
        for sub in (s0, s1, s2):
            env = await asyncio.wait_for(sub.receive(), 1)
            assert env.event == Heartbeat(rank=0, step=9)
            assert (env.sender, env.epoch, env.seq) == (0, 4, 1)
        await b1.publish(Suspicion(observer=1, suspect=0, source="heartbeat"))
        got = await asyncio.wait_for(s2.receive(), 1)
        assert isinstance(got.event, Suspicion)
        assert s0.statistics().queued == 0 and s1.statistics().queued == 0  # filtered out
        with pytest.raises(ValueError):
            b0.epoch = 3


@pytest.mark.asyncio
async def test_a_heartbeat_reveals_events_lost_before_it_and_numbers_apart_from_them():
    """Heartbeats are numbered apart from a sender's other events and each names the last
    other event sent: one lost alone (no event after it) is reported at the next heartbeat,
    a heartbeat sets the baseline of the events (so a lost first event is seen too), and
    heartbeats alone, or lost alone, never report events lost."""
    net = InProcessNetwork(seed=3)
    async with cluster(net, 2) as (b0, b1):
        gaps = b1.subscribe(SequenceGap)
        events = b1.subscribe(Suspicion)
        beats = b1.subscribe(Heartbeat)
        await b0.publish(Heartbeat(rank=0, step=1))  # the first: no event yet, baseline 0
        env = await asyncio.wait_for(beats.receive(), 2)
        assert (env.seq, env.event.events) == (1, 0)
        net.partition({0}, {1})
        await b0.publish(Suspicion(observer=0, suspect=9, source="test"))  # event 1, lost
        await b0.publish(Heartbeat(rank=0, step=2))  # beat 2, lost
        await asyncio.sleep(0.05)  # (both left before the heal)
        net.heal()
        await b0.publish(Heartbeat(rank=0, step=3))  # beat 3: names event 1
        env = await asyncio.wait_for(beats.receive(), 2)
        assert (env.seq, env.event.events) == (3, 1)
        got = [await asyncio.wait_for(gaps.receive(), 2) for _ in range(2)]
        assert sorted((g.event.expected, g.event.got) for g in got) == [(1, 2), (2, 3)]  # event 1; beat 2
        await b0.publish(Suspicion(observer=0, suspect=9, source="test"))  # event 2: no hole
        env = await asyncio.wait_for(events.receive(), 2)
        assert env.seq == 2
        for step in range(4, 9):
            await b0.publish(Heartbeat(rank=0, step=step))
        for _ in range(5):
            await asyncio.wait_for(beats.receive(), 2)
        assert b1.statistics().gaps == 2 and b1.statistics().lost == 2


@pytest.mark.asyncio
async def test_per_sender_fifo_and_sequence_numbers():
    net = InProcessNetwork(seed=1, delay_ms=1.0, jitter_ms=3.0)
    async with cluster(net, 2) as (b0, b1):
        sub = b1.subscribe(Heartbeat)
        for step in range(200):
            await b0.publish(Heartbeat(rank=0, step=step))
        got = [await asyncio.wait_for(sub.receive(), 2) for _ in range(200)]
        assert [e.event.step for e in got] == list(range(200))
        assert [e.seq for e in got] == list(range(1, 201))
        assert b1.statistics().gaps == 0


@pytest.mark.asyncio
async def test_duplicates_are_ignored_and_counted():
    net = InProcessNetwork(seed=2, duplicate=1.0)
    before = refused("duplicate")
    async with cluster(net, 2) as (b0, b1):
        sub = b1.subscribe(Heartbeat)
        for step in range(50):
            await b0.publish(Heartbeat(rank=0, step=step))
        got = await drain(sub)
        assert [e.event.step for e in got] == list(range(50))
        assert net.stats["duplicated"] == 50
        assert b1.statistics().duplicates == 50
    assert refused("duplicate") - before == 50


async def _lossy_run(seed: int) -> tuple[list[int], list[tuple[int, int]]]:
    net = InProcessNetwork(seed=seed, drop=0.2)
    async with cluster(net, 2) as (b0, b1):
        sub = b1.subscribe(Heartbeat, SequenceGap)
        for step in range(300):
            await b0.publish(Heartbeat(rank=0, step=step))
        got = await drain(sub)
    steps = [e.event.step for e in got if isinstance(e.event, Heartbeat)]
    gaps = [(e.event.expected, e.event.got) for e in got if isinstance(e.event, SequenceGap)]
    return steps, gaps


@pytest.mark.asyncio
async def test_drops_become_gap_events_and_are_deterministic_under_a_seed():
    gaps_before = metrics.sample("elasticep_bus_gaps_total", {"sender": "0"})
    steps, gaps = await _lossy_run(seed=11)
    assert 150 < len(steps) < 290
    assert steps == sorted(steps)
    # Every missing seq after the first delivered one is covered by exactly one gap report.
    seqs = [s + 1 for s in steps]
    missing = {s for s in range(seqs[0], seqs[-1] + 1)} - set(seqs)
    reported = {s for lo, hi in gaps for s in range(lo, hi)}
    assert reported == missing and missing
    assert metrics.sample("elasticep_bus_gaps_total", {"sender": "0"}) - gaps_before == len(missing)
    # Same seed, same losses.
    assert await _lossy_run(seed=11) == (steps, gaps)
    assert (await _lossy_run(seed=12))[0] != steps


@pytest.mark.asyncio
async def test_partition_and_heal():
    net = InProcessNetwork(seed=3)
    async with cluster(net, 4) as buses:
        subs = [b.subscribe(Heartbeat, SequenceGap) for b in buses]
        await buses[0].publish(Heartbeat(rank=0, step=0))
        assert [len(await drain(s)) for s in subs] == [1, 1, 1, 1]
        net.partition({0, 1}, {2, 3})
        assert net.reachable(0, 1) and not net.reachable(0, 2) and net.reachable(3, 2)
        await buses[0].publish(Heartbeat(rank=0, step=1))
        await buses[3].publish(Heartbeat(rank=3, step=1))
        assert [e.event.rank for e in await drain(subs[1])] == [0]
        assert [e.event.rank for e in await drain(subs[2])] == [3]
        net.heal()
        await buses[0].publish(Heartbeat(rank=0, step=2))
        got = await drain(subs[2])
        # Rank 2 missed seq 2 during the partition: a gap, then the new event.
        assert isinstance(got[0].event, SequenceGap) and got[0].event == SequenceGap(sender=0, expected=2, got=3)
        assert got[1].event == Heartbeat(rank=0, step=2)
        assert net.stats["dropped_partition"] == 4
        for sub in subs:
            await drain(sub)
        net.cut(1, 0)
        await buses[1].publish(Heartbeat(rank=1))
        assert await drain(subs[0]) == []
        assert [e.sender for e in await drain(subs[3])] == [1]


@pytest.mark.asyncio
async def test_receiver_paused_past_high_water_mark_sees_a_gap():
    net = InProcessNetwork(seed=4, hwm=10)
    async with cluster(net, 2) as (b0, b1):
        sub = b1.subscribe(Heartbeat, SequenceGap, maxsize=1000)
        # No await between publishes: rank 1's receive loop cannot run, as if paused.
        b0.publish_many([Heartbeat(rank=0, step=s) for s in range(100)])
        got = await drain(sub)  # resume: the receiver catches up with what its queue held
        await b0.publish(Heartbeat(rank=0, step=100))
        got += await drain(sub)
        steps = [e.event.step for e in got if isinstance(e.event, Heartbeat)]
        # The receiver's queue held 10 (11 if it took the first frame before the rest came).
        kept = len(steps) - 1
        assert kept in (10, 11) and steps == list(range(kept)) + [100]
        gaps = [e for e in got if isinstance(e.event, SequenceGap)]
        assert [g.event for g in gaps] == [SequenceGap(sender=0, expected=kept + 1, got=101)]
        assert gaps[0].sender == 1 and gaps[0].seq == 0  # made locally, never on the wire
        assert net.stats["dropped_hwm"] == 100 - kept
        assert b1.statistics().lost == 100 - kept


@pytest.mark.asyncio
async def test_restarted_sender_starts_over_and_zombie_is_refused():
    net = InProcessNetwork(seed=5)
    before = refused("stale_incarnation")
    async with cluster(net, 2) as (old0, b1):
        sub = b1.subscribe(Heartbeat, SequenceGap)
        for step in range(5):
            await old0.publish(Heartbeat(rank=0, step=step))
        assert len(await drain(sub)) == 5
        new0 = EventBus(net.transport(0), 0)
        await new0.start()
        try:
            assert new0.transport.incarnation > old0.transport.incarnation
            await new0.publish(Heartbeat(rank=0, incarnation=1, step=0))
            got = await drain(sub)
            assert [(e.seq, e.event.incarnation) for e in got] == [(1, 1)]
            assert b1.statistics().senders[0] == (new0.transport.incarnation, 1)
            # The old process still sends (say it was partitioned, not dead): refused.
            net.inject(1, Codec().encode(envelope(Heartbeat(rank=0), sender=0, epoch=0, seq=6)),
                       sender=0, incarnation=old0.transport.incarnation)
            assert await drain(sub) == []
        finally:
            await new0.close()
    assert refused("stale_incarnation") - before == 1


@pytest.mark.asyncio
async def test_refused_frames_are_counted_and_never_stop_the_loop():
    net = InProcessNetwork(seed=6)
    codec = Codec()
    before = {r: refused(r) for r in ("malformed", "sender_mismatch", "unknown_type")}
    async with cluster(net, 3) as (b0, b1, b2):
        sub = b1.subscribe(Heartbeat)
        net.inject(1, b"\x00garbage", sender=0)
        net.inject(1, b"", sender=0)
        # Rank 2 forges an envelope that claims to come from rank 0.
        net.inject(1, codec.encode(envelope(Heartbeat(rank=0), sender=0, epoch=0, seq=1)), sender=2)
        raw = codec.encode(envelope(Heartbeat(rank=0), sender=0, epoch=0, seq=1))
        net.inject(1, raw.replace(b"heartbeat", b"heartbeaX"), sender=0)
        await b0.publish(Heartbeat(rank=0, step=1))
        got = await drain(sub)
        assert [(e.sender, e.event.step) for e in got] == [(0, 1)]
        assert b1.statistics().refused == {"malformed": 2, "sender_mismatch": 1, "unknown_type": 1}
    assert refused("malformed") - before["malformed"] == 2
    assert refused("sender_mismatch") - before["sender_mismatch"] == 1
    assert refused("unknown_type") - before["unknown_type"] == 1


@pytest.mark.asyncio
async def test_overflow_policies():
    net = InProcessNetwork(seed=7)
    async with cluster(net, 1) as (b0,):
        oldest = b0.subscribe(Heartbeat, maxsize=3, name="t-oldest")
        newest = b0.subscribe(Heartbeat, maxsize=3, overflow="drop_newest", name="t-newest")
        dropped_before = metrics.sample("elasticep_subscriber_dropped_total", {"subscription": "t-oldest"})
        for step in range(5):
            await b0.publish(Heartbeat(rank=0, step=step))
        assert [oldest.receive_nowait().event.step for _ in range(3)] == [2, 3, 4]
        assert [newest.receive_nowait().event.step for _ in range(3)] == [0, 1, 2]
        st = oldest.statistics()
        assert (st.queued, st.maxsize, st.dropped, st.delivered) == (0, 3, 2, 3)
        assert metrics.sample("elasticep_subscriber_dropped_total", {"subscription": "t-oldest"}) - dropped_before == 2
        with pytest.raises(WouldBlock):
            oldest.receive_nowait()
        oldest.close()
        newest.close()

        blocking = b0.subscribe(Heartbeat, maxsize=2, overflow="block", name="t-block")
        assert metrics.sample("elasticep_subscriber_queue_depth", {"subscription": "t-block"}) == 0
        await b0.publish(Heartbeat(rank=0, step=0))
        await b0.publish(Heartbeat(rank=0, step=1))
        assert metrics.sample("elasticep_subscriber_queue_depth", {"subscription": "t-block"}) == 2
        with pytest.raises(WouldBlock):
            b0.publish_nowait(Heartbeat(rank=0, step=2))
        third = asyncio.ensure_future(b0.publish(Heartbeat(rank=0, step=2)))
        await asyncio.sleep(0.01)
        assert not third.done()
        assert blocking.receive_nowait().event.step == 0
        await asyncio.wait_for(third, 1)
        assert [blocking.receive_nowait().event.step for _ in range(2)] == [1, 2]
        assert blocking.statistics().dropped == 0


@pytest.mark.asyncio
async def test_close_ends_iteration_after_draining():
    net = InProcessNetwork(seed=8)
    b0 = EventBus(net.transport(0), 0)
    async with b0:
        sub = b0.subscribe()
        await b0.publish(Heartbeat(rank=0, step=1))
        await b0.publish(Heartbeat(rank=0, step=2))
    assert not b0.running
    assert [e.event.step async for e in sub] == [1, 2]
    with pytest.raises(EndOfStream):
        sub.receive_nowait()
    with pytest.raises(BusClosed):
        await b0.publish(Heartbeat(rank=0))


@pytest.mark.asyncio
async def test_waiting_receiver_wakes_and_cancel_is_clean():
    net = InProcessNetwork(seed=9)
    async with cluster(net, 2) as (b0, b1):
        sub = b1.subscribe(Heartbeat)
        waiting = asyncio.ensure_future(sub.receive())
        cancelled = asyncio.ensure_future(sub.receive())
        await asyncio.sleep(0)
        cancelled.cancel()
        await b0.publish(Heartbeat(rank=0, step=3))
        env = await asyncio.wait_for(waiting, 1)
        assert env.event.step == 3
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await b1.wait_heard_from([0], timeout=1)
        with pytest.raises(TimeoutError):
            await b0.wait_heard_from([1], timeout=0.05)


def test_bad_arguments_are_refused():
    net = InProcessNetwork()
    with pytest.raises(ValueError):
        EventBus(net.transport(1), 0)
    b = EventBus(net.transport(0), 0)
    with pytest.raises(TypeError):
        b.subscribe(int)
    with pytest.raises(ValueError):
        b.subscribe(overflow="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        b.subscribe(maxsize=0)
    with pytest.raises(ValueError):
        InProcessNetwork(drop=1.5)
    with pytest.raises(ValueError):
        net.partition({0, 1}, {1, 2})


@pytest.mark.asyncio
async def test_block_policy_on_the_receive_path_loses_nothing_and_keeps_order():
    net = InProcessNetwork(seed=10)
    async with cluster(net, 2) as (b0, b1):
        strict = b1.subscribe(Heartbeat, maxsize=2, overflow="block", name="t-strict")
        for step in range(10):
            await b0.publish(Heartbeat(rank=0, step=step))
        await asyncio.sleep(0.01)
        assert strict.statistics().queued == 2  # the bus waits for the consumer
        got = []
        for _ in range(10):
            got.append((await asyncio.wait_for(strict.receive(), 1)).event.step)
            await asyncio.sleep(0)
        assert got == list(range(10))
        assert strict.statistics().dropped == 0 and b1.statistics().gaps == 0


@pytest.mark.asyncio
async def test_event_counts_by_type_are_exported_and_survive_close():
    def published(tag: str) -> float:
        return metrics.sample("elasticep_events_published_total", {"type": tag})

    def received(tag: str) -> float:
        return metrics.sample("elasticep_events_received_total", {"type": tag})

    before = (published("heartbeat"), published("suspicion"), received("heartbeat"))
    net = InProcessNetwork(seed=3)
    a, b = EventBus(net.transport(0), 0), EventBus(net.transport(1), 1)
    async with a, b:
        sub = b.subscribe(Heartbeat, Suspicion)
        for i in range(5):
            await a.publish(Heartbeat(rank=0, step=i))
        a.publish_many([Suspicion(observer=0, suspect=1, source="test", phi=1.0)] * 2)
        for _ in range(7):
            await asyncio.wait_for(sub.receive(), 5)
        # Counted on the hot path as plain ints; summed when scraped.
        assert published("heartbeat") == before[0] + 5
        assert published("suspicion") == before[1] + 2
        assert received("heartbeat") == before[2] + 5
    # Closed buses fold their counts into the total: a counter never goes down.
    assert (published("heartbeat"), published("suspicion"), received("heartbeat")) == (
        before[0] + 5, before[1] + 2, before[2] + 5
    )


@pytest.mark.asyncio
async def test_a_handler_gets_every_batch_in_order_with_gap_reports_and_its_errors_are_counted():
    net = InProcessNetwork(seed=3)
    async with cluster(net, 2) as (a, b):
        got: list = []
        remove = b.add_handler(lambda batch: got.extend(batch))
        calls = []

        def bad(batch):
            calls.append(len(batch))
            raise RuntimeError("a handler that breaks")

        b.add_handler(bad)
        sub = b.subscribe(Heartbeat)
        for _ in range(5):
            a.publish_nowait(Heartbeat(rank=0, incarnation=1))
        await drain(sub)
        net.cut(0, 1)  # two frames from rank 0 to rank 1 are lost
        for _ in range(2):
            a.publish_nowait(Heartbeat(rank=0, incarnation=1))
        await drain(sub)
        net.heal()
        a.publish_nowait(Heartbeat(rank=0, incarnation=1))
        b.publish_nowait(Suspicion(observer=1, suspect=0, source="heartbeat"))  # local: alone
        await drain(sub)
        remote = [e for e in got if e.sender == 0]
        assert [e.seq for e in remote if isinstance(e.event, Heartbeat)] == [1, 2, 3, 4, 5, 8]
        gaps = [e.event for e in got if isinstance(e.event, SequenceGap)]
        assert [(g.sender, g.expected, g.got) for g in gaps] == [(0, 6, 8)]
        assert got.index(next(e for e in got if isinstance(e.event, SequenceGap))) < got.index(remote[-1])
        assert [e.event.suspect for e in got if isinstance(e.event, Suspicion)] == [0]
        assert b.handler_errors == len(calls) >= 2  # logged and counted; delivery went on
        remove()
        seen = len(got)
        a.publish_nowait(Heartbeat(rank=0, incarnation=1))
        assert [e.seq for e in await drain(sub)] == [9]  # delivered to the subscription...
        assert len(got) == seen  # ...not to the removed handler
        with pytest.raises(Exception):
            b.add_handler("not callable")
