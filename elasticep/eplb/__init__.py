"""Expert placement and the EPLB planner: pure code, tensors in, placements and move lists out.

:class:`Placement` is the physical-to-logical map of every MoE layer (SGLang-compatible);
:func:`initial` computes a balanced first placement; :func:`replan` plans from the current one
after a membership change: coverage repair with the fewest moves, then rebalance within a budget.
"""

from elasticep.eplb.placement import EMPTY, Placement, RedundancyExhausted
from elasticep.eplb.planner import (
    Move,
    Plan,
    balance,
    initial,
    layer_balance,
    lower_bound,
    moved_slots,
    replan,
)

__all__ = [
    "EMPTY",
    "Move",
    "Placement",
    "Plan",
    "RedundancyExhausted",
    "balance",
    "initial",
    "layer_balance",
    "lower_bound",
    "moved_slots",
    "replan",
]
