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

__all__ = ["SGLangCPURuntime", "sglang_cpu_runtime"]

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
