"""Weight transfer between real processes: a source killed mid-transfer gives way to the next.

A serving rank, two host backups and a checkpoint on disk hold the same experts; the receiving
rank kills each source it is told to right after submitting a batch to it, and must still end
with byte-equal weights, from the next source in order: replica, host backup 0, host backup 1,
disk. Children come from a forkserver (a fresh, engine-free process): a process that forks after
starting a Mooncake engine cannot start another in the child.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import elasticep.transfer as transfer
from elasticep.transfer import (
    DiskSource,
    ExpertLayout,
    ExpertMove,
    ExpertWeights,
    MooncakeTransport,
    TransferExecutor,
)

pytestmark = [
    pytest.mark.multiproc,
    pytest.mark.skipif(
        transfer.mooncake_te_unavailable_reason() is not None, reason=str(transfer.mooncake_te_unavailable_reason())
    ),
]

LAYOUT = ExpertLayout.deepseek(
    num_layers=2, slots_per_rank=2, hidden_size=512, moe_intermediate_size=256, dtype=torch.bfloat16
)
NUM_EXPERTS = 4
PHY2LOG = [[0, 1, -1, -1], [2, 3, -1, -1]]  # rank 0 serves every expert once; rank 1 is empty


def expert_tensors(layer: int, expert: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * layer + expert)
    return {t.name: torch.randn(t.shape, generator=g).to(t.dtype) for t in LAYOUT.tensors}


def _replica_main(conn) -> None:
    transport = MooncakeTransport()
    weights = ExpertWeights.allocate(LAYOUT)
    for layer, row in enumerate(PHY2LOG):
        for local in range(LAYOUT.slots_per_rank):
            for name, t in expert_tensors(layer, row[local]).items():
                weights.tensor(layer, local, name).copy_(t)
    executor = TransferExecutor(0, weights, transport)
    conn.send(executor.endpoint(epoch=1))
    time.sleep(60)  # serves reads from the engine's threads until killed


def _backup_main(conn, checkpoint: str, backup_id: int) -> None:
    transfer.run_host_backup(LAYOUT, NUM_EXPERTS, checkpoint, conn.send, backup_id=backup_id)


def _wait_stopped(pid: int, bound_s: float = 2.0) -> None:
    """Wait until every thread of ``pid`` is stopped (a signal reaches a running thread late)."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:
                continue
        if states and all(s in "tTZ" for s in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop within {bound_s} s")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    tensors = {
        transfer.TRANSFORMERS_EXPERT_KEY.format(layer=layer, expert=e, tensor=n): t
        for layer in range(LAYOUT.num_layers)
        for e in range(NUM_EXPERTS)
        for n, t in expert_tensors(layer, e).items()
    }
    save_file(tensors, str(root / "model.safetensors"))
    return root


@pytest.fixture(scope="module")
def receiver():
    """The receiving rank's engine, started after the forkserver exists (see module docs)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "elasticep.transfer"])
    return ctx, MooncakeTransport(timeout_s=2)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("killed", "served_by", "how"),
    [
        ({0}, ("host", -1), signal.SIGKILL),
        ({0, -1}, ("host", -2), signal.SIGKILL),
        ({0, -1, -2}, ("disk", -1), signal.SIGKILL),
        ({0}, ("host", -1), signal.SIGSTOP),
    ],
    ids=["replica-dies", "replica-and-backup0-die", "all-remote-sources-die", "replica-hangs"],
)
def test_killed_source_falls_back_to_the_next(receiver, checkpoint: Path, killed: set[int], served_by, how) -> None:
    """SIGKILL: the engine fails the batch in under a second. SIGSTOP (a hung source): only the
    receiver's ``MC_TRANSFER_TIMEOUT`` (2 s here) ends the wait."""
    ctx, transport = receiver
    procs: dict[int, mp.Process] = {}
    conns = {}
    try:
        for rank, target, args in [
            (0, _replica_main, ()),
            (-1, _backup_main, (str(checkpoint), 0)),
            (-2, _backup_main, (str(checkpoint), 1)),
        ]:
            parent, child = ctx.Pipe(duplex=False)
            procs[rank] = ctx.Process(target=target, args=(child, *args), daemon=True)
            procs[rank].start()
            conns[rank] = parent
        endpoints = {}
        for rank, conn in conns.items():
            assert conn.poll(60), f"source {rank} did not announce itself"
            endpoints[rank] = conn.recv()
        assert {ep.rank for ep in endpoints.values()} == {0, -1, -2}

        def kill_on_submit(kind: str, rank: int, phase: str) -> None:
            # Frozen before the batch is handed to the engine, killed (or left hung) right after:
            # the source cannot finish the transfer first, so it fails mid-transfer every time.
            if rank in killed and procs[rank].is_alive():
                pid = procs[rank].pid
                os.kill(pid, signal.SIGSTOP if phase == "submitting" else how)
                if phase == "submitting":
                    _wait_stopped(pid)

        checksums = {
            (layer, e): transfer.expert_crc32(expert_tensors(layer, e).values())
            for layer in range(LAYOUT.num_layers)
            for e in range(NUM_EXPERTS)
        }
        weights = ExpertWeights.allocate(LAYOUT)
        executor = TransferExecutor(
            1, weights, transport, disk=DiskSource(checkpoint), checksums=checksums, on_submit=kill_on_submit
        )
        for ep in endpoints.values():
            assert executor.learn(ep)
            assert executor.connect(ep.rank)  # handshake while healthy (see TransferExecutor.connect)
        moves = [
            ExpertMove(layer, 2 + local, PHY2LOG[layer][local], (local,))
            for layer in range(LAYOUT.num_layers)
            for local in range(LAYOUT.slots_per_rank)
        ]
        started = time.monotonic()
        report = executor.run(moves, epoch=1, alive=[0, 1], timeout=60)
        elapsed = time.monotonic() - started
        executor.close()

        assert {(r.source_kind, r.source_rank) for r in report.moved} == {served_by}
        assert len(report.moved) == 4 and report.bytes == 4 * LAYOUT.expert_nbytes
        order = [0, -1, -2]
        expected_failures = [(m.layer, m.expert, r) for r in order if r in killed for m in moves]
        got = [(f.layer, f.expert, f.src) for f in report.failures]
        assert sorted(got) == sorted(expected_failures)
        # each move tried its sources in cost order
        for m in moves:
            tried = [f.src for f in report.failures if (f.layer, f.expert) == (m.layer, m.expert)]
            assert tried == [r for r in order if r in killed]
        for layer in range(LAYOUT.num_layers):
            for local in range(LAYOUT.slots_per_rank):
                ref = expert_tensors(layer, PHY2LOG[layer][local])
                for name, t in ref.items():
                    assert torch.equal(weights.tensor(layer, local, name), t), (layer, local, name)
        bound = 15 if how == signal.SIGSTOP else 10
        assert elapsed < bound, f"fallback took {elapsed:.1f} s"
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
        for p in procs.values():
            p.join(5)
