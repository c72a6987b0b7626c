"""Agreed membership views: the pure state machine, the view store and the async service.

:class:`MembershipCore` decides (pure, ``step(input, now) -> actions``); a :class:`ViewStore`
commits each view once by compare-and-set; :class:`MembershipService` drives both over the bus.
"""

from elasticep.membership.core import (
    Action,
    CasDone,
    Committed,
    CompareAndSet,
    Fence,
    Install,
    LeaveCommand,
    Left,
    MembershipCore,
    Note,
    Publish,
    ReadView,
    Refused,
    Status,
    StoreFailed,
    Tick,
    ViewRead,
)
from elasticep.membership.service import MembershipService, RankFenced
from elasticep.membership.etcd_store import EtcdViewStore
from elasticep.membership.store import (
    InMemoryViewStore,
    StoreUnavailable,
    TCPStoreViewStore,
    ViewStore,
    open_view_store,
)
from elasticep.membership.view import (
    Cause,
    ChangeKind,
    CorruptView,
    MemberChange,
    View,
    ViewDiff,
    decode_view,
    encode_view,
)

__all__ = [
    "Action",
    "CasDone",
    "Cause",
    "Committed",
    "ChangeKind",
    "CompareAndSet",
    "CorruptView",
    "EtcdViewStore",
    "Fence",
    "InMemoryViewStore",
    "Install",
    "LeaveCommand",
    "Left",
    "MemberChange",
    "MembershipCore",
    "MembershipService",
    "Note",
    "Publish",
    "RankFenced",
    "ReadView",
    "Refused",
    "Status",
    "StoreFailed",
    "StoreUnavailable",
    "TCPStoreViewStore",
    "Tick",
    "View",
    "ViewDiff",
    "ViewRead",
    "ViewStore",
    "decode_view",
    "encode_view",
    "open_view_store",
]
