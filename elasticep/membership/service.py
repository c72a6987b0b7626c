"""``MembershipService``: drives a :class:`MembershipCore` with the bus, the view store and a clock.

One per rank, in the rank's event loop. It subscribes to the bus, batches what arrives into the
core (``step_many``), ticks the core every heartbeat interval, runs the store operations the core
asks for and feeds their results back, and carries out the rest: publishing events, installing
views (``bus.epoch``, metrics, :meth:`views`), fencing. If the bus transport reports socket
disconnects (the ZeroMQ transport's ``add_listener``), each becomes a ``disconnect`` suspicion:
on one host a killed process's sockets close at once, so the survivors agree within milliseconds.

Example (two ranks in one process)::

    net, store = InProcessNetwork(seed=1), InMemoryViewStore()
    buses = [EventBus(net.transport(r), r) for r in (0, 1)]
    services = [MembershipService(r, buses[r], store, Config.local(), initial_members=(0, 1)) for r in (0, 1)]
    for b in buses: await b.start()
    await asyncio.gather(*(s.start() for s in services))
    print(services[0].current)
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import TYPE_CHECKING, AsyncIterator, Callable

from anyio import WouldBlock

from elasticep import metrics
from elasticep.config import Config
from elasticep.errors import Closed, ElasticEPError, InvalidArgument, NotStarted, WaitTimeout, _rebuild
from elasticep.bus.bus import NotAnEventType
from elasticep.events import EVENT_TAGS, SCHEMA_VERSION, Envelope, Heartbeat, Suspicion
from elasticep.membership.core import (
    CasDone,
    Committed,
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
    Status,
    StoreFailed,
    Tick,
    ViewRead,
    rank_id,
)
from elasticep.membership.store import StoreUnavailable, ViewStore
from elasticep.membership.topology import Topology
from elasticep.membership.view import ChangeKind, CorruptView, View, ViewDiff

if TYPE_CHECKING:
    from elasticep.detect.board import HostBoard
    from elasticep.bus import EventBus

log = logging.getLogger(__name__)

_END = object()


def _phase() -> float:
    """Where in each tick interval this process's membership ticks fall, as a fraction of it:
    one value per process (computed from the pid, so processes forked from one parent that
    imported this module still differ)."""
    return (os.getpid() * 0.6180339887498949) % 1.0


class RankFenced(ElasticEPError, RuntimeError):
    """This rank fenced itself and stopped serving; ``reason`` says why."""

    def __init__(self, rank: int, epoch: int, reason: str) -> None:
        super().__init__(f"rank {rank} fenced at epoch {epoch}: {reason}")
        self.rank, self.epoch, self.reason = rank, epoch, reason

    def __reduce__(self):
        return (_rebuild, (type(self), self.__dict__, self.args))


class MembershipService:
    """Agreed membership for one rank, over an :class:`~elasticep.bus.EventBus` and a :class:`ViewStore`.

    Args:
        rank: this rank.
        bus: a started or not-yet-started bus for ``rank`` (the service does not own it; it sets
            ``bus.epoch`` on every install).
        store: the view store shared by the cluster.
        config: detection and store settings (default ``Config.local()``).
        initial_members: the bootstrap view; every original rank passes the same.
        incarnation: this process's incarnation (default: the bus transport's).
        join: True for a restarted or new process, which asks to be admitted.
        clock: monotonic seconds (``time.monotonic``); replaceable for tests.
        on_install: optional plain callback ``on_install(view, wall_ns)`` run on the event loop
            right after each install (not concurrently with itself).
        board: this rank's :class:`~elasticep.detect.board.HostBoard`, or None: heartbeats to
            and from the ranks of its host go through it (the service closes it).

    Use ``await start()`` / ``await close()`` (or ``async with``).
    """

    @metrics.counts_refusals("membership")
    def __init__(
        self,
        rank: int,
        bus: "EventBus",
        store: ViewStore,
        config: Config | None = None,
        *,
        initial_members: tuple[int, ...] | list[int] | None = None,
        incarnation: int | None = None,
        join: bool = False,
        clock: Callable[[], float] = time.monotonic,
        on_install: Callable[[View, int], None] | None = None,
        board: "HostBoard | None" = None,
    ) -> None:
        rank = rank_id("rank", rank)
        bus_rank = getattr(bus, "rank", None)
        if not (hasattr(bus, "subscribe") and hasattr(bus, "publish_nowait")):
            raise InvalidArgument(f"bus must be an elasticep EventBus, not {type(bus).__name__}")
        if bus_rank != rank:
            raise InvalidArgument(f"the bus is rank {bus_rank}'s, the service rank {rank}'s: "
                                  "each rank's service needs that rank's own bus")
        if not (callable(getattr(store, "compare_and_set", None)) and callable(getattr(store, "read", None))):
            raise InvalidArgument(f"store must be a ViewStore, not {type(store).__name__}")
        if config is not None and not isinstance(config, Config):
            raise InvalidArgument(f"config must be an elasticep.Config or None, not {type(config).__name__}")
        if not isinstance(join, bool):
            raise InvalidArgument(f"join must be True or False, not {join!r}")
        if not callable(clock):
            raise InvalidArgument("clock must be a callable returning monotonic seconds")
        if on_install is not None and not callable(on_install):
            raise InvalidArgument("on_install must be a callable on_install(view, wall_ns) or None")
        if board is not None and not (callable(getattr(board, "beat", None))
                                      and callable(getattr(board, "changed", None))):
            raise InvalidArgument(f"board must be a HostBoard or None, not {type(board).__name__}")
        if board is not None and board.rank != rank:
            raise InvalidArgument(f"the board handle is rank {board.rank}'s, the service rank {rank}'s")
        self.rank = rank
        self.bus = bus
        self.store = store
        self.config = config if config is not None else Config.local()
        if incarnation is None:
            incarnation = int(getattr(getattr(bus, "transport", None), "incarnation", 0) or 0)
        self.core = MembershipCore(rank, self.config, initial_members=initial_members,
                                   incarnation=incarnation, join=join)
        self.clock = clock
        self.on_install = on_install
        self.history: list[View] = []
        """Every view this rank installed, in order."""
        self.fenced: RankFenced | None = None
        self._streams: list[asyncio.Queue] = []
        self._diff_streams: list[asyncio.Queue] = []
        self._last_diff: ViewDiff | None = None
        self._ended: str | None = None
        self._leave_diff: ViewDiff | None = None
        self._tasks: set[asyncio.Task] = set()
        self._sub = None
        self._remove_handler = None
        self._held: list[Envelope] | None = None  # envelopes handed over before the core started
        self._state = "new"
        self._changed = asyncio.Event()
        self._subscribed_disconnects = False
        self._filtered_view: View | None = None
        self._filtering = False
        self._watchers: tuple[View | None, tuple[int, ...]] = (None, ())  # (view, who watches this rank in it)
        # peers whose bus heartbeats this rank does not subscribe to (it reads them on the board)
        self._beats_off: set[int] = set()
        self._set_beats = (bus.set_beats if board is not None and callable(getattr(bus, "set_beats", None))
                           and callable(getattr(getattr(bus, "transport", None), "set_beats", None)) else None)
        self.board = board
        self.board_heartbeats = 0
        """Heartbeats read from the host board (each one a bus message saved)."""
        self.bus_heartbeats_spared = 0
        """Own heartbeats not sent on the bus because every watcher reads them on the board."""
        # this rank's series of the per-rank gauges, looked up once (every install sets them)
        self._view_gauges = (metrics.VIEW_EPOCH.labels(str(rank)), metrics.VIEW_MEMBERS.labels(str(rank)))

    # --- public API -------------------------------------------------------------------------

    @property
    def current(self) -> View | None:
        """The installed view while this rank is a member; None before, and after fence or leave."""
        if self._state == "closed":
            return None
        return self.core.view if self.core.is_member and not self.core.stopped else None

    @property
    def status(self) -> str:
        """``"new"`` before :meth:`start`, ``"closed"`` after :meth:`close`, else the core's
        (``syncing``, ``member``, ``joining``, ``fenced``, ``left``)."""
        if self._state in ("new", "closed") and not self.core.stopped:
            return self._state
        return self.core.status

    @staticmethod
    def _check_timeout(timeout: object, what: str) -> None:
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout >= 0:
            raise InvalidArgument(f"{what}: timeout must be a number of seconds >= 0, not {timeout!r}")

    def _check_running(self, what: str) -> None:
        if self._state == "new":
            raise NotStarted("membership", f"membership service of rank {self.rank} is not started: "
                             f"await start() before {what}")
        if self._state == "closed":
            raise Closed("membership", f"membership service of rank {self.rank} is closed; {what} is not possible")

    def views(self) -> AsyncIterator[View]:
        """Every view installed from now on, starting with the current one.

        Ends after a graceful leave or :meth:`close` (:attr:`ended` says which; :meth:`changes`
        also yields the view this rank left by); raises :class:`RankFenced` once this rank
        fenced itself.
        """
        queue: asyncio.Queue = asyncio.Queue(maxsize=10_000)
        if self.current is not None:
            queue.put_nowait(self.current)
        if self.core.stopped or self._state == "closed":
            queue.put_nowait(self.fenced or _END)
        else:
            self._streams.append(queue)
        return self._iterate(queue)

    @property
    def ended(self) -> str | None:
        """Why this service stopped: ``"left"`` (its graceful leave committed), ``"fenced"``
        (see :attr:`fenced`), ``"closed"`` (:meth:`close` before either); None while running."""
        return self._ended

    def changes(self) -> AsyncIterator[ViewDiff]:
        """What each installed view changed, from now on: a :class:`~elasticep.membership.ViewDiff`
        per view (joined, left, evicted, each with a typed :class:`~elasticep.membership.Cause`),
        starting with the current view's diff from the view before it.

        How it ends tells why: after a graceful leave the last item is the diff of the committed
        view without this rank (``this rank in diff.left``), then the iterator ends; after
        :meth:`close` it just ends; once this rank fenced itself it raises :class:`RankFenced`.
        :attr:`ended` says the same afterwards.
        """
        queue: asyncio.Queue = asyncio.Queue(maxsize=10_000)
        if self.current is not None and self._last_diff is not None:
            queue.put_nowait(self._last_diff)
        if self.core.stopped or self._state == "closed":
            if self._ended == "left" and self._leave_diff is not None:
                queue.put_nowait(self._leave_diff)
            queue.put_nowait(self.fenced or _END)
        else:
            self._diff_streams.append(queue)
        return self._iterate(queue, self._diff_streams)

    async def _iterate(self, queue: asyncio.Queue, streams: list | None = None) -> AsyncIterator:
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, RankFenced):
                    raise item
                yield item
        finally:
            streams = self._streams if streams is None else streams
            if queue in streams:
                streams.remove(queue)

    async def wait_member(self, timeout: float) -> View:
        """Wait until this rank is in an installed view (bootstrap or admitted after a join).

        Raises :class:`~elasticep.errors.WaitTimeout` after ``timeout`` s, ``NotStarted`` /
        ``Closed`` when the service is not running, :class:`RankFenced` if fenced."""
        self._check_running("wait_member()")
        self._check_timeout(timeout, "wait_member()")
        async def member() -> View:
            while self.current is None:
                if self.fenced is not None:
                    raise self.fenced
                self._changed.clear()
                await self._changed.wait()
            return self.current
        try:
            return await asyncio.wait_for(member(), timeout)
        except asyncio.TimeoutError:
            raise WaitTimeout(f"rank {self.rank} to become a member", timeout, f"status {self.status}") from None

    async def wait_view(self, predicate: Callable[[View], bool], timeout: float) -> View:
        """Wait until the installed view satisfies ``predicate``; raises :class:`RankFenced` if
        fenced, :class:`~elasticep.errors.WaitTimeout` after ``timeout`` s."""
        self._check_running("wait_view()")
        self._check_timeout(timeout, "wait_view()")
        if not callable(predicate):
            raise InvalidArgument(f"wait_view(): predicate must be a callable predicate(view) -> bool, not {predicate!r}")
        async def until() -> View:
            while True:
                if self.fenced is not None:
                    raise self.fenced
                view = self.current
                if view is not None and predicate(view):
                    return view
                self._changed.clear()
                await self._changed.wait()
        try:
            return await asyncio.wait_for(until(), timeout)
        except asyncio.TimeoutError:
            seen = self.current.describe() if self.current is not None else "no view"
            raise WaitTimeout(f"a view matching the predicate on rank {self.rank}", timeout, f"last {seen}") from None

    async def wait_stopped(self) -> None:
        """Return once this rank fenced itself or left (check :attr:`fenced` for which)."""
        while not self.core.stopped:
            self._changed.clear()
            await self._changed.wait()

    def report(self, event, *, publish: bool = False) -> None:
        """Feed a signal from a trusted local source into the core at once.

        For what this process learns outside the bus: its launcher reporting a
        :class:`~elasticep.events.ProcessExit`, a kernel :class:`~elasticep.events.PeerTimeout`
        from :class:`~elasticep.detect.MaskSource`, a collective error. ``publish=True`` also
        sends it to the other ranks (do that for signals only this rank can see).
        """
        if self._state != "running":
            self._check_running("report()")
        if type(event) not in EVENT_TAGS:
            raise NotAnEventType(f"report() takes an elasticep event (ProcessExit, PeerTimeout, ...), "
                                 f"not {type(event).__name__}")
        if self.core.stopped:
            return
        actions = self.core.step(event, self.clock())
        self._apply(([Publish(event)] if publish else []) + actions)

    async def leave(self, reason: str = "scale-down", timeout: float | None = None) -> View:
        """Leave gracefully: returns the committed view without this rank (scale-down).

        This rank keeps serving until that view is committed; then :meth:`views` ends.
        """
        self._check_running("leave()")
        if not isinstance(reason, str):
            raise InvalidArgument(f"leave(): reason must be a str, not {reason!r}")
        if timeout is not None:
            self._check_timeout(timeout, "leave()")
        self._apply(self.core.step(LeaveCommand(reason), self.clock()))
        bound = self.config.join_timeout_s if timeout is None else timeout

        async def left() -> View:
            while self.core.status != Status.LEFT:
                if self.fenced is not None:
                    raise self.fenced
                self._changed.clear()
                await self._changed.wait()
            assert self.core.view is not None
            return self.core.view
        try:
            return await asyncio.wait_for(left(), bound)
        except asyncio.TimeoutError:
            raise WaitTimeout(f"the view without rank {self.rank} (graceful leave)", bound, f"status {self.status}") from None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, *, ready_timeout: float | None = None) -> None:
        """Subscribe, wait for the initial members to be heard (bootstrap only), then run.

        Bootstrapping ranks first exchange heartbeats until each has heard every initial member
        (bounded by ``ready_timeout``, default ``join_timeout_s``), so that a slow-starting peer
        is not suspected before it ever spoke.
        """
        if self._state != "new":
            raise RuntimeError("a MembershipService starts once")
        self._state = "running"
        self._filtering = self._hook_topology()
        if not self.bus.running:
            await self.bus.start()
        if callable(getattr(self.bus, "add_handler", None)):
            # Straight from the bus's receive path into the core: no queue, no task switch per
            # batch (a heartbeat's whole cost at scale is its Python path).
            self._held = []
            self._remove_handler = self.bus.add_handler(self._on_envelopes)
        else:
            self._sub = self.bus.subscribe(maxsize=self.config.subscriber_buffer, name=f"membership-{self.rank}")
        transport = getattr(self.bus, "transport", None)
        if hasattr(transport, "add_listener"):
            transport.add_listener(self._on_peer)
            self._subscribed_disconnects = True
        core = self.core
        if core.initial is not None and not core.join:
            # with the ring, a rank waits for (and watches) only its neighbours
            peers = core.initial if core.topology.everyone else tuple(m for m in core.initial if core.hears(m))
            heard = await self._await_peers(peers, self.config.join_timeout_s if ready_timeout is None else ready_timeout)
        else:
            heard = False
        # every bootstrap peer already spoke on the bus: none of them is still starting, so the
        # steady-state detector applies at once (not the startup grace)
        core.bootstrap_heard = heard
        self._apply(core.start(self.clock()))
        if self._sub is not None:
            self._spawn(self._receive_loop(), "receive")
        else:
            held, self._held = self._held, None
            if held:
                self._on_envelopes(held)
        self._spawn(self._tick_loop(), "tick")
        if getattr(self.store, "pushes", False):
            core.store_pushes = True
            self._spawn(self._commit_watch(), "watch")

    def _hook_topology(self) -> bool:
        """With a bounded detection topology (the ring), the bus transport subscribes only to the
        ranks the core hears: ``monitors_per_rank`` sockets per rank, not ``N - 1``. Re-evaluated
        whenever the core's view changes (:meth:`_apply`). A joiner hears no one until it has
        read the view from the store."""
        transport = getattr(self.bus, "transport", None)
        if self.core.topology.everyone or not callable(getattr(transport, "set_peer_filter", None)):
            return False
        core = self.core
        # The members this rank hears, as a set built once per view: the transport asks about
        # every rank it knows each time the view changes, hundreds of ranks at deployment scale.
        # A rank outside the member set (a joiner, a departed rank) is asked of the core itself.
        heard: list = [object(), frozenset(), frozenset()]  # [for view, neighbours, members]

        def refresh() -> bool:
            view = core.view
            if view is None and core.initial is None:
                return False
            if heard[0] is not view:
                members = view.members if view is not None else core.initial
                heard[:] = [view, frozenset(core.topology.neighbors(members, self.rank)), frozenset(members)]
            return True

        def wanted(peer: int) -> bool:
            if not refresh():
                return False
            if peer in heard[2] and self.rank in heard[2]:
                return peer in heard[1]
            return core.hears(peer)

        def selected() -> tuple[frozenset[int], frozenset[int]] | None:
            # of the members, exactly the neighbours (asked of a member only: a joiner's
            # sponsors are the core's to say)
            if not refresh() or self.rank not in heard[2]:
                return None
            return heard[2], heard[1]

        # the next ring out: its records are read ahead, so a neighbour's death costs the ranks
        # beyond it a CURVE handshake, not a store read, before they hear each other
        ahead = Topology(core.topology.kind, 2 * core.topology.monitors_per_rank)

        def prefetch(peer: int) -> bool:
            members = core.view.members if core.view is not None else (core.initial or ())
            return bool(members) and ahead.hears(members, self.rank, peer)

        self._filtered_view = core.view
        return bool(transport.set_peer_filter(wanted, prefetch=prefetch, selected=selected))

    async def _await_peers(self, members: tuple[int, ...], timeout: float) -> bool:
        """Heartbeat until every one of ``members`` was heard; True if all were in time."""
        hb = Heartbeat(rank=self.rank, incarnation=self.core.incarnation)
        deadline = self.clock() + timeout
        waiter = asyncio.ensure_future(self.bus.wait_heard_from(members, timeout))
        try:
            while not waiter.done() and self.clock() < deadline:
                self.bus.publish_nowait(hb)
                await asyncio.wait({waiter}, timeout=self.config.heartbeat_interval_ms / 1e3)
            if waiter.done() and waiter.exception() is not None:
                log.warning("rank %d: %s; starting anyway", self.rank, waiter.exception())
                return False
            return waiter.done() and not waiter.cancelled()
        finally:
            if not waiter.done():
                waiter.cancel()
                try:
                    await waiter
                except (asyncio.CancelledError, TimeoutError):
                    pass

    async def close(self) -> None:
        """Stop the service (heartbeats stop; the bus stays open). Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        if self._ended is None:
            self._ended = "closed"
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if self._sub is not None:
            self._sub.close()
        if self._remove_handler is not None:
            self._remove_handler()
        if self.core.store_pushes:
            getattr(self.store, "end_waits", lambda: None)()  # the commit watch's idle connection, if any
        if self.board is not None:
            self.board.close()
        self._end_streams(_END)

    async def __aenter__(self) -> "MembershipService":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- loops ------------------------------------------------------------------------------

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"elasticep-membership-{self.rank}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _on_envelopes(self, batch: list[Envelope]) -> None:
        """The bus's handler: a batch as one step of the core (two exits in one read: one view)."""
        held = self._held
        if held is not None:  # still waiting for the bootstrap peers: the core starts later
            held.extend(e for e in batch if e.sender != self.rank)
            over = len(held) - self.config.subscriber_buffer
            if over > 0:  # bounded as a subscription would be: the oldest go
                del held[:over]
                metrics.SUBSCRIBER_DROPPED.labels(f"membership-{self.rank}").inc(over)
            return
        if self._state != "running" or self.core.stopped:
            return
        batch = [e for e in batch if e.sender != self.rank]
        if batch:
            self._apply(self.core.step_many(batch, self.clock()))

    async def _receive_loop(self) -> None:
        sub = self._sub
        assert sub is not None
        async for env in sub:
            batch: list[Envelope] = [env]
            while True:
                try:
                    batch.append(sub.receive_nowait())
                except (WouldBlock, Exception):
                    break
            batch = [e for e in batch if e.sender != self.rank]
            if batch:
                self._apply(self.core.step_many(batch, self.clock()))
            if self.core.stopped:
                return

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        phase = _phase()
        board = self.board
        core = self.core
        # each board beat at the time its writer stamped it (the host's monotonic clock, the one
        # this service runs on by default), as a bus heartbeat arrives when it is sent
        at_stamp = self.clock is time.monotonic
        window = 2 * self.config.heartbeat_interval_ms / 1e3
        while not core.stopped:
            now = self.clock()
            if board is not None:
                actions: list = []
                for env in self._board_beats(now):
                    at = env.mono_ns / 1e9 if at_stamp else now
                    actions += core.step(env, at if now - window <= at <= now else now, decide=False)
                actions += core.step(Tick(), now)
                self._apply(actions)
                self._take_beats_from_board(now)
            else:
                self._apply(core.step(Tick(), now))
            # The next tick on this process's grid (a stall skips the ticks it missed, never
            # fires a burst): ranks sharing a process and a loop wake together, one wake-up for
            # all of them; other processes' grids are offset by their phase, so a host's ranks
            # do not all wake at once.
            interval = core.tick_interval()
            offset = phase * interval
            now = loop.time()
            # (at least a quarter interval ahead: a timer that fires a little early, as libuv's
            # millisecond timers do, must not tick twice at one grid point)
            await asyncio.sleep((math.floor((now + interval / 4 - offset) / interval) + 1) * interval + offset - now)

    def _board_beats(self, now: float) -> list:
        """The host board's news since the last tick, as the envelopes the bus would have
        carried: one heartbeat per local peer whose beat moved, stamped with that peer's
        installed epoch (so a newer view is read at once, as with a bus heartbeat)."""
        core = self.core
        peers = core.watched()
        if not peers:
            members = core.view.members if core.view is not None else core.initial
            peers = members or ()
        moved = self.board.changed(peers, now)
        if not moved:
            return []
        self.board_heartbeats += len(moved)
        metrics.HOST_BOARD_HEARTBEATS.inc(len(moved))
        return [Envelope(schema=SCHEMA_VERSION, sender=peer, epoch=slot.epoch, seq=0, wall_ns=0, mono_ns=slot.beat,
                         event=Heartbeat(rank=peer, incarnation=slot.incarnation))
                for peer, slot in moved]

    def _take_beats_from_board(self, now: float) -> None:
        """Subscribe to no bus heartbeats from a watched peer seen beating on the board within
        ``grace_ms`` (its beats are read there; its other events keep coming), and to them again
        once its slot goes quiet. Only a change touches the subscription."""
        set_beats = self._set_beats
        if set_beats is None:
            return
        watched, off = self.core.watched(), self._beats_off
        stale = self.board.stale(watched, now, self.config.grace_ms / 1e3)
        for peer in watched:
            fresh = peer not in stale
            if fresh != (peer in off):
                set_beats(peer, not fresh)
                if fresh:
                    off.add(peer)
                else:
                    off.discard(peer)

    def _board_covers(self, now: float) -> bool:
        """Whether every rank that watches this one was seen beating on the board within
        ``grace_ms``: then they read this rank's beats there, and the bus need not carry them."""
        core = self.core
        view = core.view
        if view is None or core.status != "member" or not core.is_member:
            return False
        if self._watchers[0] is not view:  # once per view, not every tick
            members = view.members if core.topology.everyone else core.topology.neighbors(view.members, self.rank)
            self._watchers = (view, tuple(w for w in members if w != self.rank))
        return not self.board.stale(self._watchers[1], now, self.config.grace_ms / 1e3)

    async def _commit_watch(self) -> None:
        """Hand the core each commit the store pushes (:meth:`ViewStore.wait_committed`), so a
        rank learns of a view committed anywhere one store round trip after it, without polling.
        A wait that fails is retried after the idle poll period: the core's own poll is what finds
        out whether the store is gone (and fences)."""
        core = self.core
        # (the state too: asyncio.wait_for in Python 3.11 can swallow a cancellation that lands
        # as its wait completes, and close() must still end this loop)
        while self._state == "running" and not core.stopped:
            epoch = (core.view.epoch if core.view else 0) + 1
            try:
                committed = await self.store.wait_committed(epoch)
            except (StoreUnavailable, CorruptView) as exc:
                log.debug("rank %d: store wait for epoch %d failed: %s", self.rank, epoch, exc)
                await asyncio.sleep(self.config.idle_poll_s())
                continue
            if not committed:  # the wait's bound passed (or the store was closed: never spin)
                await asyncio.sleep(self.config.store_poll_ms / 1e3)
                continue
            if core.stopped or (core.view.epoch if core.view else 0) >= epoch:
                continue
            self._apply(core.step(Committed(epoch), self.clock()))
            # Let the read it started land before asking again (the key exists now, so the next
            # wait would return at once); bounded, so a read that failed is asked for again.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.store_poll_ms / 1e3
            while (core.view.epoch if core.view else 0) < epoch and not core.stopped and self._state == "running":
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._changed.clear()
                try:
                    async with asyncio.timeout(remaining):  # (no task per wait, as wait_for makes)
                        await self._changed.wait()
                except TimeoutError:
                    break

    def _on_peer(self, rank: int, kind: str) -> None:
        if kind != "disconnected" or self.core.stopped or rank < 0:
            return
        view = self.core.view
        if view is None or rank not in view.members or rank == self.rank:
            return
        event = Suspicion(observer=self.rank, suspect=rank, source="disconnect", detail="bus socket closed")
        self._apply([Publish(event)] + self.core.step(event, self.clock()))

    async def _store_op(self, op: CompareAndSet | ReadView) -> None:
        try:
            if isinstance(op, CompareAndSet):
                committed = await self.store.compare_and_set(op.view, rank=self.rank)
                if committed != op.view:
                    metrics.STORE_CONFLICTS.inc()
                result: object = CasDone(op.view, committed)
            else:
                result = ViewRead(op.epoch, await self.store.read(op.epoch, rank=self.rank))
        except (StoreUnavailable, CorruptView) as exc:
            kind = "cas" if isinstance(op, CompareAndSet) else "read"
            epoch = op.view.epoch if isinstance(op, CompareAndSet) else op.epoch
            result = StoreFailed(kind, epoch, str(exc))
        except RuntimeError as exc:
            # the loop's worker threads are gone: the loop is shutting down around this service
            log.debug("rank %d: store operation abandoned at shutdown: %s", self.rank, exc)
            return
        if self._state == "running" and not self.core.stopped:
            self._apply(self.core.step(result, self.clock()))

    # --- actions ----------------------------------------------------------------------------

    def _apply(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, Publish):
                event = action.event
                if self.board is not None and type(event) is Heartbeat and event.rank == self.rank:
                    view = self.core.view
                    now = self.clock()
                    self.board.beat(view.epoch if view is not None else 0)
                    if self._board_covers(now):
                        self.bus_heartbeats_spared += 1
                        continue
                if isinstance(event, Suspicion) and event.observer == self.rank:
                    metrics.SUSPICIONS.labels(event.source).inc()
                    log.info("rank %d suspects rank %d (%s): %s", self.rank, event.suspect, event.source, event.detail)
                try:
                    self.bus.publish_nowait(event)
                except WouldBlock:
                    metrics.FRAMES_REFUSED.labels("local_backpressure").inc()
                except Exception as exc:  # a closed bus must not kill the membership loop
                    log.debug("rank %d: publish failed: %s", self.rank, exc)
            elif isinstance(action, (CompareAndSet, ReadView)):
                self._spawn(self._store_op(action), "store")
            elif isinstance(action, Install):
                self._install(action)
            elif isinstance(action, Fence):
                metrics.FENCED.labels(action.label).inc()
                log.warning("rank %d fenced at epoch %d: %s", self.rank, action.epoch, action.reason)
                self.fenced = RankFenced(self.rank, action.epoch, action.reason)
                self._ended = "fenced"
                self._end_streams(self.fenced)
            elif isinstance(action, Left):
                log.info("rank %d left at epoch %d", self.rank, action.epoch)
                self._ended = "left"
                if self.core.view is not None:
                    # the view without this rank: the last change a leaving rank sees
                    self._leave_diff = self.core.view.diff(self.history[-1] if self.history else None)
                    for queue in self._diff_streams:
                        try:
                            queue.put_nowait(self._leave_diff)
                        except asyncio.QueueFull:
                            pass
                self._end_streams(_END)
            elif isinstance(action, Note):
                log.info("rank %d: %s", self.rank, action.text)
            elif isinstance(action, Refused):
                metrics.FRAMES_REFUSED.labels(action.reason).inc()
                log.warning("rank %d refused input (%s): %s", self.rank, action.reason, action.detail)
        if self._filtering and self.core.view is not self._filtered_view:
            self._filtered_view = self.core.view
            self.bus.transport.apply_peer_filter()  # the ring's neighbours follow the member set
        self._changed.set()

    def _install(self, action: Install) -> None:
        view = action.view
        wall_ns = time.time_ns()
        if view.epoch > self.bus.epoch:
            self.bus.epoch = view.epoch
        self.history.append(view)
        diff = view.diff(action.previous)
        self._last_diff = diff
        epoch_gauge, members_gauge = self._view_gauges
        epoch_gauge.set(view.epoch)
        members_gauge.set(len(view.members))
        for change in diff.changes:
            if change.kind is not ChangeKind.JOINED:
                metrics.EVICTIONS.labels(change.cause.value).inc()
        if log.isEnabledFor(logging.INFO):  # (describing hundreds of members is not free)
            log.info("rank %d installed %s (%s)", self.rank, view.describe(), view.reason)
        for queue in self._streams:
            try:
                queue.put_nowait(view)
            except asyncio.QueueFull:
                log.error("rank %d: a views() consumer is 10000 views behind; dropping", self.rank)
        for queue in self._diff_streams:
            try:
                queue.put_nowait(diff)
            except asyncio.QueueFull:
                log.error("rank %d: a changes() consumer is 10000 views behind; dropping", self.rank)
        if self.on_install is not None:
            self.on_install(view, wall_ns)

    def _end_streams(self, item: object) -> None:
        for streams in (self._streams, self._diff_streams):
            for queue in streams:
                try:
                    queue.put_nowait(item)
                except asyncio.QueueFull:
                    pass
            streams.clear()
