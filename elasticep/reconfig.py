"""The pipeline run on every installed view: plan, groups, weights, commit, resume.

Each rank of a view runs :class:`ReconfigPipeline` when its membership service installs that
view. The phases, in order:

``plan``
    the planner's ``replan`` from the placement being served, onto the view's members; every
    rank computes the same plan (the planner is deterministic and its inputs are agreed).
``groups``
    collectives rebuilt over the members (``rebuild(view)``), the old group aborted.
``weights``
    each slot this rank receives is filled from the cheapest live source, into *staging*
    buffers: nothing the engine serves from is touched yet.
``commit``
    a barrier over the view's members (bounded; a member that does not arrive means a newer
    view is coming), then the engine swaps placement, dispatch map, staged weights, group and
    epoch in one step at a step boundary.
``resume``
    the engine replays the step the failure interrupted and goes on.

Each phase publishes :class:`~elasticep.events.ReconfigPhase` start/end events with wall-clock
timestamps, so any subscriber can draw the timeline, and feeds the
``elasticep_reconfig_phase_seconds`` histogram.

A newer view arriving while a pipeline runs (:meth:`ReconfigPipeline.supersede`) abandons the
running one before its commit: the staged weights are dropped and nothing from the abandoned view
is applied (invariant 3). After the commit, :class:`EpochFence` refuses any message, transfer or
collective that carries an older epoch.

The pipeline only orchestrates: the planner, group manager, weight mover, barrier and engine are
passed in behind the small protocols below, so the same pipeline drives the reference engine and
an SGLang or vLLM adapter.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from elasticep import metrics
from elasticep.eplb.placement import RedundancyExhausted
from elasticep.errors import StaleEpoch
from elasticep.events import Event, ReconfigPhase

__all__ = [
    "PHASES",
    "CommitTimeout",
    "EpochFence",
    "ReconfigPipeline",
    "ReconfigResult",
    "StaleEpoch",
    "StoreBarrier",
    "Superseded",
]

PHASES: tuple[str, ...] = ("plan", "groups", "weights", "commit", "resume")


# --- errors -------------------------------------------------------------------------------------


class Superseded(RuntimeError):
    """The pipeline for ``epoch`` was abandoned because view ``newer`` was installed."""

    def __init__(self, epoch: int, newer: int) -> None:
        super().__init__(f"reconfiguration for epoch {epoch} abandoned: view {newer} superseded it")
        self.epoch = epoch
        self.newer = newer


class CommitTimeout(RuntimeError):
    """Not every member reached the commit barrier in time; a newer view is expected."""

    def __init__(self, epoch: int, missing: Sequence[int]) -> None:
        super().__init__(f"commit of epoch {epoch} timed out waiting for ranks {sorted(missing)}")
        self.epoch = epoch
        self.missing = tuple(sorted(missing))


# --- the fence ----------------------------------------------------------------------------------


class EpochFence:
    """Refuses anything from an epoch older than the installed one (invariant 3).

    ``channel`` names where the thing came from (``"dispatch"``, ``"transfer"``,
    ``"collective"``, ``"bus"``) and labels ``elasticep_stale_epoch_refused_total``.
    Thread-safe: one int read and a counter increment.
    """

    def __init__(self, epoch: int = 0) -> None:
        self._epoch = epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    def advance(self, epoch: int) -> None:
        """Install ``epoch``; epochs never go back."""
        if epoch < self._epoch:
            raise StaleEpoch("fence", epoch, self._epoch)
        self._epoch = epoch

    def admits(self, epoch: int, channel: str) -> bool:
        """True if ``epoch`` is current or newer; otherwise count the refusal and return False."""
        if epoch >= self._epoch:
            return True
        metrics.STALE_EPOCH_REFUSED.labels(channel=channel).inc()
        return False

    def check(self, epoch: int, channel: str) -> None:
        """Like :meth:`admits` but raise :class:`StaleEpoch` on refusal."""
        if not self.admits(epoch, channel):
            raise StaleEpoch(channel, epoch, self._epoch)


# --- what the pipeline drives -------------------------------------------------------------------


class ViewLike(Protocol):
    epoch: int
    members: tuple[int, ...]
    leader: int


class Planner(Protocol):
    def __call__(self, view: ViewLike, current: Any) -> Any:
        """Return a plan (with ``.placement`` and ``.moves``) for ``view`` from ``current``."""


class GroupManager(Protocol):
    def rebuild(self, view: ViewLike) -> Any:
        """Build the collective group over ``view.members`` and abort the previous one."""


class WeightMover(Protocol):
    async def stage(self, plan: Any, epoch: int) -> Any:
        """Copy the weights this rank receives under ``plan`` into staging; return them."""


class Barrier(Protocol):
    async def wait(self, epoch: int, members: Sequence[int], timeout_s: float) -> None:
        """Return once every member has arrived for ``epoch``; raise CommitTimeout past the bound."""


class Engine(Protocol):
    def current_placement(self) -> Any:
        """The placement being served now."""

    def commit(self, epoch: int, plan: Any, staged: Any, group: Any) -> None | Awaitable[None]:
        """Swap placement, dispatch map, staged weights, group and epoch in one step (may return
        an awaitable, which the pipeline awaits before ``resume``)."""

    def resume(self, epoch: int) -> None:
        """Replay the step the failure interrupted and go on serving."""


# --- store barrier ------------------------------------------------------------------------------


class StoreBarrier:
    """A commit barrier on a ``torch.distributed.TCPStore`` (or any store with add/get/check).

    Each member adds itself under ``{prefix}{epoch}/arrived`` and marks ``.../rank/{r}``; it then
    polls with backoff (never spins) until the count reaches the member count or the bound
    passes. The epoch in the key keeps barriers of different views apart.
    """

    def __init__(self, store: Any, rank: int, *, prefix: str = "elasticep/commit/", poll_s: float = 0.002) -> None:
        self._store = store
        self._rank = rank
        self._prefix = prefix
        self._poll_s = poll_s

    async def wait(self, epoch: int, members: Sequence[int], timeout_s: float) -> None:
        base = f"{self._prefix}{epoch}/"
        await asyncio.to_thread(self._store.set, f"{base}rank/{self._rank}", b"1")
        await asyncio.to_thread(self._store.add, f"{base}arrived", 1)
        deadline = time.monotonic() + timeout_s
        delay = self._poll_s
        while True:
            count = int(await asyncio.to_thread(self._store.add, f"{base}arrived", 0))
            if count >= len(members):
                return
            if time.monotonic() >= deadline:
                keys = [f"{base}rank/{r}" for r in members]
                present = await asyncio.to_thread(
                    lambda: [r for r, k in zip(members, keys) if self._store.check([k])]
                )
                raise CommitTimeout(epoch, sorted(set(members) - set(present)))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)


# --- the pipeline -------------------------------------------------------------------------------


@dataclass
class PhaseTiming:
    phase: str
    start_ns: int
    end_ns: int = 0
    status: str = "running"

    @property
    def ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6 if self.end_ns else 0.0


@dataclass
class ReconfigResult:
    """What one pipeline run did. ``status`` is ``"committed"``, ``"abandoned"`` or ``"failed"``."""

    epoch: int
    status: str
    phases: list[PhaseTiming] = field(default_factory=list)
    plan: Any = None
    error: BaseException | None = None

    def timeline(self) -> dict[str, float]:
        """Phase name to duration in ms, for the ones that ended."""
        return {p.phase: p.ms for p in self.phases if p.end_ns}


Publish = Callable[[Event], Awaitable[None]]


class ReconfigPipeline:
    """Runs the reconfiguration phases for each installed view on one rank.

    Who calls it: the rank's control loop, once per view its membership service installs
    (``await pipeline.run(view)``), and :meth:`supersede` as soon as a newer view is known, which
    makes a running :meth:`run` raise :class:`Superseded` at its next phase boundary (and cancels
    a barrier wait) before anything is committed.
    """

    def __init__(
        self,
        rank: int,
        *,
        planner: Planner,
        engine: Engine,
        groups: GroupManager | None = None,
        weights: WeightMover | None = None,
        barrier: Barrier | None = None,
        publish: Publish | None = None,
        fence: EpochFence | None = None,
        commit_timeout_s: float = 5.0,
    ) -> None:
        self.rank = rank
        self.fence = fence or EpochFence()
        self._planner = planner
        self._engine = engine
        self._groups = groups
        self._weights = weights
        self._barrier = barrier
        self._publish = publish
        self._commit_timeout_s = commit_timeout_s
        self._newest = self.fence.epoch
        self._superseded = asyncio.Event()
        self.history: list[ReconfigResult] = []

    def supersede(self, epoch: int) -> None:
        """A view with ``epoch`` was installed: abandon any run for an older epoch."""
        if epoch > self._newest:
            self._newest = epoch
            self._superseded.set()

    async def run(self, view: ViewLike) -> ReconfigResult:
        """Drive all phases for ``view``; return the result (never raises for ``Superseded``)."""
        self.supersede(view.epoch)
        if self._newest <= view.epoch:
            self._superseded.clear()
        result = ReconfigResult(epoch=view.epoch, status="running")
        self.history.append(result)
        try:
            plan = await self._phase(result, "plan", self._plan, view)
            result.plan = plan
            group = await self._phase(result, "groups", self._rebuild, view)
            staged = await self._phase(result, "weights", self._stage, plan, view.epoch)
            await self._phase(result, "commit", self._commit, view, plan, staged, group)
            await self._phase(result, "resume", self._resume, view.epoch)
            result.status = "committed"
        except Superseded as exc:
            result.status = "abandoned"
            result.error = exc
        except RedundancyExhausted as exc:
            # Invariant 4: no live replica for some expert; the engine must not serve on.
            # (The planner counts it in elasticep_redundancy_exhausted_total.)
            result.status = "failed"
            result.error = exc
        except Exception as exc:  # a failed phase is reported, and the next view retries
            result.status = "failed"
            result.error = exc
        return result

    # phases ---------------------------------------------------------------------------------

    async def _plan(self, view: ViewLike) -> Any:
        # A planner may be a coroutine function: e.g. one that waits for the leader's plan.
        plan = self._planner(view, self._engine.current_placement())
        if inspect.isawaitable(plan):
            plan = await plan
        return plan

    async def _rebuild(self, view: ViewLike) -> Any:
        if self._groups is None:
            return None
        return await asyncio.to_thread(self._groups.rebuild, view)

    async def _stage(self, plan: Any, epoch: int) -> Any:
        if self._weights is None:
            return None
        return await self._weights.stage(plan, epoch)

    async def _commit(self, view: ViewLike, plan: Any, staged: Any, group: Any) -> None:
        if self._barrier is not None:
            await self._race(self._barrier.wait(view.epoch, view.members, self._commit_timeout_s), view.epoch)
        self._check(view.epoch)
        # From here on nothing but the engine's own commit awaits: the swap is atomic with
        # respect to the pipeline (a newer view only supersedes the next run).
        self.fence.advance(view.epoch)
        done = self._engine.commit(view.epoch, plan, staged, group)
        if inspect.isawaitable(done):
            await done

    async def _resume(self, epoch: int) -> None:
        self._engine.resume(epoch)

    # machinery ------------------------------------------------------------------------------

    def _check(self, epoch: int) -> None:
        if self._newest > epoch:
            raise Superseded(epoch, self._newest)

    async def _race(self, awaitable: Awaitable[Any], epoch: int) -> Any:
        """Await ``awaitable`` unless a newer view arrives first."""
        task = asyncio.ensure_future(awaitable)
        waiter = asyncio.ensure_future(self._superseded.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise Superseded(epoch, self._newest)
        return task.result()

    async def _phase(self, result: ReconfigResult, name: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        epoch = result.epoch
        if name != "resume":
            self._check(epoch)
        timing = PhaseTiming(name, time.time_ns())
        result.phases.append(timing)
        await self._emit(epoch, name, "start", timing.start_ns)
        t0 = time.perf_counter()
        try:
            if name in ("commit", "resume"):
                value = await fn(*args)
            else:
                value = await self._race(fn(*args), epoch)
        except Superseded:
            timing.end_ns, timing.status = time.time_ns(), "abandoned"
            await self._emit(epoch, name, "abandoned", timing.end_ns, f"superseded by {self._newest}")
            raise
        except Exception as exc:
            timing.end_ns, timing.status = time.time_ns(), "failed"
            await self._emit(epoch, name, "failed", timing.end_ns, f"{type(exc).__name__}: {exc}")
            raise
        timing.end_ns, timing.status = time.time_ns(), "end"
        metrics.RECONFIG_PHASE_SECONDS.labels(phase=name).observe(time.perf_counter() - t0)
        # a phase's result may describe itself (e.g. where the staged weights came from)
        detail = getattr(value, "detail", "")
        await self._emit(epoch, name, "end", timing.end_ns, detail if isinstance(detail, str) else "")
        return value

    async def _emit(self, epoch: int, phase: str, status: str, t_ns: int, detail: str = "") -> None:
        if self._publish is None:
            return
        await self._publish(
            ReconfigPhase(epoch=epoch, rank=self.rank, phase=phase, status=status, t_ns=t_ns, detail=detail)  # type: ignore[arg-type]
        )
