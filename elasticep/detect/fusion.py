"""The fusion policy: when the signals about a rank add up to evicting it.

Signals differ in speed and certainty, and the policy uses each for what it is:

* **Certain** (evict at once): a launcher saw the process exit (:class:`ProcessExit`); the rank
  asked to leave, or announced that it fenced itself; the rank restarted (a heartbeat or join from a newer incarnation); a socket disconnect seen by two
  observers, or by one observer together with any other signal (a closing socket is what a process
  exit looks like from outside; two independent links closing rules out one flaky link).
* **Uncertain**: heartbeat silence (a state, held from the :class:`Suspicion` until the observer's
  :class:`Refute`), kernel peer timeouts, transfer failures and collective errors (points in time,
  valid for ``corroboration_window_ms``).

An uncertain case evicts when the rank's silence has reached ``grace_ms`` *and* the evidence is
corroborated: two distinct observers, or two distinct kinds of signal. A lone observer still
evicts once the silence reaches ``single_observer_evict_ms`` when no other member could
corroborate (a two-rank cluster has only one observer; so has the last survivor of a group).
Below ``grace_ms`` nothing but a certain signal evicts: slow is not dead.

The silence a remote observer vouches for is a lower bound: a heartbeat suspicion is raised only
after ``min_suspect_ms`` of silence, so ``min_suspect_ms + (now - received)`` has certainly passed
since the suspect was last heard, unless the observer refuted it since; a kernel timeout vouches
for the ``waited_us`` the kernel waited, no more (it is a point in time, the peer may have spoken
since). This rank's own monitor gives its measured silence.

Pure: every method takes ``now`` (seconds, monotonic) and returns decisions; nothing reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from elasticep.config import Config

CERTAIN_SOURCES = frozenset({"exit", "restart", "leave", "fenced"})
STATE_SOURCES = frozenset({"heartbeat"})
POINT_SOURCES = frozenset({"kernel", "transfer", "collective", "disconnect", "store"})


@dataclass(frozen=True)
class Verdict:
    """The policy's decision to evict ``rank``; ``cause`` labels the evictions metric."""

    rank: int
    cause: str
    certain: bool
    reason: str


@dataclass
class _Evidence:
    since_s: float
    silence_ms: float  # silence the observer vouched for at ``since_s``


