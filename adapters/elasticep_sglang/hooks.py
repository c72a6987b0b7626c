"""Installing the adapter into a running SGLang process, without editing SGLang's source.

Two module attributes are replaced (and restored by :func:`uninstall_hooks`):

* ``sglang.srt.eplb.eplb_algorithms.rebalance_experts`` by an
  :class:`~elasticep_sglang.rebalance.ElasticRebalance` (``init_by_eplb`` looks it up on the
  module at each call);
* ``maybe_rebalance_after_rank_fault`` (in ``sglang.srt.elastic_ep.elastic_ep`` and in every
  loaded module that imported it by name, such as the model runner) by a :class:`StepBoundary`,
  when a view feed, a mask source or the agent (:data:`ENV_AGENT`) is given. SGLang calls it
  after every forward pass.

Each SGLang process (the launcher and every scheduler it spawns) must install them itself:
``python -m elasticep_sglang.launch_server`` does so through the environment (see
:func:`install_from_env`), and so does the SGLang plugin entry point
``elasticep_sglang.plugin:load``.
"""

from __future__ import annotations

from elasticep.errors import ElasticEPError

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from elasticep_sglang.active_ranks import ActiveRanksFeed
from elasticep_sglang.compat import check_sglang_version
from elasticep_sglang.rebalance import ElasticRebalance

__all__ = [
    "ENV_AGENT",
    "ENV_ENABLE",
    "ENV_MAX_MOVES",
    "ENV_PERIODIC",
    "InstalledHooks",
    "StepBoundary",
    "install_from_env",
    "install_hooks",
    "installed_hooks",
    "uninstall_hooks",
]

log = logging.getLogger(__name__)

#: Set to 1 by the launch wrapper; read by :func:`install_from_env` in every SGLang process.
ENV_ENABLE = "ELASTICEP_SGLANG_HOOKS"
#: ``max_moves`` of the rebalance hook: an integer, ``none`` or ``auto`` (default).
ENV_MAX_MOVES = "ELASTICEP_SGLANG_MAX_MOVES"
#: ``periodic`` of the rebalance hook: ``sglang`` (default) or ``elasticep``.
ENV_PERIODIC = "ELASTICEP_SGLANG_PERIODIC"
#: ``1``: start :class:`elasticep.Agent` in every scheduler (see
#: :mod:`elasticep_sglang.scheduler_agent`); set by the launch wrapper unless ``--no-elasticep-agent``.
ENV_AGENT = "ELASTICEP_SGLANG_AGENT"

_REBALANCE = ("sglang.srt.eplb.eplb_algorithms", "rebalance_experts")
_STEP = ("sglang.srt.elastic_ep.elastic_ep", "maybe_rebalance_after_rank_fault")


class StepBoundary:
    """Replaces ``maybe_rebalance_after_rank_fault(*, eplb_manager) -> bool``.

    At each step boundary, on the scheduler thread: read the Mooncake mask through
    ``mask_source`` and pass new kernel timeouts to ``on_peer_timeout`` (e.g. a thread-safe
    publish to the bus); if there were any, wait up to ``view_wait_s`` for the membership's
    verdict; write pending views into the active-ranks state (``feed``); then run SGLang's own
    function, which rebalances once if the mask changed. Returns True (SGLang then re-runs the
    forward pass) when SGLang rebalanced or when the kernel marked a peer during this step, whose
    outputs may lack that peer's experts.

    With ``agent`` (a :class:`~elasticep_sglang.scheduler_agent.SchedulerAgent`, what the
    plugin installs when :data:`ENV_AGENT` is ``1``) each call is the agent's step boundary
    instead: :meth:`SchedulerAgent.step`, and SGLang's own function is not called.
    """

    def __init__(
        self,
        original: Callable[..., bool],
        *,
        feed: ActiveRanksFeed | None = None,
        mask_source: Any | None = None,
        on_peer_timeout: Callable[[list[Any]], None] | None = None,
        view_wait_s: float = 2.0,
        agent: Any | None = None,
    ) -> None:
        self.original = original
        self.agent = agent
        self.feed = feed
        self.mask_source = mask_source
        self.on_peer_timeout = on_peer_timeout
        self.view_wait_s = view_wait_s
        self.steps = 0
        self.timeouts_seen = 0

    def __call__(self, *, eplb_manager: Any) -> bool:
        if self.agent is not None:
            # the agent is the only writer of the mask: SGLang's own function is not called
            self.steps += 1
            return bool(self.agent.step(eplb_manager))
        self.steps += 1
        marked: list[Any] = []
        if self.mask_source is not None:
            marked = self.mask_source.after("dispatch")
            if marked:
                self.timeouts_seen += len(marked)
                if self.on_peer_timeout is not None:
                    self.on_peer_timeout(marked)
                if self.feed is not None and self.view_wait_s > 0 and not self.feed.wait_for_view(self.view_wait_s):
                    # no verdict in time: SGLang acts on this rank's own mask, as it would alone
                    log.warning("no view within %.1fs of kernel timeouts on %s; SGLang acts on the local mask",
                                self.view_wait_s, [e.peer for e in marked])
        if self.feed is not None:
            self.feed.apply_pending()
        rebalanced = bool(self.original(eplb_manager=eplb_manager))
        return rebalanced or bool(marked)


