"""Fault injection for tests of code built on elasticep, in a fluent style.

::

    inject = FaultInjector(launcher)
    inject.kill(1, at_step=20).hang(2, at_step=40).slow(3, ms_per_step=5)

Every method returns the injector, so a schedule reads as one chain. A fault with ``at_step``
fires inside the rank, at the boundary before its own step ``at_step`` (deterministic: the same
schedule breaks the same step on every run); without ``at_step`` it acts at once from outside
(a signal, or a plan the rank applies at its next step boundary).

=========== ====================================================== ==================================
fault       what the rank does                                     what the rest of the system sees
=========== ====================================================== ==================================
``kill``    SIGKILL                                                 process exit, closed sockets
``hang``    SIGSTOP (``resume`` or ``for_s`` sends SIGCONT)         silence; sockets stay open
``slow``    sleeps ``ms_per_step`` before every step                late answers (a gray rank)
``mask``    stays up and connected, takes no further part          silence from a live process
``leave``   finishes its requests, says goodbye, exits 0           a graceful leave
``restart`` a new incarnation of the rank (old one killed)          a rejoin
=========== ====================================================== ==================================

Each injection is recorded in :attr:`FaultInjector.log` with its wall-clock time, for timelines.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from elasticep.engine.protocol import FaultPlan

if TYPE_CHECKING:
    from elasticep.engine.launcher import Launcher

__all__ = ["FaultInjector", "InjectedFault"]


@dataclass(frozen=True)
class InjectedFault:
    """One injection: ``kind`` (kill, hang, resume, slow, mask, unmask, leave, restart, add),
    ``rank``, ``at_step`` (None: at once), ``detail`` and ``t`` (``time.time()`` when injected)."""

    kind: str
    rank: int
    at_step: int | None
    t: float
    detail: str = ""


class FaultInjector:
    """Injects faults into the ranks of a :class:`~elasticep.engine.launcher.Launcher`.

    Thread-safe. Timers started by ``hang(..., for_s=...)`` are cancelled by :meth:`cancel`
    (and by the ``fault_injector`` fixture at teardown).
    """

    def __init__(self, launcher: "Launcher"):
        self.launcher = launcher
        self.log: list[InjectedFault] = []
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []

    def _record(self, kind: str, rank: int, at_step: int | None, detail: str = "") -> None:
        with self._lock:
            self.log.append(InjectedFault(kind, rank, at_step, time.time(), detail))

    @staticmethod
    def _step(at_step: int | None) -> None:
        if at_step is not None and at_step < 0:
            raise ValueError(f"at_step must be >= 0, got {at_step}")

    def kill(self, rank: int, *, at_step: int | None = None) -> "FaultInjector":
        """SIGKILL ``rank`` now, or have it SIGKILL itself before its step ``at_step``."""
        self._step(at_step)
        if at_step is None:
            self._record("kill", rank, None)
            self.launcher.kill(rank, wait=False)
        else:
            self.launcher.set_faults(rank, FaultPlan(kill_at_step=at_step))
            self._record("kill", rank, at_step)
        return self

    def hang(self, rank: int, *, at_step: int | None = None, for_s: float | None = None) -> "FaultInjector":
        """SIGSTOP ``rank`` now (``for_s``: SIGCONT it after that many seconds), or have it stop
        itself before its step ``at_step`` (resume it with :meth:`resume`)."""
        self._step(at_step)
        if at_step is None:
            self._record("hang", rank, None, f"for {for_s} s" if for_s is not None else "")
            self.launcher.hang(rank)
            if for_s is not None:
                timer = threading.Timer(for_s, self._resume_quietly, args=(rank,))
                timer.daemon = True
                with self._lock:
                    self._timers.append(timer)
                timer.start()
        else:
            if for_s is not None:
                raise ValueError("for_s needs an immediate hang (at_step=None); resume() a scheduled one")
            self.launcher.set_faults(rank, FaultPlan(hang_at_step=at_step))
            self._record("hang", rank, at_step)
        return self

    def resume(self, rank: int) -> "FaultInjector":
        """SIGCONT a hung ``rank``."""
        self._record("resume", rank, None)
        self.launcher.resume(rank)
        return self

    def _resume_quietly(self, rank: int) -> None:
        from elasticep.engine.launcher import RankNotRunning

        try:
            self.resume(rank)
        except RankNotRunning:
            pass  # killed meanwhile

    def slow(self, rank: int, ms_per_step: float, *, from_step: int = 0) -> "FaultInjector":
        """Make ``rank`` sleep ``ms_per_step`` before each of its steps from ``from_step`` on."""
        if ms_per_step < 0:
            raise ValueError("ms_per_step must be >= 0")
        self._step(from_step)
        self.launcher.slow(rank, ms_per_step, from_step=from_step)
        self._record("slow", rank, from_step, f"{ms_per_step} ms/step")
        return self

    def mask(self, rank: int, *, at_step: int = 0) -> "FaultInjector":
        """From its step ``at_step`` (0: the next one), ``rank`` stays up but takes no part."""
        self._step(at_step)
        self.launcher.mask(rank, at_step=at_step)
        self._record("mask", rank, at_step)
        return self

    def unmask(self, rank: int) -> "FaultInjector":
        """Clear ``rank``'s fault plan; a masked rank takes part again."""
        self.launcher.unmask(rank)
        self._record("unmask", rank, None)
        return self

    def leave(self, rank: int, *, at_step: int | None = None) -> "FaultInjector":
        """Retire ``rank`` gracefully now (without waiting for it), or at its step ``at_step``."""
        self._step(at_step)
        if at_step is None:
            self.launcher.retire(rank, wait=False)
        else:
            self.launcher.set_faults(rank, FaultPlan(leave_at_step=at_step))
        self._record("leave", rank, at_step)
        return self

    def restart(self, rank: int, *, wait: bool = True) -> "FaultInjector":
        """Start a new incarnation of ``rank`` (killing the old one if it still runs)."""
        self._record("restart", rank, None)
        self.launcher.restart(rank, wait=wait)
        return self

    def cancel(self) -> None:
        """Cancel pending ``for_s`` resume timers."""
        with self._lock:
            timers, self._timers = self._timers, []
        for t in timers:
            t.cancel()
