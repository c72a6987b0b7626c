"""One rank process of the reference engine.

Started by the :class:`~elasticep.engine.launcher.Launcher` (forked from its warm
:class:`~elasticep.engine.zygote.Zygote`, or as
``python -m elasticep.engine.rank --store HOST:PORT --cluster ID --rank R --incarnation I``), a
rank reads its :class:`~elasticep.engine.protocol.RankSpec` from the launcher's ``TCPStore``,
builds its :class:`~elasticep.engine.model.RankModel`, connects a DEALER socket to the launcher's
front router, says :class:`~elasticep.engine.protocol.Hello` and serves.

The loop (:meth:`RankServer.serve`) is single-threaded and step-based. Each iteration drains the
launcher's messages, applies the fault plan at the step boundary, then runs one decoding step of
the next request in round-robin order. A step is the unit that the reconfiguration pipeline
commits between (``RankModel.set_placement`` takes effect at a step boundary) and that is
replayed when it fails. Requests run one at a time per forward (batch 1); several requests on
one rank interleave step by step.

Exit codes: 0 after a graceful leave; 1 on an unexpected error (its traceback on stderr); -9
(SIGKILL) for an injected kill.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import datetime
import os
import signal
import sys
import time
from typing import Sequence

import zmq

from elasticep.engine import protocol as P

__all__ = ["RankServer", "run_rank", "main"]

_IDLE_POLL_MS = 50
"""How long an idle rank blocks waiting for a message before re-checking its state, ms."""

_LEAVE_GRACE_MS = 20
"""A leaving rank's last wait for requests already on their way to it, ms."""


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits, so no rank outlives its launcher."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class RankServer:
    """Serves greedy decoding requests for one rank incarnation.

    Args:
        spec: this incarnation's configuration (from the store).
        context: the ZeroMQ context to use (a new one if None).

    Attributes that integrations read or drive: ``model`` (the :class:`RankModel`), ``step``
    (steps run by this incarnation), ``masked``, ``leaving``, ``faults``, and ``boundary_hooks``:
    callables ``hook(server)`` run at every step boundary (also while idle or masked, at least
    every ``_IDLE_POLL_MS``), in order, on the rank's one thread. That is where a membership
    service installs a committed view (``server.model.set_placement(...)``) or a heartbeat is
    sent; a hook that raises stops the rank (exit code 1), as any unexpected error does.
    """

    def __init__(self, spec: P.RankSpec, context: zmq.Context | None = None):
        import torch

        from elasticep.engine.ep import LocalEP
        from elasticep.engine.model import RankModel
        from elasticep.eplb.placement import Placement

        torch.set_num_threads(max(1, spec.torch_threads))
        self.spec = spec
        self.rank = spec.rank
        self.incarnation = spec.incarnation
        placement = Placement.from_dict(spec.placement)
        if spec.backend != "local":
            raise ValueError(f"unknown EP backend {spec.backend!r}; this build serves 'local'")
        self.model = RankModel(spec.model_path, placement, LocalEP(), alive=spec.alive, rank=spec.rank)
        self.faults = spec.faults
        self.boundary_hooks: list = []
        self.step = 0
        self.masked = False
        self.leaving = False
        self._active: collections.deque[tuple[P.Generate, object]] = collections.deque()
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, P.identity(spec.rank, spec.incarnation))
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.connect(spec.frontend)

    # ------------------------------------------------------------------ messages

    def _send(self, msg) -> None:
        self._sock.send(P.encode(msg))

    def _drain(self, timeout_ms: int) -> None:
        P.drain(self._sock, self.rank, self._handle, timeout_ms)

    def _handle(self, msg: P.ToRank) -> None:
        if isinstance(msg, P.Generate):
            try:
                seq = self.model.new_sequence(msg.prompt, msg.max_new_tokens)
            except ValueError as exc:
                self._send(P.Rejected(request_id=msg.request_id, reason=str(exc)))
                return
            if seq.done:  # max_new_tokens == 0
                self._complete(msg, seq)
                return
            self._active.append((msg, seq))
        elif isinstance(msg, P.SetFaults):
            if msg.clear:
                self.faults = P.FaultPlan()
                self.masked = False
            self.faults = self.faults.merged(msg.plan)
        elif isinstance(msg, P.Retire):
            self._begin_leave(msg.reason or "retired")

    def _complete(self, req: P.Generate, seq) -> None:
        self._send(
            P.Completion(
                request_id=req.request_id,
                tokens=list(seq.generated),
                rank=self.rank,
                incarnation=self.incarnation,
                attempt=req.attempt,
                steps=self.step,
            )
        )

    def _begin_leave(self, reason: str) -> None:
        if not self.leaving:
            self.leaving = True
            self._send(P.Leaving(rank=self.rank, incarnation=self.incarnation, reason=reason))

    # ------------------------------------------------------------------ faults

    def _due(self, at_step: int) -> bool:
        return at_step != P.NEVER and self.step >= at_step

    def _apply_faults(self) -> None:
        """Fire the fault plan's one-shot faults whose step has come (each fires once)."""
        f = self.faults
        if self._due(f.kill_at_step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._due(f.hang_at_step):
            self.faults = f = msgspec_replace(f, hang_at_step=P.NEVER)
            os.kill(os.getpid(), signal.SIGSTOP)  # returns after the launcher's SIGCONT
        if self._due(f.mask_at_step):
            self.faults = f = msgspec_replace(f, mask_at_step=P.NEVER)
            self.masked = True
        if self._due(f.leave_at_step):
            self.faults = f = msgspec_replace(f, leave_at_step=P.NEVER)
            self._begin_leave("fault plan")

    # ------------------------------------------------------------------ loop

    def serve(self) -> int:
        """Run until a graceful leave completes; returns the exit code (0)."""
        self._send(
            P.Hello(rank=self.rank, incarnation=self.incarnation, pid=os.getpid(), local_slots=len(self.model.local_slots))
        )
        while True:
            busy = bool(self._active) and not self.masked
            self._drain(0 if busy else _IDLE_POLL_MS)
            for hook in self.boundary_hooks:
                hook(self)
            if self.masked:
                continue
            if not self._active:
                # a step boundary with nothing to do still honours the plan (a kill at step 0)
                self._apply_faults()
                if self.leaving and not self._active and not self.masked:
                    # a request the router sent before it heard Leaving may still be on the wire
                    self._drain(_LEAVE_GRACE_MS)
                    if self._active:
                        continue
                    self._send(P.Goodbye(rank=self.rank, incarnation=self.incarnation, steps=self.step))
                    return 0
                continue
            self._apply_faults()
            if self.masked:
                continue
            if self.faults.slow_ms > 0 and self.step >= self.faults.slow_from_step:
                time.sleep(self.faults.slow_ms / 1000.0)
            req, seq = self._active.popleft()
            self.model.step(seq)
            self.step += 1
            if seq.done:
                self._complete(req, seq)
            else:
                self._active.append((req, seq))

    def close(self) -> None:
        self._sock.close(linger=1000)


def msgspec_replace(plan: P.FaultPlan, **changes) -> P.FaultPlan:
    import msgspec

    return msgspec.structs.replace(plan, **changes)


def read_spec(store_host: str, store_port: int, cluster: str, rank: int, incarnation: int, timeout_s: float = 30.0) -> P.RankSpec:
    """Fetch this incarnation's spec from the launcher's store (waits up to ``timeout_s``)."""
    from torch.distributed import TCPStore

    store = TCPStore(
        store_host, store_port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s), use_libuv=True
    )
    return P.decode_spec(store.get(P.spec_key(cluster, rank, incarnation)))


def run_rank(store_host: str, store_port: int, cluster: str, rank: int, incarnation: int) -> int:
    """Read the spec, build the model, serve; returns the exit code."""
    _die_with_parent()
    spec = read_spec(store_host, store_port, cluster, rank, incarnation)
    if spec.backend == "kernel":
        from elasticep.engine.ep_rank import run_ep_rank

        return run_ep_rank(spec)
    server = RankServer(spec)
    try:
        return server.serve()
    finally:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elasticep.engine.rank", description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="the launcher's TCPStore, HOST:PORT")
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--incarnation", type=int, default=0)
    args = parser.parse_args(argv)
    host, _, port = args.store.rpartition(":")
    return run_rank(host, int(port), args.cluster, args.rank, args.incarnation)


if __name__ == "__main__":
    sys.exit(main())
