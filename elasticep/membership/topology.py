"""Detection topologies: which peers a rank hears, watches, and stands in line to propose for.

Pure functions of the member set (a sorted tuple of ranks); no I/O, no clock.

* ``"all"`` (the small-cluster profile): every rank hears and watches every other. Per rank,
  ``N - 1`` bus subscriptions and ``(N - 1) * 1000 / heartbeat_interval_ms`` heartbeats a second.
* ``"ring"``: the members, sorted by rank, form a ring; each rank hears and watches the
  ``k = monitors_per_rank // 2`` nearest members on each side, so every rank is watched by
  ``monitors_per_rank`` others whatever ``N`` is. Per rank, ``monitors_per_rank`` subscriptions
  and ``monitors_per_rank * 1000 / heartbeat_interval_ms`` heartbeats a second. Everything a rank
  publishes (its heartbeat, its suspicions, its join request) reaches exactly the ranks that
  watch it. Two of a rank's watchers are at most two places apart (its two nearest neighbours),
  so with ``k >= 2`` they hear each other's suspicions and can corroborate; that is why
  ``monitors_per_rank`` is at least 4.

A rank outside the member set (a joiner) is placed where it would sit in the ring: it hears, and
is heard by, the ``k`` members on each side of that place, its *sponsors*. Verdicts need no
fan-out beyond that: the change is committed in the view store, which every rank polls
(``Config.store_poll_ms``; a ring never slows to ``store_idle_poll_ms``), and each installer announces it to its own neighbours.

When ranks die, the ring closes over them at the next view, so a rank whose whole watching set
died together with it is watched by new neighbours from that view on (and, silent, is suspected
``min_suspect_ms`` later).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterable, Sequence

TOPOLOGIES = ("all", "ring")


def _place(members: Sequence[int], rank: int) -> tuple[int, bool]:
    i = bisect_left(members, rank)
    return i, i < len(members) and members[i] == rank


def ring_distance(members: Sequence[int], a: int, b: int) -> int:
    """Places between ``a`` and ``b`` in the ring of ``members`` (sorted) with both inserted."""
    if a == b:
        return 0
    ia, a_in = _place(members, a)
    ib, b_in = _place(members, b)
    n = len(members) + (not a_in) + (not b_in)
    pa = ia + (1 if not b_in and b < a else 0)
    pb = ib + (1 if not a_in and a < b else 0)
    d = abs(pa - pb)
    return min(d, n - d)


class Topology:
    """Who hears whom (``kind`` in :data:`TOPOLOGIES`; ``monitors_per_rank`` used by ``"ring"``)."""

    def __init__(self, kind: str = "all", monitors_per_rank: int = 4) -> None:
        if kind not in TOPOLOGIES:
            raise ValueError(f"detection_topology must be one of {TOPOLOGIES}, not {kind!r}")
        if kind == "ring" and (monitors_per_rank < 4 or monitors_per_rank % 2):
            raise ValueError("monitors_per_rank must be an even number >= 4 for the ring "
                             f"(two watchers of a rank must hear each other), not {monitors_per_rank}")
        self.kind = kind
        self.monitors_per_rank = monitors_per_rank
        self.half = monitors_per_rank // 2

    @classmethod
    def from_config(cls, config) -> "Topology":
        return cls(config.detection_topology, config.monitors_per_rank)

    def __repr__(self) -> str:
        return f"Topology({self.kind!r}, monitors_per_rank={self.monitors_per_rank})"

    @property
    def everyone(self) -> bool:
        return self.kind == "all"

    def hears(self, members: Sequence[int], rank: int, peer: int) -> bool:
        """Whether ``rank`` subscribes to ``peer``'s stream, given the member set (symmetric)."""
        if self.kind == "all" or rank == peer:
            return rank != peer
        return ring_distance(members, rank, peer) <= self.half

    def neighbors(self, members: Sequence[int], rank: int) -> tuple[int, ...]:
        """The members ``rank`` hears (and watches), sorted; ``rank`` itself excluded.

        For a ``rank`` outside ``members``, its sponsors: the members nearest its place.
        """
        n = len(members)
        if self.kind == "all" or n <= 2 * self.half + (1 if _place(members, rank)[1] else 0):
            return tuple(m for m in members if m != rank)
        i, inside = _place(members, rank)
        out = set()
        for d in range(1, self.half + 1):
            out.add(members[(i + d if inside else i + d - 1) % n])
            out.add(members[(i - d) % n])
        out.discard(rank)
        return tuple(sorted(out))

    def in_line(self, members: Sequence[int], changed: Iterable[int]) -> set[int] | None:
        """Ranks that can know of a change to ``changed`` (the proposers' pool), or None for all."""
        if self.kind == "all":
            return None
        pool: set[int] = set()
        for rank in changed:
            pool.update(self.neighbors(members, rank))
        return pool

    def messages_per_rank_per_s(self, n: int, heartbeat_interval_ms: float) -> float:
        """Steady-state heartbeats each rank receives per second (the model the bench checks)."""
        peers = n - 1 if self.kind == "all" else min(n - 1, self.monitors_per_rank)
        return peers * 1000.0 / heartbeat_interval_ms
