"""Pure detection: phi accrual, the heartbeat monitor, the fusion policy, and the signal sources."""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import elasticep.detect as detect
from elasticep.config import Config
from elasticep.detect import (
    ArrivalWindow,
    FusionPolicy,
    HeartbeatMonitor,
    MaskSource,
    ProcessExitWatcher,
    exit_event,
    gap_stats,
    newly_inactive,
    phi,
    silence_for_phi,
)
from elasticep.events import Gray, PeerTimeout, ProcessExit, Refute, Suspicion

CFG = Config.local()


def test_all_names_exported() -> None:
    for name in detect.__all__:
        assert hasattr(detect, name), name


# --- phi -----------------------------------------------------------------------------------------


def test_phi_is_the_log_odds_of_a_gap_this_long() -> None:
    # At the mean, half of all gaps are longer: phi = log10(2).
    assert phi(10.0, 10.0, 1.0) == pytest.approx(math.log10(2.0))
    for z in (0.5, 1.0, 2.0, 3.0, 4.0):
        tail = 0.5 * math.erfc(z / math.sqrt(2))
        assert phi(10.0 + z, 10.0, 1.0) == pytest.approx(-math.log10(tail), rel=1e-9)


def test_phi_grows_with_silence_and_never_overflows() -> None:
    values = [phi(t, 10.0, 1.0) for t in (5, 10, 12, 15, 20, 40, 100, 1000, 10_000)]
    assert values == sorted(values)
    assert all(math.isfinite(v) for v in values)
    # Deep in the tail the asymptotic series continues the exact curve smoothly.
    assert phi(15.999, 10.0, 1.0) == pytest.approx(phi(16.001, 10.0, 1.0), rel=1e-3)
    assert phi(0.0, 10.0, 1.0) == 0.0


def test_phi_rejects_zero_spread() -> None:
    with pytest.raises(ValueError):
        phi(1.0, 1.0, 0.0)


def test_silence_for_phi_inverts_phi() -> None:
    t = silence_for_phi(8.0, 10.0, 1.0)
    assert phi(t, 10.0, 1.0) == pytest.approx(8.0, rel=1e-6)
    assert 15.0 < t < 16.5  # about mean + 5.6 std


def test_gap_stats_floor_and_nominal() -> None:
    s = gap_stats([], nominal_ms=10.0, min_std_ms=1.0)
    assert (s.mean_ms, s.std_ms, s.samples) == (10.0, 1.0, 0)
    s = gap_stats([10.0] * 5, nominal_ms=10.0, min_std_ms=0.1)
    assert s.std_ms == pytest.approx(1.0)  # 10 % of the mean
    s = gap_stats([5.0, 15.0], nominal_ms=10.0, min_std_ms=0.1)
    assert (s.mean_ms, s.std_ms) == (10.0, 5.0)


def test_arrival_window_matches_a_naive_computation() -> None:
    w = ArrivalWindow(4)
    gaps = [9.0, 11.0, 10.0, 30.0, 8.0, 12.0]
    for g in gaps:
        w.add(g)
    assert len(w) == 4
    naive = gap_stats(gaps[-4:], nominal_ms=10.0, min_std_ms=0.0)
    got = w.stats(nominal_ms=10.0, min_std_ms=0.0)
    assert got.mean_ms == pytest.approx(naive.mean_ms)
    assert got.std_ms == pytest.approx(naive.std_ms)
    assert w.recent_mean(2) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        w.add(-1.0)
    with pytest.raises(ValueError):
        ArrivalWindow(0)


# --- monitor -------------------------------------------------------------------------------------


def _beat(mon: HeartbeatMonitor, peers, t0: float, t1: float, every_s: float = 0.02, skip=()) -> list:
    out = []
    t = t0
    while t <= t1 + 1e-9:
        for p in peers:
            if p not in skip:
                out += mon.heartbeat(p, t)
        out += mon.check(t)
        t = round(t + every_s, 9)
    return out


def test_monitor_regular_heartbeats_raise_nothing() -> None:
    mon = HeartbeatMonitor(0, CFG)
    mon.watch([0, 1, 2, 3], 0.0)
    assert mon.peers == (1, 2, 3)
    assert _beat(mon, [1, 2, 3], 0.0, 2.0) == []
    assert mon.suspected() == set()


