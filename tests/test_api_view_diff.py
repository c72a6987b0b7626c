"""View diffs: every installed view says who joined, who left gracefully and who was evicted, with
the cause as typed fields that every rank reads the same; a stream's end says why it ended."""

from __future__ import annotations

import asyncio

import pytest

from elasticep import metrics
from elasticep.bus import EventBus, InProcessNetwork
from elasticep.config import Config
from elasticep.errors import InvalidArgument
from elasticep.events import Envelope, JoinRequest, LeaveRequest, ProcessExit, envelope
from elasticep.membership import (
    CasDone,
    Cause,
    ChangeKind,
    CompareAndSet,
    InMemoryViewStore,
    MemberChange,
    MembershipCore,
    MembershipService,
    RankFenced,
    View,
    ViewDiff,
    ViewRead,
    decode_view,
    encode_view,
)

CFG = Config.local()


# --- pure: the view and the core -----------------------------------------------------------------


def test_first_view_diff_is_every_member_joined_at_bootstrap() -> None:
    d = View.of(1, [2, 0, 1]).diff(None)
    assert isinstance(d, ViewDiff)
    assert d.joined == (0, 1, 2) and d.left == () and d.evicted == ()
    assert {c.cause for c in d.changes} == {Cause.BOOTSTRAP}


def test_diff_without_recorded_changes_falls_back_to_unknown_eviction_and_join() -> None:
    v1 = View.of(4, [0, 1, 2])
    v2 = View.of(5, [0, 2, 3])
    d = v2.diff(v1)
    assert d.joined == (3,) and d.evicted == (1,) and d.left == ()
    assert d.change_of(1).cause is Cause.UNKNOWN and d.change_of(3).cause is Cause.JOIN
    assert d.change_of(0) is None


def test_a_restarted_process_is_evicted_then_joined() -> None:
    v1 = View.of(2, [0, 1])
    v2 = View.of(3, [0, 1], incarnations={1: 7})
    d = v2.diff(v1)
    assert d.evicted == (1,) and d.joined == (1,)
    assert [c.incarnation for c in d.changes] == [0, 7]


def test_changes_round_trip_through_the_store_encoding() -> None:
    ch = MemberChange(rank=3, kind=ChangeKind.EVICTED, cause=Cause.EXIT, detail="signal 9")
    v = View.of(2, [0, 1, 2], changes=[ch])
    back = decode_view(encode_view(v))
    assert back == v and back.changes[0].cause is Cause.EXIT
    assert back.changes[0].cause == "exit"  # a str enum compares with its name


def test_view_refuses_inconsistent_changes() -> None:
    with pytest.raises(InvalidArgument, match="joined but is not a member"):
        View.of(2, [0, 1], changes=[MemberChange(rank=5, kind=ChangeKind.JOINED, cause=Cause.JOIN)])
    with pytest.raises(InvalidArgument, match="still a member"):
        View.of(2, [0, 1], changes=[MemberChange(rank=1, kind=ChangeKind.LEFT, cause=Cause.LEAVE)])
    with pytest.raises(InvalidArgument):
        View.of(1, [0]).diff("not a view")  # type: ignore[arg-type]


def test_unknown_cause_name_reads_as_unknown() -> None:
    assert Cause.of("exit") is Cause.EXIT and Cause.of("cosmic-ray") is Cause.UNKNOWN


def _member_core(rank: int, members: tuple[int, ...]) -> tuple[MembershipCore, float]:
    core = MembershipCore(rank, CFG, initial_members=members)
    now = 0.0
    (cas,) = core.start(now)
    assert isinstance(cas, CompareAndSet)
    core.step(CasDone(cas.view, cas.view), now)
    core.step(ViewRead(2, None), now)
    assert core.status == "member"
    return core, now


def _proposal(actions) -> View:
    (cas,) = [a for a in actions if isinstance(a, CompareAndSet)]
    return cas.view


def test_core_records_an_exit_as_an_eviction_with_its_cause() -> None:
    core, now = _member_core(0, (0, 1, 2))
    view = _proposal(core.step(ProcessExit(rank=2, pid=4121, signal=9), now))
    d = view.diff(core.view)
    assert d.evicted == (2,) and d.left == ()
    change = d.change_of(2)
    assert change.kind is ChangeKind.EVICTED and change.cause is Cause.EXIT
    assert "4121" in change.detail and "signal 9" in change.detail


