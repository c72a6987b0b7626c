"""The CPU kernel within one process: math, input checks, epochs, timeouts and the mask source.

Ranks here are buffers in one process (or two threads of it); the segment is real POSIX shared
memory. Multi-process behaviour (kills, hangs, R = 2, 4, 8) is in test_kernel_mp.py.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from typing import Any

import pytest
import torch

from elasticep import metrics
from elasticep.events import PeerTimeout
from elasticep.kernel import DispatchHandle, EPBuffer, KernelMaskSource, KernelTimeout, segment_name, unlink_segment

HIDDEN, TOPK, SPR, MAX_TOKENS = 32, 3, 4, 16


@pytest.fixture
def cluster_id() -> Any:
    cid = "u" + uuid.uuid4().hex[:10]
    yield cid
    for epoch in range(4):
        unlink_segment(cid, epoch)


def _buffer(rank: int, num_ranks: int, cluster_id: str, **kw: Any) -> EPBuffer:
    kw.setdefault("timeout_us", 2_000_000)
    return EPBuffer(
        rank, num_ranks, slots_per_rank=SPR, max_tokens=MAX_TOKENS, hidden=HIDDEN, topk=TOPK,
        cluster_id=cluster_id, **kw,
    )


def _routing(tokens: int, num_slots: int, seed: int, masked: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(tokens, num_slots, generator=gen).argsort(dim=1)[:, :TOPK].contiguous()
    idx[torch.rand(tokens, TOPK, generator=gen) < masked] = -1
    w = torch.rand(tokens, TOPK, generator=gen)
    return idx, w


def _reference(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, expert: Any, live: set[int]) -> torch.Tensor:
    """out[t] = sum_k w[t, k] * expert(slot, x[t]) over unmasked slots on live ranks, in float32."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(TOPK):
            s = int(idx[t, k])
            if s >= 0 and s // SPR in live:
                out[t] += w[t, k] * expert(s, x[t : t + 1].float())[0]
    return out


def _scale(slot: int, h: torch.Tensor) -> torch.Tensor:
    return h * (slot + 1) - slot  # a cheap, slot-dependent "expert"


