"""A simulated cluster for scale: N pure membership cores on a virtual clock (1024 to 4096 ranks).

No sockets, no threads, no sleeps. Each rank is a :class:`~elasticep.membership.MembershipCore`;
a frame a rank publishes reaches the ranks whose topology subscribes to it
(:meth:`MembershipCore.hears`: everyone with ``"all"``, the ring neighbours with ``"ring"``)
after a modeled one-way delay (``delay_ms`` plus uniform ``jitter_ms``), each copy lost with
probability ``loss``; view-store operations take ``store_ms``. Every random draw comes from one
``random.Random(seed)``. Ticks follow :meth:`MembershipCore.tick_interval`, phases spread.

Example::

    sim = SimCluster(256, Config.local(detection_topology="ring"), seed=1)
    sim.run_for(0.5)
    t0 = sim.now
    sim.hang(17)
    sim.run_until(lambda: sim.all_exclude(17), limit_s=3.0)
    print(max(sim.installed_without(17).values()) - t0)
"""

from __future__ import annotations

import heapq
import itertools
import random
from typing import Callable

from elasticep.config import Config
from elasticep.events import SCHEMA_VERSION, Codec, Envelope, ProcessExit
from elasticep.membership.core import (
    CasDone,
    CompareAndSet,
    Install,
    MembershipCore,
    Publish,
    ReadView,
    Tick,
    ViewRead,
)
from elasticep.membership.view import View


class SimCluster:
    """``n`` ranks bootstrapping together at virtual time 0 (every one starts *joining*)."""

    def __init__(self, n: int, config: Config, *, seed: int = 0, delay_ms: float = 0.1, jitter_ms: float = 0.1,
                 loss: float = 0.0, store_ms: float = 0.5) -> None:
        self.config = config
        self.now = 0.0
        self.rng = random.Random(seed)
        self.delay_s, self.jitter_s, self.loss, self.store_s = delay_ms / 1e3, jitter_ms / 1e3, loss, store_ms / 1e3
        self.store: dict[int, View] = {}
        self.cores = {r: MembershipCore(r, config, initial_members=tuple(range(n))) for r in range(n)}
        self.state = {r: "up" for r in range(n)}
        self.seq = {r: itertools.count(1) for r in range(n)}
        self.installs: dict[int, list[tuple[float, View]]] = {r: [] for r in range(n)}
        self.delivered = 0
        self.delivered_bytes = 0
        self._size: dict[type, int] = {}
        self._codec = Codec()
        self._heap: list[tuple[float, int, int, object]] = []
        self._order = itertools.count()
        for r, core in self.cores.items():
            self._push(r * 1e-5, r, "start")

    # --- plumbing ---------------------------------------------------------------------------

    def _push(self, at: float, rank: int, item: object) -> None:
        heapq.heappush(self._heap, (at, next(self._order), rank, item))

    def _subscribers(self, src: int) -> list[int]:
        core = self.cores[src]
        if core.topology.everyone:
            return [r for r in self.cores if r != src]
        # The ranks that subscribe to src: its ring neighbours in its own view and in the
        # store's head view, confirmed by each receiver's own predicate (its own view).
        cand: set[int] = set()
        for view in (core.view, self.store.get(max(self.store)) if self.store else None):
            if view is not None:
                cand.update(core.topology.neighbors(view.members, src))
        return [r for r in cand if r in self.cores and self.cores[r].hears(src)]

    def _size_of(self, env: Envelope) -> int:
        t = type(env.event)
        if t not in self._size:
            self._size[t] = len(self._codec.encode(env)) + 12  # + the transport's framing
        return self._size[t]

    def _apply(self, rank: int, actions: list) -> None:
        core = self.cores[rank]
        for a in actions:
            if isinstance(a, Publish):
                env = Envelope(SCHEMA_VERSION, rank, core.view.epoch if core.view else 0, next(self.seq[rank]),
                               0, int(self.now * 1e9), a.event)
                for dst in self._subscribers(rank):
                    if self.loss and self.rng.random() < self.loss:
                        continue
                    self._push(self.now + self.delay_s + self.rng.random() * self.jitter_s, dst, env)
            elif isinstance(a, (CompareAndSet, ReadView)):
                self._push(self.now + self.store_s, rank, a)
            elif isinstance(a, Install):
                self.installs[rank].append((self.now, a.view))

    def _handle(self, rank: int, item: object) -> None:
        if self.state[rank] != "up":
            return
        core = self.cores[rank]
        if item == "start":
            self._apply(rank, core.start(self.now))
            self._push(self.now + core.tick_interval(), rank, "tick")
        elif item == "tick":
            self._apply(rank, core.step(Tick(), self.now))
            if not core.stopped:
                self._push(self.now + core.tick_interval(), rank, "tick")
        elif isinstance(item, CompareAndSet):
            committed = self.store.setdefault(item.view.epoch, item.view)
            self._push(self.now + self.store_s, rank, CasDone(item.view, committed))
        elif isinstance(item, ReadView):
            self._push(self.now + self.store_s, rank, ViewRead(item.epoch, self.store.get(item.epoch)))
        else:
            if isinstance(item, Envelope):
                self.delivered += 1
                self.delivered_bytes += self._size_of(item)
            self._apply(rank, core.step(item, self.now))

    # --- driving ----------------------------------------------------------------------------

    def run_until(self, done: Callable[[], bool], *, limit_s: float, check_every_s: float = 0.005) -> bool:
        """Run events until ``done()`` (checked every ``check_every_s``) or ``limit_s`` passed."""
        end = self.now + limit_s
        next_check = self.now
        while self._heap and self._heap[0][0] <= end:
            at, _, rank, item = heapq.heappop(self._heap)
            self.now = at
            self._handle(rank, item)
            if at >= next_check:
                next_check = at + check_every_s
                if done():
                    return True
        self.now = end
        return done()

    def run_for(self, seconds: float) -> None:
        self.run_until(lambda: False, limit_s=seconds)

    def kill(self, rank: int) -> None:
        """The process dies; its launcher reports the exit to every rank (as the real one does)."""
        self.state[rank] = "dead"
        event = ProcessExit(rank=rank, pid=1000 + rank, signal=9, incarnation=self.cores[rank].incarnation)
        for dst in self.cores:
            if dst != rank and self.state[dst] == "up":
                self._push(self.now + self.delay_s, dst, event)

    def hang(self, rank: int) -> None:
        """The process stops (SIGSTOP, a lost host): silence, no report."""
        self.state[rank] = "dead"

    def live(self) -> list[int]:
        return [r for r, s in self.state.items() if s == "up" and not self.cores[r].stopped]

    def all_members(self, n: int) -> bool:
        return all(self.cores[r].view is not None and len(self.cores[r].view.members) == n
                   and self.cores[r].status == "member" for r in self.live())

    def all_exclude(self, rank: int) -> bool:
        return all(self.cores[r].view is not None and rank not in self.cores[r].view.members for r in self.live())

    def installed_without(self, rank: int) -> dict[int, float]:
        """Per live rank, when it first installed a view without ``rank``."""
        out: dict[int, float] = {}
        for r in self.live():
            for at, view in self.installs[r]:
                if rank not in view.members:
                    out[r] = at
                    break
        return out

    def evicted(self) -> set[int]:
        """Ranks missing from the store's newest view."""
        if not self.store:
            return set()
        return set(self.cores) - set(self.store[max(self.store)].members)
