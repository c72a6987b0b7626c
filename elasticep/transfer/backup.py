"""Host-memory copies of expert weights, served to ranks through the transfer engine.

A :class:`HostBackup` keeps full copies of the experts of some layers in RAM, registered with its
own transfer engine, so that a rank can read a lost expert over the network instead of from
disk. Run it as its own process on a host other than the ranks whose experts it keeps (a host
failure must not take a rank and its backup together), and run two or more, each announcing
itself with a :class:`~elasticep.events.TransferEndpoint`: the executor tries them in turn.

A backup looks like a rank with one slot per logical expert (slot ``e`` holds expert ``e``). Its
endpoint carries a negative rank, ``-1 - backup_id`` (:func:`host_backup_rank`), so it never
collides with a serving rank on the bus.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from elasticep.events import TransferEndpoint
from elasticep.transfer.layout import ExpertLayout, ExpertWeights
from elasticep.transfer.sources import DiskSource
from elasticep.transfer.transport import MooncakeTransport, Transport

__all__ = ["HostBackup", "host_backup_rank", "is_host_backup", "run_host_backup"]


def host_backup_rank(backup_id: int) -> int:
    """The (negative) rank a host backup announces itself under."""
    if backup_id < 0:
        raise ValueError("backup_id must be >= 0")
    return -1 - backup_id


def is_host_backup(endpoint: TransferEndpoint) -> bool:
    return endpoint.rank < 0


class HostBackup:
    """Copies of every logical expert of ``layers`` (default all) of ``layout``, in RAM.

    ``layout`` is the ranks' layout; the backup re-slots it to ``num_experts`` slots. The memory
    is registered with ``transport`` (a new :class:`MooncakeTransport` on ``host`` by default).
    Fill it with :meth:`load` (from disk) or :meth:`put`, then publish :meth:`endpoint`.
    """

    def __init__(
        self,
        layout: ExpertLayout,
        num_experts: int,
        *,
        backup_id: int = 0,
        layers: Sequence[int] | None = None,
        transport: Transport | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.backup_id = backup_id
        self.rank = host_backup_rank(backup_id)
        self.num_experts = num_experts
        self.layout = layout.with_slots(num_experts)
        self.weights = ExpertWeights.allocate(self.layout, layers)
        self.transport = transport if transport is not None else MooncakeTransport(host)
        for address, nbytes in self.weights.regions():
            self.transport.register(address, nbytes)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.weights.layers

    def put(self, layer: int, expert: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store one expert's tensors (copied)."""
        for name, t in tensors.items():
            self.weights.tensor(layer, expert, name).copy_(t)

    def load(self, disk: DiskSource) -> int:
        """Read every expert of this backup's layers from ``disk``; return the bytes read."""
        total = 0
        for layer in self.layers:
            for expert in range(self.num_experts):
                total += disk.read_into(layer, expert, self.weights.expert(layer, expert))
        return total

    def endpoint(self, epoch: int) -> TransferEndpoint:
        """The event announcing this backup's buffers, to publish on the bus."""
        return TransferEndpoint(
            rank=self.rank, epoch=epoch, peer=self.transport.peer, buffers=self.weights.endpoint_buffers()
        )


def run_host_backup(
    layout: ExpertLayout,
    num_experts: int,
    checkpoint: Any,
    announce: Any,
    *,
    backup_id: int = 0,
    layers: Sequence[int] | None = None,
    host: str = "127.0.0.1",
    layer_offset: int = 0,
    epoch: int = 0,
    stop: threading.Event | None = None,
) -> None:
    """Process body of a host backup: load from ``checkpoint``, announce, serve until stopped.

    ``checkpoint`` is what :class:`DiskSource` takes; ``announce`` is called once with the
    :class:`~elasticep.events.TransferEndpoint` (e.g. a bus publish, or a pipe's ``send``).
    Serving needs no Python work (the engine answers reads from its own threads), so the process
    then sleeps until ``stop`` is set or it receives SIGTERM.
    """
    backup = HostBackup(layout, num_experts, backup_id=backup_id, layers=layers, host=host)
    backup.load(DiskSource(checkpoint, layer_offset=layer_offset))
    stop = stop if stop is not None else threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    announce(backup.endpoint(epoch))
    while not stop.wait(1.0):
        pass
