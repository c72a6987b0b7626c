"""``View``: one committed membership view, ``(epoch, members, leader)``, frozen and encodable.

A view also says what changed since the epoch before it: :attr:`View.changes` holds one
:class:`MemberChange` per rank that joined, left gracefully or was evicted, with the cause as
typed fields (:class:`ChangeKind`, :class:`Cause`). The proposer writes them into the view it
commits, so every rank reads the same causes, including ranks that saw none of the evidence.
:meth:`View.diff` turns a view and its predecessor into a :class:`ViewDiff`.
"""

from __future__ import annotations

import enum
from bisect import bisect_left
from typing import Iterable

import msgspec

from elasticep import metrics
from elasticep.errors import ElasticEPError, InvalidArgument


class ChangeKind(str, enum.Enum):
    """How a rank's membership changed from one view to the next."""

    JOINED = "joined"
    """Admitted: a bootstrap member, a new rank, or a restarted process of a rank."""
    LEFT = "left"
    """Left gracefully (``MembershipService.leave``, scale-down): it asked to go."""
    EVICTED = "evicted"
    """Removed without asking: it died, hung, fenced itself, or restarted as a new process."""


class Cause(str, enum.Enum):
    """Why a rank joined or went. A ``str`` enum: ``cause == "exit"`` holds for ``Cause.EXIT``."""

    BOOTSTRAP = "bootstrap"
    """A member of the initial view (epoch 1)."""
    JOIN = "join"
    """Admitted after its ``JoinRequest`` (a new rank, or a restarted process rejoining)."""
    LEAVE = "leave"
    """It asked to leave (the only cause of :attr:`ChangeKind.LEFT`)."""
    EXIT = "exit"
    """Its launcher saw the process exit (certain)."""
    RESTART = "restart"
    """A newer process of the same rank spoke: the old process is gone (certain)."""
    FENCED = "fenced"
    """It announced that it fenced itself (certain)."""
    HEARTBEAT = "heartbeat"
    """Heartbeat silence past the grace period, corroborated."""
    KERNEL = "kernel"
    """Data-plane kernels timed out waiting on it (``active_ranks`` masks)."""
    COLLECTIVE = "collective"
    """Collectives failed on it."""
    TRANSFER = "transfer"
    """Weight transfers from it failed."""
    DISCONNECT = "disconnect"
    """Its bus sockets closed, seen by enough observers."""
    STORE = "store"
    """It lost the view store."""
    UNKNOWN = "unknown"
    """The view does not say (committed by a build that did not record causes)."""

    @classmethod
    def of(cls, value: str) -> "Cause":
        """The cause named ``value``; :attr:`UNKNOWN` for a name this build does not know."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


MAX_DETAIL_CHARS = 256
"""A :class:`MemberChange` keeps at most this many characters of evidence, to keep views small."""


class MemberChange(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One rank's change between a view and the view before it.

    ``kind`` says whether it joined, left gracefully or was evicted; ``cause`` says why, as a
    :class:`Cause`; ``detail`` is the evidence in words (``"process 4121 of rank 3 exited
    (signal 9)"``), for logs only. ``incarnation`` is the process concerned: the admitted one for
    a join, the removed one for a leave or an eviction (0: the rank's initial process).
    """

    rank: int
    kind: ChangeKind
    cause: Cause
    detail: str = ""
    incarnation: int = 0

    def describe(self) -> str:
        sign = "+" if self.kind is ChangeKind.JOINED else "-"
        return f"{sign}{self.rank} ({self.kind.value}: {self.cause.value})"


