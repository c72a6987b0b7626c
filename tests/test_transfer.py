"""Weight transfer in one process: real Mooncake transfer engines over TCP, real safetensors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import elasticep.transfer as transfer
from elasticep import metrics
from elasticep.events import TransferEndpoint
from elasticep.transfer import (
    DiskSource,
    ExpertLayout,
    ExpertMove,
    ExpertWeights,
    HostBackup,
    MooncakeTransport,
    SourcesExhausted,
    StaleEpoch,
    TransferExecutor,
)

reason = transfer.mooncake_te_unavailable_reason()
needs_te = pytest.mark.skipif(reason is not None, reason=str(reason))

LAYOUT = ExpertLayout.deepseek(
    num_layers=2, slots_per_rank=2, hidden_size=64, moe_intermediate_size=32, dtype=torch.bfloat16
)
NUM_EXPERTS = 4
NAMES = [t.name for t in LAYOUT.tensors]


def expert_tensors(layer: int, expert: int) -> dict[str, torch.Tensor]:
    """The reference bytes of one expert: seeded by (layer, expert)."""
    g = torch.Generator().manual_seed(1000 * layer + expert)
    return {t.name: torch.randn(t.shape, generator=g).to(t.dtype) for t in LAYOUT.tensors}


def filled(rank: int, phy2log: list[list[int]]) -> ExpertWeights:
    """Rank ``rank``'s buffers holding the experts ``phy2log`` gives its slots."""
    w = ExpertWeights.allocate(LAYOUT)
    spr = LAYOUT.slots_per_rank
    for layer, row in enumerate(phy2log):
        for local in range(spr):
            expert = row[rank * spr + local]
            if expert >= 0:
                for name, t in expert_tensors(layer, expert).items():
                    w.tensor(layer, local, name).copy_(t)
    return w


def holds(w: ExpertWeights, layer: int, local: int, expert: int) -> bool:
    ref = expert_tensors(layer, expert)
    return all(torch.equal(w.tensor(layer, local, n), ref[n]) for n in NAMES)


CHECKSUMS = {
    (layer, e): transfer.expert_crc32(expert_tensors(layer, e).values()) for layer in range(2) for e in range(NUM_EXPERTS)
}


@pytest.fixture(scope="module")
def engines():
    """Two transfer engines shared by the module's tests (an engine lives as long as its process)."""
    if reason is not None:
        pytest.skip(reason)
    return MooncakeTransport(), MooncakeTransport()


def test_all_names_exported() -> None:
    for name in transfer.__all__:
        assert hasattr(transfer, name), name


def test_layout_maps_slots_to_buffers() -> None:
    ext = LAYOUT.locate(1, 3, "down_proj")
    assert (ext.rank, ext.buffer, ext.offset, ext.nbytes) == (1, "L1.down_proj", 64 * 32 * 2, 64 * 32 * 2)
    assert LAYOUT.expert_nbytes == 3 * 64 * 32 * 2
    assert LAYOUT.parse_buffer_name("L12.gate_proj") == (12, "gate_proj")
    assert LAYOUT.parse_buffer_name("experts") is None
    w = ExpertWeights.allocate(LAYOUT, layers=[1])
    assert w.layers == (1,) and set(w.endpoint_buffers()) == {f"L1.{n}" for n in NAMES}
    addr, nbytes = w.address(1, 1, "up_proj")
    assert addr == w.buffers["L1.up_proj"].data_ptr() + nbytes
    with pytest.raises(ValueError):
        ExpertWeights(LAYOUT, {"L0.gate_proj": torch.zeros(2, 32, 64, dtype=torch.bfloat16)})  # up/down missing
    with pytest.raises(ValueError):
        ExpertLayout(1, 1, (transfer.ExpertTensor("a.b", (1,), torch.float32),))


@needs_te
def test_replica_bytes_equal_and_checksummed(engines) -> None:
    phy2log = [[0, 1, -1, -1], [2, 3, -1, -1]]
    src = TransferExecutor(0, filled(0, phy2log), engines[0])
    dst_w = ExpertWeights.allocate(LAYOUT)
    dst = TransferExecutor(1, dst_w, engines[1], checksums=CHECKSUMS)
    try:
        assert dst.learn(src.endpoint())
        moves = [ExpertMove(layer, 2 + local, phy2log[layer][local], (local,)) for layer in range(2) for local in range(2)]
        report = dst.run(moves, epoch=1, timeout=20)
        assert report.by_source() == {"replica": 4} and report.failures == []
        assert report.bytes == 4 * LAYOUT.expert_nbytes
        for layer in range(2):
            for local in range(2):
                assert holds(dst_w, layer, local, phy2log[layer][local])
    finally:
        src.close()
        dst.close()


