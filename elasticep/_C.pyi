"""Type stub for the native extension built from csrc/ (pybind11, no torch headers).

Tensors cross as raw ``data_ptr()`` integers plus shapes; :class:`elasticep.kernel.EPBuffer` does
the checking and owns the one :class:`KernelRuntime` of a rank. ``eplb_plan_core`` takes numpy
arrays; :func:`elasticep.eplb.replan` calls it (``planner._plan_core``).
"""

import numpy as np

ABI_VERSION: int

def eplb_plan_core(
    cur: np.ndarray,
    load: np.ndarray,
    target: np.ndarray,
    speed: np.ndarray,
    slots_per_rank: int,
    budget: int,
    tolerance: float,
) -> tuple[np.ndarray, np.ndarray, int, float, float, bool]:
    """The replan core of :mod:`elasticep.eplb.planner` (csrc/eplb_planner.cpp): from ``cur``
    ([L, N] int64), ``load`` ([L, E] float64), ``target`` and ``speed`` ([R]), ``budget`` moves
    beyond the repair (< 0: none), returns ``(placement, repaired, lower_bound, balance_before,
    balance_after, covered)``, the same as ``planner._plan_reference`` and its balances."""

class KernelRuntime:
    """One rank's attachment to the shared dispatch/combine segment ``shm_name``."""

    def __init__(
        self,
        rank: int,
        num_ranks: int,
        slots_per_rank: int,
        max_tokens: int,
        hidden: int,
        topk: int,
        epoch: int,
        shm_name: str,
        spin_us: int = -1,
    ) -> None: ...
    def dispatch_send_wait(
        self, x_ptr: int, tokens: int, dtype: int, topk_ptr: int, active_ptr: int, timeout_us: int, layer: int
    ) -> list[int]:
        """Post ``x`` ([tokens, hidden], dtype 0 = float32, 1 = bfloat16) routed by ``topk_idx``
        ([tokens, topk] int64) to every active rank; wait for theirs; return rows per local slot."""
    def dispatch(
        self,
        x_ptr: int,
        tokens: int,
        dtype: int,
        topk_ptr: int,
        active_ptr: int,
        timeout_us: int,
        layer: int,
        counts_ptr: int,
    ) -> tuple[int, bool]:
        """dispatch_send_wait, then dispatch_unpack into this rank's return region when recv_x
        ([slots_per_rank, capacity, hidden], slot stride capacity) fits there; writes the counts
        into ``counts_ptr`` ([slots_per_rank] int64); returns ``(capacity, unpacked)``."""
    def dispatch_unpack(self, recv_ptr: int, capacity: int, slot_stride: int) -> None:
        """Copy the received rows into ``recv`` ([slots_per_rank, slot_stride, hidden]), which may be
        the caller's mapping of this rank's return region."""
    def combine(
        self,
        expert_out_ptr: int,
        capacity: int,
        slot_stride: int,
        weights_ptr: int,
        topk_ptr: int,
        tokens: int,
        out_ptr: int,
        active_ptr: int,
        timeout_us: int,
        layer: int,
    ) -> None:
        """Return expert outputs to their sources and write ``out`` ([tokens, hidden])."""
    def last_timeouts(self) -> list[tuple[int, str, int, int]]:
        """``(peer, op, layer, waited_us)`` for each peer that timed out in the last call."""
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...
    @property
    def last_timeout_count(self) -> int: ...
    @property
    def refused_stale_epoch(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def num_ranks(self) -> int: ...
    @property
    def slots_per_rank(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def hidden(self) -> int: ...
    @property
    def topk(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def shm_name(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def segment_bytes(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def region_offset(self) -> int:
        """Byte offset of this rank's return region in the segment (page aligned)."""
    @property
    def region_bytes(self) -> int:
        """Size of each rank's return region, bytes."""
    @property
    def region_alias(self) -> int:
        """Where the caller mapped this rank's return region (0: not mapped)."""
    @property
    def segment_file_id(self) -> tuple[int, int]:
        """``(st_dev, st_ino)`` of the segment file this runtime mapped."""
    def set_region_alias(self, ptr: int) -> None:
        """Declare the caller's own mapping of the return region; recv_x and expert_out found
        there are the region itself. 0 forgets it."""

def shm_unlink(name: str) -> bool:
    """Remove a shared segment name; True if it existed."""
