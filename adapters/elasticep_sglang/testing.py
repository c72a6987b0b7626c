"""Run SGLang's EPLB and elastic-EP code on a CPU-only machine: for tests and the docs example.

A live SGLang server publishes its configuration (``sglang.srt.runtime_context.publish``) while it
starts, and ``ExpertLocationMetadata``'s helpers read it (the dispatch algorithm, ``ep_size``,
``nnodes``). Publishing runs SGLang's argument resolution, which imports every model config; one
of them imports ``torchvision``, which has no build for the CPU torch these machines use. So
:func:`sglang_cpu_runtime` publishes the same config bags from a ``ServerArgs`` whose resolution
is marked done (its fields are taken as given), loading the one model-config module publication
needs from its file. Everything that then runs is SGLang's own code.

:func:`sglang_cpu_runtime` also installs, if asked, a real ``ElasticEPState`` built by
``ElasticEPStateManager._build_state`` on CPU (a server builds it on the GPU after
``torch.distributed`` is up), and the global ``ExpertLocationMetadata``. It restores everything
it replaced on exit.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from elasticep_sglang.compat import check_sglang_version

__all__ = [
    "EPLBManagerDouble",
    "MoEModelDouble",
    "SGLangCPURuntime",
    "WeightUpdaterDouble",
    "expert_value",
    "run_agent_double",
    "run_scheduler_double",
    "sglang_cpu_runtime",
]

_SHARED_EXPERTS = "sglang.srt.configs.shared_experts"


def _ensure_publishable() -> None:
    """Make the model-config module that publication imports importable without torchvision."""
    if _SHARED_EXPERTS in sys.modules:
        return
    try:
        importlib.import_module(_SHARED_EXPERTS)
        return
    except ImportError:
        pass
    import sglang

    path = Path(sglang.__file__).resolve().parent / "srt" / "configs" / "shared_experts.py"
    spec = importlib.util.spec_from_file_location(_SHARED_EXPERTS, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a broken install
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[_SHARED_EXPERTS] = module


class SGLangCPURuntime:
    """What :func:`sglang_cpu_runtime` installed: ``server_args`` and, if asked, ``state``
    (the ``ElasticEPState``) with its ``active_ranks`` ``[ep_size]`` ``torch.int32`` on CPU."""

    def __init__(self, server_args: Any, state: Any | None) -> None:
        self.server_args = server_args
        self.state = state


@contextmanager
def sglang_cpu_runtime(
    *,
    ep_size: int,
    num_redundant_experts: int = 0,
    eplb_algorithm: str = "elasticity_aware",
    ep_dispatch_algorithm: str = "static",
    moe_a2a_backend: str = "mooncake",
    elastic_ep_backend: str | None = "mooncake",
    elastic_state: bool = True,
    expert_location_metadata: Any | None = None,
) -> Iterator[SGLangCPURuntime]:
    """Publish a minimal SGLang configuration for an EP deployment of ``ep_size`` ranks.

    Args:
        ep_size: EP ranks (``--tp-size`` = ``--ep-size``, one node).
        num_redundant_experts: ``--ep-num-redundant-experts``.
        eplb_algorithm: ``--eplb-algorithm``.
        ep_dispatch_algorithm: ``--ep-dispatch-algorithm`` (``static`` makes
            ``ExpertLocationMetadata`` compute the per-rank dispatch map).
        moe_a2a_backend: ``--moe-a2a-backend``.
        elastic_ep_backend: ``--elastic-ep-backend``.
        elastic_state: install an ``ElasticEPState`` with every rank active.
        expert_location_metadata: installed as SGLang's global ``ExpertLocationMetadata``.
    """
    check_sglang_version()
    _ensure_publishable()
    import msgspec
    import torch
    from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager
    from sglang.srt.runtime_context import get_context, get_resources
    from sglang.srt.server_args import ServerArgs

    fields: dict[str, Any] = dict(
        model_path="dummy",
        device="cpu",
        tp_size=ep_size,
        ep_size=ep_size,
        ep_num_redundant_experts=num_redundant_experts,
        eplb_algorithm=eplb_algorithm,
        ep_dispatch_algorithm=ep_dispatch_algorithm,
        moe_a2a_backend=moe_a2a_backend,
    )
    if elastic_ep_backend is not None:
        fields["elastic_ep_backend"] = elastic_ep_backend
    server_args = ServerArgs(**fields)
    # Take the fields as given: SGLang's resolution pipeline would import every model config.
    msgspec.Struct.__setattr__(server_args, "_resolution_finished", True)

    ctx = get_context()
    saved = (ctx._server_args, ctx._config_bags, ctx._overrides_log, ctx._publish_role, ctx.parallel._config)
    saved_state = ElasticEPStateManager._instance
    resources = get_resources()
    saved_metadata = resources.expert_location_metadata
    try:
        ctx.set_server_args(server_args)
        state = None
        if elastic_state:
            state = ElasticEPStateManager._build_state(ep_size=ep_size, device=torch.device("cpu"))
            state.effective_ep_size = ep_size
            state.original_ep_size = ep_size
            ElasticEPStateManager._instance = state
        if expert_location_metadata is not None:
            resources.expert_location_metadata = expert_location_metadata
        yield SGLangCPURuntime(server_args, state)
    finally:
        resources.expert_location_metadata = saved_metadata
        ElasticEPStateManager._instance = saved_state
        (ctx._server_args, ctx._config_bags, ctx._overrides_log, ctx._publish_role, ctx.parallel._config) = saved


# ---------------------------------------------------------------------- a scheduler process double

def expert_value(layer: int, expert: int, tensor: int = 0) -> float:
    """What every element of ``expert``'s weight ``tensor`` in ``layer`` holds in the doubles
    below (the checkpoint and every slot that serves it), so a slot's content names its expert."""
    return 1000.0 * layer + expert + 0.25 * tensor


