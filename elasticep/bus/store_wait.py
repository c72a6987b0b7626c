"""Waiting for a ``TCPStore`` key without a thread: the store's push.

The ``TCPStore`` server answers a ``WAIT`` request the moment every key in it is set, so a rank can
learn of a write (a committed view, a new bus registration) one round trip after it, at no cost
while nothing is written, instead of polling at a period that costs ``ranks / period`` round trips
a second at the server.

torch's client can only wait by blocking a thread in C++ (a wait cannot be interrupted, a thread
still inside one when the interpreter exits aborts the process, and every expired wait logs a
warning). :class:`KeyWaiter` instead speaks the request itself on an asyncio connection of its
own: a validation message (query type 0 with the store's magic number), then ``WAIT`` (query type
6: a count of keys, each a length and its bytes, under the client's key prefix ``/``), answered by
one byte (0: every key is set). All integers are little-endian (the byte order of the hosts torch
runs on). Both of torch's servers (libuv and the classic one) speak it. Cancelling a wait closes
its connection, which the server drops with the wait.

The same connection reads a key without a thread (:meth:`KeyWaiter.read`): ``CHECK`` (query type
5, keys as for ``WAIT``, answered by one byte, 0: set), then, only for a key that is set, ``GET``
(query type 3, one key; answered by a length and the value). A ``GET`` of a missing key would
wait for it, so it is never sent for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

from elasticep.errors import ElasticEPError

_MAGIC = 0x3C85F7CE  # the TCPStore protocol's validation number
_VALIDATE = 0
_COMPARE_SET = 2
_GET = 3
_CHECK = 5
_WAIT = 6
_STOP_WAITING = 0
_READY = 0
_MAX_VALUE_BYTES = 64 << 20  # a longer answer to a GET is not the store's
_KEY_PREFIX = "/"  # torch's client stores every key under this prefix

def _server_of(store: object) -> tuple[str, int] | None:
    """``(host, port)`` of the server behind a torch ``TCPStore`` object; None for any other store."""
    try:
        from torch.distributed import TCPStore
    except ImportError:  # pragma: no cover - torch is a dependency; a store without it is no TCPStore
        return None
    if not isinstance(store, TCPStore) or not isinstance(store.host, str) or store.port <= 0:
        return None
    return store.host, store.port


class StoreWaitFailed(ElasticEPError, ConnectionError):
    """A wait could not be made: the store is unreachable, or answered outside the protocol."""


class KeyWaiter:
    """Waits for keys of one ``TCPStore`` server to be set, on an asyncio connection of its own.

    One wait at a time. The connection is kept from one wait to the next (the server looks up
    the name of every client that connects, so a connection per wait would cost it a name lookup
    per commit and rank) and opened again after a wait that was cancelled or failed. Costs nothing
    while it waits: no thread, no polling. Its owner ends it with :meth:`close`, or drops the idle
    connection with :meth:`reset`.

    Args:
        host, port: the store server (a torch ``TCPStore`` client's ``host`` and ``port``).
        connect_timeout_s: bound on opening the connection, s.
        bound_s: longest one wait, s (None: until the key is set, the wait is cancelled or the
            connection breaks; a store that goes silent is the membership's poll to find).
    """

    def __init__(self, host: str, port: int, *, connect_timeout_s: float = 10.0,
                 bound_s: float | None = None) -> None:
        self.host, self.port = host, port
        self.connect_timeout_s = connect_timeout_s
        self.bound_s = bound_s
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._closed = False
        self._turn: asyncio.Lock | None = None  # reads and compare-and-sets take turns on the connection

    @classmethod
    def for_store(cls, store: object, **kwargs) -> "KeyWaiter | None":
        """A waiter on the server behind a torch ``TCPStore`` object; None for any other store."""
        server = _server_of(store)
        return None if server is None else cls(*server, **kwargs)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._streams is None:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port),
                                                        self.connect_timeout_s)
            except (OSError, asyncio.TimeoutError) as exc:
                raise StoreWaitFailed(f"cannot reach the store at {self.host}:{self.port}: {exc!r}") from None
            writer.write(struct.pack("<BI", _VALIDATE, _MAGIC))
            self._streams = reader, writer
        return self._streams

    async def wait(self, key: str) -> bool:
        """True once ``key`` is set; False when ``bound_s`` passed first or the waiter is closed.
        Raises :class:`StoreWaitFailed` when the store cannot be reached."""
        if self._closed:
            return False
        name = (_KEY_PREFIX + key).encode()
        try:
            reader, writer = await self._connect()
            if self._closed:  # closed while connecting (and the cancellation may have been lost)
                self.reset()
                return False
            writer.write(struct.pack("<BQQ", _WAIT, 1, len(name)) + name)
            await writer.drain()
            if self.bound_s is None:
                answer = await reader.readexactly(1)
            else:
                answer = await asyncio.wait_for(reader.readexactly(1), self.bound_s)
        except asyncio.TimeoutError:
            self.reset()  # the server still holds that wait: this connection is spent
            return False
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.reset()
            if self._closed:
                return False
            raise StoreWaitFailed(f"store wait for {key!r} failed: {exc!r}") from None
        except BaseException:  # cancelled: its answer would come on a connection nobody reads
            self.reset()
            raise
        if answer[0] != _STOP_WAITING:
            self.reset()
            raise StoreWaitFailed(f"store answered a wait with {answer!r}")
        return True

    async def read(self, key: str, *, known_set: bool = False) -> bytes | None:
        """``key``'s value, or None when it is not set; one round trip for a missing key, two
        for a set one, one with ``known_set`` (the key is known to exist, e.g. a wait on it
        returned: no ``CHECK`` first; should it be missing after all, the server answers an
        empty value, read as None, or drops the connection). Reads and compare-and-sets on one
        waiter take turns; not while a wait is in progress on it. Raises :class:`StoreWaitFailed`
        when the store cannot be reached or answers outside the protocol. Cancelling it closes
        the connection."""
        name = (_KEY_PREFIX + key).encode()
        async with self._request("read", key) as (reader, writer):
            if not known_set:
                writer.write(struct.pack("<BQQ", _CHECK, 1, len(name)) + name)
                await writer.drain()
                ready = (await reader.readexactly(1))[0]
                if ready != _READY:
                    return None
            writer.write(struct.pack("<BQ", _GET, len(name)) + name)
            await writer.drain()
            value = await self._value(reader, "read", key)
            # not there after all (a value this module reads is never empty)
            return None if known_set and not value else value

    async def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        """Set ``key`` to ``desired`` if it holds ``expected`` (``b""``: if it is not set);
        returns what it holds afterwards (``desired`` when this call set it), in one round trip
        on this connection (the ``COMPARE_SET`` request). Takes turns with reads on this
        waiter; not while a wait is in progress on it. Raises :class:`StoreWaitFailed` when the
        store cannot be reached or answers outside the protocol. Cancelling it closes the
        connection."""
        name = (_KEY_PREFIX + key).encode()
        async with self._request("compare-and-set", key) as (reader, writer):
            writer.write(struct.pack("<BQ", _COMPARE_SET, len(name)) + name + struct.pack("<Q", len(expected))
                         + expected + struct.pack("<Q", len(desired)) + desired)
            await writer.drain()
            return await self._value(reader, "compare-and-set", key)

    @contextlib.asynccontextmanager
    async def _request(self, what: str, key: str):
        """The connection for one request, in turn with the others (reads, compare-and-sets);
        a request that fails or is cancelled closes it (its answer would come on a connection
        nobody reads), and a failure is a :class:`StoreWaitFailed`."""
        if self._closed:
            raise StoreWaitFailed("the waiter is closed")
        if self._turn is None:
            self._turn = asyncio.Lock()
        async with self._turn:
            try:
                yield await self._connect()
            except StoreWaitFailed:
                self.reset()
                raise
            except (OSError, asyncio.IncompleteReadError) as exc:
                self.reset()
                raise StoreWaitFailed(f"store {what} of {key!r} failed: {exc!r}") from None
            except BaseException:
                self.reset()
                raise

    @staticmethod
    async def _value(reader: asyncio.StreamReader, what: str, key: str) -> bytes:
        """A value as the server answers it: its length (8 bytes), then its bytes."""
        size = struct.unpack("<Q", await reader.readexactly(8))[0]
        if size > _MAX_VALUE_BYTES:
            raise StoreWaitFailed(f"store answered a {what} of {key!r} with {size} bytes")
        return await reader.readexactly(size)

    def reset(self) -> None:
        """Close the connection (a wait in progress ends; the next one connects again)."""
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None

    def close(self) -> None:
        """Close the connection and take no more waits."""
        self._closed = True
        self.reset()


class WaitHub:
    """Waits on the keys of one ``TCPStore`` server shared by many waiters of one event loop: one
    ``WAIT`` request per key however many wait for it, on a few connections kept between waits.

    For processes that hold many ranks (the scale harness): there each rank's commit watch and
    bus watcher wait for the same next keys, and a connection per waiter would be hundreds of
    connections, each one a name lookup at the server. A rank process of its own needs none (its
    :class:`KeyWaiter` is as cheap). Same interface as :class:`KeyWaiter` for its users
    (:meth:`wait`; their ``reset`` and ``close`` leave a hub alone, its owner closes it).

    At most ``connections`` requests are open at once; a wait for another key waits for one of
    them. That cannot starve: at any moment at most one registration-log key and one epoch key
    past the store's head are unset (every earlier one is answered at once), so the open
    requests are always about to be answered. The connections are kept, so the server sees a
    fixed few.

    Args:
        host, port: the store server.
        connect_timeout_s: bound on opening a connection, s.
        connections: requests (connections) open at once.
    """

    def __init__(self, host: str, port: int, *, connect_timeout_s: float = 10.0, connections: int = 8) -> None:
        if connections < 2:
            raise ValueError(f"a WaitHub needs at least 2 connections (a log key and an epoch key), not {connections}")
        self.host, self.port = host, port
        self.connect_timeout_s = connect_timeout_s
        self.connections = connections
        self._slots: asyncio.Semaphore | None = None
        self._waits: dict[str, list] = {}  # key -> [task, sharers]
        self._spare: list[KeyWaiter] = []
        self._closed = False
        self.requests = 0
        """``WAIT`` requests made (each answered every waiter of its key)."""

    @classmethod
    def for_store(cls, store: object, **kwargs) -> "WaitHub | None":
        """A hub on the server behind a torch ``TCPStore`` object; None for any other store."""
        server = _server_of(store)
        return None if server is None else cls(*server, **kwargs)

    @contextlib.asynccontextmanager
    async def _connection(self):
        """One of the hub's connections for one request (at most ``connections`` at once)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.connections)
        async with self._slots:
            waiter = self._spare.pop() if self._spare else KeyWaiter(self.host, self.port,
                                                                     connect_timeout_s=self.connect_timeout_s)
            try:
                yield waiter
            finally:
                if self._closed:
                    waiter.close()
                else:
                    self._spare.append(waiter)  # after a failure it connects again on its next request

    async def _one(self, key: str) -> bool:
        async with self._connection() as waiter:
            self.requests += 1
            return await waiter.wait(key)

    async def read(self, key: str, *, known_set: bool = False) -> bytes | None:
        """``key``'s value, or None when it is not set (:meth:`KeyWaiter.read`), on one of the
        hub's connections. Raises :class:`StoreWaitFailed` when the store cannot be reached or
        the hub is closed."""
        if self._closed:
            raise StoreWaitFailed("the hub is closed")
        async with self._connection() as waiter:
            return await waiter.read(key, known_set=known_set)

    async def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        """:meth:`KeyWaiter.compare_set` on one of the hub's connections."""
        if self._closed:
            raise StoreWaitFailed("the hub is closed")
        async with self._connection() as waiter:
            return await waiter.compare_set(key, expected, desired)

    async def wait(self, key: str) -> bool:
        """True once ``key`` is set; False when the hub is closed. Raises
        :class:`StoreWaitFailed` when the store cannot be reached. Cancelling one waiter leaves
        the others waiting; the request ends with its last waiter."""
        if self._closed:
            return False
        entry = self._waits.get(key)
        if entry is None or entry[0].done():
            entry = self._waits[key] = [asyncio.get_running_loop().create_task(self._one(key)), 0]
        entry[1] += 1
        try:
            return await asyncio.shield(entry[0])
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and entry[0].cancelled() and not (task is not None and task.cancelling()):
                return False  # the hub was closed under this wait, not the waiter cancelled
            raise
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                if not entry[0].done():
                    entry[0].cancel()
                if self._waits.get(key) is entry:
                    del self._waits[key]

    def reset(self) -> None:
        """Nothing: the hub's connections are its own (a user's ``end_waits`` lands here)."""

    def close(self) -> None:
        """End every wait (they return False) and close the connections."""
        self._closed = True
        for task, _ in list(self._waits.values()):
            task.cancel()
        for waiter in self._spare:
            waiter.close()
        self._spare.clear()
