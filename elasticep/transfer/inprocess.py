"""An in-process twin of the weight transport, with seeded faults, for tests without an engine.

:class:`InProcessNetwork` joins any number of :class:`InProcessTransport` objects living in one
process; each behaves like a :class:`~elasticep.transfer.MooncakeTransport` (``peer``,
``register``, ``submit_read``/``submit_write``, ``wait``), copying bytes with ``memmove`` between
registered regions. Copies happen when the batch is waited for, so a peer killed between submit
and wait fails its batches mid-transfer, as a real one does. Faults: ``kill(peer)`` (fails at
once), ``hang(peer)`` (fails after the transport's ``timeout_s``), ``drop`` (each batch fails with
that probability, drawn from a ``random.Random(seed)``) and ``delay_s`` per batch.
"""

from __future__ import annotations

import ctypes
import itertools
import random
import threading
import time
from collections.abc import Sequence

__all__ = ["InProcessNetwork", "InProcessTransport"]


class InProcessNetwork:
    """The transports of one test and the faults between them; see the module docs."""

    def __init__(self, *, seed: int = 0, drop: float = 0.0, delay_s: float = 0.0) -> None:
        if not 0.0 <= drop <= 1.0 or delay_s < 0:
            raise ValueError("drop must be in [0, 1] and delay_s >= 0")
        self.drop = drop
        self.delay_s = delay_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._peers: dict[str, InProcessTransport] = {}
        self._killed: set[str] = set()
        self._hung: set[str] = set()
        self._ids = itertools.count(1)

    def transport(self, *, timeout_s: float = 2.0) -> "InProcessTransport":
        """A new transport on this network (``timeout_s`` bounds a transfer to a hung peer)."""
        t = InProcessTransport(self, f"inproc:{next(self._ids)}", timeout_s)
        with self._lock:
            self._peers[t.peer] = t
        return t

    def kill(self, peer: str) -> None:
        """``peer`` is dead: transfers to it fail at once."""
        with self._lock:
            self._killed.add(peer)

    def hang(self, peer: str) -> None:
        """``peer`` hangs: transfers to it fail after the caller's ``timeout_s``."""
        with self._lock:
            self._hung.add(peer)

    def heal(self, peer: str) -> None:
        with self._lock:
            self._killed.discard(peer)
            self._hung.discard(peer)

    def _state(self, peer: str) -> tuple["InProcessTransport | None", str]:
        with self._lock:
            if peer in self._killed or peer not in self._peers:
                return None, "dead"
            if peer in self._hung:
                return None, "hung"
            dropped = self.drop > 0 and self._rng.random() < self.drop
            return self._peers[peer], "drop" if dropped else "ok"


class InProcessTransport:
    """One process's end of an :class:`InProcessNetwork`; made by :meth:`InProcessNetwork.transport`."""

    def __init__(self, network: InProcessNetwork, peer: str, timeout_s: float) -> None:
        self.network = network
        self.peer = peer
        self.timeout_s = timeout_s
        self._regions: dict[int, int] = {}
        self._batches: dict[int, tuple[str, str, list[int], list[int], list[int]]] = {}
        self._next = itertools.count(1)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"InProcessTransport(peer={self.peer!r})"

    def register(self, address: int, nbytes: int) -> None:
        self._regions[address] = nbytes

    def unregister(self, address: int) -> None:
        self._regions.pop(address, None)

    def unregister_all(self) -> None:
        self._regions.clear()

    def _covers(self, address: int, nbytes: int) -> bool:
        return any(base <= address and address + nbytes <= base + size for base, size in self._regions.items())

    def submit_read(self, peer: str, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]) -> int:
        return self._submit("read", peer, local, remote, lengths)

    def submit_write(self, peer: str, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]) -> int:
        return self._submit("write", peer, local, remote, lengths)

    def _submit(self, op: str, peer: str, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int]) -> int:
        if not (len(local) == len(remote) == len(lengths)) or not local:
            raise ValueError("a batch needs one or more (local, remote, length) triples")
        with self._lock:
            batch = next(self._next)
            self._batches[batch] = (op, peer, list(local), list(remote), list(lengths))
        return batch

    def wait(self, batch: int) -> bool:
        """Do the copies of ``batch`` now; False if the peer is dead, hung, or the batch dropped."""
        with self._lock:
            op, peer, local, remote, lengths = self._batches.pop(batch)
        if self.network.delay_s:
            time.sleep(self.network.delay_s)
        other, state = self.network._state(peer)
        if state == "hung":
            time.sleep(self.timeout_s)
            return False
        if other is None or state != "ok":
            return False
        for lo, re, n in zip(local, remote, lengths):
            if not self._covers(lo, n) or not other._covers(re, n):
                return False  # as the engine refuses unregistered memory
            dst, src = (lo, re) if op == "read" else (re, lo)
            ctypes.memmove(dst, src, n)
        return True
