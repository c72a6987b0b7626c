"""The event-loop choice (:mod:`elasticep.bus.loop`) and the bus running on each loop."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from elasticep.bus import ClusterKeys, EventBus, ZmqTransport, event_loop_kind, new_event_loop
from elasticep.bus import loop as loop_module
from elasticep.bus.loop import EVENT_LOOP_ENV, run
from elasticep.events import Heartbeat, Suspicion


def test_argument_beats_environment_beats_auto(monkeypatch):
    monkeypatch.delenv(EVENT_LOOP_ENV, raising=False)
    assert event_loop_kind() == "uvloop"  # auto, with uvloop installed
    monkeypatch.setenv(EVENT_LOOP_ENV, "asyncio")
    assert event_loop_kind() == "asyncio"
    assert event_loop_kind("uvloop") == "uvloop"
    assert event_loop_kind("auto") == "uvloop"


def test_loops_made_are_of_the_kind_asked(monkeypatch):
    monkeypatch.delenv(EVENT_LOOP_ENV, raising=False)
    for kind, cls in (("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)):
        loop = new_event_loop(kind)
        try:
            assert isinstance(loop, cls)
            if kind == "asyncio":
                assert not isinstance(loop, uvloop.Loop)
        finally:
            loop.close()


def test_unknown_kind_and_missing_uvloop_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="event loop must be one of"):
        event_loop_kind("trio")
    monkeypatch.setenv(EVENT_LOOP_ENV, "epoll")
    with pytest.raises(ValueError, match="'epoll'"):
        new_event_loop()
    monkeypatch.delenv(EVENT_LOOP_ENV)
    # As on a platform without uvloop: auto falls back, an explicit request fails loudly.
    monkeypatch.setattr(loop_module, "_uvloop", lambda: None)
    assert event_loop_kind() == "asyncio"
    with pytest.raises(ImportError, match="uvloop is not installed"):
        new_event_loop("uvloop")


async def _round_trip(store) -> tuple[str, list[float], dict[str, int]]:
    """Two ranks' buses over real CURVE ZeroMQ sockets in this loop; rank 1 collects rank 0's burst."""
    keys = ClusterKeys.generate(2)
    t0 = ZmqTransport(0, keys.for_rank(0), store, poll_interval_s=0.01)
    t1 = ZmqTransport(1, keys.for_rank(1), store, poll_interval_s=0.01)
    async with EventBus(t0, 0) as bus0, EventBus(t1, 1) as bus1:
        sub = bus1.subscribe(Suspicion)
        deadline = asyncio.get_running_loop().time() + 20
        while 0 not in bus1.heard_from():
            await bus0.publish(Heartbeat(rank=0, step=0))
            await asyncio.sleep(0.01)
            assert asyncio.get_running_loop().time() < deadline, "rank 1 never heard rank 0"
        for i in range(1, 501):
            await bus0.publish(Suspicion(observer=0, suspect=1, source="test", phi=float(i)))
            if i % 100 == 0:
                await asyncio.sleep(0)
        got = []
        async with asyncio.timeout(20):
            async for env in sub:
                got.append(env.event.phi)
                if len(got) == 500:
                    break
        return type(asyncio.get_running_loop()).__module__, got, bus1.statistics().refused


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_bus_over_zeromq_on_each_loop(kind, tcp_store):
    module, got, refused = run(_round_trip(tcp_store), kind=kind)
    assert module.split(".")[0] == kind
    assert got == [float(i) for i in range(1, 501)]  # complete and in order
    assert refused == {}
