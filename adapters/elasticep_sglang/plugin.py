"""SGLang general-plugin entry point: ``elasticep_sglang.plugin:load``.

SGLang calls every function registered under the ``sglang.srt.plugins`` entry-point group early
in each of its processes (``sglang.srt.plugins.load_plugins``). Registered there, this installs
the hooks whenever :data:`~elasticep_sglang.hooks.ENV_ENABLE` is ``1``, also in processes that
were not started through ``python -m elasticep_sglang.launch_server``; with
:data:`~elasticep_sglang.hooks.ENV_AGENT` also ``1``, each scheduler starts an
:class:`elasticep.Agent` at its first step boundary (:mod:`elasticep_sglang.scheduler_agent`).
"""

from __future__ import annotations

from elasticep_sglang.hooks import install_from_env

__all__ = ["load"]


def load() -> None:
    """Install the hooks if the environment enables them."""
    install_from_env()
