"""Expert placement and the EPLB planner: pure code, tensors in, placements and move lists out."""

from elasticep.eplb.placement import EMPTY, Placement, RedundancyExhausted

__all__ = ["EMPTY", "Placement", "RedundancyExhausted"]
