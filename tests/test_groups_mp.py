"""Real processes, a real TCPStore, real gloo: kill one of four ranks, rebuild over the survivors."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import signal
import threading
import time

import pytest
import torch
import torch.distributed as dist

from elasticep.events import ViewInstalled

pytestmark = pytest.mark.multiproc

REBUILD_BOUND_S = 10.0
"""The survivors' rebuild plus one all-reduce must finish within this, s: far below the old
group's 30 s op timeout, which proves the abort (not the timeout) ended it, with room for a loaded
2-core machine."""


def _rank_main(rank: int, port: int, results: mp.Queue, views: mp.Queue) -> None:
    import faulthandler

    from elasticep.groups import CollectiveFailed, GlooGroups

    # A rank that hangs dumps its threads' stacks and exits, rather than outliving the test.
    faulthandler.dump_traceback_later(40, exit=True)

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10))
    # A long op timeout: the in-flight collective on the old group must end because rebuild
    # aborts it, not because its own timeout expired.
    builder = GlooGroups(store, rank, op_timeout_s=30.0, rendezvous_timeout_s=8.0)
    members = (0, 1, 2, 3)
    group = builder.rebuild(ViewInstalled(epoch=1, members=members, leader=0, rank=rank))
    t = torch.full((4,), float(rank + 1))
    group.all_reduce(t)
    results.put(("epoch1", rank, t.tolist()))
    if rank == 3:
        time.sleep(60)  # killed by the test
        return
    new_view = views.get(timeout=20)
    # A collective still running on the old group when the new view arrives (as a step would
    # be): rank 3 is dead, so without an abort some survivors would wait the full 30 s.
    outcome: list[str] = []

    def stuck() -> None:
        try:
            group.all_reduce(torch.ones(1 << 16))
            outcome.append("completed")
        except CollectiveFailed as exc:
            outcome.append(f"failed:{exc.event.op}")

    thread = threading.Thread(target=stuck, daemon=True)
    thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    new_group = builder.rebuild(ViewInstalled(epoch=new_view[0], members=tuple(new_view[1]), leader=0, rank=rank))
    t = torch.full((2,), float(rank + 1))
    new_group.all_reduce(t)
    elapsed = time.monotonic() - started
    thread.join(timeout=5)
    results.put(
        (
            "epoch2",
            rank,
            t.tolist(),
            elapsed,
            new_group.group_rank,
            [new_group.to_global(i) for i in range(new_group.size)],
            outcome[:1] if not thread.is_alive() else ["still-blocked"],
            group.aborted,
        )
    )
    # Leave without the interpreter's teardown (gloo threads of the aborted group): the test
    # only needs the result, flushed first.
    results.close()
    results.join_thread()
    os._exit(0)


@pytest.mark.timeout(100)
def test_kill_one_of_four_survivors_rebuild_and_all_reduce(tcp_store: dist.TCPStore) -> None:
    # fork: the children start in milliseconds instead of importing torch again each
    ctx = mp.get_context("fork")
    # One result queue per rank: a rank killed while its queue's feeder holds the write lock
    # would leave a shared queue locked for everyone.
    results = [ctx.Queue() for _ in range(4)]
    view_queues = [ctx.Queue() for _ in range(4)]
    procs = [
        ctx.Process(target=_rank_main, args=(r, tcp_store.port, results[r], view_queues[r]), daemon=True)
        for r in range(4)
    ]
    try:
        for p in procs:
            p.start()
        first = [results[r].get(timeout=60) for r in range(4)]
        assert [r[2] for r in first] == [[10.0] * 4] * 4
        os.kill(procs[3].pid, signal.SIGKILL)
        procs[3].join(5)
        for r in range(3):
            view_queues[r].put((2, [0, 1, 2]))
        second = [results[r].get(timeout=45) for r in range(3)]
        for kind, rank, values, elapsed, group_rank, to_global, stuck, old_aborted in second:
            assert kind == "epoch2"
            assert values == [6.0, 6.0], f"rank {rank} reduced to {values}"
            assert group_rank == rank and to_global == [0, 1, 2]
            assert elapsed < REBUILD_BOUND_S, f"rank {rank} took {elapsed:.2f} s to rebuild and reduce"
            assert old_aborted
            assert stuck == ["failed:all_reduce"], f"rank {rank}: old collective {stuck}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(5)
