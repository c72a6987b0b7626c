"""The ZeroMQ transport: one CURVE PUB socket per rank, one CURVE SUB socket per peer.

Each rank binds one PUB socket (``tcp://127.0.0.1:*`` by default, or an ``ipc://`` path) that is
a CURVE server; a ZAP handler lets only cluster members and the monitor key subscribe. For each
peer it opens one SUB socket whose ``curve_serverkey`` is pinned to that peer's public key: only
the holder of the peer's secret key completes the handshake, so every frame read from that socket
is authenticated as that peer, and the bus passes the rank to the codec as
``authenticated_sender`` (an envelope that claims another sender is refused as
``sender_mismatch``).

Endpoints come from a :class:`~elasticep.bus.rendezvous.StoreRendezvous` on a ``TCPStore``. A
background watcher waits for the next registration (the store server answers a ``WAIT`` on its
log key the moment it is written: :class:`~elasticep.bus.store_wait.KeyWaiter`, an asyncio
connection of its own; on a store other than a ``TCPStore`` it polls the registration counter
every ``poll_interval_s`` from a worker thread) and connects to ranks that registered later (joiners,
scale-up) or re-registered at a new endpoint (restarts); :meth:`refresh` does the same at once,
for a membership service that knows a rank just joined.

The store is not authenticated, so nothing read from it is taken on trust:

* a record must carry its rank's signature (checked against :class:`~elasticep.bus.ClusterKeys`);
  anything else is skipped and counted, and the watcher keeps polling;
* a validly signed record older than the one in use (a replay) is ignored;
* a peer's working connection is replaced only once a socket to the new endpoint has completed
  its CURVE handshake (proof that the rank's secret key is there); until then the old one
  keeps serving, so a bogus endpoint costs a failed handshake, never a working link;
* a rank that finds its own record overwritten (or gone) writes it again, at once when the
  registration log shows the write, and otherwise within :data:`SELF_CHECK_S`.

Wire message: a kind byte (``B`` when every envelope in it is a heartbeat, ``E`` otherwise), the
sending transport's incarnation (8 bytes, little-endian), then one or more envelopes, each as a
4-byte little-endian length and the encoded envelope. The kind byte is the ZeroMQ topic: a
subscriber that has the peer's heartbeats from elsewhere (the host board, for a peer on its own
host) subscribes to ``E`` only (:meth:`ZmqTransport.set_beats`), and the peer's socket never
sends it the beats; every other subscriber takes both. A message of any other kind is refused
as ``malformed``. The bus hands all
envelopes it published in one event-loop iteration to :meth:`ZmqTransport.send_many` and they
leave as one ZeroMQ message (up to ``MAX_MESSAGE_BYTES``): per-message costs in libzmq (pipe
signalling, CURVE boxing, a syscall) are paid once per batch, not per event. The incarnation lets
receivers tell a restarted rank (sequence numbers start at 1 again) from duplicates. A message
whose lengths do not add up is refused as ``malformed`` from the bad length on. ZeroMQ drops
messages past the high-water mark (``hwm``) on either side; the bus sees the hole in the sequence
numbers and reports it.

What a peer controls is bounded: a subscriber socket refuses (``ZMQ_MAXMSGSIZE``) any message
longer than the longest one a sender makes (:func:`max_message_bytes` of the codec's frame limit),
before reading it into memory (and connects again: libzmq itself would not, after that error); a
message whose incarnation is not the one in the peer's signed registration is refused
(``elasticep_frames_refused_total{reason="stale_incarnation"}`` below it,
``{reason="unregistered_incarnation"}`` above it, which also reads the store again at once: a
rank restarted at a fixed endpoint is accepted as soon as its new registration is read). So no
message can move the incarnation the bus tracks for a rank anywhere its signed record does not,
and one absurd incarnation cannot make the rank's later real frames look stale.

A peer filter (:meth:`ZmqTransport.set_peer_filter`) bounds what a rank holds: with the ring
detection topology the membership service passes its core's ``hears`` predicate, and the
transport opens SUB sockets only to the ranks it selects (``monitors_per_rank`` of them, plus
joiners placed beside this rank), reads only those ranks' records from the store, and closes a
subscription the predicate drops (silently: no ``disconnected`` report) when
:meth:`ZmqTransport.apply_peer_filter` is called after a view change. Without a filter it
subscribes to every registered rank.

Socket monitors on every socket report handshakes and disconnects: :meth:`connected` lists peers
whose handshake succeeded, failed CURVE handshakes are counted in
``elasticep_bus_handshake_failures_total{side}``, and listeners added with :meth:`add_listener`
hear ``(rank, "connected" | "disconnected" | "handshake_failed")`` within a millisecond on one
host.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import struct
import tempfile
import time
import uuid
from typing import Any, Callable

import zmq
import zmq.auth.thread
from zmq.utils.monitor import recv_monitor_message

from elasticep import metrics
from elasticep.bus.keys import ClusterKeys, MissingKey, _require_curve
from elasticep.bus.rendezvous import DEFAULT_PREFIX, Registration, StoreRendezvous
from elasticep.bus.store_wait import KeyWaiter, WaitHub
from elasticep.events import MAX_FRAME_BYTES
from elasticep.bus.transport import Frame, Transport, TransportClosed, new_incarnation

log = logging.getLogger(__name__)

MONITOR_RANK = -1
"""``rank`` of a read-only monitor transport (it has no PUB socket and cannot send)."""

DEFAULT_HWM = 100_000
"""High-water mark per socket, messages (``Config.bus_hwm``)."""

MAX_MESSAGE_BYTES = 256 * 1024
"""A batch of envelopes is split into ZeroMQ messages of at most this many bytes (a single
envelope longer than that travels alone)."""

SELF_CHECK_S = 1.0
"""How often a rank reads its own record back to catch a silent overwrite, s."""
REFRESH_GAP_S = 0.1
"""Least time between two reads of the registration log by the watcher, s (a registration on
its own is read at once; one in a burst waits at most this long)."""


def max_message_bytes(max_frame_bytes: int = MAX_FRAME_BYTES) -> int:
    """The longest ZeroMQ message a sender makes when every envelope is at most
    ``max_frame_bytes``: a batch of :data:`MAX_MESSAGE_BYTES`, or one envelope with its
    13-byte header. Subscriber sockets refuse anything longer (``ZMQ_MAXMSGSIZE``)."""
    return max(MAX_MESSAGE_BYTES, HEADER_BYTES + max_frame_bytes)

_RECEIVE_BATCH = 4096
_RECONNECT_S = 0.02  # the sockets' reconnect_ivl
_CLOSE_WAIT_S = 2.0  # how long close() waits for each of the transport's tasks to end
_INCARNATION = struct.Struct("<Q")
_LENGTH = struct.Struct("<I")
KIND_BEATS = b"B"
"""Topic (first byte) of a message that holds heartbeats only."""
KIND_EVENTS = b"E"
"""Topic (first byte) of any other message."""
_KINDS = frozenset((KIND_BEATS[0], KIND_EVENTS[0]))
HEADER_BYTES = 1 + 8 + 4
"""A one-envelope message's bytes beyond the envelope: kind, incarnation, length."""
# pyzmq's constants are enums; an int & an enum flag goes through the enum machinery (about 2 us
# a call on the receive path, twice per message)
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)

