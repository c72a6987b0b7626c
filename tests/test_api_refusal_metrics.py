"""Every refused call to a public entry point is counted once in elasticep_api_refused_total{area}."""

from __future__ import annotations

import asyncio

import pytest
import torch

from elasticep import metrics
from elasticep.bus import EventBus, InProcessNetwork, NotAnEventType
from elasticep.config import Config
from elasticep.eplb import Placement, initial, replan
from elasticep.errors import InvalidArgument
from elasticep.membership import InMemoryViewStore, MembershipService, View


def _refused(area: str) -> float:
    return metrics.sample("elasticep_api_refused_total", {"area": area})


@pytest.mark.parametrize(
    "area, call",
    [
        ("planner", lambda: initial(torch.ones(1, 4), 0, 2)),
        ("planner", lambda: replan(initial(torch.ones(1, 4), 2, 2), torch.ones(1, 4), torch.tensor([1, 1]))),
        ("placement", lambda: Placement([[0, 1, 2]], 2)),
        ("view", lambda: View.of(1, [])),
        ("view", lambda: View(epoch=0, members=(0,), leader=0)),
        # the service's core refuses the members: counted once, not once per layer
        ("membership", lambda: MembershipService(0, EventBus(InProcessNetwork().transport(0), 0), InMemoryViewStore(),
                                                  Config.local(), initial_members=(0, 0))),
    ],
)
def test_a_refusal_is_counted_once(area, call) -> None:
    before = _refused(area)
    with pytest.raises(InvalidArgument):
        call()
    assert _refused(area) == before + 1


def test_bus_refusals_are_counted() -> None:
    async def run() -> None:
        bus = EventBus(InProcessNetwork().transport(0), 0)
        await bus.start()
        try:
            before = _refused("bus")
            with pytest.raises(InvalidArgument):
                bus.subscribe(maxsize=0)
            with pytest.raises(NotAnEventType):
                bus.publish_nowait(object())
            with pytest.raises(NotAnEventType):
                bus.subscribe(int)
            assert _refused("bus") == before + 3
        finally:
            await bus.close()

    asyncio.run(run())
