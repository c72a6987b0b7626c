"""MembershipService before start and after close: typed errors that say so, streams that end."""

from __future__ import annotations

import asyncio

import pytest

from elasticep.bus import EventBus, InProcessNetwork
from elasticep.config import Config
from elasticep.errors import Closed, NotStarted, WaitTimeout
from elasticep.events import ProcessExit
from elasticep.membership import InMemoryViewStore, MembershipService


def _service():
    net = InProcessNetwork(seed=5)
    bus = EventBus(net.transport(0), 0)
    return bus, MembershipService(0, bus, InMemoryViewStore(), Config.local(), initial_members=(0,))


@pytest.mark.asyncio
async def test_before_start_every_call_says_not_started() -> None:
    bus, svc = _service()
    assert svc.status == "new"
    with pytest.raises(NotStarted, match="start"):
        svc.report(ProcessExit(rank=1))
    with pytest.raises(NotStarted):
        await svc.leave(timeout=0.1)
    with pytest.raises(NotStarted):
        await svc.wait_member(0.1)
    with pytest.raises(NotStarted):
        await svc.wait_view(lambda v: True, 0.1)
    await bus.close()


@pytest.mark.asyncio
async def test_after_close_views_end_and_status_says_closed() -> None:
    bus, svc = _service()
    await svc.start()
    view = await svc.wait_member(5)
    assert view.members == (0,) and svc.status == "member"
    with pytest.raises(WaitTimeout, match="waiting for"):
        await svc.wait_view(lambda v: v.epoch == 99, 0.05)
    await svc.close()
    assert svc.current is None and svc.status == "closed"
    got = [v async for v in svc.views()]
    assert got == []
    with pytest.raises(Closed):
        await svc.wait_member(0.1)
    await asyncio.wait_for(bus.close(), 5)
