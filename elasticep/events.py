"""Every event elasticep carries, as frozen ``msgspec.Struct`` types in one tagged union.

An event travels inside an :class:`Envelope` that says who sent it, under which view epoch, with
which per-sender sequence number and when. Frames on the wire are msgpack arrays::

    [schema, sender, epoch, seq, wall_ns, mono_ns, event]

:class:`Codec` holds the one encoder and the decoders, built once. Decoding never raises anything
but a subclass of :class:`FrameRefused`, whose ``reason`` names a metric label, so a receive loop
can count and drop bad input and keep going.

This module is pure: no sockets, no clocks except in :func:`now_ns` helpers the caller chooses to
use.
"""

from __future__ import annotations

import time
from typing import Literal, Union

import msgspec

from elasticep.errors import ElasticEPError

SCHEMA_VERSION = 1
"""Wire schema this build writes and the newest it reads."""

MAX_FRAME_BYTES = 1 << 20
"""Largest frame the decoder accepts (1 MiB); larger frames are refused as ``oversize``."""

_STRUCT = dict(frozen=True, kw_only=True, omit_defaults=True)


# --- signals ------------------------------------------------------------------------------------


class Heartbeat(msgspec.Struct, tag="heartbeat", **_STRUCT):
    """A rank is alive. Sent every ``Config.heartbeat_interval_ms`` on the bus.

    ``incarnation`` grows each time the rank's process restarts, so a rejoining rank is told
    apart from its dead predecessor. ``step`` is the engine step the rank last finished.
    ``events`` is set by the sending bus: the sequence number of the last other event it sent
    (heartbeats are numbered apart, and a peer may take no heartbeats), so a receiver that
    takes them learns of events it lost even when no later event comes.
    """

    rank: int
    incarnation: int = 0
    step: int = 0
    events: int = 0


class PeerTimeout(msgspec.Struct, tag="peer_timeout", **_STRUCT):
    """A data-plane kernel gave up waiting on ``peer`` and marked it inactive in its mask."""

    observer: int
    peer: int
    op: str  # "dispatch" or "combine" (or a backend's own name)
    layer: int = -1
    waited_us: int = 0


class Suspicion(msgspec.Struct, tag="suspicion", **_STRUCT):
    """``observer`` thinks ``suspect`` may be dead; ``source`` names the signal.

    ``source`` is one of ``"heartbeat"``, ``"kernel"``, ``"transfer"``, ``"collective"``,
    ``"store"``; ``phi`` is the detector's suspicion level where it has one (else 0).
    """

    observer: int
    suspect: int
    source: str
    phi: float = 0.0
    detail: str = ""


class Refute(msgspec.Struct, tag="refute", **_STRUCT):
    """``observer`` withdraws an earlier suspicion of ``suspect`` (it heard from it again)."""

    observer: int
    suspect: int
    source: str


class ProcessExit(msgspec.Struct, tag="process_exit", **_STRUCT):
    """A launcher saw the process of ``rank`` exit. Certain: evicts at once."""

    rank: int
    pid: int = 0
    exitcode: int | None = None
    signal: int | None = None
    incarnation: int = 0


class Gray(msgspec.Struct, tag="gray", **_STRUCT):
    """``rank`` is alive but keeps being late; ``slowness`` is its lateness over the median (>= 1)."""

    rank: int
    observer: int
    slowness: float


class CollectiveError(msgspec.Struct, tag="collective_error", **_STRUCT):
    """A collective (gloo, NCCL, ...) failed on ``observer``; ``peer`` is the rank blamed, if known."""

    observer: int
    op: str
    reason: str
    peer: int = -1


class TransferFailed(msgspec.Struct, tag="transfer_failed", **_STRUCT):
    """Moving expert weights from ``src`` to ``dst`` failed; the executor tries the next source."""

    epoch: int
    src: int
    dst: int
    layer: int
    expert: int
    reason: str
    source_kind: str = "replica"  # "replica", "host", "disk"


class SequenceGap(msgspec.Struct, tag="sequence_gap", **_STRUCT):
    """The bus lost events from ``sender``: sequence numbers ``expected`` .. ``got - 1`` never came."""

    sender: int
    expected: int
    got: int


# --- membership ---------------------------------------------------------------------------------


class JoinRequest(msgspec.Struct, tag="join", **_STRUCT):
    """``rank`` (a restarted rank, or a new one for scale-up) asks to be in the next view."""

    rank: int
    incarnation: int = 0
    endpoint: str = ""


class LeaveRequest(msgspec.Struct, tag="leave", **_STRUCT):
    """``rank`` asks to leave gracefully (scale-down); it keeps serving until evacuated."""

    rank: int
    reason: str = ""


