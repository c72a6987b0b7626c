"""``Agent``: everything one rank needs for fault tolerance, started and stopped with one call.

::

    agent = Agent(rank, hooks, store="10.0.0.1:29500", cluster="llm", members=range(world))
    agent.start()                      # bus, detection, membership up; peers heard
    while serving:
        if agent.boundary() == "stopped":   # a pending view applied here, through the hooks
            reject_requests(); continue
        try:
            step()
        except PeersLost as lost:            # the engine's own signal
            agent.peers_lost(lost.ranks)     # report it; wait (bounded) for the verdict
    agent.stop()

The agent owns an event loop on a thread of its own (the engine's thread never runs on it and
never blocks on it, except inside :meth:`Agent.boundary`, bounded) with the ZeroMQ bus (CURVE,
endpoints found through the store the engine already has), the membership service (views
committed on the view store: the embedded ``TCPStore`` by default, any
:class:`~elasticep.membership.ViewStore`), the reconfiguration pipeline, the weight mover
(Mooncake transfer engine, when the engine declares an expert layout) and the signal sources
the engine adds (a launcher's exit reports, say).

Each installed view: :meth:`EngineHooks.on_view` at once (e.g. the kernel stops waiting on
peers outside it), then at the engine's next :meth:`boundary`: plan (the leader replans from
the last committed placement and publishes the plan on the store; everyone derives the same
moves), groups, weights (each changed local slot staged from a slot of this rank, a live
replica, or the checkpoint), commit (store barrier over the members, then
:meth:`EngineHooks.commit`), resume. A newer view abandons the running one before its commit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Sequence

from elasticep import metrics
from elasticep.agent.errors import AgentFenced, AgentStateError, AgentStopped, HookFailed, HookTimeout, ViewTimeout
from elasticep.agent.hooks import Commit, EngineHooks, StagedSlot
from elasticep.config import Config

__all__ = ["Agent", "Signal", "placement_key", "plan_key", "SERVING", "STOPPED"]

log = logging.getLogger(__name__)

SERVING = "serving"
""":meth:`Agent.boundary`: serve the next step."""
STOPPED = "stopped"
""":meth:`Agent.boundary`: redundancy is exhausted; reject requests until a covering view commits."""


_LEAVE_LINGER_S = 3.0
"""How long a rank that left stays up so that survivors can copy its experts, s (at most)."""

Signal = Callable[["Agent"], Awaitable[None]]
"""A signal source the engine adds: a coroutine function run on the agent's loop for the
agent's life, feeding what it learns through :meth:`Agent.report` (e.g. a launcher's exit
reports). Cancelled at :meth:`Agent.stop`."""


def placement_key(cluster: str, epoch: int) -> str:
    """Store key of the placement committed at ``epoch`` (JSON of ``Placement.to_dict()``)."""
    return f"elasticep/{cluster}/placement/{epoch}"


def plan_key(cluster: str, epoch: int) -> str:
    """Store key where the leader of view ``epoch`` publishes the plan every member applies."""
    return f"elasticep/{cluster}/plan/{epoch}"


def _left_key(cluster: str, rank: int) -> str:
    return f"elasticep/{cluster}/left/{rank}"


def _xfer_key(cluster: str, rank: int) -> str:
    return f"elasticep/{cluster}/xfer/{rank}"


def parse_store_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"tcp://HOST:PORT"`` (a ``torch.distributed`` init address)."""
    text = address.strip()
    if text.startswith("tcp://"):
        text = text[len("tcp://"):]
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"store address must be HOST:PORT or tcp://HOST:PORT, not {address!r}")
    return host.strip("[]"), int(port)


def connect_store(address: str, timeout_s: float = 30.0):
    """A ``TCPStore`` client of the store at ``address`` (never its server)."""
    import datetime

    from torch.distributed import TCPStore

    host, port = parse_store_address(address)
    return TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s), use_libuv=True,
                    wait_for_workers=False)


def latest_placement(store, cluster: str, before: int):
    """``(epoch, Placement)`` committed most recently below epoch ``before`` in ``store``."""
    from elasticep.eplb.placement import Placement

    latest = int(store.add(f"elasticep/{cluster}/placement_latest", 0))
    e = min(latest, before - 1)
    while e >= 1:
        key = placement_key(cluster, e)
        if store.check([key]):
            return e, Placement.from_dict(json.loads(store.get(key)))
        e -= 1
    raise RuntimeError(f"no committed placement below epoch {before} in the store")


def publish_placement(store, cluster: str, epoch: int, placement) -> None:
    """Record ``placement`` as committed at ``epoch`` (and advance the latest-epoch counter)."""
    store.set(placement_key(cluster, epoch), json.dumps(placement.to_dict()))
    latest = int(store.add(f"elasticep/{cluster}/placement_latest", 0))
    if epoch > latest:
        store.add(f"elasticep/{cluster}/placement_latest", epoch - latest)


def store_barrier(store, key: str, world: int, timeout_s: float) -> None:
    """Wait until ``world`` ranks arrived at ``key``: no rank enters the first step (whose
    kernel waits are bounded) while a peer is still starting."""
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    while store.add(key, 0) < world:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {store.add(key, 0)} of {world} ranks reached {key}")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


@dataclass
class _Plan:
    """What the pipeline carries from ``plan`` to ``commit`` on this rank."""

    view: Any
    base_epoch: int
    placement: Any
    base: Any
    alive: list[int]
    leaving: list[int]

    @property
    def epoch(self) -> int:
        return self.view.epoch


@dataclass
class _Staged:
    slots: list[StagedSlot]
    sources: dict
    nbytes: dict = field(default_factory=dict)
    """Bytes staged per source kind (``local``, ``replica``, ``host``, ``disk``)."""

    @property
    def detail(self) -> str:
        """One line for the ``weights`` phase event, e.g.
        ``"3 experts: host=1 replica=2 (bytes host=1024 replica=2048)"`` (see :func:`weights_bytes`)."""
        kinds = " ".join(f"{k}={v}" for k, v in sorted(self.sources.items()))
        sizes = " ".join(f"{k}={v}" for k, v in sorted(self.nbytes.items()) if v)
        return (f"{len(self.slots)} experts" + (f": {kinds}" if kinds else "")
                + (f" (bytes {sizes})" if sizes else ""))


