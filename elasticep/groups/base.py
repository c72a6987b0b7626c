"""The interface every healthy-rank collective backend implements, and the group it returns.

A :class:`HealthyGroup` is a process group over the members of one view. It knows its epoch, the
global ranks of its members in member order and, for backends that renumber (gloo, NCCL), the
dense rank each member has inside the group. Every collective it runs is bounded by a timeout; a
failure raises :class:`CollectiveFailed`, which carries a :class:`~elasticep.events.CollectiveError`
event for the caller to publish on the bus.

A :class:`GroupBuilder` (one per rank process) turns each installed view into a new group with
``rebuild(view)`` and aborts the previous one first: an abort never waits for a peer, so a dead
rank cannot stall it. The reconfiguration pipeline calls ``rebuild`` in its ``groups`` phase.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import AllgatherOptions, BarrierOptions, BroadcastOptions

from elasticep import metrics
from elasticep.events import CollectiveError

__all__ = [
    "CollectiveFailed",
    "GroupAborted",
    "GroupBuilder",
    "GroupError",
    "HealthyGroup",
    "NotAMember",
    "RendezvousFailed",
    "StaleGroupEpoch",
    "ViewLike",
    "check_view",
]


@runtime_checkable
class ViewLike(Protocol):
    """Anything with an ``epoch`` and the ``members`` of the view (global ranks, in order).

    The membership service's view and :class:`~elasticep.events.ViewInstalled` both qualify.
    """

    epoch: int
    members: Sequence[int]


class GroupError(RuntimeError):
    """Base of every error raised by :mod:`elasticep.groups`."""


class StaleGroupEpoch(GroupError):
    """``rebuild`` was asked for a view whose epoch is not newer than the current group's.

    Counted in ``elasticep_stale_epoch_refused_total{channel="collective"}``.
    """


class NotAMember(GroupError):
    """This rank is not a member of the view it was asked to build a group for."""


class GroupAborted(GroupError):
    """A collective was issued on a group that was aborted (its view has been superseded)."""


class CollectiveFailed(GroupError):
    """A collective failed or timed out; ``event`` is the :class:`CollectiveError` to publish."""

    def __init__(self, message: str, event: CollectiveError) -> None:
        super().__init__(message)
        self.event = event


class RendezvousFailed(CollectiveFailed):
    """The members of the view did not all reach the group's rendezvous within its bound."""


def check_view(view: ViewLike, rank: int, current_epoch: int | None) -> tuple[int, tuple[int, ...]]:
    """Validate ``view`` for ``rank``; return ``(epoch, members)`` or raise a typed error.

    Shared by every builder: a view must be newer than the group it replaces (invariant 3: nothing
    from an older epoch is applied), list each member once, and include ``rank``.
    """
    epoch = int(view.epoch)
    members = tuple(int(m) for m in view.members)
    if current_epoch is not None and epoch <= current_epoch:
        metrics.STALE_EPOCH_REFUSED.labels(channel="collective").inc()
        raise StaleGroupEpoch(f"view epoch {epoch} is not newer than the current group's epoch {current_epoch}")
    if len(set(members)) != len(members) or any(m < 0 for m in members):
        raise ValueError(f"view {epoch} has duplicate or negative members: {members}")
    if rank not in members:
        raise NotAMember(f"rank {rank} is not a member of view {epoch} (members {members})")
    return epoch, members


_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT,
}


