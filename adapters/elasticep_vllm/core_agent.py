"""The elasticep agent of one vLLM engine-core process (one DP/EP rank).

With :data:`ENV_AGENT` set to ``1`` (:func:`~elasticep_vllm.serve.start_engine` does it, and
hosts the store), every engine core starts an :class:`elasticep.Agent` at the first turn of its
busy loop, when its worker's model is loaded: rank = vLLM's DP rank, members = every DP rank,
:class:`VllmAgentHooks` over the worker's fused-MoE layers. From then on elasticep's membership
(heartbeats and socket disconnects over the CURVE-authenticated bus, views committed in the
store) decides who serves, and the agent's pipeline (the leader's plan from the placement in
force, the commit barrier) changes the placement:

- every busy-loop turn, before the engine step, calls :meth:`CoreAgent.boundary`: a view
  installed since the last turn is planned and committed through the hooks before the step
  runs (an idle survivor never runs a step against the dead rank);
- a step that fails (a collective whose peer died) ends in vLLM's engine-core sentinel, which
  aborts the core's requests; :meth:`CoreAgent.recover` then waits, bounded by the agent's
  ``view_wait_s``, for the view without the lost rank, commits it, and the busy loop resumes
  with no instruction from the front end. No view: the core stays faulted (vLLM's own recovery
  timeout then ends it).

Settings, read from the environment (``start_engine`` sets the first three):

============================  ===============================================================
variable                      meaning (default)
============================  ===============================================================
``ELASTICEP_VLLM_AGENT``      ``1``: start the agent in every engine core
``ELASTICEP_VLLM_STORE``      ``HOST:PORT`` of a ``TCPStore`` that outlives the engine cores
``ELASTICEP_BUS_KEYS``        the cluster's CURVE keys (JSON of :class:`~elasticep.bus.ClusterKeys`)
``ELASTICEP_VLLM_CLUSTER``    key prefix in the store (``vllm``)
``ELASTICEP_VLLM_PROFILE``    ``auto``, ``local`` or ``cluster``: the :class:`~elasticep.Config`
                              profile (``auto``: ``cluster`` when the DP ranks span more than
                              one node, ``data_parallel_size / data_parallel_size_local``)
``ELASTICEP_VLLM_HOST``       address this rank's bus binds (``127.0.0.1``)
``ELASTICEP_<FIELD>``         any :class:`~elasticep.Config` field
============================  ===============================================================

After a view change the collectives no longer run over vLLM's groups: each view with two or
more members gets elasticep's gloo groups over them (one in the engine core for its step loop's
DP all-reduce, one in the worker for the MoE gather/scatter and the DP padding all-reduce); a
rank alone waits for no peer. So any number of survivors keeps serving, and a rank that rejoins
(:mod:`elasticep_vllm.rejoin`) meets the others in the admitting view's groups.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from typing import Any, Mapping

from elasticep import metrics
from elasticep.agent.hooks import Commit, EngineHooks
from elasticep.errors import ElasticEPError

__all__ = [
    "ENV_AGENT",
    "ENV_CLUSTER",
    "ENV_HOST",
    "ENV_INCARNATION",
    "ENV_JOINING",
    "ENV_PROFILE",
    "ENV_STORE",
    "AgentSettingsError",
    "CoreAgent",
    "VllmAgentHooks",
    "agent_enabled",
    "config_for",
    "joining",
    "nodes_of",
    "core_agent",
    "view_groups",
]

log = logging.getLogger(__name__)

ENV_AGENT = "ELASTICEP_VLLM_AGENT"
ENV_STORE = "ELASTICEP_VLLM_STORE"
ENV_CLUSTER = "ELASTICEP_VLLM_CLUSTER"
ENV_PROFILE = "ELASTICEP_VLLM_PROFILE"
ENV_HOST = "ELASTICEP_VLLM_HOST"
ENV_JOINING = "ELASTICEP_VLLM_JOINING"
"""``1`` in an engine core started to take a dead DP rank's place (:mod:`elasticep_vllm.rejoin`
sets it): its agent asks to be admitted, and until the admitting view is committed it serves
nothing and meets no peer in a collective."""
ENV_INCARNATION = "ELASTICEP_VLLM_INCARNATION"
"""The bus incarnation of a rejoining engine core (a restarted rank must use a new one)."""


class AgentSettingsError(ElasticEPError, ValueError):
    """The engine core's agent cannot be configured (no store, no keys, a malformed setting);
    counted in ``elasticep_agent_errors_total{kind="vllm_settings"}``."""


def agent_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether :data:`ENV_AGENT` is ``1``."""
    return (os.environ if environ is None else environ).get(ENV_AGENT) == "1"