@dataclass
class InstalledHooks:
    """What :func:`install_hooks` put in place (the one instance per process)."""

    version: str
    rebalance: ElasticRebalance
    step: StepBoundary | None = None
    patched: list[tuple[Any, str, Any]] = field(default_factory=list)  # (module, attr, original)


_installed: InstalledHooks | None = None


class HooksAlreadyInstalled(ElasticEPError, RuntimeError):
    """:func:`install_hooks` was called with a feed or mask source after an install without it."""


def installed_hooks() -> InstalledHooks | None:
    """The hooks installed in this process, or None."""
    return _installed


def _patch(module: Any, attr: str, new: Any, record: list[tuple[Any, str, Any]]) -> None:
    record.append((module, attr, getattr(module, attr)))
    setattr(module, attr, new)


def install_hooks(
    *,
    periodic: str = "sglang",
    max_moves: int | str | None = "auto",
    feed: ActiveRanksFeed | None = None,
    mask_source: Any | None = None,
    on_peer_timeout: Callable[[list[Any]], None] | None = None,
    view_wait_s: float = 2.0,
    agent: Any | None = None,
) -> InstalledHooks:
    """Install the hooks in this process (idempotent: a second call returns the first install).

    Args:
        periodic: who plans while every rank is alive (see
            :class:`~elasticep_sglang.rebalance.ElasticRebalance`).
        max_moves: the planner's move budget (see ``ElasticRebalance``).
        feed: the view feed applied at each step boundary (see :class:`StepBoundary`).
        mask_source: the Mooncake mask source read at each step boundary.
        on_peer_timeout: receives the kernel timeouts the mask source found.
        view_wait_s: how long a step waits for a view after a kernel timeout.
        agent: a :class:`~elasticep_sglang.scheduler_agent.SchedulerAgent` that owns the step
            boundary (the feed and the mask source are then its hooks').

    Without a feed, a mask source or an agent the step boundary is left as SGLang has it.

    Raises:
        UnsupportedSGLangVersion: the installed SGLang is outside ``SUPPORTED_SGLANG``.
        SGLangNotInstalled: SGLang cannot be imported.
    """
    global _installed
    if _installed is not None:
        step = _installed.step
        had_feed = step.feed if step is not None else None
        had_source = step.mask_source if step is not None else None
        had_agent = step.agent if step is not None else None
        if ((feed is not None and feed is not had_feed) or (mask_source is not None and mask_source is not had_source)
                or (agent is not None and agent is not had_agent)):
            # returning the first install would silently drop this feed: no step boundary for it
            raise HooksAlreadyInstalled(
                "elasticep_sglang hooks are already installed in this process (by the launch wrapper, the "
                "plugin or an earlier call) without this feed/mask source; pass it to the first install, "
                "or call uninstall_hooks() and install again"
            )
        return _installed
    version = check_sglang_version()
    import importlib

    algorithms = importlib.import_module(_REBALANCE[0])
    patched: list[tuple[Any, str, Any]] = []
    rebalance = ElasticRebalance(getattr(algorithms, _REBALANCE[1]), periodic=periodic, max_moves=max_moves)
    _patch(algorithms, _REBALANCE[1], rebalance, patched)
    step = None
    if feed is not None or mask_source is not None or agent is not None:
        elastic = importlib.import_module(_STEP[0])
        original = getattr(elastic, _STEP[1])
        step = StepBoundary(original, feed=feed, mask_source=mask_source, on_peer_timeout=on_peer_timeout,
                            view_wait_s=view_wait_s, agent=agent)
        # the model runner imports the function by name: rebind it wherever it was copied
        for module in list(sys.modules.values()):
            if module is not None and getattr(module, _STEP[1], None) is original:
                _patch(module, _STEP[1], step, patched)
    _installed = InstalledHooks(version=version, rebalance=rebalance, step=step, patched=patched)
    log.info("elasticep hooks installed in SGLang %s (pid %d)", version, os.getpid())
    return _installed


def uninstall_hooks() -> None:
    """Restore every attribute :func:`install_hooks` replaced."""
    global _installed
    if _installed is None:
        return
    for module, attr, original in reversed(_installed.patched):
        setattr(module, attr, original)
    _installed = None


def install_from_env(environ: dict[str, str] | None = None) -> InstalledHooks | None:
    """Install the hooks if :data:`ENV_ENABLE` is ``1`` (what the launch wrapper sets for every
    process it and SGLang start); returns the install, or None when not enabled."""
    env = os.environ if environ is None else environ
    if env.get(ENV_ENABLE) != "1":
        return None
    raw = env.get(ENV_MAX_MOVES, "auto").strip().lower()
    if raw in ("none", "auto"):
        max_moves: int | str | None = None if raw == "none" else raw
    elif raw.isdigit():
        max_moves = int(raw)
    else:
        from elasticep import metrics
        from elasticep.errors import InvalidArgument

        exc = InvalidArgument(f"{ENV_MAX_MOVES} must be an int >= 0, 'auto' or 'none', not {raw!r}")
        metrics.count_refusal("sglang", exc)
        raise exc
    agent = None
    if env.get(ENV_AGENT) == "1":
        if _installed is not None and _installed.step is not None and _installed.step.agent is not None:
            return _installed  # the wrapper's module and the plugin both run in a spawned scheduler
        from elasticep_sglang.scheduler_agent import SchedulerAgent

        agent = SchedulerAgent(env)
    return install_hooks(periodic=env.get(ENV_PERIODIC, "sglang"), max_moves=max_moves, agent=agent)
