"""The event bus: typed events between ranks over ZeroMQ (CURVE) or an in-process network.

See ``docs/bus.md``. The names below are the package's public API.
"""

from __future__ import annotations

from anyio import EndOfStream, WouldBlock

from elasticep.bus.bus import (
    DEFAULT_SUBSCRIPTION_MAXSIZE,
    OVERFLOW_POLICIES,
    BusClosed,
    BusStatistics,
    EventBus,
    Overflow,
    Subscription,
    SubscriptionStatistics,
)
from elasticep.bus.inprocess import InProcessNetwork, InProcessTransport
from elasticep.bus.transport import Frame, Transport, TransportClosed, new_incarnation

__all__ = [
    "DEFAULT_SUBSCRIPTION_MAXSIZE",
    "OVERFLOW_POLICIES",
    "BusClosed",
    "BusStatistics",
    "EndOfStream",
    "EventBus",
    "Frame",
    "InProcessNetwork",
    "InProcessTransport",
    "Overflow",
    "Subscription",
    "SubscriptionStatistics",
    "Transport",
    "TransportClosed",
    "WouldBlock",
    "new_incarnation",
]