def test_monitor_suspects_a_silent_peer_after_min_suspect_and_refutes_on_return() -> None:
    mon = HeartbeatMonitor(0, CFG)
    mon.watch([1, 2], 0.0)
    _beat(mon, [1, 2], 0.0, 1.0)
    events = _beat(mon, [1, 2], 1.02, 1.2, skip=(2,))
    sus = [e for e in events if isinstance(e, Suspicion)]
    assert len(sus) == 1 and sus[0].suspect == 2 and sus[0].observer == 0 and sus[0].source == "heartbeat"
    assert sus[0].phi >= CFG.phi_threshold
    # Never before min_suspect_ms of silence.
    assert mon.silence_ms(2, 1.2) >= CFG.min_suspect_ms
    assert mon.heartbeat(2, 1.22) == [Refute(observer=0, suspect=2, source="heartbeat")]
    assert mon.suspected() == set()


def test_monitor_does_not_blame_peers_for_its_own_stall() -> None:
    mon = HeartbeatMonitor(0, CFG)
    mon.watch([1, 2], 0.0)
    _beat(mon, [1, 2], 0.0, 1.0)
    # This observer was descheduled for 500 ms: no check, no heartbeat processed.
    assert mon.check(1.5) == []
    assert mon.stalls == 1
    # The queued heartbeats arrive right after.
    assert _beat(mon, [1, 2], 1.501, 1.7) == []


def test_monitor_reports_a_persistently_late_peer_gray_and_its_recovery() -> None:
    mon = HeartbeatMonitor(0, CFG)
    mon.watch([1, 2, 3], 0.0)
    events = []
    t = 0.0
    step = CFG.heartbeat_interval_ms / 1e3
    for i in range(200):  # peers 1 and 2 every interval, peer 3 every 4 intervals (3 late)
        t = round(t + step, 9)
        events += mon.heartbeat(1, t) + mon.heartbeat(2, t)
        if i % 4 == 0:
            events += mon.heartbeat(3, t)
        events += mon.check(t)
    grays = [e for e in events if isinstance(e, Gray)]
    assert grays and grays[0].rank == 3 and grays[0].slowness >= CFG.gray_slowness
    # Its first long gaps, before the history knew its pace, may raise a suspicion; the next
    # heartbeat refutes it, and once its pace is known it is no longer suspected at all.
    sus = [e for e in events if isinstance(e, Suspicion)]
    refutes = [e for e in events if isinstance(e, Refute)]
    assert len(refutes) == len(sus) and len(sus) <= 2
    for _ in range(100):  # peer 3 recovers
        t = round(t + step, 9)
        events = mon.heartbeat(1, t) + mon.heartbeat(2, t) + mon.heartbeat(3, t) + mon.check(t)
        if any(isinstance(e, Gray) for e in events):
            recovered = [e for e in events if isinstance(e, Gray)][0]
            assert recovered.slowness < CFG.gray_slowness
            break
    else:
        pytest.fail("recovery never reported")
    assert mon.gray() == set()


def test_monitor_ignores_unwatched_peers_and_resets_on_a_new_incarnation() -> None:
    mon = HeartbeatMonitor(0, CFG)
    mon.watch([1], 0.0)
    assert mon.heartbeat(7, 0.01) == []
    _beat(mon, [1], 0.0, 0.5)
    mon.heartbeat(1, 0.6, incarnation=5)
    assert len(mon._peers[1].window) == 0



@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["beat", "check", "watch", "restart"]), st.integers(1, 5),
                          st.floats(0.0, 0.6)), max_size=60))
def test_monitor_any_suspected_agrees_with_the_suspected_set(ops) -> None:
    """``any_suspected`` (a count kept as peers are suspected, refuted and unwatched, asked every
    tick) always answers as the set of suspected peers would."""
    mon = HeartbeatMonitor(0, CFG)
    mon.watch([1, 2, 3], 0.0)
    now = 0.0
    for op, peer, dt in ops:
        now += dt
        if op == "beat":
            mon.heartbeat(peer, now)
        elif op == "restart":
            mon.heartbeat(peer, now, incarnation=int(now * 10) + 1)
        elif op == "check":
            mon.check(now)
        else:
            mon.watch([p for p in range(1, 6) if p != peer], now)
        assert mon.any_suspected() == bool(mon.suspected())
        assert mon._n_suspected == len(mon.suspected())


# --- fusion --------------------------------------------------------------------------------------


