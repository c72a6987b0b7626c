"""Moving expert weights between ranks: the Mooncake transfer engine, sources ranked by cost.

- :class:`ExpertLayout` / :class:`ExpertWeights`: where each slot's tensors live in the
  registered per-rank buffers;
- :class:`MooncakeTransport`: the transfer engine (TCP here, RDMA where the cluster has it);
- :class:`TransferExecutor`: loads a plan's moves into this rank, live replica > host copy > disk,
  batched, asynchronous, epoch-tagged, optionally checksummed;
- :class:`HostBackup`: a process keeping experts in RAM for the ranks of other hosts;
- :func:`plan_backups` / :class:`BackupStore`: backups kept by serving ranks, two per expert on
  other hosts than those serving it, within a memory budget, re-made after every view;
- :class:`DiskSource`: safetensors on disk, reading only the tensors needed;
- :class:`InProcessNetwork`: an in-process twin of the transport with seeded faults, for tests.
"""

from elasticep.transfer.backup import (
    BackupOverBudget,
    BackupPlan,
    BackupStore,
    BackupSync,
    HostBackup,
    backup_buffer_name,
    backup_slots,
    host_backup_rank,
    is_host_backup,
    plan_backups,
    run_host_backup,
)
from elasticep.transfer.executor import (
    ExpertMove,
    MoveLike,
    MoveResult,
    SourcesExhausted,
    StagedExperts,
    StaleEpoch,
    StaleTransfer,
    TransferExecutor,
    TransferJob,
    TransferReport,
)
from elasticep.transfer.inprocess import InProcessNetwork, InProcessTransport
from elasticep.transfer.layout import ExpertLayout, ExpertTensor, ExpertWeights, Extent, expert_crc32
from elasticep.transfer.sources import SOURCE_KINDS, TRANSFORMERS_EXPERT_KEY, DiskSource
from elasticep.transfer.transport import MooncakeTransport, Transport, TransportError, mooncake_te_unavailable_reason

__all__ = [
    "BackupOverBudget",
    "BackupPlan",
    "BackupStore",
    "BackupSync",
    "SOURCE_KINDS",
    "TRANSFORMERS_EXPERT_KEY",
    "DiskSource",
    "ExpertLayout",
    "ExpertMove",
    "ExpertTensor",
    "ExpertWeights",
    "Extent",
    "HostBackup",
    "InProcessNetwork",
    "InProcessTransport",
    "MooncakeTransport",
    "MoveLike",
    "MoveResult",
    "SourcesExhausted",
    "StagedExperts",
    "StaleEpoch",
    "StaleTransfer",
    "TransferExecutor",
    "TransferJob",
    "TransferReport",
    "Transport",
    "TransportError",
    "backup_buffer_name",
    "backup_slots",
    "expert_crc32",
    "host_backup_rank",
    "is_host_backup",
    "mooncake_te_unavailable_reason",
    "plan_backups",
    "run_host_backup",
]