class HealthyGroup:
    """A process group over the live members of view ``epoch``; built by a :class:`GroupBuilder`.

    ``members`` are global ranks in member order; ``group_rank`` is this process's rank inside the
    backend (dense ``0 .. size-1`` for gloo and NCCL; for the Mooncake backend, which keeps the
    original numbering and masks dead ranks, it equals the global rank). ``backend`` is the raw
    ``torch.distributed`` backend object, for callers that need an op this class does not wrap.

    Collectives take and return CPU tensors for gloo, device tensors for NCCL/Mooncake. Each op is
    bounded by ``op_timeout_s`` (seconds) unless a call passes its own ``timeout_s``.
    """

    def __init__(
        self,
        *,
        epoch: int,
        members: Sequence[int],
        rank: int,
        backend: Any,
        backend_name: str,
        op_timeout_s: float,
        rank_map: dict[int, int] | None = None,
    ) -> None:
        self.epoch = epoch
        self.members: tuple[int, ...] = tuple(members)
        self.rank = rank
        self.backend = backend
        self.backend_name = backend_name
        self.op_timeout_s = op_timeout_s
        # global rank -> rank inside the backend; dense member order unless the backend keeps
        # global numbering (Mooncake).
        self._to_group = dict(rank_map) if rank_map is not None else {g: i for i, g in enumerate(self.members)}
        self._to_global = {i: g for g, i in self._to_group.items()}
        self.group_rank = self._to_group[rank]
        self.aborted = False

    def __repr__(self) -> str:
        return (
            f"HealthyGroup(epoch={self.epoch}, backend={self.backend_name!r}, members={self.members}, "
            f"rank={self.rank}, group_rank={self.group_rank}{', aborted' if self.aborted else ''})"
        )

    @property
    def size(self) -> int:
        """Number of members of the view (live ranks the collectives include)."""
        return len(self.members)

    def to_global(self, group_rank: int) -> int:
        """The global rank of the member that is ``group_rank`` inside the backend."""
        return self._to_global[group_rank]

    def to_group(self, global_rank: int) -> int:
        """The rank inside the backend of the member whose global rank is ``global_rank``."""
        try:
            return self._to_group[global_rank]
        except KeyError:
            raise NotAMember(f"rank {global_rank} is not a member of view {self.epoch}") from None

    def process_group(self) -> "dist.ProcessGroup":
        """A ``torch.distributed.ProcessGroup`` over this group's backend, for code that hands a
        group to ``torch.distributed`` collectives (``dist.all_reduce(t, group=...)``) rather
        than calling this class. Those calls are bounded by the backend's own timeout, not by
        ``op_timeout_s``. Built once; gloo only."""
        pg = getattr(self, "_process_group", None)
        if pg is None:
            if self.backend_name != "gloo":
                raise GroupError(f"process_group() wraps gloo groups only, not {self.backend_name!r}")
            pg = dist.ProcessGroup(self.group_rank, self.backend.size())
            pg._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
            pg._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, self.backend)
            self._process_group = pg
        return pg

    # --- collectives ------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", *, timeout_s: float | None = None) -> torch.Tensor:
        """Reduce ``tensor`` in place over every member (``op``: sum, max, min, product); return it."""
        opts = dist.AllreduceOptions()
        opts.reduceOp = _REDUCE_OPS[op]
        return self._run("all_reduce", lambda: self.backend.allreduce([tensor], opts), opts, timeout_s, tensor)

    def broadcast(self, tensor: torch.Tensor, src: int, *, timeout_s: float | None = None) -> torch.Tensor:
        """Copy ``tensor`` from global rank ``src`` to every member, in place; return it."""
        opts = BroadcastOptions()
        opts.rootRank = self.to_group(src)
        opts.rootTensor = 0
        return self._run("broadcast", lambda: self.backend.broadcast([tensor], opts), opts, timeout_s, tensor)

    def all_gather(self, tensor: torch.Tensor, *, timeout_s: float | None = None) -> list[torch.Tensor]:
        """Every member's ``tensor``, in backend rank order (member order for gloo and NCCL)."""
        n = self.backend.size()
        out = [torch.empty_like(tensor) for _ in range(n)]
        opts = AllgatherOptions()
        self._run("all_gather", lambda: self.backend.allgather([out], [tensor], opts), opts, timeout_s, None)
        return out

    def barrier(self, *, timeout_s: float | None = None) -> None:
        """Wait until every member reaches the barrier, at most the op timeout."""
        opts = BarrierOptions()
        self._run("barrier", lambda: self.backend.barrier(opts), opts, timeout_s, None)

    def abort(self) -> None:
        """Abort the backend: pending and later ops fail at once; never waits for a peer."""
        if self.aborted:
            return
        self.aborted = True
        abort = getattr(self.backend, "abort", None)
        if abort is not None:
            try:
                abort()
            except RuntimeError:
                # A backend whose communicator already failed may refuse a second abort; the
                # group is dead either way and nothing waits on it.
                pass

    def _run(self, op: str, issue: Any, opts: Any, timeout_s: float | None, result: Any) -> Any:
        if self.aborted:
            raise GroupAborted(f"group of epoch {self.epoch} was aborted; {op} refused")
        timeout = datetime.timedelta(seconds=self.op_timeout_s if timeout_s is None else timeout_s)
        opts.timeout = timeout
        try:
            work = issue()
            work.wait(timeout)
        except (RuntimeError, dist.DistError) as exc:
            metrics.COLLECTIVE_FAILURES.labels(op=op).inc()
            reason = "aborted" if self.aborted else str(exc).splitlines()[0][:200]
            event = CollectiveError(observer=self.rank, op=op, reason=reason)
            raise CollectiveFailed(f"{op} on the epoch-{self.epoch} group failed: {reason}", event) from exc
        return result


class GroupBuilder(Protocol):
    """Rebuilds the healthy-rank group of one rank process for each view; see module docs.

    ``rebuild(view)`` aborts the current group (never a cooperative destroy), builds a group over
    ``view.members`` and returns it. A view not newer than the current group's raises
    :class:`StaleGroupEpoch`; a view without this rank raises :class:`NotAMember`; members that do
    not reach the rendezvous within its bound raise :class:`RendezvousFailed`.
    """

    rank: int

    @property
    def current(self) -> HealthyGroup | None: ...

    def rebuild(self, view: ViewLike) -> HealthyGroup: ...

    def abort(self) -> None: ...