class MoEModelDouble:
    """Test double for SGLang's model on the GPU: only what the expert location updater and
    the disk reload touch. ``routed_experts_weights_of_layer`` is ``{layer: [w13, w2]}`` with
    ``w13`` ``[slots_per_rank, 4, 2]`` and ``w2`` ``[slots_per_rank, 2, 2]`` ``torch.float32``,
    filled from :func:`expert_value` for the experts this rank's slots serve."""

    def __init__(self, phy2log: Any, rank: int, slots_per_rank: int) -> None:
        import torch

        self.rank = rank
        self.slots_per_rank = slots_per_rank
        self.routed_experts_weights_of_layer = {}
        for layer in range(phy2log.shape[0]):
            w13 = torch.empty(slots_per_rank, 4, 2)
            w2 = torch.empty(slots_per_rank, 2, 2)
            self.routed_experts_weights_of_layer[layer] = [w13, w2]
        self.fill(phy2log)

    def fill(self, phy2log: Any, only: dict[int, list[int]] | None = None) -> int:
        """Write the checkpoint's value into local slots (those serving ``only[layer]``'s
        experts, or all); returns the slots written."""
        written = 0
        for layer, tensors in self.routed_experts_weights_of_layer.items():
            for i in range(self.slots_per_rank):
                expert = int(phy2log[layer, self.rank * self.slots_per_rank + i])
                if only is not None and expert not in only.get(layer, ()):
                    continue
                for t, tensor in enumerate(tensors):
                    tensor[i].fill_(expert_value(layer, expert, t))
                written += 1
        return written

    def wrong_slots(self, phy2log: Any) -> list[tuple[int, int]]:
        """``(layer, slot)`` of local slots whose weights are not their expert's in ``phy2log``."""
        wrong = []
        for layer, tensors in self.routed_experts_weights_of_layer.items():
            for i in range(self.slots_per_rank):
                slot = self.rank * self.slots_per_rank + i
                expert = int(phy2log[layer, slot])
                if any(bool((tensor[i] != expert_value(layer, expert, t)).any()) for t, tensor in enumerate(tensors)):
                    wrong.append((layer, slot))
        return wrong

    def generate_weight_name_filter(self, missing: dict[int, list[int]]) -> dict[int, list[int]]:
        return {int(k): [int(e) for e in v] for k, v in missing.items()}


