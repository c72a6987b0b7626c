"""The launcher with real rank processes: start, kill, hang, mask, slow, restart, scale, retries."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from elasticep.engine import Launcher, LauncherError, RankNotRunning, RequestRejected
from elasticep.events import ProcessExit
from elasticep.testing import FaultInjector

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(90)]

PROMPTS = [[i, (7 * i) % 256, (13 * i + 5) % 256] for i in range(1, 9)]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The oracle runs in this process; one intra-op thread avoids OpenMP spin-waits on 2 cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check(results, oracle, prompts, new) -> None:
    for res, prompt in zip(results, prompts):
        assert res.tokens == oracle.generate(prompt, new), f"prompt {prompt} from rank {res.rank}"


def _exits(launcher: Launcher) -> tuple[list[tuple[float, ProcessExit]], threading.Event]:
    seen: list[tuple[float, ProcessExit]] = []
    event = threading.Event()

    def on_exit(ev: ProcessExit) -> None:
        seen.append((time.monotonic(), ev))
        event.set()

    launcher.on_exit(on_exit)
    return seen, event


def test_ranks_serve_greedy_outputs_equal_to_transformers(launcher, oracle) -> None:
    infos = launcher.ranks()
    assert sorted(infos) == [0, 1] and all(i.state == "serving" for i in infos.values())
    assert len({i.pid for i in infos.values()} | {os.getpid()}) == 3  # real, separate processes
    results = launcher.generate(PROMPTS, 6)
    _check(results, oracle, PROMPTS, 6)
    assert {r.rank for r in results} == {0, 1}
    assert all(r.attempts == 1 for r in results)


def test_kill_reports_process_exit_and_requests_are_retried(launcher, oracle) -> None:
    seen, event = _exits(launcher)
    # rank 0 kills itself before its 4th step: certainly while it holds requests
    FaultInjector(launcher).kill(0, at_step=3)
    futures = [launcher.submit(p, 8) for p in PROMPTS]
    results = [f.result(timeout=60) for f in futures]
    _check(results, oracle, PROMPTS, 8)
    assert event.wait(10)
    ev = seen[0][1]
    assert ev.rank == 0 and ev.signal == signal.SIGKILL and ev.exitcode is None and ev.incarnation == 0
    assert launcher.router.stats["retried_rank_exit"] >= 1
    assert any(r.attempts == 2 for r in results)
    assert launcher.alive_ranks() == [1]
    with pytest.raises(RankNotRunning):
        launcher.kill(0)


def test_external_kill_is_reported_quickly(launcher) -> None:
    seen, event = _exits(launcher)
    t0 = time.monotonic()
    launcher.kill(1, wait=False)
    assert event.wait(10)
    t_seen, ev = seen[0]
    assert ev.rank == 1 and ev.pid == launcher.ranks()[1].pid and ev.signal == signal.SIGKILL
    print(f"kill -> ProcessExit callback: {(t_seen - t0) * 1e3:.1f} ms")
    assert launcher.ranks()[1].exit == ev


@pytest.mark.asyncio
async def test_exits_async_iterator(launcher) -> None:
    stream = launcher.exits()
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)  # subscribe before the kill
    await asyncio.to_thread(launcher.kill, 0)
    ev = await asyncio.wait_for(first, 10)
    assert isinstance(ev, ProcessExit) and ev.rank == 0
    await stream.aclose()


def test_hang_reroutes_after_attempt_timeout_then_resume(tiny_model, oracle) -> None:
    with Launcher(tiny_model, 2, attempt_timeout_s=1.0) as launcher:
        inject = FaultInjector(launcher)
        inject.hang(1)
        assert launcher.ranks()[1].state == "stopped"
        results = launcher.generate(PROMPTS[:4], 4, timeout_s=30)
        _check(results, oracle, PROMPTS[:4], 4)
        assert all(r.rank == 0 for r in results)
        assert launcher.router.stats["retried_timeout"] >= 1
        inject.resume(1)
        # the resumed rank answers its abandoned attempts late; they agree with the first answers
        deadline = time.monotonic() + 20
        while launcher.router.stats["duplicate"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert launcher.router.stats["duplicate"] >= 1
        assert launcher.router.stats["duplicate_mismatch"] == 0
        assert launcher.alive_ranks() == [0, 1]


def test_hang_for_a_while_resumes_by_itself(launcher) -> None:
    inject = FaultInjector(launcher).hang(0, for_s=0.2)
    deadline = time.monotonic() + 10
    while launcher.ranks()[0].state != "serving" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert launcher.ranks()[0].state == "serving"
    assert [f.kind for f in inject.log] == ["hang", "resume"]


def test_mask_keeps_the_process_but_it_takes_no_part(tiny_model, oracle) -> None:
    with Launcher(tiny_model, 2, attempt_timeout_s=1.0) as launcher:
        FaultInjector(launcher).mask(0, at_step=2)
        results = launcher.generate(PROMPTS[:4], 5, timeout_s=30)
        _check(results, oracle, PROMPTS[:4], 5)
        assert launcher.alive_ranks() == [0, 1]  # alive, yet nothing came back from it
        assert launcher.router.stats["retried_timeout"] >= 1
        assert launcher.router.peers()[0].unresponsive
        FaultInjector(launcher).unmask(0)
        # once unmasked it finishes its abandoned attempts and gets work again
        deadline = time.monotonic() + 20
        while launcher.router.peers()[0].unresponsive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not launcher.router.peers()[0].unresponsive


def test_slow_rank_still_answers_correctly(launcher, oracle) -> None:
    FaultInjector(launcher).slow(1, ms_per_step=20)
    results = launcher.generate(PROMPTS[:4], 4)
    _check(results, oracle, PROMPTS[:4], 4)


def test_restart_starts_a_new_incarnation(launcher, oracle) -> None:
    seen, event = _exits(launcher)
    old = launcher.ranks()[1]
    info = FaultInjector(launcher).restart(1).launcher.ranks()[1]
    assert event.wait(10) and seen[0][1].incarnation == 0 and seen[0][1].rank == 1
    assert info.incarnation == old.incarnation + 1 and info.pid != old.pid and info.state == "serving"
    launcher.kill(0)
    results = launcher.generate(PROMPTS[:3], 4)
    _check(results, oracle, PROMPTS[:3], 4)
    assert {(r.rank, r.incarnation) for r in results} == {(1, 1)}


def test_scale_up_and_graceful_retire(launcher, oracle) -> None:
    seen, event = _exits(launcher)
    new = launcher.add_rank()
    assert new == 2 and launcher.placement.num_ranks == 3
    futures = [launcher.submit(p, 6) for p in PROMPTS]
    ev = launcher.retire(0, timeout_s=30)
    assert ev.exitcode == 0 and ev.signal is None
    results = [f.result(timeout=60) for f in futures]
    _check(results, oracle, PROMPTS, 6)
    assert launcher.router.stats["retried_rank_exit"] == 0  # a graceful leave loses nothing in flight
    assert 2 in {r.rank for r in results}
    assert launcher.alive_ranks() == [1, 2]


def test_leave_at_step(launcher, oracle) -> None:
    FaultInjector(launcher).leave(1, at_step=2)
    results = launcher.generate(PROMPTS[:4], 4)
    _check(results, oracle, PROMPTS[:4], 4)
    ev = launcher.wait_exit(1, timeout_s=20)
    assert ev.exitcode == 0


def test_invalid_request_is_rejected_not_retried(launcher) -> None:
    fut = launcher.submit([1, 999], 3)
    with pytest.raises(RequestRejected):
        fut.result(timeout=30)
    assert launcher.router.stats["rejected"] == 1
    assert launcher.alive_ranks() == [0, 1]


def test_every_rank_dead_keeps_requests_until_one_returns(tiny_model, oracle) -> None:
    # 16 slots per rank: each rank holds every expert, so one rank alone can serve
    with Launcher(tiny_model, 2, slots_per_rank=16) as launcher:
        launcher.kill(0)
        launcher.kill(1)
        fut = launcher.submit(PROMPTS[0], 3)
        time.sleep(0.2)
        assert not fut.done()  # queued, not lost
        launcher.restart(0)
        assert fut.result(timeout=30).tokens == oracle.generate(PROMPTS[0], 3)


def test_rank_that_cannot_cover_every_expert_fails_to_start(launcher) -> None:
    # 2 ranks x 9 slots: rank 0 alone lacks experts 9..15 and must refuse to serve
    launcher.kill(0)
    launcher.kill(1)
    with pytest.raises(LauncherError, match="exited before serving"):
        launcher.restart(0)


@pytest.mark.slow
def test_subprocess_start_method(tiny_model, oracle) -> None:
    with Launcher(tiny_model, 1, start_method="subprocess") as launcher:
        results = launcher.generate(PROMPTS[:2], 3)
        _check(results, oracle, PROMPTS[:2], 3)
        ev = launcher.kill(0)
        assert ev.signal == signal.SIGKILL


def test_rank_spec_in_the_store_carries_extra_keys(tiny_model) -> None:
    from elasticep.engine import protocol as P

    with Launcher(tiny_model, 1, rank_extra=lambda r, i: {"bus": f"tcp://127.0.0.1:{9000 + r}"}) as launcher:
        spec = P.decode_spec(launcher.store.get(P.spec_key(launcher.cluster, 0, 0)))
        assert spec.extra == {"bus": "tcp://127.0.0.1:9000"}
        assert spec.frontend == launcher.router.endpoint and spec.rank == 0 and spec.incarnation == 0
        assert launcher.store_address[1] == launcher.store.port


def test_exit_callback_may_restart_the_rank(launcher, oracle) -> None:
    restarted = threading.Event()

    def on_exit(ev: ProcessExit) -> None:
        if ev.rank == 0 and ev.incarnation == 0:
            launcher.restart(ev.rank)
            restarted.set()

    launcher.on_exit(on_exit)
    launcher.kill(0)
    assert restarted.wait(30)
    assert launcher.ranks()[0].incarnation == 1 and launcher.ranks()[0].state == "serving"
    results = launcher.generate(PROMPTS[:2], 3)
    _check(results, oracle, PROMPTS[:2], 3)


def test_rank_server_runs_boundary_hooks_in_process(tiny_model, oracle) -> None:
    """A RankServer driven in this process by a bare ROUTER socket: hooks run at step boundaries
    and may change the placement between steps."""
    import threading as th

    import torch
    import zmq

    from elasticep.engine import protocol as P
    from elasticep.engine import round_robin_placement
    from elasticep.engine.rank import RankServer

    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    port = front.bind_to_random_port("tcp://127.0.0.1")
    placement = round_robin_placement(2, 16, 2, 16)  # each rank holds every expert
    spec = P.RankSpec(
        cluster="hooks", rank=0, incarnation=0, model_path=str(tiny_model), placement=placement.to_dict(),
        alive=[True, True], frontend=f"tcp://127.0.0.1:{port}",
    )
    server = RankServer(spec, context=ctx)
    seen_steps: list[int] = []

    def hook(s: RankServer) -> None:
        seen_steps.append(s.step)
        if s.step == 2 and bool(s.model.alive[1]):
            s.model.set_placement(placement.masked([True, False]), torch.tensor([True, False]))

    server.boundary_hooks.append(hook)
    thread = th.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        assert front.poll(10_000)
        ident, frame = front.recv_multipart()
        assert isinstance(P.decode_from_rank(frame), P.Hello)
        front.send_multipart([ident, P.encode(P.Generate(request_id=1, prompt=[5, 6, 7], max_new_tokens=5))])
        assert front.poll(30_000)
        done = P.decode_from_rank(front.recv_multipart()[1])
        assert isinstance(done, P.Completion) and done.tokens == oracle.generate([5, 6, 7], 5)
        assert not bool(server.model.alive[1])  # the hook's view change took effect mid-request
        assert {0, 1, 2, 3, 4} <= set(seen_steps)
        front.send_multipart([ident, P.encode(P.Retire(reason="test"))])
        thread.join(10)
        assert not thread.is_alive()
    finally:
        server.close()
        front.close(0)
        ctx.term()
