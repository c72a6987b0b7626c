"""The launcher's exit reports reach a rank only from the launcher's CURVE key."""

from __future__ import annotations

import time

import msgspec
import pytest
import zmq

from elasticep.bus import ClusterKeys
from elasticep.engine.ep_rank import exit_report_socket
from elasticep.events import ProcessExit


def _server(ctx: zmq.Context) -> tuple[zmq.Socket, str, str]:
    """A PUB socket that is a CURVE server, as the launcher's exit-report socket is."""
    public, secret = zmq.curve_keypair()
    sock = ctx.socket(zmq.PUB)
    sock.linger = 0
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = public, secret
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}", public.decode()


def _received(pub: zmq.Socket, sub: zmq.Socket, frame: bytes, seconds: float) -> list[bytes]:
    """Publish ``frame`` every 20 ms for ``seconds`` (a SUB joins late); return what ``sub`` read."""
    got: list[bytes] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not got:
        pub.send(frame)
        if sub.poll(20):
            got.append(sub.recv())
    return got


def test_a_rank_hears_the_launcher_and_not_an_impostor_on_its_endpoint():
    ctx = zmq.Context()
    keys = ClusterKeys.generate(2)
    frame = msgspec.msgpack.encode(ProcessExit(rank=1, pid=4242, exitcode=-9, signal=9, incarnation=7))
    launcher, endpoint, launcher_key = _server(ctx)
    # An impostor with its own key, e.g. a process that bound the endpoint after the launcher.
    impostor, impostor_endpoint, _ = _server(ctx)
    genuine = exit_report_socket(ctx, endpoint, launcher_key, keys.for_rank(0), 0)
    fooled = exit_report_socket(ctx, impostor_endpoint, launcher_key, keys.for_rank(0), 0)
    try:
        got = _received(launcher, genuine, frame, 10.0)
        assert [msgspec.msgpack.decode(f, type=ProcessExit) for f in got] == [
            ProcessExit(rank=1, pid=4242, exitcode=-9, signal=9, incarnation=7)
        ]
        # The same wait that delivered the genuine report delivers nothing from the impostor:
        # the handshake against the pinned key fails, so no frame is ever read.
        assert _received(impostor, fooled, frame, 1.0) == []
    finally:
        for sock in (genuine, fooled, launcher, impostor):
            sock.close(0)
        ctx.term()


def test_a_missing_launcher_key_is_refused():
    ctx = zmq.Context()
    try:
        with pytest.raises(ValueError, match="exit-report key is missing"):
            exit_report_socket(ctx, "tcp://127.0.0.1:1", "", ClusterKeys.generate(1).for_rank(0), 0)
    finally:
        ctx.term()
