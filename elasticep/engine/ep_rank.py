"""A rank of the expert-parallel reference engine: the model, the kernel lockstep, request serving.

This is what a launcher rank runs with ``backend="kernel"``. Each process holds only its own
physical expert slots; the ranks of the current view step in lockstep through the CPU kernel
(:class:`~elasticep.engine.ep.KernelEP`): every step, every member runs one forward, a decode
step of one of its own requests (data-parallel attention) or an idle step with zero tokens, so
every MoE layer's dispatch and combine has all members.

Fault tolerance is the engine-neutral :class:`~elasticep.agent.Agent`, attached like any engine
attaches it: :class:`EPRankServer` gives it :class:`_RankHooks` (placement, the slot weights in
the transformers layout for the Mooncake transfer engine, the checkpoint as the last source,
the kernel's live mask as ``on_view``, its timeout records as ``kernel_timeouts``, and the
commit: staged weights, placement, live mask and kernel epoch at once) and one signal source of
its own, the launcher's exit reports. The serving thread (the process's main thread) owns the
request socket to the launcher's router and the model, and runs the step loop; the agent's
thread runs the bus, membership and the reconfiguration pipeline.

Failure path: a peer dies (or hangs, or stops taking part). The launcher reports the exit (a
certain signal), or the kernel's bounded waits time out (``PeerTimeout``, published and
corroborated) and heartbeats go silent. The membership service commits a view without the
peer; on install ``on_view`` zeroes the peer in the kernel's live mask, so a serving thread that
waits on it returns at once. The step that lost the peer fails its check
(:class:`~elasticep.engine.ep.PeersLost`), its KV cache is rolled back, and at the step boundary
:meth:`Agent.boundary <elasticep.agent.Agent.boundary>` runs the pipeline for the newest view,
then the step is replayed.

A restarted or added rank starts with empty slots and asks to join; the view that admits it runs
the same pipeline on every member, which fills its slots from live replicas, and it enters the
lockstep at the new epoch. A retiring rank finishes its requests, leaves the membership, and
stays up briefly so that survivors can copy its experts before it exits.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from elasticep.agent import STOPPED, Agent, AgentFenced, Commit, EngineHooks
from elasticep.agent.agent import latest_placement, placement_key, plan_key
from elasticep.engine import protocol as P

__all__ = ["EPRankServer", "WORK_FLAGS_MAX", "work_flags_path", "placement_key", "plan_key"]

WORK_FLAGS_MAX = 256
"""Ranks the shared work-flag page has room for."""

_IDLE_WAIT_MS = (5, 100)
"""How long an idle rank waits for a request before taking the next (idle) lockstep step when no
member has work, ms: from the first to the second value, doubling while the cluster stays idle.
Far below the kernel timeout, so a rank with new work waits at most this long for its peers, and
an idle cluster takes ~10 cheap steps a second instead of spinning."""

def work_flags_path(cluster: str) -> str:
    """The shared page where each rank posts how many requests it has (idle back-off)."""
    return f"/dev/shm/elasticep-{cluster}-work"


class _WorkFlags:
    """``int32[WORK_FLAGS_MAX]`` in shared memory: requests each rank holds. Advisory only: a
    stale read costs at most one idle wait, never correctness."""

    def __init__(self, cluster: str):
        path = work_flags_path(cluster)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < WORK_FLAGS_MAX * 4:
                os.ftruncate(fd, WORK_FLAGS_MAX * 4)
        finally:
            os.close(fd)
        self.flags = np.memmap(path, dtype=np.int32, mode="r+", shape=(WORK_FLAGS_MAX,))

    def post(self, rank: int, n: int) -> None:
        if self.flags[rank] != n:
            self.flags[rank] = n

    def any_work(self, members) -> bool:
        return any(int(self.flags[r]) > 0 for r in members if r < WORK_FLAGS_MAX)


def exit_report_socket(ctx: zmq.Context, endpoint: str, server_key: str, keys, rank: int) -> zmq.Socket:
    """A SUB socket for the launcher's exit reports, as a CURVE client pinned to ``server_key``.

    Args:
        ctx: the ZeroMQ context (a ``zmq.asyncio.Context`` for an awaitable socket).
        endpoint: the launcher's exit-report endpoint (``spec.extra["control"]``).
        server_key: the launcher's Z85 CURVE public key (``spec.extra["control_key"]``). Only the
            holder of the matching secret completes the handshake, so every frame read here
            comes from the launcher: a process that takes over the endpoint cannot forge an exit.
        keys: this rank's :class:`~elasticep.bus.ClusterKeys` (its own keypair is the client key).
        rank: this rank.
    """
    if not server_key:
        raise ValueError("the launcher's exit-report key is missing: refusing an unauthenticated channel")
    sock = ctx.socket(zmq.SUB)
    sock.curve_serverkey = server_key.encode()
    sock.curve_publickey = keys.rank_public(rank)
    sock.curve_secretkey = keys.rank_secret(rank)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


class EPRankServer:
    """One expert-parallel rank incarnation; see the module docs.

    Args:
        spec: the rank's :class:`~elasticep.engine.protocol.RankSpec`; ``spec.extra`` carries
            ``bus_keys`` (this rank's CURVE keys, JSON), ``bus_incarnation``, ``join`` (``"1"``
            for a restart or a new rank), ``control`` and ``control_key`` (the launcher's
            exit-report endpoint and its CURVE public key, Z85),
            ``store`` (``HOST:PORT``), ``profile`` (the :class:`~elasticep.config.Config`
            profile, ``"local"`` or ``"cluster"``; default ``"local"``) and ``config`` (JSON
            overrides of that profile).

    Who calls it: :func:`elasticep.engine.rank.run_rank` when ``spec.backend == "kernel"``.
    """

    def __init__(self, spec: P.RankSpec):
        import json

        import torch

        from elasticep.bus import ClusterKeys
        from elasticep.config import Config
        from elasticep.engine.ep import KernelEP
        from elasticep.engine.model import RankModel, load_config
        from elasticep.eplb.placement import EMPTY, Placement
        from elasticep.membership.store import open_view_store

        torch.set_num_threads(max(1, spec.torch_threads))
        self.spec = spec
        self.rank = spec.rank
        self.incarnation = spec.incarnation
        self.cluster = spec.cluster
        extra = spec.extra
        self.join = extra.get("join", "0") == "1"
        self.config = Config.named(extra.get("profile", "local"), **json.loads(extra.get("config", "{}")))
        self.faults = spec.faults
        self.step = 0
        self.masked = False
        self.leaving = False
        self.exhausted: str | None = None
        self.fenced: str | None = None
        self._active: list[tuple[P.Generate, Any]] = []
        self._rr = 0
        self.agent = Agent(
            self.rank,
            _RankHooks(self),
            store=extra["store"],
            cluster=self.cluster,
            members=None if self.join else [r for r, a in enumerate(spec.alive) if a],
            config=self.config,
            keys=ClusterKeys.from_json(extra["bus_keys"]),
            incarnation=int(extra["bus_incarnation"]),
            signals=[self._exit_reports, self._kernel_waits],
            # its collective is the kernel: each epoch's commit opens a new kernel segment over
            # the view's members (set_placement(epoch=...)), so no gloo group is built
            groups=None,
            # the launcher's store holds views unless Config.view_store names another (etcd)
            view_store=(open_view_store(self.config, tcpstore=extra["store"], prefix=f"elasticep/{self.cluster}")
                        if self.config.view_store != "tcpstore" else None),
            bus_endpoint=extra.get("bus_endpoint"),  # a rank on a host of its own binds there
            transfer_host=extra.get("host_addr", "127.0.0.1"),
        )
        config = load_config(spec.model_path)
        self.max_tokens = 64
        self.ep = KernelEP(
            self.rank,
            cluster_id=self.cluster,
            max_tokens=self.max_tokens,
            hidden=config.hidden_size,
            topk=config.num_experts_per_tok,
            timeout_us=self.config.kernel_timeout_us,
        )
        if self.join:
            # start from the placement the cluster serves now, this rank's slots empty: the view
            # that admits it fills them from live replicas
            _, base = latest_placement(self.agent.store, self.cluster, 1 << 30)
            if base.num_ranks <= self.rank:
                base = base.with_ranks(self.rank + 1)
            phy = base.phy2log.clone()
            phy[:, list(base.slots_of_rank(self.rank))] = EMPTY
            placement = Placement(phy, base.slots_per_rank, base.num_experts)
            # the ranks that serve the base placement; no step runs before the first commit
            alive = [bool((phy[:, list(placement.slots_of_rank(r))] >= 0).any()) for r in range(placement.num_ranks)]
            self.model = RankModel(spec.model_path, placement, self.ep, alive=alive, rank=self.rank, epoch=-1)
        else:
            placement = Placement.from_dict(spec.placement)
            self.model = RankModel(spec.model_path, placement, self.ep, alive=spec.alive, rank=self.rank, epoch=1)
        self._model_config = config
        self.work = _WorkFlags(self.cluster)
        self.work.post(self.rank, 0)
        self._timeout_buffer = None
        self._timeout_cursor = 0
        self._drain_reason: str | None = None  # set by the operator door's thread
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, P.identity(spec.rank, spec.incarnation))
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.connect(spec.frontend)

    @property
    def epoch(self) -> int:
        """The epoch this rank serves (the agent's)."""
        return self.agent.epoch

    @property
    def members(self) -> tuple[int, ...]:
        return self.agent.members

    async def _exit_reports(self, agent: Agent) -> None:
        """The launcher's certain signal, a process exit within milliseconds of the kill: a
        signal source on the agent's loop."""
        import msgspec

        from elasticep.events import ProcessExit

        sub = exit_report_socket(zmq.asyncio.Context.instance(), self.spec.extra["control"],
                                 self.spec.extra["control_key"], agent.keys, self.rank)
        decoder = msgspec.msgpack.Decoder(ProcessExit)
        try:
            while True:
                frame = await sub.recv()
                try:
                    ev = decoder.decode(frame)
                except msgspec.DecodeError:
                    continue
                if ev.rank != self.rank or ev.incarnation != agent.incarnation:
                    agent.report(ev)
        finally:
            sub.close()

    async def _kernel_waits(self, agent: Agent) -> None:
        """The peers the serving thread's kernel call is still waiting on, reported while it
        waits (uncertain, corroborated like kernel timeouts); the kernel's own timeout stays the
        hard bound of a step."""
        from elasticep.kernel import KernelWaitWatch

        watch = KernelWaitWatch(lambda: self.ep.buffer, report_after_ms=self.config.min_suspect_ms,
                                every_ms=self.config.heartbeat_interval_ms)
        await watch.run(lambda ev: agent.report(ev, publish=True))

    # ------------------------------------------------------------------ serving thread

    def _send(self, msg) -> None:
        self._sock.send(P.encode(msg))

    def _drain(self, timeout_ms: int) -> None:
        P.drain(self._sock, self.rank, self._handle, timeout_ms)

    def _handle(self, msg) -> None:
        if isinstance(msg, P.Generate):
            if self.exhausted is not None:
                self._send(P.Rejected(request_id=msg.request_id, reason=self.exhausted))
                return
            if len(msg.prompt) > self.max_tokens:
                self._send(P.Rejected(request_id=msg.request_id,
                                      reason=f"prompt of {len(msg.prompt)} tokens exceeds {self.max_tokens}"))
                return
            try:
                seq = self.model.new_sequence(msg.prompt, msg.max_new_tokens)
            except ValueError as exc:
                self._send(P.Rejected(request_id=msg.request_id, reason=str(exc)))
                return
            if seq.done:
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

    def _complete(self, req, seq) -> None:
        self._send(P.Completion(request_id=req.request_id, tokens=list(seq.generated), rank=self.rank,
                                incarnation=self.incarnation, attempt=req.attempt, steps=self.step))

    def _begin_leave(self, reason: str) -> None:
        if not self.leaving:
            self.leaving = True
            self._send(P.Leaving(rank=self.rank, incarnation=self.incarnation, reason=reason))

    def _apply_faults(self) -> None:
        import signal

        from msgspec.structs import replace

        f = self.faults
        due = lambda s: s != P.NEVER and self.step >= s  # noqa: E731
        if due(f.kill_at_step):
            os.kill(os.getpid(), signal.SIGKILL)
        if due(f.hang_at_step):
            self.faults = f = replace(f, hang_at_step=P.NEVER)
            os.kill(os.getpid(), signal.SIGSTOP)
        if due(f.mask_at_step):
            self.faults = f = replace(f, mask_at_step=P.NEVER)
            self.masked = True
        if due(f.leave_at_step):
            self.faults = f = replace(f, leave_at_step=P.NEVER)
            self._begin_leave("fault plan")

    def _fail_all(self, reason: str) -> None:
        for req, _ in self._active:
            self._send(P.Rejected(request_id=req.request_id, reason=reason))
        self._active.clear()
        self.work.post(self.rank, 0)

    def _boundary(self) -> bool:
        """At a step boundary: the agent applies every pending view. Returns whether to step
        (False while redundancy is exhausted: requests are rejected until a covering view)."""
        if self.agent.boundary() == STOPPED:
            if self.exhausted is None:
                self.exhausted = self.agent.exhausted
                self._fail_all(self.exhausted)
            return False
        self.exhausted = None
        return True

    def _one_step(self) -> None:
        from elasticep.engine.ep import PeersLost

        seq_entry = None
        if self._active and not self.masked and self.exhausted is None:
            self._rr %= len(self._active)
            seq_entry = self._active[self._rr]
        try:
            if seq_entry is not None:
                self.model.step(seq_entry[1])
            else:
                self.model.idle_step()
                self.model.backend.check_step()
        except PeersLost as lost:
            # the epoch ended under this step, or the agent waits (bounded) for the view
            # without the lost peers; either way the step is replayed after the next boundary
            self.agent.peers_lost(lost.ranks)
            return
        self.step += 1
        if seq_entry is not None:
            req, seq = seq_entry
            if seq.done:
                self._active.pop(self._rr)
                self._complete(req, seq)
            else:
                self._rr += 1

    def serve(self) -> int:
        """Start the agent, join the lockstep, serve until a graceful leave; returns the exit code
        (0 after a leave, 3 when fenced: evicted while alive)."""
        try:
            return self._serve()
        except AgentFenced as exc:
            self.fenced = exc.reason
            return self._fence_exit()

    def _serve(self) -> int:
        self.agent.start(timeout=60.0)  # a joiner returns admitted, its slots filled
        self._send(P.Hello(rank=self.rank, incarnation=self.incarnation, pid=os.getpid(),
                           local_slots=len(self.model.local_slots)))
        idle_ms = _IDLE_WAIT_MS[0]
        while True:
            idle = (not self._active or self.masked) and not self.work.any_work(self.members)
            idle_ms = min(idle_ms * 2, _IDLE_WAIT_MS[1]) if idle else _IDLE_WAIT_MS[0]
            self._drain(idle_ms if idle else 0)
            self.work.post(self.rank, 0 if self.masked else len(self._active))
            self._apply_faults()
            if self._drain_reason is not None:
                self._begin_leave(self._drain_reason)
            if not self._boundary():
                self._drain(100)
                continue
            if self.masked:
                # alive and connected (heartbeats go on) but no longer taking part in any step
                time.sleep(_IDLE_WAIT_MS[1] / 1000)
                self.agent.check_store_views()
                continue
            if self.leaving:
                return self._leave()
            if self.faults.slow_ms > 0 and self.step >= self.faults.slow_from_step:
                time.sleep(self.faults.slow_ms / 1000.0)
            self._one_step()

    def _leave(self) -> int:
        """Graceful leave: leave the membership while still stepping (peers may dispatch to this
        rank until the view without it commits), linger for the copies, exit 0."""
        future = self.agent.request_leave("scale-down")
        deadline = time.monotonic() + self.config.join_timeout_s
        while not future.done() and time.monotonic() < deadline:
            self._drain(0)
            try:
                self._one_step()
            except AgentFenced:
                break  # the view without this rank is committed: that is the leave
            if self.agent.newer_view():
                break  # the epoch we stepped in is over; we take no part in the next
        self.agent.finish_leave(future)
        self._drain(20)
        self._send(P.Goodbye(rank=self.rank, incarnation=self.incarnation, steps=self.step))
        return 0

    def _fence_exit(self) -> int:
        print(f"rank {self.rank}: fenced: {self.fenced}", file=sys.stderr)
        return 3

    def close(self) -> None:
        self.agent.stop(timeout=2.0)
        self._sock.close(linger=500)


class _RankHooks(EngineHooks):
    """The reference engine's side of the agent: its model and kernel."""

    def __init__(self, server: EPRankServer):
        self.server = server
        self._inter = 0

    def placement(self):
        return self.server.model.placement

    def expert_layout(self):
        """The transformers layout (gate, up, down per slot) of this rank's slots."""
        import torch

        from elasticep.transfer import ExpertLayout

        model, config = self.server.model, self.server._model_config
        self._inter = config.moe_intermediate_size
        return ExpertLayout.deepseek(num_layers=len(model.moe_layers), slots_per_rank=model.placement.slots_per_rank,
                                     hidden_size=config.hidden_size,
                                     moe_intermediate_size=config.moe_intermediate_size, dtype=torch.float32)

    def read_expert(self, layer: int, slot: int):
        t = self.server.model.slot_tensors(layer, slot)
        return {"gate_proj": t["w13"][: self._inter], "up_proj": t["w13"][self._inter:], "down_proj": t["w2"]}

    def disk_source(self):
        from elasticep.transfer import DiskSource

        return DiskSource(self.server.spec.model_path, layer_offset=self.server._model_config.first_k_dense_replace)

    def expert_checksums(self):
        """Every expert's correct bytes: a replica that is not what the plan says (a peer that
        committed a different epoch) is refused and the next source tried."""
        from elasticep.transfer import expert_crc32

        ckpt = self.server.model.checkpoint
        out = {}
        for layer in range(len(self.server.model.moe_layers)):
            for e in range(self.server._model_config.n_routed_experts):
                t = ckpt.expert(layer, e)
                gate, up = t["w13"].chunk(2, dim=0)
                out[(layer, e)] = expert_crc32([gate.contiguous(), up.contiguous(), t["w2"].contiguous()])
        return out

    def on_view(self, view) -> None:
        """The epoch being served is over: nobody waits on anybody in it any more. A serving
        thread blocked on a dead peer, or on a live one that already parked at its step boundary
        to reconfigure, returns at once; its step fails its check and is rolled back."""
        buf = self.server.ep.buffer
        if buf is None:
            return
        mask = buf.active_ranks
        for r in range(mask.numel()):
            if r != self.server.rank and int(mask[r]) != 0:
                mask[r] = 0

    def commit(self, change: Commit) -> None:
        """Staged weights, placement, live mask and kernel epoch, at once."""
        import torch

        model = self.server.model
        for s in change.staged:
            t = s.tensors
            model.load_slot(s.layer, s.slot, s.expert,
                            {"w13": torch.cat([t["gate_proj"], t["up_proj"]], dim=0), "w2": t["down_proj"]})
        model.set_placement(change.placement, list(change.alive), epoch=change.epoch)

    def drain(self, reason: str) -> None:
        """The operator door asked this rank to leave: the serving thread begins the same
        graceful leave as a launcher's ``Retire`` at its next loop."""
        self.server._drain_reason = reason

    def kernel_timeouts(self):
        """The kernel's timeout records since the last call, as ``PeerTimeout`` (uncertain; the
        membership corroborates them with other observers and with heartbeat silence)."""
        from elasticep.events import PeerTimeout

        server = self.server
        buf = server.ep.buffer
        if buf is None:
            return []
        if buf is not server._timeout_buffer:
            server._timeout_buffer, server._timeout_cursor = buf, 0
        records, server._timeout_cursor = buf.timeouts_since(server._timeout_cursor)
        return [PeerTimeout(observer=server.rank, peer=t.peer, op=t.op, layer=t.layer, waited_us=t.waited_us)
                for t in records]


def run_ep_rank(spec: P.RankSpec) -> int:
    server = EPRankServer(spec)
    try:
        return server.serve()
    finally:
        server.close()
