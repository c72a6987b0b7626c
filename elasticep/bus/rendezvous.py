"""Finding the bus endpoints of every rank through a ``torch.distributed.TCPStore``.

Keys, under ``prefix`` (default ``elasticep/bus/``):

* ``rank/<r>``: rank ``r``'s current registration, JSON
  ``{"endpoint": ..., "incarnation": ..., "sig": ...}``; ``sig`` is rank ``r``'s Ed25519 signature
  (base64) of the prefix, the rank, the endpoint and the incarnation (see
  :func:`registration_message`).
* ``count``: number of registrations so far (``store.add``), a cheap change counter to poll.
* ``log/<n>``: the rank that made registration ``n`` (1-based), so a watcher that has seen ``n``
  registrations reads only the new ones.

A registration writes ``rank/<r>``, then bumps ``count``, then writes ``log/<n>``; a reader that
finds ``log/<n>`` missing (the writer is between the last two steps) stops there and picks it up
on its next look.

The store is not authenticated: anyone who reaches it can write any key. So a reader trusts a
record only when its signature verifies against the rank's signing key in
:class:`~elasticep.bus.ClusterKeys` (never against a key carried in the record). A record that
does not parse, is not signed by its rank, or names a rank without a key is *refused*: skipped,
counted in ``elasticep_rendezvous_refused_total{reason}`` and in :attr:`StoreRendezvous.refused`,
never raised to the caller, so one bad value cannot stop a poller from reading the good ones. A
replayed old record of a rank (validly signed, older incarnation) is for the caller to refuse; the
ZeroMQ transport does. The store carries endpoints only, never keys: even a record that verifies
cannot make a peer accept frames, because every peer also pins the rank's CURVE public key.

All methods block on the store; the ZeroMQ transport calls them from a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from elasticep import metrics
from elasticep.bus.keys import ClusterKeys

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "elasticep/bus/"

MAX_RECORD_BYTES = 4096
"""A registration is about 200 bytes; anything longer under a rank's key is refused unread."""

MAX_INCARNATION = (1 << 64) - 1
"""Incarnations travel as 64 unsigned bits on the wire."""

MAX_LOG_READ = 1024
"""Log entries one :meth:`StoreRendezvous.changed_since` reads at most (the next call reads on), so
a store flooded with entries costs a poller bounded work per look."""

REFUSAL_REASONS = ("malformed", "unsigned", "bad_signature", "unknown_rank", "oversize")
"""Labels of ``elasticep_rendezvous_refused_total``: the value does not parse as a registration
(``malformed``), carries no signature (``unsigned``), carries one that does not verify against the
rank's key (``bad_signature``), names a rank without a signing key (``unknown_rank``), or is longer
than :data:`MAX_RECORD_BYTES` (``oversize``)."""


@dataclass(frozen=True)
class Registration:
    """Where a rank's PUB socket listens, and which incarnation of the rank bound it."""

    rank: int
    endpoint: str
    incarnation: int


def registration_message(prefix: str, rank: int, endpoint: str, incarnation: int) -> bytes:
    """The bytes a rank signs: the rendezvous prefix, its rank, endpoint and incarnation.

    The prefix and the rank are inside, so a record copied to another rank's key or another
    cluster's prefix does not verify there."""
    return b"\0".join((b"elasticep-bus-registration-v1", prefix.encode(), str(rank).encode(),
                       endpoint.encode(), str(incarnation).encode()))


def connect_store(address: str, *, timeout_s: float = 10.0) -> Any:
    """A client of the ``TCPStore`` at ``HOST:PORT`` (as hosted by the launcher)."""
    from torch.distributed import TCPStore

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"store address must be HOST:PORT, not {address!r}")
    return TCPStore(
        host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False, use_libuv=True
    )


