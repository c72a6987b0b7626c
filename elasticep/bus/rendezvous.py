"""Finding the bus endpoints of every rank through a ``torch.distributed.TCPStore``.

Keys, under ``prefix`` (default ``elasticep/bus/``):

* ``rank/<r>``: rank ``r``'s current registration, JSON ``{"endpoint": ..., "incarnation": ...}``.
* ``count``: number of registrations so far (``store.add``), a cheap change counter to poll.
* ``log/<n>``: the rank that made registration ``n`` (1-based), so a watcher that has seen ``n``
  registrations reads only the new ones.

A registration writes ``rank/<r>``, then bumps ``count``, then writes ``log/<n>``; a reader that
finds ``log/<n>`` missing (the writer is between the last two steps) stops there and picks it up
on its next look. The store carries endpoints only, never keys: a party that can write the store
can point peers at a wrong endpoint (a denial of service), but cannot make them accept its frames,
because every peer pins the rank's public key from :class:`~elasticep.bus.ClusterKeys`.

All methods block on the store; the ZeroMQ transport calls them from a worker thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

DEFAULT_PREFIX = "elasticep/bus/"


@dataclass(frozen=True)
class Registration:
    """Where a rank's PUB socket listens, and which incarnation of the rank bound it."""

    rank: int
    endpoint: str
    incarnation: int


def connect_store(address: str, *, timeout_s: float = 10.0) -> Any:
    """A client of the ``TCPStore`` at ``HOST:PORT`` (as hosted by the launcher)."""
    from torch.distributed import TCPStore

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"store address must be HOST:PORT, not {address!r}")
    return TCPStore(
        host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False, use_libuv=True
    )


class StoreRendezvous:
    """Register and look up bus endpoints on a store with ``set/get/add/check`` (``TCPStore``)."""

    def __init__(self, store: Any, prefix: str = DEFAULT_PREFIX) -> None:
        self.store = store
        self.prefix = prefix
        self._count_key = prefix + "count"

    def register(self, rank: int, endpoint: str, incarnation: int) -> int:
        """Publish this rank's endpoint; returns the registration number."""
        record = json.dumps({"endpoint": endpoint, "incarnation": incarnation})
        self.store.set(f"{self.prefix}rank/{rank}", record)
        n = int(self.store.add(self._count_key, 1))
        self.store.set(f"{self.prefix}log/{n}", str(rank))
        return n

    def count(self) -> int:
        """Registrations made so far (a change counter)."""
        return int(self.store.add(self._count_key, 0))

    def lookup(self, rank: int) -> Registration | None:
        key = f"{self.prefix}rank/{rank}"
        if not self.store.check([key]):
            return None
        data = json.loads(self.store.get(key))
        return Registration(rank, str(data["endpoint"]), int(data["incarnation"]))

    def changed_since(self, seen: int) -> tuple[int, dict[int, Registration]]:
        """Registrations after the first ``seen``: ``(new seen, {rank: latest registration})``."""
        total = self.count()
        ranks: set[int] = set()
        n = seen
        while n < total:
            key = f"{self.prefix}log/{n + 1}"
            if not self.store.check([key]):
                break
            ranks.add(int(self.store.get(key)))
            n += 1
        found: dict[int, Registration] = {}
        for rank in ranks:
            reg = self.lookup(rank)
            if reg is not None:
                found[rank] = reg
        return n, found
