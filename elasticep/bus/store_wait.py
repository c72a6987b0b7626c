"""Waiting for a ``TCPStore`` key without a thread: the store's push.

The ``TCPStore`` server answers a ``WAIT`` request the moment every key in it is set, so a rank can
learn of a write (a committed view, a new bus registration) one round trip after it, at no cost
while nothing is written, instead of polling at a period that costs ``ranks / period`` round trips
a second at the server.

torch's client can only wait by blocking a thread in C++ (a wait cannot be interrupted, a thread
still inside one when the interpreter exits aborts the process, and every expired wait logs a
warning). :class:`KeyWaiter` instead speaks the request itself on an asyncio connection of its
own (one per wait): a validation message (query type 0 with the store's magic number), then ``WAIT`` (query type
6: a count of keys, each a length and its bytes, under the client's key prefix ``/``), answered by
one byte (0: every key is set). All integers are little-endian (the byte order of the hosts torch
runs on). Both of torch's servers (libuv and the classic one) speak it. Cancelling a wait closes
its connection, which the server drops with the wait.
"""

from __future__ import annotations

import asyncio
import struct

from elasticep.errors import ElasticEPError

_MAGIC = 0x3C85F7CE  # the TCPStore protocol's validation number
_VALIDATE = 0
_WAIT = 6
_STOP_WAITING = 0
_KEY_PREFIX = "/"  # torch's client stores every key under this prefix

WAIT_BOUND_S = 60.0
"""Longest one :meth:`KeyWaiter.wait` lasts before it returns False (then wait again), s."""


class StoreWaitFailed(ElasticEPError, ConnectionError):
    """A wait could not be made: the store is unreachable, or answered outside the protocol."""


class KeyWaiter:
    """Waits for keys of one ``TCPStore`` server to be set, each wait on an asyncio connection of
    its own (opened for it and closed after it, so nothing is left open for its owner to close).
    Costs nothing while it waits: no thread, no polling. Waits are rare (one per committed view or
    registration), so a connection per wait costs little.

    Args:
        host, port: the store server (a torch ``TCPStore`` client's ``host`` and ``port``).
        connect_timeout_s: bound on opening the connection, s.
        bound_s: longest one wait, s (:data:`WAIT_BOUND_S`).
    """

    def __init__(self, host: str, port: int, *, connect_timeout_s: float = 10.0,
                 bound_s: float = WAIT_BOUND_S) -> None:
        self.host, self.port = host, port
        self.connect_timeout_s = connect_timeout_s
        self.bound_s = bound_s
        self._closed = False

    @classmethod
    def for_store(cls, store: object, **kwargs) -> "KeyWaiter | None":
        """A waiter on the server behind a torch ``TCPStore`` object; None for any other store."""
        host, port = getattr(store, "host", None), getattr(store, "port", None)
        if type(store).__name__ != "TCPStore" or not isinstance(host, str) or not isinstance(port, int) or port <= 0:
            return None
        return cls(host, port, **kwargs)

    async def wait(self, key: str) -> bool:
        """True once ``key`` is set; False when ``bound_s`` passed first or the waiter is closed.
        Raises :class:`StoreWaitFailed` when the store cannot be reached."""
        if self._closed:
            return False
        name = (_KEY_PREFIX + key).encode()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port),
                                                    self.connect_timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            raise StoreWaitFailed(f"cannot reach the store at {self.host}:{self.port}: {exc!r}") from None
        try:
            writer.write(struct.pack("<BI", _VALIDATE, _MAGIC) + struct.pack("<BQQ", _WAIT, 1, len(name)) + name)
            await writer.drain()
            answer = await asyncio.wait_for(reader.readexactly(1), self.bound_s)
        except asyncio.TimeoutError:
            return False  # the server drops the wait with the connection
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise StoreWaitFailed(f"store wait for {key!r} failed: {exc!r}") from None
        finally:
            writer.close()
        if answer[0] != _STOP_WAITING:
            raise StoreWaitFailed(f"store answered a wait with {answer!r}")
        return True

    def close(self) -> None:
        """Take no more waits (one in progress is left to its caller's cancellation)."""
        self._closed = True
