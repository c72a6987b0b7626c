"""Expert placement and the EPLB planner: pure code, tensors in, placements and move lists out.

:class:`Placement` is the physical-to-logical map of every MoE layer (SGLang-compatible);
:func:`initial` computes a balanced first placement; :func:`replan` plans from the current one
after a membership change: coverage repair with the fewest moves, then rebalance within a budget;
:func:`balance_lower_bound` says how well balanced any plan can be at all.
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
from elasticep.eplb.bound import balance_lower_bound, layer_balance_lower_bound

__all__ = [
    "EMPTY",
    "Move",
    "Placement",
    "Plan",
    "RedundancyExhausted",
    "balance",
    "balance_lower_bound",
    "initial",
    "layer_balance",
    "layer_balance_lower_bound",
    "lower_bound",
    "moved_slots",
    "replan",
]
