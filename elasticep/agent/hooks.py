"""What an engine gives the agent: :class:`EngineHooks`, and what it gets back at a commit.

The agent never reaches into an engine. It calls these methods, each with a contract on which
thread it runs, what it may do and how long it may take (``Agent(hook_timeout_s=...)``); a hook
that raises or overruns its bound becomes a :class:`~elasticep.agent.errors.HookFailed` or
:class:`~elasticep.agent.errors.HookTimeout`, counted in ``elasticep_hook_failures_total``.

Subclass :class:`EngineHooks` and override what your engine has; every method but
:meth:`EngineHooks.placement` and :meth:`EngineHooks.commit` has a default that does nothing.

=================================  ===========================  =========================================
hook                               when, on which thread        contract
=================================  ===========================  =========================================
``placement()``                    agent thread, any time       the :class:`~elasticep.eplb.Placement`
                                                                served now; cheap, no I/O
``expert_layout()``                once, at ``start()``         an :class:`~elasticep.transfer.ExpertLayout`
                                                                of this rank's expert tensors, or None when
                                                                the engine moves weights itself
``read_expert(layer, slot)``       agent thread, the engine     the served tensors of one local slot, named
                                   parked or between commits    as in the layout; read only
``disk_source()``                  once, at ``start()``         a :class:`~elasticep.transfer.DiskSource`
                                                                (the last resort) or None
``expert_checksums()``             once, at ``start()``         ``{(layer, expert): crc32}`` of the correct
                                                                bytes, or None (no verification)
``on_view(view)``                  agent thread, right after    must not block (bounded by
                                   each install                 ``hook_timeout_s``): e.g. stop waiting on
                                                                peers outside the view in the kernel mask
``rebuild_collectives(view)``      agent thread, ``groups``     build collectives over ``view.members``;
                                   phase                        return the group (handed to ``commit``)
``commit(change)``                 agent thread while the       apply :class:`Commit` all at once: staged
                                   engine thread is parked in   weights, placement, live mask, group and
                                   ``Agent.boundary()``         epoch; raise if it cannot (the rank then
                                                                fences itself: nothing half applied serves)
``kernel_timeouts()``              engine thread, after a step  the engine's own kernel mask: the peers it
                                   that lost peers              gave up waiting on since the last call, as
                                                                :class:`~elasticep.events.PeerTimeout`
``pause_admission()`` /            agent thread, around each    stop / restart taking new requests (the
``resume_admission()``             reconfiguration              engine may also just queue them)
``expert_load()``                  agent thread, the leader's   ``[moe_layers, experts]`` recorded load
                                   plan                         (tokens per expert), or None: uniform
``drain(reason)``                  the operator door's thread   the operator asked this rank to leave:
                                                                begin the engine's graceful leave (finish
                                                                requests, then ``Agent.request_leave``);
                                                                must not block
=================================  ===========================  =========================================

Data flows one way: engine signals (``kernel_timeouts``, :meth:`Agent.report`) go to the agent;
the agent's decisions come back only through these hooks, at the step boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import torch

    from elasticep.eplb.placement import Placement
    from elasticep.events import PeerTimeout
    from elasticep.membership.view import View
    from elasticep.transfer import DiskSource, ExpertLayout

__all__ = ["Commit", "EngineHooks", "StagedSlot"]


@dataclass(frozen=True)
class StagedSlot:
    """One local slot that serves another expert from the commit on.

    ``tensors`` are named as in the engine's :class:`~elasticep.transfer.ExpertLayout`
    (``gate_proj``, ``up_proj``, ``down_proj`` for :meth:`ExpertLayout.deepseek`), private
    copies the engine may keep; ``source`` says where they came from (``replica``, ``local``,
    ``disk``).
    """

    layer: int
    slot: int
    expert: int
    tensors: Mapping[str, "torch.Tensor"]
    source: str = "replica"


@dataclass(frozen=True)
class Commit:
    """Everything one view changes on this rank, applied by :meth:`EngineHooks.commit` at once.

    Attributes:
        epoch: the view's epoch; from now on the engine tags its traffic with it.
        view: the installed :class:`~elasticep.membership.View`.
        placement: the new placement (every rank's slots, ``[layers, ranks * slots_per_rank]``).
        alive: per rank of ``placement``, whether it serves in this epoch (``len == num_ranks``).
        staged: the local slots whose expert changes, with their new weights.
        group: what ``rebuild_collectives`` (or the agent's gloo builder) returned, or None.
        sources: how many experts came from each kind of source.
    """

    epoch: int
    view: "View"
    placement: "Placement"
    alive: tuple[bool, ...]
    staged: Sequence[StagedSlot] = ()
    group: Any = None
    sources: Mapping[str, int] = field(default_factory=dict)


class EngineHooks:
    """The engine's side of the agent; see the module docs for each hook's contract.

    Only :meth:`placement` and :meth:`commit` must be overridden.
    """

    def placement(self) -> "Placement":
        """The placement this rank serves now."""
        raise NotImplementedError(f"{type(self).__name__} must implement placement()")

    def commit(self, change: Commit) -> None:
        """Apply ``change`` (placement, staged weights, live mask, group, epoch) in one step."""
        raise NotImplementedError(f"{type(self).__name__} must implement commit()")

    def expert_layout(self) -> "ExpertLayout | None":
        """The layout of this rank's expert tensors, or None if the engine moves weights itself."""
        return None

    def read_expert(self, layer: int, slot: int) -> Mapping[str, "torch.Tensor"]:
        """The served tensors of local ``slot`` (a global slot index) in MoE layer ``layer``."""
        raise NotImplementedError(f"{type(self).__name__} declares an expert layout but no read_expert()")

    def disk_source(self) -> "DiskSource | None":
        """Where experts that no live rank holds are read from (the checkpoint), or None."""
        return None

    def expert_checksums(self) -> "Mapping[tuple[int, int], int] | None":
        """CRC32 of each expert's correct bytes, to refuse a wrong replica; None skips the check."""
        return None

    def on_view(self, view: "View") -> None:
        """A view was installed (not yet committed): must not block."""

    def rebuild_collectives(self, view: "View") -> Any:
        """Rebuild or mask collectives over ``view.members``; return the group for :class:`Commit`."""
        return None

    def kernel_timeouts(self) -> "list[PeerTimeout]":
        """Peer timeouts the engine's own kernel recorded since the last call."""
        return []

    def pause_admission(self) -> None:
        """Stop admitting new requests until :meth:`resume_admission`."""

    def resume_admission(self) -> None:
        """Admit requests again."""

    def expert_load(self) -> "torch.Tensor | None":
        """Recorded load per (MoE layer, logical expert) for the leader's replan; None: uniform."""
        return None

    def drain(self, reason: str) -> None:
        """The operator asked this rank to leave (``POST /drain``): start the graceful leave.
        Default: none; the agent then leaves on its own and the engine learns it at
        :meth:`Agent.boundary`."""

    def overrides(self, name: str) -> bool:
        """Whether this object overrides hook ``name`` (the agent skips the defaults)."""
        return getattr(type(self), name, None) is not getattr(EngineHooks, name, None)
