"""Keep a vLLM DP + EP server serving when one of its engine-core processes dies.

Installed in every vLLM process by the ``elasticep`` plugin (:func:`install`); it acts only where
:data:`ENV_RECOVER` is ``1`` (inherited by the engine cores) and with the worker extension
``elasticep_vllm.worker.ElasticEPWorker`` (:func:`~elasticep_vllm.serve.engine_args` with
``elasticep=True`` and :func:`~elasticep_vllm.serve.start_engine`). What happens when an engine core dies (vLLM alone shuts the whole front end
down, see ``docs/vllm.md``):

front end
    vLLM's liveness monitor (``CoreEngineProcManager.monitor_engine_liveness``) goes on watching
    the other engine cores instead of returning (which shut the client down); the dead DP rank is
    taken out of request routing (``DPLBAsyncMPClient.get_core_engine_for_request``) and the
    requests that were on it are aborted (their streams end; the caller retries them).
every engine core
    runs an :class:`elasticep.Agent` (:mod:`elasticep_vllm.core_agent`, started at its busy
    loop's first turn; :func:`~elasticep_vllm.serve.start_engine` hosts the store and generates
    the bus keys). Its membership sees the dead core go (its sockets close, its heartbeats
    stop) and commits a view without it; the survivor's busy loop commits that view at its next
    turn (:meth:`~elasticep_vllm.core_agent.CoreAgent.boundary`) or, when its step failed first
    (gloo: the peer closed its connection), right after vLLM's engine-core fault tolerance
    (``EngineCoreSentinel.on_fault``) aborted its requests
    (:meth:`~elasticep_vllm.core_agent.CoreAgent.recover`). The leader's plan is elasticep's
    planner from the placement in force (the dead rank's experts into the survivor's empty
    slots); :class:`~elasticep_vllm.core_agent.VllmAgentHooks` commits it (experts read from the
    checkpoint) and, for a lone survivor, makes the MoE gather/scatter, the DP padding
    all-reduce (``dp_utils._run_ar``) and the step loop's DP all-reduce
    (``DPEngineCoreProc._has_global_unfinished_reqs``) wait for no peer; with several
    survivors they run over elasticep's gloo groups of the view's members instead. The busy
    loop resumes by itself: the front end sends no instruction. The dead rank can be brought
    back with :func:`elasticep_vllm.rejoin.rejoin`.

Limits (stated, not hidden): no server with more than one survivor has been run here (2 cores).
A hung (not dead) core holds the survivor's step inside gloo until gloo's own timeout (vLLM's
groups, before any view change): the view comes in about 250 ms but the step cannot be
interrupted. Each
recovery is recorded in ``client._elasticep_recoveries`` (``{"dead", "abort_ms", "committed_ms",
"serving_ms"}``, as the front end saw it) and in each engine core's
``CoreAgent.recoveries``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
import weakref
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["ENV_RECOVER", "install", "recovering"]

ENV_RECOVER = "ELASTICEP_VLLM_RECOVER"
"""``1``: recover from a dead engine core (read by the front end and every engine core)."""


def recovering() -> bool:
    """Whether :data:`ENV_RECOVER` is ``1`` in this process."""

    return os.environ.get(ENV_RECOVER) == "1"

_FAULT_WAIT_S = 30.0


def install() -> None:
    """Patch vLLM's front end, engine core and worker classes (idempotent)."""
    _install_front_end()
    _install_engine_core()
    _install_worker()


# ---- front end -----------------------------------------------------------------------------