_SUB_MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_PUB_MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL

PeerListener = Callable[[int, str], None]


class _AllowedKeys:
    """ZAP credentials provider: a subscriber is let in only with a member or monitor public key."""

    def __init__(self, allowed: frozenset[bytes]) -> None:
        self.allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.allowed


class SharedContext:
    """One ZeroMQ context and ZAP handler for the transports of many ranks of one cluster in one
    process (the scale harness runs hundreds of ranks in a few processes; a rank process keeps
    its own). Pass it as ``ZmqTransport(..., context=shared)``; :meth:`close` it after them.

    Args:
        keys: the cluster's keys (only the public ones are used: who may subscribe).
        io_threads: libzmq I/O threads of the context.
        max_sockets: the context's bound on open sockets (each rank holds its PUB socket, one
            SUB socket per peer it hears and a monitor socket for each).
    """

    def __init__(self, keys: ClusterKeys, io_threads: int = 1, max_sockets: int = 16384) -> None:
        _require_curve()
        self.context = zmq.Context(io_threads=io_threads)
        # libzmq's default bound of 1,023 sockets per context is about 100 ranks' worth here.
        self.context.set(zmq.MAX_SOCKETS, max_sockets)
        self._auth = zmq.auth.thread.ThreadAuthenticator(self.context, log=logging.getLogger(__name__ + ".zap"))
        self._auth.start()
        self._auth.configure_curve_callback("*", _AllowedKeys(keys.allowed_subscribers()))

    def close(self) -> None:
        self._auth.stop()
        self.context.destroy(linger=0)


class _Peer:
    __slots__ = ("rank", "sock", "monitor", "endpoint", "incarnation", "failing", "refused")

    def __init__(self, rank: int, sock: zmq.Socket, monitor: zmq.Socket, endpoint: str, incarnation: int) -> None:
        self.rank = rank
        self.sock = sock
        self.monitor = monitor
        self.endpoint = endpoint
        self.incarnation = incarnation
        self.failing = False  # in a streak of failed handshakes (logged once per streak)
        self.refused = 0  # messages refused for their incarnation


