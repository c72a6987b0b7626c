"""Bring a dead DP rank of a vLLM server back: a new engine core takes its place and elasticep
admits it.

``await rejoin(engine, rank)`` (in the front end, on the ``AsyncLLM`` that
:func:`~elasticep_vllm.serve.start_engine` started with elasticep) starts a new engine-core
process for DP rank ``rank`` with vLLM's own launcher (``CoreEngineProcManager``) and
handshake (``wait_for_engine_startup``: the front end's request, response and DP-coordinator
sockets), and returns once elasticep's membership has admitted it and its placement is
committed; the front end then routes requests to it again. The survivors keep serving
throughout: nothing they run waits for the newcomer until the admitting view.

How the newcomer meets the survivors:

- vLLM starts a DP rank by meeting every other DP rank in its groups (the engine core's DP
  group, the worker's world group and the groups made from it). The survivors' groups are of
  the old world and stay as they are, so every other DP rank is met by a *stand-in*: a small
  process that runs vLLM's own group set-up as that rank (``ParallelConfig.stateless_init_dp_group``,
  ``init_worker_distributed_environment``) on a rendezvous of this rejoin (a fresh coordination
  store and ports), and exits once the newcomer is ready. The newcomer's vLLM groups are never
  used after that.
- The newcomer starts with :data:`~elasticep_vllm.core_agent.ENV_JOINING`: its collectives wait
  for no peer (its start-up profile runs alone) and its agent asks to be admitted.
- Its agent's join is one view change like any other: the leader plans the newcomer back into
  the placement, every member builds elasticep's gloo groups over the view's members (engine
  core and worker) and commits, and from then on every collective runs over those groups.

Each rejoin is recorded in ``client._elasticep_rejoins`` (``{"rank", "ready_s", "admitted_ms",
"routed_ms", "epoch", "experts_by_rank"}``: the new core's start-up, then from its readiness to
the admitting view's committed placement, and to the front end's routing seeing it idle).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import os
import time
from typing import Any

from elasticep import metrics
from elasticep.errors import ElasticEPError

__all__ = ["RejoinError", "rejoin"]

log = logging.getLogger(__name__)

_incarnations = itertools.count(1)


class RejoinError(ElasticEPError, RuntimeError):
    """A rank cannot be brought back (not dead, elasticep not running, the new engine core failed
    to start or was not admitted in time); counted in
    ``elasticep_agent_errors_total{kind="vllm_rejoin"}``."""


def _error(message: str) -> RejoinError:
    metrics.AGENT_ERRORS.labels("vllm_rejoin").inc()
    return RejoinError(message)


def _stand_in(vllm_config: Any, dp_rank: int) -> None:
    """Process target: meet the rejoining engine core's vLLM group set-up as DP rank ``dp_rank``
    (first the engine core's DP group, then the worker's world and model-parallel groups, in the
    order the newcomer makes them), then wait to be stopped."""
    import threading

    from vllm.config import set_current_vllm_config
    from vllm.v1.worker.gpu_worker import init_worker_distributed_environment

    pc = vllm_config.parallel_config
    pc.data_parallel_rank = dp_rank
    pc.data_parallel_rank_local = dp_rank
    pc.data_parallel_index = dp_rank
    group = pc.stateless_init_dp_group()
    with set_current_vllm_config(vllm_config):
        init_worker_distributed_environment(vllm_config, 0, "tcp://127.0.0.1:0", 0, "gloo")
    del group
    threading.Event().wait()


def _addresses(client: Any) -> Any:
    """The front end's sockets the newcomer connects to, as vLLM's handshake hands them out."""
    import zmq
    from vllm.v1.engine.utils import EngineZmqAddresses

    coordinator = client.resources.coordinator
    addresses = EngineZmqAddresses(
        inputs=[client.input_socket.getsockopt(zmq.LAST_ENDPOINT).decode()],
        outputs=[client.resources.output_socket.getsockopt(zmq.LAST_ENDPOINT).decode()],
    )
    if coordinator is not None:
        addresses.coordinator_input, addresses.coordinator_output = coordinator.get_engine_socket_addresses()
        addresses.frontend_stats_publish_address = coordinator.get_stats_publish_address()
    return addresses


def _start(client: Any, rank: int, log_stats: bool) -> tuple[Any, Any, list[Any], Any]:
    """Start the stand-ins and the new engine core, and run vLLM's handshake with it (blocking,
    until it is ready). Returns ``(manager, proc, stand_ins, coordination store)``."""
    import datetime

    import zmq
    from torch.distributed import TCPStore
    from vllm.utils.network_utils import get_open_ports_list, get_open_zmq_ipc_path
    from vllm.utils.system_utils import get_mp_context
    from vllm.v1.engine.utils import CoreEngine, CoreEngineLaunch, CoreEngineProcManager, wait_for_engine_startup
    from vllm.v1.executor import Executor

    from elasticep_vllm.core_agent import ENV_INCARNATION, ENV_JOINING

    cfg = copy.deepcopy(client.vllm_config)
    pc = cfg.parallel_config
    # vLLM's launcher wrote the last rank's device shard into the shared config; the new core's
    # shard is cut again from what the server was started with
    pc.assigned_physical_gpu_ids = getattr(client, "_elasticep_device_ids", None)
    # this rejoin's own rendezvous: the original one's keys and ports are spent
    store = TCPStore(pc.data_parallel_master_ip, 0, is_master=True, wait_for_workers=False,
                     timeout=datetime.timedelta(seconds=120))
    pc._coord_store_port = store.port
    pc._data_parallel_master_port_list = get_open_ports_list(5)
    ctx = get_mp_context()
    stand_ins = [ctx.Process(target=_stand_in, args=(copy.deepcopy(cfg), r), name=f"ElasticEPStandIn_DP{r}",
                             daemon=True)
                 for r in range(pc.data_parallel_size) if r != rank]
    for proc in stand_ins:
        proc.start()
    handshake = get_open_zmq_ipc_path()
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(handshake)
    saved = {k: os.environ.get(k) for k in (ENV_JOINING, ENV_INCARNATION)}
    os.environ[ENV_JOINING] = "1"
    os.environ[ENV_INCARNATION] = str(int(time.time() * 1000) % (1 << 40) + next(_incarnations))
    try:
        manager = CoreEngineProcManager(
            local_engine_count=1, start_index=rank, local_start_index=rank, vllm_config=cfg, local_client=True,
            handshake_address=handshake, executor_class=Executor.get_class(cfg), log_stats=log_stats)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        launch = CoreEngineLaunch(manager, None, _addresses(client), None)
        # the handshake waits for as many local engine cores as the config says: one here
        one = copy.copy(pc)
        one.data_parallel_size_local = 1
        wait_for_engine_startup(sock, [CoreEngine(index=rank, local=True)], one,
                                pc.data_parallel_size > 1 and cfg.model_config.is_moe, cfg.cache_config, launch)
    except BaseException:
        manager.shutdown()
        _stop(stand_ins)
        raise
    finally:
        sock.close(linger=0)
    return manager, manager.processes[0], stand_ins, store


def _stop(procs: list[Any]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(5)


async def rejoin(engine: Any, rank: int, *, timeout_s: float = 600.0) -> dict[str, Any]:
    """Start a new engine core for dead DP rank ``rank`` and return once elasticep committed the
    view that admits it (the front end routes to it again). Returns this rejoin's record.

    Raises:
        RejoinError: ``rank`` is not a dead DP rank of this server, the new core did not start,
            or no view admitting it was committed within ``timeout_s``.
    """
    from elasticep_vllm.recovery import _committed_view, _experts_by_rank

    client = getattr(engine, "engine_core", engine)
    dead = getattr(client, "_elasticep_dead", None)
    if dead is None:
        raise _error("this server does not run elasticep's recovery (start it with elasticep_vllm.serve.start_engine "
                     "and engine_args(..., elasticep=True))")
    if rank not in dead:
        raise _error(f"DP rank {rank} is not dead (dead: {sorted(dead)}); only a dead rank is brought back")
    t0 = time.monotonic()
    record: dict[str, Any] = {"rank": rank}
    import zmq

    # the request socket routes by DP rank: the newcomer's connection takes the rank over from
    # the dead one's (which ZeroMQ may still hold), or every request sent to it is dropped.
    # Set here, on the loop's thread, which owns the socket.
    client.input_socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
    try:
        manager, proc, stand_ins, coord = await asyncio.to_thread(_start, client, rank,
                                                                  bool(getattr(engine, "log_stats", False)))
    except Exception as exc:
        raise _error(f"the new engine core for DP rank {rank} did not start: {exc!r}") from exc
    _stop(stand_ins)
    record["ready_s"] = round(time.monotonic() - t0, 2)
    log.warning("elasticep: the new engine core for DP rank %d is ready after %.1f s; waiting for its admission",
                rank, record["ready_s"])
    # vLLM's shutdown stops it with the others; the liveness monitor watches it from now on
    original = client.resources.engine_manager
    original.processes.append(proc)
    getattr(original, "_elasticep_added", []).append(proc)
    client.__dict__.setdefault("_elasticep_rejoined", []).append((manager, coord))
    t1 = time.monotonic()
    epoch = await _committed_view(client, lambda members: rank in members, t1 + timeout_s)
    if epoch is None:
        raise _error(f"no view admitting DP rank {rank} was committed within {timeout_s:g} s")
    record["admitted_ms"] = round((time.monotonic() - t1) * 1000, 1)
    record["epoch"] = epoch
    record["experts_by_rank"] = _experts_by_rank(client._elasticep_placement)
    dead.discard(rank)
    client._engine_status.pop(rank, None)
    # the front end routes by the DP coordinator's request counts, which for this rank were the
    # dead core's until the newcomer published its own (its commit made it do so): wait,
    # bounded, until they show its empty queue, or new requests would all avoid it
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        counts = getattr(client, "lb_engines", None)
        if not counts or rank >= len(counts) or counts[rank][0] + counts[rank][1] == 0:
            break
        await asyncio.sleep(0.01)
    record["routed_ms"] = round((time.monotonic() - t1) * 1000, 1)
    client.__dict__.setdefault("_elasticep_rejoins", []).append(record)
    log.warning("elasticep: DP rank %d serves again: %s", rank, record)
    return record
