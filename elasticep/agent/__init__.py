"""The engine-neutral agent: one object per rank that attaches elasticep to any engine.

* :class:`Agent`: bus, detection, membership, reconfiguration and weight movement for one rank,
  on an event loop of its own thread, started with :meth:`Agent.start` and stopped with
  :meth:`Agent.stop`;
* :class:`EngineHooks`: what the engine provides (placement, commit, optionally its expert
  layout, kernel mask, collectives and admission), each hook with a contract and a timeout;
* :class:`Commit` / :class:`StagedSlot`: what a view changes on this rank, handed to the
  engine's commit hook at its step boundary.
"""

from elasticep.agent.agent import SERVING, STOPPED, Agent, Signal, connect_store, parse_store_address, placement_key, plan_key
from elasticep.agent.errors import AgentError, AgentFenced, AgentStateError, AgentStopped, HookFailed, HookTimeout, ViewTimeout
from elasticep.agent.hooks import Commit, EngineHooks, StagedSlot

__all__ = [
    "SERVING",
    "STOPPED",
    "Agent",
    "AgentError",
    "AgentFenced",
    "AgentStateError",
    "AgentStopped",
    "Commit",
    "EngineHooks",
    "HookFailed",
    "HookTimeout",
    "ViewTimeout",
    "Signal",
    "StagedSlot",
    "connect_store",
    "parse_store_address",
    "placement_key",
    "plan_key",
]
