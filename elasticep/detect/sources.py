"""Sources that turn raw failure signals into events on the bus (thin I/O around pure diffs).

* :class:`MaskProvider` is the one interface to every data-plane kernel that marks timed-out
  peers in an ``active_ranks`` mask after a dispatch or combine: elasticep's CPU kernel, Mooncake
  EP (``active_ranks``, ``[num_ranks]`` int32), DeepEP's low-latency mask buffer, NCCL-EP's mask
  query. :class:`MaskSource` reads it after each call and turns every 1 -> 0 transition into a
  :class:`~elasticep.events.PeerTimeout`.
* :class:`ProcessExitWatcher` is what a launcher runs beside its children: it learns of an exit
  the moment the kernel reports it (a pidfd becomes readable) and publishes a
  :class:`~elasticep.events.ProcessExit`.
* :func:`collective_error` and :func:`transfer_failed` build the events a caller publishes when
  a collective or a weight transfer fails.

Heartbeats are sent and received by :class:`elasticep.membership.MembershipService` itself.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Awaitable, Callable, Protocol, Sequence, runtime_checkable

from elasticep.events import CollectiveError, ProcessExit, PeerTimeout, TransferFailed

Publish = Callable[[Any], Awaitable[None]]
"""An async callable that publishes one event, e.g. ``bus.publish``."""


@runtime_checkable
class MaskProvider(Protocol):
    """Anything that exposes a peer-activity mask after each dispatch/combine.

    ``active_ranks`` is a sequence of ``num_ranks`` integers (a ``[num_ranks]`` ``torch.int32``
    tensor, a numpy array, a list): 1 means the peer answered within the kernel's timeout, 0 that
    the kernel gave up waiting on it. Providers may also expose ``timeout_us`` (int, the bound on
    one wait), which :class:`MaskSource` reports as ``PeerTimeout.waited_us``.
    """

    @property
    def active_ranks(self) -> Any: ...


def newly_inactive(previous: Sequence[int] | None, current: Sequence[int]) -> list[int]:
    """Ranks whose mask entry went from 1 to 0 between ``previous`` and ``current`` (pure).

    With no ``previous`` (first read), every 0 entry counts as a transition.
    """
    if previous is not None and len(previous) != len(current):
        raise ValueError(f"mask length changed from {len(previous)} to {len(current)}")
    if previous is None:
        return [r for r, v in enumerate(current) if int(v) == 0]
    return [r for r, (a, b) in enumerate(zip(previous, current)) if int(a) != 0 and int(b) == 0]


def _as_list(mask: Any) -> list[int]:
    if hasattr(mask, "tolist"):
        return [int(v) for v in mask.tolist()]
    return [int(v) for v in mask]


class MaskSource:
    """Reads a :class:`MaskProvider` after each data-plane call; returns and publishes timeouts.

    Args:
        rank: the observing rank (this process).
        provider: the kernel handle (anything with ``active_ranks``).
        publish: optional async publisher (``bus.publish``) used by :meth:`after_async`.

    The engine calls :meth:`after` (sync, cheap: one mask copy and a diff) right after each
    dispatch/combine on its own thread, or :meth:`after_async` from an event loop. A peer that the
    kernel re-activates (mask reset after a view change) can time out, and be reported, again.
    """

    def __init__(self, rank: int, provider: MaskProvider, publish: Publish | None = None) -> None:
        if not isinstance(provider, MaskProvider):
            raise TypeError(f"{type(provider).__name__} has no active_ranks mask")
        self.rank = rank
        self.provider = provider
        self._publish = publish
        self._previous: list[int] | None = None
        self.reported = 0

    def after(self, op: str, layer: int = -1) -> list[PeerTimeout]:
        """Diff the mask against the last read; one :class:`PeerTimeout` per newly inactive peer."""
        current = _as_list(self.provider.active_ranks)
        peers = newly_inactive(self._previous, current)
        self._previous = current
        waited = int(getattr(self.provider, "timeout_us", 0) or 0)
        events = [
            PeerTimeout(observer=self.rank, peer=p, op=op, layer=layer, waited_us=waited)
            for p in peers
            if p != self.rank
        ]
        self.reported += len(events)
        return events

    async def after_async(self, op: str, layer: int = -1) -> list[PeerTimeout]:
        """:meth:`after`, then publish each event."""
        if self._publish is None:
            raise RuntimeError("MaskSource was built without a publish callable")
        events = self.after(op, layer)
        for event in events:
            await self._publish(event)
        return events


def exit_event(rank: int, pid: int, status: int, incarnation: int = 0) -> ProcessExit:
    """A :class:`ProcessExit` from a ``waitpid`` status word (pure)."""
    if os.WIFSIGNALED(status):
        return ProcessExit(rank=rank, pid=pid, signal=os.WTERMSIG(status), incarnation=incarnation)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    return ProcessExit(rank=rank, pid=pid, exitcode=code, incarnation=incarnation)


class ProcessExitWatcher:
    """A launcher's watch on its rank processes: publishes :class:`ProcessExit` when one exits.

    Uses a pidfd per child (Linux >= 5.3), registered with the event loop, so the exit is seen as
    soon as the kernel reaps the process, without polling. The watcher reaps the child itself
    (``waitpid``), so callers should not also wait on it; :attr:`exits` keeps what it saw.

    Args:
        publish: async callable publishing one event (``bus.publish``), or None to only record.
        on_exit: optional plain callback ``on_exit(event, t_wall_ns)`` run on the loop thread.
    """

    def __init__(self, publish: Publish | None = None, on_exit: Callable[[ProcessExit, int], None] | None = None) -> None:
        self._publish = publish
        self._on_exit = on_exit
        self._fds: dict[int, tuple[int, int, int]] = {}  # fd -> (rank, pid, incarnation)
        self._tasks: set[asyncio.Task[None]] = set()
        self.exits: list[ProcessExit] = []

    def watch(self, rank: int, pid: int, incarnation: int = 0) -> None:
        """Start watching process ``pid`` serving ``rank``; call from the event loop's thread."""
        fd = os.pidfd_open(pid)
        self._fds[fd] = (rank, pid, incarnation)
        asyncio.get_running_loop().add_reader(fd, self._ready, fd)

    def _ready(self, fd: int) -> None:
        import time

        rank, pid, incarnation = self._fds.pop(fd)
        loop = asyncio.get_running_loop()
        loop.remove_reader(fd)
        os.close(fd)
        try:
            _, status = os.waitpid(pid, 0)
            event = exit_event(rank, pid, status, incarnation)
        except ChildProcessError:
            # Reaped elsewhere (or not our child): the exit is certain, its status unknown.
            event = ProcessExit(rank=rank, pid=pid, incarnation=incarnation)
        self.exits.append(event)
        if self._on_exit is not None:
            self._on_exit(event, time.time_ns())
        if self._publish is not None:
            task = loop.create_task(self._publish(event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Stop watching every process (they keep running)."""
        if self._fds:
            loop = asyncio.get_running_loop()
            for fd in list(self._fds):
                loop.remove_reader(fd)
                os.close(fd)
            self._fds.clear()


def collective_error(observer: int, op: str, error: BaseException | str, peer: int = -1) -> CollectiveError:
    """The event to publish when a collective ``op`` failed on ``observer``, blaming ``peer`` if known."""
    return CollectiveError(observer=observer, op=op, reason=str(error)[:500], peer=peer)


def transfer_failed(
    epoch: int, src: int, dst: int, layer: int, expert: int, error: BaseException | str, source_kind: str = "replica"
) -> TransferFailed:
    """The event to publish when moving expert ``(layer, expert)`` from ``src`` to ``dst`` failed."""
    return TransferFailed(
        epoch=epoch, src=src, dst=dst, layer=layer, expert=expert, reason=str(error)[:500], source_kind=source_kind
    )