def test_fusion_certain_signal_evicts_at_once() -> None:
    f = FusionPolicy(CFG)
    f.certain(3, "exit", "killed")
    (v,) = f.verdicts(0.0, {0, 1, 2, 3})
    assert (v.rank, v.cause, v.certain) == (3, "exit", True)
    with pytest.raises(ValueError):
        f.certain(2, "heartbeat", "not certain")


def test_fusion_slow_is_not_dead_below_grace() -> None:
    f = FusionPolicy(CFG)
    # Two observers suspect rank 3 at once; each vouches for min_suspect_ms of silence.
    f.suspect(0, 3, "heartbeat", 1.0, CFG.min_suspect_ms)
    f.suspect(1, 3, "heartbeat", 1.0, CFG.min_suspect_ms)
    below = 1.0 + (CFG.grace_ms - CFG.min_suspect_ms - 1) / 1e3
    assert f.verdicts(below, {0, 1, 2, 3}) == []
    above = 1.0 + (CFG.grace_ms - CFG.min_suspect_ms + 1) / 1e3
    (v,) = f.verdicts(above, {0, 1, 2, 3})
    assert (v.rank, v.cause, v.certain) == (3, "heartbeat", False)
    assert "ranks 0,1" in v.reason


def test_fusion_lone_observer_waits_for_single_observer_evict_ms() -> None:
    f = FusionPolicy(CFG)
    f.suspect(0, 1, "heartbeat", 0.0, CFG.min_suspect_ms)
    past_grace = (CFG.grace_ms - CFG.min_suspect_ms + 5) / 1e3
    assert f.verdicts(past_grace, {0, 1}) == []
    late = (CFG.single_observer_evict_ms - CFG.min_suspect_ms + 1) / 1e3
    (v,) = f.verdicts(late, {0, 1})
    assert "lone observer" in v.reason


def test_fusion_lone_observer_never_decides_while_others_could_confirm() -> None:
    f = FusionPolicy(CFG)
    f.suspect(2, 3, "heartbeat", 0.0, CFG.min_suspect_ms)  # only rank 2 cannot hear rank 3
    assert f.verdicts(10.0, {0, 1, 2, 3}) == []
    f.suspect(2, 0, "heartbeat", 0.0, CFG.min_suspect_ms)
    f.suspect(2, 1, "heartbeat", 0.0, CFG.min_suspect_ms)
    # Now rank 2 hears nobody: every other member is under suspicion, so it may decide alone.
    assert {v.rank for v in f.verdicts(10.0, {0, 1, 2, 3})} == {0, 1, 3}


def test_fusion_refute_withdraws_and_point_signals_expire() -> None:
    f = FusionPolicy(CFG)
    f.suspect(0, 3, "heartbeat", 0.0, CFG.min_suspect_ms)
    f.suspect(1, 3, "heartbeat", 0.0, CFG.min_suspect_ms)
    f.refute(1, 3)
    assert f.verdicts(0.2, {0, 1, 3}) == []  # one observer left, below single_observer_evict_ms
    f.refute(0, 3)
    assert f.pending() == {}
    f.suspect(0, 2, "kernel", 0.0, 200.0)
    assert 2 in f.pending()
    f.silence_ms(2, CFG.corroboration_window_ms / 1e3 + 0.01)
    assert f.pending() == {}


def test_fusion_two_kernel_timeouts_corroborate_one_does_not() -> None:
    f = FusionPolicy(CFG)
    f.suspect(0, 3, "kernel", 0.0, 200.0)
    assert f.verdicts(0.1, {0, 1, 2, 3}) == []
    assert f.verdicts(0.4, {0, 1, 2, 3}) == []  # a point signal does not age into a long silence
    f.suspect(1, 3, "kernel", 0.4, 200.0)
    (v,) = f.verdicts(0.4, {0, 1, 2, 3})
    assert v.cause == "kernel" and not v.certain


def test_fusion_disconnects_seen_twice_are_certain() -> None:
    f = FusionPolicy(CFG)
    f.suspect(0, 3, "disconnect", 0.0)
    assert f.verdicts(0.0, {0, 1, 2, 3}) == []
    f.suspect(1, 3, "disconnect", 0.001)
    (v,) = f.verdicts(0.001, {0, 1, 2, 3})
    assert (v.cause, v.certain) == ("disconnect", True)
    g = FusionPolicy(CFG)
    g.suspect(0, 3, "disconnect", 0.0)
    g.suspect(0, 3, "heartbeat", 0.0, 60.0)
    assert g.verdicts(0.0, {0, 3})[0].certain


