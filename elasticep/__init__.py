"""elasticep: fault-tolerant, elastic expert parallelism for MoE inference.

The front door re-exports the public names of every subpackage. They load on first use, so
``import elasticep`` (and the ``elasticep`` command) stays cheap: torch, the native kernel and
transformers are imported only by the names that need them. ``tests/test_public_api.py`` holds
``__all__`` to this table.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, tuple[str, ...]] = {
    "elasticep.config": ("Config", "UnknownConfigField"),
    "elasticep.agent": (
        "Agent",
        "EngineHooks",
        "Commit",
        "StagedSlot",
        "AgentError",
        "AgentFenced",
        "AgentStateError",
        "AgentStopped",
        "HookFailed",
        "HookTimeout",
        "ViewTimeout",
    ),
    "elasticep.agent.operator": ("OperatorDoor", "OperatorRefused", "start_operator"),
    "elasticep.events": (
        "Codec",
        "Envelope",
        "Event",
        "FrameRefused",
        "MalformedFrame",
        "UnknownEventType",
        "SchemaTooNew",
        "FrameTooLarge",
        "SenderMismatch",
        "Heartbeat",
        "PeerTimeout",
        "Suspicion",
        "Refute",
        "ProcessExit",
        "Gray",
        "CollectiveError",
        "TransferFailed",
        "SequenceGap",
        "JoinRequest",
        "LeaveRequest",
        "ViewProposal",
        "ViewInstalled",
        "Fenced",
        "ReconfigPhase",
        "TransferEndpoint",
        "ExpertLoad",
        "Custom",
    ),
    "elasticep.bus": (
        "EventBus",
        "Subscription",
        "InProcessNetwork",
        "ZmqTransport",
        "ClusterKeys",
        "StoreRendezvous",
        "Transport",
        "BusClosed",
        "NotAnEventType",
        "new_event_loop",
    ),
    "elasticep.detect": ("FusionPolicy", "HeartbeatMonitor", "MaskProvider", "MaskSource", "ProcessExitWatcher"),
    "elasticep.membership": (
        "MembershipService",
        "MembershipCore",
        "View",
        "ViewDiff",
        "MemberChange",
        "ChangeKind",
        "Cause",
        "ViewStore",
        "InMemoryViewStore",
        "TCPStoreViewStore",
        "EtcdViewStore",
        "open_view_store",
        "RankFenced",
        "StoreUnavailable",
    ),
    "elasticep.errors": (
        "ElasticEPError",
        "InvalidArgument",
        "NotStarted",
        "Closed",
        "WaitTimeout",
        "EventTooLarge",
        "UnsupportedEngineVersion",
    ),
    "elasticep.eplb": (
        "Placement",
        "Plan",
        "Move",
        "RedundancyExhausted",
        "initial",
        "replan",
        "balance",
        "moved_slots",
        "lower_bound",
    ),
    "elasticep.kernel": ("EPBuffer", "DispatchHandle", "KernelMaskSource", "KernelTimeout", "KernelWait",
                         "KernelWaitWatch", "segment_name", "unlink_segment"),
    "elasticep.groups": ("GlooGroups", "NcclGroups", "MooncakeGroups", "HealthyGroup", "GroupError"),
    "elasticep.transfer": (
        "TransferExecutor",
        "MooncakeTransport",
        "HostBackup",
        "BackupStore",
        "BackupPlan",
        "BackupOverBudget",
        "plan_backups",
        "DiskSource",
        "ExpertLayout",
        "SourcesExhausted",
        "StagedExperts",
        "TransferReport",
    ),
    "elasticep.reconfig": (
        "ReconfigPipeline",
        "EpochFence",
        "StaleEpoch",
        "StoreBarrier",
        "Superseded",
        "CommitTimeout",
    ),
    "elasticep.engine": (
        "Launcher",
        "RankModel",
        "LocalEP",
        "KernelEP",
        "Oracle",
        "make_tiny_model",
        "EPRankServer",
        "ClusterRecorder",
        "Workload",
        "run_demo",
    ),
    "elasticep.engine.demo": ("DemoOptionError", "ScheduledFault", "load_schedule"),
    "elasticep.engine.timeline": ("Timeline",),
    "elasticep.testing": ("FaultInjector", "EtcdCluster"),
    "elasticep.testing.hosts": ("HostNet", "HostCluster"),
}

_WHERE: dict[str, str] = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["__version__", *sorted(_WHERE)]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'elasticep' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
