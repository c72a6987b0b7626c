"""``EtcdViewStore``: the view chain on an etcd cluster, a store that outlives any one host.

The embedded ``TCPStore`` lives in one process on one host: when that host dies, every rank
loses the store, fences itself after ``Config.store_timeout_s`` and the cluster stops though
every rank is healthy. etcd replicates each write over a raft group (3 members tolerate one
failure, 5 two), so the view chain survives the death of any minority of its members, the
leader included.

Same interface and invariants as :class:`~elasticep.membership.TCPStoreViewStore`:

* **Compare-and-set** is one etcd transaction on the epoch's key
  ``{prefix}/view/{epoch:012d}``: *if the key was never created, put the view; else get it.*
  Raft orders the transactions, so of two rival proposals for one epoch exactly one creates the
  key and the other reads the winner back in the same round trip. A retried transaction (its
  answer was lost when an endpoint died) is harmless: the retry finds the key and returns what it
  holds, the caller's own view if the first attempt had won.
* **Read** is a linearizable range read (served through the raft leader), so a member cut off
  from the majority cannot answer with a stale "nothing committed": its request times out and
  the client moves on. A read never writes.
* Views are never rewritten or deleted, so every view this object has seen, in a CAS result, a
  read or the watch, is cached and answered again without a round trip.

Endpoints and failover: the client holds one gRPC channel per endpoint and talks to one at a
time. When an attempt fails (refused connection, ``etcdserver: no leader``, a deadline) or has
not answered within ``hedge_after_s`` (50 ms: a silent member; a healthy commit takes one to
a few ms), a copy of the operation goes to every endpoint at once, and again every
``retry_interval_s`` (50 ms)
while none has answered; the first answer wins, the rest are cancelled, and the endpoint that
answered is the one talked to next. Copies are harmless (each operation is a create-if-absent
transaction or a read) and needed: a request that reached a follower during an election may
never be answered, while one sent just after the new leader exists is. This continues until
``timeout_s`` is spent, then the operation raises :class:`~elasticep.membership.StoreUnavailable`
(and the membership service fences past ``Config.store_timeout_s``, as with any store). Each
attempt is bounded by ``attempt_timeout_s`` (default ``timeout_s / (endpoints + 1)``, at least
0.2 s).

Watch: :meth:`EtcdViewStore.watch` is an async iterator over committed views, in epoch order,
fed by an etcd watch on the view prefix (re-established on another endpoint if its stream
breaks, resuming from the last revision seen). The store's own cache is fed by it too once
:meth:`start_watch` is called, so a rank's next poll after a commit elsewhere finds the view
locally. The membership core still polls (``Config.store_poll_ms``, or ``store_idle_poll_ms`` while
nothing is in flight): the poll is also how a rank proves the store is reachable.

Needs the ``etcd`` extra (``pip install elasticep[etcd]``: the asyncio client ``aetcd`` over
``grpcio``). Every call runs on the caller's event loop; one object serves one event loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Sequence

from elasticep import metrics
from elasticep.membership.store import WAIT_BOUND_S, StoreUnavailable, ViewStore
from elasticep.membership.view import CorruptView, View, decode_view, encode_view

log = logging.getLogger(__name__)

__all__ = ["EtcdViewStore", "parse_endpoints"]

_CHANNEL_OPTIONS = {
    # Reconnect within a fraction of a second once a member comes back, not after gRPC's
    # default backoff (1 s doubling to 120 s).
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    # A member on a dead host shows as a silent TCP connection: probe it.
    "grpc.keepalive_time_ms": 2000,
    "grpc.keepalive_timeout_ms": 1000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.enable_retries": 0,
}


def parse_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    """``"h1:2379,h2:2379"`` or a list of ``HOST:PORT`` / ``http://HOST:PORT`` -> ``["h1:2379", ...]``.

    Raises ``ValueError`` for an empty list or an entry without a numeric port.
    """
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out: list[str] = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        for scheme in ("http://", "https://"):
            if item.startswith(scheme):
                item = item[len(scheme):]
        item = item.rstrip("/")
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"etcd endpoint must be HOST:PORT, not {item!r}")
        out.append(item)
    if not out:
        raise ValueError("at least one etcd endpoint is needed")
    return out


class EtcdViewStore(ViewStore):
    """Views in an etcd cluster, committed by transaction (see the module docstring).

    Args:
        endpoints: the members' client endpoints, ``"HOST:PORT,HOST:PORT"`` or a list
            (``Config.etcd_endpoints``).
        timeout_s: bound on one operation, all attempts together (``Config.store_timeout_s``).
        prefix: key prefix, so several clusters can share one etcd.
        attempt_timeout_s: bound on one attempt at one endpoint (default: see the module docstring).
        retry_interval_s: after a failed attempt, how often a copy of the operation is sent to
            every endpoint while none has answered, s.
        hedge_after_s: how long the first attempt may go unanswered before copies are sent, s
            (well above a healthy commit, one to a few ms; with 0.25 s a host kill that took
            etcd's leader cost about 100 ms more to the next view).

    Statistics for tests and benchmarks: :attr:`operations` (round trips that answered),
    :attr:`failovers` (moves to another endpoint), :attr:`cache_hits`, :attr:`conflicts`.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        timeout_s: float = 2.0,
        prefix: str = "elasticep",
        attempt_timeout_s: float | None = None,
        retry_interval_s: float = 0.05,
        hedge_after_s: float = 0.05,
    ) -> None:
        try:
            import aetcd  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("EtcdViewStore needs the etcd extra: pip install 'elasticep[etcd]'") from exc
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.endpoints = parse_endpoints(endpoints)
        self.timeout_s = timeout_s
        self.prefix = prefix.rstrip("/")
        self.attempt_timeout_s = (attempt_timeout_s if attempt_timeout_s is not None
                                  else max(0.2, timeout_s / (len(self.endpoints) + 1)))
        if retry_interval_s <= 0 or hedge_after_s <= 0:
            raise ValueError("retry_interval_s and hedge_after_s must be > 0")
        self.retry_interval_s = retry_interval_s
        self.hedge_after_s = hedge_after_s
        self._clients: dict[int, object] = {}
        self._current = 0
        self._cache: dict[int, View] = {}
        self._arrived = asyncio.Event()  # set (and replaced) whenever a new epoch is cached
        self._watch_task: asyncio.Task | None = None
        self._watch_revision = 0
        self._watchers: list[asyncio.Queue] = []
        self._closed = False
        self.operations = 0
        self.failovers = 0
        self.cache_hits = 0
        self.conflicts = 0

    # --- keys -------------------------------------------------------------------------------

    @property
    def view_prefix(self) -> bytes:
        return f"{self.prefix}/view/".encode()

    def key(self, epoch: int) -> bytes:
        """The etcd key of ``epoch``'s view (zero-padded, so keys sort by epoch)."""
        return f"{self.prefix}/view/{epoch:012d}".encode()

    def _epoch_of(self, key: bytes) -> int | None:
        tail = key[len(self.view_prefix):]
        return int(tail) if tail.isdigit() else None

    @property
    def endpoint(self) -> str:
        """The endpoint the next operation tries first."""
        return self.endpoints[self._current]

    # --- connections ------------------------------------------------------------------------

    def _client(self, index: int):
        client = self._clients.get(index)
        if client is None:
            import aetcd

            host, _, port = self.endpoints[index].rpartition(":")
            client = aetcd.Client(host=host, port=int(port), timeout=self.attempt_timeout_s,
                                  options=dict(_CHANNEL_OPTIONS), connect_wait_timeout=self.attempt_timeout_s)
            self._clients[index] = client
        return client

    async def _call(self, what: str, fn):
        """Run ``fn(client)`` on the current endpoint; if that fails or is silent for
        ``hedge_after_s``, on every endpoint at once, again every ``retry_interval_s``, until one
        answers or ``timeout_s`` is spent.

        Every operation here is safe to run twice (a transaction that creates a key only if
        absent, or a read), so racing copies of it cannot change what is committed: the first
        answer wins and the rest are cancelled. Copies are needed, not only moves: during an
        election a request that reached a follower may never be answered, so a request sent
        after the new leader exists is the one that completes.
        """
        import aetcd.exceptions

        if self._closed:
            raise StoreUnavailable("the etcd view store is closed")
        expected = (aetcd.exceptions.ClientError, asyncio.TimeoutError, OSError)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        errors: list[str] = []
        index = self._current
        # The common case: one attempt where the last answer came from. Copies follow if it has
        # not answered within hedge_after_s (a silent member: a dead host, a cut link) or failed.
        first = asyncio.wait_for(fn(self._client(index)), min(self.timeout_s, self.attempt_timeout_s))
        pending: dict[asyncio.Task, int] = {loop.create_task(first): index}
        round_end: float | None = loop.time() + min(self.hedge_after_s, self.attempt_timeout_s)
        copies_sent = False
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise StoreUnavailable(f"etcd {what} failed on every endpoint within {self.timeout_s:g} s: "
                                           + "; ".join(errors[-len(self.endpoints):]))
                if round_end is None:
                    order = list(range(len(self.endpoints)))
                    order = order[index + 1:] + order[:index + 1]  # the first one tried goes last
                    for i in order:
                        attempt = asyncio.wait_for(fn(self._client(i)), min(left, self.attempt_timeout_s))
                        pending[loop.create_task(attempt)] = i
                    round_end = loop.time() + min(self.retry_interval_s, left)
                    copies_sent = True
                while pending and loop.time() < round_end:
                    done, _ = await asyncio.wait(pending, timeout=max(0.0, round_end - loop.time()),
                                                 return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        i = pending.pop(task)
                        exc = task.exception()
                        if exc is None:
                            if i != self._current:
                                self._current = i
                                self.failovers += 1
                                metrics.VIEW_STORE_FAILOVERS.inc()
                            self.operations += 1
                            return task.result()
                        if not isinstance(exc, expected):
                            raise exc
                        errors.append(f"{self.endpoints[i]}: {type(exc).__name__} {exc}".strip())
                if not pending and copies_sent:
                    # every copy failed at once (refused): an election is probably under way
                    await asyncio.sleep(max(0.0, min(round_end, deadline) - loop.time()))
                round_end = None
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    # --- the ViewStore interface ------------------------------------------------------------

    async def compare_and_set(self, view: View, *, rank: int = -1) -> View:
        """Commit ``view`` at its epoch unless the key exists; return the committed view."""
        cached = self._cache.get(view.epoch)
        if cached is not None:
            self.cache_hits += 1
            if cached != view:
                self.conflicts += 1
            return cached
        key, data = self.key(view.epoch), encode_view(view)

        async def txn(client):
            tx = client.transactions
            return await client.transaction(
                compare=[tx.create(key) == 0],
                success=[tx.put(key, data)],
                failure=[tx.get(key)],
            )

        succeeded, responses = await self._call("compare-and-set", txn)
        if succeeded:
            committed = view
        else:
            try:
                committed = decode_view(responses[0][0][0])
            except IndexError:
                raise CorruptView(f"etcd transaction for epoch {view.epoch} lost but returned no value") from None
            if committed.epoch != view.epoch:
                raise CorruptView(f"key for epoch {view.epoch} holds epoch {committed.epoch}")
            if committed != view:
                self.conflicts += 1
        self._remember(committed)
        return committed

    async def read(self, epoch: int, *, rank: int = -1) -> View | None:
        """The view committed at ``epoch`` (linearizable), or None."""
        cached = self._cache.get(epoch)
        if cached is not None:
            self.cache_hits += 1
            return cached
        key = self.key(epoch)

        async def get(client):
            return await client.get(key)

        got = await self._call("read", get)
        if got is None:
            return None
        view = decode_view(got.value)
        if view.epoch != epoch:
            raise CorruptView(f"key for epoch {epoch} holds epoch {view.epoch}")
        self._remember(view)
        return view

    async def head(self) -> int:
        """Highest committed epoch (0 when none), read from etcd; for tools and tests."""
        prefix = self.view_prefix

        async def last(client):
            return await client.get_prefix(prefix, sort_order="descend", sort_target="key", keys_only=True)

        got = await self._call("head", last)
        for kv in got:
            epoch = self._epoch_of(kv.key)
            if epoch is not None:
                return epoch
        return 0

    def _remember(self, view: View) -> None:
        if view.epoch not in self._cache:
            self._cache[view.epoch] = view
            arrived, self._arrived = self._arrived, asyncio.Event()
            arrived.set()

    pushes = True

    async def wait_committed(self, epoch: int) -> bool:
        """Told by the watch (:meth:`start_watch`, started here): a commit anywhere reaches the
        cache one etcd round trip after it. False after ``WAIT_BOUND_S`` without it (also while
        the watch is broken: the membership's slow poll then finds whether etcd is reachable)."""
        self.start_watch()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_BOUND_S
        while epoch not in self._cache and not self._closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return False
        return epoch in self._cache

    # --- watch ------------------------------------------------------------------------------

    def start_watch(self) -> None:
        """Start the background watch that feeds the cache and :meth:`watch` (idempotent)."""
        if self._watch_task is None and not self._closed:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch_loop(),
                                                                       name="elasticep-etcd-watch")

    async def watch(self, *, from_epoch: int = 1, maxsize: int = 10_000) -> AsyncIterator[View]:
        """Committed views with ``epoch >= from_epoch``, each once, in epoch order, as they commit.

        Views committed before the call come first (read from etcd); a gap in the chain (a
        view the watch has not delivered yet) is waited for, so the order is always the
        chain's. Ends when the store is closed.
        """
        queue: asyncio.Queue = asyncio.Queue(maxsize=maxsize)
        self._watchers.append(queue)
        self.start_watch()
        try:
            next_epoch = from_epoch
            pending: dict[int, View] = {}
            while True:
                while next_epoch in self._cache or next_epoch in pending:
                    view = self._cache.get(next_epoch) or pending.pop(next_epoch)
                    pending.pop(next_epoch, None)
                    yield view
                    next_epoch += 1
                item = await queue.get()
                if item is None:
                    return
                if item.epoch >= next_epoch:
                    pending[item.epoch] = item
        finally:
            if queue in self._watchers:
                self._watchers.remove(queue)

    def _deliver(self, view: View) -> None:
        self._remember(view)
        for queue in self._watchers:
            try:
                queue.put_nowait(view)
            except asyncio.QueueFull:
                log.error("an etcd view watcher is %d views behind; dropping", queue.maxsize)

    async def _load_existing(self, client) -> None:
        got = await client.get_prefix(self.view_prefix)
        for kv in got:
            epoch = self._epoch_of(kv.key)
            if epoch is None:
                continue
            try:
                self._deliver(decode_view(kv.value))
            except CorruptView as exc:
                log.warning("etcd key %r: %s", kv.key, exc)
        self._watch_revision = max(self._watch_revision, got.header.revision if hasattr(got, "header") else 0)

    async def _watch_loop(self) -> None:
        import aetcd.exceptions

        loaded = False
        while not self._closed:
            index = self._current
            client = self._client(index)
            try:
                if not loaded:
                    await asyncio.wait_for(self._load_existing(client), self.attempt_timeout_s)
                    loaded = True
                start = self._watch_revision + 1 if self._watch_revision else None
                watch = await asyncio.wait_for(client.watch_prefix(self.view_prefix, start_revision=start),
                                               self.attempt_timeout_s)
                async for event in watch:
                    self._watch_revision = max(self._watch_revision, event.kv.mod_revision)
                    if event.kind != "PUT" or self._epoch_of(event.kv.key) is None:
                        continue
                    try:
                        self._deliver(decode_view(event.kv.value))
                    except CorruptView as exc:
                        log.warning("etcd key %r: %s", event.kv.key, exc)
                if self._closed:
                    return
            except asyncio.CancelledError:
                raise
            except (aetcd.exceptions.ClientError, asyncio.TimeoutError, OSError) as exc:
                log.info("etcd watch on %s broke: %s", self.endpoints[index], exc)
            if len(self.endpoints) > 1 and self._current == index:
                self._current = (index + 1) % len(self.endpoints)
            # The watcher object of a broken stream is not reusable: start on a fresh channel.
            old = self._clients.pop(index, None)
            if old is not None:
                try:
                    await asyncio.wait_for(old.close(), 1.0)
                except (Exception, asyncio.TimeoutError):
                    pass
            await asyncio.sleep(0.05)

    # --- teardown ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the watch, end every :meth:`watch` iterator and close the channels. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            try:
                await self._watch_task
            except (asyncio.CancelledError, Exception):
                pass
        for queue in list(self._watchers):
            try:
                queue.put_nowait(None)
            except asyncio.QueueFull:
                pass
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            try:
                await asyncio.wait_for(client.close(), 1.0)
            except (Exception, asyncio.TimeoutError):
                pass