def _run_local_experts(rank: int, recv_x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(recv_x)
    for e in range(SPR):
        n = int(counts[e])
        out[e, :n] = _scale(rank * SPR + e, recv_x[e, :n].float()).to(recv_x.dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_rank_round_trip(cluster_id: str, dtype: torch.dtype) -> None:
    x = torch.randn(MAX_TOKENS, HIDDEN).to(dtype)
    idx, w = _routing(MAX_TOKENS, SPR, seed=1)
    with _buffer(0, 1, cluster_id) as buf:
        for _ in range(3):  # the same buffers are reused call after call
            recv_x, counts, handle = buf.dispatch(x, idx)
            assert recv_x.dtype == dtype and counts.dtype == torch.int64
            assert recv_x.stride(1) == HIDDEN and recv_x.stride(2) == 1
            assert recv_x.shape == (SPR, int(counts.max()), HIDDEN)
            assert counts.tolist() == [int((idx == e).sum()) for e in range(SPR)]
            out = buf.combine(_run_local_experts(0, recv_x, counts), idx, w, handle=handle)
        assert out.dtype == dtype and out.shape == x.shape
        want = _reference(x, idx, w, lambda s, h: _scale(s, h.to(dtype).float()).to(dtype).float(), {0})
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
        torch.testing.assert_close(out.float(), want, **tol)
        assert buf.stats()["dispatch_calls"] == 3 and buf.stats()["combine_calls"] == 3


def test_zero_tokens_and_all_masked(cluster_id: str) -> None:
    with _buffer(0, 1, cluster_id) as buf:
        recv_x, counts, handle = buf.dispatch(torch.empty(0, HIDDEN), torch.empty(0, TOPK, dtype=torch.int64))
        assert counts.tolist() == [0] * SPR and recv_x.shape == (SPR, 0, HIDDEN)
        out = buf.combine(recv_x, torch.empty(0, TOPK, dtype=torch.int64), torch.empty(0, TOPK), handle=handle)
        assert out.shape == (0, HIDDEN)
        x = torch.randn(2, HIDDEN)
        idx = torch.full((2, TOPK), -1, dtype=torch.int64)
        recv_x, counts, handle = buf.dispatch(x, idx)
        out = buf.combine(recv_x, idx, torch.ones(2, TOPK), handle=handle)
        assert counts.sum() == 0 and torch.equal(out, torch.zeros(2, HIDDEN))


def _two_rank_step(bufs: list[EPBuffer], xs: list[torch.Tensor], routes: list[Any], outs: list[Any]) -> None:
    def run(rank: int) -> None:
        idx, w = routes[rank]
        recv_x, counts, handle = bufs[rank].dispatch(xs[rank], idx)
        outs[rank] = bufs[rank].combine(_run_local_experts(rank, recv_x, counts), idx, w, handle=handle)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_ranks_on_two_threads_release_the_gil(cluster_id: str, dtype: torch.dtype) -> None:
    # Each rank blocks in the kernel until the other has posted: this only finishes if the GIL
    # is released while waiting.
    bufs = [_buffer(r, 2, cluster_id) for r in range(2)]
    try:
        xs = [torch.randn(MAX_TOKENS, HIDDEN).to(dtype) for _ in range(2)]
        routes = [_routing(MAX_TOKENS, 2 * SPR, seed=10 + r) for r in range(2)]
        outs: list[Any] = [None, None]
        for _ in range(2):
            _two_rank_step(bufs, xs, routes, outs)
        for r in range(2):
            expert = lambda s, h: _scale(s, h.to(dtype).float()).to(dtype).float()  # noqa: E731
            want = _reference(xs[r], *routes[r], expert, {0, 1})
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=5e-2)
            assert outs[r].dtype == dtype
            torch.testing.assert_close(outs[r].float(), want, **tol)
            assert bufs[r].active_ranks.tolist() == [1, 1]
    finally:
        for b in bufs:
            b.close()
    assert not os.path.exists("/dev/shm" + segment_name(cluster_id, 0)), "last close must unlink the segment"


def test_duplicate_slots_fill_a_rank_to_topk(cluster_id: str) -> None:
    # One slot per rank and every top-k position of every token on the peer's slot: a combine
    # message then carries max_tokens * topk rows, more than max_tokens * slots_per_rank.
    bufs = [
        EPBuffer(r, 2, slots_per_rank=1, max_tokens=MAX_TOKENS, hidden=HIDDEN, topk=TOPK,
                 cluster_id=cluster_id, timeout_us=2_000_000)
        for r in range(2)
    ]
    try:
        xs = [torch.randn(MAX_TOKENS, HIDDEN) for _ in range(2)]
        idxs = [torch.full((MAX_TOKENS, TOPK), 1 - r, dtype=torch.int64) for r in range(2)]
        ws = [torch.rand(MAX_TOKENS, TOPK) for _ in range(2)]
        outs: list[Any] = [None, None]

        def run(rank: int) -> None:
            recv_x, counts, handle = bufs[rank].dispatch(xs[rank], idxs[rank])
            assert counts.tolist() == [MAX_TOKENS * TOPK]
            expert_out = _scale(rank, recv_x)
            outs[rank] = bufs[rank].combine(expert_out, idxs[rank], ws[rank], handle=handle)

        threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        for r in range(2):
            want = ws[r].sum(dim=1, keepdim=True) * _scale(1 - r, xs[r])
            torch.testing.assert_close(outs[r], want, rtol=1e-5, atol=1e-5)
    finally:
        for b in bufs:
            b.close()


def _in_region(buf: EPBuffer, t: torch.Tensor) -> bool:
    start = buf._runtime.region_alias
    return start != 0 and start <= t.data_ptr() < start + buf._runtime.region_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_outputs_written_over_recv_x(cluster_id: str, dtype: torch.dtype) -> None:
    # recv_x lives in the rank's return region; an expert that writes its outputs over it lets
    # the peers reduce straight from there. Routing changes every step, and with it recv_x's shape.
    bufs = [_buffer(r, 2, cluster_id) for r in range(2)]
    try:
        for step in range(3):
            xs = [torch.randn(MAX_TOKENS, HIDDEN).to(dtype) for _ in range(2)]
            routes = [_routing(MAX_TOKENS, 2 * SPR, seed=20 + 2 * step + r) for r in range(2)]
            outs: list[Any] = [None, None]
            in_region: list[bool] = [False, False]

            def run(rank: int) -> None:
                idx, w = routes[rank]
                recv_x, counts, handle = bufs[rank].dispatch(xs[rank], idx)
                in_region[rank] = _in_region(bufs[rank], recv_x)
                for e in range(SPR):
                    n = int(counts[e])
                    recv_x[e, :n] = _scale(rank * SPR + e, recv_x[e, :n].float()).to(dtype)
                outs[rank] = bufs[rank].combine(recv_x, idx, w, handle=handle)

            threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            assert not any(t.is_alive() for t in threads)
            assert in_region == [True, True]
            for r in range(2):
                expert = lambda s, h: _scale(s, h.to(dtype).float()).to(dtype).float()  # noqa: E731
                want = _reference(xs[r], *routes[r], expert, {0, 1})
                tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=5e-2)
                torch.testing.assert_close(outs[r].float(), want, **tol)
        assert [b.active_ranks.tolist() for b in bufs] == [[1, 1], [1, 1]]
        assert [b.stats()["overwritten_reads"] for b in bufs] == [0, 0]
    finally:
        for b in bufs:
            b.close()