class ViewProposal(msgspec.Struct, tag="view_proposal", **_STRUCT):
    """``proposer`` proposes view ``epoch``; it is binding only once the view store commits it."""

    epoch: int
    members: tuple[int, ...]
    leader: int
    proposer: int
    reason: str = ""


class ViewInstalled(msgspec.Struct, tag="view_installed", **_STRUCT):
    """The view store committed view ``epoch`` and ``rank`` installed it."""

    epoch: int
    members: tuple[int, ...]
    leader: int
    rank: int
    reason: str = ""


class Fenced(msgspec.Struct, tag="fenced", **_STRUCT):
    """``rank`` stopped serving: it is outside the committed view or lost the view store."""

    rank: int
    epoch: int
    reason: str


# --- reconfiguration and data plane ------------------------------------------------------------


class ReconfigPhase(msgspec.Struct, tag="reconfig_phase", **_STRUCT):
    """A phase of the reconfiguration for view ``epoch`` started or ended on ``rank``.

    ``phase`` is one of ``"plan"``, ``"groups"``, ``"weights"``, ``"commit"``, ``"resume"``;
    ``t_ns`` is wall-clock time (``time.time_ns()``) so timelines from many ranks line up.
    """

    epoch: int
    rank: int
    phase: str
    status: Literal["start", "end", "abandoned", "failed"]
    t_ns: int
    detail: str = ""


class TransferEndpoint(msgspec.Struct, tag="transfer_endpoint", **_STRUCT):
    """Where ``rank``'s registered expert buffers live, for peers that copy from or into them.

    ``peer`` is the transfer engine's address (``host:rpc_port``); ``buffers`` maps a buffer
    name to ``(address, nbytes)``.
    """

    rank: int
    epoch: int
    peer: str
    buffers: dict[str, tuple[int, int]]


class ExpertLoad(msgspec.Struct, tag="expert_load", **_STRUCT):
    """Tokens routed to each logical expert since the last report, ``[layers][experts]``."""

    rank: int
    counts: list[list[int]]


class Custom(msgspec.Struct, tag="custom", **_STRUCT):
    """An application-defined event: ``kind`` names it, ``data`` is a msgpack-encoded payload.

    Build it with ``Custom(kind="x", data=msgspec.Raw(msgspec.msgpack.encode(payload)))`` and
    read it with ``msgspec.msgpack.decode(event.data)``; the default is msgpack nil. (A
    ``Raw | None`` field cannot be decoded by msgspec, so absence is nil, not ``None``.)
    """

    kind: str
    data: msgspec.Raw = msgspec.Raw(b"\xc0")


Event = Union[
    Heartbeat,
    PeerTimeout,
    Suspicion,
    Refute,
    ProcessExit,
    Gray,
    CollectiveError,
    TransferFailed,
    SequenceGap,
    JoinRequest,
    LeaveRequest,
    ViewProposal,
    ViewInstalled,
    Fenced,
    ReconfigPhase,
    TransferEndpoint,
    ExpertLoad,
    Custom,
]

EVENT_TYPES: tuple[type, ...] = Event.__args__  # type: ignore[attr-defined]
EVENT_TAGS: dict[type, str] = {t: t.__struct_config__.tag for t in EVENT_TYPES}


class Envelope(msgspec.Struct, array_like=True, frozen=True):
    """One event with its routing header. ``seq`` starts at 1 and grows by 1 per sender."""

    schema: int
    sender: int
    epoch: int
    seq: int
    wall_ns: int
    mono_ns: int
    event: Event


class _Header(msgspec.Struct, array_like=True, frozen=True):
    schema: int
    sender: int
    epoch: int
    seq: int
    wall_ns: int
    mono_ns: int
    event: msgspec.Raw


# --- errors -------------------------------------------------------------------------------------


class FrameRefused(ElasticEPError, ValueError):
    """A frame was refused. ``reason`` is the metric label it is counted under.

    Part of the :class:`~elasticep.errors.ElasticEPError` family (and a ``ValueError``, as before).
    """

    reason = "malformed"

    def __init__(self, message: str, *, sender: int | None = None) -> None:
        super().__init__(message)
        self.sender = sender


class MalformedFrame(FrameRefused):
    """The bytes are not a valid envelope."""

    reason = "malformed"


class UnknownEventType(FrameRefused):
    """The envelope is valid but its event tag is not one this build knows."""

    reason = "unknown_type"


class SchemaTooNew(FrameRefused):
    """The sender writes a newer schema than this build reads."""

    reason = "schema_too_new"


class FrameTooLarge(FrameRefused):
    """The frame is longer than ``MAX_FRAME_BYTES``."""

    reason = "oversize"


class SenderMismatch(FrameRefused):
    """The envelope's sender is not the peer the transport authenticated."""

    reason = "sender_mismatch"


