"""``View``: one committed membership view, ``(epoch, members, leader)``, frozen and encodable."""

from __future__ import annotations

from typing import Iterable

import msgspec

from elasticep.errors import ElasticEPError


class View(msgspec.Struct, frozen=True, kw_only=True):
    """The member set of epoch ``epoch``; committed once by the view store, identical everywhere.

    ``members`` is sorted and ``leader`` is its lowest rank. ``incarnations`` is aligned with
    ``members``: 0 for a rank of the initial view (whatever process first served it), the joining
    process's own incarnation for a rank admitted by a :class:`~elasticep.events.JoinRequest`, so
    a restarted process never mistakes its dead predecessor's membership for its own.
    ``proposer`` and ``reason`` say who committed the view and why.
    """

    epoch: int
    members: tuple[int, ...]
    leader: int
    incarnations: tuple[int, ...] = ()
    proposer: int = -1
    reason: str = ""

    def __post_init__(self) -> None:
        if self.epoch < 1:
            raise ValueError(f"view epoch must be >= 1, got {self.epoch}")
        if list(self.members) != sorted(set(self.members)):
            raise ValueError(f"view members must be sorted and unique, got {self.members}")
        if not self.members:
            raise ValueError("a view needs at least one member")
        if self.leader != self.members[0]:
            raise ValueError(f"leader must be the lowest member ({self.members[0]}), got {self.leader}")
        if self.incarnations and len(self.incarnations) != len(self.members):
            raise ValueError("incarnations must be empty or aligned with members")

    @classmethod
    def of(
        cls,
        epoch: int,
        members: Iterable[int],
        *,
        incarnations: dict[int, int] | None = None,
        proposer: int = -1,
        reason: str = "",
    ) -> "View":
        """Build a view from any iterable of ranks; the leader is the lowest."""
        ms = tuple(sorted(set(members)))
        incs = tuple((incarnations or {}).get(r, 0) for r in ms) if ms else ()
        if not any(incs):
            incs = ()
        return cls(epoch=epoch, members=ms, leader=ms[0] if ms else -1, incarnations=incs,
                   proposer=proposer, reason=reason)

    def incarnation_of(self, rank: int) -> int:
        """The incarnation the view admitted ``rank`` with (0: the initial process)."""
        if not self.incarnations:
            return 0
        return self.incarnations[self.members.index(rank)]

    def has(self, rank: int, incarnation: int = 0) -> bool:
        """Whether process ``(rank, incarnation)`` is a member (``incarnation`` 0: initial process)."""
        return rank in self.members and self.incarnation_of(rank) == incarnation

    def incarnation_map(self) -> dict[int, int]:
        return {r: self.incarnation_of(r) for r in self.members}

    def describe(self) -> str:
        return f"view {self.epoch} members={','.join(map(str, self.members))} leader={self.leader}"


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(View)


class CorruptView(ElasticEPError, ValueError):
    """Bytes in the view store are not a valid view."""


def encode_view(view: View) -> bytes:
    """JSON bytes of ``view`` (readable with any store client)."""
    return _ENCODER.encode(view)


def decode_view(data: bytes) -> View:
    """The view in ``data``; raises :class:`CorruptView` for anything else."""
    try:
        return _DECODER.decode(data)
    except (msgspec.DecodeError, ValueError) as exc:
        raise CorruptView(f"not a view: {exc}") from None
