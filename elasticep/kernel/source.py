"""``KernelMaskSource``: turns the CPU kernel's peer timeouts into ``PeerTimeout`` events.

The engine calls :meth:`KernelMaskSource.poll` (or :meth:`KernelMaskSource.publish_new`) after a
dispatch or combine. Unlike a bare mask diff, it reports what the kernel recorded for each timed
out peer: the op that waited, the layer and the time waited. It also fits the generic
:class:`elasticep.detect.MaskProvider` interface, since :class:`~elasticep.kernel.EPBuffer`
exposes ``active_ranks`` and ``timeout_us``.
"""

from __future__ import annotations

import asyncio
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


class KernelWaitWatch:
    """Reports the peers a kernel call in progress is still waiting on, while it waits.

    The kernel's ``timeout_us`` is the hard bound of one call: past it the peer is marked inactive
    and the step fails. A peer that stopped taking part (a masked or stopped rank) can be known
    well before: this watch, run on another thread (the agent's loop) while the compute thread
    is blocked in :meth:`EPBuffer.dispatch` or :meth:`EPBuffer.combine`, reads
    :meth:`EPBuffer.waiting` and turns each peer waited on for ``report_after_ms`` or more into a
    :class:`PeerTimeout` whose ``waited_us`` is the wait so far, again every ``every_ms`` while the
    wait goes on (each report vouches for a longer silence). The membership's fusion policy then
    decides: two observers' reports of ``grace_ms`` or more evict, a lone one does not, and the
    call itself keeps waiting, so a report that is not corroborated costs nothing.

    Args:
        buffer: the rank's :class:`EPBuffer`, or a callable returning the current one (None
            while there is none), since a rank opens a new buffer each epoch.
        report_after_ms: waits shorter than this are not reported, ms.
        every_ms: a wait still going is reported again after this long, ms.
        skip_dispatches: waits within a buffer's first this many dispatches (and their combines)
            are left to the call's own timeout: ranks reach a new epoch's first call at moments
            apart (start-up, a reconfiguration's commit), and that skew is not a late peer.
    """

    def __init__(self, buffer: EPBuffer | Callable[[], EPBuffer | None], *, report_after_ms: float = 100.0,
                 every_ms: float = 40.0, skip_dispatches: int = 1) -> None:
        if report_after_ms < 0 or every_ms <= 0 or skip_dispatches < 0:
            raise ValueError("report_after_ms and skip_dispatches must be >= 0, every_ms > 0")
        self.skip_dispatches = int(skip_dispatches)
        self._buffer = buffer if callable(buffer) else (lambda: buffer)
        self.report_after_ms = float(report_after_ms)
        self.every_ms = float(every_ms)
        self._last: dict[tuple[int, int], int] = {}  # (wait since_ns, peer) -> waited_us last reported
        self.reported = 0
        """Events produced so far."""

    def poll(self) -> list[PeerTimeout]:
        """The peers to report now, as events (no I/O)."""
        buf = self._buffer()
        if buf is None or buf.dispatches <= self.skip_dispatches:
            self._last.clear()
            return []
        waits = buf.waiting(int(self.report_after_ms * 1000))
        current = {(w.since_ns, w.peer) for w in waits}
        for key in [k for k in self._last if k not in current]:
            del self._last[key]  # that wait ended
        out = []
        for w in waits:
            key = (w.since_ns, w.peer)
            last = self._last.get(key)
            if last is not None and w.waited_us - last < self.every_ms * 1000:
                continue
            self._last[key] = w.waited_us
            out.append(PeerTimeout(observer=buf.rank, peer=w.peer, op=w.op, layer=w.layer, waited_us=w.waited_us))
        self.reported += len(out)
        return out

    async def run(self, publish: Publish, interval_s: float | None = None) -> None:
        """Poll every ``interval_s`` (default half of ``every_ms``) until cancelled; hand each event
        to ``publish`` (a coroutine function, awaited, or a plain callable)."""
        interval = self.every_ms / 2e3 if interval_s is None else float(interval_s)
        while True:
            for event in self.poll():
                result = publish(event)
                if inspect.isawaitable(result):
                    await result
            await asyncio.sleep(interval)
