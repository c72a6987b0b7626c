"""``EPBuffer``: expert-parallel dispatch/combine between the rank processes of one host.

Each rank process of an expert-parallel group builds one :class:`EPBuffer` per view epoch. The
ranks exchange tokens through a POSIX shared-memory segment named after the cluster id and the
epoch (:func:`segment_name`); the native kernel (``elasticep._C.KernelRuntime``) does the copies
and the waiting with the GIL released.

The contract is the one Mooncake EP and DeepEP's shrink mode keep on GPUs:

* every wait on a peer is bounded by ``timeout_us``; on expiry the kernel sets
  ``active_ranks[peer] = 0`` with an atomic store, treats the peer as having sent nothing and
  goes on;
* a peer already at 0 in ``active_ranks`` is neither sent to nor waited on;
* every message carries the view epoch; a message from another epoch is refused and counted
  (``stats()["refused_stale_epoch"]``, metric ``elasticep_stale_epoch_refused_total{channel="kernel"}``).

So a call always returns, within about ``timeout_us`` of its start, with the contributions of the
ranks that answered. :meth:`EPBuffer.combine` leaves out the expert outputs of ranks that are
inactive: a token routed to a dead rank gets the weighted sum over its other top-k slots only.
The caller (the engine) sees the mask change and decides to retry the step under a new view.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass

import torch

from elasticep import _C, metrics

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_ROW_DTYPES = tuple(_DTYPE_CODES)
_SHM_DIR = "/dev/shm"  # where POSIX shm_open names live on Linux


def segment_name(cluster_id: str, epoch: int) -> str:
    """The shared-memory name of the segment for ``cluster_id`` at view ``epoch``: ``/elasticep-<id>-e<epoch>``.

    ``cluster_id`` must be unique per launch (the launcher draws one), so a segment left behind by
    a crashed run is never reused; it may contain letters, digits, ``-``, ``_`` and ``.``.
    """
    if not cluster_id or any(not (c.isalnum() or c in "-_.") for c in cluster_id):
        raise ValueError(f"cluster_id {cluster_id!r} must be non-empty and use only letters, digits, '-', '_', '.'")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return f"/elasticep-{cluster_id}-e{epoch}"


def unlink_segment(cluster_id: str, epoch: int) -> bool:
    """Remove the segment name of ``(cluster_id, epoch)``; True if it existed.

    Ranks unlink it themselves when the last one closes; a launcher calls this after killing
    ranks (a SIGKILLed rank never closes) and when it retires an epoch.
    """
    return _C.shm_unlink(segment_name(cluster_id, epoch))


@dataclass(frozen=True)
class KernelTimeout:
    """One peer the kernel gave up on: ``op`` is ``"dispatch"`` or ``"combine"``, ``waited_us`` in us."""

    peer: int
    op: str
    layer: int
    waited_us: int


@dataclass(frozen=True)
class KernelWait:
    """A peer that the dispatch or combine in progress still waits on: ``waited_us`` so far, in us;
    ``since_ns`` (``time.monotonic_ns()`` clock) is when that wait began and names it."""

    peer: int
    op: str
    layer: int
    waited_us: int
    since_ns: int


@dataclass(frozen=True)
class DispatchHandle:
    """What :meth:`EPBuffer.combine` needs from the :meth:`EPBuffer.dispatch` it answers.

    ``seq`` is the buffer's call number; a handle from any other dispatch is refused.
    ``num_tokens`` is this rank's token count, ``capacity`` the second dimension of ``recv_x``.
    """

    seq: int
    epoch: int
    num_tokens: int
    capacity: int
    dtype: torch.dtype


class EPBuffer:
    """One rank's end of the shared-memory expert-parallel exchange for one view epoch.

    Args:
        rank: this process's rank in ``[0, num_ranks)``.
        num_ranks: ranks in the group (all on this host).
        slots_per_rank: physical expert slots per rank; slot ``s`` lives on rank ``s // slots_per_rank``
            as local slot ``s % slots_per_rank``.
        max_tokens: the most tokens one rank passes to one :meth:`dispatch`.
        hidden: hidden size of a token row.
        topk: top-k of the routing (second dimension of ``topk_idx``).
        cluster_id: names the launch; with ``epoch`` it names the segment (:func:`segment_name`).
        epoch: the view epoch this buffer serves; stamped on every message.
        timeout_us: default bound on each wait for a peer, microseconds
            (``Config.kernel_timeout_us``).
        active_ranks: the mask, ``[num_ranks]`` ``torch.int32`` on CPU, 1 = active. If omitted the
            buffer allocates one of all ones. The kernel writes 0s into it through its pointer.
        shm_name: override the segment name (e.g. to reuse one segment across epochs; the message
            epoch still keeps the epochs apart).
        spin_us: how long a wait polls before it sleeps on the futex, microseconds. Default: 50
            when ``num_ranks`` is at most the host's CPU count, else 0 (a few polls only).

    The segment is created by the first rank to attach (or by a launcher that built the same
    buffer first) and unlinked by the last rank to :meth:`close`. One dispatch may be in flight
    per buffer: each :meth:`dispatch` must be answered by :meth:`combine` before the next.
    Methods are not thread-safe; call them from the rank's compute thread.
    """

    def __init__(
        self,
        rank: int,
        num_ranks: int,
        *,
        slots_per_rank: int,
        max_tokens: int,
        hidden: int,
        topk: int,
        cluster_id: str,
        epoch: int = 0,
        timeout_us: int = 200_000,
        active_ranks: torch.Tensor | None = None,
        shm_name: str | None = None,
        spin_us: int | None = None,
    ) -> None:
        if active_ranks is None:
            active_ranks = torch.ones(num_ranks, dtype=torch.int32)
        _check_mask(active_ranks, num_ranks)
        if timeout_us < 0:
            raise ValueError(f"timeout_us must be >= 0, got {timeout_us}")
        self.active_ranks = active_ranks
        """The mask, ``[num_ranks]`` ``torch.int32``: 1 active, 0 inactive (written by the kernel)."""
        self.timeout_us = int(timeout_us)
        self.cluster_id = cluster_id
        name = shm_name if shm_name is not None else segment_name(cluster_id, epoch)
        if spin_us is not None and spin_us < 0:
            raise ValueError(f"spin_us must be >= 0, got {spin_us}")
        self._runtime = _C.KernelRuntime(
            rank, num_ranks, slots_per_rank, max_tokens, hidden, topk, epoch, name, -1 if spin_us is None else spin_us
        )
        self._lock = threading.Lock()
        self._pending: DispatchHandle | None = None
        self._recv_pool: torch.Tensor | None = None
        # Plain attributes: the pybind properties cost a call each, several times per step.
        self._num_ranks = num_ranks
        self._slots_per_rank = self._runtime.slots_per_rank
        self._hidden = self._runtime.hidden
        self._topk = self._runtime.topk
        self._max_tokens = self._runtime.max_tokens
        self._region = _map_region(
            name, self._runtime.region_offset, self._runtime.region_bytes, self._runtime.segment_file_id
        )
        if self._region is not None:
            self._runtime.set_region_alias(self._region.data_ptr())
        self._recv_view: tuple[torch.dtype, int, torch.Tensor] | None = None
        self._refused_reported = 0
        self._log: list[tuple[int, KernelTimeout]] = []
        self._log_seq = 0
        self.dispatches = 0
        """Dispatch calls begun on this buffer (counted as each starts; readable from any thread)."""

    # --- properties -----------------------------------------------------------------------------

    rank = property(lambda self: self._runtime.rank, doc="This rank.")
    num_ranks = property(lambda self: self._runtime.num_ranks, doc="Ranks in the group.")
    slots_per_rank = property(lambda self: self._runtime.slots_per_rank, doc="Expert slots per rank.")
    max_tokens = property(lambda self: self._runtime.max_tokens, doc="Most tokens per dispatch.")
    hidden = property(lambda self: self._runtime.hidden, doc="Hidden size.")
    topk = property(lambda self: self._runtime.topk, doc="Top-k of the routing.")
    epoch = property(lambda self: self._runtime.epoch, doc="View epoch stamped on every message.")
    shm_name = property(lambda self: self._runtime.shm_name, doc="Shared-memory segment name.")
    segment_bytes = property(lambda self: self._runtime.segment_bytes, doc="Size of the segment, bytes.")

    # --- data plane -----------------------------------------------------------------------------

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        active_ranks: torch.Tensor | None = None,
        timeout_us: int | None = None,
        *,
        layer: int = -1,
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        """Send each token to the ranks owning its top-k slots; receive this rank's share.

        Args:
            x: ``[num_tokens, hidden]``, ``torch.float32`` or ``torch.bfloat16``, CPU, contiguous;
                ``num_tokens <= max_tokens``. Every rank of one call uses the same dtype.
            topk_idx: ``[num_tokens, topk]`` ``torch.int64``: physical slot ids, ``-1`` = unused.
            active_ranks: the mask (``[num_ranks]`` ``torch.int32``); default :attr:`active_ranks`.
                Inactive peers are skipped; peers that time out are set to 0 in it.
            timeout_us: bound on the wait for the peers, microseconds; default :attr:`timeout_us`.
            layer: recorded with any timeout (for ``PeerTimeout.layer``).

        Returns:
            ``(recv_x, recv_count, handle)``: ``recv_x`` is ``[slots_per_rank, capacity, hidden]``
            of ``x.dtype``, rows of local slot ``e`` at ``recv_x[e, :recv_count[e]]`` ordered by
            source rank, source token, top-k position (rows past the count are unspecified).
            ``recv_x`` is a view of a buffer this object reuses: it is valid until the next
            :meth:`dispatch` (clone it to keep it longer); its rows are contiguous, its slots may
            not be. It lies in this rank's return region of the shared segment whenever it fits
            (2 * num_ranks * max_tokens * topk rows), so writing the expert outputs over it in
            place lets :meth:`combine` move no rows at all. Do not write into it after
            :meth:`combine`: the peers may still be reading outputs from it until they finish
            their own combine. ``recv_count`` is ``[slots_per_rank]`` ``torch.int64``;
            ``handle`` goes to :meth:`combine`.
        """
        mask = self.active_ranks if active_ranks is None else active_ranks
        timeout = self.timeout_us if timeout_us is None else int(timeout_us)
        _check_mask(mask, self._num_ranks)
        _check_rows("x", x, self._hidden)
        tokens = x.shape[0]
        if tokens > self._max_tokens:
            raise ValueError(f"x has {tokens} tokens, more than max_tokens={self._max_tokens}")
        _check_topk(topk_idx, tokens, self._topk)
        if timeout < 0:
            raise ValueError(f"timeout_us must be >= 0, got {timeout}")
        if self._pending is not None:
            raise RuntimeError("dispatch called again before combine of the previous dispatch")
        dtype = x.dtype
        counts = torch.empty(self._slots_per_rank, dtype=torch.int64)
        self.dispatches += 1
        with self._lock:
            # One native call when recv_x fits in the return region (it unpacks there), two otherwise.
            capacity, unpacked = self._runtime.dispatch(
                x.data_ptr(), tokens, _DTYPE_CODES[dtype], topk_idx.data_ptr(), mask.data_ptr(), timeout, layer,
                counts.data_ptr(),
            )
            if unpacked:
                recv_x = self._region_view(dtype, capacity)
            else:
                recv_x, slot_stride = self._private_recv(dtype, capacity)
                self._runtime.dispatch_unpack(recv_x.data_ptr(), capacity, slot_stride)
        self._after_call()
        handle = DispatchHandle(
            seq=self._runtime.seq, epoch=self.epoch, num_tokens=tokens, capacity=capacity, dtype=dtype
        )
        self._pending = handle
        return recv_x, counts, handle

    def _region_view(self, dtype: torch.dtype, capacity: int) -> torch.Tensor:
        """``recv_x`` as the kernel unpacked it: ``[slots_per_rank, capacity, hidden]`` at the start
        of this rank's return region, slot stride ``capacity`` (then a combine of expert outputs
        written over it moves no rows)."""
        cached = self._recv_view
        if cached is not None and cached[0] == dtype and cached[1] == capacity:
            return cached[2]
        assert self._region is not None
        slots, hidden = self._slots_per_rank, self._hidden
        nbytes = slots * capacity * hidden * (4 if dtype == torch.float32 else 2)
        recv_x = self._region[:nbytes].view(dtype).view(slots, capacity, hidden)
        self._recv_view = (dtype, capacity, recv_x)
        return recv_x

    def _private_recv(self, dtype: torch.dtype, capacity: int) -> tuple[torch.Tensor, int]:
        """``recv_x`` in private memory (no region mapping, or more rows than the region holds) and
        its slot stride in rows: a pool that grows with headroom."""
        slots, hidden = self._slots_per_rank, self._hidden
        pool = self._recv_pool
        if pool is None or pool.dtype != dtype or pool.shape[1] < capacity:
            # Grow with headroom so that step-to-step variation in the counts does not reallocate.
            rows = max(capacity + capacity // 4, 1)
            pool = self._recv_pool = torch.empty(slots, rows, hidden, dtype=dtype)
        return pool[:, :capacity], pool.shape[1]

    def combine(
        self,
        expert_out: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        active_ranks: torch.Tensor | None = None,
        timeout_us: int | None = None,
        handle: DispatchHandle | None = None,
        *,
        layer: int = -1,
    ) -> torch.Tensor:
        """Return each token's expert outputs to it and reduce them with the routing weights.

        Args:
            expert_out: ``[slots_per_rank, capacity, hidden]`` of the dispatch's dtype: the expert
                output of each row of ``recv_x`` at the same position. Rows must be contiguous
                (``recv_x`` itself, a contiguous tensor or any view with ``stride(1) == hidden``).
                ``recv_x`` itself, with the outputs written over it, is the fast path: the peers
                read them where they lie; any other tensor is copied into the segment once.
            topk_idx: the ``[num_tokens, topk]`` ``torch.int64`` tensor given to :meth:`dispatch`
                (same values; a different one is refused).
            topk_weights: ``[num_tokens, topk]`` ``torch.float32``.
            active_ranks: the mask, as for :meth:`dispatch`.
            timeout_us: bound on the wait for the peers, as for :meth:`dispatch`.
            handle: the handle :meth:`dispatch` returned (required).
            layer: recorded with any timeout, as for :meth:`dispatch`.

        Returns:
            ``[num_tokens, hidden]`` of the dispatch's dtype: ``out[t] = sum_k topk_weights[t, k] *
            expert_out_of(topk_idx[t, k])`` over the positions whose slot is not ``-1`` and whose
            rank is active at the end of the call, summed in top-k order in float32. Slots on
            ranks that are (or become) inactive contribute nothing.
        """
        if handle is None:
            raise ValueError("combine needs the handle returned by dispatch")
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle must be a DispatchHandle, got {type(handle).__name__}")
        if self._pending is None or (handle is not self._pending and handle != self._pending):
            raise ValueError("handle does not belong to this buffer's pending dispatch")
        mask = self.active_ranks if active_ranks is None else active_ranks
        timeout = self.timeout_us if timeout_us is None else int(timeout_us)
        _check_mask(mask, self._num_ranks)
        hidden, capacity, tokens = self._hidden, handle.capacity, handle.num_tokens
        _check_tensor("expert_out", expert_out, (handle.dtype,), contiguous=False)
        if expert_out.shape != (self._slots_per_rank, capacity, hidden):
            expected = [self._slots_per_rank, capacity, hidden]
            raise ValueError(f"expert_out must have shape {expected}, got {list(expert_out.shape)}")
        strides = expert_out.stride()
        slot_stride = strides[0] // hidden if hidden else 0
        if strides[2] != 1 or strides[1] != hidden or (strides[0] % hidden or slot_stride < capacity):
            raise ValueError(f"expert_out rows must be contiguous, got strides {strides}")
        _check_topk(topk_idx, tokens, self._topk)
        _check_tensor("topk_weights", topk_weights, (torch.float32,))
        if topk_weights.shape != (tokens, self._topk):
            raise ValueError(f"topk_weights must have shape [{tokens}, {self._topk}], got {list(topk_weights.shape)}")
        if timeout < 0:
            raise ValueError(f"timeout_us must be >= 0, got {timeout}")
        out = torch.empty(tokens, hidden, dtype=handle.dtype)
        with self._lock:
            self._runtime.combine(
                expert_out.data_ptr(),
                capacity,
                max(slot_stride, capacity),
                topk_weights.data_ptr(),
                topk_idx.data_ptr(),
                tokens,
                out.data_ptr(),
                mask.data_ptr(),
                timeout,
                layer,
            )
        self._pending = None
        self._after_call()
        return out

    # --- observation ----------------------------------------------------------------------------

    def last_timeouts(self) -> list[KernelTimeout]:
        """The peers that timed out in the last :meth:`dispatch` or :meth:`combine` (empty if none)."""
        return [KernelTimeout(*t) for t in self._runtime.last_timeouts()]

    def waiting(self, min_us: int = 0) -> list[KernelWait]:
        """The peers the call in progress has waited on for at least ``min_us`` and still waits
        on (empty when no call waits, or it has waited less).

        For another thread while this rank's compute thread is inside :meth:`dispatch` or
        :meth:`combine` (it takes no lock and never blocks): a detector can report a peer that is
        late long before the call's ``timeout_us`` runs out, while the call itself goes on
        waiting. The peer is not marked in ``active_ranks`` by this.
        """
        return [KernelWait(*w) for w in self._runtime.waiting(int(min_us))]

    def timeouts_since(self, cursor: int) -> tuple[list[KernelTimeout], int]:
        """Every timeout recorded after ``cursor`` (0 = from the start) and the new cursor.

        The buffer keeps the last 1024 records; a detection source polls this so that it sees the
        timeouts of every call, not only the last one.
        """
        items = [t for n, t in self._log if n > cursor]
        return items, self._log_seq

    def stats(self) -> dict[str, int]:
        """Counters: ``dispatch_calls``, ``combine_calls``, ``peer_timeouts``, ``refused_stale_epoch``, ``seq``,
        ``overwritten_reads`` (owners dropped from a combine because they rewrote their return region
        while this rank was still reading it: they had already given up on this rank)."""
        return dict(self._runtime.stats())

    def close(self) -> None:
        """Unmap the segment; the last rank to close unlinks it. Idempotent.

        A ``recv_x`` still referenced stays readable: it keeps its own mapping of the region.
        """
        if not self._runtime.closed:
            self._runtime.set_region_alias(0)
        self._runtime.close()
        self._region = None
        self._recv_view = None

    def __enter__(self) -> "EPBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"EPBuffer(rank={self.rank}, num_ranks={self.num_ranks}, epoch={self.epoch}, "
            f"slots_per_rank={self.slots_per_rank}, shm_name={self.shm_name!r})"
        )

    def _after_call(self) -> None:
        refused = self._runtime.refused_stale_epoch
        if refused > self._refused_reported:
            metrics.STALE_EPOCH_REFUSED.labels(channel="kernel").inc(refused - self._refused_reported)
            self._refused_reported = refused
        if not self._runtime.last_timeout_count:
            return
        for t in self.last_timeouts():
            metrics.KERNEL_PEER_TIMEOUTS.labels(op=t.op).inc()
            self._log_seq += 1
            self._log.append((self._log_seq, t))
        if len(self._log) > 1024:
            del self._log[: len(self._log) - 1024]


def _map_region(shm_name: str, offset: int, length: int, file_id: tuple[int, int]) -> torch.Tensor | None:
    """This rank's return region of segment ``shm_name`` as a ``uint8`` tensor, or None.

    A second mapping of the bytes the kernel maps at ``offset``: recv_x handed out from it stays
    valid after :meth:`EPBuffer.close` (the tensor keeps the mapping alive). None where POSIX
    shared memory is not a file under /dev/shm, or where the name now names another file than the
    one the kernel mapped (``file_id`` = (st_dev, st_ino)): recv_x then lives in private memory.
    """
    path = _SHM_DIR + shm_name
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != tuple(file_id):
            return None
        region = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    finally:
        os.close(fd)
    return torch.frombuffer(region, dtype=torch.uint8)


def _check_tensor(name: str, t: object, dtypes: tuple[torch.dtype, ...], contiguous: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {t.dtype}")
    if not t.is_cpu:
        raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_rows(name: str, x: object, hidden: int) -> None:
    _check_tensor(name, x, _ROW_DTYPES)
    assert isinstance(x, torch.Tensor)
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ValueError(f"{name} must have shape [num_tokens, {hidden}], got {list(x.shape)}")


def _check_topk(topk_idx: object, num_tokens: int, topk: int) -> None:
    _check_tensor("topk_idx", topk_idx, (torch.int64,))
    assert isinstance(topk_idx, torch.Tensor)
    if topk_idx.shape != (num_tokens, topk):
        raise ValueError(f"topk_idx must have shape [{num_tokens}, {topk}], got {list(topk_idx.shape)}")


def _check_mask(mask: object, num_ranks: int) -> None:
    _check_tensor("active_ranks", mask, (torch.int32,))
    assert isinstance(mask, torch.Tensor)
    if mask.shape != (num_ranks,):
        raise ValueError(f"active_ranks must have shape [{num_ranks}], got {list(mask.shape)}")
