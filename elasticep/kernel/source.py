"""``KernelMaskSource``: turns the CPU kernel's peer timeouts into ``PeerTimeout`` events.

The engine calls :meth:`KernelMaskSource.poll` (or :meth:`KernelMaskSource.publish_new`) after a
dispatch or combine. Unlike a bare mask diff, it reports what the kernel recorded for each timed
out peer: the op that waited, the layer and the time waited. It also fits the generic
:class:`elasticep.detect.MaskProvider` interface, since :class:`~elasticep.kernel.EPBuffer`
exposes ``active_ranks`` and ``timeout_us``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from elasticep.events import PeerTimeout
from elasticep.kernel.buffer import EPBuffer

Publish = Callable[[PeerTimeout], Any]
"""``bus.publish`` (a coroutine function) or a plain callback taking one event."""


class KernelMaskSource:
    """Reads an :class:`EPBuffer`'s timeout log and yields one :class:`PeerTimeout` per timed-out peer.

    Args:
        buffer: the rank's kernel buffer; its rank is the events' ``observer``.
        publish: where :meth:`publish_new` sends events: a coroutine function (awaited in order)
            or a plain callable. Calls are made one at a time, never concurrently.

    Every timeout is reported exactly once, however many calls happened between two polls (the
    buffer keeps the last 1024).
    """

    def __init__(self, buffer: EPBuffer, publish: Publish | None = None) -> None:
        self.buffer = buffer
        self._publish = publish
        self._cursor = 0
        self.reported = 0
        """Events produced so far."""

    def poll(self) -> list[PeerTimeout]:
        """The timeouts recorded since the last poll, as events (no I/O)."""
        records, self._cursor = self.buffer.timeouts_since(self._cursor)
        events = [
            PeerTimeout(observer=self.buffer.rank, peer=r.peer, op=r.op, layer=r.layer, waited_us=r.waited_us)
            for r in records
        ]
        self.reported += len(events)
        return events

    async def publish_new(self) -> list[PeerTimeout]:
        """:meth:`poll`, then hand each event to ``publish``; returns the events."""
        if self._publish is None:
            raise RuntimeError("KernelMaskSource was built without a publish callable")
        events = self.poll()
        for event in events:
            result = self._publish(event)
            if inspect.isawaitable(result):
                await result
        return events
