"""vLLM general-plugin entry points (the ``vllm.general_plugins`` group in ``pyproject.toml``).

vLLM calls every function registered there early in each of its processes (the front end, each
engine core, each worker: ``vllm.plugins.load_general_plugins``); ``VLLM_PLUGINS`` (a
comma-separated list of names) limits which are loaded. Two are registered:

``elasticep_cpu_collectives`` -> :func:`load_collectives`
    on vLLM's CPU platform, the variable-size all-gather and reduce-scatter that data parallel
    of a MoE model needs (:mod:`elasticep_vllm.collectives`) and the expert-map translation the
    CPU experts kernel lacks under expert parallelism (:mod:`elasticep_vllm.cpu_moe`). Without
    it DP > 1 of a MoE model does not run on CPU at all, so it is also what a run of vLLM *without* elasticep's fault handling loads
    (``VLLM_PLUGINS=elasticep_cpu_collectives``).

``elasticep`` -> :func:`load`
    the same, plus elasticep's recovery when an engine core dies (:mod:`elasticep_vllm.recovery`),
    active in a server started with ``enable_fault_tolerance=True`` and the worker extension
    ``elasticep_vllm.worker.ElasticEPWorker``.

Both check the installed vLLM against :data:`~elasticep_vllm.compat.SUPPORTED_VLLM` first and
raise :class:`~elasticep_vllm.compat.UnsupportedVLLMVersion` (vLLM then stops with that message)
on any other release.
"""

from __future__ import annotations

from elasticep_vllm.compat import check_vllm_version

__all__ = ["load", "load_collectives"]


def load_collectives() -> None:
    """Install :mod:`~elasticep_vllm.collectives` and :mod:`~elasticep_vllm.cpu_moe` (CPU platform only)."""
    check_vllm_version()
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from elasticep_vllm import collectives, cpu_moe

    collectives.install()
    cpu_moe.install()


def load() -> None:
    """The collectives, and elasticep's recovery of a server whose engine core dies
    (:mod:`~elasticep_vllm.recovery`; it acts only where fault tolerance is enabled)."""
    load_collectives()
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from elasticep_vllm import recovery

    recovery.install()