def joining(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this engine core (or its worker) was started to rejoin (:data:`ENV_JOINING`)."""
    return (os.environ if environ is None else environ).get(ENV_JOINING) == "1"


def view_groups(rank: int, part: str) -> Any:
    """A :class:`~elasticep.groups.GlooGroups` builder for this DP rank's side ``part``
    (``"core"``: the engine core; ``"worker"``: its worker) in the store of :data:`ENV_STORE`,
    under ``elasticep/<cluster>/groups/<part>/<epoch>/``."""
    from elasticep.agent import connect_store
    from elasticep.groups import GlooGroups

    cluster = os.environ.get(ENV_CLUSTER, "vllm")
    return GlooGroups(connect_store(os.environ[ENV_STORE]), rank, op_timeout_s=30.0, rendezvous_timeout_s=20.0,
                      prefix=f"elasticep/{cluster}/groups/{part}")


def _settings_error(message: str) -> AgentSettingsError:
    metrics.AGENT_ERRORS.labels("vllm_settings").inc()
    return AgentSettingsError(message)


class VllmAgentHooks(EngineHooks):
    """The agent's hooks in one engine core. The model lives in the core's worker process
    (vLLM's ``MultiprocExecutor``), so the hooks reach it with vLLM's ``collective_rpc``: the
    placement it serves (``elasticep_placement``), the groups phase of each view
    (``elasticep_regroup``: a gloo group over the view's members in the worker) and each commit
    (``elasticep_apply``: :class:`~elasticep_vllm.hooks.VllmHooks` in the worker, and the MoE
    gather/scatter and the DP padding all-reduce routed over the ranks that serve). The engine
    core's own side is set here: its step loop's DP all-reduce runs over a gloo group of the
    view's members (or waits for no peer when this rank serves alone), and every member steps
    from the commit on, in lockstep, until that all-reduce agrees that nothing is left."""

    def __init__(self, engine: Any) -> None:
        from elasticep.eplb.placement import Placement

        self.engine = engine
        (info,) = engine.model_executor.collective_rpc("elasticep_placement")
        self.rank = int(info["rank"])
        self.num_ranks = int(engine.vllm_config.parallel_config.data_parallel_size)
        self._placement = Placement.from_dict(info["placement"])
        self._groups: Any = None
        self._pending: Any = None
        self.commits: list[dict[str, Any]] = []
        """One record per commit: epoch, ranks serving, ms."""

    def placement(self):
        return self._placement

    def on_view(self, view: Any) -> None:
        # an idle busy loop waits on its input queue: wake it so that it commits the view now
        # (recovery's _handle_client_request runs the boundary on this wake-up)
        from vllm.v1.engine import EngineCoreRequestType

        queue = getattr(self.engine, "input_queue", None)
        if queue is not None:
            queue.put_nowait((EngineCoreRequestType.WAKEUP, None))

    def rebuild_collectives(self, view: Any) -> Any:
        members = sorted(int(m) for m in view.members)
        self._pending = None
        if len(members) < 2:
            return None
        self.engine.model_executor.collective_rpc("elasticep_regroup", args=(int(view.epoch), members))
        if self._groups is None:
            self._groups = view_groups(self.rank, "core")
        self._pending = self._groups.rebuild(view)
        return self._pending

    def commit(self, change: Commit) -> None:
        import torch

        from elasticep.eplb.placement import Placement

        t0 = time.monotonic()
        serving = [r for r, a in enumerate(change.alive) if a]
        alone = serving == [self.rank]
        group = self._pending if self._pending is not None and list(self._pending.members) == serving else None
        if not alone and group is None:
            raise _settings_error(f"view {change.epoch}: no group over the ranks that serve ({serving})")
        (info,) = self.engine.model_executor.collective_rpc(
            "elasticep_apply", args=(change.epoch, change.placement.phy2log.tolist(), list(change.alive)))
        self._placement = Placement.from_dict(info["placement"])
        engine = self.engine
        engine._elasticep_solo = alone
        if hasattr(engine, "step_counter"):
            engine.step_counter = 0
        if hasattr(engine, "last_counts"):
            # the DP coordinator's request counts for this rank may be a dead predecessor's:
            # the next busy-loop turn publishes this rank's own (the front end routes by them)
            engine.last_counts = None
        if group is not None:
            # the step loop's DP all-reduce over the ranks that serve; all of them step from now
            # until it agrees nothing is left (an idle one runs dummy batches), in the same wave
            engine.dp_group = group.process_group()
            wave = torch.tensor([int(getattr(engine, "current_wave", 0))], dtype=torch.int64)
            group.all_reduce(wave, "max")
            engine.current_wave = int(wave.item())
            engine.engines_running = True
        ms = round((time.monotonic() - t0) * 1000, 1)
        self.commits.append({"epoch": change.epoch, "serving": serving, "ms": ms})
        log.warning("elasticep: DP rank %d committed epoch %d (ranks serving: %s) in %.1f ms", self.rank,
                    change.epoch, serving, ms)


def nodes_of(data_parallel_size: int, data_parallel_size_local: int) -> int:
    """The nodes vLLM's DP ranks span: ``data_parallel_size`` over the ranks per node (one
    node when vLLM does not say)."""
    if data_parallel_size_local <= 0:
        return 1
    return max(1, -(-data_parallel_size // data_parallel_size_local))


def config_for(environ: Mapping[str, str], data_parallel_size: int, data_parallel_size_local: int) -> Any:
    """The agent's :class:`~elasticep.Config`: ``ELASTICEP_VLLM_PROFILE`` (default ``auto``:
    ``local`` on one node, ``cluster`` across nodes, where lost packets hold a stream up for a
    retransmission timeout), then any ``ELASTICEP_<FIELD>``."""
    from elasticep.config import PROFILES, Config

    profile = environ.get(ENV_PROFILE, "auto")
    if profile not in PROFILES:
        raise _settings_error(f"{ENV_PROFILE}={profile!r}: use one of {', '.join(PROFILES)}")
    return Config.named(profile, hosts=nodes_of(data_parallel_size, data_parallel_size_local))


class CoreAgent:
    """The agent of one engine core, started at the busy loop's first turn."""

    def __init__(self, engine: Any, environ: Mapping[str, str] | None = None) -> None:
        self.engine = engine
        self.environ = dict(os.environ if environ is None else environ)
        self.agent: Any = None
        self.hooks: VllmAgentHooks | None = None
        self.recoveries: list[dict[str, Any]] = []

    def _config(self) -> Any:
        pc = self.engine.vllm_config.parallel_config
        return config_for(self.environ, int(pc.data_parallel_size), int(getattr(pc, "data_parallel_size_local", 0) or 0))

    def start(self) -> Any:
        from elasticep.agent import Agent, parse_store_address
        from elasticep.bus import ClusterKeys

        store = self.environ.get(ENV_STORE)
        if not store:
            raise _settings_error(f"{ENV_STORE} is not set: the engine cores' agents need a store that outlives "
                                  "them (elasticep_vllm.serve.start_engine hosts one)")
        try:
            parse_store_address(store)
        except ValueError as exc:
            raise _settings_error(f"{ENV_STORE}: {exc}") from None
        try:
            keys = ClusterKeys.from_env(self.environ)
        except (KeyError, ValueError) as exc:
            raise _settings_error(f"the agent's bus keys: {exc}") from None
        pc = self.engine.vllm_config.parallel_config
        rank, ranks = int(pc.data_parallel_rank), int(pc.data_parallel_size)
        try:
            hooks = VllmAgentHooks(self.engine)
        except Exception as exc:
            raise _settings_error(f"the worker has no elasticep extension ({exc}): start the engine with "
                                  "worker_extension_cls='elasticep_vllm.worker.ElasticEPWorker'") from None
        if hooks.rank != rank:
            raise _settings_error(f"EP rank {hooks.rank} is not DP rank {rank}: elasticep serves vLLM with one EP "
                                  "rank per DP rank")
        self.hooks = hooks
        host = self.environ.get(ENV_HOST, "127.0.0.1")
        join = joining(self.environ)
        try:
            incarnation = int(self.environ.get(ENV_INCARNATION, "0"))
        except ValueError:
            raise _settings_error(f"{ENV_INCARNATION}={self.environ[ENV_INCARNATION]!r} is not an integer") from None
        agent = Agent(rank, self.hooks, store=store, cluster=self.environ.get(ENV_CLUSTER, "vllm"),
                      members=None if join else range(ranks), incarnation=incarnation, config=self._config(),
                      keys=keys, groups=None,
                      hook_timeout_s=60.0, commit_timeout_s=30.0, transfer_host=host,
                      bus_endpoint=f"tcp://{host}:*")
        self.agent = agent
        agent.start(timeout=120.0)
        atexit.register(agent.stop)
        log.warning("elasticep: agent up in engine core DP %d (members %s, store %s)", rank, list(range(ranks)),
                    store)
        return agent

    def boundary(self) -> None:
        """The step boundary: commit any installed view before the engine steps."""
        if self.agent is not None:
            self.agent.boundary()

    def recover(self, exc: BaseException) -> bool:
        """After a failed step (the sentinel aborted the core's requests): True once a newer view
        is committed, False if none came within the agent's ``view_wait_s``."""
        agent = self.agent
        if agent is None:
            return False
        t0 = time.monotonic()
        record: dict[str, Any] = {"fault": f"{type(exc).__name__}", "epoch_before": agent.epoch}
        ok = agent.wait_newer_view()
        record["view_ms"] = round((time.monotonic() - t0) * 1000, 1)
        if not ok:
            metrics.AGENT_ERRORS.labels("view_timeout").inc()
            record["outcome"] = "no view"
            self.recoveries.append(record)
            log.error("elasticep: DP rank %d: the step failed (%r) and no new view came within %.1f s", agent.rank,
                      exc, agent.view_wait_s)
            return False
        agent.boundary()
        record.update(outcome="committed", epoch=agent.epoch, members=list(agent.members),
                      serving_ms=round((time.monotonic() - t0) * 1000, 1))
        self.recoveries.append(record)
        return True


_CORE: CoreAgent | None = None


def core_agent(engine: Any | None = None) -> CoreAgent | None:
    """This process's :class:`CoreAgent`; with ``engine``, created and started on first use."""
    global _CORE
    if _CORE is None and engine is not None:
        core = CoreAgent(engine)
        core.start()
        _CORE = core
    return _CORE
