"""A kernel call's wait in progress, seen from another thread: ``EPBuffer.waiting`` and
``KernelWaitWatch`` report a late peer long before the call's own timeout, without marking it.

Ranks are buffers in one process; the waiting call runs on its own thread, as a rank's serving
thread does while its agent thread watches. No timing assertion is tight: each bound below is
several times what it measures on an idle host.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest
import torch

from elasticep.config import Config
from elasticep.detect.fusion import FusionPolicy
from elasticep.events import PeerTimeout
from elasticep.kernel import EPBuffer, KernelWait, KernelWaitWatch, unlink_segment

HIDDEN, TOPK, SPR, MAX_TOKENS = 16, 2, 2, 4


@pytest.fixture
def cluster_id() -> Any:
    cid = "w" + uuid.uuid4().hex[:10]
    yield cid
    unlink_segment(cid, 0)


def _buffer(rank: int, num_ranks: int, cluster_id: str, timeout_us: int) -> EPBuffer:
    return EPBuffer(rank, num_ranks, slots_per_rank=SPR, max_tokens=MAX_TOKENS, hidden=HIDDEN, topk=TOPK,
                    cluster_id=cluster_id, timeout_us=timeout_us)


def _dispatch_in_thread(buf: EPBuffer) -> tuple[threading.Thread, dict]:
    """Rank ``buf.rank`` dispatches one token to every rank's first slot, on its own thread."""
    result: dict = {}
    x = torch.ones(1, HIDDEN)
    idx = torch.tensor([[0, SPR]], dtype=torch.int64)  # rank 0's slot 0 and rank 1's slot 0

    def run() -> None:
        t0 = time.monotonic()
        result["out"] = buf.dispatch(x, idx, layer=7)
        result["s"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def _wait_until(predicate, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    return None


def test_waiting_names_the_late_peer_while_the_call_waits(cluster_id: str) -> None:
    with _buffer(0, 2, cluster_id, timeout_us=3_000_000) as b0, _buffer(1, 2, cluster_id, 3_000_000) as b1:
        assert b0.waiting() == []
        t, result = _dispatch_in_thread(b0)
        waits = _wait_until(lambda: b0.waiting(50_000), 2.0)
        assert waits, "the call in progress is not reported as waiting"
        (w,) = waits
        assert isinstance(w, KernelWait) and (w.peer, w.op, w.layer) == (1, "dispatch", 7)
        assert 50_000 <= w.waited_us < 3_000_000
        later = _wait_until(lambda: [v for v in b0.waiting() if v.waited_us > w.waited_us], 2.0)
        assert later and later[0].since_ns == w.since_ns  # the same wait, longer
        assert int(b0.active_ranks[1]) == 1  # reporting is not giving up
        assert b0.waiting(10_000_000) == []  # not waited that long yet
        # the peer answers: the wait ends, nothing is left to report, nobody was marked
        x = torch.ones(1, HIDDEN)
        recv, counts, handle = b1.dispatch(x, torch.tensor([[0, SPR]], dtype=torch.int64))
        t.join(5.0)
        assert not t.is_alive() and result["s"] < 3.0
        assert b0.waiting() == [] and int(b0.active_ranks[1]) == 1 and b0.last_timeouts() == []


def test_waiting_ends_with_the_hard_timeout(cluster_id: str) -> None:
    with _buffer(0, 2, cluster_id, timeout_us=300_000) as b0, _buffer(1, 2, cluster_id, 300_000):
        t, result = _dispatch_in_thread(b0)
        assert _wait_until(lambda: b0.waiting(), 2.0)
        t.join(5.0)
        assert not t.is_alive()
        assert b0.waiting() == []
        assert int(b0.active_ranks[1]) == 0 and [x.peer for x in b0.last_timeouts()] == [1]


def test_watch_reports_a_growing_wait_once_per_interval(cluster_id: str) -> None:
    with _buffer(0, 2, cluster_id, timeout_us=1_500_000) as b0, _buffer(1, 2, cluster_id, 1_500_000):
        watch = KernelWaitWatch(b0, report_after_ms=100.0, every_ms=100.0, skip_dispatches=0)
        assert watch.poll() == []
        t, _ = _dispatch_in_thread(b0)
        events: list[PeerTimeout] = []
        deadline = time.monotonic() + 0.9
        while time.monotonic() < deadline:
            events += watch.poll()
            time.sleep(0.01)
        t.join(5.0)
        assert events, "no report while the call waited"
        assert all(e.observer == 0 and e.peer == 1 and e.op == "dispatch" and e.layer == 7 for e in events)
        waited = [e.waited_us for e in events]
        assert waited[0] >= 100_000 and waited == sorted(waited)
        assert all(b - a >= 100_000 for a, b in zip(waited, waited[1:]))  # at most one per every_ms
        assert watch.reported == len(events)
        assert watch.poll() == []  # the call timed out: nothing waits any more


def test_watch_leaves_a_buffers_first_dispatch_to_its_timeout(cluster_id: str) -> None:
    """Ranks reach a new epoch's first call apart (start-up, a commit): that wait is not reported;
    a late peer in a later call is."""
    holder: dict[str, Any] = {"buf": None}
    watch = KernelWaitWatch(lambda: holder["buf"], report_after_ms=20.0, every_ms=20.0)
    assert watch.poll() == []  # no buffer yet
    with _buffer(0, 2, cluster_id, 600_000) as b0, _buffer(1, 2, cluster_id, 600_000) as b1:
        holder["buf"] = b0
        t0, r0 = _dispatch_in_thread(b0)  # rank 1 comes late to the first call
        assert _wait_until(lambda: b0.waiting(50_000), 2.0)
        assert watch.poll() == []
        t1, r1 = _dispatch_in_thread(b1)
        t0.join(5.0), t1.join(5.0)
        idx, w = torch.tensor([[0, SPR]], dtype=torch.int64), torch.ones(1, TOPK)
        combines = [threading.Thread(target=b.combine, args=(r["out"][0], idx, w), kwargs={"handle": r["out"][2]})
                    for b, r in ((b0, r0), (b1, r1))]
        for t in combines:
            t.start()
        for t in combines:
            t.join(5.0)
        t0, _ = _dispatch_in_thread(b0)  # the second call: rank 1 does not come
        events = _wait_until(watch.poll, 2.0)
        assert events and events[0].peer == 1 and events[0].waited_us >= 20_000
        t0.join(5.0)
    with pytest.raises(ValueError):
        KernelWaitWatch(lambda: None, every_ms=0)


def test_two_observers_reports_evict_through_the_fusion_policy(cluster_id: str) -> None:
    """Rank 2 takes no part: ranks 0 and 1 wait on it in their own calls; their watches' reports
    reach grace_ms while the calls (hard bound 2 s) still wait, and the policy evicts rank 2."""
    cfg = Config.local()
    bufs = [_buffer(r, 3, cluster_id, timeout_us=2_000_000) for r in range(3)]
    try:
        x = torch.ones(1, HIDDEN)
        idx = torch.tensor([[0, 2 * SPR]], dtype=torch.int64)
        threads = [threading.Thread(target=bufs[r].dispatch, args=(x, idx), daemon=True) for r in (0, 1)]
        for t in threads:
            t.start()
        watches = [KernelWaitWatch(bufs[r], report_after_ms=cfg.min_suspect_ms, every_ms=cfg.heartbeat_interval_ms,
                                   skip_dispatches=0) for r in (0, 1)]
        policy = FusionPolicy(cfg)
        t0 = time.monotonic()

        async def collect() -> float | None:
            seen: list[PeerTimeout] = []

            def feed(ev: PeerTimeout) -> None:
                seen.append(ev)
                policy.suspect(ev.observer, ev.peer, "kernel", time.monotonic(), ev.waited_us / 1e3)

            tasks = [asyncio.ensure_future(w.run(feed)) for w in watches]
            try:
                while time.monotonic() - t0 < 1.8:
                    if any(v.rank == 2 for v in policy.verdicts(time.monotonic(), (0, 1, 2))):
                        return time.monotonic() - t0
                    await asyncio.sleep(0.005)
                return None
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        evicted_after = asyncio.run(collect())
        assert evicted_after is not None, "two observers' waits did not evict within the call's bound"
        assert evicted_after >= cfg.grace_ms / 1e3  # never below the grace: slow is not dead
        assert all(int(bufs[r].active_ranks[2]) == 1 for r in (0, 1))  # the calls still wait, unmarked
        for r in (0, 1):
            bufs[r].active_ranks[2] = 0  # what the new view's on_view does: the waits end at once
        for t in threads:
            t.join(2.0)
            assert not t.is_alive()
    finally:
        for b in bufs:
            b.close()