REFUSAL_REASONS: tuple[str, ...] = (
    "malformed",
    "unknown_type",
    "schema_too_new",
    "oversize",
    "sender_mismatch",
    "stale_epoch",
    "duplicate",
    "stale_incarnation",
)


# --- codec --------------------------------------------------------------------------------------


class Codec:
    """Encodes and decodes envelopes; build one per process and reuse it.

    ``max_frame_bytes`` bounds what :meth:`decode` accepts. Thread-safe for decoding;
    encoding reuses one internal buffer and so belongs to one thread at a time.
    """

    def __init__(self, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._encoder = msgspec.msgpack.Encoder()
        self.encoder = self._encoder
        """The msgspec encoder itself: ``codec.encoder.encode(envelope)`` is :meth:`encode`
        without the Python call around it (the bus's publish path uses it)."""
        self._envelope = msgspec.msgpack.Decoder(Envelope)
        self._header = msgspec.msgpack.Decoder(_Header)
        self._event = msgspec.msgpack.Decoder(Event)
        self._tag_probe = msgspec.msgpack.Decoder(dict)

    def encode(self, envelope: Envelope) -> bytes:
        return self._encoder.encode(envelope)

    def encode_event(self, event: Event) -> bytes:
        """Encode a bare event (no envelope), e.g. for the view store."""
        return self._encoder.encode(event)

    def decode_event(self, data: bytes) -> Event:
        try:
            return self._event.decode(data)
        except msgspec.DecodeError as exc:
            raise MalformedFrame(f"bad event: {exc}") from None

    def decode(self, frame: bytes | memoryview, *, authenticated_sender: int | None = None) -> Envelope:
        """Decode one frame; raise a :class:`FrameRefused` subclass for anything not acceptable.

        ``authenticated_sender``, when the transport knows it (from the CURVE key that signed
        the connection), must equal the envelope's ``sender``.
        """
        n = len(frame)
        if n > self.max_frame_bytes:
            raise FrameTooLarge(f"frame of {n} bytes exceeds {self.max_frame_bytes}")
        try:
            env = self._envelope.decode(frame)
        except (msgspec.DecodeError, ValueError, TypeError, OverflowError) as exc:
            env = None
            first_error = exc
        if env is None:
            self._diagnose(frame, first_error)
        assert env is not None
        if env.schema > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"sender {env.sender} writes schema {env.schema}; this build reads <= {SCHEMA_VERSION}",
                sender=env.sender,
            )
        if env.schema < 1 or env.seq < 1 or env.sender < 0 or env.epoch < 0:
            raise MalformedFrame(
                f"header out of range (schema={env.schema}, sender={env.sender}, "
                f"epoch={env.epoch}, seq={env.seq})",
                sender=env.sender,
            )
        if authenticated_sender is not None and env.sender != authenticated_sender:
            raise SenderMismatch(
                f"envelope claims sender {env.sender} but the connection is rank {authenticated_sender}",
                sender=authenticated_sender,
            )
        return env

    def _diagnose(self, frame: bytes | memoryview, error: Exception) -> None:
        """Turn a failed decode into the most specific refusal: schema, tag or plain malformed."""
        try:
            head = self._header.decode(frame)
        except (msgspec.DecodeError, ValueError, TypeError, OverflowError):
            raise MalformedFrame(f"not an envelope: {error}") from None
        if head.schema > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"sender {head.sender} writes schema {head.schema}; this build reads <= {SCHEMA_VERSION}",
                sender=head.sender,
            )
        try:
            body = self._tag_probe.decode(head.event)
        except (msgspec.DecodeError, ValueError, TypeError):
            raise MalformedFrame(f"event is not a map: {error}", sender=head.sender) from None
        tag = body.get("type")
        if isinstance(tag, str) and tag not in _KNOWN_TAGS:
            raise UnknownEventType(f"unknown event type {tag!r}", sender=head.sender)
        raise MalformedFrame(f"bad event: {error}", sender=head.sender)


_KNOWN_TAGS = frozenset(EVENT_TAGS.values())


def event_tag(event_or_type: object) -> str:
    """The wire tag of an event instance or type, e.g. ``"heartbeat"``."""
    t = event_or_type if isinstance(event_or_type, type) else type(event_or_type)
    return EVENT_TAGS[t]


def envelope(event: Event, *, sender: int, epoch: int, seq: int) -> Envelope:
    """Wrap ``event`` with the current wall and monotonic clocks."""
    return Envelope(
        schema=SCHEMA_VERSION,
        sender=sender,
        epoch=epoch,
        seq=seq,
        wall_ns=time.time_ns(),
        mono_ns=time.monotonic_ns(),
        event=event,
    )
