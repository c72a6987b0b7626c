"""``MembershipCore``: the pure membership state machine, ``step(input, now) -> list[Action]``.

Like raft's ``RawNode``, the core does no I/O. The service (or a scenario test) feeds it

* bus traffic: :class:`~elasticep.events.Envelope` objects (or bare events from a trusted local
  source such as the launcher's :class:`~elasticep.events.ProcessExit`),
* :class:`Tick` about once per heartbeat interval,
* the results of the store operations it asked for: :class:`CasDone`, :class:`ViewRead`,
  :class:`StoreFailed`,
* local commands: :class:`LeaveCommand`,

and carries out the actions it returns: :class:`Publish` an event, :class:`CompareAndSet` a
proposed view, :class:`ReadView` an epoch, :class:`Install` a committed view, :class:`Fence`
(stop serving), :class:`Left`, :class:`Note` (log a reason), :class:`Refused` (count bad input).

Protocol. Views form a chain in the store, one key per epoch, each written once by
compare-and-set, so two rival proposals for epoch ``N`` cannot both win and every rank installs
the same sequence by reading the chain in order. The lowest member that this rank does not
suspect proposes; if it does not commit within ``min_suspect_ms`` per place in line, the next one
proposes too (the store picks one). A view is proposed only when the member set changes (the
epoch never bumps otherwise), and evictions on uncertain evidence only when at least half of the
members that are not certainly gone remain: a minority cut off from the rest never evicts the
majority, it finds itself outside the majority's view (or loses the store) and fences itself.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Union

from elasticep import metrics
from elasticep.config import Config
from elasticep.detect.fusion import FusionPolicy, Verdict
from elasticep.errors import InvalidArgument
from elasticep.detect.monitor import HeartbeatMonitor
from elasticep.events import (
    CollectiveError,
    Envelope,
    Event,
    Fenced,
    Gray,
    Heartbeat,
    JoinRequest,
    LeaveRequest,
    PeerTimeout,
    ProcessExit,
    Refute,
    Suspicion,
    TransferFailed,
    ViewInstalled,
    ViewProposal,
)
from elasticep.membership.topology import Topology
from elasticep.membership.view import MAX_DETAIL_CHARS, Cause, ChangeKind, MemberChange, View

# --- inputs that are not bus events -------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """Time passed; the service sends one about every ``heartbeat_interval_ms``."""


@dataclass(frozen=True)
class CasDone:
    """The compare-and-set of ``proposed`` finished; ``committed`` is what the store now holds."""

    proposed: View
    committed: View


@dataclass(frozen=True)
class ViewRead:
    """Reading epoch ``epoch`` from the store returned ``view`` (None: not committed yet)."""

    epoch: int
    view: View | None


@dataclass(frozen=True)
class StoreFailed:
    """A store operation (``op``: ``"cas"`` or ``"read"``) failed or timed out."""

    op: str
    epoch: int
    reason: str


@dataclass(frozen=True)
class Committed:
    """The view store says a view is committed at ``epoch`` (its push: a watch, a server-side
    wait; see ``ViewStore.wait_committed``)."""

    epoch: int


@dataclass(frozen=True)
class LeaveCommand:
    """The local application asks this rank to leave gracefully."""

    reason: str = "scale-down"


Input = Union[Envelope, Event, Tick, CasDone, ViewRead, StoreFailed, Committed, LeaveCommand]

# --- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    event: Event


@dataclass(frozen=True)
class CompareAndSet:
    """Commit ``view`` at key ``view.epoch`` if nothing is there; answer with :class:`CasDone`."""

    view: View


@dataclass(frozen=True)
class ReadView:
    """Read the view committed at ``epoch``; answer with :class:`ViewRead` or :class:`StoreFailed`."""

    epoch: int


@dataclass(frozen=True)
class Install:
    """``view`` is committed and this rank is in it: switch to it (set ``bus.epoch``, reconfigure).

    ``removed`` maps each rank that left since ``previous`` to the cause this rank knows
    (``exit``, ``heartbeat``, ``kernel``, ``leave``, ... or ``committed`` when it only read it).
    """

    view: View
    previous: View | None
    removed: dict[int, str] = field(default_factory=dict)
    added: tuple[int, ...] = ()
    lost_race: bool = False


@dataclass(frozen=True)
class Fence:
    """Stop serving now; ``reason`` says why (outside the view, store lost, join timed out)."""

    epoch: int
    reason: str
    label: str


@dataclass(frozen=True)
class Left:
    """This rank's graceful leave is committed: it is outside view ``epoch`` as it asked."""

    epoch: int
    reason: str


