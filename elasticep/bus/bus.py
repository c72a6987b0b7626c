"""The event bus: typed publish/subscribe between ranks over a :class:`~elasticep.bus.Transport`.

Every rank runs one :class:`EventBus`. ``publish`` wraps an event in an
:class:`~elasticep.events.Envelope` (this rank, the current epoch, the next per-sender sequence
number, wall and monotonic clocks), hands the encoded frame to the transport and delivers the
envelope to this rank's own subscribers. One receive task decodes what peers send, enforces
per-sender order, drops duplicates, reports gaps and fans envelopes out to subscriptions.

Receive-side rules, per sender rank:

* The first envelope seen from a sender incarnation sets the baseline (events it published
  before this bus connected are not counted as lost).
* ``seq == expected``: delivered. ``seq < expected``: a duplicate, dropped and counted under
  ``elasticep_frames_refused_total{reason="duplicate"}``. ``seq > expected``: delivered, and the
  lost range is published locally as a :class:`~elasticep.events.SequenceGap` and counted in
  ``elasticep_bus_gaps_total``.
* A larger transport incarnation (the sender restarted; its seq starts at 1 again) resets the
  tracking; a smaller one (a zombie of a replaced process) is refused as ``stale_incarnation``.
* Sequence numbers are bounded: a first envelope above :data:`MAX_FIRST_SEQ`, or a jump of more
  than :data:`MAX_SEQ_JUMP` past the expected one, is refused as ``seq_out_of_bounds`` (no honest
  sender gets there; accepting it would make every later real envelope a "duplicate").
* Every frame the codec refuses is counted per reason and dropped; nothing stops the loop.

Envelopes the bus makes for itself (``SequenceGap``) carry this rank as sender and ``seq == 0``:
they are local only and never consume a wire sequence number.

User-defined event types: :meth:`EventBus.register_event_type` registers a ``msgspec.Struct`` of
the application's under a ``kind`` name. Such an event travels as a
:class:`~elasticep.events.Custom` whose ``data`` is the struct's msgpack encoding, so peers need
no schema change; a subscription that names the type gets the decoded struct, one that names
``Custom`` (or nothing: all events) keeps getting the raw ``Custom``. A registered kind that fails
to decode into its type is counted under ``elasticep_frames_refused_total{reason="bad_user_event"}``
and not delivered to that type's subscribers.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterable, Literal

import msgspec
from anyio import EndOfStream, WouldBlock

from elasticep import metrics
from elasticep.errors import Closed, ElasticEPError, EventTooLarge, InvalidArgument, NotStarted, WaitTimeout
from elasticep.bus.transport import Frame, Transport, TransportClosed
from elasticep.events import (
    EVENT_TAGS,
    EVENT_TYPES,
    SCHEMA_VERSION,
    Codec,
    Custom,
    Envelope,
    Event,
    FrameRefused,
    Heartbeat,
    SequenceGap,
)

log = logging.getLogger(__name__)

Overflow = Literal["drop_oldest", "drop_newest", "block"]
OVERFLOW_POLICIES: tuple[str, ...] = ("drop_oldest", "drop_newest", "block")

_FLUSH_BYTES = 256 * 1024
"""Queued outgoing bytes that trigger a send before the end of the event-loop iteration."""

MAX_SEQ_JUMP = 1 << 32
"""The largest forward jump in one sender's sequence numbers taken as lost events."""
MAX_FIRST_SEQ = 1 << 48
"""The largest sequence number accepted as the first one seen from a sender incarnation."""

DEFAULT_SUBSCRIPTION_MAXSIZE = 10_000
"""Buffer of a subscription when ``maxsize`` is not given, events (``Config.subscriber_buffer``)."""


class BusClosed(Closed):
    """The bus is closed (an :class:`~elasticep.errors.Closed`)."""

    def __init__(self, message: str = "bus is closed") -> None:
        super().__init__("bus", message)


class BusNotStarted(NotStarted, BusClosed):
    """The bus was used before ``start()`` (an :class:`~elasticep.errors.NotStarted`).

    Also a :class:`BusClosed`, which is what earlier releases raised here, so existing
    ``except BusClosed`` clauses still catch it.
    """

    def __init__(self, message: str = "bus is not started yet: await bus.start() (or use `async with`) first") -> None:
        NotStarted.__init__(self, "bus", message)


class NotAnEventType(ElasticEPError, TypeError):
    """An object that is neither an elasticep event nor a type registered on this bus with
    :meth:`EventBus.register_event_type` was published or subscribed to (a ``TypeError``)."""


MAX_KIND_CHARS = 128
"""Longest ``kind`` name of a user-defined event type."""


@dataclass(frozen=True)
class SubscriptionStatistics:
    """A snapshot of one subscription (anyio's ``statistics()`` convention)."""

    name: str
    queued: int
    """Envelopes waiting in the buffer."""
    maxsize: int
    """Buffer bound, envelopes."""
    dropped: int
    """Envelopes lost to the overflow policy since the subscription opened."""
    delivered: int
    """Envelopes handed to the consumer since the subscription opened."""
    overflow: str
    closed: bool