class WeightUpdaterDouble:
    """Test double for SGLang's ``ModelRunner.weight_updater``: ``update_weights_from_disk``
    reloads the filtered experts into the slots the global ``ExpertLocationMetadata`` assigns
    them (what SGLang's weight loader does), from :func:`expert_value`."""

    def __init__(self, model: MoEModelDouble) -> None:
        self.model = model
        self.loads: list[dict[int, list[int]]] = []

    def update_weights_from_disk(self, model_path: str, load_format: str, weight_name_filter: Any = None) -> None:
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        self.loads.append(weight_name_filter)
        self.model.fill(get_global_expert_location_metadata().physical_to_logical_map_cpu, weight_name_filter)


class EPLBManagerDouble:
    """Test double for SGLang's ``EPLBManager`` (whose module imports model configs that need
    a CUDA torchvision): the three getters the model runner wires into it."""

    def __init__(self, model: MoEModelDouble, weight_updater: WeightUpdaterDouble) -> None:
        self._get_model = lambda: model
        self._get_expert_backup_client = lambda: None
        self._get_weight_updater = lambda: weight_updater


def run_scheduler_double(rank: int, world: int, init_port: int, workdir: str, phy2log: list, slots_per_rank: int,
                         mark_dead: int | None = None, timeout_s: float = 60.0) -> None:
    """One SGLang scheduler process as far as CPUs allow, for the agent's end-to-end test.

    What SGLang's ``run_scheduler_process`` and model runner do, in their order: load the
    plugins (the ``sglang.srt.plugins`` entry point, which installs the step boundary and the
    agent from the environment), ``torch.distributed`` over ``tcp://127.0.0.1:init_port``
    (gloo here, rank 0 hosting the store), the published configuration, the real
    ``ElasticEPState`` and global ``ExpertLocationMetadata``, then a forward loop that calls
    ``maybe_rebalance_after_rank_fault`` after each pass. The GPU parts (the model, the EPLB
    manager, Mooncake EP's kernel) are the doubles above; the kernel double clears
    ``mark_dead`` in ``active_ranks`` once ``workdir/killed`` exists, as Mooncake EP does when
    a peer stops answering.

    Writes ``workdir/ready-<rank>`` after the first step boundary (the agent is up) and, once
    a view newer than the first is committed and a few more steps ran,
    ``workdir/result-<rank>.json``.
    """
    import json
    import os
    import time
    from datetime import timedelta
    from pathlib import Path

    import torch
    import torch.distributed as dist

    import sglang.srt.elastic_ep.elastic_ep as elastic_ep
    import sglang.srt.eplb.expert_location_updater  # noqa: F401 - scheduler-side, imported by the runner
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata
    from sglang.srt.plugins import load_plugins

    from elasticep.eplb import Placement
    from elasticep_sglang.convert import to_expert_location_metadata
    from elasticep_sglang.hooks import StepBoundary, installed_hooks

    work = Path(workdir)
    t0 = time.monotonic()
    load_plugins()
    print(f"rank {rank}: plugins loaded {time.monotonic() - t0:.2f} s", flush=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{init_port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    print(f"rank {rank}: torch.distributed up {time.monotonic() - t0:.2f} s", flush=True)
    placement = Placement(torch.tensor(phy2log, dtype=torch.int64), slots_per_rank)
    with sglang_cpu_runtime(ep_size=world) as runtime:
        from sglang.srt.runtime_context import get_resources

        get_resources().expert_location_metadata = to_expert_location_metadata(placement, moe_ep_rank=rank,
                                                                               narrow=False)
        model = MoEModelDouble(placement.phy2log, rank, slots_per_rank)
        updater = WeightUpdaterDouble(model)
        manager = EPLBManagerDouble(model, updater)
        hooks = installed_hooks()
        step = elastic_ep.maybe_rebalance_after_rank_fault  # as the model runner calls it
        assert isinstance(step, StepBoundary) and step.agent is not None, "the plugin did not install the agent"
        rerun: list[int] = []
        deadline = time.monotonic() + timeout_s
        n = 0
        done_at = None
        committed_at = None
        marked = False
        while time.monotonic() < deadline:
            n += 1
            if elastic_ep.maybe_rebalance_after_rank_fault(eplb_manager=manager):
                rerun.append(n)
            if n == 1:
                print(f"rank {rank}: agent up {time.monotonic() - t0:.2f} s", flush=True)
                (work / f"ready-{rank}").write_text(str(step.agent.agent.epoch))
            if mark_dead is not None and not marked and (work / "killed").exists():
                runtime.state.active_ranks[mark_dead] = 0  # Mooncake EP's kernel gave up on it
                marked = True
            agent = step.agent
            if done_at is None and agent.hooks.applied:
                done_at = n
                committed_at = time.time()  # wall clock: the test compares it with its kill time
            if done_at is not None and n >= done_at + 20:
                break
            time.sleep(0.01)
        agent = step.agent
        state = runtime.state
        md = get_global_expert_location_metadata()
        result = {
            "rank": rank,
            "plugin_installed": hooks is not None and hooks.step is step,
            "applied": agent.hooks.applied,
            "refused": agent.hooks.refused,
            "epoch": agent.agent.epoch,
            "members": list(agent.agent.members),
            "steps": n,
            "rerun": rerun,
            "lost_reports": agent.lost_reports,
            "active_ranks": state.active_ranks.tolist(),
            "last_active_ranks": state.last_active_ranks.tolist(),
            "active_ranks_cpu": state.active_ranks_cpu.tolist(),
            "sglang_would_rebalance": not state.is_active_equal_last(),
            "phy2log": md.physical_to_logical_map_cpu.tolist(),
            "log2phy": md.logical_to_all_physical_map_cpu.tolist(),
            "wrong_slots": model.wrong_slots(md.physical_to_logical_map_cpu),
            "moves": agent.hooks.moves,
            "disk_loads": [{str(k): v for k, v in load.items()} for load in updater.loads],
            "status": agent.agent.status()["last_reconfiguration"],
            "committed_at": committed_at,
        }
        (work / f"result-{rank}.json.tmp").write_text(json.dumps(result))
        (work / f"result-{rank}.json.tmp").rename(work / f"result-{rank}.json")
        # rank 0 hosts the store: nobody leaves before every survivor has reported
        while not (work / "finish").exists() and time.monotonic() < deadline + 30:
            time.sleep(0.02)
        agent.stop()
    # a scheduler killed by its launcher skips interpreter teardown too (gloo and torch
    # destructors take seconds on a loaded machine)
    sys.stdout.flush()
    os._exit(0)


def run_agent_double(rank: int, world: int, init_port: int, workdir: str, phy2log: list, slots_per_rank: int,
                     timeout_s: float = 60.0) -> None:
    """A rank of the same cluster without SGLang (a lighter process for the rank a test kills):
    ``torch.distributed`` over ``tcp://127.0.0.1:init_port`` like the schedulers, and a plain
    :class:`elasticep.Agent` configured the way :class:`~elasticep_sglang.scheduler_agent.
    SchedulerAgent` configures one (store found behind ``torch.distributed``, keys and cluster
    from the environment). Writes ``workdir/ready-<rank>`` once up, then serves until killed."""
    import os
    import time
    from datetime import timedelta
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from elasticep.agent import Agent, EngineHooks
    from elasticep.bus import ClusterKeys
    from elasticep.config import Config
    from elasticep.eplb import Placement
    from elasticep_sglang.scheduler_agent import ENV_CLUSTER, ENV_PROFILE, distributed_store_address

    class Hooks(EngineHooks):
        def __init__(self) -> None:
            self.served = Placement(torch.tensor(phy2log, dtype=torch.int64), slots_per_rank)

        def placement(self) -> Placement:
            return self.served

        def commit(self, change: Any) -> None:
            self.served = change.placement

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{init_port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    config = Config.cluster() if os.environ.get(ENV_PROFILE) == "cluster" else Config.local()
    agent = Agent(rank, Hooks(), store=distributed_store_address(), cluster=os.environ.get(ENV_CLUSTER, "sglang"),
                  members=range(world), config=config, keys=ClusterKeys.from_env(), groups=None)
    agent.start(timeout=timeout_s)
    (Path(workdir) / f"ready-{rank}").write_text(str(agent.epoch))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        agent.boundary()
        time.sleep(0.01)
    agent.stop()
