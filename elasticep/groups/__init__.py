"""Collectives over the healthy ranks of each view: one interface, three backends.

``rebuild(view) -> HealthyGroup`` aborts the previous group and builds one over ``view.members``:

- :class:`GlooGroups` (CPU): a fresh gloo group per view, rendezvous under an epoch-named prefix;
- :class:`NcclGroups` (GPU): ``shrink`` where NCCL can, else a fresh communicator per view;
- :class:`MooncakeGroups` (GPU): the Mooncake backend's ``active_ranks`` mask follows the view.
"""

from elasticep.groups.base import (
    CollectiveFailed,
    GroupAborted,
    GroupBuilder,
    GroupError,
    HealthyGroup,
    NotAMember,
    RendezvousFailed,
    StaleGroupEpoch,
    ViewLike,
    check_view,
)
from elasticep.groups.gloo import GlooGroups, group_store_prefix
from elasticep.groups.mooncake import MooncakeGroups, mooncake_unavailable_reason
from elasticep.groups.nccl import NcclGroups, nccl_unavailable_reason

__all__ = [
    "CollectiveFailed",
    "GlooGroups",
    "GroupAborted",
    "GroupBuilder",
    "GroupError",
    "HealthyGroup",
    "MooncakeGroups",
    "NcclGroups",
    "NotAMember",
    "RendezvousFailed",
    "StaleGroupEpoch",
    "ViewLike",
    "check_view",
    "group_store_prefix",
    "mooncake_unavailable_reason",
    "nccl_unavailable_reason",
]
