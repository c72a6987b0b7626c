"""User-defined event types on the bus: register a msgspec.Struct, publish it, subscribe to it by
type, over the in-process network and over ZeroMQ with CURVE; bad registrations and bad payloads
are typed errors and counted refusals."""

from __future__ import annotations

import asyncio
import socket
from datetime import timedelta

import msgspec
import pytest

from elasticep import metrics
from elasticep.bus import ClusterKeys, EventBus, InProcessNetwork, NotAnEventType, ZmqTransport, connect_store
from elasticep.errors import ElasticEPError, EventTooLarge, InvalidArgument
from elasticep.events import Custom, Heartbeat


class CacheHit(msgspec.Struct, frozen=True):
    rank: int
    prefix: str
    tokens: list[int] = []


class Tagged(msgspec.Struct, frozen=True, tag="my.tagged"):
    n: int


class Other(msgspec.Struct, frozen=True):
    x: float


async def _buses(n: int, seed: int = 3) -> list[EventBus]:
    net = InProcessNetwork(seed=seed)
    buses = [EventBus(net.transport(r), r) for r in range(n)]
    for b in buses:
        await b.start()
    return buses


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_user_event_round_trip_in_process() -> None:
    buses = await _buses(3)
    try:
        for b in buses:
            assert b.register_event_type(CacheHit, kind="app.cache_hit") == "app.cache_hit"
        hits = [b.subscribe(CacheHit) for b in buses]
        raw = buses[2].subscribe(Custom)
        every = buses[1].subscribe()
        hb = buses[1].subscribe(Heartbeat)
        sent = await buses[0].publish(CacheHit(rank=0, prefix="sys", tokens=[1, 2, 3]))
        assert sent.event == CacheHit(rank=0, prefix="sys", tokens=[1, 2, 3])
        for sub in hits:  # the sender's own subscribers too
            env = await asyncio.wait_for(sub.receive(), 5)
            assert env.event == CacheHit(rank=0, prefix="sys", tokens=[1, 2, 3]) and env.sender == 0
            assert env.seq == sent.seq
        # Subscribers of Custom, and of everything, see what they saw before: the raw Custom.
        env = await asyncio.wait_for(raw.receive(), 5)
        assert isinstance(env.event, Custom) and env.event.kind == "app.cache_hit"
        assert msgspec.msgpack.decode(env.event.data, type=CacheHit).prefix == "sys"
        env = await asyncio.wait_for(every.receive(), 5)
        assert isinstance(env.event, Custom)
        assert hb.statistics().queued == 0
        # publish_many mixes both kinds of event, in order.
        envs = buses[0].publish_many([Heartbeat(rank=0), CacheHit(rank=0, prefix="b")])
        assert [type(e.event) for e in envs] == [Heartbeat, CacheHit]
        env = await asyncio.wait_for(hits[1].receive(), 5)
        assert env.event.prefix == "b" and env.seq == envs[1].seq
    finally:
        for b in buses:
            await b.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_rank_that_did_not_register_still_gets_the_custom() -> None:
    buses = await _buses(2)
    try:
        buses[0].register_event_type(Tagged)
        assert buses[0].event_types() == {"my.tagged": Tagged}  # the struct's tag is the default kind
        raw = buses[1].subscribe(Custom)
        await buses[0].publish(Tagged(n=5))
        env = await asyncio.wait_for(raw.receive(), 5)
        assert env.event.kind == "my.tagged" and msgspec.msgpack.decode(env.event.data) == {"type": "my.tagged", "n": 5}
    finally:
        for b in buses:
            await b.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_payload_that_does_not_decode_is_refused_and_counted() -> None:
    buses = await _buses(2)
    try:
        buses[1].register_event_type(CacheHit, kind="app.cache_hit")
        hits = buses[1].subscribe(CacheHit)
        raw = buses[1].subscribe(Custom)
        before = metrics.sample("elasticep_frames_refused_total", {"reason": "bad_user_event"})
        # Rank 0 sends a different shape under the same kind (a version skew between ranks).
        buses[0].register_event_type(Other, kind="app.cache_hit")
        await buses[0].publish(Other(x=1.5))
        await asyncio.wait_for(raw.receive(), 5)
        await asyncio.sleep(0.05)
        assert hits.statistics().queued == 0
        assert buses[1].statistics().refused.get("bad_user_event") == 1
        assert metrics.sample("elasticep_frames_refused_total", {"reason": "bad_user_event"}) == before + 1
        # The loop keeps going: a good one after it arrives.
        await buses[0].publish(Custom(kind="app.cache_hit", data=msgspec.Raw(msgspec.msgpack.encode(CacheHit(rank=0, prefix="ok")))))
        env = await asyncio.wait_for(hits.receive(), 5)
        assert env.event.prefix == "ok"
    finally:
        for b in buses:
            await b.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_bad_registrations_and_unregistered_types_are_typed_errors() -> None:
    (bus,) = await _buses(1)
    try:
        with pytest.raises(NotAnEventType, match="register_event_type"):
            await bus.publish(CacheHit(rank=0, prefix="x"))
        with pytest.raises(NotAnEventType):
            bus.subscribe(CacheHit)
        with pytest.raises(NotAnEventType):
            bus.publish_many([Heartbeat(rank=0), CacheHit(rank=0, prefix="x")])
        assert bus.statistics().published == 0  # nothing of a refused batch went out
        with pytest.raises(InvalidArgument, match="msgspec.Struct"):
            bus.register_event_type(dict)
        with pytest.raises(InvalidArgument, match="elasticep event type"):
            bus.register_event_type(Heartbeat)
        with pytest.raises(InvalidArgument, match="kind"):
            bus.register_event_type(CacheHit, kind="")
        bus.register_event_type(CacheHit, kind="a")
        assert bus.register_event_type(CacheHit, kind="a") == "a"  # the same again: a no-op
        with pytest.raises(InvalidArgument, match="registered as kind"):
            bus.register_event_type(CacheHit, kind="b")
        with pytest.raises(InvalidArgument, match="registered for CacheHit"):
            bus.register_event_type(Other, kind="a")
        with pytest.raises(InvalidArgument, match="block"):
            bus.subscribe(CacheHit, overflow="block")
        with pytest.raises(EventTooLarge) as err:
            bus.publish_nowait(CacheHit(rank=0, prefix="x" * (2 << 20)))
        assert err.value.event_type == "a" and isinstance(err.value, ElasticEPError)
        assert bus.statistics().published == 0
    finally:
        await bus.close()


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_user_event_over_zeromq_with_curve() -> None:
    from torch.distributed import TCPStore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=10), use_libuv=True)
    keys = ClusterKeys.generate(world=2)
    ranks = [EventBus(ZmqTransport(r, keys.for_rank(r), connect_store(f"127.0.0.1:{port}"), poll_interval_s=0.02), r)
             for r in range(2)]
    async with ranks[0], ranks[1]:
        for b in ranks:
            b.register_event_type(CacheHit, kind="app.cache_hit")
        hits = ranks[1].subscribe(CacheHit)
        while 0 not in ranks[1].heard_from():
            await ranks[0].publish(Heartbeat(rank=0))
            await asyncio.sleep(0.01)
        await ranks[0].publish(CacheHit(rank=0, prefix="over zmq", tokens=list(range(100))))
        env = await asyncio.wait_for(hits.receive(), 10)
        assert env.event == CacheHit(rank=0, prefix="over zmq", tokens=list(range(100))) and env.sender == 0
