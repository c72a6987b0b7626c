"""Failure detection: phi-accrual math, a heartbeat monitor, the fusion policy and signal sources.

The math (:mod:`~elasticep.detect.phi`), the monitor and the policy are pure: they take ``now``
and their inputs and return decisions. The sources in :mod:`~elasticep.detect.sources` do the
I/O: they read kernel masks and process exits and publish events.
"""

from elasticep.detect.fusion import CERTAIN_SOURCES, FusionPolicy, Verdict
from elasticep.detect.monitor import HeartbeatMonitor
from elasticep.detect.phi import ArrivalWindow, GapStats, gap_stats, phi, silence_for_phi
from elasticep.detect.sources import (
    MaskProvider,
    MaskSource,
    ProcessExitWatcher,
    collective_error,
    exit_event,
    newly_inactive,
    transfer_failed,
)

__all__ = [
    "ArrivalWindow",
    "CERTAIN_SOURCES",
    "FusionPolicy",
    "GapStats",
    "HeartbeatMonitor",
    "MaskProvider",
    "MaskSource",
    "ProcessExitWatcher",
    "Verdict",
    "collective_error",
    "exit_event",
    "gap_stats",
    "newly_inactive",
    "phi",
    "silence_for_phi",
    "transfer_failed",
]