class View(msgspec.Struct, frozen=True, kw_only=True):
    """The member set of epoch ``epoch``; committed once by the view store, identical everywhere.

    ``members`` is sorted and ``leader`` is its lowest rank. ``incarnations`` is aligned with
    ``members``: 0 for a rank of the initial view (whatever process first served it), the joining
    process's own incarnation for a rank admitted by a :class:`~elasticep.events.JoinRequest`, so
    a restarted process never mistakes its dead predecessor's membership for its own.
    ``proposer`` and ``reason`` say who committed the view and why (``reason`` in words, for
    logs); ``changes`` says the same as typed :class:`MemberChange` records, one per rank that
    joined or went since epoch ``epoch - 1`` (empty for the bootstrap view and for views
    committed by builds that did not record them; :meth:`diff` fills the gaps).

    Bad fields raise :class:`~elasticep.errors.InvalidArgument` (a ``ValueError``).
    """

    epoch: int
    members: tuple[int, ...]
    leader: int
    incarnations: tuple[int, ...] = ()
    proposer: int = -1
    reason: str = ""
    changes: tuple[MemberChange, ...] = ()

    @metrics.counts_refusals("view")
    def __post_init__(self) -> None:
        if not isinstance(self.epoch, int) or isinstance(self.epoch, bool) or self.epoch < 1:
            raise InvalidArgument(f"view epoch must be an int >= 1, got {self.epoch!r}")
        if not isinstance(self.members, tuple) or not all(
                isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in self.members):
            raise InvalidArgument(f"view members must be a tuple of rank ids >= 0, got {self.members!r}")
        if list(self.members) != sorted(set(self.members)):
            raise InvalidArgument(f"view members must be sorted and unique, got {self.members}")
        if not self.members:
            raise InvalidArgument("a view needs at least one member")
        if self.leader != self.members[0]:
            raise InvalidArgument(f"leader must be the lowest member ({self.members[0]}), got {self.leader}")
        if not isinstance(self.incarnations, tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.incarnations):
            raise InvalidArgument(f"view incarnations must be a tuple of ints >= 0, got {self.incarnations!r}")
        if self.incarnations and len(self.incarnations) != len(self.members):
            raise InvalidArgument("incarnations must be empty or aligned with members")
        if not isinstance(self.proposer, int) or isinstance(self.proposer, bool) or not isinstance(self.reason, str):
            raise InvalidArgument(f"view proposer must be an int and reason a str, got {self.proposer!r}, {self.reason!r}")
        if not isinstance(self.changes, tuple):
            raise InvalidArgument(f"view changes must be a tuple of MemberChange records, got {self.changes!r}")
        for change in self.changes:
            if not isinstance(change, MemberChange):
                raise InvalidArgument(f"view changes must be MemberChange records, got {change!r}")
            if change.kind is ChangeKind.JOINED and change.rank not in self.members:
                raise InvalidArgument(f"rank {change.rank} joined but is not a member of view {self.epoch}")
            if change.kind is not ChangeKind.JOINED and change.rank in self.members and not any(
                    c.rank == change.rank and c.kind is ChangeKind.JOINED for c in self.changes):
                raise InvalidArgument(f"rank {change.rank} {change.kind.value} but is still a member of view {self.epoch}")

    @classmethod
    @metrics.counts_refusals("view")
    def of(
        cls,
        epoch: int,
        members: Iterable[int],
        *,
        incarnations: dict[int, int] | None = None,
        proposer: int = -1,
        reason: str = "",
        changes: Iterable[MemberChange] = (),
    ) -> "View":
        """Build a view from any iterable of ranks; the leader is the lowest."""
        try:
            ms = tuple(sorted(set(members)))
        except TypeError:
            raise InvalidArgument(f"view members must be rank ids, got {members!r}") from None
        incs = tuple((incarnations or {}).get(r, 0) for r in ms) if ms else ()
        if not any(incs):
            incs = ()
        return cls(epoch=epoch, members=ms, leader=ms[0] if ms else -1, incarnations=incs,
                   proposer=proposer, reason=reason, changes=tuple(changes))

    def incarnation_of(self, rank: int) -> int:
        """The incarnation the view admitted ``rank`` with (0: the initial process)."""
        if not self.incarnations:
            return 0
        # members is sorted: a bisection, not a scan (every rank asks about every member
        # when it installs a view of hundreds)
        i = bisect_left(self.members, rank)
        if i == len(self.members) or self.members[i] != rank:
            raise ValueError(f"rank {rank} is not a member of view {self.epoch}")
        return self.incarnations[i]

    def has(self, rank: int, incarnation: int = 0) -> bool:
        """Whether process ``(rank, incarnation)`` is a member (``incarnation`` 0: initial process)."""
        i = bisect_left(self.members, rank)
        if i == len(self.members) or self.members[i] != rank:
            return False
        return (self.incarnations[i] if self.incarnations else 0) == incarnation

    def incarnation_map(self) -> dict[int, int]:
        if not self.incarnations:
            return dict.fromkeys(self.members, 0)
        return dict(zip(self.members, self.incarnations))

    def describe(self) -> str:
        return f"view {self.epoch} members={','.join(map(str, self.members))} leader={self.leader}"

    @metrics.counts_refusals("view")
    def diff(self, previous: "View | None") -> "ViewDiff":
        """What changed from ``previous`` (None: nothing installed before) to this view.

        Every rank in one view but not the other, and every rank whose process changed, gets a
        :class:`MemberChange`; its cause comes from :attr:`changes` when the view recorded one
        (always, for views this build commits), else :attr:`Cause.BOOTSTRAP` for the members of
        a first view at epoch 1, :attr:`Cause.JOIN` for other arrivals and
        :attr:`Cause.UNKNOWN` (an eviction) for departures.
        """
        if previous is not None and not isinstance(previous, View):
            raise InvalidArgument(f"previous must be a View or None, got {type(previous).__name__}")
        recorded = {(c.rank, c.kind is ChangeKind.JOINED): c for c in self.changes}
        out: list[MemberChange] = []
        # only the ranks that differ (a set operation, not a walk of every member); with no
        # process recorded on either side (every member the one that first served it) a rank
        # differs exactly when it is in one member set only
        if previous is not None and not previous.incarnations and not self.incarnations:
            before = set(previous.members)
            differ = before.symmetric_difference(self.members)
            old = {r: 0 for r in differ if r in before}
            new = {r: 0 for r in differ if r not in before}
        else:
            old = previous.incarnation_map() if previous is not None else {}
            new = self.incarnation_map()
            differ = {r for r, _ in old.items() ^ new.items()}
        for rank in sorted(differ):
            gone = rank in old and (rank not in new or old[rank] != new[rank])
            came = rank in new and (rank not in old or old[rank] != new[rank])
            if gone:
                c = recorded.get((rank, False))
                out.append(c if c is not None else MemberChange(
                    rank=rank, kind=ChangeKind.EVICTED, cause=Cause.UNKNOWN, incarnation=old[rank]))
            if came:
                c = recorded.get((rank, True))
                if c is None:
                    cause = Cause.BOOTSTRAP if previous is None and self.epoch == 1 else Cause.JOIN
                    c = MemberChange(rank=rank, kind=ChangeKind.JOINED, cause=cause, incarnation=new[rank])
                out.append(c)
        return ViewDiff(view=self, previous=previous, changes=tuple(out))