def _install_front_end() -> None:
    from multiprocessing import connection

    from vllm.v1.engine import core_client
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.utils import CoreEngineProcManager

    if getattr(CoreEngineProcManager.monitor_engine_liveness, "__elasticep__", False):
        return
    original_monitor = CoreEngineProcManager.monitor_engine_liveness

    def monitor_engine_liveness(self) -> None:
        client = getattr(self, "_elasticep_client", None)
        if client is None or client() is None or not _ft_enabled(client()):
            return original_monitor(self)
        sentinel_to_proc = {proc.sentinel: proc for proc in self.processes}
        self._elasticep_added = []
        while sentinel_to_proc and not self.manager_stopped.is_set():
            while self._elasticep_added:  # rejoined engine cores (elasticep_vllm.rejoin)
                proc = self._elasticep_added.pop()
                sentinel_to_proc[proc.sentinel] = proc
            for sentinel in connection.wait(list(sentinel_to_proc), timeout=0.2):
                proc = sentinel_to_proc.pop(sentinel)
                if self.manager_stopped.is_set():
                    continue
                c = client()
                if c is None or not sentinel_to_proc:
                    self.failed_proc_name = proc.name
                    sentinel_to_proc.clear()
                    break
                _on_engine_death(c, proc)
        self.shutdown()

    monitor_engine_liveness.__elasticep__ = True  # type: ignore[attr-defined]
    CoreEngineProcManager.monitor_engine_liveness = monitor_engine_liveness

    original_start = core_client.MPClient.start_engine_core_monitor

    def start_engine_core_monitor(self):
        manager = self.resources.engine_manager
        if manager is not None:
            manager._elasticep_client = weakref.ref(self)
        try:
            self._elasticep_loop = asyncio.get_running_loop()
        except RuntimeError:
            self._elasticep_loop = None
        self._elasticep_dead = set()
        self._elasticep_recoveries = []
        return original_start(self)

    core_client.MPClient.start_engine_core_monitor = start_engine_core_monitor

    original_pick = core_client.DPLBAsyncMPClient.get_core_engine_for_request

    def get_core_engine_for_request(self, request):
        engine = original_pick(self, request)
        dead = getattr(self, "_elasticep_dead", ())
        if dead and self.core_engines.index(engine) in dead:
            live = [e for i, e in enumerate(self.core_engines) if i not in dead]
            if live:
                inflight = getattr(self, "engine_inflight", None)
                if inflight is not None:  # vLLM counted the pick it made; count the one that serves
                    inflight[engine] -= 1
                    inflight[live[0]] += 1
                engine = live[0]
                self.reqs_in_flight[request.request_id] = engine
        return engine

    core_client.DPLBAsyncMPClient.get_core_engine_for_request = get_core_engine_for_request

    original_init = AsyncLLM.__init__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.engine_core._elasticep_llm = weakref.ref(self)

    AsyncLLM.__init__ = __init__


def _ft_enabled(client: Any) -> bool:
    return recovering() and client.vllm_config.parallel_config.data_parallel_size > 1


def _on_engine_death(client: Any, proc: Any) -> None:
    """Monitor thread: a DP engine core died while others live."""
    name = proc.name
    rank = int(name.rsplit("DP", 1)[1]) if "DP" in name else 0
    log.warning("elasticep: engine core %s (DP rank %d) died (exit %s); recovering", name, rank, proc.exitcode)
    loop = getattr(client, "_elasticep_loop", None)
    if loop is None:
        return
    asyncio.run_coroutine_threadsafe(_recover(client, rank, time.monotonic()), loop)


async def _committed_view(client: Any, accept: Any, deadline: float) -> int | None:
    """The first epoch whose view's members ``accept`` (a predicate on the member set) and whose
    placement is committed in the engine cores' store (polled every 5 ms until ``deadline``; the
    scan resumes where the last one ended); None if none. Keeps the placement JSON in
    ``client._elasticep_placement``."""
    from elasticep.agent import connect_store, placement_key
    from elasticep.membership.view import decode_view
    from elasticep_vllm.core_agent import ENV_CLUSTER, ENV_STORE

    store = getattr(client, "_elasticep_store", None)
    if store is None:
        address = os.environ.get(ENV_STORE)
        if not address:
            return None
        store = await asyncio.to_thread(connect_store, address)
        client._elasticep_store = store
    cluster = os.environ.get(ENV_CLUSTER, "vllm")

    def scan(first: int) -> tuple[int | None, int]:
        epoch = first
        while store.check([f"elasticep/{cluster}/view/{epoch}"]):
            view = decode_view(store.get(f"elasticep/{cluster}/view/{epoch}"))
            if accept(set(view.members)) and store.check([placement_key(cluster, epoch)]):
                client._elasticep_placement = store.get(placement_key(cluster, epoch))
                return epoch, epoch
            epoch += 1
        return None, max(first, epoch - 1)

    first = getattr(client, "_elasticep_scanned", 2)
    while time.monotonic() < deadline:
        found, first = await asyncio.to_thread(scan, first)
        if found is not None:
            client._elasticep_scanned = found + 1
            return found
        await asyncio.sleep(0.005)
    return None


def _experts_by_rank(placement_json: Any) -> dict[str, list[int]]:
    """The experts each rank serves in a committed placement (its first MoE layer)."""
    import json

    from elasticep.eplb.placement import Placement

    p = Placement.from_dict(json.loads(placement_json))
    return {str(r): sorted(int(e) for e in p.phy2log[0, list(p.slots_of_rank(r))].tolist() if e >= 0)
            for r in range(p.num_ranks)}


