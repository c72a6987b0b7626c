"""What happened, when: the timeline of a run, its membership changes, a live view and a plot.

A :class:`Timeline` collects, from any process that watches a cluster (the demo, a benchmark, a
user's monitor):

* the bus events it sees (:meth:`Timeline.record`): ``ProcessExit``, ``PeerTimeout``,
  ``Suspicion``, ``LeaveRequest``, ``JoinRequest``, ``ViewInstalled``, ``ReconfigPhase`` ...;
* the faults it injected itself (:meth:`Timeline.signal`): the moment a rank was killed, hung,
  masked, retired or restarted;
* each finished request (:meth:`Timeline.request_done`), for throughput over time.

All times are wall-clock nanoseconds (``time.time_ns()``), which every process on one host
shares, so events from many ranks line up. :meth:`Timeline.changes` turns the raw record into one
:class:`MembershipChange` per new view epoch, with the milliseconds from the signal to detection,
to the agreed view, through each reconfiguration phase, to serving again.

Who calls it: :mod:`elasticep.engine.demo` and :mod:`elasticep.bench.recovery`. Thread-safe:
recording takes a lock, so the bus listener and the request threads can feed one timeline.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from elasticep.events import (
    Envelope,
    JoinRequest,
    LeaveRequest,
    PeerTimeout,
    ProcessExit,
    ReconfigPhase,
    Suspicion,
    ViewInstalled,
    event_tag,
)

__all__ = ["Timeline", "MembershipChange", "LiveDisplay", "PHASE_ORDER", "summarize"]

PHASE_ORDER: tuple[str, ...] = ("plan", "groups", "weights", "commit", "resume")

_DETECTION_EVENTS = (ProcessExit, PeerTimeout, Suspicion, LeaveRequest, JoinRequest)


@dataclass
class MembershipChange:
    """One new view and how the cluster got there, in ms after ``signal_ns`` (None: not seen).

    ``signal`` names what started it (``"kill rank 2"``, ``"restart rank 2"``, or the first
    detection event when no injected signal preceded it). ``detected_ms``: the first event that
    reported it (a process exit, a kernel timeout, a suspicion, a join or leave request).
    ``view_ms``: the moment the last member installed the view (agreement). ``phases_ms``: each
    reconfiguration phase's duration, the slowest member's. ``resumed_ms``: the moment the last
    member finished the resume phase (serving again).
    """

    epoch: int
    members: tuple[int, ...]
    signal: str
    signal_ns: int
    detected_by: str | None = None
    detected_ms: float | None = None
    view_ms: float | None = None
    phases_ms: dict[str, float] = field(default_factory=dict)
    resumed_ms: float | None = None
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["members"] = list(self.members)
        return d


class Timeline:
    """The record of one run; see the module docstring."""

    def __init__(self, start_ns: int | None = None) -> None:
        self.start_ns = time.time_ns() if start_ns is None else start_ns
        self._lock = threading.Lock()
        self._events: list[tuple[int, int, Any]] = []  # (t_ns, sender, event)
        self._signals: list[tuple[int, str, int]] = []  # (t_ns, kind, rank)
        self._requests: list[tuple[int, int, bool]] = []  # (t_ns, tokens, ok)

    # --- recording -----------------------------------------------------------------------------

    def record(self, item: Envelope | Any, t_ns: int | None = None) -> None:
        """Record a bus envelope (its ``wall_ns``) or a bare event (``t_ns``, else its own or now)."""
        if isinstance(item, Envelope):
            t, sender, event = item.wall_ns, item.sender, item.event
        else:
            event, sender = item, -1
            t = t_ns if t_ns is not None else getattr(event, "t_ns", None) or time.time_ns()
        if isinstance(event, ReconfigPhase):
            t = event.t_ns  # the phase's own clock reading, not the envelope's send time
        with self._lock:
            self._events.append((t, sender, event))

    def signal(self, kind: str, rank: int, t_ns: int | None = None) -> None:
        """Record a fault or membership action injected from outside (``kill``, ``restart``, ...)."""
        with self._lock:
            self._signals.append((time.time_ns() if t_ns is None else t_ns, kind, rank))

    def request_done(self, tokens: int, ok: bool = True, t_ns: int | None = None) -> None:
        """Record one finished request of ``tokens`` generated tokens (``ok``: equal to the oracle)."""
        with self._lock:
            self._requests.append((time.time_ns() if t_ns is None else t_ns, tokens, ok))

    # --- reading -------------------------------------------------------------------------------

    def events(self) -> list[tuple[int, int, Any]]:
        with self._lock:
            return sorted(self._events, key=lambda e: e[0])

    def signals(self) -> list[tuple[int, str, int]]:
        with self._lock:
            return sorted(self._signals)

    def requests(self) -> list[tuple[int, int, bool]]:
        with self._lock:
            return sorted(self._requests)

    def changes(self) -> list[MembershipChange]:
        """One entry per view epoch after the first one seen, in epoch order."""
        events = self.events()
        signals = self.signals()
        installs: dict[int, list[tuple[int, ViewInstalled]]] = {}
        phases: dict[int, dict[str, dict[tuple[int, str], int]]] = {}
        for t, _sender, ev in events:
            if isinstance(ev, ViewInstalled):
                installs.setdefault(ev.epoch, []).append((t, ev))
            elif isinstance(ev, ReconfigPhase):
                phases.setdefault(ev.epoch, {}).setdefault(ev.phase, {})[(ev.rank, ev.status)] = t
        out: list[MembershipChange] = []
        epochs = sorted(installs)
        previous_view_ns = self.start_ns
        for epoch in epochs[1:]:  # the first view seen is where the run started
            first_install = min(t for t, _ in installs[epoch])
            last_install = max(t for t, _ in installs[epoch])
            view = installs[epoch][0][1]
            # the signal: the latest injected one after the previous view and before this one
            candidates = [s for s in signals if previous_view_ns <= s[0] <= first_install]
            detections = [
                (t, ev) for t, _s, ev in events
                if isinstance(ev, _DETECTION_EVENTS) and previous_view_ns <= t <= first_install
            ]
            if candidates:
                sig_t, kind, rank = candidates[-1]
                label = f"{kind} rank {rank}"
                detections = [(t, ev) for t, ev in detections if t >= sig_t]
            elif detections:
                sig_t, label = detections[0][0], _describe(detections[0][1])
            else:
                sig_t, label = first_install, "view change"
            change = MembershipChange(
                epoch=epoch,
                members=tuple(view.members),
                signal=label,
                signal_ns=sig_t,
                view_ms=_ms(last_install - sig_t),
                reason=view.reason,
            )
            if detections:
                change.detected_by = _describe(detections[0][1])
                change.detected_ms = _ms(detections[0][0] - sig_t)
            for name in PHASE_ORDER:
                marks = phases.get(epoch, {}).get(name, {})
                durations = [
                    end - marks[(rank, "start")]
                    for (rank, status), end in marks.items()
                    if status == "end" and (rank, "start") in marks
                ]
                if durations:
                    change.phases_ms[name] = _ms(max(durations))
            resume_ends = [t for (rank, status), t in phases.get(epoch, {}).get("resume", {}).items() if status == "end"]
            if resume_ends:
                change.resumed_ms = _ms(max(resume_ends) - sig_t)
            out.append(change)
            previous_view_ns = last_install
        return out

    def throughput(self, bin_s: float = 1.0) -> tuple[list[float], list[float]]:
        """Generated tokens per second in bins of ``bin_s``: (bin start s after start, tok/s)."""
        reqs = self.requests()
        if not reqs:
            return [], []
        last = max(t for t, _, _ in reqs)
        n = int((last - self.start_ns) / 1e9 / bin_s) + 1
        bins = [0.0] * n
        for t, tokens, _ok in reqs:
            bins[min(n - 1, max(0, int((t - self.start_ns) / 1e9 / bin_s)))] += tokens
        return [i * bin_s for i in range(n)], [b / bin_s for b in bins]

    # --- output --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        reqs = self.requests()
        return {
            "start_ns": self.start_ns,
            "changes": [c.as_dict() for c in self.changes()],
            "signals": [{"t_ns": t, "kind": k, "rank": r} for t, k, r in self.signals()],
            "requests": {"total": len(reqs), "wrong": sum(1 for _, _, ok in reqs if not ok),
                         "tokens": sum(n for _, n, _ in reqs)},
            "events": [
                {"t_ns": t, "sender": s, "type": event_tag(ev), **msgspec.to_builtins(ev)}
                for t, s, ev in self.events()
            ],
        }

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=str))
        return path

    def plot(self, path: str | Path, bin_s: float = 1.0, title: str = "elasticep: throughput through membership changes") -> Path:
        """Write a PNG: tokens/s over time, each signal (red) and each resume (green) marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xs, ys = self.throughput(bin_s)
        # requests finish whole, so single bins are lumpy: show a centred 3-bin mean as well
        smooth = [sum(ys[max(0, i - 1) : i + 2]) / len(ys[max(0, i - 1) : i + 2]) for i in range(len(ys))]
        fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
        ax.step(xs, ys, where="post", color="#1f77b4", alpha=0.35, label=f"tokens/s ({bin_s:g} s bins)")
        ax.plot([x + bin_s / 2 for x in xs], smooth, color="#1f77b4", lw=2, label="3-bin mean")
        top = max(ys, default=1.0) * 1.45 or 1.0
        ax.set_ylim(0, top)
        for i, change in enumerate(self.changes()):
            t0 = (change.signal_ns - self.start_ns) / 1e9
            y = top * (0.97 - 0.16 * (i % 3))  # stagger labels of changes close in time
            ax.axvline(t0, color="#d62728", ls="--", lw=1)
            label = f" {change.signal}"
            if change.resumed_ms is not None:
                t1 = t0 + change.resumed_ms / 1e3
                ax.axvspan(t0, t1, color="#ff7f0e", alpha=0.25)
                ax.axvline(t1, color="#2ca02c", lw=1)
                label += f" -> epoch {change.epoch} serving after {change.resumed_ms:.0f} ms"
            ax.text(t0, y, label, color="#d62728", fontsize=8, va="top")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("time since start (s)")
        ax.set_ylabel("generated tokens / s")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        plt.close(fig)
        return path

    def table(self):
        """A ``rich.table.Table`` of the membership changes, milliseconds after each signal."""
        from rich.table import Table

        table = Table(title="membership changes (ms after the signal)")
        for col in ("epoch", "members", "signal", "detected", "view agreed", *PHASE_ORDER, "resumed"):
            table.add_column(col, justify="right" if col not in ("signal", "members") else "left")
        for c in self.changes():
            detected = f"{_fmt(c.detected_ms)} ({c.detected_by})" if c.detected_by else "-"
            table.add_row(
                str(c.epoch), ",".join(map(str, c.members)), c.signal, detected, _fmt(c.view_ms),
                *(_fmt(c.phases_ms.get(p)) for p in PHASE_ORDER), _fmt(c.resumed_ms),
            )
        return table


