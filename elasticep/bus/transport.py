"""The small interface every bus transport implements.

A transport moves opaque frames (bytes) from one rank to every other rank it is connected to,
publish/subscribe style, and hands received frames to the bus together with the identity the
transport itself vouches for: the sending rank and that process's *incarnation*.

The bus relies on three properties and nothing else:

* **Per-link FIFO.** Frames from one sender incarnation arrive in the order they were sent
  (they may be lost, never reordered).
* **Authenticated sender.** The ``sender`` rank of a received frame is what the transport
  established (a CURVE key for ZeroMQ, the object identity in-process), not what the frame
  claims; the codec compares the two.
* **Incarnation.** Each transport object has an ``incarnation`` that is larger for every new
  process (or new transport object) of the same rank. A sender's sequence numbers restart at 1
  with a new incarnation, so the bus resets its per-sender tracking when it sees a larger one and
  refuses frames from a smaller one.

``send`` never blocks: a transport that cannot take a frame drops it (as ZeroMQ does past its
high-water mark) and the receiver sees a sequence gap.
"""

from __future__ import annotations

import abc
import time
from typing import Callable, Tuple

Frame = Tuple[int, int, bytes]
"""A received frame: ``(sender_rank, sender_incarnation, data)``; ``data`` is one encoded envelope."""


def new_incarnation() -> int:
    """A fresh incarnation number: wall-clock nanoseconds, so a restarted process gets a larger one.

    Restarts on one host always compare correctly; across hosts this assumes clocks agree to
    better than the time a restart takes (seconds), which NTP gives. Pass an explicit counter
    (e.g. the launcher's restart count) where that does not hold.
    """
    return time.time_ns()


class TransportClosed(RuntimeError):
    """The transport was closed while a caller waited on it."""


class Transport(abc.ABC):
    """Broadcast frames to peer ranks; receive theirs with the sender the transport authenticated.

    Called by :class:`elasticep.bus.EventBus` only: ``start`` once, then ``send`` from the
    publisher and ``receive`` from the bus's single receive task, then ``close`` once.
    """

    rank: int
    """This process's rank."""
    incarnation: int
    """This transport's incarnation (see the module docstring)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Open sockets, register with the rendezvous and connect to the peers known so far."""

    @abc.abstractmethod
    def send(self, frame: bytes) -> None:
        """Send one encoded envelope to every connected peer. Never blocks; may drop."""

    def send_many(self, frames: list[bytes]) -> None:
        """Send several frames in order (transports override this to save per-frame overhead)."""
        for frame in frames:
            self.send(frame)

    @abc.abstractmethod
    async def receive(self) -> list[Frame]:
        """Wait for and return at least one received frame (all that are ready, up to a bound).

        Raises :class:`TransportClosed` once the transport is closed.
        """

    def set_receiver(self, receiver: Callable[[list[Frame]], None]) -> bool:
        """Offer push delivery: call ``receiver(frames)`` from the event loop as frames arrive.

        Called once by the bus before :meth:`start`. Return ``True`` if this transport will push
        (then the bus never calls :meth:`receive`), ``False`` to be pulled (the default).
        """
        return False

    def pause_receiving(self) -> None:
        """Push mode: stop calling the receiver until :meth:`resume_receiving` (frames wait in the
        transport's own buffers, which drop past their high-water mark)."""

    def resume_receiving(self) -> None:
        """Push mode: deliver again, starting with whatever arrived while paused."""

    async def refresh(self) -> None:
        """Look for peers that registered since the last look and connect to them (default: none)."""

    def set_peer_filter(self, wanted: Callable[[int], bool] | None, *,
                        prefetch: Callable[[int], bool] | None = None,
                        selected: Callable[[], tuple[frozenset[int], frozenset[int]] | None] | None = None) -> bool:
        """Offer to receive only from the ranks ``wanted(rank)`` selects (``None``: every rank);
        ``prefetch(rank)``: ranks likely to be wanted soon, whose endpoints a transport may look
        up ahead (so that taking them on after a view change costs no store read);
        ``selected()``: ``wanted``'s answer for a whole set of ranks at once, ``(ranks, chosen)``,
        or None (a transport may use it instead of asking ``wanted`` rank by rank).

        The membership service passes its detection topology's predicate (with the ring, a
        rank's ``monitors_per_rank`` neighbours and the joiners beside it), so a rank's sockets
        and received messages do not grow with the cluster. Return True if this transport
        filters (then :meth:`apply_peer_filter` re-evaluates it), False if it keeps receiving
        from everyone (the default; the membership core ignores heartbeats it does not watch).
        """
        return False

    def apply_peer_filter(self) -> None:
        """Evaluate the peer filter again, now (the member set changed). Default: nothing."""

    @abc.abstractmethod
    def peers(self) -> set[int]:
        """Ranks this transport is connected (or connecting) to, excluding itself."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close sockets and wake a pending ``receive`` with :class:`TransportClosed`. Idempotent."""
