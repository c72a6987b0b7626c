"""The reference engine: a tiny DeepSeek-V3 served by rank processes with expert parallelism.

See ``docs/engine.md``. Heavy dependencies (transformers) are imported only when a model is built
or loaded, so importing this package is cheap.
"""

from elasticep.engine.demo import ClusterRecorder, Workload, run_demo
from elasticep.engine.ep import DeadSlotRouted, Dispatched, ExpertParallel, KernelEP, LocalEP, PeersLost
from elasticep.engine.ep_rank import EPRankServer
from elasticep.engine.launcher import Launcher, LauncherError, RankInfo, RankNotRunning, prewarm
from elasticep.engine.model import (
    TINY_DEFAULTS,
    DecodeState,
    EPExperts,
    ExpertCheckpoint,
    PlacementMismatch,
    RankModel,
    SlotNotLoaded,
    load_config,
    make_tiny_model,
    moe_layer_ids,
    round_robin_placement,
    tiny_config,
)
from elasticep.engine.oracle import Oracle
from elasticep.engine.protocol import FaultPlan, RankSpec
from elasticep.engine.router import PeerInfo, RequestRejected, RequestResult, Router, RouterClosed
from elasticep.engine.zygote import Zygote, ZygoteError

__all__ = [
    "TINY_DEFAULTS",
    "ClusterRecorder",
    "EPRankServer",
    "Workload",
    "run_demo",
    "DeadSlotRouted",
    "DecodeState",
    "Dispatched",
    "EPExperts",
    "ExpertCheckpoint",
    "ExpertParallel",
    "FaultPlan",
    "KernelEP",
    "Launcher",
    "LauncherError",
    "LocalEP",
    "Oracle",
    "PeerInfo",
    "PeersLost",
    "PlacementMismatch",
    "RankInfo",
    "RankModel",
    "RankNotRunning",
    "RankSpec",
    "RequestRejected",
    "RequestResult",
    "Router",
    "RouterClosed",
    "SlotNotLoaded",
    "Zygote",
    "ZygoteError",
    "load_config",
    "make_tiny_model",
    "moe_layer_ids",
    "prewarm",
    "round_robin_placement",
    "tiny_config",
]