class LiveDisplay:
    """A live terminal panel (rich) over a :class:`Timeline` and a status callback.

    ``status()`` returns a dict with any of ``requests_done``, ``requests_total``, ``epoch``,
    ``members``, ``phase``, ``note``; it is called from the display's refresh thread, so it must
    only read. Use as a context manager; with ``enabled=False`` nothing is drawn.
    """

    def __init__(self, timeline: Timeline, status: Callable[[], dict[str, Any]], *, enabled: bool = True,
                 refresh_per_second: float = 4.0) -> None:
        self._timeline = timeline
        self._status = status
        self._enabled = enabled
        self._refresh = refresh_per_second
        self._live = None

    def __enter__(self) -> "LiveDisplay":
        if self._enabled:
            from rich.live import Live

            self._live = Live(get_renderable=self._render, refresh_per_second=self._refresh, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def _render(self):
        from rich.console import Group
        from rich.table import Table

        s = self._status()
        xs, ys = self._timeline.throughput(1.0)
        recent = ys[-3:-1] if len(ys) > 2 else ys
        tok_s = sum(recent) / len(recent) if recent else 0.0
        head = Table.grid(padding=(0, 2))
        head.add_row(
            f"[bold]requests[/] {s.get('requests_done', 0)}/{s.get('requests_total', '?')}",
            f"[bold]tokens/s[/] {tok_s:.0f}",
            f"[bold]view[/] epoch {s.get('epoch', '?')} members {s.get('members', '?')}",
            f"[bold]phase[/] {s.get('phase', 'serving')}",
        )
        parts: list[Any] = [head]
        if s.get("note"):
            parts.append(f"[dim]{s['note']}[/]")
        if self._timeline.changes():
            parts.append(self._timeline.table())
        return Group(*parts)


def _ms(ns: int) -> float:
    return round(ns / 1e6, 2)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _describe(ev: Any) -> str:
    if isinstance(ev, ProcessExit):
        return f"process exit of rank {ev.rank}"
    if isinstance(ev, PeerTimeout):
        return f"kernel timeout on rank {ev.peer} (seen by {ev.observer})"
    if isinstance(ev, Suspicion):
        return f"{ev.source} suspicion of rank {ev.suspect} (by {ev.observer})"
    if isinstance(ev, LeaveRequest):
        return f"leave request of rank {ev.rank}"
    if isinstance(ev, JoinRequest):
        return f"join request of rank {ev.rank}"
    return event_tag(ev)


def summarize(changes: Iterable[MembershipChange]) -> list[str]:
    """One readable line per change, for logs and non-interactive output."""
    lines = []
    for c in changes:
        phases = " ".join(f"{p}={c.phases_ms[p]:.1f}" for p in PHASE_ORDER if p in c.phases_ms)
        lines.append(
            f"epoch {c.epoch} members {list(c.members)} after {c.signal}: detected +{_fmt(c.detected_ms)} ms"
            f" ({c.detected_by or '-'}), view agreed +{_fmt(c.view_ms)} ms, {phases}, resumed +{_fmt(c.resumed_ms)} ms"
        )
    return lines
