"""Healthy-rank groups over NCCL (GPU clusters).

Where the backend can shrink (torch >= 2.10 with NCCL >= 2.27: ``Backend.supports_shrinking``), a
view that only removes members shrinks the current communicator with ``SHRINK_ABORT``, which
aborts the parent's in-flight operations instead of waiting for them and keeps the survivors'
relative order, so dense ranks stay in member order. Any other change (a rank added, members
reordered, no shrink support) aborts the current communicator and builds a new one whose
rendezvous lives under the view's epoch, as :class:`~elasticep.groups.GlooGroups` does.

Every communicator is non-blocking (``config.blocking = 0``) with ``op_timeout_s`` as its timeout,
so a dead peer turns into an error rather than a hang.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from elasticep.events import CollectiveError
from elasticep.groups.base import HealthyGroup, RendezvousFailed, ViewLike, check_view
from elasticep.groups.gloo import group_store_prefix

__all__ = ["NcclGroups", "nccl_unavailable_reason"]


def nccl_unavailable_reason() -> str | None:
    """Why NCCL groups cannot be built in this process, or ``None`` if they can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    if not dist.is_nccl_available() or not hasattr(dist, "ProcessGroupNCCL"):
        return "this torch build has no NCCL backend"
    return None


class NcclGroups:
    """Builds an NCCL :class:`HealthyGroup` over each view's members, for one rank process.

    ``device`` is this rank's CUDA device. ``store``, ``rank`` and the timeouts mean what they mean
    for :class:`~elasticep.groups.GlooGroups`. ``prefer_shrink`` turns the shrink path off (for
    NCCL versions whose shrink is known to misbehave).
    """

    backend_name = "nccl"

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        device: torch.device | int,
        *,
        op_timeout_s: float = 5.0,
        rendezvous_timeout_s: float = 30.0,
        prefix: str = "elasticep/groups",
        prefer_shrink: bool = True,
    ) -> None:
        reason = nccl_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"NCCL groups unavailable: {reason}")
        self.store = store
        self.rank = rank
        self.device = torch.device("cuda", device) if isinstance(device, int) else device
        self.op_timeout_s = op_timeout_s
        self.rendezvous_timeout_s = rendezvous_timeout_s
        self.prefix = prefix
        self.prefer_shrink = prefer_shrink
        self._current: HealthyGroup | None = None
        self._last_epoch: int | None = None

    @property
    def current(self) -> HealthyGroup | None:
        return self._current

    def _options(self) -> "dist.ProcessGroupNCCL.Options":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = datetime.timedelta(seconds=self.op_timeout_s)
        # Non-blocking communicators return errors through the work objects and can be aborted
        # while an op is in flight, which a blocking communicator cannot.
        opts.config.blocking = 0
        return opts

    def _can_shrink(self, members: tuple[int, ...]) -> bool:
        old = self._current
        if not self.prefer_shrink or old is None or old.aborted:
            return False
        if not getattr(old.backend, "supports_shrinking", False):
            return False
        survivors = tuple(m for m in old.members if m in members)
        return survivors == members and len(members) < len(old.members)

    def rebuild(self, view: ViewLike) -> HealthyGroup:
        """Shrink or rebuild the communicator for ``view``; see the module docs."""
        epoch, members = check_view(view, self.rank, self._last_epoch)
        self._last_epoch = epoch
        torch.cuda.set_device(self.device)
        try:
            if self._can_shrink(members):
                old = self._current
                assert old is not None
                excluded = [old.to_group(m) for m in old.members if m not in members]
                shrink_abort = getattr(dist.distributed_c10d, "SHRINK_ABORT", 1)
                backend = old.backend.shrink(excluded, shrink_abort, self._options())
                # The parent is consumed by the shrink; mark it so nothing is issued on it.
                old.aborted = True
            else:
                self.abort()
                store = dist.PrefixStore(group_store_prefix(epoch, self.prefix), self.store)
                opts = self._options()
                opts._timeout = datetime.timedelta(seconds=self.rendezvous_timeout_s)
                backend = dist.ProcessGroupNCCL(store, members.index(self.rank), len(members), opts)
                # NCCL connects lazily; an eager init makes the rendezvous happen here, bounded.
                if hasattr(backend, "eager_connect_single_device"):
                    backend.eager_connect_single_device(self.device)
                backend._set_default_timeout(datetime.timedelta(seconds=self.op_timeout_s))
        except (RuntimeError, dist.DistError) as exc:
            reason = str(exc).splitlines()[0][:200]
            event = CollectiveError(observer=self.rank, op="rendezvous", reason=reason)
            raise RendezvousFailed(f"NCCL group of view {epoch} failed: {reason}", event) from exc
        self._current = HealthyGroup(
            epoch=epoch,
            members=members,
            rank=self.rank,
            backend=backend,
            backend_name=self.backend_name,
            op_timeout_s=self.op_timeout_s,
        )
        return self._current

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None
