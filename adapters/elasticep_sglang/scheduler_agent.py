"""The agent of one SGLang scheduler process, started from the plugin with no user code.

SGLang loads its general plugins first thing in every process (``load_plugins()`` in
``run_scheduler_process``, the tokenizer, the detokenizer, the launcher). The plugin installs a
:class:`~elasticep_sglang.hooks.StepBoundary` over ``maybe_rebalance_after_rank_fault``, which
only a scheduler's model runner calls, after each forward pass when elastic EP is on. At its
first call, when SGLang's ``ElasticEPState``, its global ``ExpertLocationMetadata`` and
``torch.distributed`` are up, :class:`SchedulerAgent` starts an :class:`elasticep.Agent` with
:class:`~elasticep_sglang.agent_hooks.SGLangEngineHooks`; from then on every call is the
agent's step boundary:

1. the kernel's marks: members that Mooncake EP cleared in ``active_ranks`` since the last
   commit go to :meth:`Agent.peers_lost` (published as ``PeerTimeout``; it waits, bounded, for
   the verdict);
2. :meth:`Agent.boundary`: a pending view is planned, committed through the hooks (experts,
   metadata, active ranks) and the scheduler goes on;
3. the return value tells SGLang's model runner to run the forward pass again (a view was
   committed, or the step lost peers and its output may lack their experts).

Settings, read from the environment (the launch wrapper sets them; each can be set by hand):

==============================  ============================================================
variable                        meaning (default)
==============================  ============================================================
``ELASTICEP_SGLANG_AGENT``      ``1`` starts the agent in every scheduler (the wrapper's default)
``ELASTICEP_SGLANG_STORE``      ``HOST:PORT`` of a ``TCPStore`` that outlives the ranks (the
                                wrapper hosts one on a single node); unset: the store behind
                                SGLang's own ``torch.distributed`` init address
``ELASTICEP_SGLANG_CLUSTER``    key prefix in the store (``sglang``)
``ELASTICEP_SGLANG_HOST``       address this rank's bus and transfer engine bind
                                (``127.0.0.1``, or this host's address with ``--nnodes > 1``)
``ELASTICEP_SGLANG_PROFILE``    ``local`` or ``cluster``: the :class:`~elasticep.Config` profile
                                (``local`` on one node, ``cluster`` otherwise)
``ELASTICEP_SGLANG_HOOK_TIMEOUT_S``  bound on each hook call, seconds (``60``: a commit moves
                                experts)
``ELASTICEP_SGLANG_START_TIMEOUT_S``  bound on the agent's start, seconds (``120``)
``ELASTICEP_BUS_KEYS``          the cluster's CURVE keys (the wrapper generates them on one node)
``ELASTICEP_<FIELD>``           any :class:`~elasticep.Config` field
==============================  ============================================================
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from typing import Any, Mapping

from elasticep import metrics
from elasticep.errors import ElasticEPError
from elasticep_sglang.hooks import ENV_AGENT

__all__ = [
    "ENV_AGENT",
    "ENV_CLUSTER",
    "ENV_HOOK_TIMEOUT",
    "ENV_HOST",
    "ENV_PROFILE",
    "ENV_STORE",
    "AgentSettingsError",
    "SchedulerAgent",
    "ServingStopped",
    "distributed_store_address",
]

log = logging.getLogger(__name__)

ENV_STORE = "ELASTICEP_SGLANG_STORE"
ENV_CLUSTER = "ELASTICEP_SGLANG_CLUSTER"
ENV_HOST = "ELASTICEP_SGLANG_HOST"
ENV_PROFILE = "ELASTICEP_SGLANG_PROFILE"
ENV_HOOK_TIMEOUT = "ELASTICEP_SGLANG_HOOK_TIMEOUT_S"


class AgentSettingsError(ElasticEPError, ValueError):
    """The scheduler's agent cannot be configured (no store, no keys, a malformed setting);
    counted in ``elasticep_agent_errors_total{kind="sglang_settings"}``."""


class ServingStopped(ElasticEPError, RuntimeError):
    """Redundancy is exhausted: no live rank holds some expert; SGLang must not serve a step
    that would route tokens nowhere. Raised from the step boundary until a covering view."""


def distributed_store_address() -> str | None:
    """``HOST:PORT`` of the ``TCPStore`` behind ``torch.distributed``'s default group (what
    SGLang's ``tcp://`` init address created), or None."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    from torch.distributed import TCPStore, distributed_c10d

    try:
        store = distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None
    while not isinstance(store, TCPStore) and hasattr(store, "underlying_store"):
        store = store.underlying_store
    if not isinstance(store, TCPStore):
        return None
    return f"{store.host}:{store.port}"


def _settings_error(message: str) -> AgentSettingsError:
    metrics.AGENT_ERRORS.labels("sglang_settings").inc()
    return AgentSettingsError(message)


