"""MembershipService and MembershipCore refuse bad constructor arguments with InvalidArgument,
naming what is wrong, instead of accepting them and misbehaving later."""

from __future__ import annotations

import numpy as np
import pytest

from elasticep.bus import EventBus, InProcessNetwork
from elasticep.config import Config
from elasticep.errors import ElasticEPError, InvalidArgument
from elasticep.membership import InMemoryViewStore, MembershipCore, MembershipService, View

CFG = Config.local()


def _bus(rank: int) -> EventBus:
    return EventBus(InProcessNetwork(seed=1).transport(rank), rank)


def test_another_ranks_bus_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="rank 1's"):
        MembershipService(0, _bus(1), InMemoryViewStore(), CFG, initial_members=(0, 1))


def test_repeated_initial_members_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="repeats rank"):
        MembershipService(0, _bus(0), InMemoryViewStore(), CFG, initial_members=(2, 0, 0))


def test_initial_members_with_join_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="not both"):
        MembershipService(0, _bus(0), InMemoryViewStore(), CFG, initial_members=(0, 1), join=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(initial_members=(0, -1)), "rank id"),
        (dict(initial_members=(0, "1")), "rank id"),
        (dict(initial_members="01"), "sequence of rank ids"),
        (dict(initial_members=(1, 2)), "not among"),
        (dict(initial_members=()), "not among"),
        (dict(initial_members=None), "join=True"),
        (dict(initial_members=(0,), join="yes"), "join must be"),
        (dict(initial_members=(0,), incarnation=-3), "incarnation"),
        (dict(initial_members=(0,), clock=5), "clock"),
        (dict(initial_members=(0,), on_install="print"), "on_install"),
    ],
)
def test_bad_service_arguments(kwargs, match) -> None:
    with pytest.raises(InvalidArgument, match=match):
        MembershipService(0, _bus(0), InMemoryViewStore(), CFG, **kwargs)


def test_bad_store_config_and_bus_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="ViewStore"):
        MembershipService(0, _bus(0), object(), CFG, initial_members=(0,))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="Config"):
        MembershipService(0, _bus(0), InMemoryViewStore(), {"grace_ms": 5}, initial_members=(0,))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="EventBus"):
        MembershipService(0, object(), InMemoryViewStore(), CFG, initial_members=(0,))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="rank id"):
        MembershipService(True, _bus(1), InMemoryViewStore(), CFG, initial_members=(1,))  # type: ignore[arg-type]


def test_numpy_rank_ids_are_accepted_as_ints() -> None:
    core = MembershipCore(np.int64(1), CFG, initial_members=np.arange(3))
    assert core.rank == 1 and core.initial == (0, 1, 2) and type(core.rank) is int


def test_core_refuses_the_same_as_the_service() -> None:
    with pytest.raises(InvalidArgument, match="repeats"):
        MembershipCore(0, CFG, initial_members=[0, 1, 1])
    with pytest.raises(InvalidArgument, match="not both"):
        MembershipCore(0, CFG, initial_members=[0], join=True)
    with pytest.raises(InvalidArgument, match="Config"):
        MembershipCore(0, None, initial_members=[0])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(epoch=0, members=(0,), leader=0),
        dict(epoch=1, members=(1, 0), leader=0),
        dict(epoch=1, members=(), leader=-1),
        dict(epoch=1, members=(0, 1), leader=1),
        dict(epoch=1, members=[0, 1], leader=0),
        dict(epoch=1, members=(-1, 0), leader=-1),
        dict(epoch="1", members=(0,), leader=0),
        dict(epoch=1, members=(0, 1), leader=0, incarnations=(1,)),
    ],
)
def test_bad_views_are_invalid_arguments(kwargs) -> None:
    with pytest.raises(InvalidArgument) as err:
        View(**kwargs)
    assert isinstance(err.value, (ElasticEPError, ValueError))


def test_view_of_refuses_non_rank_members() -> None:
    with pytest.raises(InvalidArgument):
        View.of(1, [0, "a"])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument):
        View.of(1, [])


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_running_service_refuses_bad_call_arguments() -> None:
    import math

    from elasticep.bus import NotAnEventType

    bus = _bus(0)
    svc = MembershipService(0, bus, InMemoryViewStore(), CFG, initial_members=(0,))
    await svc.start()
    try:
        await svc.wait_member(5)
        for bad in ("soon", -1, math.nan, None, True):
            with pytest.raises(InvalidArgument, match="timeout"):
                await svc.wait_member(bad)  # type: ignore[arg-type]
            with pytest.raises(InvalidArgument, match="timeout"):
                await svc.wait_view(lambda v: True, bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="predicate"):
            await svc.wait_view(3, 1.0)  # type: ignore[arg-type]
        with pytest.raises(NotAnEventType, match="report"):
            svc.report("rank 1 died")  # was dropped without a word
        with pytest.raises(InvalidArgument, match="reason"):
            await svc.leave(reason=5)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="timeout"):
            await svc.leave(timeout=-2)
        assert svc.status == "member"  # none of it reached the core
    finally:
        await svc.close()
        await bus.close()
