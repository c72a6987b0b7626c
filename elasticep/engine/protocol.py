"""Messages between the launcher's front router and the rank processes, and each rank's spec.

Transport: the launcher binds one ZeroMQ ROUTER socket on loopback; every rank process connects
one DEALER whose identity is ``b"<rank>:<incarnation>"``, so a restarted rank is a new peer and a
late reply from its dead predecessor can be told apart. Every frame is one msgpack-encoded
message from the :data:`ToRank` or :data:`FromRank` union (tagged ``msgspec.Struct``s).

A rank's configuration (:class:`RankSpec`) is not passed on the command line: the launcher
writes it into its ``TCPStore`` under :func:`spec_key` and the rank reads it there at start, so
later keys (bus endpoints and CURVE keys, transfer-engine peers) travel the same way.
"""

from __future__ import annotations

from typing import Union

import msgspec

__all__ = [
    "FaultPlan",
    "drain",
    "RankSpec",
    "Generate",
    "SetFaults",
    "Retire",
    "Hello",
    "Completion",
    "Rejected",
    "Leaving",
    "Goodbye",
    "ToRank",
    "FromRank",
    "ProtocolError",
    "spec_key",
    "identity",
    "parse_identity",
    "encode",
    "decode_to_rank",
    "decode_from_rank",
]

NEVER = -1
"""``at_step`` value meaning the fault is not scheduled."""

_S = dict(frozen=True, kw_only=True, omit_defaults=True)


class FaultPlan(msgspec.Struct, **_S):
    """Faults a rank injects into itself at a step boundary (its own step counter, from 0).

    A field set to ``s >= 0`` fires before the rank runs step ``s`` (at once if it is already
    past it); ``-1`` never. ``kill``: SIGKILL itself. ``hang``: SIGSTOP itself (a ``resume`` from
    the launcher sends SIGCONT). ``mask``: stay alive and connected but take no further part
    (no replies, no steps), like a GPU that stopped answering. ``leave``: retire gracefully.
    ``slow_ms``: sleep this long before every step from ``slow_from_step`` on.
    """

    kill_at_step: int = NEVER
    hang_at_step: int = NEVER
    mask_at_step: int = NEVER
    leave_at_step: int = NEVER
    slow_ms: float = 0.0
    slow_from_step: int = 0

    def merged(self, other: "FaultPlan") -> "FaultPlan":
        """This plan with every field ``other`` sets (non-default) taken from ``other``."""
        values = {f: getattr(self, f) for f in self.__struct_fields__}
        default = FaultPlan()
        for f in other.__struct_fields__:
            v = getattr(other, f)
            if v != getattr(default, f):
                values[f] = v
        return FaultPlan(**values)


class RankSpec(msgspec.Struct, **_S):
    """Everything a rank process needs to start, written by the launcher into the store.

    ``placement`` is :meth:`Placement.to_dict` output; ``alive`` the ``[num_ranks]`` live mask of
    the view the rank starts in; ``backend`` ``"local"`` (every slot computed in-process, see
    :class:`~elasticep.engine.ep.LocalEP`) or the name of a registered EP backend; ``extra`` holds
    string keys for subsystems wired in later (bus endpoints, keys).
    """

    cluster: str
    rank: int
    incarnation: int
    model_path: str
    placement: dict
    alive: list[bool]
    frontend: str
    backend: str = "local"
    torch_threads: int = 1
    faults: FaultPlan = FaultPlan()
    epoch: int = 0
    extra: dict[str, str] = {}


# --- launcher -> rank ---------------------------------------------------------------------------


class Generate(msgspec.Struct, tag="generate", **_S):
    """Decode ``max_new_tokens`` greedy tokens after ``prompt``; ``attempt`` counts retries."""

    request_id: int
    prompt: list[int]
    max_new_tokens: int
    attempt: int = 1


class SetFaults(msgspec.Struct, tag="set_faults", **_S):
    """Merge ``plan`` into the rank's fault plan; ``clear`` first resets it (and unmasks)."""

    plan: FaultPlan
    clear: bool = False


class Retire(msgspec.Struct, tag="retire", **_S):
    """Leave gracefully: take no new requests, finish those in flight, say goodbye, exit 0."""

    reason: str = ""


# --- rank -> launcher ---------------------------------------------------------------------------


class Hello(msgspec.Struct, tag="hello", **_S):
    """The rank loaded its model and serves; sent once per incarnation."""

    rank: int
    incarnation: int
    pid: int
    local_slots: int


class Completion(msgspec.Struct, tag="completion", **_S):
    """The greedy output of a request; ``steps`` is the rank's step counter after it finished."""

    request_id: int
    tokens: list[int]
    rank: int
    incarnation: int
    attempt: int
    steps: int


class Rejected(msgspec.Struct, tag="rejected", **_S):
    """The rank refused a request as invalid (bad token ids, too long). Not retried."""

    request_id: int
    reason: str


class Leaving(msgspec.Struct, tag="leaving", **_S):
    """The rank started a graceful leave; route nothing new to it."""

    rank: int
    incarnation: int
    reason: str = ""


class Goodbye(msgspec.Struct, tag="goodbye", **_S):
    """The rank finished everything it had and is about to exit 0."""

    rank: int
    incarnation: int
    steps: int


ToRank = Union[Generate, SetFaults, Retire]
FromRank = Union[Hello, Completion, Rejected, Leaving, Goodbye]


class ProtocolError(ValueError):
    """A frame on the request channel could not be decoded."""


_encoder = msgspec.msgpack.Encoder()
_to_rank = msgspec.msgpack.Decoder(ToRank)
_from_rank = msgspec.msgpack.Decoder(FromRank)
_spec = msgspec.msgpack.Decoder(RankSpec)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_to_rank(data: bytes) -> ToRank:
    try:
        return _to_rank.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad launcher message: {exc}") from None


def decode_from_rank(data: bytes) -> FromRank:
    try:
        return _from_rank.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad rank message: {exc}") from None


def decode_spec(data: bytes) -> RankSpec:
    try:
        return _spec.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad rank spec: {exc}") from None


def spec_key(cluster: str, rank: int, incarnation: int) -> str:
    """Store key of a rank incarnation's :class:`RankSpec`."""
    return f"elasticep/{cluster}/rank/{rank}/{incarnation}/spec"


def identity(rank: int, incarnation: int) -> bytes:
    """ZeroMQ identity of a rank incarnation's DEALER socket."""
    return f"{rank}:{incarnation}".encode()


def parse_identity(ident: bytes) -> tuple[int, int]:
    """``(rank, incarnation)`` from :func:`identity` bytes; :class:`ProtocolError` if malformed."""
    try:
        r, i = ident.decode().split(":")
        return int(r), int(i)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"bad rank identity {ident!r}") from None


def drain(sock, rank: int, handle, timeout_ms: int) -> None:
    """Hand every waiting launcher message on the rank's DEALER ``sock`` to ``handle``, blocking
    up to ``timeout_ms`` for the first. A frame that does not decode is reported on stderr and
    skipped; the loop goes on."""
    import sys

    import zmq

    if not sock.poll(timeout_ms):
        return
    while True:
        try:
            frame = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            msg = decode_to_rank(frame)
        except ProtocolError as exc:
            print(f"rank {rank}: dropped a frame: {exc}", file=sys.stderr)
            continue
        handle(msg)
