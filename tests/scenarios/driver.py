"""Scenario driver: runs ``tests/scenarios/*.txt`` against N pure membership cores on a virtual clock.

No sockets, no threads, no sleeps: the driver owns the clock (1 ms steps), a network between the
cores (1 ms per hop, FIFO per link, with cuts and partitions), an :class:`InMemoryViewStore`
(1 ms per operation, can be held, or down for some ranks) and the launcher (which reports a
crashed process to every live rank). Each core ticks as often as it asks
(:meth:`MembershipCore.tick_interval`), starting at a phase given by its rank.

Commands (one per line, ``#`` starts a comment)::

    cluster 5 [field=value ...]        five ranks 0..4 with Config.local(field=value, ...)
                                       (detection_topology=ring: each rank hears only its ring)
    tick 120ms | tick 2s               advance the clock
    fail 3                             SIGKILL: the process is gone, the launcher reports it
    hang 3 / resume 3                  SIGSTOP / SIGCONT: silent, no report; messages queue up
    pause 3 100ms                      hang now, resume 100 ms later (the clock does not move)
    slow 3 interval=160ms              rank 3 ticks (and so heartbeats) only every 160 ms
    partition 0,1,2 | 3,4 / heal       nothing crosses between the groups
    deliver drop=(2,3) / deliver all   cut / restore the link between two ranks (both ways)
    deliver drop=(2>3)                 cut one way: what rank 2 sends, rank 3 never gets
    store down [ranks=3,4] / store up [ranks=3,4] / store hold / store release
    restart 3                          a new process of rank 3 (next incarnation) asks to join
    leave 2                            rank 2 asks to leave gracefully
    inject 4 proposal epoch=1 members=0,4     rank 4 sends a view proposal on the bus
    cas 4 epoch=2 members=0,4          rank 4 tries to commit a view directly on the store
    timeout 0 3 [waited=200ms]         rank 0's kernel gave up waiting on rank 3 (a PeerTimeout)
    expect view 2 members=0,1,2,4 [leader=0] [on=0,1]
    expect fenced 3 | expect left 2 | expect member 3 | expect joining 3 | expect store 4

After every command the driver checks invariant 1: two ranks never installed different member sets
for the same epoch. The transcript of what happened is compared with ``<name>.out``; set
``ELASTICEP_REWRITE_SCENARIOS=1`` to rewrite the ``.out`` files from the current code.
"""

from __future__ import annotations

import heapq
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from elasticep.config import Config
from elasticep.events import SCHEMA_VERSION, Envelope, Gray, PeerTimeout, ProcessExit, ViewProposal
from elasticep.membership.core import (
    CasDone,
    CompareAndSet,
    Fence,
    Install,
    LeaveCommand,
    Left,
    MembershipCore,
    Note,
    Publish,
    ReadView,
    Refused,
    StoreFailed,
    ViewRead,
)
from elasticep.membership.store import InMemoryViewStore, StoreUnavailable
from elasticep.membership.view import View

STEP_S = 0.001
HOP_S = 0.001


class ScenarioError(AssertionError):
    pass


@dataclass
class Rank:
    core: MembershipCore
    state: str = "up"  # up, hung, crashed
    resume_at: float | None = None
    tick_every_ms: int = 0
    next_tick: float = 0.0
    installed: dict[int, tuple[int, ...]] = field(default_factory=dict)
    seq: itertools.count = field(default_factory=lambda: itertools.count(1))


