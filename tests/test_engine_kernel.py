"""RankModel over the CPU kernel across real rank processes, each holding only its own slots."""

from __future__ import annotations

import json
import threading
import uuid

import pytest

from elasticep.engine import round_robin_placement
from elasticep.engine.spmd import result_key
from elasticep.engine.zygote import Zygote

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(120)]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(tcp_store, tiny_model, placement, prompts, new, kill=None):
    """Fork one kernel rank per prompt from the zygote; return ({rank: exit code}, {rank: result})."""
    from elasticep.kernel import unlink_segment

    cluster = uuid.uuid4().hex[:10]
    zygote = Zygote.shared()
    codes: dict[int, int] = {}
    done = threading.Condition()

    def on_exit(pid: int, code: int) -> None:
        with done:
            codes[pid] = code
            done.notify_all()

    unlisten = zygote.add_exit_listener(on_exit)
    pids = {}
    try:
        for rank, prompt in enumerate(prompts):
            args = [
                "127.0.0.1", tcp_store.port, cluster, rank, str(tiny_model), placement.to_dict(), prompt, new,
                kill[1] if kill is not None and kill[0] == rank else -1, 1_000_000,
            ]
            pids[zygote.fork("elasticep.engine.spmd:run_spmd_rank", args)] = rank
        with done:
            assert done.wait_for(lambda: all(p in codes for p in pids), timeout=90), "ranks did not finish"
    finally:
        unlisten()
        for epoch in range(3):
            unlink_segment(cluster, epoch)
    exits = {pids[p]: codes[p] for p in pids}
    results = {}
    for rank, code in exits.items():
        if code == 0:
            results[rank] = json.loads(tcp_store.get(result_key(cluster, rank)))
    return exits, results


PROMPTS = [[3, 4, 5, 6], [10, 20, 30, 40], [7, 8, 9, 1], [100, 101, 102, 103]]


def test_kernel_ranks_equal_oracle(tcp_store, tiny_model, oracle) -> None:
    placement = round_robin_placement(2, 16, 2, 9)  # 18 slots: experts 0, 1 twice
    exits, results = _run(tcp_store, tiny_model, placement, PROMPTS[:2], 6)
    assert exits == {0: 0, 1: 0}
    for rank, prompt in enumerate(PROMPTS[:2]):
        assert results[rank]["tokens"] == oracle.generate(prompt, 6)
        assert results[rank]["views"] == []


def test_survivors_replay_the_step_after_a_rank_dies(tcp_store, tiny_model, oracle) -> None:
    # 4 ranks x 8 slots: every expert twice, on two different ranks
    placement = round_robin_placement(2, 16, 4, 8)
    exits, results = _run(tcp_store, tiny_model, placement, PROMPTS, 6, kill=(2, 3))
    assert exits[2] == -9
    assert {r: c for r, c in exits.items() if r != 2} == {0: 0, 1: 0, 3: 0}
    for rank in (0, 1, 3):
        assert results[rank]["tokens"] == oracle.generate(PROMPTS[rank], 6), f"rank {rank}"
        # each survivor moved once, at the step the dead rank never reached, to a view without it
        assert results[rank]["views"] == [{"epoch": 1, "alive": [True, True, False, True], "at_step": 3}]