@needs_te
def test_checksum_mismatch_falls_back_to_host_backup(engines) -> None:
    phy2log = [[0, 1, -1, -1], [2, 3, -1, -1]]
    corrupt = filled(0, phy2log)
    corrupt.tensor(0, 1, "down_proj")[0, 0] += 1  # slot 1 of layer 0 holds damaged bytes
    src = TransferExecutor(0, corrupt, engines[0])
    backup = HostBackup(LAYOUT, NUM_EXPERTS, backup_id=0)
    for layer in range(2):
        for e in range(NUM_EXPERTS):
            backup.put(layer, e, expert_tensors(layer, e))
    dst_w = ExpertWeights.allocate(LAYOUT)
    dst = TransferExecutor(1, dst_w, engines[1], checksums=CHECKSUMS)
    try:
        dst.learn(src.endpoint())
        dst.learn(backup.endpoint(epoch=0))
        before = metrics.sample("elasticep_transfer_failures_total", {"source": "replica", "reason": "checksum mismatch"})
        report = dst.run([ExpertMove(0, 3, 1, (1,)), ExpertMove(0, 2, 0, (0,))], epoch=1, timeout=20)
        assert holds(dst_w, 0, 1, 1) and holds(dst_w, 0, 0, 0)
        assert sorted((r.slot, r.source_kind) for r in report.moved) == [(2, "replica"), (3, "host")]
        [failed] = report.failures
        assert (failed.src, failed.dst, failed.expert, failed.source_kind, failed.reason) == (
            0, 1, 1, "replica", "checksum mismatch",
        )
        assert metrics.sample(
            "elasticep_transfer_failures_total", {"source": "replica", "reason": "checksum mismatch"}
        ) == before + 1
    finally:
        src.close()
        dst.close()
        backup.transport.unregister_all()


@needs_te
def test_stale_epoch_refused_and_counted(engines) -> None:
    dst = TransferExecutor(1, ExpertWeights.allocate(LAYOUT), engines[1], epoch=5)
    try:
        before = metrics.sample("elasticep_stale_epoch_refused_total", {"channel": "transfer"})
        with pytest.raises(StaleEpoch) as info:
            dst.submit([ExpertMove(0, 2, 0, (0,))], epoch=4)
        assert (info.value.epoch, info.value.current) == (4, 5)
        assert metrics.sample("elasticep_stale_epoch_refused_total", {"channel": "transfer"}) == before + 1
        # an endpoint older than the one known for that rank is refused too
        assert dst.learn(TransferEndpoint(rank=0, epoch=5, peer="127.0.0.1:1", buffers={}))
        assert not dst.learn(TransferEndpoint(rank=0, epoch=3, peer="127.0.0.1:2", buffers={}))
    finally:
        dst.close()


@needs_te
def test_job_abandoned_when_a_newer_view_arrives(engines) -> None:
    # Expert 0 is on slots 0 and 1 of rank 0; slot 0's copy is damaged, so the first read fails
    # its checksum and slot 1 would be tried next.
    phy2log = [[0, 0, -1, -1], [2, 3, -1, -1]]
    src_w = filled(0, phy2log)
    src_w.tensor(0, 0, "gate_proj")[0, 0] += 1
    src = TransferExecutor(0, src_w, engines[0])
    dst = TransferExecutor(1, ExpertWeights.allocate(LAYOUT), engines[1], epoch=1, checksums=CHECKSUMS)
    # A newer view is installed while the first batch is in flight (as the pipeline does on a
    # second failure): the retry must not start and the job must refuse to report success.
    dst.on_submit = lambda kind, rank, phase: dst.advance(3) if phase == "submitted" else None
    try:
        dst.learn(src.endpoint())
        job = dst.submit([ExpertMove(0, 2, 0, (0, 1))], epoch=2)
        with pytest.raises(StaleEpoch) as info:
            job.result(timeout=20)
        assert (info.value.epoch, info.value.current) == (2, 3)
        report = info.value.report
        assert report is not None and report.moved == [] and len(report.failures) == 1
        # the same moves for the new epoch go through, from the good copy
        dst.on_submit = None
        report = dst.run([ExpertMove(0, 2, 0, (0, 1))], epoch=3, timeout=20)
        assert [(r.source_kind, r.source_rank) for r in report.moved] == [("replica", 0)]
        assert len(report.failures) == 1 and holds(dst.weights, 0, 0, 0)
    finally:
        src.close()
        dst.close()