class RecordRefused(ValueError):
    """A value under a rank's key is not a registration that rank signed; ``reason`` labels it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_ACCEPTED_KEPT = 4096
"""Checked records a rendezvous remembers (by rank and exact bytes) before it forgets them all."""


class StoreRendezvous:
    """Register and look up bus endpoints on a store with ``set/get/add/check`` (``TCPStore``).

    Args:
        store: the store client.
        prefix: key prefix.
        keys: the cluster's keys. Registering needs the rank's secret key (to sign); reading
            checks every record against ``keys.sign_public``. Without ``keys`` (tests, tools)
            records are written unsigned and read unchecked: such a reader believes anyone.
    """

    def __init__(self, store: Any, prefix: str = DEFAULT_PREFIX, *, keys: ClusterKeys | None = None) -> None:
        self.store = store
        self.prefix = prefix
        self.keys = keys
        self._count_key = prefix + "count"
        self.refused: collections.Counter[str] = collections.Counter()
        """Records refused so far, by reason (see :data:`REFUSAL_REASONS`)."""
        self._last_log = -1e9
        self._accepted: dict[tuple[int, bytes], Registration] = {}  # records that passed parse()

    def record(self, rank: int, endpoint: str, incarnation: int) -> bytes:
        """The value this rank stores under its key (signed when this holder has its secret key)."""
        data: dict[str, Any] = {"endpoint": endpoint, "incarnation": incarnation}
        if self.keys is not None:
            message = registration_message(self.prefix, rank, endpoint, incarnation)
            data["sig"] = base64.b64encode(self.keys.sign(rank, message)).decode()
        return json.dumps(data).encode()

    def register(self, rank: int, endpoint: str, incarnation: int) -> int:
        """Publish this rank's endpoint; returns the registration number."""
        self.store.set(f"{self.prefix}rank/{rank}", self.record(rank, endpoint, incarnation))
        n = int(self.store.add(self._count_key, 1))
        self.store.set(self.log_key(n), str(rank))
        return n

    def log_key(self, n: int) -> str:
        """The key registration ``n`` (1-based) writes last: a watcher that has seen ``n - 1``
        registrations can wait for it (``TCPStore.wait``) instead of polling :meth:`count`."""
        return f"{self.prefix}log/{n}"

    def count(self) -> int:
        """Registrations made so far (a change counter)."""
        return int(self.store.add(self._count_key, 0))

    def parse(self, rank: int, value: bytes | str) -> Registration:
        """The registration in ``value`` (as stored under rank ``rank``'s key), checked.

        Raises :class:`RecordRefused` for anything that is not a record signed by ``rank``."""
        raw = value.encode() if isinstance(value, str) else bytes(value)
        if len(raw) > MAX_RECORD_BYTES:
            raise RecordRefused("oversize", f"{len(raw)} bytes")
        # The same bytes checked before check the same way (a rank reads its own record back
        # every second): no second JSON parse and signature verification for them.
        known = self._accepted.get((rank, raw))
        if known is not None:
            return known
        reg = self._parse(rank, raw)
        if len(self._accepted) >= _ACCEPTED_KEPT:
            self._accepted.clear()
        self._accepted[(rank, raw)] = reg
        return reg

    def _parse(self, rank: int, raw: bytes) -> Registration:
        try:
            data = json.loads(raw)
            endpoint, incarnation = data["endpoint"], data["incarnation"]
        except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError, UnicodeDecodeError, not a dict
            raise RecordRefused("malformed", f"not a registration: {exc}") from None
        if not isinstance(endpoint, str) or not endpoint or len(endpoint) > 512:
            raise RecordRefused("malformed", "endpoint is not a short string")
        if type(incarnation) is not int or not 0 <= incarnation <= MAX_INCARNATION:
            raise RecordRefused("malformed", "incarnation is not a 64-bit unsigned integer")
        if self.keys is not None:
            if rank not in self.keys.sign_public:
                raise RecordRefused("unknown_rank", f"rank {rank} has no signing key in the cluster keys")
            sig = data.get("sig")
            if sig is None:
                raise RecordRefused("unsigned", "no signature")
            try:
                signature = base64.b64decode(sig, validate=True) if isinstance(sig, str) else b""
            except (binascii.Error, ValueError):
                signature = b""
            message = registration_message(self.prefix, rank, endpoint, incarnation)
            if not self.keys.verify(rank, message, signature):
                raise RecordRefused("bad_signature", f"not signed by rank {rank}")
        return Registration(rank, endpoint, incarnation)

    def _refuse(self, rank: int, exc: RecordRefused) -> None:
        self.refused[exc.reason] += 1
        metrics.RENDEZVOUS_REFUSED.labels(exc.reason).inc()
        now = time.monotonic()
        if now - self._last_log > 1.0:  # a writer that keeps at it must not flood the log
            self._last_log = now
            where = f"rank {rank}'s record" if rank >= 0 else "a log entry"
            log.warning("rendezvous: refused %s (%s: %s)", where, exc.reason, exc)

    def lookup(self, rank: int) -> Registration | None:
        """Rank ``rank``'s registration; ``None`` when there is none or it was refused (counted)."""
        key = f"{self.prefix}rank/{rank}"
        if not self.store.check([key]):
            return None
        try:
            return self.parse(rank, self.store.get(key))
        except RecordRefused as exc:
            self._refuse(rank, exc)
            return None

    def changed_since(self, seen: int) -> tuple[int, dict[int, Registration | None]]:
        """Registrations after the first ``seen``: ``(new seen, {rank: latest registration})``.

        A rank whose current record is missing or refused maps to ``None`` (so a rank can see
        that its own record was overwritten). A log entry that does not name a rank is skipped
        and counted as ``malformed``."""
        n, ranks = self.ranks_since(seen)
        return n, {rank: self.lookup(rank) for rank in sorted(ranks)}

    def ranks_since(self, seen: int) -> tuple[int, set[int]]:
        """The ranks that registered after the first ``seen`` registrations, without reading
        their records: ``(new seen, ranks)`` (look up only the ones wanted with :meth:`lookup`)."""
        total = min(self.count(), seen + MAX_LOG_READ)
        ranks: set[int] = set()
        n = seen
        values: list = []
        keys = [self.log_key(i) for i in range(seen + 1, total + 1)]
        multi_get = getattr(self.store, "multi_get", None)
        if len(keys) > 1 and multi_get is not None and self.store.check(keys):
            values = multi_get(keys)  # two round trips for a burst of registrations, not two each
        while n < total:
            if values:
                value = values[n - seen]
            else:
                key = self.log_key(n + 1)
                if not self.store.check([key]):  # counted, its log entry not written yet
                    break
                value = self.store.get(key)
            n += 1
            try:
                rank = int(value)
                if not 0 <= rank < 1 << 31:
                    raise ValueError(rank)
            except ValueError:
                self._refuse(-1, RecordRefused("malformed", f"log entry {n} does not name a rank"))
                continue
            ranks.add(rank)
        return n, ranks
