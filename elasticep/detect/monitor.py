"""``HeartbeatMonitor``: one observer's view of its peers' heartbeats, as a pure tracker.

The membership core owns one and feeds it every heartbeat it receives (``heartbeat``) and a
periodic ``check(now)``; the monitor answers with events to publish: a :class:`Suspicion` when a
peer's silence crosses both ``Config.min_suspect_ms`` and ``Config.phi_threshold``, a
:class:`Refute` when a suspected peer is heard again, and a :class:`Gray` when a peer keeps being
late (and again when it recovers). Times are ``now`` in seconds on any monotonic clock.

An observer that was itself descheduled (SIGSTOP, a CPU hog, a long GC) would see every peer
go silent at once. ``check`` notices that its own calls came late and does not count the stall
against its peers: their silence resumes from where it was before the stall (memberlist's
Lifeguard calls this local health awareness).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Iterable

from elasticep.config import Config
from elasticep.detect.phi import ArrivalWindow, phi
from elasticep.events import Event, Gray, Refute, Suspicion

GRAY_MIN_SAMPLES = 5
"""Gaps a peer must have sent before it can be judged gray."""
GRAY_RECENT = 10
"""Recent gaps averaged to judge lateness."""
GRAY_RECOVER = 0.7
"""A gray peer recovers when its slowness falls below this fraction of ``gray_slowness``."""
GRAY_EVERY_CHECKS = 10
"""Lateness is judged on every this many checks (about every 10 heartbeat intervals)."""
MIN_STD_MS = 1.0
"""Standard deviation floor for the phi estimate, ms (see :mod:`elasticep.detect.phi`)."""


@dataclass
class _Peer:
    last_s: float
    window: ArrivalWindow
    incarnation: int = 0
    heard: bool = False
    suspected: bool = False
    gray: bool = False
    joining: bool = False  # never heard since watched as a starting peer: startup grace applies


@dataclass
class HeartbeatMonitor:
    """Tracks the heartbeats of the peers in ``watch``; pure (``now`` is always an argument).

    Args:
        rank: the observing rank (named as ``observer`` in the events it returns).
        config: detection settings (``heartbeat_interval_ms``, ``phi_threshold``,
            ``min_suspect_ms``, ``gray_slowness``, ``history_size``).
    """

    rank: int
    config: Config
    _peers: dict[int, _Peer] = field(default_factory=dict)
    _last_check_s: float | None = None
    _order: tuple[int, ...] = ()  # the watched peers, sorted (set by watch, read every tick)
    _n_suspected: int = 0  # how many watched peers are suspected (asked every tick)
    stalls: int = 0
    """How many times ``check`` found the observer itself had stalled."""
    _checks: int = 0

    # --- inputs -----------------------------------------------------------------------------

    def watch(self, peers: Iterable[int], now: float, *, joining: bool = False) -> None:
        """Track exactly ``peers`` (minus this rank) from ``now``; new peers start unsuspected.

        A newly watched peer is treated as heard at ``now``, so it is suspected no sooner than
        ``min_suspect_ms`` after it joined the watch list. With ``joining=True`` (the bootstrap
        view: peers may still be starting) a new peer that has not been heard yet is suspected
        only after ``Config.startup_grace_s`` of silence; its first heartbeat ends that grace.
        """
        wanted = {p for p in peers if p != self.rank}
        for p in list(self._peers):
            if p not in wanted:
                self._n_suspected -= self._peers.pop(p).suspected
        for p in wanted:
            if p not in self._peers:
                self._peers[p] = _Peer(last_s=now, window=ArrivalWindow(self.config.history_size), joining=joining)
        self._order = tuple(sorted(self._peers))

    def heartbeat(self, peer: int, now: float, incarnation: int = 0) -> list[Event]:
        """Record a heartbeat from ``peer`` received at ``now``; returns a Refute if it was suspected."""
        state = self._peers.get(peer)
        if state is None:
            return []
        if incarnation != state.incarnation and state.heard:
            # A new process of the same rank: its predecessor's gaps say nothing about it.
            state.window = ArrivalWindow(self.config.history_size)
            state.heard = False
        gap_ms = (now - state.last_s) * 1e3
        # A gap as long as the grace period is an outage (a partition, a stopped process), not
        # the peer's pace: keeping it would blunt phi and paint the peer gray for a while.
        if state.heard and 0.0 <= gap_ms < self.config.grace_ms:
            state.window.add(gap_ms)
        state.last_s = max(state.last_s, now)
        state.heard = True
        state.joining = False
        state.incarnation = incarnation
        if state.suspected:
            state.suspected = False
            self._n_suspected -= 1
            return [Refute(observer=self.rank, suspect=peer, source="heartbeat")]
        return []

    def joining(self) -> set[int]:
        """Peers still in their startup grace (watched as starting, not heard yet)."""
        return {p for p, s in self._peers.items() if s.joining}

    def check(self, now: float) -> list[Event]:
        """Suspicions and gray reports due at ``now``; call about once per heartbeat interval."""
        cfg = self.config
        out: list[Event] = []
        interval_s = cfg.heartbeat_interval_ms / 1e3
        stall_s = max(3.0 * interval_s, cfg.min_suspect_ms / 2e3)
        if self._last_check_s is not None:
            late_s = now - self._last_check_s - interval_s
            if now - self._last_check_s > stall_s:
                # This observer was not running; do not blame the peers for its own pause.
                self.stalls += 1
                for state in self._peers.values():
                    state.last_s = min(now, state.last_s + late_s)
        self._last_check_s = now
        for peer in self._order:
            state = self._peers[peer]
            if state.suspected:
                continue
            elapsed_ms = (now - state.last_s) * 1e3
            if elapsed_ms < cfg.min_suspect_ms:
                continue
            if state.joining and elapsed_ms < cfg.startup_grace_s * 1e3:
                continue  # still starting: the steady-state timers do not apply yet
            level = self.phi(peer, now)
            if level >= cfg.phi_threshold or state.joining:
                state.suspected = True
                self._n_suspected += 1
                out.append(
                    Suspicion(
                        observer=self.rank,
                        suspect=peer,
                        source="heartbeat",
                        phi=round(level, 2),
                        detail=f"silent for {elapsed_ms:.0f} ms",
                    )
                )
        self._checks += 1
        if self._checks % GRAY_EVERY_CHECKS == 0:
            out.extend(self._gray(now))
        return out

    # --- queries ----------------------------------------------------------------------------

    @property
    def peers(self) -> tuple[int, ...]:
        return self._order

    def silence_ms(self, peer: int, now: float) -> float:
        """Milliseconds since ``peer`` was last heard (or watched), stalls of this observer excluded."""
        return (now - self._peers[peer].last_s) * 1e3

    def phi(self, peer: int, now: float) -> float:
        """Suspicion level of ``peer`` at ``now`` (see :func:`elasticep.detect.phi.phi`)."""
        state = self._peers[peer]
        stats = state.window.stats(nominal_ms=self.config.heartbeat_interval_ms, min_std_ms=MIN_STD_MS)
        return phi((now - state.last_s) * 1e3, stats.mean_ms, stats.std_ms)

    def suspected(self) -> set[int]:
        return {p for p, s in self._peers.items() if s.suspected}

    def any_suspected(self) -> bool:
        """Whether some watched peer is suspected (asked every tick: a count, kept as peers are
        suspected, refuted and unwatched)."""
        return self._n_suspected > 0

    def gray(self) -> set[int]:
        return {p for p, s in self._peers.items() if s.gray}

    # --- gray ranks -------------------------------------------------------------------------

    def _gray(self, now: float) -> list[Event]:
        cfg = self.config
        recent = {
            p: s.window.recent_mean(GRAY_RECENT)
            for p, s in self._peers.items()
            if len(s.window) >= GRAY_MIN_SAMPLES
        }
        if not recent:
            return []
        reference = max(cfg.heartbeat_interval_ms, statistics.median(recent.values()))
        out: list[Event] = []
        for peer in sorted(recent):
            state = self._peers[peer]
            slowness = recent[peer] / reference
            if not state.gray and slowness >= cfg.gray_slowness:
                state.gray = True
                out.append(Gray(rank=peer, observer=self.rank, slowness=round(slowness, 2)))
            elif state.gray and slowness < cfg.gray_slowness * GRAY_RECOVER:
                state.gray = False
                out.append(Gray(rank=peer, observer=self.rank, slowness=round(max(1.0, slowness), 2)))
        return out
