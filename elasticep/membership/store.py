"""The view store: a chain of committed views, one key per epoch, each written once by CAS.

``compare_and_set(view)`` writes ``view`` at its epoch's key only if the key is empty and returns
whatever the key holds afterwards: the caller's view if it won, the rival's if it lost. Two
proposals for one epoch therefore cannot both win, and the loser learns the winner in the same
round trip. ``read(epoch)`` returns the committed view or None.

Two implementations behind one interface:

* :class:`TCPStoreViewStore` over ``torch.distributed.TCPStore.compare_set``; the store server
  is hosted outside the ranks (by the launcher), so it outlives any of them.
* :class:`InMemoryViewStore`, the in-process twin for tests and examples, with seeded fault
  controls: unavailable (for everyone or for chosen ranks), slow, and a seeded random failure
  rate.

Both bound every operation by ``timeout_s`` and raise :class:`StoreUnavailable` past it; the
membership service turns a store lost for longer than ``Config.store_timeout_s`` into a fence.

Both also *push* commits (:attr:`ViewStore.pushes`): :meth:`ViewStore.wait_committed` returns
when the next view is committed, without polling. The TCPStore's server answers a ``WAIT`` for a
key the moment the key is set, so a rank learns of a commit anywhere in the cluster one round
trip after it, at no cost while nothing changes (:class:`~elasticep.bus.store_wait.KeyWaiter`);
the membership service then polls the store only slowly, to prove it is reachable
(``Config.store_idle_poll_ms``), whatever the detection topology.

A third, :class:`~elasticep.membership.etcd_store.EtcdViewStore`, keeps the chain on an etcd
cluster that outlives any one host; :func:`open_view_store` picks one from ``Config.view_store``.
"""

from __future__ import annotations

import abc
import asyncio
import datetime
import functools
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from elasticep.bus.store_wait import KeyWaiter, StoreWaitFailed, WaitHub, _server_of
from elasticep.errors import ElasticEPError
from elasticep.membership.view import View, decode_view, encode_view


WAIT_BOUND_S = 60.0
"""Longest one ``wait_committed`` of the in-process and etcd view stores lasts before it returns
False (then wait again), s."""


class StoreUnavailable(ElasticEPError, RuntimeError):
    """The view store did not answer within its bound (or is down)."""


class ViewStore(abc.ABC):
    """Where committed views live. Async; every call is bounded and may raise :class:`StoreUnavailable`.

    Called by :class:`elasticep.membership.MembershipService`: one ``compare_and_set`` and one
    ``read`` at most in flight per rank.
    """

    @abc.abstractmethod
    async def compare_and_set(self, view: View, *, rank: int = -1) -> View:
        """Commit ``view`` at ``view.epoch`` unless a view is already there; return the committed one."""

    @abc.abstractmethod
    async def read(self, epoch: int, *, rank: int = -1) -> View | None:
        """The view committed at ``epoch``, or None if there is none yet."""

    pushes: bool = False
    """True when :meth:`wait_committed` is told of a commit by the store itself (a watch, a
    server-side wait) rather than finding it by reading."""

    async def wait_committed(self, epoch: int) -> bool:
        """Wait until a view is committed at ``epoch``; True once one is. False when the store's own
        bound on one wait expired first (call again). Raises :class:`StoreUnavailable` when the
        store cannot be reached. A store that cannot push (``pushes`` False) answers with one
        read, without waiting."""
        return await self.read(epoch) is not None

    def end_waits(self) -> None:
        """Release what :meth:`wait_committed` and :meth:`read` keep open between calls (a later
        call opens it again); the membership service calls it when it stops (default: nothing)."""

    async def close(self) -> None:
        """Release connections (default: nothing)."""


