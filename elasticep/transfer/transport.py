"""The Mooncake transfer engine as elasticep's weight transport.

One :class:`MooncakeTransport` per process: it starts a ``TransferEngine`` in peer-to-peer
handshake mode (no metadata server; a peer is addressed as ``"host:rpc_port"``), registers memory
and submits batched one-sided reads and writes. The engine takes RDMA where it finds an RDMA NIC
and TCP otherwise (``MC_FORCE_TCP=1`` forces TCP).

Bounds: a killed peer fails a transfer in well under a second; a hung one only after the
engine's ``MC_TRANSFER_TIMEOUT`` (seconds, read from the environment when the engine starts,
default 30). ``timeout_s`` sets that variable for this process before the engine starts (argument
wins over an existing environment value). ``send_probe`` is never used as a health check: it
blocks about 60 s on a hung peer.

Contract of :meth:`MooncakeTransport.wait`: it blocks (without the GIL) until the batch completes
or fails, and must be called exactly once per batch: the engine frees the batch when it reports.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from typing import Protocol

from elasticep import metrics

__all__ = ["MooncakeTransport", "Transport", "TransportError", "mooncake_te_unavailable_reason"]


class Transport(Protocol):
    """What the executor and host backups need from a weight transport.

    :class:`MooncakeTransport` is the real one; :class:`~elasticep.transfer.InProcessTransport`
    its in-process twin. ``wait`` is called exactly once per batch and returns True on success.
    """

    peer: str

    def register(self, address: int, nbytes: int) -> None: ...

    def unregister(self, address: int) -> None: ...

    def unregister_all(self) -> None: ...

    def submit_read(self, peer: str, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]) -> int: ...

    def submit_write(self, peer: str, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]) -> int: ...

    def wait(self, batch: int) -> bool: ...


class TransportError(RuntimeError):
    """The transfer engine could not start, register memory or submit a batch."""


def mooncake_te_unavailable_reason() -> str | None:
    """Why the Mooncake transfer engine cannot be imported here, or ``None`` if it can."""
    try:
        import mooncake.engine  # noqa: F401
    except ImportError as exc:
        return (
            f"mooncake.engine does not import ({exc}); install the 'mooncake' extra and the system "
            "libraries libibverbs1 and libnuma1"
        )
    return None


class MooncakeTransport:
    """A started Mooncake transfer engine; see the module docs.

    ``host`` is the address peers reach this process on. ``timeout_s`` (whole seconds, >= 1)
    bounds a transfer to a hung peer. The engine's own threads live as long as the process.
    """

    def __init__(self, host: str = "127.0.0.1", *, timeout_s: int | None = None) -> None:
        if timeout_s is not None:
            if int(timeout_s) < 1:
                raise ValueError("timeout_s must be >= 1 s")
            os.environ["MC_TRANSFER_TIMEOUT"] = str(int(timeout_s))
        os.environ.setdefault("MC_LOG_LEVEL", "WARNING")
        try:
            from mooncake.engine import TransferEngine
        except ImportError as exc:
            raise TransportError(str(mooncake_te_unavailable_reason())) from exc
        self._engine = TransferEngine()
        rc = self._engine.initialize(host, "P2PHANDSHAKE", "tcp", "")
        if rc != 0:
            raise TransportError(f"TransferEngine.initialize({host!r}, P2PHANDSHAKE, tcp) returned {rc}")
        self.host = host
        self.timeout_s = int(os.environ.get("MC_TRANSFER_TIMEOUT", "30"))
        self.peer = f"{host}:{self._engine.get_rpc_port()}"
        """This engine's address, as peers name it in their transfers."""
        self._registered: dict[int, int] = {}  # address -> nbytes

    def __repr__(self) -> str:
        return f"MooncakeTransport(peer={self.peer!r}, timeout_s={self.timeout_s})"

    def register(self, address: int, nbytes: int) -> None:
        """Register ``nbytes`` of memory at ``address`` so that peers can read or write it.

        The engine refuses a region that overlaps one it already holds. Two live buffers never
        overlap, so an overlapping registration made through this transport belongs to memory
        that was freed without :meth:`unregister` (the allocator handed the addresses out again):
        it is dropped, counted in ``elasticep_transfer_stale_registrations_total``, and the new
        region registered.
        """
        end = address + nbytes
        for old, old_nbytes in list(self._registered.items()):
            if old < end and address < old + old_nbytes:
                self._engine.unregister_memory(old)
                del self._registered[old]
                metrics.TRANSFER_STALE_REGISTRATIONS.inc()
        rc = self._engine.register_memory(address, nbytes)
        if rc != 0:
            raise TransportError(f"register_memory({address:#x}, {nbytes}) returned {rc}")
        self._registered[address] = nbytes

    def unregister(self, address: int) -> None:
        """Unregister memory registered at ``address`` (before freeing it)."""
        if self._registered.pop(address, None) is not None:
            self._engine.unregister_memory(address)

    def unregister_all(self) -> None:
        """Unregister everything :meth:`register` registered (before freeing that memory)."""
        for address in self._registered:
            self._engine.unregister_memory(address)
        self._registered.clear()

    def submit_read(self, peer: str, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]) -> int:
        """Start copying ``remote[i]`` on ``peer`` into ``local[i]`` (``lengths[i]`` bytes); return a batch id."""
        return self._submit(self._engine.batch_transfer_async_read, peer, local, remote, lengths)

    def submit_write(self, peer: str, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]) -> int:
        """Start copying ``local[i]`` into ``remote[i]`` on ``peer``; return a batch id."""
        return self._submit(self._engine.batch_transfer_async_write, peer, local, remote, lengths)

    def _submit(self, op, peer: str, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]) -> int:
        if not (len(local) == len(remote) == len(lengths)) or not local:
            raise ValueError("a batch needs one or more (local, remote, length) triples")
        batch = op(peer, list(local), list(remote), list(lengths))
        # The engine returns 0 when it could not submit (and -1 cast to an id when it could not
        # open the peer's segment): either way nothing is in flight.
        if batch in (0, -1) or batch == (1 << 64) - 1:
            raise TransportError(f"could not submit a batch of {len(local)} transfers to {peer}")
        return batch

    def wait(self, batch: int) -> bool:
        """Block until ``batch`` completes (True) or fails or times out (False). Call once per batch."""
        return self._engine.get_batch_transfer_status([batch]) == 0
