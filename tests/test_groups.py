"""Healthy-rank groups: the interface contract in one process, and GPU backends' skips."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import elasticep.groups as groups
from elasticep import metrics
from elasticep.events import ViewInstalled
from elasticep.groups import GlooGroups, GroupAborted, NotAMember, StaleGroupEpoch


def view(epoch: int, members: tuple[int, ...]) -> ViewInstalled:
    return ViewInstalled(epoch=epoch, members=members, leader=members[0], rank=members[0])


def test_all_names_exported() -> None:
    for name in groups.__all__:
        assert hasattr(groups, name), name


def test_single_rank_group_reduces_and_maps_ranks() -> None:
    builder = GlooGroups(dist.HashStore(), rank=5, op_timeout_s=2, rendezvous_timeout_s=2)
    group = builder.rebuild(view(3, (5,)))
    assert (group.epoch, group.members, group.group_rank, group.size) == (3, (5,), 0, 1)
    assert group.to_global(0) == 5 and group.to_group(5) == 0
    t = torch.arange(4, dtype=torch.float32)
    assert group.all_reduce(t, "max").tolist() == [0, 1, 2, 3]
    assert builder.current is group
    with pytest.raises(NotAMember):
        group.to_group(4)


def test_stale_view_refused_and_counted() -> None:
    builder = GlooGroups(dist.HashStore(), rank=0, op_timeout_s=2, rendezvous_timeout_s=2)
    first = builder.rebuild(view(4, (0,)))
    before = metrics.sample("elasticep_stale_epoch_refused_total", {"channel": "collective"})
    with pytest.raises(StaleGroupEpoch):
        builder.rebuild(view(4, (0,)))
    with pytest.raises(StaleGroupEpoch):
        builder.rebuild(view(2, (0,)))
    assert metrics.sample("elasticep_stale_epoch_refused_total", {"channel": "collective"}) == before + 2
    # the refused views left the current group untouched
    assert builder.current is first and not first.aborted


def test_rebuild_aborts_the_old_group() -> None:
    builder = GlooGroups(dist.HashStore(), rank=1, op_timeout_s=2, rendezvous_timeout_s=2)
    old = builder.rebuild(view(1, (1,)))
    new = builder.rebuild(view(2, (1,)))
    assert old.aborted and not new.aborted
    with pytest.raises(GroupAborted):
        old.all_reduce(torch.ones(1))
    assert new.all_reduce(torch.ones(1)).item() == 1


def test_view_without_this_rank_refused() -> None:
    builder = GlooGroups(dist.HashStore(), rank=2, op_timeout_s=2, rendezvous_timeout_s=2)
    with pytest.raises(NotAMember):
        builder.rebuild(view(1, (0, 1)))
    with pytest.raises(ValueError):
        builder.rebuild(view(2, (2, 2)))


def test_nccl_groups_need_a_gpu() -> None:
    reason = groups.nccl_unavailable_reason()
    if reason is None:
        pytest.skip("a CUDA GPU is present; the NCCL path is exercised by the GPU check")
    assert "GPU" in reason or "NCCL" in reason
    with pytest.raises(RuntimeError, match="NCCL groups unavailable"):
        groups.NcclGroups(dist.HashStore(), 0, 0)


@pytest.mark.gpu
def test_nccl_single_rank_group_on_gpu() -> None:
    reason = groups.nccl_unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs an NVIDIA GPU with NCCL: {reason}")
    builder = groups.NcclGroups(dist.HashStore(), 0, 0, op_timeout_s=10)
    group = builder.rebuild(view(1, (0,)))
    t = torch.ones(8, device="cuda")
    assert group.all_reduce(t).sum().item() == 8
    group2 = builder.rebuild(view(2, (0,)))
    assert group.aborted and group2.all_reduce(torch.ones(2, device="cuda")).sum().item() == 2


@pytest.mark.gpu
def test_mooncake_backend_groups_on_gpu() -> None:
    reason = groups.mooncake_unavailable_reason()
    if reason is not None:
        pytest.skip(f"needs an NVIDIA GPU and the CUDA build of Mooncake: {reason}")
    with pytest.raises(ValueError):
        groups.MooncakeGroups(None, torch.ones(2, dtype=torch.int64), 0)


@pytest.mark.timeout(30)
def test_member_missing_from_rendezvous_fails_within_the_bound() -> None:
    import time

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    builder = GlooGroups(store, rank=0, op_timeout_s=1, rendezvous_timeout_s=1)
    started = time.monotonic()
    with pytest.raises(groups.RendezvousFailed) as info:
        builder.rebuild(view(6, (0, 1)))  # rank 1 never comes
    assert time.monotonic() - started < 10
    assert info.value.event.op == "rendezvous" and info.value.event.observer == 0
    assert builder.current is None
    # the next view is still accepted (the failed epoch is used up, not the builder)
    assert builder.rebuild(view(7, (0,))).all_reduce(torch.ones(1)).item() == 1
