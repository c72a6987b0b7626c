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
survivor's engine core
    its worker's next MoE collective fails (gloo: the peer closed its connection); vLLM's fault
    tolerance (``EngineCoreSentinel.on_fault``) aborts the survivor's requests too and parks the
    busy loop waiting for an instruction. The front end sends ``elasticep_shrink``: the engine
    core stops the DP all-reduce of its step loop (``_has_global_unfinished_reqs``: local only),
    and its worker (:meth:`ElasticEPWorker.elasticep_solo`) serves alone: the MoE gather and
    scatter and the DP padding all-reduce (``dp_utils._run_ar``) stop waiting for the dead rank,
    and :class:`~elasticep_vllm.hooks.VllmHooks` commits elasticep's planner's repair of the
    placement in force (the dead rank's experts read from the checkpoint into the survivor).
    Then the busy loop resumes.

Limits (stated, not hidden): one survivor (DP 2; with more survivors the collectives would need a
group over them, not done); the survivor must be in a step when the peer dies or get one within
``_FAULT_WAIT_S`` (it faults at its next collective). Each recovery is recorded in
``client._elasticep_recoveries`` (``{"dead", "abort_ms", "fault_ms", "serving_ms"}``).
"""

from __future__ import annotations

import asyncio
import logging
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
    import os

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
        while sentinel_to_proc and not self.manager_stopped.is_set():
            for sentinel in connection.wait(list(sentinel_to_proc), timeout=1):
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


async def _recover(client: Any, dead: int, t0: float) -> None:
    from vllm.v1.fault_tolerance.engine_core_sentinel import FT_UTILITY_METHOD
    from vllm.v1.fault_tolerance.utils import FaultToleranceRequest

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
    record["cut_on_dead"] = len(cut)
    record["abort_ms"] = round((time.monotonic() - t0) * 1000, 1)
    survivors = [r for r in range(len(client.core_engines)) if r not in client._elasticep_dead]
    for rank in survivors:
        deadline = time.monotonic() + _FAULT_WAIT_S
        while client._engine_status.get(rank, {}).get("status") != "unhealthy":
            if time.monotonic() > deadline:
                log.error("elasticep: DP rank %d did not fault within %.0f s", rank, _FAULT_WAIT_S)
                break
            await asyncio.sleep(0.005)
        record["fault_ms"] = round((time.monotonic() - t0) * 1000, 1)
        req = FaultToleranceRequest(instruction="elasticep_shrink",
                                    params={"dead": sorted(client._elasticep_dead)},
                                    request_id=uuid.uuid4().hex)
        result = await client._call_utility_async(FT_UTILITY_METHOD, req, engine=client.core_engines[rank])
        record["result"] = result
    record["serving_ms"] = round((time.monotonic() - t0) * 1000, 1)
    client._elasticep_recoveries.append(record)
    log.warning("elasticep: serving again without DP rank %d: %s", dead, record)


# ---- engine core ---------------------------------------------------------------------------


def _install_engine_core() -> None:
    from vllm.v1.engine.core import DPEngineCoreProc, EngineCoreProc
    from vllm.v1.fault_tolerance.engine_core_sentinel import EngineCoreSentinel
    from vllm.v1.fault_tolerance.utils import FaultToleranceResult
    from vllm.v1.engine import EngineStatusType

    if hasattr(EngineCoreSentinel, "elasticep_shrink"):
        return

    def elasticep_shrink(self, ft_request):
        engine = self.engine
        dead = [int(d) for d in ft_request.params["dead"]]
        engine._elasticep_solo = True
        if hasattr(engine, "step_counter"):
            engine.step_counter = 0
        engine.model_executor.collective_rpc("elasticep_solo", args=(dead,))
        self.status_type = EngineStatusType.HEALTHY
        self.resumed.set()
        self._push_status()
        return FaultToleranceResult(request_id=ft_request.request_id, success=True)

    EngineCoreSentinel.elasticep_shrink = elasticep_shrink

    original_poll = EngineCoreProc._process_input_queue

    def _process_input_queue(self, *args, **kwargs):
        # vLLM's fault-tolerant busy loop and sentinel in the engine core only (its workers'
        # fault tolerance needs a GPU all-to-all backend): a step that fails then parks the loop,
        # aborts the core's requests and waits for an instruction (elasticep_shrink). Set here,
        # on the busy loop's first turn: plugins load inside the engine core's __init__.
        if not getattr(self, "_elasticep_ft", False):
            self._elasticep_ft = True
            if recovering() and not getattr(self, "enable_fault_tolerance", False):
                self.enable_fault_tolerance = True
                self.ft_sentinel = EngineCoreSentinel(engine=self, parallel_config=self.vllm_config.parallel_config)
        return original_poll(self, *args, **kwargs)

    EngineCoreProc._process_input_queue = _process_input_queue

    original = DPEngineCoreProc._has_global_unfinished_reqs

    def _has_global_unfinished_reqs(self, local_unfinished: bool) -> bool:
        if getattr(self, "_elasticep_solo", False):
            return local_unfinished
        return original(self, local_unfinished)

    DPEngineCoreProc._has_global_unfinished_reqs = _has_global_unfinished_reqs


# ---- worker --------------------------------------------------------------------------------


def _install_worker() -> None:
    from vllm.v1.worker import dp_utils

    if getattr(dp_utils._run_ar, "__elasticep__", False):
        return
    original = dp_utils._run_ar

    def _run_ar(should_ubatch, orig_num_tokens_per_ubatch, padded_num_tokens_per_ubatch, cudagraph_mode,
                parallel_config):
        from elasticep_vllm.collectives import SOLO

        if not SOLO["on"]:
            return original(should_ubatch, orig_num_tokens_per_ubatch, padded_num_tokens_per_ubatch,
                            cudagraph_mode, parallel_config)
        import torch

        t = torch.zeros(4, parallel_config.data_parallel_size, dtype=torch.int32)
        r = parallel_config.data_parallel_rank
        t[0][r], t[1][r] = orig_num_tokens_per_ubatch, padded_num_tokens_per_ubatch
        t[2][r], t[3][r] = (1 if should_ubatch else 0), cudagraph_mode
        return t

    _run_ar.__elasticep__ = True  # type: ignore[attr-defined]
    dp_utils._run_ar = _run_ar

