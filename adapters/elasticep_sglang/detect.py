"""Mooncake EP's ``active_ranks`` mask inside SGLang, read as an elasticep detection source.

SGLang hands Mooncake EP's ``dispatch`` and ``combine`` the tensor
``ElasticEPState.active_ranks`` (``[max_ep_size]`` ``torch.int32``); when a peer does not answer
within ``timeout_us`` (10 s in SGLang 0.5.23, no bound on the first call) the kernel writes 0
into that peer's entry. :class:`SGLangActiveRanks` exposes that tensor as an
:class:`elasticep.detect.MaskProvider`, and :func:`mooncake_mask_source` wraps it in an
:class:`elasticep.detect.MaskSource`, which turns each 1 -> 0 transition into a
:class:`~elasticep.events.PeerTimeout` for the bus.

The feed (:class:`~elasticep_sglang.active_ranks.ActiveRanksFeed`) writes views into the same
tensor. So that a rank the view removed is not reported again as a kernel timeout, the provider
shows ranks outside the last written view as active: only the kernel's own marks on members are
transitions.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from elasticep.detect import MaskSource
from elasticep_sglang.active_ranks import ActiveRanksFeed

__all__ = ["MOONCAKE_EP_TIMEOUT_US", "SGLangActiveRanks", "mooncake_mask_source"]

#: The per-call wait bound SGLang 0.5.23's Mooncake EP dispatcher passes (microseconds).
MOONCAKE_EP_TIMEOUT_US = 10_000_000


def _elastic_state() -> Any:
    from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager

    return ElasticEPStateManager.instance()


class SGLangActiveRanks:
    """A :class:`~elasticep.detect.MaskProvider` over SGLang's ``ElasticEPState.active_ranks``.

    Args:
        state: returns the ``ElasticEPState`` (default ``ElasticEPStateManager.instance``).
        feed: the view feed writing the same tensor, whose non-members are shown as active.
        num_ranks: report only the first ``num_ranks`` entries (default: the whole capacity).
        timeout_us: the kernel's wait bound, reported as ``PeerTimeout.waited_us``.

    Reading copies the mask to the host (a device sync): read it at a step boundary, not inside
    the forward pass.
    """

    def __init__(
        self,
        state: Callable[[], Any] = _elastic_state,
        *,
        feed: ActiveRanksFeed | None = None,
        num_ranks: int | None = None,
        timeout_us: int = MOONCAKE_EP_TIMEOUT_US,
    ) -> None:
        self._state = state
        self.feed = feed
        self.num_ranks = num_ranks
        self.timeout_us = timeout_us

    @property
    def active_ranks(self) -> torch.Tensor:
        """``[num_ranks]`` ``torch.int32`` on CPU: 1 active, 0 marked by the kernel."""
        state = self._state()
        if state is None or getattr(state, "active_ranks", None) is None:
            raise RuntimeError("SGLang has no elastic EP state; launch it with --elastic-ep-backend mooncake")
        mask = state.active_ranks.detach().to("cpu", torch.int32).clone()
        if self.feed is not None:
            members = self.feed.members_mask(mask.numel())
            if members is not None:
                mask[~members] = 1
        return mask if self.num_ranks is None else mask[: self.num_ranks]


def mooncake_mask_source(rank: int, publish: Any | None = None, **provider_args: Any) -> MaskSource:
    """A :class:`~elasticep.detect.MaskSource` for this SGLang rank's Mooncake EP mask.

    ``publish`` is an async callable (``bus.publish``) for ``after_async``; ``provider_args`` go
    to :class:`SGLangActiveRanks`.
    """
    return MaskSource(rank, SGLangActiveRanks(**provider_args), publish)