def test_owner_that_rewrote_its_region_under_a_late_read_is_dropped(cluster_id: str) -> None:
    # Rank 1 posts its combine, gives up on rank 0 (which is late), and moves on to the next
    # dispatch, rewriting its return region. Rank 0's late combine must not return those rows:
    # it drops rank 1 as if it had timed out and reduces without it.
    x0, x1 = torch.randn(MAX_TOKENS, HIDDEN), torch.randn(MAX_TOKENS, HIDDEN)
    idx0, w0 = _routing(MAX_TOKENS, 2 * SPR, seed=30, masked=0.0)
    idx1 = SPR + torch.rand(MAX_TOKENS, SPR).argsort(dim=1)[:, :TOPK].contiguous()  # rank 1's own slots only
    w1 = torch.rand(MAX_TOKENS, TOPK)
    before = metrics.sample("elasticep_kernel_peer_timeouts_total", {"op": "combine"})
    with _buffer(0, 2, cluster_id) as buf0, _buffer(1, 2, cluster_id, timeout_us=30_000) as buf1:
        got: dict[int, Any] = {}

        def dispatch(rank: int, buf: EPBuffer, x: torch.Tensor, idx: torch.Tensor) -> None:
            got[rank] = buf.dispatch(x, idx)

        threads = [threading.Thread(target=dispatch, args=a) for a in ((0, buf0, x0, idx0), (1, buf1, x1, idx1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        recv0, counts0, handle0 = got[0]
        recv1, counts1, handle1 = got[1]
        assert _in_region(buf1, recv1) and int(counts1.sum()) > 0
        for e in range(SPR):
            n = int(counts1[e])
            recv1[e, :n] = _scale(SPR + e, recv1[e, :n])
        buf1.combine(recv1, idx1, w1, handle=handle1)  # posts to rank 0, then times out on it
        assert buf1.active_ranks.tolist() == [0, 1]
        recv1, counts1, handle1 = buf1.dispatch(x1 + 1.0, idx1)  # rewrites rank 1's region
        out0 = buf0.combine(_run_local_experts(0, recv0, counts0), idx0, w0, handle=handle0)
        assert buf0.active_ranks.tolist() == [1, 0]
        assert buf0.stats()["overwritten_reads"] == 1
        assert [(t.peer, t.op) for t in buf0.last_timeouts()] == [(1, "combine")]
        torch.testing.assert_close(out0, _reference(x0, idx0, w0, _scale, {0}), rtol=1e-5, atol=1e-5)
        buf1.combine(recv1, idx1, w1, handle=handle1)
    assert metrics.sample("elasticep_kernel_peer_timeouts_total", {"op": "combine"}) == before + 2


def test_recv_x_outlives_close(cluster_id: str) -> None:
    x = torch.randn(MAX_TOKENS, HIDDEN)
    idx, w = _routing(MAX_TOKENS, SPR, seed=2, masked=0.0)
    buf = _buffer(0, 1, cluster_id)
    recv_x, counts, handle = buf.dispatch(x, idx)
    buf.combine(recv_x, idx, w, handle=handle)
    kept = recv_x[0, : int(counts[0])]
    buf.close()
    assert not os.path.exists("/dev/shm" + segment_name(cluster_id, 0))
    rows = [t for t in range(MAX_TOKENS) for k in range(TOPK) if int(idx[t, k]) == 0]
    torch.testing.assert_close(kept, x[rows])  # still mapped: the tensor holds its own mapping


def test_region_is_mapped_only_from_the_file_the_kernel_mapped(cluster_id: str) -> None:
    from elasticep.kernel import buffer as buffer_module

    with _buffer(0, 1, cluster_id) as buf:
        rt = buf._runtime
        args = (buf.shm_name, rt.region_offset, rt.region_bytes)
        assert buffer_module._map_region(*args, rt.segment_file_id) is not None
        # The name unlinked and made anew by someone else: another file, not aliased.
        assert buffer_module._map_region(*args, (rt.segment_file_id[0], rt.segment_file_id[1] + 1)) is None


def test_without_a_second_mapping_recv_x_is_private(cluster_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from elasticep.kernel import buffer as buffer_module

    monkeypatch.setattr(buffer_module, "_SHM_DIR", "/nonexistent-shm-dir")
    bufs = [_buffer(r, 2, cluster_id) for r in range(2)]
    try:
        assert all(b._runtime.region_alias == 0 for b in bufs)
        xs = [torch.randn(MAX_TOKENS, HIDDEN) for _ in range(2)]
        routes = [_routing(MAX_TOKENS, 2 * SPR, seed=40 + r) for r in range(2)]
        outs: list[Any] = [None, None]
        _two_rank_step(bufs, xs, routes, outs)
        for r in range(2):
            torch.testing.assert_close(outs[r], _reference(xs[r], *routes[r], _scale, {0, 1}), rtol=1e-5, atol=1e-5)
    finally:
        for b in bufs:
            b.close()


def test_silent_peer_times_out_and_is_marked(cluster_id: str) -> None:
    before = metrics.sample("elasticep_kernel_peer_timeouts_total", {"op": "dispatch"})
    published: list[PeerTimeout] = []
    with _buffer(0, 2, cluster_id, timeout_us=50_000) as buf, _buffer(1, 2, cluster_id):
        source = KernelMaskSource(buf, publish=published.append)
        x = torch.randn(4, HIDDEN)
        idx, w = _routing(4, 2 * SPR, seed=3, masked=0.0)
        t0 = time.monotonic()
        recv_x, counts, handle = buf.dispatch(x, idx, layer=7)
        elapsed = time.monotonic() - t0
        assert 0.05 <= elapsed < 1.0
        assert buf.active_ranks.tolist() == [1, 0]
        (timeout,) = buf.last_timeouts()
        assert timeout.peer == 1 and timeout.op == "dispatch" and timeout.layer == 7 and timeout.waited_us >= 50_000
        # Rank 1 is now skipped: combine does not wait on it, and its slots contribute nothing.
        t0 = time.monotonic()
        out = buf.combine(_run_local_experts(0, recv_x, counts), idx, w, handle=handle, layer=7)
        assert time.monotonic() - t0 < 0.05
        assert buf.last_timeouts() == []
        torch.testing.assert_close(out, _reference(x, idx, w, _scale, {0}), rtol=1e-5, atol=1e-5)
        asyncio.run(source.publish_new())
        assert published == [PeerTimeout(observer=0, peer=1, op="dispatch", layer=7, waited_us=timeout.waited_us)]
        assert source.poll() == []  # each timeout is reported once
    assert metrics.sample("elasticep_kernel_peer_timeouts_total", {"op": "dispatch"}) == before + 1


def test_mask_source_awaits_a_coroutine_publisher(cluster_id: str) -> None:
    got: list[PeerTimeout] = []

    async def publish(event: PeerTimeout) -> None:
        await asyncio.sleep(0)
        got.append(event)

    with _buffer(0, 3, cluster_id, timeout_us=20_000) as buf, _buffer(1, 3, cluster_id), _buffer(2, 3, cluster_id):
        source = KernelMaskSource(buf, publish)
        x = torch.randn(2, HIDDEN)
        idx, w = _routing(2, 3 * SPR, seed=4, masked=0.0)
        recv_x, _, handle = buf.dispatch(x, idx)
        buf.combine(recv_x, idx, w, handle=handle)
        events = asyncio.run(source.publish_new())
    assert [(e.peer, e.op) for e in events] == [(1, "dispatch"), (2, "dispatch")]
    assert got == events and source.reported == 2


def test_inactive_peer_is_skipped_without_waiting(cluster_id: str) -> None:
    with _buffer(0, 2, cluster_id, timeout_us=10_000_000) as buf, _buffer(1, 2, cluster_id):
        mask = torch.tensor([1, 0], dtype=torch.int32)
        x = torch.randn(3, HIDDEN)
        idx, w = _routing(3, 2 * SPR, seed=5, masked=0.0)
        t0 = time.monotonic()
        recv_x, counts, handle = buf.dispatch(x, idx, mask)
        out = buf.combine(_run_local_experts(0, recv_x, counts), idx, w, mask, handle=handle)
        assert time.monotonic() - t0 < 1.0
        assert buf.last_timeouts() == [] and buf.active_ranks.tolist() == [1, 1]  # the buffer's own mask untouched
        torch.testing.assert_close(out, _reference(x, idx, w, _scale, {0}), rtol=1e-5, atol=1e-5)


def test_message_from_another_epoch_is_refused_and_counted(cluster_id: str) -> None:
    # Two views sharing one segment name: only the message epoch keeps them apart.
    name = segment_name(cluster_id, 3)
    before = metrics.sample("elasticep_stale_epoch_refused_total", {"channel": "kernel"})
    current = _buffer(0, 2, cluster_id, epoch=2, shm_name=name, timeout_us=30_000)
    stale = _buffer(1, 2, cluster_id, epoch=1, shm_name=name, timeout_us=30_000)
    try:
        idx, w = _routing(4, 2 * SPR, seed=6, masked=0.0)
        x_stale = torch.randn(4, HIDDEN)
        recv_x, counts, handle = stale.dispatch(x_stale, idx)  # posts epoch-1 tokens, then times out
        stale.combine(recv_x, idx, w, handle=handle)
        x = torch.randn(4, HIDDEN)
        recv_x, counts, handle = current.dispatch(x, idx)
        assert current.stats()["refused_stale_epoch"] == 1
        assert current.active_ranks.tolist() == [1, 0]
        own = int((idx // SPR == 0).sum())  # this rank's own (token, slot) pairs on its slots
        assert own > 0 and int(counts.sum()) == own  # nothing of rank 1's was applied
        out = current.combine(_run_local_experts(0, recv_x, counts), idx, w, handle=handle)
        torch.testing.assert_close(out, _reference(x, idx, w, _scale, {0}), rtol=1e-5, atol=1e-5)
    finally:
        current.close()
        stale.close()
    assert metrics.sample("elasticep_stale_epoch_refused_total", {"channel": "kernel"}) == before + 1


def test_layout_disagreement_is_refused(cluster_id: str) -> None:
    with _buffer(0, 2, cluster_id):
        with pytest.raises(ValueError, match="layout|bytes"):
            EPBuffer(1, 2, slots_per_rank=SPR, max_tokens=MAX_TOKENS, hidden=HIDDEN * 2, topk=TOPK, cluster_id=cluster_id)


def test_bad_inputs_raise_typed_errors(cluster_id: str) -> None:
    with _buffer(0, 1, cluster_id) as buf:
        x = torch.randn(4, HIDDEN)
        idx, w = _routing(4, SPR, seed=7)
        with pytest.raises(TypeError, match="x must have dtype"):
            buf.dispatch(x.double(), idx)
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            buf.dispatch(x.numpy(), idx)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"x must have shape \[num_tokens, 32\]"):
            buf.dispatch(torch.randn(4, HIDDEN + 1), idx)
        with pytest.raises(ValueError, match="contiguous"):
            buf.dispatch(torch.randn(HIDDEN, 4).t(), idx)
        with pytest.raises(ValueError, match="more than max_tokens"):
            buf.dispatch(torch.randn(MAX_TOKENS + 1, HIDDEN), torch.zeros(MAX_TOKENS + 1, TOPK, dtype=torch.int64))
        with pytest.raises(TypeError, match="topk_idx must have dtype torch.int64"):
            buf.dispatch(x, idx.int())
        with pytest.raises(ValueError, match=r"topk_idx must have shape \[4, 3\]"):
            buf.dispatch(x, idx[:, :2].contiguous())
        with pytest.raises(ValueError, match=r"topk_idx\[1, 2\] = 4 is not -1 or a slot in \[0, 4\)"):
            bad = idx.clone()
            bad[1, 2] = SPR
            buf.dispatch(x, bad)
        with pytest.raises(TypeError, match="active_ranks must have dtype torch.int32"):
            buf.dispatch(x, idx, torch.ones(1, dtype=torch.int64))
        with pytest.raises(ValueError, match=r"active_ranks must have shape \[1\]"):
            buf.dispatch(x, idx, torch.ones(2, dtype=torch.int32))
        with pytest.raises(ValueError, match="timeout_us"):
            buf.dispatch(x, idx, timeout_us=-1)
        assert buf.stats()["dispatch_calls"] == 0  # nothing was sent by a refused call

        recv_x, counts, handle = buf.dispatch(x, idx)
        with pytest.raises(RuntimeError, match="before combine"):
            buf.dispatch(x, idx)
        with pytest.raises(ValueError, match="needs the handle"):
            buf.combine(recv_x, idx, w)
        with pytest.raises(TypeError, match="DispatchHandle"):
            buf.combine(recv_x, idx, w, handle=object())  # type: ignore[arg-type]
        forged = DispatchHandle(seq=99, epoch=0, num_tokens=4, capacity=handle.capacity, dtype=torch.float32)
        with pytest.raises(ValueError, match="does not belong"):
            buf.combine(recv_x, idx, w, handle=forged)
        with pytest.raises(TypeError, match="expert_out must have dtype torch.float32"):
            buf.combine(recv_x.bfloat16(), idx, w, handle=handle)
        with pytest.raises(ValueError, match="expert_out must have shape"):
            buf.combine(recv_x[:, :1].contiguous(), idx, w, handle=handle)
        with pytest.raises(ValueError, match="expert_out rows must be contiguous"):
            buf.combine(torch.randn(HIDDEN, handle.capacity, SPR).permute(2, 1, 0), idx, w, handle=handle)
        with pytest.raises(TypeError, match="topk_weights must have dtype torch.float32"):
            buf.combine(recv_x, idx, w.double(), handle=handle)
        with pytest.raises(ValueError, match="topk_weights must have shape"):
            buf.combine(recv_x, idx, w[:2].contiguous(), handle=handle)
        changed = idx.clone()
        changed[0, 0] = (int(changed[0, 0]) + 1) % SPR
        with pytest.raises(ValueError, match="differs from the one passed to dispatch"):
            buf.combine(recv_x, changed, w, handle=handle)
        out = buf.combine(recv_x, idx, w, handle=handle)  # the refusals left the call intact
        assert out.shape == (4, HIDDEN)
        with pytest.raises(ValueError, match="does not belong"):
            buf.combine(recv_x, idx, w, handle=handle)  # a handle is answered once


def test_constructor_checks(cluster_id: str) -> None:
    with pytest.raises(ValueError, match="rank must be"):
        EPBuffer(2, 2, slots_per_rank=1, max_tokens=1, hidden=1, topk=1, cluster_id=cluster_id)
    with pytest.raises(ValueError, match="cluster_id"):
        EPBuffer(0, 1, slots_per_rank=1, max_tokens=1, hidden=1, topk=1, cluster_id="a/b")
    with pytest.raises(ValueError, match="active_ranks must have shape"):
        EPBuffer(0, 2, slots_per_rank=1, max_tokens=1, hidden=1, topk=1, cluster_id=cluster_id,
                 active_ranks=torch.ones(3, dtype=torch.int32))
    assert KernelTimeout(1, "combine", 2, 3).waited_us == 3