class Sim:
    """The simulated cluster; ``run(lines)`` returns the transcript."""

    def __init__(self) -> None:
        self.now = 0.0
        self.config = Config.local()
        self.ranks: dict[int, Rank] = {}
        self.store = InMemoryViewStore()
        self.store_held = False
        self._queue: list[tuple[float, int, int, object]] = []  # (due, order, dst, item)
        self._store_ops: list[tuple[float, int, int, object]] = []  # (due, order, rank, action)
        self._order = itertools.count()
        self.groups: list[set[int]] | None = None
        self.cuts: set[tuple[int, int]] = set()
        self.out: list[str] = []
        self._installs: dict[tuple[int, tuple[int, ...], int, str], list[tuple[int, float]]] = {}

    # --- plumbing ---------------------------------------------------------------------------

    def log(self, text: str) -> None:
        self.out.append(f"  {self.now * 1e3:7.0f}ms  {text}")

    def linked(self, a: int, b: int) -> bool:
        if (a, b) in self.cuts:
            return False
        if self.groups is not None:
            return any(a in g and b in g for g in self.groups)
        return True

    def send(self, src: int, item: object) -> None:
        for dst, r in self.ranks.items():
            # A rank receives only the streams its topology subscribes to (all, or its ring).
            if dst != src and self.linked(src, dst) and r.core.hears(src):
                heapq.heappush(self._queue, (self.now + HOP_S, next(self._order), dst, item))

    def handle(self, rank: int, actions: list) -> None:
        r = self.ranks[rank]
        for a in actions:
            if isinstance(a, Publish):
                if isinstance(a.event, Gray):
                    state = "gray" if a.event.slowness >= self.config.gray_slowness else "no longer gray"
                    self.log(f"r{rank} reports r{a.event.rank} {state} (slowness {a.event.slowness:g})")
                env = Envelope(schema=SCHEMA_VERSION, sender=rank, epoch=r.core.view.epoch if r.core.view else 0,
                               seq=next(r.seq), wall_ns=0, mono_ns=int(self.now * 1e9), event=a.event)
                self.send(rank, env)
            elif isinstance(a, (CompareAndSet, ReadView)):
                heapq.heappush(self._store_ops, (self.now + HOP_S, next(self._order), rank, a))
            elif isinstance(a, Install):
                v = a.view
                r.installed[v.epoch] = v.members
                key = (v.epoch, v.members, v.proposer, v.reason)
                self._installs.setdefault(key, []).append((rank, self.now))
            elif isinstance(a, Fence):
                self.log(f"r{rank} fenced at epoch {a.epoch}: {a.reason}")
            elif isinstance(a, Left):
                self.log(f"r{rank} left at epoch {a.epoch}")
            elif isinstance(a, Note):
                self.log(f"r{rank} {a.text}")
            elif isinstance(a, Refused):
                self.log(f"r{rank} refused ({a.reason}): {a.detail}")

    def flush_installs(self) -> None:
        for (epoch, members, proposer, reason), who in sorted(self._installs.items()):
            ranks = ",".join(str(r) for r, _ in sorted(who))
            t0, t1 = min(t for _, t in who) * 1e3, max(t for _, t in who) * 1e3
            self.out.append(f"  {t0:5.0f}-{t1:.0f}ms  view {epoch} members={','.join(map(str, members))} "
                            f"(by r{proposer}: {reason}) installed on {ranks}")
        self._installs.clear()

    def step(self) -> None:
        self.now = round(self.now + STEP_S, 9)
        for rank, r in self.ranks.items():
            if r.state == "hung" and r.resume_at is not None and self.now >= r.resume_at - 1e-9:
                r.state, r.resume_at = "up", None
                self.log(f"r{rank} resumed")
        # network: each rank takes everything due this millisecond as one batch
        held: list[tuple[float, int, int, object]] = []
        batches: dict[int, list[object]] = {}
        while self._queue and self._queue[0][0] <= self.now + 1e-9:
            due, order, dst, item = heapq.heappop(self._queue)
            r = self.ranks.get(dst)
            if r is None or r.state == "crashed":
                continue
            if r.state == "hung":
                held.append((due, order, dst, item))
                continue
            batches.setdefault(dst, []).append(item)
        for dst, items in sorted(batches.items()):
            self.handle(dst, self.ranks[dst].core.step_many(items, self.now))
        for h in held:
            heapq.heappush(self._queue, (self.now + STEP_S, h[1], h[2], h[3]))
        # store
        if not self.store_held:
            pending: list[tuple[float, int, int, object]] = []
            while self._store_ops and self._store_ops[0][0] <= self.now + 1e-9:
                due, order, rank, op = heapq.heappop(self._store_ops)
                try:
                    if isinstance(op, CompareAndSet):
                        result: object = CasDone(op.view, self.store.compare_and_set_nowait(op.view, rank=rank))
                    else:
                        result = ViewRead(op.epoch, self.store.read_nowait(op.epoch, rank=rank))
                except StoreUnavailable as exc:
                    kind = "cas" if isinstance(op, CompareAndSet) else "read"
                    epoch = op.view.epoch if isinstance(op, CompareAndSet) else op.epoch
                    result = StoreFailed(kind, epoch, str(exc))
                pending.append((self.now + HOP_S, next(self._order), rank, result))
            for p in pending:
                heapq.heappush(self._queue, p)
        # ticks
        for rank, r in self.ranks.items():
            if r.state != "up" or self.now < r.next_tick - 1e-9:
                continue
            self.handle(rank, r.core.tick(self.now))
            # The core asks for faster ticks while it suspects someone; a slow rank ticks late.
            every_s = r.tick_every_ms / 1e3 if r.tick_every_ms else r.core.tick_interval()
            r.next_tick = self.now + max(STEP_S, round(every_s, 3))

    def check_agreement(self) -> None:
        seen: dict[int, tuple[int, tuple[int, ...]]] = {}
        for rank, r in self.ranks.items():
            for epoch, members in r.installed.items():
                if epoch in seen and seen[epoch][1] != members:
                    raise ScenarioError(f"invariant 1 broken: epoch {epoch} is {seen[epoch][1]} on r{seen[epoch][0]} "
                                        f"but {members} on r{rank}")
                seen[epoch] = (rank, members)

    # --- commands ---------------------------------------------------------------------------

    def run(self, lines: list[str]) -> list[str]:
        for lineno, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            self.out.append(f"> {line}")
            try:
                self.command(line)
            except ScenarioError as exc:
                raise ScenarioError(f"line {lineno}: {line}: {exc}\n" + "\n".join(self.out[-30:])) from None
            self.flush_installs()
            self.check_agreement()
        return self.out

    def command(self, line: str) -> None:
        words = line.split()
        cmd, args = words[0], words[1:]
        kv = dict(w.split("=", 1) for w in args if "=" in w)
        pos = [w for w in args if "=" not in w]
        if cmd == "cluster":
            n = int(pos[0])
            overrides = {k: type(getattr(Config, k))(v) for k, v in kv.items()}
            self.config = Config.local(**overrides)
            for rank in range(n):
                core = MembershipCore(rank, self.config, initial_members=tuple(range(n)))
                self.ranks[rank] = Rank(core, next_tick=self.now + rank * STEP_S)
                self.handle(rank, core.start(self.now))
        elif cmd == "tick":
            for _ in range(round(_duration(pos[0]) / STEP_S)):
                self.step()
        elif cmd == "fail":
            rank = int(pos[0])
            self.ranks[rank].state = "crashed"
            self.log(f"r{rank} crashed; the launcher reports its exit")
            exit_event = ProcessExit(rank=rank, pid=1000 + rank, signal=9, incarnation=self.ranks[rank].core.incarnation)
            for dst, r in self.ranks.items():
                if r.state != "crashed":
                    heapq.heappush(self._queue, (self.now + HOP_S, next(self._order), dst, exit_event))
        elif cmd in ("hang", "resume", "pause") and self.ranks[int(pos[0])].state == "crashed":
            self.log(f"r{pos[0]} is not running; {cmd} ignored")
        elif cmd == "hang":
            self.ranks[int(pos[0])].state = "hung"
        elif cmd == "resume":
            r = self.ranks[int(pos[0])]
            r.state, r.resume_at = "up", None
        elif cmd == "pause":
            r = self.ranks[int(pos[0])]
            r.state, r.resume_at = "hung", self.now + _duration(pos[1])
        elif cmd == "slow":
            self.ranks[int(pos[0])].tick_every_ms = round(_duration(kv["interval"]) * 1e3)
        elif cmd == "partition":
            self.groups = [set(_ranks(g)) for g in " ".join(pos).split("|")]
        elif cmd == "heal":
            self.groups = None
        elif cmd == "deliver":
            if pos and pos[0] == "all":
                self.cuts.clear()
            else:
                spec = kv["drop"].strip("()")
                if ">" in spec:  # one way only: what A sends, B never gets
                    a, b = (int(x) for x in spec.split(">"))
                    self.cuts.add((a, b))
                else:
                    a, b = _ranks(spec)
                    self.cuts |= {(a, b), (b, a)}
        elif cmd == "store":
            ranks = set(_ranks(kv["ranks"])) if "ranks" in kv else None
            if pos[0] in ("down", "up"):
                self.store.set_down(pos[0] == "down", ranks=ranks)
            elif pos[0] == "hold":
                self.store_held = True
            elif pos[0] == "release":
                self.store_held = False
            else:
                raise ScenarioError(f"unknown store command {pos[0]!r}")
        elif cmd == "restart":
            rank = int(pos[0])
            old = self.ranks[rank]
            if old.state != "crashed":
                raise ScenarioError(f"r{rank} must be failed before it restarts")
            core = MembershipCore(rank, self.config, incarnation=old.core.incarnation + 1, join=True)
            self.ranks[rank] = Rank(core, next_tick=self.now)
            self.log(f"r{rank} restarted as incarnation {core.incarnation}")
            self.handle(rank, core.start(self.now))
        elif cmd == "leave":
            rank = int(pos[0])
            self.handle(rank, self.ranks[rank].core.step(LeaveCommand("scale-down"), self.now))
        elif cmd == "inject":
            rank = int(pos[0])
            members = tuple(_ranks(kv["members"]))
            event = ViewProposal(epoch=int(kv["epoch"]), members=members, leader=min(members), proposer=rank,
                                 reason="injected")
            self.handle(rank, [Publish(event)])
        elif cmd == "timeout":
            observer, peer = int(pos[0]), int(pos[1])
            waited_us = round(_duration(kv.get("waited", "200ms")) * 1e6)
            event = PeerTimeout(observer=observer, peer=peer, op="dispatch", waited_us=waited_us)
            self.log(f"r{observer} kernel timed out on r{peer} after {waited_us // 1000} ms")
            self.handle(observer, [Publish(event)] + self.ranks[observer].core.step(event, self.now))
        elif cmd == "cas":
            rank = int(pos[0])
            view = View.of(int(kv["epoch"]), _ranks(kv["members"]), proposer=rank, reason="stale proposer")
            committed = self.store.compare_and_set_nowait(view, rank=rank)
            won = committed == view
            self.log(f"r{rank} cas epoch {view.epoch}: " + ("won" if won else f"lost to {committed.describe()}"))
        elif cmd == "expect":
            self.expect(pos, kv)
        else:
            raise ScenarioError(f"unknown command {cmd!r}")

    def expect(self, pos: list[str], kv: dict[str, str]) -> None:
        what = pos[0]
        if what == "view":
            epoch = int(pos[1])
            members = tuple(_ranks(kv["members"]))
            on = _ranks(kv["on"]) if "on" in kv else [
                r for r, x in self.ranks.items() if x.state == "up" and x.core.is_member and not x.core.stopped
            ]
            if not on:
                raise ScenarioError("no live member to check")
            for rank in on:
                v = self.ranks[rank].core.view
                if v is None or v.epoch != epoch or v.members != members:
                    raise ScenarioError(f"r{rank} has {v.describe() if v else 'no view'}, expected view {epoch} "
                                        f"members={','.join(map(str, members))}")
                if "leader" in kv and v.leader != int(kv["leader"]):
                    raise ScenarioError(f"r{rank} has leader {v.leader}, expected {kv['leader']}")
            if self.store.head() != epoch:
                raise ScenarioError(f"store head is epoch {self.store.head()}, expected {epoch}")
        elif what in ("fenced", "left", "member", "joining"):
            for rank in _ranks(pos[1]):
                status = self.ranks[rank].core.status
                if status != what:
                    raise ScenarioError(f"r{rank} is {status}, expected {what}")
        elif what == "store":
            if self.store.head() != int(pos[1]):
                raise ScenarioError(f"store head is epoch {self.store.head()}, expected {pos[1]}")
        else:
            raise ScenarioError(f"unknown expectation {what!r}")


def _duration(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(ms|s)", text)
    if not m:
        raise ScenarioError(f"bad duration {text!r} (use e.g. 20ms or 2s)")
    value = float(m.group(1))
    return value / 1e3 if m.group(2) == "ms" else value


def _ranks(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def run_file(path: Path) -> list[str]:
    return Sim().run(path.read_text().splitlines())