@needs_te
def test_local_replica_disk_and_overwritten_sources(engines, tmp_path: Path) -> None:
    # rank 1 holds [expert 2, expert 3] in layer 0; the plan moves expert 3 into its slot 2 and
    # expert 0 over the expert-2 slot of rank 0 ... which it must not read while overwritten.
    tensors = {}
    for layer in range(2):
        for e in range(NUM_EXPERTS):
            for n, t in expert_tensors(layer, e).items():
                tensors[transfer.TRANSFORMERS_EXPERT_KEY.format(layer=layer + 1, expert=e, tensor=n)] = t
    save_file(tensors, str(tmp_path / "model.safetensors"))
    disk = DiskSource(tmp_path, layer_offset=1)
    phy2log = [[-1, -1, 2, 3], [-1, -1, 2, 3]]
    dst_w = filled(1, phy2log)
    dst = TransferExecutor(1, dst_w, engines[1], disk=disk, checksums=CHECKSUMS)
    try:
        moves = [
            ExpertMove(0, 2, 3, (3,)),  # local copy from this rank's slot 3
            ExpertMove(1, 3, 1, ()),  # no live replica: disk
            ExpertMove(1, 2, 3, (3,)),  # source slot 3 of layer 1 is overwritten by the move above: disk
        ]
        report = dst.run(moves, epoch=1, timeout=20)
        kinds = {(r.layer, r.slot): r.source_kind for r in report.moved}
        assert kinds == {(0, 2): "replica", (1, 3): "disk", (1, 2): "disk"}
        assert holds(dst_w, 0, 0, 3) and holds(dst_w, 1, 1, 1) and holds(dst_w, 1, 0, 3)
        with pytest.raises(SourcesExhausted) as info:
            TransferExecutor(1, ExpertWeights.allocate(LAYOUT), engines[1]).run(
                [ExpertMove(0, 2, 1, ())], epoch=1, timeout=10
            )
        assert [m.expert for m in info.value.report.unrecoverable] == [1]
    finally:
        dst.close()


@needs_te
@pytest.mark.asyncio
async def test_run_async_does_not_block_the_loop(engines) -> None:
    phy2log = [[0, 1, -1, -1], [2, 3, -1, -1]]
    src = TransferExecutor(0, filled(0, phy2log), engines[0])
    dst_w = ExpertWeights.allocate(LAYOUT)
    dst = TransferExecutor(1, dst_w, engines[1])
    try:
        dst.learn(src.endpoint())
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        report = await asyncio.wait_for(dst.run_async([ExpertMove(1, 3, 3, (1,))], epoch=1), 20)
        task.cancel()
        assert report.by_source() == {"replica": 1} and holds(dst_w, 1, 1, 3) and ticks > 0
    finally:
        src.close()
        dst.close()


