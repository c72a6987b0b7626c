"""An in-process network for tests: every rank's transport lives in one asyncio event loop.

Shipped in the package so that users test their own handlers against the real
:class:`~elasticep.bus.EventBus` with faults injected: seeded random drop, delay (with jitter),
duplication, partitions, one-way link cuts and a per-receiver high-water mark, plus
:meth:`InProcessNetwork.inject` to put arbitrary bytes on the wire as if a rank had sent them.

Semantics match the ZeroMQ transport's: a frame goes to every other attached rank, each link is
FIFO (a delay never reorders a link, it only holds later frames back too), and a receiver whose
queue holds ``hwm`` frames drops the new ones. Every random choice comes from one
``random.Random(seed)`` drawn in send order, so a test that sends in the same order sees the same
drops and duplicates every run.

Use one network per event loop; it is not thread-safe.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections import Counter
from typing import Iterable

from elasticep.bus.transport import Frame, Transport, TransportClosed
from elasticep.errors import InvalidArgument

_RECEIVE_BATCH = 4096


class InProcessNetwork:
    """A seeded, fault-injecting broadcast network between :class:`InProcessTransport` objects.

    Args:
        seed: seeds the one random source behind drop and duplicate decisions and jitter.
        drop: probability in [0, 1] that a frame is lost on one link.
        delay_ms: fixed one-way delay added to every frame, ms.
        jitter_ms: extra uniform random delay in ``[0, jitter_ms)``, ms (never reorders a link).
        duplicate: probability in [0, 1] that a delivered frame is delivered twice.
        hwm: frames a receiver may hold undelivered before new ones are dropped (ZeroMQ's
            high-water mark).

    Example::

        net = InProcessNetwork(seed=7)
        a, b = net.transport(0), net.transport(1)
        net.partition({0}, {1})   # nothing crosses until net.heal()
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        drop: float = 0.0,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        duplicate: float = 0.0,
        hwm: int = 100_000,
    ) -> None:
        self._random = random.Random(seed)
        self.set_drop(drop)
        self.set_delay(delay_ms, jitter_ms)
        self.set_duplicate(duplicate)
        if hwm < 1:
            raise InvalidArgument("hwm must be >= 1")
        self.hwm = hwm
        self._attached: dict[int, InProcessTransport] = {}
        self._incarnations: dict[int, int] = {}
        self._group_of: dict[int, int] = {}
        self._cut: set[tuple[int, int]] = set()
        self._link_ready_at: dict[tuple[int, int], float] = {}
        self._order = itertools.count()
        self.stats: Counter[str] = Counter()
        """Frames by fate: ``sent`` (per link), ``delivered``, ``duplicated``, ``dropped_random``,
        ``dropped_partition``, ``dropped_hwm``, ``injected``."""

    # --- controls ---------------------------------------------------------------------------

    def set_drop(self, p: float) -> None:
        """Lose each frame on each link with probability ``p``."""
        if not 0.0 <= p <= 1.0:
            raise InvalidArgument(f"drop probability {p} is not in [0, 1]")
        self.drop = p

    def set_delay(self, ms: float, jitter_ms: float = 0.0) -> None:
        """Delay every frame by ``ms`` plus a uniform ``[0, jitter_ms)``, in milliseconds."""
        if ms < 0 or jitter_ms < 0:
            raise InvalidArgument("delay and jitter must be >= 0")
        self.delay_ms = ms
        self.jitter_ms = jitter_ms

    def set_duplicate(self, p: float) -> None:
        """Deliver each delivered frame a second time with probability ``p``."""
        if not 0.0 <= p <= 1.0:
            raise InvalidArgument(f"duplicate probability {p} is not in [0, 1]")
        self.duplicate = p

    def partition(self, *groups: Iterable[int]) -> None:
        """Split the network: frames cross only between ranks of the same group.

        Ranks named in no group form one more group together. ``partition({0, 1}, {2, 3})``
        keeps 0-1 and 2-3 talking and cuts every link between the pairs. Replaces any earlier
        partition; one-way :meth:`cut` links stay cut.
        """
        group_of: dict[int, int] = {}
        for index, group in enumerate(groups):
            for rank in group:
                if rank in group_of:
                    raise InvalidArgument(f"rank {rank} is in two partition groups")
                group_of[rank] = index
        self._group_of = group_of

    def cut(self, src: int, dst: int) -> None:
        """Cut the one-way link ``src -> dst`` (an asymmetric partition)."""
        self._cut.add((src, dst))

    def heal(self) -> None:
        """Remove every partition and cut link."""
        self._group_of = {}
        self._cut.clear()

    def reachable(self, src: int, dst: int) -> bool:
        """Whether a frame from ``src`` can reach ``dst`` under the current partition and cuts."""
        if (src, dst) in self._cut:
            return False
        return self._group_of.get(src, -1) == self._group_of.get(dst, -1)

    # --- transports -------------------------------------------------------------------------

    def transport(self, rank: int, *, incarnation: int | None = None) -> "InProcessTransport":
        """A transport for ``rank``. Calling it again for the same rank models a restart: the new
        transport gets the next incarnation and, once started, replaces the old one as receiver.
        """
        if rank < 0:
            raise InvalidArgument("rank must be >= 0")
        if incarnation is None:
            incarnation = self._incarnations.get(rank, 0) + 1
        self._incarnations[rank] = max(incarnation, self._incarnations.get(rank, 0))
        return InProcessTransport(self, rank, incarnation)

    def ranks(self) -> set[int]:
        """Ranks with a started, open transport."""
        return set(self._attached)

    def inject(self, dst: int, data: bytes, *, sender: int, incarnation: int | None = None) -> None:
        """Deliver raw ``data`` to ``dst`` as if ``sender`` had sent it (for fuzzing and forgery tests).

        Bypasses drop, delay and partitions. ``incarnation`` defaults to the sender's current one.
        """
        target = self._attached.get(dst)
        if target is None:
            raise KeyError(f"rank {dst} has no started transport")
        if incarnation is None:
            incarnation = self._incarnations.get(sender, 1)
        self.stats["injected"] += 1
        target._enqueue(target._now(), (sender, incarnation, bytes(data)))

    # --- wire -------------------------------------------------------------------------------

    def _attach(self, transport: "InProcessTransport") -> None:
        self._attached[transport.rank] = transport

    def _detach(self, transport: "InProcessTransport") -> None:
        if self._attached.get(transport.rank) is transport:
            del self._attached[transport.rank]

    def _broadcast(self, src: "InProcessTransport", frames: list[bytes]) -> None:
        now = src._now()
        rnd = self._random
        for dst_rank, dst in list(self._attached.items()):
            if dst_rank == src.rank or dst is src:
                continue
            link = (src.rank, dst_rank)
            for data in frames:
                self.stats["sent"] += 1
                if not self.reachable(src.rank, dst_rank):
                    self.stats["dropped_partition"] += 1
                    continue
                if self.drop and rnd.random() < self.drop:
                    self.stats["dropped_random"] += 1
                    continue
                if len(dst._inbox) >= self.hwm:
                    self.stats["dropped_hwm"] += 1
                    continue
                at = now
                if self.delay_ms or self.jitter_ms:
                    at += (self.delay_ms + (rnd.random() * self.jitter_ms if self.jitter_ms else 0.0)) / 1e3
                    # FIFO per link: a frame never overtakes an earlier one on the same link.
                    at = max(at, self._link_ready_at.get(link, 0.0))
                    self._link_ready_at[link] = at
                frame = (src.rank, src.incarnation, data)
                dst._enqueue(at, frame)
                self.stats["delivered"] += 1
                if self.duplicate and rnd.random() < self.duplicate:
                    dst._enqueue(at, frame)
                    self.stats["duplicated"] += 1