class ZmqTransport(Transport):
    """CURVE-authenticated ZeroMQ PUB/SUB between ranks, found through a ``TCPStore``.

    Args:
        rank: this rank, or :data:`MONITOR_RANK` for a read-only monitor (see :meth:`monitor`).
        keys: this process's credentials (``ClusterKeys.for_rank(rank)`` or ``.for_monitor()``).
        store: a ``torch.distributed.TCPStore`` client (or anything with ``set/get/add/check``).
        endpoint: where to bind the PUB socket: ``"tcp://HOST:PORT"`` (port ``*`` picks a free
            one), ``"ipc://PATH"``, or ``"ipc"`` for a fresh path under the temp directory.
            Default ``tcp://127.0.0.1:*``.
        incarnation: this process's incarnation (default: :func:`new_incarnation`).
        hwm: send and receive high-water mark per socket, messages.
        prefix: store key prefix of the rendezvous.
        poll_interval_s: how often the watcher looks for new registrations on a store other than
            a ``TCPStore`` (which pushes them), s; 0 disables the watcher and the self-check (then call
            :meth:`refresh` and :meth:`check_registration`).
        max_frame_bytes: the longest envelope accepted (the codec's limit); subscriber sockets
            refuse messages longer than :func:`max_message_bytes` of it unread.
        context: a :class:`SharedContext` to open the sockets in (default: a context and ZAP
            handler of this transport's own, closed with it).
        waits: a :class:`~elasticep.bus.store_wait.WaitHub` on the store's server shared with
            other ranks of this process, for the watcher's waits (default: a connection of its
            own); its owner closes it.
    """

    def __init__(
        self,
        rank: int,
        keys: ClusterKeys,
        store: Any,
        *,
        endpoint: str | None = None,
        incarnation: int | None = None,
        hwm: int = DEFAULT_HWM,
        prefix: str = DEFAULT_PREFIX,
        poll_interval_s: float = 0.05,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        context: SharedContext | None = None,
        waits: WaitHub | None = None,
    ) -> None:
        _require_curve()
        self._shared = context
        self.rank = rank
        self.keys = keys
        self.incarnation = new_incarnation() if incarnation is None else incarnation
        if not 0 <= self.incarnation < 1 << 64:
            raise ValueError("incarnation must fit in 64 unsigned bits")
        self.hwm = hwm
        self.rendezvous = StoreRendezvous(store, prefix, keys=keys)
        self.max_message_bytes = max_message_bytes(max_frame_bytes)
        self.poll_interval_s = poll_interval_s
        self.read_only = rank == MONITOR_RANK
        if self.read_only:
            if keys.monitor_secret is None:
                raise MissingKey("a monitor transport needs the monitor secret key")
            self._public, self._secret = keys.monitor_public, keys.monitor_secret
        else:
            if rank < 0:
                raise ValueError(f"rank must be >= 0 (or MONITOR_RANK), not {rank}")
            self._public, self._secret = keys.rank_public(rank), keys.rank_secret(rank)
        self._bind = endpoint or "tcp://127.0.0.1:*"
        self._ipc_path: str | None = None
        self.endpoint: str | None = None
        """The endpoint this rank's PUB socket listens on, once started."""
        self._prefix = KIND_EVENTS + _INCARNATION.pack(self.incarnation)
        self._beats_prefix = KIND_BEATS + _INCARNATION.pack(self.incarnation)
        self._no_beats: set[int] = set()  # peers whose heartbeats this rank does not subscribe to
        self._ctx: zmq.Context | None = None
        self._auth: zmq.auth.thread.ThreadAuthenticator | None = None
        self._pub: zmq.Socket | None = None
        self._pub_monitor: zmq.Socket | None = None
        self._peers: dict[int, _Peer] = {}
        self._pending: dict[int, _Peer] = {}  # a new endpoint, until its handshake succeeds
        self._wanted: Callable[[int], bool] | None = None  # the peer filter; None: every rank
        self._prefetch: Callable[[int], bool] | None = None  # records read ahead of being wanted
        self._selected: Callable[[], tuple[frozenset[int], frozenset[int]] | None] | None = None
        self._known: dict[int, Registration] = {}  # checked records of ranks not subscribed to
        self._unread: set[int] = set()  # registered ranks whose record was not read (filtered out)
        self._filter_task: asyncio.Task[None] | None = None
        self.filtered_out = 0
        """Subscriptions closed because the peer filter dropped the rank."""
        self._registration: tuple[str, int] | None = None  # what this rank wrote under its key
        self._next_self_check = 0.0
        self.reregistrations = 0
        """Times this rank found its record overwritten or gone and wrote it again."""
        self.refused: dict[str, int] = {}
        """Messages this transport refused before the bus saw them, by reason."""
        self._ready: set[int] = set()
        self._known_readable: set[int] = set()
        self._connected: set[int] = set()
        self._readable: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._checker: asyncio.Task[None] | None = None
        self._log_waiter: KeyWaiter | WaitHub | None = None
        self._waits = waits
        self._refresh_lock: asyncio.Lock | None = None
        self._seen_registrations = 0
        self._listeners: list[PeerListener] = []
        self._receiver: Callable[[list[Frame]], None] | None = None
        self._paused = False
        self._pump_scheduled = False
        self._last_refusal_log = -1e9
        self._closed = False
        self._started = False
        self.handshake_failures = 0
        """CURVE handshakes that failed on this transport's sockets (either side)."""

    @classmethod
    def monitor(cls, keys: ClusterKeys, store: Any, **kwargs: Any) -> "ZmqTransport":
        """A read-only transport that subscribes to every rank with the monitor key."""
        return cls(MONITOR_RANK, keys, store, **kwargs)

    def __repr__(self) -> str:
        return f"ZmqTransport(rank={self.rank}, endpoint={self.endpoint!r}, peers={sorted(self._peers)})"

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._closed:
            raise TransportClosed("transport is closed")
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._readable = asyncio.Event()
        self._refresh_lock = asyncio.Lock()
        self._ctx = self._shared.context if self._shared is not None else zmq.Context(io_threads=1)
        if not self.read_only and self._shared is None:
            # The ZAP handler must run before the PUB socket accepts its first connection.
            self._auth = zmq.auth.thread.ThreadAuthenticator(self._ctx, log=logging.getLogger(__name__ + ".zap"))
            self._auth.start()
            self._auth.configure_curve_callback("*", _AllowedKeys(self.keys.allowed_subscribers()))
        if not self.read_only:
            pub = self._ctx.socket(zmq.PUB)
            pub.curve_server = True
            pub.curve_publickey = self._public
            pub.curve_secretkey = self._secret
            pub.sndhwm = self.hwm
            pub.linger = 0
            self._pub_monitor = pub.get_monitor_socket(_PUB_MONITOR_EVENTS)
            self._watch(self._pub_monitor, self._on_pub_monitor)
            bind = self._bind
            if bind == "ipc":
                self._ipc_path = os.path.join(tempfile.gettempdir(), f"elasticep-bus-{uuid.uuid4().hex}.sock")
                bind = "ipc://" + self._ipc_path
            pub.bind(bind)
            self._pub = pub
            self.endpoint = pub.last_endpoint.decode()
            self._registration = (self.endpoint, self.incarnation)
            await self._in_thread(self.rendezvous.register, self.rank, self.endpoint, self.incarnation)
            self._next_self_check = time.monotonic() + SELF_CHECK_S
        await self.refresh()
        if self.poll_interval_s > 0:
            self._log_waiter = self._waits or KeyWaiter.for_store(self.rendezvous.store)
            self._watcher = self._loop.create_task(self._watch_store(), name=f"elasticep-bus-watch-{self.rank}")
            if self._registration is not None:
                self._checker = self._loop.create_task(self._check_loop(), name=f"elasticep-bus-check-{self.rank}")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._log_waiter is not None and self._log_waiter is not self._waits:
            self._log_waiter.close()
        for task in (self._watcher, self._checker, self._filter_task):
            if task is not None and not task.done():
                task.cancel()
                # Bounded: Python 3.11's wait_for can swallow a cancellation, and a task that
                # lost it ends at its next look at the transport, which may be a while away.
                done, _ = await asyncio.wait({task}, timeout=_CLOSE_WAIT_S)
                if done and not task.cancelled() and task.exception() is not None:
                    log.debug("bus rank %d: %s ended with %r", self.rank, task.get_name(), task.exception())
                elif not done:
                    log.warning("bus rank %d: %s did not end within %g s of close; left to end by itself",
                                self.rank, task.get_name(), _CLOSE_WAIT_S)
        for peer in [*self._peers.values(), *self._pending.values()]:
            self._close_peer(peer)
        self._peers.clear()
        self._pending.clear()
        if self._pub_monitor is not None:
            self._unwatch(self._pub_monitor)
        if self._pub is not None:
            self._pub.disable_monitor()
            self._pub.close(linger=0)
        if self._pub_monitor is not None:
            self._pub_monitor.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        if self._ctx is not None and self._shared is None:
            self._ctx.destroy(linger=0)  # closes anything still open, so term() cannot hang
        if self._ipc_path is not None:
            try:
                os.unlink(self._ipc_path)
            except FileNotFoundError:
                pass
        if self._readable is not None:
            self._readable.set()

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._loop is not None
        return await self._loop.run_in_executor(None, fn, *args)

    # --- peers -------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read new registrations from the store now and connect to those ranks."""
        if self._closed:
            return
        assert self._refresh_lock is not None
        async with self._refresh_lock:
            seen, found, unread = await self._in_thread(self._read_registrations, self._seen_registrations)
            if self._closed:
                return
            self._seen_registrations = seen
            for rank in unread:
                self._unread.add(rank)
                self._known.pop(rank, None)  # it registered again: that record is not the latest
            for rank, reg in found.items():
                if rank == self.rank:
                    if not self._is_own(reg):
                        await self._reregister(reg)
                elif reg is not None:
                    self._found(reg)

    def _read_registrations(self, seen: int) -> tuple[int, dict[int, Registration | None], list[int]]:
        """(worker thread) New registrations: the records of the wanted ranks and this rank's own,
        and the other ranks unread (their records are read when the filter comes to want them)."""
        seen, ranks = self.rendezvous.ranks_since(seen)
        wanted, prefetch = self._wanted, self._prefetch
        found: dict[int, Registration | None] = {}
        unread: list[int] = []
        for rank in sorted(ranks):
            if rank == self.rank or wanted is None or wanted(rank) or (prefetch is not None and prefetch(rank)):
                found[rank] = self.rendezvous.lookup(rank)
            else:
                unread.append(rank)
        return seen, found, unread

    def _found(self, reg: Registration) -> None:
        """A checked record of another rank: connect if the filter wants it, else remember it."""
        self._unread.discard(reg.rank)
        wanted = self._wanted
        if wanted is None or wanted(reg.rank) or reg.rank in self._peers:
            self._known.pop(reg.rank, None)
            self._connect(reg)
            if wanted is not None and not wanted(reg.rank):
                self._drop_peer(reg.rank)
            return
        known = self._known.get(reg.rank)
        if known is None or reg.incarnation >= known.incarnation:
            self._known[reg.rank] = reg

    # --- the peer filter ---------------------------------------------------------------------

    def set_peer_filter(self, wanted: Callable[[int], bool] | None, *,
                        prefetch: Callable[[int], bool] | None = None,
                        selected: Callable[[], tuple[frozenset[int], frozenset[int]] | None] | None = None) -> bool:
        """Subscribe only to ranks for which ``wanted(rank)`` is true (``None``: every rank).

        ``prefetch(rank)``: ranks not wanted yet whose records are read and checked anyway as
        they register (the next ring out), so that when a view change makes them neighbours the
        subscription opens at once, without a store read first. ``wanted`` and ``prefetch`` run
        on the event loop and on the store-reading worker thread; they must be cheap and must
        not block. ``selected()``: ``wanted``'s answers for a whole set at once, as ``(ranks,
        chosen)``: of ``ranks`` it wants exactly ``chosen`` (None when it has no such answer
        now); :meth:`apply_peer_filter` then asks ``wanted`` only of the ranks outside ``ranks``,
        so a view change costs set operations over the hundreds of ranks it knows, not a call
        per rank. Takes effect at once on a started transport (as :meth:`apply_peer_filter`),
        else at :meth:`start`. Returns True (this transport filters).
        """
        if self.read_only and wanted is not None:
            raise ValueError("a monitor transport subscribes to every rank; it takes no peer filter")
        self._wanted = wanted
        self._prefetch = prefetch
        self._selected = selected if wanted is not None else None
        if self._started and not self._closed:
            self.apply_peer_filter()
        return True

    def apply_peer_filter(self) -> None:
        """Evaluate the peer filter again (the member set changed): close the subscriptions it
        drops, open the ones it now selects (reading their records from the store if needed)."""
        if self._closed or not self._started:
            return
        wanted = self._wanted
        for rank in list(self._peers):
            if wanted is not None and not wanted(rank):
                self._drop_peer(rank)
        known, unread = self._known, self._unread
        answer = self._selected() if self._selected is not None else None
        if wanted is None:
            connect, need = list(known), sorted(unread)
        elif answer is None:
            connect = [r for r in known if wanted(r)]
            need = sorted(r for r in unread if wanted(r))
        else:
            ranks, chosen = answer
            connect = [r for r in chosen if r in known] + [r for r in known.keys() - ranks if wanted(r)]
            need = sorted([r for r in chosen if r in unread] + [r for r in unread - ranks if wanted(r)])
        for rank in connect:
            self._connect(known.pop(rank))
        if need and (self._filter_task is None or self._filter_task.done()):
            assert self._loop is not None
            self._filter_task = self._loop.create_task(self._read_wanted(), name=f"elasticep-bus-filter-{self.rank}")

    async def _read_wanted(self) -> None:
        while not self._closed:
            wanted = self._wanted
            need = sorted(r for r in self._unread if wanted is None or wanted(r))
            if not need:
                return
            self._unread.difference_update(need)
            try:
                found = await self._in_thread(lambda: {r: self.rendezvous.lookup(r) for r in need})
            except Exception as exc:
                self._unread.update(need)
                log.warning("bus rank %d: rendezvous read failed: %s", self.rank, exc)
                await asyncio.sleep(self.poll_interval_s or 0.05)
                continue
            for reg in found.values():
                if reg is not None and not self._closed:
                    self._found(reg)

    def _drop_peer(self, rank: int) -> None:
        """Close the subscription to ``rank`` (the filter dropped it); keep its record."""
        peer = self._peers.pop(rank, None)
        pending = self._pending.pop(rank, None)
        if pending is not None:
            self._close_peer(pending)
        if peer is None:
            return
        self._close_peer(peer)
        self._known[rank] = Registration(rank, peer.endpoint, peer.incarnation)
        self.filtered_out += 1

    def _is_own(self, reg: Registration | None) -> bool:
        if self._registration is None:
            return True  # a monitor registers nothing
        return reg is not None and (reg.endpoint, reg.incarnation) == self._registration

    async def _reregister(self, found: Registration | None) -> None:
        assert self.endpoint is not None
        what = "gone or refused" if found is None else f"pointing at {found.endpoint}"
        log.warning("bus rank %d: its rendezvous record was overwritten (%s); registering again", self.rank, what)
        self.reregistrations += 1
        metrics.RENDEZVOUS_REREGISTERED.inc()
        await self._in_thread(self.rendezvous.register, self.rank, self.endpoint, self.incarnation)

    async def check_registration(self) -> bool:
        """Read this rank's record back and write it again if it was overwritten or removed
        without a registration-log entry; returns whether it had to. The watcher calls this
        every :data:`SELF_CHECK_S` (with ``poll_interval_s=0``, call it yourself)."""
        self._next_self_check = time.monotonic() + SELF_CHECK_S
        if self._registration is None or self._closed:
            return False
        reg = await self._in_thread(self.rendezvous.lookup, self.rank)
        if self._closed or self._is_own(reg):
            return False
        await self._reregister(reg)
        return True

    async def _watch_store(self) -> None:
        waiter = self._log_waiter
        last = -1e18
        # (not ``while True``: Python 3.11's wait_for can swallow the cancellation close() sends,
        # and a closed waiter answers at once, so the loop must see the transport closed)
        while not self._closed:
            try:
                if waiter is not None:
                    # told of the next registration by the store (a write it answers at once)
                    await waiter.wait(self.rendezvous.log_key(self._seen_registrations + 1))
                    # A registration alone is read at once; a burst of them (a whole cluster
                    # starting) is read in batches, at most one read every REFRESH_GAP_S: each
                    # rank would otherwise read the log once per rank that starts, N^2 reads.
                    wait_s = last + REFRESH_GAP_S - time.monotonic()
                    if wait_s > 0:
                        await asyncio.sleep(wait_s)
                    last = time.monotonic()
                else:
                    await asyncio.sleep(self.poll_interval_s)
                count = await self._in_thread(self.rendezvous.count)
                if count != self._seen_registrations:
                    await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The store may be briefly unreachable; the next poll retries. (Bad records do
                # not land here: the rendezvous skips and counts them.)
                log.warning("bus rank %d: rendezvous poll failed: %s", self.rank, exc)
                if waiter is not None:
                    await asyncio.sleep(max(self.poll_interval_s, SELF_CHECK_S))

    async def _check_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(max(0.0, self._next_self_check - time.monotonic()))
            try:
                await self.check_registration()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._next_self_check = time.monotonic() + SELF_CHECK_S
                log.warning("bus rank %d: rendezvous self-check failed: %s", self.rank, exc)

    def _connect(self, reg: Registration) -> None:
        peer = self._peers.get(reg.rank)
        pending = self._pending.get(reg.rank)
        if peer is not None:
            if reg.incarnation < peer.incarnation:
                # A validly signed but older record (replayed into the store): never go back.
                log.warning("bus rank %d: ignored an older registration of rank %d (incarnation %d < %d)",
                            self.rank, reg.rank, reg.incarnation, peer.incarnation)
                return
            if peer.endpoint == reg.endpoint:
                peer.incarnation = reg.incarnation  # same address: ZeroMQ reconnects by itself
                if pending is not None:  # the rank is back where it was: drop the candidate
                    self._close_peer(pending)
                    del self._pending[reg.rank]
                return
            if pending is not None:
                if pending.endpoint == reg.endpoint:
                    pending.incarnation = max(pending.incarnation, reg.incarnation)
                    return
                self._close_peer(pending)
                del self._pending[reg.rank]
            # Keep the working link until the new endpoint proves it holds the rank's key.
            log.info("bus rank %d: rank %d registered at %s; switching once its handshake succeeds",
                     self.rank, reg.rank, reg.endpoint)
            candidate = self._open_peer(reg)
            if candidate is not None:
                self._pending[reg.rank] = candidate
            return
        peer = self._open_peer(reg)
        if peer is not None:
            self._peers[reg.rank] = peer

    def _promote(self, candidate: _Peer) -> None:
        """``candidate`` completed its handshake: it replaces the rank's working connection."""
        rank = candidate.rank
        del self._pending[rank]
        old = self._peers.get(rank)
        if old is not None:
            log.info("bus rank %d: rank %d moved to %s", self.rank, rank, candidate.endpoint)
            self._close_peer(old)
        self._peers[rank] = candidate
        assert self._loop is not None
        # Messages may already wait on the new socket, read while it was a candidate: look now.
        self._loop.call_soon(functools.partial(self._on_sub_readable, rank, candidate.sock))

    def _open_peer(self, reg: Registration) -> _Peer | None:
        try:
            server_key = self.keys.rank_public(reg.rank)
        except MissingKey:
            log.warning("bus rank %d: rank %d registered but has no cluster key; not connecting", self.rank, reg.rank)
            return None
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.SUB)
        sock.curve_serverkey = server_key
        sock.curve_publickey = self._public
        sock.curve_secretkey = self._secret
        sock.rcvhwm = self.hwm
        sock.linger = 0
        # A longer message is refused (the connection dropped) before it is read into memory.
        sock.maxmsgsize = self.max_message_bytes
        # Reconnect fast to a restarted peer, back off from one that keeps failing.
        sock.reconnect_ivl = 20
        sock.reconnect_ivl_max = 1000
        sock.setsockopt(zmq.SUBSCRIBE, KIND_EVENTS if reg.rank in self._no_beats else b"")
        monitor = sock.get_monitor_socket(_SUB_MONITOR_EVENTS)
        sock.connect(reg.endpoint)
        peer = _Peer(reg.rank, sock, monitor, reg.endpoint, reg.incarnation)
        self._watch(sock, functools.partial(self._on_sub_readable, reg.rank, sock))
        self._watch(monitor, lambda p=peer: self._on_sub_monitor(p))
        return peer

    def _close_peer(self, peer: _Peer) -> None:
        self._unwatch(peer.sock)
        self._unwatch(peer.monitor)
        peer.sock.disable_monitor()
        peer.sock.close(linger=0)
        peer.monitor.close(linger=0)
        if self._pending.get(peer.rank) is peer:
            return  # a candidate: the working connection's state is untouched
        self._ready.discard(peer.rank)
        self._known_readable.discard(peer.rank)
        self._connected.discard(peer.rank)

    def peers(self) -> set[int]:
        return set(self._peers)

    def socket_count(self) -> int:
        """ZeroMQ sockets this transport holds open (PUB, SUBs, their monitors, candidates)."""
        own = (self._pub is not None) + (self._pub_monitor is not None)
        return own + 2 * (len(self._peers) + len(self._pending))

    def connected(self) -> set[int]:
        """Peers whose CURVE handshake succeeded and that have not disconnected since."""
        return set(self._connected)

    def add_listener(self, listener: PeerListener) -> None:
        """Call ``listener(rank, kind)`` on ``"connected"``, ``"disconnected"``, ``"handshake_failed"``.

        Runs synchronously in the event loop thread, one call at a time; it must not block.
        ``rank`` is -1 for a refused subscriber on this rank's PUB socket (its identity is unknown).
        """
        self._listeners.append(listener)

    async def wait_connected(self, ranks: set[int] | list[int], timeout: float) -> None:
        """Wait until the handshake with each of ``ranks`` succeeded (bounded by ``timeout`` s).

        A handshake precedes the subscription reaching the peer by a moment, so this is a
        readiness hint; :meth:`EventBus.wait_heard_from` is the delivery proof.
        """
        wanted = set(ranks) - {self.rank}
        assert self._loop is not None
        deadline = self._loop.time() + timeout
        while not wanted <= self._connected:
            if self._loop.time() > deadline:
                raise TimeoutError(f"no handshake with ranks {sorted(wanted - self._connected)}")
            await asyncio.sleep(0.005)

    # --- readiness plumbing ------------------------------------------------------------------

    def _watch(self, sock: zmq.Socket, callback: Callable[[], None]) -> None:
        assert self._loop is not None
        self._loop.add_reader(sock.getsockopt(zmq.FD), callback)
        # ZeroMQ signals its FD only on a state change it was asked about; until EVENTS has been
        # read once, a first message may come without a wake-up, so look once now.
        self._loop.call_soon(callback)

    def _unwatch(self, sock: zmq.Socket) -> None:
        if self._loop is not None and not sock.closed:
            self._loop.remove_reader(sock.getsockopt(zmq.FD))

    def _on_sub_readable(self, rank: int, sock: zmq.Socket) -> None:
        receiver = self._receiver
        if receiver is not None and not (self._paused or self._ready or self._closed):
            # The common case, nothing queued: read this peer here and hand the batch over
            # straight from the callback. The FD fired, so try the message itself at once (recv
            # also processes ZeroMQ's pending commands, which re-arms the FD): one call into
            # libzmq fewer than asking EVENTS first, on the path every event's latency takes.
            peer = self._peers.get(rank)
            if peer is None or peer.sock is not sock:
                return
            frames: list[Frame] = []
            if self._read_peer(peer, frames, True):
                self._ready.add(rank)  # batch limit hit with more waiting: the pump finishes it
                if not self._pump_scheduled:
                    self._pump_scheduled = True
                    assert self._loop is not None
                    self._loop.call_soon(self._pump)
            if frames:
                receiver(frames)
            return
        # The ZeroMQ FD only signals "state changed"; reading EVENTS clears it (no spinning).
        if sock.closed or not sock.getsockopt(_EVENTS) & _POLLIN:
            return
        self._ready.add(rank)
        self._known_readable.add(rank)  # _drain may skip one EVENTS query (~5 us each)
        if receiver is None:
            assert self._readable is not None
            self._readable.set()
        elif not self._paused:
            # Someone is already behind (a batch limit hit): the pump keeps the peers' turns.
            self._pump()

    def _pump(self) -> None:
        """Push mode: hand one batch to the receiver; come back next iteration if more is ready
        (so one flooding peer cannot starve the event loop)."""
        self._pump_scheduled = False
        if self._paused or self._closed or self._receiver is None:
            return
        frames = self._drain()
        if frames:
            self._receiver(frames)
        if self._ready and not self._pump_scheduled and not self._paused:
            self._pump_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._pump)

    def set_receiver(self, receiver: Callable[[list[Frame]], None]) -> bool:
        self._receiver = receiver
        return True

    def sever(self) -> None:
        """Close this rank's publishing socket now, as the kernel does when its process dies:
        every subscriber sees the disconnect at once, not after :meth:`close` has wound down
        the transport's tasks. For harnesses that stand in for a killed process; :meth:`close`
        still releases the rest, and nothing can be sent in between."""
        if self._pub_monitor is not None:
            self._unwatch(self._pub_monitor)
        if self._pub is not None:
            self._pub.disable_monitor()
            self._pub.close(linger=0)
            self._pub = None
        if self._pub_monitor is not None:
            self._pub_monitor.close(linger=0)
            self._pub_monitor = None

    def pause_receiving(self) -> None:
        self._paused = True

    def resume_receiving(self) -> None:
        self._paused = False
        if not self._pump_scheduled and self._loop is not None and not self._closed:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _notify(self, rank: int, kind: str) -> None:
        for listener in self._listeners:
            try:
                listener(rank, kind)
            except Exception:
                log.exception("bus rank %d: peer listener failed", self.rank)

    def _on_sub_monitor(self, peer: _Peer) -> None:
        monitor = peer.monitor
        if monitor.closed:
            return
        while monitor.getsockopt(_EVENTS) & _POLLIN:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                break
            log.debug("bus rank %d: socket event %r for rank %d", self.rank, event, peer.rank)
            candidate = self._pending.get(peer.rank) is peer
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                peer.failing = False
                if candidate:
                    self._promote(peer)
                was = peer.rank in self._connected
                self._connected.add(peer.rank)
                if not (candidate and was):
                    self._notify(peer.rank, "connected")
            elif event == zmq.EVENT_DISCONNECTED:
                if candidate:
                    continue
                # libzmq does not reconnect after a protocol error (e.g. a message over
                # ZMQ_MAXMSGSIZE): connect again ourselves, so one bad message costs a reconnect,
                # not the link. (After an ordinary disconnect this replaces libzmq's own retry.)
                assert self._loop is not None
                self._loop.call_later(_RECONNECT_S, self._reconnect, peer)
                if peer.rank in self._connected:
                    self._connected.discard(peer.rank)
                    self._notify(peer.rank, "disconnected")
            elif event & _FAILED:
                self.handshake_failures += 1
                metrics.BUS_HANDSHAKE_FAILURES.labels("subscriber").inc()
                if not peer.failing:
                    # ZeroMQ retries every reconnect interval: log the streak once, count each try.
                    peer.failing = True
                    log.warning(
                        "bus rank %d: CURVE handshake with rank %d at %s failed (the endpoint does not "
                        "hold rank %d's key)", self.rank, peer.rank, peer.endpoint, peer.rank,
                    )
                    self._notify(peer.rank, "handshake_failed")

    def _reconnect(self, peer: _Peer) -> None:
        if self._closed or peer.sock.closed or self._peers.get(peer.rank) is not peer:
            return
        try:
            peer.sock.disconnect(peer.endpoint)
        except zmq.ZMQError:
            pass  # libzmq had already dropped the endpoint
        peer.sock.connect(peer.endpoint)

    def _on_pub_monitor(self) -> None:
        monitor = self._pub_monitor
        if monitor is None or monitor.closed:
            return
        while monitor.getsockopt(_EVENTS) & _POLLIN:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                break
            if event & _FAILED:
                self.handshake_failures += 1
                metrics.BUS_HANDSHAKE_FAILURES.labels("publisher").inc()
                now = time.monotonic()
                if now - self._last_refusal_log > 1.0:  # a refused client retries: log at most 1/s
                    self._last_refusal_log = now
                    log.warning("bus rank %d: refused a subscriber (CURVE/ZAP handshake failed)", self.rank)
                self._notify(-1, "handshake_failed")

    # --- data path ---------------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        # One envelope, one message: the lone event's path, kept to one call into libzmq.
        pub = self._pub
        if pub is None or len(frame) + HEADER_BYTES > MAX_MESSAGE_BYTES:
            self.send_many([frame])  # raises for a transport that cannot send
            return
        try:
            pub.send(self._prefix + _LENGTH.pack(len(frame)) + frame, _NOBLOCK)
        except zmq.Again:
            pass  # PUB drops past its high-water mark; receivers see the gap

    def send_many(self, frames: list[bytes]) -> None:
        self._send_frames(frames, self._prefix)

    def send_beats(self, frames: list[bytes]) -> None:
        """Send frames that are all heartbeats, under the ``B`` topic: subscribers that take
        this rank's beats elsewhere (:meth:`set_beats`) are not sent them."""
        self._send_frames(frames, self._beats_prefix)

    def _send_frames(self, frames: list[bytes], prefix: bytes) -> None:
        pub = self._pub
        if pub is None:
            if self.read_only:
                raise PermissionError("a monitor transport is read-only")
            raise TransportClosed("transport is not started")
        pack = _LENGTH.pack
        parts = [prefix]
        size = len(prefix)
        for frame in frames:
            if size + 4 + len(frame) > MAX_MESSAGE_BYTES and len(parts) > 1:
                # Flush first, so a message is a batch within the bound or one envelope alone.
                self._send_message(pub, b"".join(parts))
                parts = [prefix]
                size = len(prefix)
            parts.append(pack(len(frame)))
            parts.append(frame)
            size += 4 + len(frame)
        if len(parts) > 1:
            self._send_message(pub, b"".join(parts))

    def beats_left_out(self) -> frozenset[int]:
        """The peers whose heartbeats this rank does not subscribe to (:meth:`set_beats`)."""
        return frozenset(self._no_beats)

    def set_beats(self, rank: int, wanted: bool) -> None:
        """Whether to receive ``rank``'s heartbeats on the bus (default True). With False its
        subscription takes the ``E`` topic only: its publisher's socket filters the beats out,
        so they cost neither side anything past the publisher's one send (for a peer whose
        beats this rank reads on its host board). Its other events keep coming. Remembered for
        the peer's later connections too."""
        if wanted == (rank not in self._no_beats):
            return
        if wanted:
            self._no_beats.discard(rank)
        else:
            self._no_beats.add(rank)
        for peer in (self._peers.get(rank), self._pending.get(rank)):
            if peer is None or peer.sock.closed:
                continue
            # the new subscription first, then the old one off: no event is missed in between
            if wanted:
                peer.sock.setsockopt(zmq.SUBSCRIBE, b"")
                peer.sock.setsockopt(zmq.UNSUBSCRIBE, KIND_EVENTS)
            else:
                peer.sock.setsockopt(zmq.SUBSCRIBE, KIND_EVENTS)
                peer.sock.setsockopt(zmq.UNSUBSCRIBE, b"")

    @staticmethod
    def _send_message(pub: zmq.Socket, message: bytes) -> None:
        try:
            pub.send(message, _NOBLOCK)
        except zmq.Again:
            pass  # PUB drops past its high-water mark; receivers see the gap

    def _drain(self) -> list[Frame]:
        out: list[Frame] = []
        if not self._ready:
            return out
        peers = self._peers
        for rank in list(self._ready):
            peer = peers.get(rank)
            if peer is None:
                self._ready.discard(rank)
                continue
            known = rank in self._known_readable
            self._known_readable.discard(rank)
            if not self._read_peer(peer, out, known):
                self._ready.discard(rank)
            if len(out) >= _RECEIVE_BATCH:
                break
        return out

    def _refuse_message(self, peer: _Peer, reason: str, incarnation: int) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        metrics.FRAMES_REFUSED.labels(reason).inc()
        peer.refused += 1
        if peer.refused & (peer.refused - 1) == 0:  # 1st, 2nd, 4th, ...: a flood does not flood the log
            log.warning("bus rank %d: refused %d message(s) from rank %d: incarnation %d against the registered %d",
                        self.rank, peer.refused, peer.rank, incarnation, peer.incarnation)
        if reason == "unregistered_incarnation" and self._loop is not None and not self._closed:
            # A restart at the same endpoint whose registration we have not read yet: look now.
            self._loop.call_soon(lambda: self._closed or self._loop.create_task(self._refresh_quietly()))

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:
            log.warning("bus rank %d: rendezvous read failed: %s", self.rank, exc)

    def _read_peer(self, peer: _Peer, out: list[Frame], known: bool) -> bool:
        """Append ``peer``'s queued messages' envelopes to ``out`` up to ``_RECEIVE_BATCH``.

        ``known``: the caller has just seen POLLIN on the socket, or its FD has just fired.
        Returns ``True`` when the batch filled with messages still waiting, ``False`` when the
        socket is drained (its FD then re-armed by the last call into libzmq).
        """
        sock = peer.sock
        recv = sock.recv
        getsockopt = sock.getsockopt
        rank = peer.rank
        unpack_length = _LENGTH.unpack_from
        while len(out) < _RECEIVE_BATCH:
            if known:
                # The caller saw POLLIN or the FD has just fired: read at once. A wake-up with
                # nothing behind it (rare on a SUB socket) costs one zmq.Again.
                known = False
                try:
                    data = recv(_NOBLOCK)
                except zmq.Again:
                    return False
            # Later on, asking EVENTS is cheaper than provoking zmq.Again, and it re-arms the FD.
            elif not getsockopt(_EVENTS) & _POLLIN:
                return False
            else:
                data = recv(_NOBLOCK)
            end = len(data)
            if end < HEADER_BYTES or data[0] not in _KINDS:
                out.append((rank, peer.incarnation, b""))  # no room for a header, or no kind: malformed
                continue
            incarnation = _INCARNATION.unpack_from(data, 1)[0]
            if incarnation != peer.incarnation:
                reason = "stale_incarnation" if incarnation < peer.incarnation else "unregistered_incarnation"
                self._refuse_message(peer, reason, incarnation)
                continue
            offset = 9
            while offset < end:
                if offset + 4 > end:
                    out.append((rank, incarnation, b""))
                    break
                length = unpack_length(data, offset)[0]
                offset += 4
                if offset + length > end:
                    out.append((rank, incarnation, b""))  # lengths overrun the message
                    break
                out.append((rank, incarnation, data[offset : offset + length]))
                offset += length
        return bool(getsockopt(_EVENTS) & _POLLIN)

    async def receive(self) -> list[Frame]:
        if not self._started:
            raise RuntimeError("start() the transport before receive()")
        readable = self._readable
        assert readable is not None
        while True:
            if self._closed:
                raise TransportClosed("transport is closed")
            frames = self._drain()
            if frames:
                return frames
            readable.clear()
            # A peer may have become readable between the drain and the clear.
            frames = self._drain()
            if frames:
                return frames
            await readable.wait()