@dataclass(frozen=True)
class BusStatistics:
    """A snapshot of one bus's counters (the process-wide totals are in :mod:`elasticep.metrics`)."""

    published: int
    received: int
    """Envelopes accepted from the transport (not counting duplicates and refusals)."""
    duplicates: int
    gaps: int
    """Gap reports (each covers one or more lost envelopes)."""
    lost: int
    """Envelopes lost in gaps."""
    refused: dict[str, int]
    """Refused frames by reason, duplicates included."""
    senders: dict[int, tuple[int, int]]
    """Per sender rank: ``(incarnation, last accepted seq)``, the higher of its two numberings
    (heartbeats are numbered apart from its other events)."""


class Subscription:
    """A bounded buffer of envelopes from an :class:`EventBus`; an async iterator.

    Made by :meth:`EventBus.subscribe`. ``receive_nowait`` holds the logic; ``receive`` waits on
    it; ``async for env in sub`` ends when the subscription or the bus is closed and the buffer
    is drained. Several tasks may receive from one subscription; each envelope goes to one.

    Overflow policy when ``maxsize`` envelopes are queued and another arrives:

    * ``"drop_oldest"`` (default): the oldest queued envelope is dropped. The receive loop never
      waits, and the consumer sees the most recent state; right for heartbeats and monitors.
    * ``"drop_newest"``: the arriving envelope is dropped; the consumer sees a prefix.
    * ``"block"``: the bus waits for room. That stalls the bus's receive loop for every
      subscriber (and ``publish`` on this rank), ZeroMQ then drops at its high-water mark and
      the gaps are reported: use only for a consumer that must see everything and keeps up.
      A :class:`~elasticep.events.SequenceGap` report is queued even past the bound (a loss
      report is never itself lost), so the buffer can briefly hold ``maxsize + 1``.

    Drops are counted in ``statistics().dropped`` and in
    ``elasticep_subscriber_dropped_total{subscription=name}``.
    """

    def __init__(
        self,
        bus: "EventBus",
        types: frozenset[type] | None,
        maxsize: int,
        overflow: str,
        name: str,
    ) -> None:
        self._bus = bus
        self.types = types
        """Event types delivered, or ``None`` for all."""
        self.maxsize = maxsize
        self.overflow = overflow
        self.name = name
        self._buffer: collections.deque[Envelope] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._space_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._dropped = 0
        self._delivered = 0
        self._closed = False
        self._drop_counter = metrics.SUBSCRIBER_DROPPED.labels(name)
        # Read at scrape time, so the hot path pays nothing for the gauge.
        metrics.QUEUE_DEPTH.labels(name).set_function(self._buffer.__len__)

    def __repr__(self) -> str:
        return f"Subscription(name={self.name!r}, queued={len(self._buffer)}, maxsize={self.maxsize})"

    # --- producer side (the bus) -------------------------------------------------------------

    def _offer(self, env: Envelope) -> bool:
        """Queue ``env`` under the overflow policy; ``False`` only for ``block`` when full."""
        buffer = self._buffer
        if len(buffer) < self.maxsize and not self._closed:
            buffer.append(env)
            if self._waiters:
                self._wake_one(self._waiters)
            return True
        if self._closed:
            return True
        if self.overflow == "drop_oldest":
            buffer.popleft()
        elif self.overflow == "drop_newest":
            self._dropped += 1
            self._drop_counter.inc()
            return True
        else:
            return False
        self._dropped += 1
        self._drop_counter.inc()
        buffer.append(env)
        if self._waiters:
            self._wake_one(self._waiters)
        return True

    @staticmethod
    def _wake_one(waiters: collections.deque[asyncio.Future[None]]) -> None:
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _push(self, env: Envelope) -> bool:
        """Queue ``env`` even past ``maxsize`` (for ``block`` subscriptions, by the bus only)."""
        if not self._closed:
            self._buffer.append(env)
            if self._waiters:
                self._wake_one(self._waiters)
        return True

    def _full(self) -> bool:
        return len(self._buffer) >= self.maxsize and not self._closed

    async def _wait_space(self) -> None:
        """Wait until a ``block`` subscription has room (or is closed)."""
        while self._full():
            waiter = asyncio.get_running_loop().create_future()
            self._space_waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()

    # --- consumer side -----------------------------------------------------------------------

    def receive_nowait(self) -> Envelope:
        """The next envelope, without waiting.

        Raises:
            anyio.WouldBlock: nothing is queued.
            anyio.EndOfStream: the subscription is closed and drained.
        """
        if self._buffer:
            env = self._buffer.popleft()
            self._delivered += 1
            if self._space_waiters:
                self._wake_one(self._space_waiters)
            return env
        if self._closed:
            raise EndOfStream
        raise WouldBlock

    async def receive(self) -> Envelope:
        """The next envelope, waiting for one. Raises ``anyio.EndOfStream`` once closed and drained."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            raise EndOfStream from None

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self

    async def __anext__(self) -> Envelope:
        # The waiting logic lives here, not in receive(): ``async for`` is the path every
        # event's latency takes, and this keeps it one coroutine frame deep.
        buffer = self._buffer
        while not buffer:  # under load the buffer is rarely empty: straight to the pop
            if self._closed:
                raise StopAsyncIteration
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and buffer:
                    self._wake_one(self._waiters)  # we were picked to take an envelope: pass it on
                raise
            # Woken with an envelope, or by close(); or another receiver took it: loop.
        env = buffer.popleft()
        self._delivered += 1
        if self._space_waiters:
            self._wake_one(self._space_waiters)
        return env

    def statistics(self) -> SubscriptionStatistics:
        return SubscriptionStatistics(
            name=self.name,
            queued=len(self._buffer),
            maxsize=self.maxsize,
            dropped=self._dropped,
            delivered=self._delivered,
            overflow=self.overflow,
            closed=self._closed,
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop receiving new envelopes. Queued ones can still be read; then iteration ends."""
        if self._closed:
            return
        self._closed = True
        self._bus._unsubscribe(self)
        metrics.QUEUE_DEPTH.labels(self.name).set_function(lambda: 0.0)
        for waiter in (*self._waiters, *self._space_waiters):
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()
        self._space_waiters.clear()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class EventBus:
    """Typed events between ranks: ``publish`` to every peer, ``subscribe`` to what arrives.

    Args:
        transport: carries frames (:class:`~elasticep.bus.InProcessNetwork` transports in tests,
            :class:`~elasticep.bus.ZmqTransport` between processes). The bus owns it: ``close``
            closes it.
        rank: this rank; must equal ``transport.rank``.
        epoch: the view epoch stamped on outgoing envelopes; membership updates :attr:`epoch`.
        codec: the codec to use (one per process is enough); a new one by default.
        subscriber_maxsize: default buffer of a subscription, envelopes.

    Use from one asyncio event loop. ``async with EventBus(...) as bus`` starts and closes it.
    """

    @metrics.counts_refusals("bus")
    def __init__(
        self,
        transport: Transport,
        rank: int,
        *,
        epoch: int = 0,
        codec: Codec | None = None,
        subscriber_maxsize: int = DEFAULT_SUBSCRIPTION_MAXSIZE,
    ) -> None:
        if not (callable(getattr(transport, "send", None)) and hasattr(transport, "rank")):
            raise InvalidArgument(f"transport must be an elasticep Transport, not {type(transport).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < -1:
            # -1: a read-only monitor's bus (ZmqTransport.monitor, MONITOR_RANK)
            raise InvalidArgument(f"rank must be an int >= 0 (or -1 for a monitor), not {rank!r}")
        if transport.rank != rank:
            raise InvalidArgument(f"transport is for rank {transport.rank}, bus for rank {rank}")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise InvalidArgument(f"epoch must be an int >= 0, not {epoch!r}")
        if not isinstance(subscriber_maxsize, int) or isinstance(subscriber_maxsize, bool) or subscriber_maxsize < 1:
            raise InvalidArgument(f"subscriber_maxsize must be an int >= 1, not {subscriber_maxsize!r}")
        if codec is not None and not isinstance(codec, Codec):
            raise InvalidArgument(f"codec must be an elasticep.events.Codec or None, not {type(codec).__name__}")
        self.transport = transport
        self.rank = rank
        self._epoch = epoch
        self.codec = codec if codec is not None else Codec()
        self._encode = self.codec.encoder.encode
        self.subscriber_maxsize = subscriber_maxsize
        self._seq = 0
        self._beat_seq = 0  # heartbeats are numbered apart (a peer may not subscribe to them)
        self._subscriptions: list[Subscription] = []
        self._routes: dict[type, tuple[Subscription, ...]] = {t: () for t in EVENT_TYPES}
        # User-defined event types (register_event_type): kind <-> type, one decoder per kind,
        # and the subscriptions that name each type.
        self._user_types: dict[type, str] = {}
        self._user_kinds: dict[str, tuple[type, msgspec.msgpack.Decoder]] = {}
        self._user_routes: dict[type, tuple[Subscription, ...]] = {}
        self._user_encoder = msgspec.msgpack.Encoder()
        # Per sender rank: [incarnation, next expected seq of its events, of its heartbeats]
        # (0: none seen yet from this incarnation).
        self._tracks: dict[int, list[int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._state = "new"
        self._duplicates = 0
        self._gaps = 0
        self._lost = 0
        self._refused: collections.Counter[str] = collections.Counter()
        # Per event type, cumulative; plain ints on the hot paths, summed when metrics are
        # scraped (elasticep_events_published_total / elasticep_events_received_total).
        self._published_counts: dict[type, int] = {}
        self._received_counts: dict[type, int] = {}
        metrics.EVENTS_PUBLISHED.track(self, EventBus._published_by_tag)
        metrics.EVENTS_RECEIVED.track(self, EventBus._received_by_tag)
        self._sender_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        self._outbox_beats = True  # every frame in the outbox is a heartbeat
        self._flush_scheduled = False
        self._send = self.transport.send
        # a transport that can send heartbeats under a topic of their own (so that peers which
        # take them elsewhere are not sent them) has send_beats; any other sends them as events
        self._send_beats = getattr(self.transport, "send_beats", None) or self.transport.send_many
        self._has_block = False
        self._stall_task: asyncio.Task[None] | None = None
        self._push = False
        self._handlers: tuple[Callable[[list[Envelope]], None], ...] = ()
        self.handler_errors = 0
        """Exceptions raised by handlers (:meth:`add_handler`), each logged."""

    def __repr__(self) -> str:
        return f"EventBus(rank={self.rank}, epoch={self._epoch}, state={self._state})"

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the transport and the receive task."""
        if self._state != "new":
            raise BusClosed(f"bus is {self._state}; a bus starts once (make a new EventBus to start again)")
        self._sender_event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        # Push delivery where the transport offers it (no task hop per batch), else a pull task.
        self._push = self.transport.set_receiver(self._on_frames)
        await self.transport.start()
        self._state = "running"
        if not self._push:
            self._task = asyncio.get_running_loop().create_task(
                self._receive_loop(), name=f"elasticep-bus-rank{self.rank}"
            )

    async def close(self) -> None:
        """Stop receiving, close the transport and end every subscription (queued envelopes stay
        readable). Idempotent."""
        if self._state == "closed":
            return
        if self._state == "running":
            self._flush()  # what was published before close still goes out
        self._state = "closed"
        for task in (self._task, self._stall_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._task = self._stall_task = None
        await self.transport.close()
        for sub in list(self._subscriptions):
            sub.close()
        metrics.EVENTS_PUBLISHED.retire(self)
        metrics.EVENTS_RECEIVED.retire(self)

    async def __aenter__(self) -> "EventBus":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def running(self) -> bool:
        return self._state == "running"

    def _not_running(self) -> BusClosed:
        return BusNotStarted() if self._state == "new" else BusClosed()

    # --- epoch -------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """View epoch stamped on every envelope this bus sends. Membership sets it; it never
        goes down (``ValueError``)."""
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidArgument(f"epoch must be an int, not {value!r}")
        if value < self._epoch:
            raise InvalidArgument(f"epoch cannot go back from {self._epoch} to {value}")
        self._epoch = int(value)

    # --- publish -----------------------------------------------------------------------------

    def _envelope(self, event: Event) -> Envelope:
        """The wire envelope of ``event`` (a registered user event travels as its ``Custom``)."""
        if type(event) not in EVENT_TAGS:
            event = self._wrap_user(event)
        event, seq = self._numbered(event)
        return Envelope(SCHEMA_VERSION, self.rank, self._epoch, seq, time.time_ns(), time.monotonic_ns(), event)

    def _numbered(self, event: Event) -> tuple[Event, int]:
        """The next sequence number for ``event``: heartbeats are numbered apart, and each names
        the last other event sent (a receiver checks it has it)."""
        if type(event) is Heartbeat:
            self._beat_seq += 1
            if event.events != self._seq:
                event = msgspec.structs.replace(event, events=self._seq)
            return event, self._beat_seq
        self._seq += 1
        return event, self._seq

    def publish_nowait(self, event: Event) -> Envelope:
        """Publish without waiting; returns the envelope sent.

        Raises:
            anyio.WouldBlock: a ``block``-policy local subscription for this type is full
                (nothing was sent).
            BusNotStarted: ``start()`` was not awaited yet.
            BusClosed: the bus is closed.
            EventTooLarge: the encoded frame exceeds ``codec.max_frame_bytes`` (nothing sent).
        """
        if self._state != "running":
            raise self._not_running()
        t = type(event)
        subs = self._routes.get(t)
        if subs is None:
            return self._publish_user(event)
        if self._has_block:
            for sub in subs:
                if sub.overflow == "block" and sub._full():
                    raise WouldBlock
        beat = t is Heartbeat
        event, seq = self._numbered(event)
        env = Envelope(SCHEMA_VERSION, self.rank, self._epoch, seq, time.time_ns(), time.monotonic_ns(), event)
        frame = self._encode(env)
        if len(frame) > self.codec.max_frame_bytes:
            # every peer would refuse it as oversize while local subscribers got it: refuse here
            if beat:
                self._beat_seq = seq - 1
            else:
                self._seq = seq - 1
            metrics.FRAMES_REFUSED.labels("oversize_publish").inc()
            raise EventTooLarge(EVENT_TAGS[t], len(frame), self.codec.max_frame_bytes)
        counts = self._published_counts
        counts[t] = counts.get(t, 0) + 1
        self._queue_frame(frame, beat)
        for sub in subs:
            sub._offer(env)
        if self._handlers:
            self._run_handlers([env])
        return env

    def _not_an_event(self, t: type) -> NotAnEventType:
        exc = NotAnEventType(f"{t.__name__} is not an elasticep event type, nor a type registered on this bus "
                             "(bus.register_event_type)")
        metrics.count_refusal("bus", exc)
        return exc

    def _wrap_user(self, event: object) -> Custom:
        """The ``Custom`` that carries a registered user event on the wire."""
        kind = self._user_types.get(type(event))
        if kind is None:
            raise self._not_an_event(type(event))
        return Custom(kind=kind, data=msgspec.Raw(self._user_encoder.encode(event)))

    def _publish_user(self, event: object) -> Envelope:
        """``publish_nowait`` of a registered user event: sent as a ``Custom``; this rank's
        subscribers of the type get ``event`` itself, those of ``Custom`` (or all) the ``Custom``."""
        wire_event = self._wrap_user(event)
        custom_subs = self._routes[Custom]
        if self._has_block:
            for sub in custom_subs:
                if sub.overflow == "block" and sub._full():
                    raise WouldBlock
        self._seq = seq = self._seq + 1
        wall, mono = time.time_ns(), time.monotonic_ns()
        wire = Envelope(SCHEMA_VERSION, self.rank, self._epoch, seq, wall, mono, wire_event)
        frame = self._encode(wire)
        if len(frame) > self.codec.max_frame_bytes:
            self._seq = seq - 1
            metrics.FRAMES_REFUSED.labels("oversize_publish").inc()
            raise EventTooLarge(wire_event.kind, len(frame), self.codec.max_frame_bytes)
        self._published_counts[Custom] = self._published_counts.get(Custom, 0) + 1
        self._queue_frame(frame)
        for sub in custom_subs:
            sub._offer(wire)
        if self._handlers:
            self._run_handlers([wire])
        env = Envelope(SCHEMA_VERSION, self.rank, self._epoch, seq, wall, mono, event)
        for sub in self._user_routes.get(type(event), ()):
            sub._offer(env) or sub._push(env)
        return env

    # --- user-defined event types ------------------------------------------------------------

    @metrics.counts_refusals("bus")
    def register_event_type(self, event_type: type, *, kind: str | None = None) -> str:
        """Carry ``event_type``, a frozen ``msgspec.Struct`` of the application's, on this bus.

        ``kind`` names it on the wire (default: the struct's ``tag`` if it has a string one, else
        its class name); every rank that sends or receives it registers the same type under the
        same kind. Afterwards ``publish`` takes its instances and ``subscribe(event_type)``
        yields envelopes whose ``event`` is one. Returns the kind. Registering the same type
        under the same kind again is a no-op; anything else that clashes, a type that is not a
        ``msgspec.Struct``, or one of elasticep's own event types, raises
        :class:`~elasticep.errors.InvalidArgument`.
        """
        if not (isinstance(event_type, type) and issubclass(event_type, msgspec.Struct)):
            raise InvalidArgument(f"a user event type is a msgspec.Struct subclass, not {event_type!r}")
        if event_type in EVENT_TAGS:
            raise InvalidArgument(f"{event_type.__name__} is an elasticep event type already; register your own types")
        if kind is None:
            tag = event_type.__struct_config__.tag
            kind = tag if isinstance(tag, str) else event_type.__name__
        if not isinstance(kind, str) or not kind or len(kind) > MAX_KIND_CHARS:
            raise InvalidArgument(f"kind must be a non-empty str of at most {MAX_KIND_CHARS} characters, not {kind!r}")
        if self._user_types.get(event_type) == kind:
            return kind
        if event_type in self._user_types:
            raise InvalidArgument(f"{event_type.__name__} is registered as kind {self._user_types[event_type]!r} already")
        if kind in self._user_kinds:
            raise InvalidArgument(f"kind {kind!r} is registered for {self._user_kinds[kind][0].__name__} already")
        self._user_types[event_type] = kind
        self._user_kinds[kind] = (event_type, msgspec.msgpack.Decoder(event_type))
        self._rebuild_routes()
        return kind

    def event_types(self) -> dict[str, type]:
        """The user-defined event types registered on this bus, by kind."""
        return {kind: t for kind, (t, _) in self._user_kinds.items()}

    def _deliver_user(self, env: Envelope) -> None:
        """A ``Custom`` of a registered kind arrived: decode it for the type's subscribers."""
        entry = self._user_kinds.get(env.event.kind)
        if entry is None:
            return
        t, decoder = entry
        subs = self._user_routes.get(t)
        if not subs:
            return
        try:
            event = decoder.decode(env.event.data)
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            log.warning("bus rank %d: a %r event from rank %d does not decode as %s: %s",
                        self.rank, env.event.kind, env.sender, t.__name__, exc)
            self._refuse("bad_user_event", env.sender)
            return
        user_env = Envelope(env.schema, env.sender, env.epoch, env.seq, env.wall_ns, env.mono_ns, event)
        for sub in subs:
            sub._offer(user_env) or sub._push(user_env)

    def _queue_frame(self, frame: bytes, beat: bool = False) -> None:
        if not self._flush_scheduled:
            # The first frame published in an event-loop iteration leaves at once (a lone event
            # waits for nothing); frames published after it in the same iteration leave together
            # at its end (one transport call, one ZeroMQ message), so a burst shares the
            # per-message cost.
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush_scheduled_cb)
            try:
                if beat:
                    self._send_beats([frame])
                else:
                    self._send(frame)
            except TransportClosed:
                log.warning("bus rank %d: event not sent, transport closed", self.rank)
            return
        self._outbox.append(frame)
        self._outbox_bytes += len(frame)
        self._outbox_beats = self._outbox_beats and beat
        if self._outbox_bytes >= _FLUSH_BYTES:
            self._flush()

    def _flush_scheduled_cb(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        """Hand queued frames to the transport, as one call."""
        if self._outbox:
            frames, self._outbox, self._outbox_bytes = self._outbox, [], 0
            beats, self._outbox_beats = self._outbox_beats, True
            try:
                if beats:
                    self._send_beats(frames)
                else:
                    self.transport.send_many(frames)
            except TransportClosed:
                log.warning("bus rank %d: %d events not sent, transport closed", self.rank, len(frames))

    @staticmethod
    def _published_by_tag(bus: "EventBus") -> dict[str, int]:
        return {EVENT_TAGS[t]: n for t, n in dict(bus._published_counts).items()}

    @staticmethod
    def _received_by_tag(bus: "EventBus") -> dict[str, int]:
        return {EVENT_TAGS[t]: n for t, n in dict(bus._received_counts).items()}

    async def publish(self, event: Event) -> Envelope:
        """Send ``event`` to every peer and deliver it to this rank's subscribers.

        Returns the envelope. Waits only when a ``block``-policy local subscription is full;
        the network send itself never waits (the transport drops past its high-water mark).
        The frame leaves at the end of the current event-loop iteration, together with every
        other event published in it (or at once when 256 KiB are queued).
        """
        if self._state != "running":
            raise self._not_running()
        if self._has_block:
            t = type(event)
            for sub in self._routes.get(Custom if t in self._user_types else t, ()):
                if sub.overflow == "block":
                    await sub._wait_space()
        return self.publish_nowait(event)

    def publish_many(self, events: Iterable[Event]) -> list[Envelope]:
        """Publish several events in order, without waiting.

        Local ``block`` subscriptions that are full get the usual ``drop_oldest`` treatment
        here rather than stalling a synchronous caller.
        """
        if self._state != "running":
            raise self._not_running()
        encode = self.codec.encode
        events = list(events)
        seq0, beat_seq0 = self._seq, self._beat_seq
        try:
            envs = [self._envelope(e) for e in events]
        except NotAnEventType:
            self._seq, self._beat_seq = seq0, beat_seq0
            raise
        frames = [encode(env) for env in envs]
        limit = self.codec.max_frame_bytes
        for env, frame in zip(envs, frames):
            if len(frame) > limit:  # nothing of the batch is sent
                self._seq, self._beat_seq = seq0, beat_seq0
                metrics.FRAMES_REFUSED.labels("oversize_publish").inc()
                ev = env.event
                raise EventTooLarge(ev.kind if isinstance(ev, Custom) else EVENT_TAGS[type(ev)], len(frame), limit)
        counts = self._published_counts
        out = []
        for event, env, frame in zip(events, envs, frames):
            t = type(env.event)
            counts[t] = counts.get(t, 0) + 1
            self._queue_frame(frame, t is Heartbeat)
            for sub in self._routes.get(t, ()):
                if not sub._offer(env):
                    sub._buffer.popleft()
                    sub._dropped += 1
                    sub._drop_counter.inc()
                    sub._push(env)
            if event is not env.event:  # a user event: its own subscribers get it decoded
                env = Envelope(env.schema, env.sender, env.epoch, env.seq, env.wall_ns, env.mono_ns, event)
                for sub in self._user_routes.get(type(event), ()):
                    sub._offer(env) or sub._push(env)
            out.append(env)
        return out

    # --- subscribe ---------------------------------------------------------------------------

    @metrics.counts_refusals("bus")
    def subscribe(
        self,
        *event_types: type,
        maxsize: int | None = None,
        overflow: Overflow = "drop_oldest",
        name: str | None = None,
    ) -> Subscription:
        """A subscription to envelopes whose event is one of ``event_types`` (all when none given).

        ``maxsize`` bounds the buffer (default ``subscriber_maxsize``); ``overflow`` is the policy
        when it is full (see :class:`Subscription`); ``name`` labels its metrics (default: the
        event tags joined by ``+``, or ``"all"``).
        """
        for t in event_types:
            if t not in EVENT_TAGS and t not in self._user_types:
                if isinstance(t, type):
                    raise self._not_an_event(t)
                raise NotAnEventType(f"{t!r} is not an event type")
        if overflow not in OVERFLOW_POLICIES:
            raise InvalidArgument(f"overflow must be one of {OVERFLOW_POLICIES}, not {overflow!r}")
        if overflow == "block" and any(t in self._user_types for t in event_types):
            raise InvalidArgument("overflow='block' is for elasticep's own event types; a user event type "
                                  "subscription drops (drop_oldest or drop_newest)")
        size = self.subscriber_maxsize if maxsize is None else maxsize
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise InvalidArgument(f"maxsize must be an int >= 1, not {size!r}")
        if name is not None and not isinstance(name, str):
            raise InvalidArgument(f"name must be a str or None, not {name!r}")
        if self._state == "closed":
            raise BusClosed("bus is closed")
        if name is None:
            name = "+".join(EVENT_TAGS.get(t) or self._user_types[t] for t in event_types) or "all"
        sub = Subscription(self, frozenset(event_types) or None, size, overflow, name)
        self._subscriptions.append(sub)
        self._rebuild_routes()
        return sub

    def add_handler(self, handler: Callable[[list[Envelope]], None]) -> Callable[[], None]:
        """Call ``handler`` with every batch of envelopes the bus delivers, synchronously, in
        order, on the event loop: the envelopes of one transport read (after the same checks
        and sequencing as for subscriptions), and each one this rank publishes, alone. Returns
        a function that removes it.

        For a consumer that must never fall behind and must not pay a task switch per batch
        (the membership core's heartbeats); there is no buffer, so nothing is dropped, and a
        handler must not block. An exception it raises is logged and counted
        (:attr:`handler_errors`); the bus goes on.
        """
        if not callable(handler):
            raise InvalidArgument(f"handler must be callable, not {handler!r}")
        if self._state == "closed":
            raise BusClosed("bus is closed")
        self._handlers = self._handlers + (handler,)

        def remove() -> None:
            self._handlers = tuple(h for h in self._handlers if h is not handler)

        return remove

    def _run_handlers(self, batch: list[Envelope]) -> None:
        for handler in self._handlers:
            try:
                handler(batch)
            except Exception:
                self.handler_errors += 1
                log.exception("bus rank %d: a handler raised on %d envelope(s)", self.rank, len(batch))

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscriptions:
            self._subscriptions.remove(sub)
            self._rebuild_routes()

    def _rebuild_routes(self) -> None:
        self._routes = {
            t: tuple(s for s in self._subscriptions if s.types is None or t in s.types) for t in EVENT_TYPES
        }
        # user types go only to subscriptions that name them (the rest get the raw Custom)
        self._user_routes = {
            t: tuple(s for s in self._subscriptions if s.types is not None and t in s.types) for t in self._user_types
        }
        self._has_block = any(s.overflow == "block" for s in self._subscriptions)

    # --- receive -----------------------------------------------------------------------------

    def _refuse(self, reason: str, sender: int | None) -> None:
        self._refused[reason] += 1
        metrics.FRAMES_REFUSED.labels(reason).inc()

    def _blocked_by(self, event_type: type) -> Subscription | None:
        """A full ``block`` subscription that an envelope of ``event_type`` would go to, if any."""
        for sub in self._routes[event_type]:
            if sub.overflow == "block" and sub._full():
                return sub
        return None

    def _accept(self, frames: list[Frame], start: int) -> tuple[int, Subscription] | None:
        """Decode, order and deliver ``frames[start:]``; the receive path's whole logic.

        Synchronous, so a transport can call it straight from its reader callback. Returns
        ``None`` when every frame was handled, or ``(index, subscription)`` when frame ``index``
        must wait for room in a full ``block`` subscription; nothing about that frame has been
        recorded yet, so calling again from ``index`` once there is room is exact.
        """
        decode = self.codec.decode
        tracks = self._tracks
        routes = self._routes
        counts = self._received_counts
        has_block = self._has_block
        handled: list[Envelope] | None = [] if self._handlers else None
        for index in range(start, len(frames)):
            sender, incarnation, data = frames[index]
            try:
                env = decode(data, authenticated_sender=sender)
            except FrameRefused as exc:
                self._refuse(exc.reason, sender)
                continue
            except Exception:
                # The codec promises only FrameRefused; anything else is still bad input.
                log.exception("bus rank %d: decoder raised on a frame from rank %d", self.rank, sender)
                self._refuse("malformed", sender)
                continue
            seq = env.seq
            t = type(env.event)
            stream = 2 if t is Heartbeat else 1  # heartbeats are numbered apart from the rest
            track = tracks.get(sender)
            gap_from = 0
            if track is None or incarnation > track[0]:
                if seq > MAX_FIRST_SEQ:
                    self._refuse("seq_out_of_bounds", sender)
                    continue
                new_sender = True
            elif incarnation < track[0]:
                self._refuse("stale_incarnation", sender)
                continue
            else:
                new_sender = False
                expected = track[stream]
                if expected == 0:  # the first of this stream from this incarnation
                    if seq > MAX_FIRST_SEQ:
                        self._refuse("seq_out_of_bounds", sender)
                        continue
                elif seq != expected:
                    if seq < expected:
                        self._duplicates += 1
                        self._refuse("duplicate", sender)
                        continue
                    if seq - expected > MAX_SEQ_JUMP:
                        self._refuse("seq_out_of_bounds", sender)
                        continue
                    gap_from = expected
            if has_block:
                blocked = self._blocked_by(t)
                if blocked is not None:
                    if handled:
                        self._run_handlers(handled)
                    return index, blocked
            if new_sender:
                track = tracks[sender] = [incarnation, 0, 0]
                track[stream] = seq + 1
                assert self._sender_event is not None
                self._sender_event.set()
            else:
                assert track is not None
                track[stream] = seq + 1
                if gap_from:
                    gap = self._report_gap(sender, gap_from, seq)
                    if handled is not None:
                        handled.append(gap)
            if stream == 2:
                # the beat names the last other event its sender sent: any not here were lost
                sent = env.event.events
                if track[1] == 0:
                    if 0 <= sent <= MAX_FIRST_SEQ:
                        track[1] = sent + 1
                elif sent >= track[1] and sent - track[1] < MAX_SEQ_JUMP:
                    gap = self._report_gap(sender, track[1], sent + 1)
                    track[1] = sent + 1
                    if handled is not None:
                        handled.append(gap)
            counts[t] = counts.get(t, 0) + 1
            for sub in routes[t]:
                # Room was checked above; only a gap report just queued can have taken it.
                sub._offer(env) or sub._push(env)
            if t is Custom and self._user_kinds:
                self._deliver_user(env)
            if handled is not None:
                handled.append(env)
        if handled:
            self._run_handlers(handled)
        return None

    def _report_gap(self, sender: int, expected: int, got: int) -> Envelope:
        lost = got - expected
        self._gaps += 1
        self._lost += lost
        metrics.SEQUENCE_GAPS.labels(str(sender)).inc(lost)
        log.warning("bus rank %d: lost %d events from rank %d (seq %d..%d)", self.rank, lost, sender, expected, got - 1)
        gap = SequenceGap(sender=sender, expected=expected, got=got)
        env = Envelope(SCHEMA_VERSION, self.rank, self._epoch, 0, time.time_ns(), time.monotonic_ns(), gap)
        for sub in self._routes[SequenceGap]:
            # A loss report is never itself lost: past a ``block`` bound it is queued anyway.
            sub._offer(env) or sub._push(env)
        return env

    def _on_frames(self, frames: list[Frame]) -> None:
        """Push-mode entry: the transport calls this from its reader callback."""
        if self._state == "closed":
            return
        stalled = self._accept(frames, 0)
        if stalled is not None:
            # Stop reading (ZeroMQ then queues, and past its high-water mark drops: a gap), and
            # let a task finish this batch once the subscription has room.
            self.transport.pause_receiving()
            assert self._loop is not None
            self._stall_task = self._loop.create_task(self._finish_stalled(frames, *stalled))

    async def _finish_stalled(self, frames: list[Frame], index: int, sub: Subscription) -> None:
        stalled: tuple[int, Subscription] | None = (index, sub)
        while stalled is not None:
            await stalled[1]._wait_space()
            stalled = self._accept(frames, stalled[0])
        self._stall_task = None
        self.transport.resume_receiving()

    async def _receive_loop(self) -> None:
        """Pull-mode driver, for transports without push delivery (the in-process network)."""
        transport = self.transport
        while True:
            try:
                frames = await transport.receive()
            except TransportClosed:
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                # A transport fault must not end the bus; back off so it cannot spin.
                log.exception("bus rank %d: transport receive failed", self.rank)
                await asyncio.sleep(0.01)
                continue
            stalled = self._accept(frames, 0)
            while stalled is not None:
                await stalled[1]._wait_space()
                stalled = self._accept(frames, stalled[0])

    def set_beats(self, rank: int, wanted: bool) -> bool:
        """Whether to receive ``rank``'s heartbeats (default True), on a transport that can
        leave them out (:meth:`ZmqTransport.set_beats <elasticep.bus.ZmqTransport.set_beats>`);
        its other events keep coming. For a peer whose beats this rank reads elsewhere (the host
        board). Taken back, the beats resume without a gap report for the ones left out.
        Returns False (and changes nothing) on a transport that cannot."""
        set_beats = getattr(self.transport, "set_beats", None)
        if set_beats is None:
            return False
        if wanted:
            track = self._tracks.get(rank)
            if track is not None:
                track[2] = 0  # the next beat starts the count again: the skipped ones were not lost
        set_beats(rank, wanted)
        return True

    # --- introspection -----------------------------------------------------------------------

    def heard_from(self) -> set[int]:
        """Ranks this bus has accepted at least one envelope from."""
        return set(self._tracks)

    async def wait_heard_from(self, ranks: Iterable[int], timeout: float) -> None:
        """Wait until an envelope from each of ``ranks`` has arrived (bounded by ``timeout`` s).

        Raises :class:`~elasticep.errors.WaitTimeout` (a ``TimeoutError``) naming the ranks still
        silent, :class:`BusNotStarted` before ``start()``.
        """
        try:
            wanted = set(ranks) - {self.rank}
        except TypeError:
            raise InvalidArgument(f"ranks must be a collection of rank ids, not {ranks!r}") from None
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout >= 0:
            raise InvalidArgument(f"timeout must be a number of seconds >= 0, not {timeout!r}")
        if self._sender_event is None:
            raise self._not_running()
        deadline = asyncio.get_running_loop().time() + timeout
        while not wanted <= self._tracks.keys():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                silent = sorted(wanted - self._tracks.keys())
                raise WaitTimeout(f"rank {self.rank} to hear from ranks {silent}", timeout,
                                  f"nothing arrived from {silent}")
            self._sender_event.clear()
            try:
                await asyncio.wait_for(self._sender_event.wait(), left)
            except asyncio.TimeoutError:
                pass

    def statistics(self) -> BusStatistics:
        return BusStatistics(
            published=sum(self._published_counts.values()),
            received=sum(self._received_counts.values()),
            duplicates=self._duplicates,
            gaps=self._gaps,
            lost=self._lost,
            refused=dict(self._refused),
            senders={r: (t[0], max(t[1], t[2], 1) - 1) for r, t in self._tracks.items()},
        )

    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions)
