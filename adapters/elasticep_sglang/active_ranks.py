"""elasticep's membership views written into SGLang's active-ranks state, once per epoch.

SGLang acts on one mask: ``ElasticEPState.active_ranks`` (``[max_ep_size]`` ``torch.int32`` on
the GPU). Mooncake EP's dispatch and combine read it to skip dead peers and write 0 into it when
a peer times out; after every forward pass ``maybe_rebalance_after_rank_fault`` compares it with
the copy taken at the last change and rebalances the experts if it differs. Left alone, each rank
acts on what its own kernel saw, so two ranks can disagree about who is alive.

:class:`ActiveRanksFeed` makes the committed view the writer: each view's member set is written
into the mask exactly once (a view at or below the last applied epoch is refused and counted,
never written again), at a step boundary on the scheduler thread, so every rank rebalances on
the same member set. Ranks that a view admits (a rejoin) are, by default, left for SGLang's own
recovery path, which reconnects them through the Mooncake backend before it marks them active;
marking them active earlier would make the kernel wait on a peer that cannot answer yet.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, AsyncIterator, Callable, Protocol

import torch

from elasticep import metrics

__all__ = ["ActiveRanksFeed", "ElasticEPDisabled", "ViewLike"]

log = logging.getLogger(__name__)


class ViewLike(Protocol):
    """What the feed reads from a view (:class:`elasticep.membership.View` has both)."""

    epoch: int
    members: tuple[int, ...]


class ElasticEPDisabled(RuntimeError):
    """SGLang has no ``ElasticEPState``: start it with ``--elastic-ep-backend mooncake``."""


def _elastic_state() -> Any:
    from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager

    return ElasticEPStateManager.instance()


class ActiveRanksFeed:
    """Writes views into SGLang's ``ElasticEPState.active_ranks``.

    Args:
        state: returns the ``ElasticEPState`` (default ``ElasticEPStateManager.instance``).
        admit_joins: write ranks that a view admits as active at once (default False: SGLang's
            recovery path marks them active when the Mooncake backend has reconnected them).

    Thread use: :meth:`offer` (or :meth:`run`, on the event loop that runs the membership
    service) may be called from any thread; :meth:`apply_pending` and :meth:`apply` must run on
    SGLang's scheduler thread, at a step boundary, which is where the mask is read.

    Attributes:
        last_epoch: the epoch last written (0 before the first view).
        members: the member set last written (None before the first view).
        applied: every epoch written, in order (each at most once).
    """

    def __init__(self, state: Callable[[], Any] = _elastic_state, *, admit_joins: bool = False) -> None:
        self._state = state
        self.admit_joins = admit_joins
        self.last_epoch = 0
        self.members: frozenset[int] | None = None
        self.applied: list[int] = []
        self._pending: deque[ViewLike] = deque()
        self._cond = threading.Condition()
        self._offered_epoch = 0

    # ------------------------------------------------------------------ from the membership side

    def offer(self, view: ViewLike) -> None:
        """Queue ``view`` for the next step boundary (any thread)."""
        with self._cond:
            self._pending.append(view)
            self._offered_epoch = max(self._offered_epoch, int(view.epoch))
            self._cond.notify_all()

    async def run(self, views: AsyncIterator[ViewLike]) -> None:
        """Offer every view of ``views`` (e.g. ``MembershipService.views()``) until it ends."""
        async for view in views:
            self.offer(view)

    def wait_for_view(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until a view newer than :attr:`last_epoch` is offered.

        The step boundary calls this after the kernel marked a peer, so that the rank acts on
        the agreed view rather than on its own kernel's mask.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._offered_epoch > self.last_epoch, timeout=timeout)

    # ------------------------------------------------------------------ on the scheduler thread

    def apply_pending(self) -> list[str]:
        """Apply every queued view in order; returns their outcomes."""
        with self._cond:
            views = list(self._pending)
            self._pending.clear()
        return [self.apply(v) for v in views]

    def apply(self, view: ViewLike) -> str:
        """Write ``view``'s member set into the active-ranks mask if its epoch is new.

        Returns the outcome, also counted in ``elasticep_sglang_views_total``: ``applied``,
        ``duplicate`` (the epoch last applied) or ``stale`` (an older one); ranks a view admits
        while ``admit_joins`` is off are counted as ``join_deferred`` as well.

        Raises:
            ElasticEPDisabled: SGLang runs without elastic EP.
            ValueError: the view names a rank outside the mask's capacity (``--max-ep-size``).
        """
        epoch = int(view.epoch)
        if epoch <= self.last_epoch:
            outcome = "duplicate" if epoch == self.last_epoch else "stale"
            metrics.SGLANG_VIEWS.labels(outcome=outcome).inc()
            log.debug("view epoch %d refused (%s): epoch %d already applied", epoch, outcome, self.last_epoch)
            return outcome
        state = self._state()
        if state is None or getattr(state, "active_ranks", None) is None:
            raise ElasticEPDisabled("SGLang has no elastic EP state; launch it with --elastic-ep-backend mooncake")
        mask: torch.Tensor = state.active_ranks
        capacity = int(mask.numel())
        members = frozenset(int(m) for m in view.members)
        outside = sorted(m for m in members if not 0 <= m < capacity)
        if outside:
            metrics.SGLANG_VIEWS.labels(outcome="invalid").inc()
            raise ValueError(f"view epoch {epoch} names ranks {outside} beyond the active-ranks capacity {capacity}")
        current = mask.detach().to("cpu", torch.int32)
        want = torch.zeros(capacity, dtype=torch.int32)
        want[sorted(members)] = 1
        previous = self.members if self.members is not None else frozenset(int(r) for r in torch.nonzero(current).flatten())
        joins = sorted(members - previous)
        if joins and not self.admit_joins:
            want[joins] = current[joins]
            metrics.SGLANG_VIEWS.labels(outcome="join_deferred").inc()
        mask.copy_(want.to(device=mask.device, dtype=mask.dtype))
        self.last_epoch = epoch
        self.members = members
        self.applied.append(epoch)
        metrics.SGLANG_VIEWS.labels(outcome="applied").inc()
        log.info("view epoch %d written to active ranks: members %s%s", epoch, sorted(members),
                 f", joins {joins} left to SGLang's recovery" if joins and not self.admit_joins else "")
        return "applied"

    def members_mask(self, capacity: int) -> torch.Tensor | None:
        """``[capacity]`` bool of the members last written (None before the first view)."""
        if self.members is None:
            return None
        out = torch.zeros(capacity, dtype=torch.bool)
        out[[m for m in self.members if m < capacity]] = True
        return out