class ViewDiff(msgspec.Struct, frozen=True, kw_only=True):
    """The change from ``previous`` to ``view`` (see :meth:`View.diff`).

    ``changes`` has one :class:`MemberChange` per rank that joined, left or was evicted (a rank
    whose process restarted has two: evicted, then joined), in rank order. ``joined``, ``left``
    (graceful) and ``evicted`` list the ranks by kind.
    """

    view: View
    previous: View | None
    changes: tuple[MemberChange, ...]

    def _ranks(self, kind: ChangeKind) -> tuple[int, ...]:
        return tuple(c.rank for c in self.changes if c.kind is kind)

    @property
    def joined(self) -> tuple[int, ...]:
        return self._ranks(ChangeKind.JOINED)

    @property
    def left(self) -> tuple[int, ...]:
        """Ranks that left gracefully (asked to)."""
        return self._ranks(ChangeKind.LEFT)

    @property
    def evicted(self) -> tuple[int, ...]:
        """Ranks removed without asking (died, hung, fenced, restarted)."""
        return self._ranks(ChangeKind.EVICTED)

    def change_of(self, rank: int) -> MemberChange | None:
        """The change of ``rank`` (its departure, for a restarted rank), or None."""
        return next((c for c in self.changes if c.rank == rank), None)

    def describe(self) -> str:
        parts = " ".join(c.describe() for c in self.changes) or "no change"
        return f"{self.view.describe()}: {parts}"


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
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        from elasticep import metrics

        metrics.VIEWS_CORRUPT.inc()
        raise CorruptView(f"not a view: {exc}") from None
