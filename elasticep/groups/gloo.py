"""Healthy-rank groups over gloo (CPU): a fresh group per view, rendezvous under the view's epoch.

Each view gets its own ``ProcessGroupGloo`` built directly on a ``PrefixStore`` named after the
epoch (``elasticep/groups/<epoch>/``), so no default group and no ``init_process_group`` is needed,
and the rendezvous keys and connections of one epoch can never be mistaken for another's: a rank
still stuck in the old epoch's group cannot complete the new one's rendezvous. Ranks are
renumbered densely in member order.
"""

from __future__ import annotations

import datetime
import time

import torch.distributed as dist

from elasticep.events import CollectiveError
from elasticep.groups.base import HealthyGroup, RendezvousFailed, ViewLike, check_view

__all__ = ["GlooGroups", "group_store_prefix"]


def group_store_prefix(epoch: int, prefix: str = "elasticep/groups") -> str:
    """The store prefix under which the group of view ``epoch`` meets, e.g. ``elasticep/groups/7/``."""
    return f"{prefix}/{epoch}/"


class GlooGroups:
    """Builds a gloo :class:`HealthyGroup` over each view's members, for one rank process.

    ``store`` is the cluster's ``torch.distributed`` store (a ``TCPStore`` hosted by the launcher,
    which outlives any rank). ``rendezvous_timeout_s`` bounds how long ``rebuild`` waits for every
    member to arrive (the members learn of a view at slightly different times, so give it more
    than the detection spread); ``op_timeout_s`` bounds each collective afterwards. Not
    thread-safe: the reconfiguration pipeline calls it from one task.
    """

    backend_name = "gloo"

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        *,
        op_timeout_s: float = 5.0,
        rendezvous_timeout_s: float = 10.0,
        prefix: str = "elasticep/groups",
    ) -> None:
        if op_timeout_s <= 0 or rendezvous_timeout_s <= 0:
            raise ValueError("op_timeout_s and rendezvous_timeout_s must be > 0")
        self.store = store
        self.rank = rank
        self.op_timeout_s = op_timeout_s
        self.rendezvous_timeout_s = rendezvous_timeout_s
        self.prefix = prefix
        self._current: HealthyGroup | None = None
        self._last_epoch: int | None = None

    @property
    def current(self) -> HealthyGroup | None:
        """The group of the newest view built, or ``None`` before the first and after an abort."""
        return self._current

    def rebuild(self, view: ViewLike) -> HealthyGroup:
        """Abort the current group, then build and return one over ``view.members``.

        Blocks until every member has joined the rendezvous, at most ``rendezvous_timeout_s``;
        past it raises :class:`RendezvousFailed` (whose ``event`` names the op ``rendezvous``).
        """
        epoch, members = check_view(view, self.rank, self._last_epoch)
        self.abort()
        self._last_epoch = epoch
        group_rank = members.index(self.rank)
        store = dist.PrefixStore(group_store_prefix(epoch, self.prefix), self.store)
        started = time.monotonic()
        try:
            backend = dist.ProcessGroupGloo(
                store, group_rank, len(members), datetime.timedelta(seconds=self.rendezvous_timeout_s)
            )
        except (RuntimeError, dist.DistError) as exc:
            reason = str(exc).splitlines()[0][:200]
            waited = time.monotonic() - started
            event = CollectiveError(observer=self.rank, op="rendezvous", reason=reason)
            raise RendezvousFailed(
                f"gloo rendezvous of view {epoch} (members {members}) failed after {waited:.2f} s: {reason}", event
            ) from exc
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
        """Abort the current group (if any); its pending collectives fail, nothing waits on peers."""
        if self._current is not None:
            self._current.abort()
            self._current = None
