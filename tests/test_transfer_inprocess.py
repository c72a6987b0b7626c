"""The in-process transport twin: same executor, seeded faults, no engine needed."""

from __future__ import annotations

import time

import torch

from elasticep.transfer import (
    ExpertLayout,
    ExpertMove,
    ExpertWeights,
    HostBackup,
    InProcessNetwork,
    SourcesExhausted,
    TransferExecutor,
)

LAYOUT = ExpertLayout.deepseek(num_layers=1, slots_per_rank=2, hidden_size=16, moe_intermediate_size=8, dtype=torch.float32)


def setup(net: InProcessNetwork):
    g = torch.Generator().manual_seed(0)
    src_w = ExpertWeights.allocate(LAYOUT)
    src_w.arena.copy_(torch.randint(0, 256, src_w.arena.shape, dtype=torch.uint8, generator=g))
    src = TransferExecutor(0, src_w, net.transport())
    backup = HostBackup(LAYOUT, 2, transport=net.transport())
    for e in range(2):
        backup.put(0, e, src_w.expert(0, e))
    dst = TransferExecutor(1, ExpertWeights.allocate(LAYOUT), net.transport(timeout_s=0.2))
    dst.learn(src.endpoint())
    dst.learn(backup.endpoint(epoch=0))
    return src, backup, dst


MOVES = [ExpertMove(0, 2, 0, (0,)), ExpertMove(0, 3, 1, (1,))]


def equal(a: TransferExecutor, b: TransferExecutor) -> bool:
    return all(
        torch.equal(a.weights.tensor(0, e, n).view(torch.uint8), b.weights.tensor(0, e, n).view(torch.uint8)) for e in range(2) for n in ("gate_proj", "down_proj")
    )


def test_healthy_network_moves_bytes() -> None:
    src, _, dst = setup(InProcessNetwork())
    report = dst.run(MOVES, epoch=1)
    assert report.by_source() == {"replica": 2} and equal(src, dst)


def test_killed_and_hung_sources_fall_back() -> None:
    net = InProcessNetwork()
    src, backup, dst = setup(net)
    net.kill(src.transport.peer)
    report = dst.run(MOVES, epoch=1)
    assert report.by_source() == {"host": 2} and equal(src, dst)
    assert [f.source_kind for f in report.failures] == ["replica", "replica"]

    net.heal(src.transport.peer)
    net.hang(src.transport.peer)
    started = time.monotonic()
    report = dst.run(MOVES, epoch=2)
    assert report.by_source() == {"host": 2} and time.monotonic() - started < 2

    net.kill(backup.transport.peer)
    try:
        dst.run(MOVES, epoch=3)
        raise AssertionError("expected SourcesExhausted")
    except SourcesExhausted as exc:
        assert len(exc.report.unrecoverable) == 2


def test_seeded_drops_are_reproducible() -> None:
    def outcome(seed: int) -> list[str]:
        net = InProcessNetwork(seed=seed, drop=0.5)
        _, _, dst = setup(net)
        moves = [ExpertMove(0, 2 + (i % 2), i % 2, (i % 2,)) for i in range(2)]
        kinds = []
        for epoch in range(1, 6):
            try:
                kinds.append(",".join(sorted(r.source_kind for r in dst.run(moves, epoch=epoch).moved)))
            except SourcesExhausted:
                kinds.append("exhausted")
        return kinds

    assert outcome(7) == outcome(7)
    assert any(k != "replica,replica" for k in outcome(7))