def weights_bytes(detail: str) -> dict[str, int]:
    """Bytes per source kind from a ``weights`` phase event's ``detail`` (``{}`` if none named)."""
    start = detail.find("(bytes ")
    if start < 0:
        return {}
    out: dict[str, int] = {}
    for item in detail[start + len("(bytes "):].rstrip(")").split():
        kind, _, value = item.partition("=")
        if value.isdigit():
            out[kind] = out.get(kind, 0) + int(value)
    return out


class Agent:
    """Fault tolerance for one rank of any engine; see the module docs.

    Args:
        rank: this rank (its EP rank).
        hooks: the engine's :class:`~elasticep.agent.EngineHooks`.
        store: the cluster's store, ``"HOST:PORT"`` or ``"tcp://HOST:PORT"``: a
            ``torch.distributed.TCPStore`` server that outlives any rank (the engine's own
            ``torch.distributed`` init store will do). Bus endpoints, plans, placements and, by
            default, views are found there.
        cluster: key prefix, so several clusters can share one store.
        members: the bootstrap view, the same on every original rank; ``None`` for a restarted
            or added rank, which asks to be admitted.
        config: detection and store settings (default ``Config.local()``).
        keys: the cluster's CURVE keys (:class:`~elasticep.bus.ClusterKeys`, at least this
            rank's); default :meth:`ClusterKeys.from_env` (``ELASTICEP_BUS_KEYS``).
        incarnation: this process's incarnation on the bus (a restarted rank must use a new one).
        view_store: where views are committed; default a
            :class:`~elasticep.membership.TCPStoreViewStore` on ``store``.
        groups: ``"gloo"`` to rebuild a gloo group over each view's members (unless the hooks
            override ``rebuild_collectives``), or ``None``.
        signals: extra signal sources (:data:`Signal`).
        hook_timeout_s: bound on each hook call, s.
        commit_timeout_s: bound on the commit barrier, s.
        transfer_host: the address the Mooncake transfer engine listens on.
        bus_endpoint: where the bus binds (default ``tcp://127.0.0.1:*``).
        metrics_port: serve the Prometheus ``/metrics`` page on this port from :meth:`start`
            to :meth:`stop` (0 picks a free port: :attr:`metrics_address`); None serves nothing
            (the process may serve :func:`elasticep.metrics.serve` itself).
        metrics_addr: the address the metrics page binds.
        view_wait_s: bound on waiting for the view that excludes lost peers, or for a newer one
            after a failed reconfiguration (then :class:`ViewTimeout`).
        reconfig_timeout_s: bound on one reconfiguration as the engine waits in
            :meth:`boundary` (weights of a large model may need more), s.
        admit: for the operator door's ``POST /admit`` (``Config.operator_port``): starts the
            process of a rank to be added or restarted (a launcher's spawn, a scale call); the
            new process's own agent then asks to join.

    Thread-safety: :meth:`start`, :meth:`boundary`, :meth:`peers_lost`, :meth:`request_leave`
    and :meth:`finish_leave` are for the engine's serving thread; :meth:`report`,
    :meth:`status` and :meth:`stop` may be called from any thread.
    """

    def __init__(
        self,
        rank: int,
        hooks: EngineHooks,
        *,
        store: str,
        cluster: str = "elasticep",
        members: Iterable[int] | None = None,
        config: Config | None = None,
        keys: Any = None,
        incarnation: int = 0,
        view_store: Any = None,
        groups: str | None = "gloo",
        signals: Sequence[Signal] = (),
        hook_timeout_s: float = 10.0,
        commit_timeout_s: float = 10.0,
        transfer_host: str = "127.0.0.1",
        bus_endpoint: str | None = None,
        metrics_port: int | None = None,
        metrics_addr: str = "127.0.0.1",
        admit: Callable[[int], Any] | None = None,
        view_wait_s: float = 15.0,
        reconfig_timeout_s: float = 60.0,
    ) -> None:
        from elasticep.bus import ClusterKeys

        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be an int >= 0, not {rank!r}")
        if not isinstance(hooks, EngineHooks):
            raise TypeError(f"hooks must be an EngineHooks, not {type(hooks).__name__}")
        if groups not in ("gloo", None):
            raise ValueError(f"groups must be 'gloo' or None, not {groups!r}")
        if min(hook_timeout_s, commit_timeout_s, view_wait_s, reconfig_timeout_s) <= 0:
            raise ValueError("hook_timeout_s, commit_timeout_s, view_wait_s and reconfig_timeout_s must be > 0")
        if metrics_port is not None and not (isinstance(metrics_port, int) and 0 <= metrics_port < 65536):
            raise ValueError(f"metrics_port must be a port number or None, not {metrics_port!r}")
        self.rank = rank
        self.hooks = hooks
        self.cluster = cluster
        self.store_address = store
        parse_store_address(store)
        self.config = config if config is not None else Config.local()
        self.keys = keys if keys is not None else ClusterKeys.from_env()
        self.incarnation = int(incarnation)
        self.join = members is None
        initial = None if members is None else tuple(sorted(set(int(m) for m in members)))
        if initial is not None and rank not in initial:
            raise ValueError(f"rank {rank} is not among the bootstrap members {list(initial)}")
        self._initial = initial
        self._view_store = view_store
        self._groups_kind = groups
        self._signals = tuple(signals)
        self.hook_timeout_s = hook_timeout_s
        self.commit_timeout_s = commit_timeout_s
        self._transfer_host = transfer_host
        self._bus_endpoint = bus_endpoint
        self._metrics_port, self._metrics_addr = metrics_port, metrics_addr
        self._metrics_server: Any = None
        self.metrics_address: str | None = None
        """``HOST:PORT`` of the metrics page while it is served, or None."""
        self._admit = admit
        self.view_wait_s, self.reconfig_timeout_s = float(view_wait_s), float(reconfig_timeout_s)
        self.operator: Any = None
        """The operator door (:class:`~elasticep.agent.operator.OperatorDoor`) while it is open."""
        self.epoch = 0 if self.join else 1
        """The epoch this rank serves (the bootstrap view is epoch 1; a joiner serves none yet)."""
        self.members: tuple[int, ...] = () if initial is None else initial
        """The members of the epoch this rank serves."""
        self.exhausted: str | None = None
        """Why the cluster stopped serving (redundancy exhausted), or None."""
        self._exhausted_epoch = 0
        self._leave_requested: str | None = None
        self.fenced: str | None = None
        self.history: list[Any] = []
        """Every :class:`~elasticep.reconfig.ReconfigResult` of this rank, in order."""
        self.store = connect_store(store)
        self._state = "new"
        self._view_lock = threading.Condition()
        self._latest_view: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop_requested: asyncio.Event | None = None
        self._hook_pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"elasticep-hooks-{rank}")
        self._committing = threading.Lock()
        self._reconfiguring = False
        self.service: Any = None
        self.bus: Any = None
        self.pipeline: Any = None
        self.executor: Any = None
        self.layout: Any = None
        self.backups: Any = None
        """This rank's :class:`~elasticep.transfer.BackupStore` (``Config.backup_budget_mb`` > 0)."""
        self._backup_plan: Any = None
        self._refill_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 60.0) -> "Agent":
        """Bring this rank in: weights registered, bus and membership up, then either every
        bootstrap member ready (a store barrier) or, for a joiner, admitted and its slots filled
        by the admitting view's commit. Returns ``self``.

        Raises:
            AgentStateError: started twice, or after :meth:`stop`.
            AgentFenced: a joiner was admitted and evicted before it served.
            TimeoutError: membership did not come up within ``timeout`` or the join was not
                admitted within ``Config.join_timeout_s``.
        """
        if self._state != "new":
            metrics.AGENT_ERRORS.labels("started_twice").inc()
            raise AgentStateError(f"an Agent starts once; this one is {self._state}", self._state)
        self._state = "starting"
        if self._metrics_port is not None:
            self._metrics_server = metrics.serve(self._metrics_port, self._metrics_addr)
            self.metrics_address = f"{self._metrics_addr}:{self._metrics_server.server_port}"
        self._setup_transfer()
        self._thread = threading.Thread(target=self._main, name=f"elasticep-agent-{self.rank}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"rank {self.rank}: membership did not start within {timeout:g} s")
        if self._error is not None:
            raise RuntimeError(f"rank {self.rank}: membership did not start: {self._error!r}") from self._error
        self._state = "running"
        if self.config.operator_port >= 0:
            from elasticep.agent.operator import start_operator

            drain = (lambda reason: self.hooks.drain(reason)) if self.hooks.overrides("drain") else None
            self.operator = start_operator(self, drain=drain, admit=self._admit)
        if self.join:
            if not self._wait_view(self._is_member, self.config.join_timeout_s):
                raise TimeoutError(f"rank {self.rank} was not admitted within {self.config.join_timeout_s} s")
            self.boundary()  # the admitting view's commit fills this rank's slots
        else:
            if self.rank == min(self.members) and not self.store.check([placement_key(self.cluster, 1)]):
                # the bootstrap placement is what every later plan starts from
                self._publish_placement(1, self.hooks.placement())
            store_barrier(self.store, f"elasticep/{self.cluster}/ready", len(self.members), timeout)
            if self.backups is not None and self._loop is not None:
                placement, members = self.hooks.placement(), self.members
                self._loop.call_soon_threadsafe(self._start_refill, 1, placement, members, min(members))
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop everything (heartbeats end, sockets close). Idempotent, from any thread. A
        reconfiguration in progress is abandoned before its commit (or, if the commit hook is
        already running, after it returns): :meth:`boundary` then raises :class:`AgentStopped`."""
        if self._state in ("stopped", "new"):
            self._state = "stopped"
            self._hook_pool.shutdown(wait=False)
            return
        if self._reconfiguring:
            metrics.AGENT_ERRORS.labels("stopped_during_reconfiguration").inc()
        self._state = "stopping"
        if self.operator is not None:
            self.operator.close()  # no new drain arrives while the loop winds down
            self.operator = None
        loop = self._loop
        if loop is not None and self._stop_requested is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._stop_requested.set)
            except RuntimeError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._view_lock:
            self._view_lock.notify_all()
        self._state = "stopped"
        self._hook_pool.shutdown(wait=False)
        if self.executor is not None:
            self.executor.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server, self.metrics_address = None, None

    def __enter__(self) -> "Agent":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def state(self) -> str:
        """``new``, ``starting``, ``running``, ``stopping`` or ``stopped``."""
        return self._state

    # ------------------------------------------------------------------ engine thread

    def boundary(self) -> str:
        """At a step boundary: apply every pending view (through the hooks) until the newest
        one is committed, then say whether to serve.

        Returns :data:`SERVING`, or :data:`STOPPED` while redundancy is exhausted (reject
        requests; call again). Cheap when no view is pending (one lock and a comparison).

        Raises:
            AgentFenced: this rank is outside the committed views: stop serving.
            AgentStopped: :meth:`stop` was called meanwhile.
            ViewTimeout: a reconfiguration failed and no newer view came within ``view_wait_s``,
                or one ran past ``reconfig_timeout_s``.
        """
        from elasticep.eplb.placement import RedundancyExhausted

        self._require_running()
        while True:
            with self._view_lock:
                view = self._latest_view
            if self.service is not None and self.service.fenced is not None:
                raise self._fence(str(self.service.fenced))
            if view is None or view.epoch <= self.epoch:
                return STOPPED if self.exhausted is not None else SERVING
            if not self._is_member(view):
                raise self._fence(f"view {view.epoch} ({list(view.members)}) does not include rank {self.rank}")
            if self.exhausted is not None and view.epoch == self._exhausted_epoch:
                return STOPPED  # the leader's plan for this view said so; only a newer view can cover
            result = self._run_pipeline(view)
            if result.status == "committed":
                if self.exhausted is not None:
                    log.warning("rank %d: serving resumed at epoch %d (was: %s)", self.rank, view.epoch, self.exhausted)
                    print(f"rank {self.rank}: serving resumed at epoch {view.epoch} (was: {self.exhausted})",
                          file=sys.stderr)
                    self.exhausted = None
                continue
            if result.status == "abandoned":
                continue
            if isinstance(result.error, RedundancyExhausted):
                self.exhausted = f"cluster stopped serving: {result.error}"
                self._exhausted_epoch = view.epoch
                print(f"rank {self.rank}: {self.exhausted}", file=sys.stderr)
                # nothing newer is committed: this epoch is not served (no step runs in it)
                return STOPPED
            if isinstance(result.error, (HookFailed, HookTimeout)):
                # this rank cannot apply the view: it takes itself out, so peers evict it
                raise self._fence(str(result.error), result.error)
            print(f"rank {self.rank}: reconfiguration for view {view.epoch} failed: {result.error!r}", file=sys.stderr)
            if not self._wait_view(lambda v: v.epoch > view.epoch, self.view_wait_s):
                metrics.AGENT_ERRORS.labels("view_timeout").inc()
                raise ViewTimeout(f"a view after {view.epoch}", self.view_wait_s,
                                  f"the reconfiguration for view {view.epoch} failed: {result.error!r}")

    def newer_view(self) -> bool:
        """Whether a view newer than the served epoch is installed (the epoch being served is
        over: its step must be rolled back and replayed after :meth:`boundary`)."""
        with self._view_lock:
            return self._latest_view is not None and self._latest_view.epoch > self.epoch

    def wait_newer_view(self, timeout_s: float | None = None) -> bool:
        """Block until a view newer than the served epoch is installed (then :meth:`boundary`
        commits it); False after ``timeout_s`` (default ``view_wait_s``). For an engine whose
        step failed without saying which peer it lost.

        Raises:
            AgentFenced: this rank learned meanwhile that it is outside the committed views.
        """
        self._require_running()
        return self._wait_view(lambda v: v.epoch > self.epoch, self.view_wait_s if timeout_s is None else timeout_s)

    def peers_lost(self, ranks: Iterable[int]) -> None:
        """The engine's step could not hear ``ranks`` (its kernel gave up waiting on them).

        Publishes the hooks' :meth:`~EngineHooks.kernel_timeouts` (uncertain signals the
        membership corroborates) and waits, bounded, for a view without those ranks (or any
        newer view). The engine then rolls the step back and calls :meth:`boundary`.
        """
        self._require_running()
        if self.newer_view():
            return
        gone = set(int(r) for r in ranks)
        try:
            events = list(self.hooks.kernel_timeouts())
        except Exception as exc:  # the hook's failure must not hide the loss itself
            metrics.HOOK_FAILURES.labels("kernel_timeouts", "error").inc()
            log.warning("rank %d: kernel_timeouts() failed: %r", self.rank, exc)
            events = []
        for ev in events:
            self.report(ev, publish=True)
        ok = self._wait_view(lambda v: v.epoch > self.epoch and not (gone & set(v.members)), self.view_wait_s)
        if not ok and not self.newer_view():
            metrics.AGENT_ERRORS.labels("view_timeout").inc()
            raise ViewTimeout(f"a view without ranks {sorted(gone)}", self.view_wait_s,
                              "they stopped answering in a step")

    def check_store_views(self) -> None:
        """Raise :class:`AgentFenced` if a committed view newer than the served one leaves this
        process out (for a rank that stopped taking part in steps and may have been evicted)."""
        from elasticep.membership.view import decode_view

        if self.epoch < 1:
            return  # a joining rank is outside every view until the one that admits it
        epoch = self.epoch
        newest = None
        while self.store.check([f"elasticep/{self.cluster}/view/{epoch + 1}"]):
            epoch += 1
            newest = decode_view(self.store.get(f"elasticep/{self.cluster}/view/{epoch}"))
        if newest is not None and not self._is_member(newest):
            raise self._fence(f"view {newest.epoch} ({list(newest.members)}) in the store leaves rank {self.rank} out")

    def request_leave(self, reason: str = "scale-down") -> cf.Future:
        """Begin a graceful leave; returns a future of the committed view without this rank.

        The engine keeps stepping (peers may still dispatch to it) until the future is done or
        :meth:`newer_view` says the epoch it served is over, then calls :meth:`finish_leave`.
        """
        self._require_running()
        self._leave_requested = reason
        self.store.set(_left_key(self.cluster, self.rank), str(self.incarnation))
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self.service.leave(reason), self._loop)

    def finish_leave(self, future: cf.Future) -> Any:
        """After :meth:`request_leave`: wait (briefly) for the leave's view, then linger until the
        survivors committed it, so they could copy this rank's experts. Returns the view or None."""
        try:
            left_view = future.result(timeout=2.0)
        except Exception:
            left_view = None
        until = time.monotonic() + _LEAVE_LINGER_S
        while left_view is not None and time.monotonic() < until:
            if self.store.check([placement_key(self.cluster, left_view.epoch)]):
                break
            time.sleep(0.02)
        return left_view

    def report(self, event: Any, *, publish: bool = False) -> None:
        """Feed a signal from a trusted local source (thread-safe); ``publish`` also sends it to
        the other ranks. Before :meth:`start` or after :meth:`stop` it raises
        :class:`AgentStateError` (a signal is never dropped silently)."""
        loop = self._loop
        if self._state not in ("starting", "running") or loop is None or self.service is None:
            metrics.AGENT_ERRORS.labels("report_not_running").inc()
            raise AgentStateError(f"cannot report {type(event).__name__}: the agent is {self._state}", self._state)
        from elasticep.bus.bus import NotAnEventType
        from elasticep.events import EVENT_TAGS

        if type(event) not in EVENT_TAGS:  # checked here: from another thread it would only be logged
            metrics.AGENT_ERRORS.labels("not_an_event").inc()
            raise NotAnEventType(f"report() takes an elasticep event (ProcessExit, PeerTimeout, ...), "
                                 f"not {type(event).__name__}")
        if threading.current_thread() is self._thread:
            self.service.report(event, publish=publish)
        else:
            loop.call_soon_threadsafe(lambda: self.service.report(event, publish=publish))

    def status(self) -> dict[str, Any]:
        """A JSON-ready summary: rank, state, epoch served, newest view, members, leader,
        membership status, suspicions, and the last reconfiguration's phases (ms)."""
        with self._view_lock:
            view = self._latest_view
        last = self.history[-1] if self.history else None
        service = self.service
        suspicions: list[dict[str, Any]] = []
        if service is not None:
            for _ in range(5):  # the agent's loop may change the evidence while it is copied
                try:
                    pending = sorted(service.core.fusion.pending().items())
                    break
                except RuntimeError:
                    time.sleep(0.001)
            else:
                pending = []
            suspicions = [{"rank": int(suspect), "evidence": summary} for suspect, summary in pending]
        return {
            "rank": self.rank,
            "cluster": self.cluster,
            "incarnation": self.incarnation,
            "state": self._state,
            "epoch": self.epoch,
            "members": list(self.members),
            "view": None if view is None else {"epoch": view.epoch, "members": list(view.members),
                                               "leader": view.leader, "reason": view.reason},
            "membership": None if service is None else str(service.status),
            "exhausted": self.exhausted,
            "fenced": self.fenced,
            "leaving": self._leave_requested,
            "metrics": self.metrics_address,
            "suspicions": suspicions,
            "last_reconfiguration": None if last is None else {
                "epoch": last.epoch, "status": last.status, "phases_ms": last.timeline(),
                "error": None if last.error is None else f"{type(last.error).__name__}: {last.error}",
            },
        }

    def committed_placement(self, before: int = 1 << 30):
        """``(epoch, Placement)`` committed most recently below epoch ``before``, from the store
        (what a joining rank starts from, before :meth:`start`)."""
        return self._latest_placement(before)

    # ------------------------------------------------------------------ internals: engine side

    def _require_running(self) -> None:
        if self._state == "stopping" or self._state == "stopped":
            raise AgentStopped(f"rank {self.rank}: the agent was stopped")
        if self._state not in ("starting", "running"):
            metrics.AGENT_ERRORS.labels("not_started").inc()
            raise AgentStateError(f"the agent is {self._state}: call start() first", self._state)
        if self._error is not None:
            raise RuntimeError(f"rank {self.rank}: the agent's loop failed: {self._error!r}") from self._error

    def _fence(self, reason: str, cause: BaseException | None = None) -> AgentFenced:
        self.fenced = reason
        exc = AgentFenced(self.rank, self.epoch, reason)
        if cause is not None:
            exc.__cause__ = cause
        # out of the membership: heartbeats stop, so peers evict this rank if they have not yet
        loop = self._loop
        if loop is not None and self.service is not None and not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(self._leave_bus(), loop)
            except RuntimeError:
                pass
        return exc

    async def _leave_bus(self) -> None:
        """A fenced rank goes silent at once: membership stops and its sockets close (peers see
        the disconnect within milliseconds instead of waiting out the heartbeat silence)."""
        await self.service.close()
        if self.bus is not None:
            await self.bus.close()

    def _is_member(self, view) -> bool:
        """Whether this process (not a dead predecessor of the same rank) is in ``view``."""
        return view.has(self.rank, self.incarnation if self.join else 0)

    def _wait_view(self, predicate: Callable[[Any], bool], timeout_s: float) -> bool:
        """Wait until the newest installed view satisfies ``predicate``; False on timeout.
        Raises :class:`AgentFenced` when this rank learns it is outside the committed views."""
        deadline = time.monotonic() + timeout_s
        next_store_check = time.monotonic() + 0.2
        while True:
            with self._view_lock:
                if self._error is not None:
                    raise RuntimeError(f"the agent's loop failed: {self._error!r}")
                if self._state in ("stopping", "stopped"):
                    raise AgentStopped(f"rank {self.rank}: the agent was stopped")
                if self._latest_view is not None and predicate(self._latest_view):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._view_lock.wait(min(left, 0.05))
            if self.service is not None and self.service.fenced is not None:
                raise self._fence(str(self.service.fenced))
            if time.monotonic() >= next_store_check:
                next_store_check = time.monotonic() + 0.2
                self.check_store_views()

    def _run_pipeline(self, view):
        """Run the pipeline for ``view`` on the loop; the engine thread waits, bounded."""
        assert self._loop is not None
        self._reconfiguring = True
        try:
            future = asyncio.run_coroutine_threadsafe(self._reconfigure(view), self._loop)
            deadline = time.monotonic() + self.reconfig_timeout_s
            while True:
                try:
                    return future.result(timeout=0.1)
                except cf.TimeoutError:
                    if self._state in ("stopping", "stopped"):
                        future.cancel()
                        raise AgentStopped(f"rank {self.rank}: stopped during the reconfiguration for view "
                                           f"{view.epoch}; nothing of it was applied") from None
                    if time.monotonic() > deadline:
                        future.cancel()
                        metrics.AGENT_ERRORS.labels("view_timeout").inc()
                        raise ViewTimeout(f"the reconfiguration for view {view.epoch}", self.reconfig_timeout_s,
                                          "nothing of it was applied") from None
                except cf.CancelledError:
                    raise AgentStopped(f"rank {self.rank}: stopped during the reconfiguration for view "
                                       f"{view.epoch}") from None
        finally:
            self._reconfiguring = False

    async def _reconfigure(self, view):
        await self._hook("pause_admission")
        try:
            result = await self.pipeline.run(view)
        finally:
            await self._hook("resume_admission")
        self.history.append(result)
        return result

    # ------------------------------------------------------------------ hooks

    async def _hook(self, name: str, *args: Any, required: bool = False) -> Any:
        """Call hook ``name`` on the hook thread, bounded by ``hook_timeout_s``."""
        if not required and not self.hooks.overrides(name):
            return None
        fn = getattr(self.hooks, name)
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._hook_pool, lambda: fn(*args)),
                                          self.hook_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            metrics.HOOK_FAILURES.labels(name, "timeout").inc()
            # the stuck call keeps its thread; later hooks get a fresh one
            self._hook_pool.shutdown(wait=False)
            self._hook_pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"elasticep-hooks-{self.rank}")
            raise HookTimeout(name, self.hook_timeout_s) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.HOOK_FAILURES.labels(name, "error").inc()
            raise HookFailed(name, exc) from exc

    def _hook_sync(self, name: str, *args: Any) -> Any:
        """Call hook ``name`` from a worker thread (not the loop), bounded by ``hook_timeout_s``."""
        fn = getattr(self.hooks, name)
        future = self._hook_pool.submit(fn, *args)
        try:
            return future.result(self.hook_timeout_s)
        except cf.TimeoutError:
            metrics.HOOK_FAILURES.labels(name, "timeout").inc()
            raise HookTimeout(name, self.hook_timeout_s) from None
        except Exception as exc:
            metrics.HOOK_FAILURES.labels(name, "error").inc()
            raise HookFailed(name, exc) from exc

    # ------------------------------------------------------------------ weights

    def _setup_transfer(self) -> None:
        """Register a mirror of the served expert weights with the Mooncake transfer engine.

        Two sets of buffers in the engine's layout: the *mirror* of the served weights, what
        peers read when one of this rank's slots is the live replica of an expert they load (it
        changes only at a commit, so a replica stays readable through a whole reconfiguration;
        the commit barrier orders every peer's reads before it); the *staging* buffers that
        the executor writes received experts into.
        """
        layout = self.hooks.expert_layout()
        if layout is None:
            return
        from elasticep.transfer import ExpertWeights, MooncakeTransport, TransferExecutor

        self.layout = layout
        self.mirror = ExpertWeights.allocate(layout)
        self.staging = ExpertWeights.allocate(layout)
        self.transport = MooncakeTransport(self._transfer_host, timeout_s=max(1, int(self.config.transfer_timeout_s)))
        self.executor = TransferExecutor(self.rank, self.staging, self.transport, epoch=0,
                                         disk=self.hooks.disk_source(), checksums=self.hooks.expert_checksums(),
                                         max_workers=2)
        for address, nbytes in self.mirror.regions():
            self.transport.register(address, nbytes)
        self._sync_mirror()
        if self.config.backup_budget_mb > 0:
            from elasticep.transfer import BackupStore

            # host-memory copies of experts this rank does not serve, refilled after each view
            # (_refill_backups); the executor reads them after live replicas, before the disk
            self.backups = BackupStore.from_budget(self.rank, layout, int(self.config.backup_budget_mb * 2**20),
                                                   transport=self.transport)
            self.executor.attach_backups(self.backups)
        self._publish_endpoint()

    def _publish_endpoint(self, *, with_backups: bool = True) -> None:
        """Record this rank's transfer endpoint (the mirror, and the backups it holds) in the store."""
        import msgspec

        from elasticep.events import TransferEndpoint

        buffers = self.mirror.endpoint_buffers()
        if with_backups and self.backups is not None:
            buffers.update(self.backups.endpoint_buffers())
        endpoint = TransferEndpoint(rank=self.rank, epoch=0, peer=self.transport.peer, buffers=buffers)
        self.store.set(_xfer_key(self.cluster, self.rank),
                       msgspec.json.encode({"inc": self.incarnation, "ep": msgspec.to_builtins(endpoint)}))

    async def _refill_backups(self, epoch: int, placement, members: Sequence[int], leader: int) -> None:
        """After view ``epoch`` committed, off the critical path: once every member serves it (a
        store count), the view's leader plans the backups (``plan_backups``, keeping what the
        previous plan still allows) and records the plan; every member refills its store from
        live replicas, then publishes its endpoint again. A newer view abandons it."""
        from elasticep.transfer import BackupPlan, plan_backups

        loop = asyncio.get_running_loop()
        cluster = self.cluster
        alive = [r in members for r in range(placement.num_ranks)]
        try:
            key = f"elasticep/{cluster}/mirrored/{epoch}"
            await asyncio.to_thread(self.store.add, key, 1)
            deadline = loop.time() + 10.0
            while await asyncio.to_thread(self.store.add, key, 0) < len(members):
                if self.epoch != epoch or loop.time() > deadline:
                    return
                await asyncio.sleep(0.02)
            plan_key_ = f"elasticep/{cluster}/backups/{epoch}"
            if leader == self.rank:
                bplan = plan_backups(placement, alive, slots=self.backups.slots, copies=self.config.backup_copies,
                                     previous=self._backup_plan)
                await asyncio.to_thread(self.store.set, plan_key_, json.dumps(bplan.to_dict()))
            else:
                while not await asyncio.to_thread(self.store.check, [plan_key_]):
                    if self.epoch != epoch or loop.time() > deadline:
                        return
                    await asyncio.sleep(0.02)
                bplan = BackupPlan.from_dict(json.loads(await asyncio.to_thread(self.store.get, plan_key_)))
            if self.epoch != epoch:
                return
            # peers must not read buffers being rewritten: announce none while refilling
            await asyncio.to_thread(self._publish_endpoint, with_backups=False)
            await asyncio.to_thread(self._learn_endpoints, members)
            await asyncio.to_thread(self.backups.refill, bplan, self.executor, placement, epoch=epoch, alive=alive,
                                    timeout=self.config.transfer_timeout_s)
            self._backup_plan = bplan
            await asyncio.to_thread(self._publish_endpoint)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the next view refills again; serving is not affected
            metrics.BACKUP_ERRORS.labels("refill_failed").inc()
            log.warning("rank %d: backups for epoch %d not refilled: %r", self.rank, epoch, exc)

    def _start_refill(self, epoch: int, placement, members: Sequence[int], leader: int) -> None:
        """Agent loop: (re)start the backup refill for ``epoch``."""
        if self.backups is None:
            return
        if self._refill_task is not None and not self._refill_task.done():
            self._refill_task.cancel()
        self._refill_task = asyncio.ensure_future(self._refill_backups(epoch, placement, tuple(members), leader))

    def _local_slots(self, placement) -> list[int]:
        if placement.num_ranks <= self.rank:
            return []
        return list(placement.slots_of_rank(self.rank))

    def _sync_mirror(self) -> None:
        """Copy the served weights of every local slot into the registered mirror."""
        placement = self.hooks.placement()
        for layer in range(self.layout.num_layers):
            for i, slot in enumerate(self._local_slots(placement)):
                if int(placement.phy2log[layer, slot]) < 0:
                    continue
                served = self.hooks.read_expert(layer, slot)
                for name, tensor in self.mirror.expert(layer, i).items():
                    tensor.copy_(served[name])

    def _learn_endpoints(self, members) -> None:
        import msgspec

        from elasticep.events import TransferEndpoint

        for r in members:
            if r == self.rank:
                continue
            key = _xfer_key(self.cluster, r)
            self.executor.forget(r)
            if not self.store.check([key]):
                continue
            raw = json.loads(self.store.get(key))
            self.executor.learn(msgspec.convert(raw["ep"], TransferEndpoint))

    def _stage(self, plan: _Plan) -> _Staged:
        """Fill every local slot whose expert changes, into staging; nothing served changes.

        Sources, cheapest first: a slot of this rank that serves the expert now (a memory copy),
        a live replica on another member (the transfer engine reads its mirror), the checkpoint.
        """
        import torch

        from elasticep.eplb.placement import EMPTY
        from elasticep.transfer import ExpertMove

        if self.layout is None:
            return _Staged([], {})
        current = self.hooks.placement()
        new = plan.placement.phy2log
        base = plan.base.phy2log
        spr = plan.placement.slots_per_rank
        sources_alive = set(plan.alive) | set(plan.leaving)
        mine_slots = self._local_slots(plan.placement)
        cur_slots = self._local_slots(current)
        served = {}
        for layer in range(new.shape[0]):
            for s in cur_slots:
                e = int(current.phy2log[layer, s])
                if e >= 0:
                    served.setdefault((layer, e), s)
        remote, local = [], []
        for layer in range(new.shape[0]):
            for slot in mine_slots:
                want = int(new[layer, slot])
                have = int(current.phy2log[layer, slot]) if slot < current.phy2log.shape[1] else EMPTY
                if want == EMPTY or want == have:
                    continue
                if (layer, want) in served:
                    local.append((layer, slot, want, served[(layer, want)]))
                    continue
                # replicas on other live ranks, per the placement they serve now; those that keep
                # the expert through the plan first
                src = [int(s) for s in torch.nonzero(base[layer] == want).flatten().tolist()
                       if int(s) // spr in sources_alive and int(s) // spr != self.rank]
                src.sort(key=lambda s: (int(new[layer, s]) != want, s))
                remote.append(ExpertMove(layer, slot, want, tuple(src)))
        report = None
        if remote:
            self._learn_endpoints(sources_alive)
            report = self.executor.run(remote, epoch=plan.epoch, alive=sources_alive,
                                       timeout=self.config.transfer_timeout_s)
            if report.unrecoverable:
                raise RuntimeError(f"no source worked for {len(report.unrecoverable)} experts")
        by_move = {(r.layer, r.slot): r.source_kind for r in report.moved} if report is not None else {}
        staged = []
        for m in remote:
            tensors = {name: t.clone() for name, t in self.staging.expert(m.layer, m.slot % spr).items()}
            staged.append(StagedSlot(m.layer, m.slot, m.expert, tensors, by_move.get((m.layer, m.slot), "replica")))
        for layer, slot, want, src_slot in local:
            tensors = {name: t.clone() for name, t in self.hooks.read_expert(layer, src_slot).items()}
            staged.append(StagedSlot(layer, slot, want, tensors, "local"))
        sources = report.by_source() if report is not None else {}
        nbytes = report.bytes_by_source() if report is not None else {}
        if local:
            sources["local"] = sources.get("local", 0) + len(local)
            nbytes["local"] = sum(t.nbytes for s in staged if s.source == "local" for t in s.tensors.values())
        return _Staged(staged, sources, nbytes)

    # ------------------------------------------------------------------ placement bookkeeping

    def _latest_placement(self, before: int):
        return latest_placement(self.store, self.cluster, before)

    def _publish_placement(self, epoch: int, placement) -> None:
        publish_placement(self.store, self.cluster, epoch, placement)

    # ------------------------------------------------------------------ the loop thread

    def _main(self) -> None:
        from elasticep.bus import new_event_loop

        loop = new_event_loop()
        loop.set_debug(False)  # ranks run as in production, whatever the caller's environment
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._run())
        except BaseException as exc:  # reported to the engine thread, which stops serving
            self._error = exc
            self._ready.set()
            with self._view_lock:
                self._view_lock.notify_all()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _run(self) -> None:
        from elasticep.bus import EventBus, ZmqTransport
        from elasticep.groups import GlooGroups
        from elasticep.membership.service import MembershipService
        from elasticep.membership.store import TCPStoreViewStore
        from elasticep.reconfig import ReconfigPipeline, StoreBarrier

        self._stop_requested = asyncio.Event()
        host, port = parse_store_address(self.store_address)
        # the rendezvous and the commit barrier share the agent's store client (their operations
        # never block on a missing key); the view store keeps its own (its own timeout), and gloo its
        # own (its rendezvous blocks). Every connect costs the store host an accept and both ends a
        # reverse name lookup, so a rank opens as few as it can.
        transport = ZmqTransport(self.rank, self.keys, self.store, incarnation=self.incarnation,
                                 endpoint=self._bus_endpoint,
                                 poll_interval_s=0.2)  # late registrations: joiners, a monitor
        self.bus = EventBus(transport, self.rank)
        view_store = self._view_store or TCPStoreViewStore(host, port, timeout_s=self.config.store_timeout_s,
                                                           prefix=f"elasticep/{self.cluster}")
        board = None
        if self.config.host_board:
            from elasticep.detect.board import open_board

            board = open_board(f"{self.cluster}@{self.store_address}", self.rank, transport.incarnation)
        self.service = MembershipService(self.rank, self.bus, view_store, self.config, initial_members=self._initial,
                                         join=self.join, on_install=self._on_install, board=board)
        groups: Any = None
        if self.hooks.overrides("rebuild_collectives"):
            groups = _HookGroups(self)
        elif self._groups_kind == "gloo":
            groups = GlooGroups(connect_store(self.store_address), self.rank, rendezvous_timeout_s=10.0,
                                prefix=f"elasticep/{self.cluster}/groups")
        self.pipeline = ReconfigPipeline(
            self.rank,
            planner=self._plan,
            engine=_PipelineEngine(self),
            groups=groups,
            weights=_Weights(self),
            barrier=StoreBarrier(self.store, self.rank, prefix=f"elasticep/{self.cluster}/commit/"),
            publish=self.bus.publish,
            commit_timeout_s=self.commit_timeout_s,
        )
        self.pipeline.fence.advance(self.epoch)
        tasks: list[asyncio.Task] = []
        try:
            await self.bus.start()
            await self.service.start(ready_timeout=30.0)
            for signal in self._signals:
                tasks.append(asyncio.ensure_future(self._run_signal(signal)))
            self._ready.set()
            await self._stop_requested.wait()
        finally:
            if self._refill_task is not None:
                tasks.append(self._refill_task)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.service.close()
            await self.bus.close()
            if groups is not None and hasattr(groups, "abort"):
                try:
                    groups.abort()
                except Exception:
                    pass

    async def _run_signal(self, signal: Signal) -> None:
        try:
            await signal(self)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.AGENT_ERRORS.labels("signal_failed").inc()
            log.error("rank %d: signal source %r failed: %r", self.rank, signal, exc)

    def _on_install(self, view, wall_ns: int) -> None:
        """Agent loop, right after the membership service installed ``view``."""
        from elasticep.bus import BusClosed
        from elasticep.events import ViewInstalled

        with self._view_lock:
            self._latest_view = view
            self._view_lock.notify_all()
        if view.epoch > self.epoch and self.hooks.overrides("on_view"):
            # bounded like any hook, but without waiting here: the install must not stall
            asyncio.ensure_future(self._on_view(view))
        if self.pipeline is not None:
            self.pipeline.supersede(view.epoch)
        try:
            self.bus.publish_nowait(ViewInstalled(epoch=view.epoch, members=tuple(view.members),
                                                  leader=view.leader, rank=self.rank, reason=view.reason))
        except BusClosed:
            pass  # shutting down: nobody is left to tell

    async def _on_view(self, view) -> None:
        try:
            await self._hook("on_view", view)
        except (HookFailed, HookTimeout) as exc:
            log.error("rank %d: %s", self.rank, exc)

    # ------------------------------------------------------------------ the pipeline's parts

    async def _plan(self, view, current) -> _Plan:
        """Leader: ``replan`` from the last committed placement onto the view; publish it.
        Everyone: read the leader's plan (the same everywhere)."""
        import torch

        from elasticep.eplb.placement import Placement, RedundancyExhausted
        from elasticep.eplb.planner import replan

        key = plan_key(self.cluster, view.epoch)
        store = self.store
        if view.leader == self.rank:
            base_epoch, base = await asyncio.to_thread(self._latest_placement, view.epoch)
            prev_members = set(r for r in range(base.num_ranks)
                               if bool((base.phy2log[:, list(base.slots_of_rank(r))] >= 0).any()))
            leaving = []
            for r in sorted(prev_members - set(view.members)):
                if await asyncio.to_thread(store.check, [_left_key(self.cluster, r)]):
                    leaving.append(r)
            R = max(base.num_ranks, max(view.members) + 1)
            alive = torch.zeros(R, dtype=torch.bool)
            alive[list(view.members)] = True
            alive[leaving] = True
            load = await self._expert_load(base)
            try:
                plan = replan(base, load, alive, leaving=leaving or None)
                record = {"base_epoch": base_epoch, "placement": plan.placement.to_dict(), "leaving": leaving}
            except RedundancyExhausted as exc:
                record = {"error": str(exc), "needed": exc.needed, "live": exc.live}
            await asyncio.to_thread(store.set, key, json.dumps(record))
        else:
            delay = 0.002
            while not await asyncio.to_thread(store.check, [key]):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)
            record = json.loads(await asyncio.to_thread(store.get, key))
        if "error" in record:
            raise RedundancyExhausted(record["needed"], record["live"], detail=record["error"])
        base_epoch = record["base_epoch"]
        base = Placement.from_dict(json.loads(await asyncio.to_thread(store.get, placement_key(self.cluster, base_epoch))))
        new = Placement.from_dict(record["placement"])
        if base.num_ranks < new.num_ranks:
            base = base.with_ranks(new.num_ranks)
        return _Plan(view, base_epoch, new, base, list(view.members), record["leaving"])

    async def _expert_load(self, base):
        """The engine's recorded load per (MoE layer, expert) for the leader's plan; uniform when
        the engine has none, or gives one of the wrong shape (counted, logged)."""
        import torch

        uniform = torch.ones(base.num_layers, base.num_experts)
        if not self.hooks.overrides("expert_load"):
            return uniform
        try:
            load = await self._hook("expert_load")
        except (HookFailed, HookTimeout) as exc:
            log.warning("rank %d: %s; planning with a uniform load", self.rank, exc)
            return uniform
        if load is None:
            return uniform
        load = torch.as_tensor(load, dtype=torch.float64)
        if tuple(load.shape) != tuple(uniform.shape) or not bool(torch.isfinite(load).all()) or bool((load < 0).any()):
            metrics.HOOK_FAILURES.labels("expert_load", "bad_value").inc()
            log.warning("rank %d: expert_load() gave shape %s (finite, >= 0 expected, %s); planning with a "
                        "uniform load", self.rank, tuple(load.shape), tuple(uniform.shape))
            return uniform
        return load.float()

    def placement_changed(self) -> None:
        """The engine changed its placement within the served epoch (its own periodic
        rebalance, done collectively on every rank): record it, so that the next view plans from
        what is served. The leader of the served view writes it; call it on every rank, from
        the engine thread, after the change."""
        self._require_running()
        # the served epoch and members change only in a commit, while the engine thread (this
        # caller) is parked in boundary(); the served view's leader is its lowest member
        if self.epoch >= 1 and self.members and self.rank == min(self.members):
            self._publish_placement(self.epoch, self.hooks.placement())

    async def _commit(self, view, plan: _Plan, staged: _Staged | None, group: Any) -> None:
        """The engine thread is parked in :meth:`boundary`: apply the new epoch through the hook."""
        alive = tuple(r in plan.alive for r in range(plan.placement.num_ranks))
        change = Commit(epoch=view.epoch, view=view, placement=plan.placement, alive=alive,
                        staged=tuple(staged.slots) if staged else (), group=group,
                        sources=dict(staged.sources) if staged else {})
        await self._hook("commit", change, required=True)
        if self.layout is not None:
            await asyncio.get_running_loop().run_in_executor(self._hook_pool, self._sync_mirror)
        self.epoch = view.epoch
        self.members = tuple(plan.alive)
        await asyncio.to_thread(self._publish_placement, view.epoch, plan.placement)
        self._start_refill(view.epoch, plan.placement, plan.alive, view.leader)


class _PipelineEngine:
    """The :class:`~elasticep.reconfig.Engine` side of the pipeline, through the agent's hooks."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def current_placement(self):
        return self.agent.hooks.placement()

    def commit(self, epoch: int, plan: _Plan, staged: Any, group: Any) -> Awaitable[None]:
        return self.agent._commit(plan.view, plan, staged, group)

    def resume(self, epoch: int) -> None:
        """Nothing to do: the engine thread, parked at its step boundary, replays the
        interrupted step as soon as :meth:`Agent.boundary` returns."""


class _Weights:
    def __init__(self, agent: Agent):
        self.agent = agent

    async def stage(self, plan: _Plan, epoch: int) -> _Staged:
        if self.agent.layout is None:
            return _Staged([], {})  # the engine moves its weights itself, in its commit
        return await asyncio.to_thread(self.agent._stage, plan)


class _HookGroups:
    """The engine rebuilds (or masks) its own collectives: ``rebuild_collectives`` is the groups phase."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def rebuild(self, view) -> Any:
        return self.agent._hook_sync("rebuild_collectives", view)