def test_core_tells_a_graceful_leave_from_an_eviction() -> None:
    core, now = _member_core(0, (0, 1, 2))
    env = envelope(LeaveRequest(rank=1, reason="scale-down"), sender=1, epoch=1, seq=5)
    view = _proposal(core.step(env, now))
    d = view.diff(core.view)
    assert d.left == (1,) and d.evicted == ()
    assert d.change_of(1).cause is Cause.LEAVE


def test_core_records_a_join() -> None:
    core, now = _member_core(0, (0, 1))
    env: Envelope = envelope(JoinRequest(rank=4, incarnation=3), sender=4, epoch=0, seq=1)
    view = _proposal(core.step(env, now))
    d = view.diff(core.view)
    assert d.joined == (4,) and d.change_of(4).cause is Cause.JOIN and d.change_of(4).incarnation == 3


# --- the service: every rank reads the same causes -----------------------------------------------


async def _cluster(n: int, net: InProcessNetwork, store: InMemoryViewStore):
    buses = [EventBus(net.transport(r), r) for r in range(n)]
    services = [MembershipService(r, buses[r], store, CFG, initial_members=tuple(range(n))) for r in range(n)]
    await asyncio.wait_for(asyncio.gather(*(s.start(ready_timeout=5) for s in services)), 10)
    await asyncio.wait_for(asyncio.gather(*(s.wait_member(5) for s in services)), 10)
    return buses, services


async def _close(buses, services) -> None:
    for s in services:
        await s.close()
    for b in buses:
        await b.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_service_changes_say_evicted_then_left_the_same_on_every_rank() -> None:
    net, store = InProcessNetwork(seed=11), InMemoryViewStore()
    buses, services = await _cluster(4, net, store)
    try:
        streams = [s.changes() for s in services[:3]]
        firsts = [await asyncio.wait_for(st.__anext__(), 5) for st in streams]
        assert all(d.view.epoch == 1 and d.joined == (0, 1, 2, 3) for d in firsts)
        before = metrics.sample("elasticep_evictions_total", {"cause": "exit"})
        # Only rank 0's launcher sees rank 3 exit; ranks 1 and 2 learn of it from the view.
        services[0].report(ProcessExit(rank=3, pid=777, signal=9), publish=False)
        await services[3].close()
        await buses[3].close()
        seconds = [await asyncio.wait_for(st.__anext__(), 5) for st in streams]
        for d in seconds:
            assert d.view.epoch == 2 and d.evicted == (3,) and d.left == ()
            assert d.change_of(3).cause is Cause.EXIT and "777" in d.change_of(3).detail
        assert metrics.sample("elasticep_evictions_total", {"cause": "exit"}) == before + 3
        assert [metrics.sample("elasticep_view_members", {"rank": str(r)}) for r in range(3)] == [3.0] * 3

        # Rank 2 leaves gracefully: the others see it as left, not evicted.
        leaver_stream = services[2].changes()
        assert (await asyncio.wait_for(leaver_stream.__anext__(), 5)).view.epoch == 2
        await services[2].leave(timeout=5)
        for st in streams[:2]:
            d = await asyncio.wait_for(st.__anext__(), 5)
            assert d.left == (2,) and d.evicted == () and d.change_of(2).cause is Cause.LEAVE
        # The leaver's own stream: the view without it, then the end; ``ended`` says why.
        rest = [d async for d in leaver_stream]
        assert len(rest) == 1 and rest[0].left == (2,) and 2 not in rest[0].view.members
        assert services[2].ended == "left"
        late = [d async for d in services[2].changes()]
        assert [d.left for d in late] == [(2,)]

        # Closing ends a stream without a leave in it; ``ended`` says closed.
        await services[1].close()
        assert [d async for d in streams[1]] == []
        assert services[1].ended == "closed" and services[0].ended is None
    finally:
        await _close(buses[:3], services[:3])


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_service_changes_raise_when_this_rank_is_fenced() -> None:
    net, store = InProcessNetwork(seed=12), InMemoryViewStore()
    buses, services = await _cluster(3, net, store)
    try:
        stream = services[2].changes()
        await asyncio.wait_for(stream.__anext__(), 5)
        net.partition({0, 1}, {2})
        with pytest.raises(RankFenced):
            async for d in stream:
                pass
        assert services[2].ended == "fenced"
        d = (await services[0].wait_view(lambda v: 2 not in v.members, 5)).diff(services[0].history[0])
        assert d.evicted == (2,) and d.change_of(2).cause is Cause.HEARTBEAT
    finally:
        await _close(buses, services)