@dataclass(frozen=True)
class Note:
    """A readable reason for a decision (logged when it changes)."""

    text: str


@dataclass(frozen=True)
class Refused:
    """Input that was not applied; ``reason`` labels the metric."""

    reason: str
    detail: str


Action = Union[Publish, CompareAndSet, ReadView, Install, Fence, Left, Note, Refused]


class Status:
    SYNCING = "syncing"  # reading the committed chain up to its head
    MEMBER = "member"
    JOINING = "joining"
    FENCED = "fenced"
    LEFT = "left"


def rank_id(name: str, value: object) -> int:
    """``value`` as a rank id (any integer type, numpy's and torch's included); else
    :class:`~elasticep.errors.InvalidArgument` naming ``name``."""
    try:
        rank = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        rank = -1
    if isinstance(value, bool) or rank < 0:
        raise InvalidArgument(f"{name}: a rank id is an int >= 0, not {value!r}")
    return rank


JOIN_RETRY_INTERVALS = 5
"""A joining rank repeats its JoinRequest every this many heartbeat intervals."""

PUSHED_REREADS = 3
"""Reads of an epoch the store pushed as committed that may find nothing (each began before the
commit) and be repeated at once; past these, the next poll reads it."""


class MembershipCore:
    """One rank's membership state machine. Pure: ``now`` is seconds on a monotonic clock.

    Args:
        rank: this rank.
        config: detection and store settings.
        initial_members: the bootstrap view's members (every original rank passes the same);
            None for a process that only joins.
        incarnation: this process's incarnation (sent in heartbeats and join requests).
        join: True for a restarted or new process: it asks to be admitted instead of assuming
            the bootstrap membership.
    """

    @metrics.counts_refusals("membership")
    def __init__(
        self,
        rank: int,
        config: Config,
        *,
        initial_members: tuple[int, ...] | list[int] | None = None,
        incarnation: int = 0,
        join: bool = False,
    ) -> None:
        rank = rank_id("rank", rank)
        if not isinstance(config, Config):
            raise InvalidArgument(f"config must be an elasticep.Config, not {type(config).__name__}")
        if not isinstance(incarnation, int) or isinstance(incarnation, bool) or incarnation < 0:
            raise InvalidArgument(f"incarnation must be an int >= 0, not {incarnation!r}")
        if initial_members is None and not join:
            raise InvalidArgument("a rank needs initial_members, or join=True to be admitted into a running cluster")
        if initial_members is not None and join:
            raise InvalidArgument("give initial_members (a bootstrap rank) or join=True (a rank that asks to be "
                                  "admitted into a running cluster), not both: a joiner learns the members "
                                  "from the view store")
        if initial_members is not None:
            if isinstance(initial_members, (str, bytes)) or not hasattr(initial_members, "__iter__"):
                raise InvalidArgument(f"initial_members must be a sequence of rank ids, not {initial_members!r}")
            initial_members = tuple(rank_id("initial_members", m) for m in initial_members)
            if len(set(initial_members)) != len(initial_members):
                dup = sorted({m for m in initial_members if initial_members.count(m) > 1})
                raise InvalidArgument(f"initial_members {initial_members} repeats rank(s) {dup}")
            if rank not in initial_members:
                raise InvalidArgument(f"rank {rank} is not among initial_members {initial_members}")
        self.rank = rank
        self.config = config
        self.incarnation = incarnation
        self.initial = tuple(sorted(set(initial_members))) if initial_members is not None else None
        self.join = join
        # Processes of the initial view are recorded with incarnation 0; joiners with their own.
        self.view_incarnation = incarnation if join else 0
        self.view: View | None = None
        self._members_of: View | None = None
        self._members: frozenset[int] = frozenset()
        self.status = Status.SYNCING
        self.topology = Topology.from_config(config)
        self.monitor = HeartbeatMonitor(rank, config)
        self.fusion = FusionPolicy(config)
        self.fence_reason = ""
        self.bootstrap_heard = False
        """Set by the driver when every bootstrap member was heard before :meth:`start` (then no
        peer is treated as still starting)."""
        self.store_pushes = False
        """Set by the driver when its view store pushes commits (:class:`Committed` inputs), so a
        quiet rank polls only at ``store_idle_poll_ms`` whatever the detection topology."""
        self._started = False
        self._cas: View | None = None
        self._read: int | None = None
        self._pushed = 0  # the newest epoch the store pushed as committed
        self._pushed_rereads = 0  # reads of it that found nothing (they raced the commit)
        self._last_poll_s = -1e18
        self._last_store_ok_s: float | None = None
        self._last_heartbeat_s = -1e18
        self._join_since_s: float | None = None
        self._last_join_s = -1e18
        self._joiners: dict[int, int] = {}  # rank -> incarnation asking to be admitted
        self._seen_incarnation: dict[int, int] = {}  # rank -> process incarnation from heartbeats
        self._causes: dict[int, str] = {}
        self._leaving = False
        self._change_since_s: float | None = None
        self._isolated_since_s: float | None = None
        self._notes: dict[str, str] = {}  # topic -> last note, to log a reason once per change
        self.step_count = 0

    # --- queries ----------------------------------------------------------------------------

    @property
    def is_member(self) -> bool:
        return self.view is not None and self.view.has(self.rank, self.view_incarnation)

    @property
    def stopped(self) -> bool:
        return self.status in (Status.FENCED, Status.LEFT)

    def hears(self, peer: int) -> bool:
        """Whether this rank needs ``peer``'s bus stream under ``Config.detection_topology``.

        Always true with ``"all"``. With ``"ring"``: ``peer`` is within ``monitors_per_rank / 2``
        places of this rank in the ring of the current view's members (the bootstrap members
        before the first view), a joiner counted at the place it would take. Symmetric, so the
        transport can subscribe exactly to the ranks that this predicate selects.
        """
        if self.topology.everyone:
            return peer != self.rank
        members = self.view.members if self.view is not None else (self.initial or ())
        return self.topology.hears(members, self.rank, peer)

    def watched(self) -> tuple[int, ...]:
        """The members whose heartbeats this rank's monitor tracks (all others, or its ring neighbours)."""
        return self.monitor.peers

    # --- the one entry point ----------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """First actions: commit (or read) the bootstrap view, then walk the chain to its head."""
        if self._started:
            return []
        self._started = True
        self._last_store_ok_s = now
        if self.initial is not None and not self.join:
            # Every original rank proposes the same bytes, so whoever lands first, all agree.
            view = View.of(1, self.initial, reason="bootstrap")
            self._cas = view
            return [CompareAndSet(view)]
        self._read = 1
        return [ReadView(1)]

    def step(self, item: Input, now: float, *, decide: bool = True) -> list[Action]:
        """Apply one input at ``now``; return what to do. Never raises on bad bus input.

        ``decide=False`` defers the proposal decision (see :meth:`step_many`).
        """
        self.step_count += 1
        if not self._started:
            out = self.start(now)
        else:
            out = []
        if self.stopped:
            return out
        if isinstance(item, Tick):
            out += self._tick(now)
        elif isinstance(item, Envelope):
            out += self._event(item.event, item.sender, now)
            out += self._epoch_hint(item, now)
        elif isinstance(item, CasDone):
            out += self._cas_done(item, now)
        elif isinstance(item, ViewRead):
            out += self._view_read(item, now)
        elif isinstance(item, StoreFailed):
            out += self._store_failed(item, now)
        elif isinstance(item, Committed):
            out += self._committed(item.epoch, now)
        elif isinstance(item, LeaveCommand):
            out += self._leave(item, now)
        else:
            out += self._event(item, None, now)
        if decide and self.status == Status.MEMBER and not self.stopped and self._may_change(item, out):
            out += self._decide(now)
        return out

    @staticmethod
    def _may_change(item: Input, out: list[Action]) -> bool:
        # A plain heartbeat changes no evidence (a Refute in ``out`` does); ticks let time pass.
        event = item.event if isinstance(item, Envelope) else item
        return not isinstance(event, Heartbeat) or bool(out)

    def step_many(self, items: list[Input], now: float) -> list[Action]:
        """Apply a batch received together, then decide once (two exits in one batch: one view)."""
        out: list[Action] = []
        changed = False
        for item in items:
            acts = self.step(item, now, decide=False)
            changed = changed or self._may_change(item, acts)
            out += acts
        if changed and self.status == Status.MEMBER and not self.stopped:
            out += self._decide(now)
        return out

    def tick(self, now: float) -> list[Action]:
        return self.step(Tick(), now)

    def tick_interval(self) -> float:
        """Seconds until the next :class:`Tick` is useful: one heartbeat interval normally, a
        quarter of it (at most 10 ms) while some rank is under suspicion, so that an eviction is
        proposed within milliseconds of its silence reaching ``grace_ms``."""
        interval = self.config.heartbeat_interval_ms / 1e3
        if self.status == Status.MEMBER and (self.fusion.any_pending() or self.monitor.any_suspected()):
            return min(interval / 4, 0.01)
        return interval

    # --- time -------------------------------------------------------------------------------

    def _speaks(self) -> bool:
        """Whether this rank heartbeats: a member or a joiner, and also a member still walking the
        chain to its head (a bootstrap member, or one the adopted view holds). Store reads can
        take a while when many ranks start together; its watchers, who may have installed the
        view already, must not take that walk for silence."""
        if self.status in (Status.MEMBER, Status.JOINING):
            return True
        return self.status == Status.SYNCING and (self.is_member or (self.initial is not None and not self.join))

    def _tick(self, now: float) -> list[Action]:
        cfg = self.config
        out: list[Action] = []
        if self._last_store_ok_s is not None and now - self._last_store_ok_s > cfg.store_timeout_s:
            return self._fence(now, f"view store unreachable for {now - self._last_store_ok_s:.1f} s "
                                    f"(store_timeout_s={cfg.store_timeout_s:g})", "store_unreachable")
        # Ticks come faster than heartbeats while a suspicion is pending (see ``tick_interval``).
        if self._speaks() and now - self._last_heartbeat_s >= cfg.heartbeat_interval_ms / 1e3 * 0.9:
            self._last_heartbeat_s = now
            out.append(Publish(Heartbeat(rank=self.rank, incarnation=self.incarnation)))
        if self.status == Status.JOINING:
            if self._join_since_s is not None and now - self._join_since_s > cfg.join_timeout_s:
                return out + self._fence(now, f"not admitted within join_timeout_s={cfg.join_timeout_s:g}",
                                         "join_timeout")
            if now - self._last_join_s >= JOIN_RETRY_INTERVALS * cfg.heartbeat_interval_ms / 1e3:
                self._last_join_s = now
                out.append(Publish(JoinRequest(rank=self.rank, incarnation=self.incarnation)))
        if self.status == Status.MEMBER:
            for event in self.monitor.check(now):
                out.append(Publish(event))
                out += self._event(event, self.rank, now)
        if self._read is None and self._cas is None and now - self._last_poll_s >= self._poll_interval_s():
            out.append(self._read_next(now))
        return out

    def _quiet(self) -> bool:
        """Nothing in flight that a committed view could settle: this member serves a view, every
        peer is heard, nobody asks to join or leave, and the store answered its last operation."""
        return (self.status == Status.MEMBER and (self.topology.everyone or self.store_pushes) and not self._leaving
                and not self._joiners and self._change_since_s is None and "store" not in self._notes
                and not self.fusion.any_pending() and not self.monitor.any_suspected())

    def _poll_interval_s(self) -> float:
        """``store_idle_poll_ms`` while :meth:`_quiet`, ``store_poll_ms`` otherwise. Quiet polling
        loses nothing: with every rank hearing every other, a view committed elsewhere is
        announced (:class:`ViewInstalled`) and stamped on every envelope its members send (the
        envelope's epoch), and either makes this rank read at once; with a store that pushes
        (:attr:`store_pushes`), the store's own :class:`Committed` does, for the ranks of a ring
        that hear none of the installers too."""
        return self.config.idle_poll_s() if self._quiet() else self.config.store_poll_ms / 1e3

    def _read_next(self, now: float) -> ReadView:
        epoch = (self.view.epoch if self.view else 0) + 1
        self._read = epoch
        self._last_poll_s = now
        return ReadView(epoch)

    def _epoch_hint(self, env: Envelope, now: float) -> list[Action]:
        """A peer stamps its installed epoch on every envelope: one ahead of this rank means the
        store holds a newer view (its announcement may have been lost), so read it now rather
        than at the next poll. At most one read per ``store_poll_ms`` (a forged epoch costs a
        bounded number of reads that find nothing, never a view)."""
        current = self.view.epoch if self.view else 0
        if (env.epoch > current and self.status == Status.MEMBER and self._read is None and self._cas is None
                and now - self._last_poll_s >= self.config.store_poll_ms / 1e3):
            return [self._read_next(now)]
        return []

    def _committed(self, epoch: int, now: float) -> list[Action]:
        """The store pushed a commit at ``epoch``: read the next view now (a read in flight walks
        on to the head by itself, or, if it began before the commit and found nothing, reads
        again at once: :meth:`_view_read`). The store is trusted; this costs one read, never a
        view."""
        current = self.view.epoch if self.view else 0
        if epoch > self._pushed:
            self._pushed, self._pushed_rereads = epoch, 0
        if epoch > current and self._read is None and self._cas is None and self.status != Status.SYNCING:
            return [self._read_next(now)]
        return []

    # --- bus events -------------------------------------------------------------------------

    def _member_set(self) -> frozenset[int]:
        """The installed view's members as a set, built once per view (every received event
        asks; a tuple scan would cost O(N) per event at hundreds of ranks)."""
        view = self.view
        if view is not self._members_of:
            self._members_of = view
            self._members = frozenset(view.members) if view is not None else frozenset()
        return self._members

    def _event(self, event: Event, sender: int | None, now: float) -> list[Action]:
        """``sender`` is the authenticated bus sender, or None for a trusted local source."""
        members = self._member_set()

        def forged(claimed: int) -> list[Action]:
            return [Refused("sender_mismatch", f"{type(event).__name__} claims rank {claimed} but came from rank {sender}")]

        if isinstance(event, Heartbeat):
            if sender is not None and sender != event.rank:
                return forged(event.rank)
            return self._heartbeat(event, now)
        if isinstance(event, Suspicion):
            if sender is not None and sender != event.observer:
                return forged(event.observer)
            if event.observer not in members or event.suspect not in members or event.suspect == event.observer:
                return []
            if event.source == "heartbeat":
                vouched = (self.monitor.silence_ms(event.suspect, now)
                           if event.observer == self.rank and event.suspect in self.monitor.peers
                           else self.config.min_suspect_ms)
            else:
                vouched = 0.0
            try:
                self.fusion.suspect(event.observer, event.suspect, event.source, now, vouched)
            except ValueError as exc:
                return [Refused("bad_source", str(exc))]
            return []
        if isinstance(event, Refute):
            if sender is not None and sender != event.observer:
                return forged(event.observer)
            self.fusion.refute(event.observer, event.suspect, event.source)
            return []
        if isinstance(event, PeerTimeout):
            if sender is not None and sender != event.observer:
                return forged(event.observer)
            if event.observer in members and event.peer in members and event.peer != event.observer:
                self.fusion.suspect(event.observer, event.peer, "kernel", now, event.waited_us / 1e3)
            return []
        if isinstance(event, CollectiveError):
            if sender is not None and sender != event.observer:
                return forged(event.observer)
            if event.peer in members and event.observer in members and event.peer != event.observer:
                self.fusion.suspect(event.observer, event.peer, "collective", now)
            return []
        if isinstance(event, TransferFailed):
            observer = sender if sender is not None else self.rank
            if event.src in members and observer in members and event.src != observer:
                self.fusion.suspect(observer, event.src, "transfer", now)
            return []
        if isinstance(event, ProcessExit):
            return self._exit(event)
        if isinstance(event, JoinRequest):
            if sender is not None and sender != event.rank:
                return forged(event.rank)
            return self._join_request(event)
        if isinstance(event, LeaveRequest):
            if sender is not None and sender != event.rank:
                return forged(event.rank)
            if event.rank in members:
                self.fusion.certain(event.rank, "leave", f"rank {event.rank} asked to leave ({event.reason})")
            return []
        if isinstance(event, Fenced):
            if sender is not None and sender != event.rank:
                return forged(event.rank)
            if event.rank in members and event.rank != self.rank:
                self.fusion.certain(event.rank, "fenced", f"rank {event.rank} fenced itself: {event.reason}")
            return []
        if isinstance(event, (ViewProposal, ViewInstalled)):
            current = self.view.epoch if self.view else 0
            if event.epoch <= current:
                if isinstance(event, ViewProposal):
                    return [Refused("stale_proposal",
                                    f"proposal for epoch {event.epoch} from rank {event.proposer} "
                                    f"ignored: epoch {current} is installed")]
                return []
            # A rank installed something newer, so the store holds it: read now, not at the next poll.
            # (A proposal is only a proposal; its commit is announced by ViewInstalled.)
            if isinstance(event, ViewInstalled) and self._read is None and self._cas is None:
                return [self._read_next(now)]
            return []
        if isinstance(event, Gray):
            return []
        return []

    def _heartbeat(self, hb: Heartbeat, now: float) -> list[Action]:
        out: list[Action] = []
        seen = self._seen_incarnation.get(hb.rank)
        if self.view is not None and hb.rank in self._member_set():
            restarted = ""
            if seen is not None and hb.incarnation > seen:
                restarted = f"rank {hb.rank} restarted (incarnation {seen} -> {hb.incarnation})"
            elif seen is not None and hb.incarnation < seen:
                return [Refused("stale_incarnation", f"heartbeat from an old process of rank {hb.rank}")]
            expected = self.view.incarnation_of(hb.rank)
            if expected and hb.incarnation != expected:
                restarted = f"rank {hb.rank} is now incarnation {hb.incarnation}"
            if restarted and not self.fusion.is_certain(hb.rank):
                self.fusion.certain(hb.rank, "restart", restarted)
                out.append(Note(restarted))
        if seen is None or hb.incarnation > seen:
            self._seen_incarnation[hb.rank] = hb.incarnation
        for event in self.monitor.heartbeat(hb.rank, now, hb.incarnation):
            out.append(Publish(event))
            out += self._event(event, self.rank, now)
        return out

    def _exit(self, ev: ProcessExit) -> list[Action]:
        if self.view is None or ev.rank not in self._member_set():
            return []
        if ev.rank == self.rank and ev.incarnation in (0, self.incarnation):
            return []  # a report of our own death: evidently stale
        seen = self._seen_incarnation.get(ev.rank)
        if ev.incarnation and seen is not None and ev.incarnation < seen:
            return [Note(f"ignored exit of an old process of rank {ev.rank} (incarnation {ev.incarnation})")]
        how = (f" (signal {ev.signal})" if ev.signal is not None
               else f" (exit code {ev.exitcode})" if ev.exitcode is not None else "")
        process = f"process {ev.pid}" if ev.pid else "the process"
        self.fusion.certain(ev.rank, "exit", f"{process} of rank {ev.rank} exited{how}")
        return []

    def _join_request(self, ev: JoinRequest) -> list[Action]:
        if self.view is None:
            return []
        if ev.rank in self.view.members:
            if self.view.has(ev.rank, ev.incarnation) or ev.incarnation == 0:
                return []  # already admitted (a repeated request)
            self.fusion.certain(ev.rank, "restart", f"rank {ev.rank} restarted and asks to rejoin")
        self._joiners[ev.rank] = ev.incarnation
        return []

    def _leave(self, cmd: LeaveCommand, now: float) -> list[Action]:
        if self.status != Status.MEMBER:
            return [Refused("not_member", f"rank {self.rank} cannot leave: it is {self.status}")]
        self._leaving = True
        event = LeaveRequest(rank=self.rank, reason=cmd.reason)
        return [Publish(event)] + self._event(event, self.rank, now)

    # --- store results ----------------------------------------------------------------------

    def _store_ok(self, now: float) -> None:
        self._last_store_ok_s = now
        self._notes.pop("store", None)

    def _cas_done(self, done: CasDone, now: float) -> list[Action]:
        self._store_ok(now)
        self._cas = None
        lost = done.committed != done.proposed
        out: list[Action] = []
        if lost:
            out.append(Note(f"lost epoch {done.proposed.epoch} to rank {done.committed.proposer}: "
                            f"adopting {done.committed.describe()}"))
        current = self.view.epoch if self.view else 0
        if done.committed.epoch == current + 1:
            out += self._adopt(done.committed, now, lost_race=lost)
        if not self.stopped and self._read is None:
            out.append(self._read_next(now))
        return out

    def _view_read(self, read: ViewRead, now: float) -> list[Action]:
        self._store_ok(now)
        if read.epoch == self._read:
            self._read = None
        out: list[Action] = []
        current = self.view.epoch if self.view else 0
        if read.view is None:
            if self.status == Status.SYNCING and read.epoch == current + 1:
                out += self._synced(now)
            # The store pushed this epoch as committed, so the read raced the commit: read again
            # now rather than at the next poll (up to 500 ms away when quiet). Bounded per epoch.
            if (read.epoch <= self._pushed and self._pushed_rereads < PUSHED_REREADS and not self.stopped
                    and self._read is None and self._cas is None):
                self._pushed_rereads += 1
                out.append(self._read_next(now))
            return out
        if read.view.epoch != read.epoch:
            return [Refused("corrupt_store", f"key for epoch {read.epoch} holds epoch {read.view.epoch}")]
        if read.epoch == current + 1:
            out += self._adopt(read.view, now)
            if not self.stopped and self._read is None and self._cas is None:
                if self.store_pushes and self.status == Status.MEMBER and self._pushed <= read.epoch:
                    # a store that pushes tells of the next commit (the driver waits on it):
                    # no read of it now, which would find nothing on all but the rarest change
                    self._last_poll_s = now
                else:
                    out.append(self._read_next(now))  # keep walking the chain to its head
        return out

    def _store_failed(self, failed: StoreFailed, now: float) -> list[Action]:
        if failed.op == "cas":
            self._cas = None
        elif failed.epoch == self._read:
            self._read = None
        since = self._last_store_ok_s if self._last_store_ok_s is not None else now
        if now - since > self.config.store_timeout_s:
            return self._fence(now, f"view store unreachable for {now - since:.1f} s: {failed.reason}",
                               "store_unreachable")
        return self._note(f"view store {failed.op} failed: {failed.reason}", "store")

    def _synced(self, now: float) -> list[Action]:
        """Reached the head of the chain: this process is a member, or must ask to join."""
        if self.is_member:
            self.status = Status.MEMBER
            return []
        self.status = Status.JOINING
        self._join_since_s = now
        self._last_join_s = now
        return [Publish(JoinRequest(rank=self.rank, incarnation=self.incarnation)),
                Note(f"rank {self.rank} asks to join at epoch {self.view.epoch if self.view else 0}")]

    # --- installing -------------------------------------------------------------------------

    def _adopt(self, view: View, now: float, lost_race: bool = False) -> list[Action]:
        previous = self.view
        was_member = self.is_member
        self.view = view
        self._change_since_s = None
        old = set(previous.members) if previous else set()
        new = set(view.members)
        removed = {r: self._causes.pop(r, "committed") for r in sorted(old - new)}
        for r in old - new:
            self.fusion.forget(r)
            self._seen_incarnation.pop(r, None)
        for r, inc in list(self._joiners.items()):  # admitted joiners (not a walk of every member)
            if r in new and view.incarnation_of(r) == inc:
                del self._joiners[r]
                self.fusion.forget(r)
        added = tuple(sorted(new - old))
        for r in added:
            self._seen_incarnation.pop(r, None)
        # A bootstrap member's first view: peers not heard yet may still be starting.
        starting = (previous is None and view.epoch == 1 and self.initial is not None and not self.join
                    and not self.bootstrap_heard)
        self.monitor.watch(self.topology.neighbors(view.members, self.rank), now, joining=starting)
        out: list[Action] = []
        now_member = self.is_member
        if now_member:
            if self.status != Status.SYNCING:
                self.status = Status.MEMBER
            out.append(Install(view, previous, removed, added, lost_race))
            # Announce it to the peers that hear this rank, so they read the store at once; a
            # store that pushes each commit (store_pushes) has already told every rank, and an
            # announcement per installer would be N publications and k*N receptions per change.
            if self.status == Status.MEMBER and not self.store_pushes:
                out.append(Publish(ViewInstalled(epoch=view.epoch, members=view.members, leader=view.leader,
                                                 rank=self.rank, reason=view.reason)))
        elif was_member:
            if self._leaving:
                self.status = Status.LEFT
                out.append(Left(view.epoch, f"left the cluster as asked; {view.describe()}"))
            else:
                out += self._fence(now, f"outside committed {view.describe()} ({view.reason})", "evicted")
        return out

    def _isolated(self, now: float, doubted: set[int], remaining: set[int], base: set[int]) -> list[Action]:
        """This rank would evict a majority of the members, which it must not do. If the majority
        is alive and keeps it (it hears nobody, but they hear it: an inbound-only failure), no
        view would ever remove it, though it can take part in nothing; so a rank that stays on
        the minority side for ``store_timeout_s`` fences itself (label ``isolated``). Its
        ``Fenced`` event, or its silence, then lets the majority evict it. A real partition ends
        sooner: the majority commits a view without this rank, which reads it and fences."""
        unheard = self.monitor.suspected() & base
        if 2 * len(base - unheard) >= len(base):  # others' suspicions, not this rank's own silence
            self._isolated_since_s = None
        elif self._isolated_since_s is None:
            self._isolated_since_s = now
        if self._isolated_since_s is not None and now - self._isolated_since_s >= self.config.store_timeout_s:
            return self._fence(now, f"isolated: {sorted(unheard)} unheard for {self.config.store_timeout_s:g} s "
                               f"(store_timeout_s); {len(base - unheard)} of {len(base)} members heard", "isolated")
        return self._note(f"not evicting {sorted(doubted)}: only {len(remaining)} of {len(base)} members "
                          f"would remain (a minority must not evict the majority)")

    def _fence(self, now: float, reason: str, label: str) -> list[Action]:
        epoch = self.view.epoch if self.view else 0
        self.status = Status.FENCED
        self.fence_reason = reason
        return [Publish(Fenced(rank=self.rank, epoch=epoch, reason=reason)), Fence(epoch, reason, label)]

    # --- deciding ---------------------------------------------------------------------------

    def _decide(self, now: float) -> list[Action]:
        """Propose the next view if the member set should change and this rank is to propose."""
        view = self.view
        if view is None or self._cas is not None:
            return []
        members = self._member_set()
        found = self.fusion.verdicts(now, members)
        if not found and not self._joiners:  # the common case, every tick: nothing to decide
            self._change_since_s = self._isolated_since_s = None
            return []
        members = set(members)
        heard = (set(self.monitor.peers) - self.monitor.suspected()) | {self.rank}
        # Silence that others report about a rank this rank hears itself (or about this rank) is
        # not enough: the link between them is what failed (kernel timeouts and certain signals
        # still count).
        verdicts: dict[int, Verdict] = {
            v.rank: v for v in found if v.certain or v.cause != "heartbeat" or v.rank not in heard
        }
        joiners = {r: inc for r, inc in self._joiners.items() if r not in members}
        if not verdicts and not joiners:
            self._change_since_s = self._isolated_since_s = None
            return []
        target = (members - set(verdicts)) | set(joiners)
        if target == members:
            self._isolated_since_s = None
            return []
        if self._change_since_s is None:
            self._change_since_s = now
        certain_gone = {r for r, v in verdicts.items() if v.certain}
        base = members - certain_gone
        # Count every rank under any suspicion as gone: a minority whose peers go silent one by
        # one must not evict the majority one rank at a time.
        doubted = (set(verdicts) | set(self.fusion.pending()) | self.monitor.suspected()) & base
        remaining = base - doubted
        if set(verdicts) - certain_gone and 2 * len(remaining) < len(base):
            return self._isolated(now, doubted, remaining, base)
        self._isolated_since_s = None
        if not target:
            return self._note("not proposing an empty view")
        my_suspects = self.monitor.suspected()

        def eligible(m: int) -> bool:
            return m not in verdicts and (m == self.rank or m not in my_suspects)

        # With the ring, only the changed ranks' neighbours can know of the change: the line is
        # drawn among them (everyone else learns the outcome from the store). If all of them
        # are gone, every member stands in line, as with the all-to-all topology.
        pool = self.topology.in_line(view.members, set(verdicts) | set(joiners))
        in_line = sorted(m for m in (members if pool is None else pool & members) if eligible(m))
        if pool is not None and not in_line:
            in_line = sorted(m for m in members if eligible(m))
        if self.rank not in in_line:
            return []
        place = in_line.index(self.rank)
        waited_ms = (now - self._change_since_s) * 1e3
        if place > 0 and waited_ms < place * self.config.min_suspect_ms:
            return []
        parts = [f"-{r} ({v.cause}: {v.reason})" for r, v in sorted(verdicts.items())]
        parts += [f"+{r} (join)" for r in sorted(joiners)]
        reason = "; ".join(parts)
        for r, v in verdicts.items():
            self._causes[r] = v.cause
        incarnations = {r: inc for r, inc in view.incarnation_map().items() if r in target}
        incarnations.update(joiners)
        # The causes as typed records in the view itself: every rank reads the proposer's.
        changes = [MemberChange(rank=r, kind=ChangeKind.LEFT if v.cause == "leave" else ChangeKind.EVICTED,
                                cause=Cause.of(v.cause), detail=v.reason[:MAX_DETAIL_CHARS],
                                incarnation=view.incarnation_of(r))
                   for r, v in sorted(verdicts.items())]
        changes += [MemberChange(rank=r, kind=ChangeKind.JOINED, cause=Cause.JOIN, incarnation=inc)
                    for r, inc in sorted(joiners.items())]
        proposal = View.of(view.epoch + 1, target, incarnations=incarnations, proposer=self.rank, reason=reason,
                           changes=changes)
        self._cas = proposal
        return [
            Note(f"rank {self.rank} proposes {proposal.describe()}: {reason}"),
            CompareAndSet(proposal),
            Publish(ViewProposal(epoch=proposal.epoch, members=proposal.members, leader=proposal.leader,
                                 proposer=self.rank, reason=reason)),
        ]

    def _note(self, text: str, topic: str = "decide") -> list[Action]:
        if self._notes.get(topic) == text:
            return []
        self._notes[topic] = text
        return [Note(text)]