async def _recover(client: Any, dead: int, t0: float) -> None:
    record: dict[str, Any] = {"dead": dead}
    client._elasticep_dead.add(dead)
    dead_engine = client.core_engines[dead]
    cut = [rid for rid, eng in list(getattr(client, "reqs_in_flight", {}).items()) if eng == dead_engine]
    llm_ref = getattr(client, "_elasticep_llm", None)
    llm = llm_ref() if llm_ref is not None else None
    if llm is not None and cut:
        llm.output_processor.abort_requests(cut, internal=True)
        for rid in cut:
            client.reqs_in_flight.pop(rid, None)
    # the cut requests never finish on the dead engine: its in-flight count must not keep
    # weighing on the routing (it is the rank's slot when it comes back)
    inflight = getattr(client, "engine_inflight", None)
    if inflight is not None:
        inflight[dead_engine] = 0
    record["cut_on_dead"] = len(cut)
    record["abort_ms"] = round((time.monotonic() - t0) * 1000, 1)
    survivors = [r for r in range(len(client.core_engines)) if r not in client._elasticep_dead]
    # the survivors' agents commit a view without the dead rank by themselves; serving again is
    # that view's placement in the store and no survivor left faulted
    epoch = await _committed_view(client, lambda members: not (client._elasticep_dead & members),
                                  t0 + _FAULT_WAIT_S)
    if epoch is None:
        log.error("elasticep: no view without DP ranks %s was committed in time", sorted(client._elasticep_dead))
    record["committed_ms"] = round((time.monotonic() - t0) * 1000, 1)
    record["epoch"] = epoch
    if epoch is not None:
        record["experts_by_rank"] = _experts_by_rank(client._elasticep_placement)
    deadline = t0 + _FAULT_WAIT_S
    while any(client._engine_status.get(r, {}).get("status") == "unhealthy" for r in survivors):
        if time.monotonic() > deadline:
            log.error("elasticep: a survivor stayed faulted for %.0f s", _FAULT_WAIT_S)
            break
        await asyncio.sleep(0.005)
    record["serving_ms"] = round((time.monotonic() - t0) * 1000, 1)
    client._elasticep_recoveries.append(record)
    log.warning("elasticep: serving again without DP rank %d: %s", dead, record)


# ---- engine core ---------------------------------------------------------------------------


def _install_engine_core() -> None:
    from vllm.v1.engine.core import DPEngineCoreProc, EngineCoreProc
    from vllm.v1.fault_tolerance.engine_core_sentinel import EngineCoreSentinel
    from vllm.v1.engine import EngineStatusType

    from elasticep.agent import AgentFenced
    from vllm.v1.engine import EngineCoreRequestType

    from elasticep_vllm.core_agent import agent_enabled, joining

    if getattr(EngineCoreSentinel.on_fault, "__elasticep__", False):
        return

    original_on_fault = EngineCoreSentinel.on_fault

    def on_fault(self, exc):
        # vLLM aborts the core's requests and marks it unhealthy; the agent then commits the
        # view that removes the lost peer and the busy loop resumes by itself
        original_on_fault(self, exc)
        core = _core(self.engine)
        if core is None or self.status_type != EngineStatusType.UNHEALTHY:
            return
        try:
            recovered = core.recover(exc)
        except AgentFenced as fenced:
            log.error("elasticep: engine core DP %d is fenced: %s", core.agent.rank, fenced)
            raise SystemExit(1) from fenced
        if recovered:
            self.status_type = EngineStatusType.HEALTHY
            self.fault_info = None
            self.resumed.set()
            self._push_status()

    on_fault.__elasticep__ = True  # type: ignore[attr-defined]
    EngineCoreSentinel.on_fault = on_fault

    original_poll = EngineCoreProc._process_input_queue

    def _process_input_queue(self, *args, **kwargs):
        # vLLM's fault-tolerant busy loop and sentinel in the engine core only (its workers'
        # fault tolerance needs a GPU all-to-all backend): a step that fails then parks the loop,
        # aborts the core's requests and waits for the agent's view (on_fault above). Set here,
        # on the busy loop's first turn: plugins load inside the engine core's __init__.
        if not getattr(self, "_elasticep_ft", False):
            self._elasticep_ft = True
            if recovering() and not getattr(self, "enable_fault_tolerance", False):
                self.enable_fault_tolerance = True
                self.ft_sentinel = EngineCoreSentinel(engine=self, parallel_config=self.vllm_config.parallel_config)
            if recovering() and agent_enabled():
                if joining():
                    self._elasticep_solo = True  # no peer until the admitting view is committed
                _start_core(self)
        out = original_poll(self, *args, **kwargs)
        core = _core(self)
        if core is not None:
            try:
                core.boundary()
            except AgentFenced as fenced:
                log.error("elasticep: engine core DP %d is fenced: %s", core.agent.rank, fenced)
                raise SystemExit(1) from fenced
        return out

    EngineCoreProc._process_input_queue = _process_input_queue

    original_handle = EngineCoreProc._handle_client_request

    def _handle_client_request(self, request_type, request):
        # the agent wakes an idle busy loop when a view is installed (VllmAgentHooks.on_view):
        # the view is committed here, on the engine thread, before any further step
        original_handle(self, request_type, request)
        core = _core(self)
        if request_type == EngineCoreRequestType.WAKEUP and core is not None and core.agent.newer_view():
            try:
                core.boundary()
            except AgentFenced as fenced:
                log.error("elasticep: engine core DP %d is fenced: %s", core.agent.rank, fenced)
                raise SystemExit(1) from fenced

    EngineCoreProc._handle_client_request = _handle_client_request

    original = DPEngineCoreProc._has_global_unfinished_reqs

    def _has_global_unfinished_reqs(self, local_unfinished: bool) -> bool:
        if getattr(self, "_elasticep_solo", False):
            return local_unfinished
        return original(self, local_unfinished)

    DPEngineCoreProc._has_global_unfinished_reqs = _has_global_unfinished_reqs


