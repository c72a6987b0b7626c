"""elasticep inside SGLang: agreed views, kernel-mask detection and a planner that moves only
what a failure requires, installed into an unmodified SGLang (``>=0.5.23,<0.6``).

* :mod:`~elasticep_sglang.convert`: ``Placement`` <-> ``ExpertLocationMetadata`` through SGLang's
  own helpers.
* :mod:`~elasticep_sglang.rebalance`: :class:`ElasticRebalance`, elasticep's planner behind
  SGLang's ``rebalance_experts`` whenever a rank is dead.
* :mod:`~elasticep_sglang.active_ranks`: :class:`ActiveRanksFeed`, each view written into
  SGLang's active-ranks state once.
* :mod:`~elasticep_sglang.detect`: Mooncake EP's ``active_ranks`` mask as a detection source.
* :mod:`~elasticep_sglang.agent_hooks`: :class:`SGLangEngineHooks`, SGLang's side of
  :class:`elasticep.Agent` (placement, commit, kernel mask);
* :mod:`~elasticep_sglang.scheduler_agent`: :class:`SchedulerAgent`, the agent started in every
  scheduler at its first step boundary;
* :mod:`~elasticep_sglang.hooks` and ``python -m elasticep_sglang.launch_server``: activation.

Importing this package does not import SGLang; the functions that need it import it on use and
check its version first.
"""

from elasticep_sglang.active_ranks import ActiveRanksFeed, ElasticEPDisabled
from elasticep_sglang.agent_hooks import NoWeightPath, PlacementMismatch, SGLangEngineHooks, plan_expert_update
from elasticep_sglang.compat import (
    SUPPORTED_SGLANG,
    SGLangNotInstalled,
    UnsupportedSGLangVersion,
    check_sglang_version,
)
from elasticep_sglang.convert import (
    from_expert_location_metadata,
    logical_to_all_physical_map,
    physical_to_logical_map,
    placement_of,
    to_expert_location_metadata,
)
from elasticep_sglang.detect import MOONCAKE_EP_TIMEOUT_US, SGLangActiveRanks, mooncake_mask_source
from elasticep_sglang.hooks import (
    InstalledHooks,
    StepBoundary,
    install_from_env,
    install_hooks,
    installed_hooks,
    uninstall_hooks,
)
from elasticep_sglang.rebalance import ElasticRebalance, RebalanceRecord, changed_live_slots
from elasticep_sglang.scheduler_agent import AgentSettingsError, SchedulerAgent, ServingStopped

__all__ = [
    "MOONCAKE_EP_TIMEOUT_US",
    "SUPPORTED_SGLANG",
    "ActiveRanksFeed",
    "AgentSettingsError",
    "ElasticEPDisabled",
    "ElasticRebalance",
    "InstalledHooks",
    "NoWeightPath",
    "PlacementMismatch",
    "RebalanceRecord",
    "SGLangActiveRanks",
    "SGLangEngineHooks",
    "SGLangNotInstalled",
    "SchedulerAgent",
    "ServingStopped",
    "StepBoundary",
    "UnsupportedSGLangVersion",
    "changed_live_slots",
    "check_sglang_version",
    "from_expert_location_metadata",
    "install_from_env",
    "install_hooks",
    "installed_hooks",
    "logical_to_all_physical_map",
    "mooncake_mask_source",
    "physical_to_logical_map",
    "plan_expert_update",
    "placement_of",
    "to_expert_location_metadata",
    "uninstall_hooks",
]
