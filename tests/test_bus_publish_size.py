"""An event too large for any peer is refused at publish with a typed error; nothing is sent."""

from __future__ import annotations

import msgspec
import pytest

from elasticep.bus import EventBus, InProcessNetwork
from elasticep.errors import EventTooLarge
from elasticep.events import Custom, Heartbeat


@pytest.mark.asyncio
async def test_oversize_custom_is_refused_at_publish() -> None:
    net = InProcessNetwork(seed=3)
    async with EventBus(net.transport(0), 0) as b0:
        sub = b0.subscribe()
        big = Custom(kind="blob", data=msgspec.Raw(msgspec.msgpack.encode(b"x" * (2 << 20))))
        with pytest.raises(EventTooLarge) as info:
            await b0.publish(big)
        assert info.value.size > info.value.limit == b0.codec.max_frame_bytes
        with pytest.raises(EventTooLarge):
            b0.publish_many([Heartbeat(rank=0), big])
        env = await b0.publish(Heartbeat(rank=0))
        assert env.seq == 1  # the refused events took no sequence number
        assert sub.receive_nowait().event == Heartbeat(rank=0)
        assert sub.statistics().queued == 0