def test_fusion_rejects_unknown_sources() -> None:
    with pytest.raises(ValueError):
        FusionPolicy(CFG).suspect(0, 1, "astrology", 0.0)


# --- sources -------------------------------------------------------------------------------------


class TensorMask:
    """The mask contract of the GPU kernels (``[num_ranks]`` int32 tensor), held on CPU."""

    def __init__(self, n: int) -> None:
        self.active_ranks = torch.ones(n, dtype=torch.int32)
        self.timeout_us = 200_000


def test_newly_inactive_is_a_pure_diff() -> None:
    assert newly_inactive(None, [1, 0, 1]) == [1]
    assert newly_inactive([1, 1, 1], [1, 0, 0]) == [1, 2]
    assert newly_inactive([1, 0, 1], [1, 0, 1]) == []
    with pytest.raises(ValueError):
        newly_inactive([1, 1], [1, 1, 1])


def test_mask_source_reports_each_transition_once() -> None:
    kernel = TensorMask(4)
    src = MaskSource(1, kernel)
    assert src.after("dispatch", 0) == []
    kernel.active_ranks[3] = 0
    (e,) = src.after("combine", 5)
    assert e == PeerTimeout(observer=1, peer=3, op="combine", layer=5, waited_us=200_000)
    assert src.after("dispatch", 6) == []
    kernel.active_ranks[3] = 1  # re-activated after a view change
    src.after("dispatch", 0)
    kernel.active_ranks[3] = 0
    assert len(src.after("dispatch", 0)) == 1
    kernel.active_ranks[1] = 0  # its own slot is never reported
    assert src.after("dispatch", 0) == []


def test_mask_source_needs_a_mask() -> None:
    with pytest.raises(TypeError):
        MaskSource(0, object())


@pytest.mark.asyncio
async def test_mask_source_publishes() -> None:
    sent = []

    async def publish(event):
        sent.append(event)

    kernel = TensorMask(2)
    src = MaskSource(0, kernel, publish)
    kernel.active_ranks[1] = 0
    await src.after_async("dispatch")
    assert [e.peer for e in sent] == [1]


def test_exit_event_from_wait_status() -> None:
    assert exit_event(2, 10, signal.SIGKILL).signal == signal.SIGKILL
    ev = exit_event(2, 10, 3 << 8)
    assert (ev.exitcode, ev.signal) == (3, None)


@pytest.mark.asyncio
@pytest.mark.timeout(20)
async def test_process_exit_watcher_sees_a_sigkill_at_once() -> None:
    got: asyncio.Queue = asyncio.Queue()

    async def publish(event):
        await got.put(event)

    watcher = ProcessExitWatcher(publish)
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]),
             subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])]
    try:
        watcher.watch(4, procs[0].pid)
        watcher.watch(5, procs[1].pid)
        first = await asyncio.wait_for(got.get(), 10)
        assert first == ProcessExit(rank=5, pid=procs[1].pid, exitcode=3)
        procs[0].kill()
        second = await asyncio.wait_for(got.get(), 5)
        assert (second.rank, second.signal) == (4, signal.SIGKILL)
        assert len(watcher.exits) == 2
    finally:
        watcher.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=5)
            except ChildProcessError:
                pass


@pytest.mark.timeout(30)
def test_mask_source_reads_the_real_cpu_kernel() -> None:
    """The CPU kernel's EPBuffer is a MaskProvider: a peer that never answers is reported once."""
    import uuid

    from elasticep.kernel.buffer import EPBuffer, unlink_segment

    cid = "d" + uuid.uuid4().hex[:10]
    try:
        buf = EPBuffer(0, 2, slots_per_rank=1, max_tokens=2, hidden=8, topk=1, cluster_id=cid, timeout_us=20_000)
        src = MaskSource(0, buf)
        assert src.after("dispatch") == []
        x = torch.zeros(2, 8, dtype=torch.float32)
        topk_idx = torch.ones(2, 1, dtype=torch.int64)  # both tokens go to slot 1, on rank 1
        buf.dispatch(x, topk_idx, layer=3)  # rank 1 never shows up: the wait times out
        (event,) = src.after("dispatch", 3)
        assert (event.observer, event.peer, event.waited_us) == (0, 1, 20_000)
        assert int(buf.active_ranks[1]) == 0
    finally:
        unlink_segment(cid, 0)


def test_bench_percentile_interpolates() -> None:
    from elasticep.bench.detect import _percentile

    assert _percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert _percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert math.isnan(_percentile([], 50))