class InMemoryViewStore(ViewStore):
    """An in-process view store with fault controls; share one object between every rank's service.

    Args:
        seed: seeds the random failures drawn by :meth:`set_failure_rate`.
        timeout_s: bound on one operation: a store slower than this raises :class:`StoreUnavailable`.

    The sync methods :meth:`compare_and_set_nowait` and :meth:`read_nowait` hold the logic (the
    scenario driver calls them directly); the async ones add the configured delay and faults.
    """

    def __init__(self, *, seed: int = 0, timeout_s: float = 2.0) -> None:
        self._views: dict[int, bytes] = {}
        self._random = random.Random(seed)
        self.timeout_s = timeout_s
        self.delay_s = 0.0
        self.failure_rate = 0.0
        self.down = False
        self.down_for: set[int] = set()
        self.operations = 0
        self.conflicts = 0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[bool], int]] = []

    pushes = True

    # --- fault controls ---------------------------------------------------------------------

    def set_down(self, down: bool = True, *, ranks: set[int] | None = None) -> None:
        """Make the store unreachable for everyone, or (``ranks``) for those ranks only."""
        if ranks is None:
            self.down = down
            if down:
                self._wake(lambda epoch: True, StoreUnavailable("view store unreachable"))
        elif down:
            self.down_for |= set(ranks)
        else:
            self.down_for -= set(ranks)

    def set_delay(self, delay_s: float) -> None:
        """Answer every operation after ``delay_s`` seconds (past ``timeout_s`` it times out)."""
        if delay_s < 0:
            raise ValueError("delay_s must be >= 0")
        self.delay_s = delay_s

    def set_failure_rate(self, p: float) -> None:
        """Fail each operation with probability ``p`` (seeded)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError("failure rate must be in [0, 1]")
        self.failure_rate = p

    # --- logic ------------------------------------------------------------------------------

    def _check(self, rank: int) -> None:
        if self.down or rank in self.down_for:
            raise StoreUnavailable(f"view store unreachable from rank {rank}")
        if self.failure_rate and self._random.random() < self.failure_rate:
            raise StoreUnavailable("view store operation failed (injected)")

    def compare_and_set_nowait(self, view: View, *, rank: int = -1) -> View:
        self._check(rank)
        self.operations += 1
        data = self._views.setdefault(view.epoch, encode_view(view))
        self._wake(lambda epoch: epoch in self._views, True)
        committed = decode_view(data)
        if committed != view:
            self.conflicts += 1
        return committed

    def read_nowait(self, epoch: int, *, rank: int = -1) -> View | None:
        self._check(rank)
        self.operations += 1
        data = self._views.get(epoch)
        return None if data is None else decode_view(data)

    def head(self) -> int:
        """Highest committed epoch (0 when empty); for tests and tools."""
        return max(self._views, default=0)

    async def _delay(self) -> None:
        if self.delay_s > self.timeout_s:
            await asyncio.sleep(self.timeout_s)
            raise StoreUnavailable(f"view store did not answer within {self.timeout_s:g} s")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)

    async def compare_and_set(self, view: View, *, rank: int = -1) -> View:
        await self._delay()
        return self.compare_and_set_nowait(view, rank=rank)

    async def read(self, epoch: int, *, rank: int = -1) -> View | None:
        await self._delay()
        return self.read_nowait(epoch, rank=rank)

    def _wake(self, which: Callable[[int], bool], outcome: bool | Exception) -> None:
        """End the waits ``which(epoch)`` selects (on whichever loop each waits)."""
        keep = []
        for loop, future, epoch in self._waiters:
            if future.done():
                continue
            if not which(epoch):
                keep.append((loop, future, epoch))
                continue

            def settle(future: asyncio.Future[bool] = future) -> None:
                if not future.done():
                    if isinstance(outcome, Exception):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)

            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:  # that loop is closed
                pass
        self._waiters = keep

    async def wait_committed(self, epoch: int) -> bool:
        if self.down:
            raise StoreUnavailable("view store unreachable")
        if epoch in self._views:
            return True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._waiters.append((loop, future, epoch))
        try:
            return await asyncio.wait_for(future, WAIT_BOUND_S)
        except asyncio.TimeoutError:
            return False


class SharedViews:
    """Committed views read once for many :class:`TCPStoreViewStore` objects of one process and
    event loop (the scale harness's ranks): a committed epoch never changes, so a view read by
    one is the view for all, and a read in flight is joined rather than repeated. Pass the same
    object as ``shared`` to each store. Keeps the newest ``keep`` epochs.

    A read that found an epoch not committed yet answers the others' reads of it for
    ``absent_s`` (every rank of the process polls the next epoch, and each reads it again as
    soon as it installs a view): such an answer is at most ``absent_s`` old, as if the read had
    been that much slower, which the membership core already tolerates (it reads again at
    ``store_poll_ms``). Any sign that the epoch was committed (a view read or written through
    any of the stores, or a commit the store pushed to any of their waits: :meth:`committed`)
    ends that at once, and a read that raced such a sign is never kept as absent. A failed
    read is never shared: each rank still learns for itself that the store is gone."""

    def __init__(self, keep: int = 64, absent_s: float = 0.05) -> None:
        if absent_s < 0:
            raise ValueError(f"absent_s must be >= 0, not {absent_s}")
        self.keep = keep
        self.absent_s = absent_s
        self.views: dict[int, View] = {}
        self.inflight: dict[int, asyncio.Future] = {}
        self.reads = 0
        """Reads that went to the store."""
        self.absent_answers = 0
        """Reads answered "not committed yet" from another read's answer."""
        self._absent: dict[int, float] = {}  # epoch -> when a read that found it absent began
        self._committed: set[int] = set()  # epochs known committed (a push), their view maybe unread

    def put(self, view: View) -> None:
        self.views[view.epoch] = view
        self.committed(view.epoch)
        if len(self.views) > self.keep:
            for epoch in sorted(self.views)[: len(self.views) - self.keep]:
                del self.views[epoch]

    def is_committed(self, epoch: int) -> bool:
        """Whether ``epoch`` is known committed (read, written, or pushed by a wait)."""
        return epoch in self._committed or epoch in self.views

    def committed(self, epoch: int) -> None:
        """``epoch`` is committed (its key exists): no read answers it absent any more."""
        self._absent.pop(epoch, None)
        self._committed.add(epoch)
        if len(self._committed) > 2 * self.keep:
            newest = sorted(self._committed)[-self.keep:]
            self._committed = set(newest)

    async def read(self, epoch: int, fetch) -> View | None:
        view = self.views.get(epoch)
        if view is not None:
            return view
        loop = asyncio.get_running_loop()
        since = self._absent.get(epoch)
        if since is not None and loop.time() - since < self.absent_s:
            self.absent_answers += 1
            return None
        future = self.inflight.get(epoch)
        if future is None:
            self.reads += 1
            future = self.inflight[epoch] = asyncio.ensure_future(fetch())
            began = loop.time()

            def done(f: asyncio.Future, epoch: int = epoch) -> None:
                if self.inflight.get(epoch) is f:
                    del self.inflight[epoch]
                if f.cancelled() or f.exception() is not None:
                    return
                if f.result() is not None:
                    self.put(f.result())
                elif epoch not in self._committed:
                    self._absent[epoch] = began
                    if len(self._absent) > self.keep:
                        del self._absent[min(self._absent)]

            future.add_done_callback(done)
        return await asyncio.shield(future)


class TCPStoreViewStore(ViewStore):
    """Views in a ``torch.distributed.TCPStore``, committed with ``compare_set``.

    Args:
        host: the store server's address (hosted by the launcher, not by a rank).
        port: the store server's port.
        timeout_s: bound on one operation (``Config.store_timeout_s``).
        prefix: key prefix, so several clusters can share one store.
        store: an existing client or server object to use instead of connecting.
        connect_timeout_s: bound on the first connection (at least ``timeout_s``): a whole
            cluster connecting at start-up can take longer than one operation may, and a slow
            connect is not a lost store. Connect ahead of the first operation with :meth:`connect`.
        waits: a :class:`~elasticep.bus.store_wait.WaitHub` shared with other ranks of this
            process for :meth:`wait_committed` (default: a connection of its own).
        shared: a :class:`SharedViews` shared with other ranks of this process: each committed
            view is read once for all of them.

    Keys are ``{prefix}/view/{epoch}`` holding JSON views. A read asks whether the key exists
    (``check``, one round trip) and only then gets it (``get`` alone would block until the key
    appears). It must not touch a missing key otherwise: the store server answers every
    ``WAIT`` on a key that a ``compare_set`` names, whether or not it wrote, so a read by
    ``compare_set`` woke every rank's wait for the next epoch, each woken rank read that epoch
    in turn, and the reads kept one another going (every rank read the next epoch every
    ``store_poll_ms`` instead of every ``store_idle_poll_ms``). :meth:`read` speaks ``CHECK``
    and ``GET`` itself on an asyncio connection (:meth:`KeyWaiter.read
    <elasticep.bus.store_wait.KeyWaiter.read>`, or the ``waits`` hub's), with no thread;
    :meth:`read_nowait` does the same through the torch client. A view known committed (a
    wait found it) is fetched with ``GET`` alone. :meth:`compare_and_set` speaks
    ``COMPARE_SET`` on the same connection (one round trip, no thread);
    :meth:`compare_and_set_nowait` goes through the torch client. :meth:`wait_committed` is the
    server's ``WAIT`` on the epoch's key, on an asyncio connection of its own
    (:class:`~elasticep.bus.store_wait.KeyWaiter`).
    """

    pushes = True

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        timeout_s: float = 2.0,
        prefix: str = "elasticep",
        store: object | None = None,
        connect_timeout_s: float = 10.0,
        waits: WaitHub | None = None,
        shared: SharedViews | None = None,
    ) -> None:
        self.host, self.port, self.timeout_s, self.prefix = host, port, timeout_s, prefix
        self._shared = shared
        self.connect_timeout_s = max(connect_timeout_s, timeout_s)
        self._store = store
        self._lock = threading.Lock()
        self._waiter: KeyWaiter | WaitHub | None = waits
        self._owns_waiter = waits is None
        self._keys: KeyWaiter | None = None  # reads' own connection (a wait may hold the waiter's)
        self._pushed = 0  # the newest epoch a wait of this store found committed
        self._thread: ThreadPoolExecutor | None = None

    def connect(self) -> None:
        """Open the client now (blocking, bounded by ``connect_timeout_s``); idempotent."""
        with self._lock:
            self._client()

    def _client(self):
        if self._store is None:
            from torch.distributed import TCPStore

            try:
                store = TCPStore(self.host, self.port, is_master=False, use_libuv=True, wait_for_workers=False,
                                 timeout=datetime.timedelta(seconds=self.connect_timeout_s))
                store.set_timeout(datetime.timedelta(seconds=self.timeout_s))
            except (RuntimeError, TimeoutError) as exc:
                raise StoreUnavailable(f"cannot reach the view store at {self.host}:{self.port}: {exc}") from None
            self._store = store
        return self._store

    def _key(self, epoch: int) -> str:
        return f"{self.prefix}/view/{epoch}"

    def compare_and_set_nowait(self, view: View, *, rank: int = -1) -> View:
        """Blocking CAS (bounded by ``timeout_s``); see :meth:`ViewStore.compare_and_set`."""
        with self._lock:
            try:
                data = self._client().compare_set(self._key(view.epoch), "", encode_view(view))
            except (RuntimeError, TimeoutError) as exc:
                raise StoreUnavailable(f"view store compare_set failed: {exc}") from None
        return decode_view(data)

    def read_nowait(self, epoch: int, *, rank: int = -1) -> View | None:
        """Blocking read (bounded by ``timeout_s``); see :meth:`ViewStore.read`."""
        key = self._key(epoch)
        with self._lock:
            try:
                client = self._client()
                if not client.check([key]):  # (never a compare_set on a missing key: see the class)
                    return None
                data = client.get(key)  # committed views are never removed: this returns at once
            except (RuntimeError, TimeoutError) as exc:
                raise StoreUnavailable(f"view store read failed: {exc}") from None
        return decode_view(data)

    def _in_thread(self, fn, *args, **kwargs):
        # A thread of its own, not the process's default pool: a rank's view reads must not queue
        # behind other blocking work (a burst of bus registrations at start-up took the pool for
        # seconds at 64 ranks per process, past store_timeout_s).
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="elasticep-view-store")
        return asyncio.get_running_loop().run_in_executor(self._thread, functools.partial(fn, *args, **kwargs))

    async def _run(self, fn, *args, **kwargs):
        if self._store is None:
            try:
                await asyncio.wait_for(self._in_thread(self.connect), self.connect_timeout_s)
            except asyncio.TimeoutError:
                raise StoreUnavailable(f"cannot reach the view store at {self.host}:{self.port} "
                                       f"within {self.connect_timeout_s:g} s") from None
        try:
            return await asyncio.wait_for(self._in_thread(fn, *args, **kwargs), self.timeout_s)
        except asyncio.TimeoutError:
            raise StoreUnavailable(f"view store did not answer within {self.timeout_s:g} s") from None

    async def compare_and_set(self, view: View, *, rank: int = -1) -> View:
        # On the event loop as a read is (one round trip), not a thread: a commit is what every
        # rank waits for, and handing it to a thread and back took tens of ms on a busy process.
        reader = self._reader()
        if reader is None:  # a store object of another kind: its own blocking client
            committed = await self._run(self.compare_and_set_nowait, view, rank=rank)
        else:
            data = await self._bounded(reader.compare_set(self._key(view.epoch), b"", encode_view(view)),
                                       "compare-and-set", "compare_set")
            committed = decode_view(data)
        if self._shared is not None:
            self._shared.put(committed)
        return committed

    async def read(self, epoch: int, *, rank: int = -1) -> View | None:
        if self._shared is not None:
            return await self._shared.read(epoch, lambda: self._read(epoch, rank))
        return await self._read(epoch, rank)

    async def _read(self, epoch: int, rank: int) -> View | None:
        # On the event loop (the waits' hub, or an asyncio connection of this store's own), not
        # a thread: every rank polls the next epoch, and after a commit every rank reads it at
        # once; a thread per read costs a hand-over of the interpreter each way, tens of ms on a
        # busy process, where the read itself is one round trip.
        reader = self._reader()
        if reader is None:  # a store object of another kind: its own blocking client
            return await self._run(self.read_nowait, epoch, rank=rank)
        # a key a wait found set is fetched at once, without asking whether it is there
        known = epoch <= self._pushed or (self._shared is not None and self._shared.is_committed(epoch))
        data = await self._bounded(reader.read(self._key(epoch), known_set=known), "read", "read")
        return None if data is None else decode_view(data)

    async def _bounded(self, request, what: str, op: str):
        """``request`` (a coroutine on the store's own protocol connection) within ``timeout_s``;
        no answer in time, or a failed connection, is :class:`StoreUnavailable`."""
        try:
            return await asyncio.wait_for(request, self.timeout_s)
        except asyncio.TimeoutError:
            raise StoreUnavailable(f"view store did not answer a {what} within {self.timeout_s:g} s") from None
        except StoreWaitFailed as exc:
            raise StoreUnavailable(f"view store {op} failed: {exc}") from None

    def _reader(self) -> KeyWaiter | WaitHub | None:
        if isinstance(self._waiter, WaitHub):
            return self._waiter
        if self._keys is None:
            server = _server_of(self._store) if self._store is not None else (self.host, self.port)
            if server is None:
                return None
            self._keys = KeyWaiter(*server, connect_timeout_s=self.connect_timeout_s)
        return self._keys

    async def wait_committed(self, epoch: int) -> bool:
        if self._waiter is None:
            self._waiter = (KeyWaiter.for_store(self._store, connect_timeout_s=self.connect_timeout_s)
                            if self._store is not None
                            else KeyWaiter(self.host, self.port, connect_timeout_s=self.connect_timeout_s))
            if self._waiter is None:  # a store object of another kind: one read, as the base does
                return await super().wait_committed(epoch)
        try:
            found = await self._waiter.wait(self._key(epoch))
        except StoreWaitFailed as exc:
            raise StoreUnavailable(str(exc)) from None
        if found:
            self._pushed = max(self._pushed, epoch)
            if self._shared is not None:
                self._shared.committed(epoch)
        return found

    def end_waits(self) -> None:
        if self._waiter is not None and self._owns_waiter:
            self._waiter.reset()
        if self._keys is not None:  # the reads' idle connection goes with it (a later read reopens it)
            self._keys.reset()

    async def close(self) -> None:
        if self._waiter is not None and self._owns_waiter:
            self._waiter.close()
        if self._keys is not None:
            self._keys.close()
        if self._thread is not None:
            self._thread.shutdown(wait=False)
            self._thread = None


def open_view_store(config, *, tcpstore: str | None = None, prefix: str = "elasticep") -> ViewStore:
    """The view store ``config.view_store`` names, bounded by ``config.store_timeout_s``.

    Args:
        config: a :class:`~elasticep.config.Config`; ``view_store="etcd"`` uses
            ``etcd_endpoints``, ``"tcpstore"`` the launcher's store at ``tcpstore``.
        tcpstore: ``HOST:PORT`` of the launcher-hosted ``TCPStore`` (needed for ``"tcpstore"``).
        prefix: key prefix (several clusters can share one store).
    """
    if config.view_store == "etcd":
        from elasticep.membership.etcd_store import EtcdViewStore

        return EtcdViewStore(config.etcd_endpoints, timeout_s=config.store_timeout_s, prefix=prefix)
    if config.view_store == "tcpstore":
        if not tcpstore:
            raise ValueError("view_store='tcpstore' needs the launcher's store address (HOST:PORT)")
        host, _, port = tcpstore.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"store address must be HOST:PORT, not {tcpstore!r}")
        return TCPStoreViewStore(host, int(port), timeout_s=config.store_timeout_s, prefix=prefix)
    raise ValueError(f"unknown view store {config.view_store!r}")