class InProcessTransport(Transport):
    """One rank's end of an :class:`InProcessNetwork`; the sender it reports is its own ``rank``."""

    def __init__(self, network: InProcessNetwork, rank: int, incarnation: int) -> None:
        self.network = network
        self.rank = rank
        self.incarnation = incarnation
        self._inbox: list[tuple[float, int, Frame]] = []
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return f"InProcessTransport(rank={self.rank}, incarnation={self.incarnation})"

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else asyncio.get_running_loop().time()

    def _enqueue(self, at: float, frame: Frame) -> None:
        heapq.heappush(self._inbox, (at, next(self.network._order), frame))
        if self._wakeup is not None:
            self._wakeup.set()

    async def start(self) -> None:
        if self._closed:
            raise TransportClosed("transport is closed")
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._started = True
        self.network._attach(self)

    def send(self, frame: bytes) -> None:
        if self._started and not self._closed:
            self.network._broadcast(self, [frame])

    def send_many(self, frames: list[bytes]) -> None:
        if self._started and not self._closed:
            self.network._broadcast(self, frames)

    async def receive(self) -> list[Frame]:
        if not self._started:
            raise RuntimeError("start() the transport before receive()")
        assert self._wakeup is not None and self._loop is not None
        inbox = self._inbox
        while True:
            if self._closed:
                raise TransportClosed("transport is closed")
            now = self._loop.time()
            if inbox and inbox[0][0] <= now:
                out: list[Frame] = []
                while inbox and inbox[0][0] <= now and len(out) < _RECEIVE_BATCH:
                    out.append(heapq.heappop(inbox)[2])
                return out
            self._wakeup.clear()
            timeout = (inbox[0][0] - now) if inbox else None
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def peers(self) -> set[int]:
        return {r for r in self.network._attached if r != self.rank}

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.network._detach(self)
        self._inbox.clear()
        if self._wakeup is not None:
            self._wakeup.set()