@needs_te
def test_planner_moves_after_a_rank_dies(engines) -> None:
    """The planner's own ``Plan.moves`` drive the executors: after rank 2 of 3 dies, every live
    slot holds the expert the new placement gives it, whatever the plan moved or swapped."""
    from elasticep.eplb import initial, replan

    torch.manual_seed(0)
    layout = ExpertLayout.deepseek(
        num_layers=2, slots_per_rank=3, hidden_size=64, moe_intermediate_size=32, dtype=torch.bfloat16
    )
    load = torch.rand(2, NUM_EXPERTS * 1) * 100 + 1
    current = initial(load, num_ranks=3, slots_per_rank=3)
    plan = replan(current, load, alive=[0, 1])
    assert plan.num_moves > 0
    phy2log = current.phy2log.tolist()

    def rank_weights(rank: int) -> ExpertWeights:
        w = ExpertWeights.allocate(layout)
        for layer in range(2):
            for local in range(3):
                e = phy2log[layer][rank * 3 + local]
                if e >= 0:
                    for name, t in expert_tensors(layer, e).items():
                        w.tensor(layer, local, name).copy_(t)
        return w

    backup = HostBackup(layout, NUM_EXPERTS, backup_id=0)
    for layer in range(2):
        for e in range(NUM_EXPERTS):
            backup.put(layer, e, expert_tensors(layer, e))
    executors = [
        TransferExecutor(0, rank_weights(0), engines[0], checksums=CHECKSUMS),
        TransferExecutor(1, rank_weights(1), engines[1], checksums=CHECKSUMS),
    ]
    try:
        for ex in executors:
            for other in executors:
                if other is not ex:
                    ex.learn(other.endpoint())
            ex.learn(backup.endpoint(epoch=0))
        reports = [ex.run(plan.moves, epoch=2, alive=[0, 1], timeout=30) for ex in executors]
        assert sum(len(r.moved) for r in reports) == plan.num_moves
        assert all(r.failures == [] for r in reports)
        kinds = {k for r in reports for k in r.by_source()}
        assert "replica" in kinds, kinds  # the plan's live sources are used, not only the backup
        new = plan.placement.phy2log.tolist()
        for rank, ex in enumerate(executors):
            for layer in range(2):
                for local in range(3):
                    e = new[layer][rank * 3 + local]
                    if e >= 0:
                        ref = expert_tensors(layer, e)
                        assert all(torch.equal(ex.weights.tensor(layer, local, n), ref[n]) for n in NAMES)
    finally:
        for ex in executors:
            ex.close()
        backup.transport.unregister_all()


@needs_te
@pytest.mark.asyncio
async def test_stage_then_apply_at_commit(engines) -> None:
    """The pipeline's weights phase: ``stage(plan, epoch)`` loads into staging while the serving
    slots keep the old placement; ``apply`` at the commit puts the new placement in place."""
    from elasticep.eplb import initial, replan

    torch.manual_seed(1)
    layout = ExpertLayout.deepseek(
        num_layers=2, slots_per_rank=3, hidden_size=64, moe_intermediate_size=32, dtype=torch.bfloat16
    )
    load = torch.rand(2, NUM_EXPERTS) * 100 + 1
    current = initial(load, num_ranks=3, slots_per_rank=3)
    plan = replan(current, load, alive=[0, 1])
    old, new = current.phy2log.tolist(), plan.placement.phy2log.tolist()

    def rank_weights(rank: int) -> ExpertWeights:
        w = ExpertWeights.allocate(layout)
        for layer in range(2):
            for local in range(3):
                e = old[layer][rank * 3 + local]
                if e >= 0:
                    for name, t in expert_tensors(layer, e).items():
                        w.tensor(layer, local, name).copy_(t)
        return w

    def serves(ex: TransferExecutor, placement: list[list[int]]) -> bool:
        return all(
            all(torch.equal(ex.weights.tensor(layer, local, n), t) for n, t in expert_tensors(layer, e).items())
            for layer in range(2)
            for local in range(3)
            if (e := placement[layer][ex.rank * 3 + local]) >= 0
        )

    backup = HostBackup(layout, NUM_EXPERTS, backup_id=0)
    for layer in range(2):
        for e in range(NUM_EXPERTS):
            backup.put(layer, e, expert_tensors(layer, e))
    executors = [TransferExecutor(r, rank_weights(r), engines[r], checksums=CHECKSUMS) for r in (0, 1)]
    staged = []
    try:
        for ex in executors:
            for other in executors:
                if other is not ex:
                    ex.learn(other.endpoint())
            ex.learn(backup.endpoint(epoch=0))
        staged = [await asyncio.wait_for(ex.stage(plan, 2), 30) for ex in executors]
        assert sum(len(s.report.moved) for s in staged) == plan.num_moves
        assert all(serves(ex, old) for ex in executors)  # nothing serving changed before the commit
        for ex, s in zip(executors, staged):
            assert s.apply(ex.weights) == len(s.report.moved) * layout.expert_nbytes
        assert all(serves(ex, new) for ex in executors)
    finally:
        for s in staged:
            s.release()
        for ex in executors:
            ex.close()
        backup.transport.unregister_all()