class SchedulerAgent:
    """One scheduler process's agent, started at its first step boundary (module docs).

    Args:
        environ: where the settings are read (default ``os.environ``).

    Attributes:
        agent: the :class:`elasticep.Agent` once started, else None.
        hooks: its :class:`~elasticep_sglang.agent_hooks.SGLangEngineHooks`.
        steps: step boundaries seen.
        lost_reports: steps at which the kernel had marked members.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        self.agent: Any = None
        self.hooks: Any = None
        self.steps = 0
        self.lost_reports = 0
        self.start_error: BaseException | None = None
        """Why the agent did not start; every later step raises it again (no step is served
        without the fault tolerance the launch asked for, and no second start is tried)."""

    # ------------------------------------------------------------------ settings

    def _float(self, name: str, default: float) -> float:
        raw = self.environ.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise _settings_error(f"{name}={raw!r} is not a number") from None
        if value <= 0:
            raise _settings_error(f"{name}={raw!r} must be > 0")
        return value

    def store_address(self) -> str:
        """The store: :data:`ENV_STORE`, else the one behind SGLang's ``torch.distributed``."""
        from elasticep.agent import parse_store_address

        given = self.environ.get(ENV_STORE)
        address = given or distributed_store_address()
        if address is None:
            raise _settings_error(f"no store for the agent: set {ENV_STORE}=HOST:PORT (python -m "
                                  "elasticep_sglang.launch_server hosts one) or start SGLang's torch.distributed "
                                  "with a tcp:// init address")
        try:
            parse_store_address(address)
        except ValueError as exc:
            raise _settings_error(f"{ENV_STORE}: {exc}") from None
        return address

    def _config(self, nnodes: int) -> Any:
        from elasticep.config import Config

        profile = self.environ.get(ENV_PROFILE, "local" if nnodes <= 1 else "cluster")
        if profile not in ("local", "cluster"):
            raise _settings_error(f"{ENV_PROFILE}={profile!r}: use local or cluster")
        return Config.local() if profile == "local" else Config.cluster()

    # ------------------------------------------------------------------ start, once

    def start(self, eplb_manager: Any) -> Any:
        """Start the agent in this scheduler (called by :meth:`step` the first time)."""
        import torch.distributed as dist
        from sglang.srt.runtime_context import get_exec, get_parallel

        from elasticep.agent import Agent
        from elasticep.bus import ClusterKeys
        from elasticep_sglang.agent_hooks import SGLangEngineHooks

        if not dist.is_initialized():
            raise _settings_error("torch.distributed is not initialized: the agent starts at the model runner's "
                                  "first step boundary, after SGLang's init_distributed_environment")
        rank = dist.get_rank()
        hooks = SGLangEngineHooks(rank, eplb_manager=eplb_manager)
        _, metadata = hooks._require()
        nnodes = max(int(getattr(get_parallel(), "nnodes", 1) or 1), 1)
        try:
            keys = ClusterKeys.from_env(self.environ)
        except (KeyError, ValueError) as exc:
            raise _settings_error(f"the agent's bus keys: {exc} (the launch wrapper generates them on one node; "
                                  "with several nodes give every node the same ELASTICEP_BUS_KEYS)") from None
        joiner = bool(getattr(get_exec().moe, "is_ep_joiner", False))
        members = None if joiner else range(int(metadata.ep_size))
        host = self.environ.get(ENV_HOST)
        if host is None:
            host = "127.0.0.1"
            if nnodes > 1:
                from sglang.srt.utils.network import get_local_ip_auto

                host = get_local_ip_auto()
        agent = Agent(
            rank, hooks,
            store=self.store_address(),
            cluster=self.environ.get(ENV_CLUSTER, "sglang"),
            members=members,
            config=self._config(nnodes),
            keys=keys,
            incarnation=time.time_ns() // 1_000_000 if joiner else 0,
            groups=None,  # SGLang's collectives skip dead peers through the active-ranks mask itself
            hook_timeout_s=self._float(ENV_HOOK_TIMEOUT, 60.0),
            commit_timeout_s=30.0,
            transfer_host=host,
            bus_endpoint=f"tcp://{host}:*",
        )
        self.hooks = hooks
        agent.start(timeout=self._float("ELASTICEP_SGLANG_START_TIMEOUT_S", 120.0))
        self.agent = agent
        atexit.register(agent.stop)
        log.info("elasticep agent up in SGLang scheduler rank %d (members %s, store %s)", rank,
                 list(members) if members is not None else "joining", agent.store_address)
        return agent

    # ------------------------------------------------------------------ every step

    def _lost_members(self) -> list[int]:
        """Members of the served epoch that the kernel cleared in ``active_ranks`` (SGLang's own
        cheap comparison with the last snapshot first)."""
        state = self.hooks._state()
        if state is None or state.is_active_equal_last():
            return []
        mask = state.active_ranks.detach().cpu()
        return [r for r in self.agent.members if r != self.agent.rank and r < mask.numel() and int(mask[r]) == 0]

    def _restore(self, ranks: list[int]) -> None:
        """No view without ``ranks`` came: the view stands, so the mask goes back to it (the
        kernel marks them again if they are really gone, and the evidence adds up)."""
        state = self.hooks._state()
        state.active_ranks[ranks] = 1
        state.snapshot_active_to_last()
        state.sync_active_to_cpu()

    def step(self, eplb_manager: Any) -> bool:
        """The agent's step boundary in place of ``maybe_rebalance_after_rank_fault``: True when
        SGLang must run the forward pass again."""
        from elasticep.agent import STOPPED, ViewTimeout

        self.steps += 1
        if self.start_error is not None:
            raise self.start_error
        if self.agent is None:
            try:
                self.start(eplb_manager)
            except BaseException as exc:
                self.start_error = exc
                raise
        self.hooks.eplb_manager = eplb_manager
        before = len(self.hooks.applied)
        lost = self._lost_members()
        if lost:
            self.lost_reports += 1
            try:
                self.agent.peers_lost(lost)
            except ViewTimeout as exc:
                log.warning("rank %d: %s; the view stands", self.agent.rank, exc)
                self._restore(lost)
        if self.agent.boundary() == STOPPED:
            raise ServingStopped(f"rank {self.agent.rank}: {self.agent.exhausted}")
        return len(self.hooks.applied) > before or bool(lost)

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
