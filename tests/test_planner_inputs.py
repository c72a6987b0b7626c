"""The planner's live-rank argument cannot be misread: SGLang's int32 0/1 mask, rank ids, scale-up."""

from __future__ import annotations

import pytest
import torch

from elasticep.eplb import initial, replan
from elasticep.errors import InvalidArgument


def _case(R: int = 8, S: int = 3, E: int = 16):
    load = torch.ones(2, E, dtype=torch.float64)
    return initial(load, R, S), load


def test_int32_active_ranks_as_alive_is_refused_not_misread() -> None:
    current, load = _case()
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.int32)
    with pytest.raises(InvalidArgument, match="alive_mask"):
        replan(current, load, mask)
    plan = replan(current, load, alive_mask=mask)
    assert plan.alive.tolist() == [True] * 5 + [False] + [True] * 2
    assert not bool((plan.placement.phy2log[:, 15:18] >= 0).any())  # rank 5 holds nothing


def test_a_01_list_is_not_taken_for_rank_ids() -> None:
    current, load = _case()
    with pytest.raises(InvalidArgument, match="twice"):
        replan(current, load, [1, 1, 1, 1, 1, 0, 1, 1])


def test_scale_up_with_rank_ids() -> None:
    current, load = _case()
    plan = replan(current, load, range(10))
    assert plan.placement.num_ranks == 10 and bool(plan.alive.all())
    same = replan(current, load, alive_ranks=list(range(10)))
    assert same.placement == plan.placement
    assert bool((plan.placement.phy2log[:, 24:] >= 0).any())  # the new ranks take experts


def test_exactly_one_form() -> None:
    current, load = _case()
    with pytest.raises(InvalidArgument, match="once"):
        replan(current, load)
    with pytest.raises(InvalidArgument, match="once"):
        replan(current, load, alive_mask=torch.ones(8, dtype=torch.bool), alive_ranks=[0])
    with pytest.raises(InvalidArgument, match="other than 0 and 1"):
        replan(current, load, alive_mask=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]))
