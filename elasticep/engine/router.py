"""The launcher's front router: sends each request to a live rank and retries it if the rank fails.

One background thread owns a ZeroMQ ROUTER socket bound on loopback; rank processes connect
DEALER sockets to it (see :mod:`elasticep.engine.protocol`). Other threads talk to the router
through a command queue and a wake-up pipe, never through the socket, because ZeroMQ sockets
belong to one thread.

A request is never lost: it leaves the router's table only when a rank returns its output (or
rejects it as invalid input). An attempt is abandoned, and the request routed again, when

* the rank's process exits (:meth:`Router.rank_exited`, called by the launcher's reaper),
* the rank is evicted from the view (:meth:`Router.evict`, for the membership service), or
* the attempt takes longer than ``attempt_timeout_s`` (a hung or masked rank); the rank then gets
  no new requests until it answers something again.

Greedy decoding is deterministic, so a retried request's output is the same wherever it runs;
when two attempts of one request both answer, the router checks that they agree and counts a
mismatch as the bug it would be.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import zmq

from elasticep import metrics
from elasticep.engine import protocol as P

__all__ = ["Router", "RequestResult", "RequestRejected", "RouterClosed", "PeerInfo"]


class RequestRejected(ValueError):
    """A rank refused the request as invalid (e.g. a token id outside the vocabulary)."""


class RouterClosed(RuntimeError):
    """The router was closed before the request finished."""


@dataclass(frozen=True)
class RequestResult:
    """A finished request.

    ``tokens``: the greedy output; ``rank``/``incarnation``: who produced it; ``attempts``: how
    many times it was sent (1 when nothing failed); ``latency_s``: submit to result, seconds.
    """

    request_id: int
    prompt: tuple[int, ...]
    tokens: list[int]
    rank: int
    incarnation: int
    attempts: int
    latency_s: float
    finished_at: float


@dataclass
class PeerInfo:
    """The router's view of one rank incarnation's request channel."""

    rank: int
    incarnation: int
    pid: int
    state: str = "serving"  # serving | leaving | gone
    unresponsive: bool = False
    inflight: set[int] = field(default_factory=set)
    completed: int = 0


@dataclass
class _Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    future: concurrent.futures.Future
    submitted: float
    attempts: int = 0
    # (rank, incarnation) -> monotonic time the attempt was sent
    running: dict[tuple[int, int], float] = field(default_factory=dict)


class Router:
    """Front router for a set of rank processes.

    Args:
        host: loopback address to bind the ROUTER socket on.
        attempt_timeout_s: abandon and re-route an attempt that has not answered after this long
            (seconds; None waits for the process exit or an eviction instead).
        max_inflight_per_rank: requests one rank works on at once; the rest wait in the router,
            where a failure cannot catch them.
        on_message: called from the router thread with every decoded rank message (for the
            launcher's bookkeeping); must be quick and must not call back into the router's
            blocking methods.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        attempt_timeout_s: float | None = 30.0,
        max_inflight_per_rank: int = 4,
        on_message: Callable[[P.FromRank], None] | None = None,
    ):
        if max_inflight_per_rank < 1:
            raise ValueError("max_inflight_per_rank must be >= 1")
        self.attempt_timeout_s = attempt_timeout_s
        self.max_inflight_per_rank = max_inflight_per_rank
        self._on_message = on_message
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        # sending to a peer that is not connected raises instead of dropping silently
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._lock = threading.Lock()
        self._peers: dict[int, PeerInfo] = {}
        self._evicted: set[int] = set()
        self._requests: dict[int, _Request] = {}
        self._pending: collections.deque[int] = collections.deque()
        self._results: dict[int, list[int]] = {}
        self._ids = itertools.count(1)
        self._hello = threading.Condition(self._lock)
        self._closed = False
        self.stats = collections.Counter()
        self._thread = threading.Thread(target=self._loop, name="elasticep-router", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public, any thread

    def submit(self, prompt: Sequence[int], max_new_tokens: int) -> concurrent.futures.Future:
        """Queue a greedy request; the future resolves to a :class:`RequestResult`."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._closed:
            fut.set_exception(RouterClosed("router is closed"))
            return fut
        req = _Request(
            id=next(self._ids),
            prompt=[int(t) for t in prompt],
            max_new_tokens=int(max_new_tokens),
            future=fut,
            submitted=time.monotonic(),
        )
        self._command(("submit", req))
        return fut

    def send(self, rank: int, msg: P.ToRank) -> None:
        """Send a control message to the current incarnation of ``rank`` (dropped if it is gone)."""
        self._command(("send", rank, msg))

    def retire(self, rank: int, reason: str = "") -> None:
        """Route nothing new to ``rank``, then tell it to leave gracefully. Requests sent to it
        before this finish there; none are sent after, so a graceful leave retries nothing."""
        self._command(("retire", rank, reason))

    def rank_exited(self, rank: int, incarnation: int) -> None:
        """The process of ``(rank, incarnation)`` is gone: re-route everything it was working on."""
        self._command(("exited", rank, incarnation))

    def evict(self, rank: int) -> None:
        """Stop routing to ``rank`` and re-route its attempts (the view no longer has it)."""
        self._command(("evict", rank))

    def readmit(self, rank: int) -> None:
        """Undo :meth:`evict`: ``rank`` may receive requests again once it has said hello."""
        self._command(("readmit", rank))

    def wait_hello(self, rank: int, incarnation: int, timeout_s: float) -> bool:
        """Block until ``(rank, incarnation)`` said hello; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._hello:
            while True:
                p = self._peers.get(rank)
                if p is not None and p.incarnation == incarnation:
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._hello.wait(left)

    def peers(self) -> dict[int, PeerInfo]:
        """A snapshot of the router's peers by rank."""
        with self._lock:
            return {
                r: PeerInfo(p.rank, p.incarnation, p.pid, p.state, p.unresponsive, set(p.inflight), p.completed)
                for r, p in self._peers.items()
            }

    def outstanding(self) -> int:
        """Requests submitted and not yet finished."""
        with self._lock:
            return len(self._requests)

    def close(self) -> None:
        """Stop the router thread; unfinished requests fail with :class:`RouterClosed`."""
        if self._closed:
            return
        self._command(("close",))
        self._thread.join(timeout=5.0)
        self._closed = True
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._ctx.term()

    # ------------------------------------------------------------------ router thread

    def _command(self, cmd: tuple) -> None:
        self._commands.put(cmd)
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (the loop will wake anyway) or closed (router closed)

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(self._poll_timeout_ms()))
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                if self._sock in events:
                    self._receive_all()
                if not self._run_commands():
                    break
                self._expire_attempts()
                self._route_pending()
        finally:
            self._fail_all(RouterClosed("router closed"))
            self._sock.close(linger=0)
            with self._hello:
                self._closed = True
                self._hello.notify_all()

    def _poll_timeout_ms(self) -> int:
        if self.attempt_timeout_s is None:
            return 1000
        # wake in time for the earliest attempt deadline
        with self._lock:
            starts = [t for r in self._requests.values() for t in r.running.values()]
        if not starts:
            return 1000
        left = min(starts) + self.attempt_timeout_s - time.monotonic()
        return max(1, min(1000, int(left * 1000) + 1))

    def _run_commands(self) -> bool:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True
            kind = cmd[0]
            if kind == "close":
                return False
            if kind == "submit":
                req: _Request = cmd[1]
                with self._lock:
                    self._requests[req.id] = req
                    self._pending.append(req.id)
                metrics.ENGINE_REQUESTS.labels("submitted").inc()
            elif kind == "send":
                _, rank, msg = cmd
                with self._lock:
                    peer = self._peers.get(rank)
                if peer is not None and peer.state != "gone":
                    self._send(peer, msg)
            elif kind == "retire":
                _, rank, reason = cmd
                with self._lock:
                    peer = self._peers.get(rank)
                    if peer is not None and peer.state == "serving":
                        peer.state = "leaving"
                if peer is not None and peer.state != "gone":
                    self._send(peer, P.Retire(reason=reason))
            elif kind == "exited":
                _, rank, inc = cmd
                with self._lock:
                    peer = self._peers.get(rank)
                    if peer is not None and peer.incarnation == inc:
                        peer.state = "gone"
                self._abandon(rank, inc, "rank_exit")
            elif kind == "evict":
                rank = cmd[1]
                with self._lock:
                    self._evicted.add(rank)
                    peer = self._peers.get(rank)
                if peer is not None:
                    self._abandon(rank, peer.incarnation, "evicted")
            elif kind == "readmit":
                with self._lock:
                    self._evicted.discard(cmd[1])

    def _receive_all(self) -> None:
        while True:
            try:
                ident, frame = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not two frames
                metrics.ENGINE_FRAMES_REFUSED.inc()
                continue
            try:
                rank, inc = P.parse_identity(ident)
                msg = P.decode_from_rank(frame)
            except P.ProtocolError:
                metrics.ENGINE_FRAMES_REFUSED.inc()
                continue
            self._on_rank_message(rank, inc, msg)
            if self._on_message is not None:
                self._on_message(msg)

    def _on_rank_message(self, rank: int, inc: int, msg: P.FromRank) -> None:
        with self._lock:
            peer = self._peers.get(rank)
            current = peer is not None and peer.incarnation == inc
            if current and peer.unresponsive:
                peer.unresponsive = False
        if isinstance(msg, P.Hello):
            with self._hello:
                old = self._peers.get(rank)
                self._peers[rank] = PeerInfo(rank=rank, incarnation=inc, pid=msg.pid)
                self._hello.notify_all()
            if old is not None and old.incarnation != inc:
                self._abandon(rank, old.incarnation, "rank_exit")
        elif isinstance(msg, P.Completion):
            self._on_completion(rank, inc, msg)
        elif isinstance(msg, P.Rejected):
            with self._lock:
                req = self._requests.pop(msg.request_id, None)
                for p in self._peers.values():
                    p.inflight.discard(msg.request_id)
            if req is not None:
                metrics.ENGINE_REQUESTS.labels("rejected").inc()
                self.stats["rejected"] += 1
                req.future.set_exception(RequestRejected(msg.reason))
        elif isinstance(msg, P.Leaving):
            with self._lock:
                if current:
                    peer.state = "leaving"
            if current:
                self._hedge(rank, inc)
        elif isinstance(msg, P.Goodbye):
            with self._lock:
                if current:
                    peer.state = "gone"

    def _on_completion(self, rank: int, inc: int, msg: P.Completion) -> None:
        with self._lock:
            req = self._requests.get(msg.request_id)
            peer = self._peers.get(rank)
            if peer is not None and peer.incarnation == inc:
                peer.inflight.discard(msg.request_id)
                peer.completed += 1
            if req is None:
                first = self._results.get(msg.request_id)
                if first is not None and first != msg.tokens:
                    # two attempts of one greedy request disagree: one output is wrong
                    self.stats["duplicate_mismatch"] += 1
                    metrics.ENGINE_REQUESTS.labels("duplicate_mismatch").inc()
                else:
                    self.stats["duplicate"] += 1
                return
            del self._requests[msg.request_id]
            for key in req.running:
                p = self._peers.get(key[0])
                if p is not None and p.incarnation == key[1]:
                    p.inflight.discard(req.id)
            self._results[req.id] = list(msg.tokens)
            if len(self._results) > 100_000:  # keep the duplicate check bounded
                self._results.pop(next(iter(self._results)))
        now = time.monotonic()
        result = RequestResult(
            request_id=req.id,
            prompt=tuple(req.prompt),
            tokens=list(msg.tokens),
            rank=rank,
            incarnation=inc,
            attempts=req.attempts,
            latency_s=now - req.submitted,
            finished_at=time.time(),
        )
        self.stats["completed"] += 1
        metrics.ENGINE_REQUESTS.labels("completed").inc()
        req.future.set_result(result)

    def _abandon(self, rank: int, inc: int, cause: str) -> None:
        """Put every attempt running on ``(rank, inc)`` back in the queue (front: oldest first)."""
        requeue = []
        with self._lock:
            peer = self._peers.get(rank)
            for req in self._requests.values():
                if req.running.pop((rank, inc), None) is not None:
                    if peer is not None and peer.incarnation == inc:
                        peer.inflight.discard(req.id)
                    if not req.running and req.id not in self._pending:
                        requeue.append(req.id)
            for rid in sorted(requeue, reverse=True):
                self._pending.appendleft(rid)
        if requeue:
            self.stats[f"retried_{cause}"] += len(requeue)
            metrics.ENGINE_RETRIES.labels(cause).inc(len(requeue))

    def _hedge(self, rank: int, inc: int) -> None:
        """A leaving rank's attempts also go to the other ranks (the first answer wins)."""
        with self._lock:
            ids = [r.id for r in self._requests.values() if (rank, inc) in r.running and r.id not in self._pending]
            for rid in sorted(ids, reverse=True):
                self._pending.appendleft(rid)
        if ids:
            self.stats["hedged_leave"] += len(ids)

    def _expire_attempts(self) -> None:
        if self.attempt_timeout_s is None:
            return
        now = time.monotonic()
        late: list[tuple[int, int]] = []
        with self._lock:
            for req in self._requests.values():
                for key, started in req.running.items():
                    if now - started > self.attempt_timeout_s:
                        late.append(key)
        for rank, inc in set(late):
            with self._lock:
                peer = self._peers.get(rank)
                if peer is not None and peer.incarnation == inc:
                    peer.unresponsive = True
            self._abandon(rank, inc, "timeout")

    def _routable(self) -> list[PeerInfo]:
        return [
            p
            for r, p in sorted(self._peers.items())
            if p.state == "serving" and not p.unresponsive and r not in self._evicted
        ]

    def _route_pending(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
                peers = [p for p in self._routable() if len(p.inflight) < self.max_inflight_per_rank]
                if not peers:
                    return
                peer = min(peers, key=lambda p: (len(p.inflight), p.completed, p.rank))
                rid = self._pending.popleft()
                req = self._requests.get(rid)
                if req is None:
                    continue
                req.attempts += 1
                req.running[(peer.rank, peer.incarnation)] = time.monotonic()
                peer.inflight.add(rid)
                msg = P.Generate(
                    request_id=rid, prompt=req.prompt, max_new_tokens=req.max_new_tokens, attempt=req.attempts
                )
            if not self._send(peer, msg):
                self._abandon(peer.rank, peer.incarnation, "unroutable")

    def _send(self, peer: PeerInfo, msg: P.ToRank) -> bool:
        try:
            self._sock.send_multipart([P.identity(peer.rank, peer.incarnation), P.encode(msg)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            # EHOSTUNREACH: the peer's connection is gone; its process exit will follow
            with self._lock:
                if peer.state == "serving":
                    peer.unresponsive = True
            return False

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            reqs = list(self._requests.values())
            self._requests.clear()
            self._pending.clear()
        for req in reqs:
            if not req.future.done():
                req.future.set_exception(exc)
