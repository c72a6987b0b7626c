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
    NotAnEventType,
    Overflow,
    Subscription,
    SubscriptionStatistics,
)
from elasticep.bus.inprocess import InProcessNetwork, InProcessTransport
from elasticep.bus.loop import EVENT_LOOP_ENV, event_loop_kind, new_event_loop
from elasticep.bus.keys import KEYS_ENV, ClusterKeys, MissingKey
from elasticep.bus.rendezvous import DEFAULT_PREFIX, Registration, StoreRendezvous, connect_store
from elasticep.bus.transport import Frame, Transport, TransportClosed, new_incarnation
from elasticep.bus.zmq_transport import MONITOR_RANK, ZmqTransport

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SUBSCRIPTION_MAXSIZE",
    "EVENT_LOOP_ENV",
    "KEYS_ENV",
    "MONITOR_RANK",
    "OVERFLOW_POLICIES",
    "BusClosed",
    "BusStatistics",
    "ClusterKeys",
    "EndOfStream",
    "EventBus",
    "Frame",
    "InProcessNetwork",
    "InProcessTransport",
    "MissingKey",
    "NotAnEventType",
    "Overflow",
    "Registration",
    "StoreRendezvous",
    "Subscription",
    "SubscriptionStatistics",
    "Transport",
    "TransportClosed",
    "WouldBlock",
    "ZmqTransport",
    "connect_store",
    "event_loop_kind",
    "new_event_loop",
    "new_incarnation",
]