def _core(engine: Any) -> Any:
    """The engine core's agent once started (None before, or where elasticep's agent is off)."""
    return getattr(engine, "_elasticep_core", None)


def _start_core(engine: Any) -> None:
    """Start the engine core's agent (the busy loop's first turn); a failure ends the core."""
    from elasticep_vllm.core_agent import core_agent

    try:
        engine._elasticep_core = core_agent(engine)
    except Exception as exc:
        log.error("elasticep: the agent of engine core DP %s did not start: %r",
                  engine.vllm_config.parallel_config.data_parallel_rank, exc)
        raise SystemExit(1) from exc


# ---- worker --------------------------------------------------------------------------------


def _die_with_engine_core() -> None:
    """In a worker process of an engine core (vLLM names them ``VllmWorker-<rank>``): the
    kernel SIGKILLs it the moment its engine core dies. vLLM's own death pipe only shuts the
    worker's queues down, so a worker in the middle of a step held its gloo peers until the step
    gave up (about a second); a rank is its engine core and its workers, and they go together."""
    import ctypes
    import multiprocessing
    import signal

    if not recovering() or not multiprocessing.current_process().name.startswith("VllmWorker"):
        return
    parent = multiprocessing.parent_process()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
            log.warning("elasticep: prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
            return
    except OSError as exc:
        log.warning("elasticep: no prctl here (%r): the worker outlives a dead engine core briefly", exc)
        return
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)  # the engine core died before the signal was armed


def _install_worker() -> None:
    from vllm.v1.worker import dp_utils

    _die_with_engine_core()
    from elasticep_vllm.core_agent import joining

    if recovering() and joining():
        from elasticep_vllm import collectives

        # a rejoining rank meets no peer (its vLLM groups were met by stand-ins, see
        # elasticep_vllm.rejoin) until the admitting view routes its collectives
        collectives.route(None, solo=True)

    if getattr(dp_utils._run_ar, "__elasticep__", False):
        return
    original = dp_utils._run_ar

    def _run_ar(should_ubatch, orig_num_tokens_per_ubatch, padded_num_tokens_per_ubatch, cudagraph_mode,
                parallel_config):
        from elasticep_vllm.collectives import ROUTE, SOLO, dp_all_reduce

        if not SOLO["on"] and ROUTE["group"] is None:
            return original(should_ubatch, orig_num_tokens_per_ubatch, padded_num_tokens_per_ubatch,
                            cudagraph_mode, parallel_config)
        import torch

        # each rank fills its own column; a rank outside the view stays at zero tokens
        t = torch.zeros(4, parallel_config.data_parallel_size, dtype=torch.int32)
        r = parallel_config.data_parallel_rank
        t[0][r], t[1][r] = orig_num_tokens_per_ubatch, padded_num_tokens_per_ubatch
        t[2][r], t[3][r] = (1 if should_ubatch else 0), cudagraph_mode
        dp_all_reduce(t)
        return t

    _run_ar.__elasticep__ = True  # type: ignore[attr-defined]
    dp_utils._run_ar = _run_ar

