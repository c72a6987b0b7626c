"""The codec: a round-trip property over every event type, typed refusals, and a decoder fuzz."""

from __future__ import annotations

import asyncio
import random
import types
import typing
from collections import Counter

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticep import metrics
from elasticep.bus import EventBus, InProcessNetwork
from elasticep.events import (
    EVENT_TYPES,
    MAX_FRAME_BYTES,
    REFUSAL_REASONS,
    SCHEMA_VERSION,
    Codec,
    Envelope,
    FrameRefused,
    FrameTooLarge,
    Heartbeat,
    MalformedFrame,
    SchemaTooNew,
    SenderMismatch,
    Suspicion,
    UnknownEventType,
    envelope,
)

INT64 = st.integers(-(2**63), 2**63 - 1)
UINT = st.integers(0, 2**63 - 1)
MSGPACK_DATA = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def strategy_for(tp: object) -> st.SearchStrategy:
    """A hypothesis strategy for one msgspec field type (what elasticep's events use)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is int:
        return INT64
    if tp is float:
        return st.floats(allow_nan=False)  # NaN != NaN would fail equality, not the codec
    if tp is str:
        return st.text(max_size=20)
    if tp is bool:
        return st.booleans()
    if tp is msgspec.Raw:
        return MSGPACK_DATA.map(lambda v: msgspec.Raw(msgspec.msgpack.encode(v)))
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([st.none() if a is type(None) else strategy_for(a) for a in args])
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(strategy_for(args[0]), max_size=6).map(tuple)
        return st.tuples(*(strategy_for(a) for a in args))
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=4)
    if origin is dict:
        return st.dictionaries(strategy_for(args[0]), strategy_for(args[1]), max_size=4)
    raise TypeError(f"no strategy for {tp!r}")


def event_strategy(event_type: type) -> st.SearchStrategy:
    fields = {f.name: strategy_for(f.type) for f in msgspec.structs.fields(event_type)}
    return st.fixed_dictionaries(fields).map(lambda kw: event_type(**kw))


EVENTS = st.one_of([event_strategy(t) for t in EVENT_TYPES])
CODEC = Codec()


def envelopes(event: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(
        Envelope,
        schema=st.just(SCHEMA_VERSION),
        sender=UINT,
        epoch=UINT,
        seq=st.integers(1, 2**63 - 1),
        wall_ns=INT64,
        mono_ns=INT64,
        event=event,
    )


@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=lambda t: t.__name__)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_codec_round_trip_every_event_type(event_type: type, data: st.DataObject):
    env = data.draw(envelopes(event_strategy(event_type)))
    frame = CODEC.encode(env)
    assert CODEC.decode(frame) == env
    assert CODEC.decode(frame, authenticated_sender=env.sender) == env
    assert CODEC.decode_event(CODEC.encode_event(env.event)) == env.event


@settings(max_examples=50, deadline=None)
@given(st.deferred(lambda: envelopes(EVENTS)), UINT)
def test_sender_mismatch_is_refused(env: Envelope, other: int):
    if other == env.sender:
        other += 1
    with pytest.raises(SenderMismatch) as info:
        CODEC.decode(CODEC.encode(env), authenticated_sender=other)
    assert info.value.reason == "sender_mismatch"


def _valid_frame() -> bytes:
    return CODEC.encode(envelope(Suspicion(observer=1, suspect=2, source="kernel"), sender=1, epoch=3, seq=7))


def test_each_refusal_has_its_type_and_reason():
    good = _valid_frame()
    cases: list[tuple[bytes, type[FrameRefused], str]] = [
        (b"\xc1", MalformedFrame, "malformed"),
        (b"", MalformedFrame, "malformed"),
        (msgspec.msgpack.encode([1, 0, 0, 1, 0, 0, {"type": "no_such_event"}]), UnknownEventType, "unknown_type"),
        (msgspec.msgpack.encode([SCHEMA_VERSION + 1, 0, 0, 1, 0, 0, {"type": "heartbeat", "rank": 0}]),
         SchemaTooNew, "schema_too_new"),
        (msgspec.msgpack.encode([SCHEMA_VERSION + 1, 0, 0, 1, 0, 0, {"type": "from_the_future"}]),
         SchemaTooNew, "schema_too_new"),
        (msgspec.msgpack.encode([1, 0, 0, 0, 0, 0, {"type": "heartbeat", "rank": 0}]), MalformedFrame, "malformed"),
        (msgspec.msgpack.encode([1, 0, 0, 1, 0, 0, {"type": "heartbeat"}]), MalformedFrame, "malformed"),
        (b"\x00" * (MAX_FRAME_BYTES + 1), FrameTooLarge, "oversize"),
        (good[:-3], MalformedFrame, "malformed"),
    ]
    for frame, error, reason in cases:
        with pytest.raises(error) as info:
            CODEC.decode(frame)
        assert info.value.reason == reason
        assert reason in REFUSAL_REASONS
    with pytest.raises(SenderMismatch):
        CODEC.decode(good, authenticated_sender=2)


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    kind = rng.randrange(6)
    if kind == 0 and data:  # flip bits
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        del data[rng.randrange(len(data) + 1):]
    elif kind == 2:  # insert junk
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.randbytes(rng.randint(1, 8))
    elif kind == 3 and data:  # overwrite a byte with a msgpack type marker
        data[rng.randrange(len(data))] = rng.choice([0xC0, 0xC1, 0xC2, 0xDC, 0xDE, 0xD9, 0x90, 0x80, 0xFF])
    elif kind == 4:  # change the schema or sender fields
        data[1:2] = bytes([rng.randrange(256)])
    else:  # splice two frames
        data = data[: rng.randrange(len(data) + 1)] + bytearray(_valid_frame()[rng.randrange(10):])
    return bytes(data)


def _fuzz_frames(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    frames = [rng.randbytes(rng.randint(0, 64)) for _ in range(n // 2)]
    frames += [_mutate(rng, _valid_frame()) for _ in range(n - n // 2)]
    return frames


def test_decoder_fuzz_never_raises_anything_but_a_typed_refusal():
    reasons: Counter[str] = Counter()
    accepted = 0
    for frame in _fuzz_frames(6000, seed=20261128):
        try:
            env = CODEC.decode(frame, authenticated_sender=1)
        except FrameRefused as exc:
            assert exc.reason in REFUSAL_REASONS
            reasons[exc.reason] += 1
        else:
            # A mutation can land on a still-valid envelope; then it must be a real one.
            assert env.sender == 1 and env.seq >= 1 and env.schema <= SCHEMA_VERSION
            assert CODEC.decode(CODEC.encode(env)) == env
            accepted += 1
    assert sum(reasons.values()) + accepted == 6000
    assert reasons["malformed"] > 3000
    assert {"malformed", "sender_mismatch"} <= set(reasons)
    assert accepted < 600


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_bus_counts_every_fuzzed_frame_and_keeps_running():
    frames = _fuzz_frames(3000, seed=7)
    before = {r: metrics.sample("elasticep_frames_refused_total", {"reason": r}) for r in REFUSAL_REASONS}
    net = InProcessNetwork(seed=1)
    b0, b1 = EventBus(net.transport(0), 0), EventBus(net.transport(1), 1)
    async with b0, b1:
        sub = b1.subscribe(Heartbeat, maxsize=100_000)
        for frame in frames:
            net.inject(1, frame, sender=1 if frame[:1] != b"" else 0)
        await b0.publish(Heartbeat(rank=0, step=42))  # the loop still serves honest traffic
        env = await asyncio.wait_for(sub.receive(), 5)
        while env.sender != 0:
            env = await asyncio.wait_for(sub.receive(), 5)
        assert env.event == Heartbeat(rank=0, step=42)
        stats = b1.statistics()
    refused = sum(stats.refused.values())
    assert refused + stats.received == len(frames) + 1
    assert refused > 2500
    for reason, n in stats.refused.items():
        assert metrics.sample("elasticep_frames_refused_total", {"reason": reason}) - before[reason] == n
