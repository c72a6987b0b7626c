"""The CPU expert-parallel kernel: dispatch/combine between rank processes through shared memory.

Every wait on a peer is bounded; a peer that does not answer in time is marked 0 in the
``active_ranks`` mask and treated as having sent nothing. See ``docs/kernel.md``.
"""

from elasticep.kernel.buffer import (
    DispatchHandle,
    EPBuffer,
    KernelTimeout,
    KernelWait,
    segment_name,
    unlink_segment,
)
from elasticep.kernel.source import KernelMaskSource, KernelWaitWatch

__all__ = [
    "DispatchHandle",
    "EPBuffer",
    "KernelMaskSource",
    "KernelTimeout",
    "KernelWait",
    "KernelWaitWatch",
    "segment_name",
    "unlink_segment",
]