@dataclass
class FusionPolicy:
    """Collects evidence per suspect and turns it into :class:`Verdict` objects.

    Called by :class:`elasticep.membership.MembershipCore` for every signal it receives (its own
    monitor's and, through the bus, every other rank's).
    """

    config: Config
    _evidence: dict[int, dict[tuple[int, str], _Evidence]] = field(default_factory=dict)
    _certain: dict[int, Verdict] = field(default_factory=dict)

    # --- inputs -----------------------------------------------------------------------------

    def certain(self, rank: int, cause: str, reason: str) -> None:
        """A certain signal (``cause`` in exit, restart, leave, fenced): ``rank`` goes in the next view."""
        if cause not in CERTAIN_SOURCES:
            raise ValueError(f"{cause!r} is not a certain cause; use one of {sorted(CERTAIN_SOURCES)}")
        if rank not in self._certain:
            self._certain[rank] = Verdict(rank, cause, True, reason)

    def suspect(self, observer: int, suspect: int, source: str, now: float, silence_ms: float = 0.0) -> None:
        """``observer`` reports ``suspect`` through ``source``, vouching for ``silence_ms`` of silence."""
        if source not in STATE_SOURCES and source not in POINT_SOURCES:
            raise ValueError(f"unknown signal source {source!r}")
        per = self._evidence.setdefault(suspect, {})
        key = (observer, source)
        old = per.get(key)
        if old is None or source in POINT_SOURCES:
            per[key] = _Evidence(now, silence_ms)

    def refute(self, observer: int, suspect: int, source: str = "heartbeat") -> None:
        """``observer`` heard ``suspect`` again: its ``source`` evidence is withdrawn."""
        per = self._evidence.get(suspect)
        if per is not None:
            per.pop((observer, source), None)
            if not per:
                del self._evidence[suspect]

    def is_certain(self, rank: int) -> bool:
        """Whether a certain signal already marked ``rank`` for the next view."""
        return rank in self._certain

    def forget(self, rank: int) -> None:
        """Drop everything about ``rank`` (it left the view, or joined afresh)."""
        self._evidence.pop(rank, None)
        self._certain.pop(rank, None)

    # --- decisions --------------------------------------------------------------------------

    def silence_ms(self, rank: int, now: float) -> float:
        """The longest silence of ``rank`` any live evidence vouches for at ``now``, ms."""
        self._expire(now)
        per = self._evidence.get(rank, {})
        return max((self._vouched(src, e, now) for (_, src), e in per.items()), default=0.0)

    @staticmethod
    def _vouched(source: str, e: _Evidence, now: float) -> float:
        # A held suspicion is a silence still going on; a point signal vouches for what it saw.
        if source in STATE_SOURCES:
            return e.silence_ms + (now - e.since_s) * 1e3
        return e.silence_ms

    def verdicts(self, now: float, members: tuple[int, ...] | set[int]) -> list[Verdict]:
        """Every member of ``members`` that should leave the view at ``now``, in rank order."""
        if not self._evidence and not self._certain:
            return []  # the common case, every tick of every rank
        cfg = self.config
        self._expire(now)
        out: list[Verdict] = []
        # Only ranks with evidence can be evicted: cost follows the suspects, not the cluster size.
        for rank in sorted(r for r in self._certain.keys() | self._evidence.keys() if r in members):
            if rank in self._certain:
                out.append(self._certain[rank])
                continue
            per = self._evidence.get(rank)
            if not per:
                continue
            observers = {obs for obs, _ in per}
            sources = {src for _, src in per}
            disconnects = {obs for obs, src in per if src == "disconnect"}
            if disconnects and (len(disconnects) >= 2 or len(per) >= 2):
                out.append(
                    Verdict(rank, "disconnect", True, f"socket closed on {_ranks(disconnects)}"
                            + ("" if len(per) == len(disconnects) else f", with {_sources(per)}"))
                )
                continue
            silence = max(self._vouched(src, e, now) for (_, src), e in per.items())
            corroborated = len(observers) >= 2 or len(sources) >= 2
            cause = "kernel" if "kernel" in sources else sorted(sources)[0]
            if silence >= cfg.grace_ms and corroborated:
                out.append(
                    Verdict(rank, cause, False,
                            f"silent >= {silence:.0f} ms, {_sources(per)} from {_ranks(observers)}")
                )
            elif silence >= cfg.single_observer_evict_ms and self._nobody_else(rank, observers, members):
                out.append(
                    Verdict(rank, cause, False,
                            f"silent >= {silence:.0f} ms, lone observer {_ranks(observers)} ({_sources(per)})")
                )
        return out

    def _nobody_else(self, suspect: int, observers: set[int], members) -> bool:
        # A lone observer decides alone only when no other member could confirm or deny: every
        # other member is itself under suspicion or certainly gone (a two-rank cluster, or the
        # last survivor). Otherwise one rank with a broken link would evict a healthy peer.
        others = set(members) - {suspect} - observers
        return all(r in self._certain or r in self._evidence for r in others)

    def pending(self) -> dict[int, str]:
        """Suspects with evidence that does not (yet) evict, with a readable summary."""
        return {r: _sources(per) for r, per in self._evidence.items() if r not in self._certain}

    def any_pending(self) -> bool:
        """Whether :meth:`pending` would name anyone (asked every tick; builds nothing)."""
        if not self._evidence:  # the common case, every tick of every rank
            return False
        certain = self._certain
        return any(r not in certain for r in self._evidence)

    def _expire(self, now: float) -> None:
        window_s = self.config.corroboration_window_ms / 1e3
        for rank in list(self._evidence):
            per = self._evidence[rank]
            for key in [k for k, e in per.items() if k[1] in POINT_SOURCES and now - e.since_s > window_s]:
                del per[key]
            if not per:
                del self._evidence[rank]


def _ranks(ranks: set[int]) -> str:
    return "rank" + ("s " if len(ranks) > 1 else " ") + ",".join(str(r) for r in sorted(ranks))


def _sources(per: dict[tuple[int, str], _Evidence]) -> str:
    return "+".join(sorted({src for _, src in per}))
