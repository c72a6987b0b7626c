"""Phi-accrual suspicion level over heartbeat inter-arrival times, as pure functions.

False-positive model. The gaps between a live peer's heartbeats, as one observer sees them, are
taken to be normal with the mean and standard deviation of the last ``history_size`` gaps; the
standard deviation is floored at ``min_std_ms`` and at ``JITTER_FLOOR`` times the mean, because a
quiet loopback link shows a spread of a few microseconds that one scheduler hiccup would exceed.
After ``elapsed`` ms of silence::

    phi = -log10(P(gap > elapsed)) = -log10(0.5 * erfc((elapsed - mean) / (std * sqrt(2))))

so a threshold ``phi`` suspects a live peer on a given silence with odds of about ``10**-phi``
under the model. Real pauses (GC, a descheduled process) are not normal, which is why the
detector never suspects before ``Config.min_suspect_ms`` and never evicts on silence alone before
``Config.grace_ms`` (see :mod:`elasticep.detect.fusion`).

Everything here is a function of the arrival history and ``now``; nothing reads a clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Iterable

JITTER_FLOOR = 0.1
"""Standard deviation floor as a fraction of the mean gap (10 %)."""

_LN10 = math.log(10.0)
_SQRT2 = math.sqrt(2.0)
_LOG_SQRT_PI = 0.5 * math.log(math.pi)


def _ln_tail(z: float) -> float:
    """``ln P(Z > z)`` for a standard normal ``Z``, accurate far into the tail (no underflow)."""
    if z < 6.0:
        p = 0.5 * math.erfc(z / _SQRT2)
        return math.log(p) if p > 0.0 else -math.inf
    # Asymptotic series of erfc: erfc(x) ~ exp(-x^2) / (x sqrt(pi)) * (1 - 1/(2x^2) + 3/(4x^4)).
    x = z / _SQRT2
    x2 = x * x
    series = 1.0 - 1.0 / (2.0 * x2) + 3.0 / (4.0 * x2 * x2)
    return math.log(0.5) - x2 - math.log(x) - _LOG_SQRT_PI + math.log(series)


def phi(elapsed_ms: float, mean_ms: float, std_ms: float) -> float:
    """Suspicion level after ``elapsed_ms`` of silence, for gaps ~ Normal(``mean_ms``, ``std_ms``).

    Returns 0.0 for a silence no longer than a typical gap's lower half, grows without bound
    (about quadratically in ``elapsed_ms``) as the silence stretches; ``std_ms`` must be > 0.
    """
    if std_ms <= 0.0:
        raise ValueError("std_ms must be > 0")
    if elapsed_ms <= 0.0:
        return 0.0
    z = (elapsed_ms - mean_ms) / std_ms
    return max(0.0, -_ln_tail(z) / _LN10)


def silence_for_phi(threshold: float, mean_ms: float, std_ms: float) -> float:
    """The silence, ms, at which :func:`phi` reaches ``threshold`` (bisection; for docs and tests)."""
    lo, hi = 0.0, mean_ms + std_ms
    while phi(hi, mean_ms, std_ms) < threshold:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if phi(mid, mean_ms, std_ms) < threshold:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class GapStats:
    """Mean and floored standard deviation of a peer's recent heartbeat gaps, ms."""

    mean_ms: float
    std_ms: float
    samples: int


def gap_stats(gaps_ms: Iterable[float], *, nominal_ms: float, min_std_ms: float) -> GapStats:
    """Statistics of the gaps ``gaps_ms``; with no samples, the nominal heartbeat interval.

    ``nominal_ms`` is the configured heartbeat interval: it stands in for the mean until a peer
    has sent two heartbeats, so a peer that never speaks is still suspected on time.
    """
    values = list(gaps_ms)
    n = len(values)
    if n == 0:
        return GapStats(nominal_ms, max(min_std_ms, JITTER_FLOOR * nominal_ms), 0)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / n if n > 1 else 0.0
    std = max(math.sqrt(var), min_std_ms, JITTER_FLOOR * mean)
    return GapStats(mean, std, n)


class ArrivalWindow:
    """The last ``size`` inter-arrival gaps of one peer, ms, with running sums (O(1) stats).

    Owned by :class:`elasticep.detect.monitor.HeartbeatMonitor`; pure bookkeeping.
    """

    __slots__ = ("_gaps", "_sum", "_sum_sq", "size")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = size
        self._gaps: deque[float] = deque()
        self._sum = 0.0
        self._sum_sq = 0.0

    def add(self, gap_ms: float) -> None:
        if gap_ms < 0.0:
            raise ValueError("gap_ms must be >= 0 (arrivals must be given in time order)")
        self._gaps.append(gap_ms)
        self._sum += gap_ms
        self._sum_sq += gap_ms * gap_ms
        if len(self._gaps) > self.size:
            old = self._gaps.popleft()
            self._sum -= old
            self._sum_sq -= old * old

    def __len__(self) -> int:
        return len(self._gaps)

    def stats(self, *, nominal_ms: float, min_std_ms: float) -> GapStats:
        n = len(self._gaps)
        if n == 0:
            return gap_stats((), nominal_ms=nominal_ms, min_std_ms=min_std_ms)
        mean = self._sum / n
        var = max(0.0, self._sum_sq / n - mean * mean) if n > 1 else 0.0
        std = max(math.sqrt(var), min_std_ms, JITTER_FLOOR * mean)
        return GapStats(mean, std, n)

    def recent_mean(self, k: int) -> float:
        """Mean of the last ``k`` gaps (fewer if the window holds fewer); 0.0 when empty."""
        n = min(k, len(self._gaps))
        if n == 0:
            return 0.0
        return sum(self._gaps[i] for i in range(len(self._gaps) - n, len(self._gaps))) / n
