"""Healthy-rank groups over the Mooncake ``torch.distributed`` backend (GPU clusters).

The Mooncake backend (``mooncake.pg``, backends ``"mooncake"`` and ``"mooncake-cpu"``) keeps one
process group for the whole job and an ``active_ranks`` mask (``[world_size]`` ``torch.int32``,
on the backend's device) that it passes to every collective: a rank whose entry is 0 is skipped
and nobody waits for it, and the backend itself clears the entry of a peer that times out. So a
new view does not need a new communicator: ``rebuild`` writes the view into the mask (0 for every
rank outside it) and brings rejoining ranks back with ``pg.recover_ranks`` once
``pg.get_peer_state`` reports them connected. Global ranks are kept, no renumbering.

The process group is created by the caller, e.g.::

    active = torch.ones(world_size, dtype=torch.int32, device="cuda")
    dist.init_process_group("mooncake", rank=rank, world_size=world_size,
                            pg_options=mooncake.pg.MooncakeBackendOptions(active))

and handed over with its mask.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from elasticep.events import CollectiveError
from elasticep.groups.base import HealthyGroup, RendezvousFailed, ViewLike, check_view

__all__ = ["MooncakeGroups", "mooncake_unavailable_reason"]


def mooncake_unavailable_reason() -> str | None:
    """Why the Mooncake backend cannot be used in this process, or ``None`` if it can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU: the Mooncake backend (mooncake.pg) ships only in CUDA builds"
    try:
        import mooncake.pg  # noqa: F401
    except ImportError as exc:
        return f"mooncake.pg does not import: {exc}"
    return None


class MooncakeGroups:
    """Keeps the Mooncake backend's ``active_ranks`` mask equal to each view, for one rank.

    ``process_group`` is the ``torch.distributed`` group created with the Mooncake backend and
    ``active_ranks`` the mask tensor given in its ``MooncakeBackendOptions``. ``recover_timeout_s``
    bounds the wait for a rejoining rank to connect.
    """

    backend_name = "mooncake"

    def __init__(
        self,
        process_group: Any,
        active_ranks: torch.Tensor,
        rank: int,
        *,
        op_timeout_s: float = 5.0,
        recover_timeout_s: float = 30.0,
    ) -> None:
        reason = mooncake_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"Mooncake groups unavailable: {reason}")
        if active_ranks.dtype != torch.int32 or active_ranks.dim() != 1:
            raise ValueError("active_ranks must be a [world_size] torch.int32 tensor")
        self.process_group = process_group
        self.active_ranks = active_ranks
        self.rank = rank
        self.op_timeout_s = op_timeout_s
        self.recover_timeout_s = recover_timeout_s
        self._current: HealthyGroup | None = None
        self._last_epoch: int | None = None

    @property
    def current(self) -> HealthyGroup | None:
        return self._current

    def _backend(self) -> Any:
        return self.process_group._get_backend(self.active_ranks.device)

    def rebuild(self, view: ViewLike) -> HealthyGroup:
        """Write ``view`` into ``active_ranks``; recover rejoining ranks; return the group."""
        from mooncake import pg as mooncake_pg

        epoch, members = check_view(view, self.rank, self._last_epoch)
        world = self.active_ranks.numel()
        if any(m >= world for m in members):
            raise ValueError(f"view {epoch} has a member >= the Mooncake group's world size {world}")
        self._last_epoch = epoch
        if self._current is not None:
            self._current.aborted = True
            self._current = None
        mask = torch.zeros(world, dtype=torch.int32)
        mask[list(members)] = 1
        was = self.active_ranks.to("cpu")
        rejoining = [r for r in members if int(was[r]) == 0]
        # Drop dead ranks first, so no collective issued meanwhile waits on them.
        self.active_ranks.mul_(mask.to(self.active_ranks.device))
        if rejoining:
            backend = self._backend()
            deadline = time.monotonic() + self.recover_timeout_s
            while not all(mooncake_pg.get_peer_state(backend, rejoining)):
                if time.monotonic() > deadline:
                    event = CollectiveError(observer=self.rank, op="rendezvous", reason="rejoin timeout")
                    raise RendezvousFailed(
                        f"ranks {rejoining} did not connect within {self.recover_timeout_s} s", event
                    )
                time.sleep(0.01)
            mooncake_pg.recover_ranks(backend, rejoining)
            self.active_ranks.copy_(mask.to(self.active_ranks.device))
        self._current = HealthyGroup(
            epoch=epoch,
            members=members,
            rank=self.rank,
            backend=self.process_group,
            backend_name=self.backend_name,
            op_timeout_s=self.op_timeout_s,
            rank_map={m: m for m in members},
        )
        return self._current

    def abort(self) -> None:
        """Retire the current group object; the job-wide communicator lives on behind the mask."""
        if self._current is not None:
            self._current.aborted = True
            self._current = None
