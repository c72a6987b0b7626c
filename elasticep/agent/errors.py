"""The agent's typed errors; each is also counted (``elasticep_agent_errors_total{kind}`` or
``elasticep_hook_failures_total{hook,kind}``)."""

from __future__ import annotations

from elasticep.errors import WaitTimeout
from elasticep.membership.service import RankFenced

__all__ = ["AgentError", "AgentStateError", "AgentFenced", "HookFailed", "HookTimeout", "AgentStopped",
           "ViewTimeout"]


class AgentError(RuntimeError):
    """Base of every error the agent raises."""


class AgentStateError(AgentError):
    """The call does not fit the agent's state: started twice, used before ``start()`` or after
    ``stop()``. ``state`` is the state it was in."""

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message)
        self.state = state


class AgentStopped(AgentError):
    """The agent was stopped (``stop()``) while the engine waited on it, e.g. during a
    reconfiguration; nothing of the view in progress was applied."""


class HookFailed(AgentError):
    """Engine hook ``hook`` raised ``cause`` (also ``__cause__``)."""

    def __init__(self, hook: str, cause: BaseException) -> None:
        super().__init__(f"engine hook {hook}() failed: {type(cause).__name__}: {cause}")
        self.hook = hook
        self.cause = cause


class HookTimeout(AgentError):
    """Engine hook ``hook`` did not return within ``timeout_s``."""

    def __init__(self, hook: str, timeout_s: float) -> None:
        super().__init__(f"engine hook {hook}() did not return within {timeout_s:g} s")
        self.hook = hook
        self.timeout_s = timeout_s


class AgentFenced(RankFenced, AgentError):
    """This rank is outside the committed views (evicted while alive, or it took itself out
    after a hook failed at a view): it must stop serving. ``reason`` says why."""


class ViewTimeout(WaitTimeout, AgentError):
    """The view the engine waited for did not come within the agent's bound (``view_wait_s``
    after lost peers or a failed reconfiguration, ``reconfig_timeout_s`` for one
    reconfiguration): the cluster cannot agree right now. Both a ``TimeoutError`` and an
    :class:`AgentError`."""
