"""A rank of the expert-parallel reference engine: kernel lockstep, membership, reconfiguration.

This is what a launcher rank runs with ``backend="kernel"``. Each process holds only its own
physical expert slots; the ranks of the current view step in lockstep through the CPU kernel
(:class:`~elasticep.engine.ep.KernelEP`): every step, every member runs one forward, a decode
step of one of its own requests (data-parallel attention) or an idle step with zero tokens, so
every MoE layer's dispatch and combine has all members.

Two threads per process:

* the **serving thread** (the process's main thread) owns the request socket to the launcher's
  router and the model, and runs the step loop;
* the **control thread** runs an asyncio loop with the ZeroMQ bus (CURVE, per-rank keys handed
  out by the launcher), the :class:`~elasticep.membership.MembershipService` (views committed on
  the launcher's TCPStore), a subscription to the launcher's process-exit reports, and the
  :class:`~elasticep.reconfig.ReconfigPipeline` runs.

Failure path: a peer dies (or hangs, or stops taking part). The launcher reports the exit (a
certain signal), or the kernel's bounded waits time out (``PeerTimeout``, published and
corroborated) and heartbeats go silent. The membership service commits a view without the peer;
on install the control thread zeroes the peer in the kernel's live mask, so a serving thread that
waits on it returns at once. The step that lost the peer fails its check
(:class:`~elasticep.engine.ep.PeersLost`), its KV cache is rolled back, and at the step boundary
the serving thread runs the pipeline for the newest view (plan: the leader's ``replan`` published
on the store; groups: a gloo group over the members; weights: each slot this rank receives is
staged through the Mooncake transfer engine from a live replica, or read from the safetensors
checkpoint; commit: store barrier, then placement, weights and a new kernel epoch in one step)
and replays the step. A newer view during a pipeline abandons it.

A restarted or added rank starts with empty slots and asks to join; the view that admits it runs
the same pipeline on every member, which fills its slots from live replicas, and it enters the
lockstep at the new epoch. A retiring rank finishes its requests, leaves the membership, and
stays up briefly so that survivors can copy its experts before it exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from elasticep.agent.agent import _left_key, _xfer_key, latest_placement, placement_key, plan_key, publish_placement
from elasticep.agent.agent import connect_store as _connect
from elasticep.agent.agent import store_barrier as _store_barrier
from elasticep.bus import BusClosed, new_event_loop
from elasticep.engine import protocol as P
from elasticep.engine.rank import drain_launcher

__all__ = ["EPRankServer", "WORK_FLAGS_MAX", "work_flags_path", "placement_key", "plan_key"]

WORK_FLAGS_MAX = 256
"""Ranks the shared work-flag page has room for."""

_IDLE_WAIT_MS = (5, 100)
"""How long an idle rank waits for a request before taking the next (idle) lockstep step when no
member has work, ms: from the first to the second value, doubling while the cluster stays idle.
Far below the kernel timeout, so a rank with new work waits at most this long for its peers, and
an idle cluster takes ~10 cheap steps a second instead of spinning."""

_VIEW_WAIT_S = 15.0
"""Bound on waiting for the view that excludes a lost peer, s."""

_LEAVE_LINGER_S = 3.0
"""How long a rank that left stays up so that survivors can copy its experts, s (at most)."""


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


@dataclass
class _Plan:
    """What the reconfiguration pipeline carries from ``plan`` to ``commit`` on this rank."""

    epoch: int
    base_epoch: int
    placement: Any
    base: Any
    alive: list[int]
    leaving: list[int]
    moves: list


@dataclass
class _Staged:
    """Weights staged for a commit: ``(moe_layer, slot, expert, {"w13", "w2"})`` per local slot that
    changes, and how many came from each kind of source (``replica``, ``local``, ``disk``...)."""

    slots: list
    sources: dict

    @property
    def detail(self) -> str:
        """One line for the ``weights`` phase event, e.g. ``"3 experts: replica=2 disk=1"``."""
        kinds = " ".join(f"{k}={v}" for k, v in sorted(self.sources.items()))
        return f"{len(self.slots)} experts" + (f": {kinds}" if kinds else "")


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
            ``store`` (``HOST:PORT``), ``kernel_timeout_us`` and ``config`` (JSON overrides of
            :class:`~elasticep.config.Config`).

    Who calls it: :func:`elasticep.engine.rank.run_rank` when ``spec.backend == "kernel"``.
    """

    def __init__(self, spec: P.RankSpec):
        import torch

        from elasticep.bus import ClusterKeys
        from elasticep.config import Config
        from elasticep.engine.ep import KernelEP
        from elasticep.engine.model import RankModel, load_config
        from elasticep.eplb.placement import EMPTY, Placement

        torch.set_num_threads(max(1, spec.torch_threads))
        self.spec = spec
        self.rank = spec.rank
        self.incarnation = spec.incarnation
        self.cluster = spec.cluster
        extra = spec.extra
        self.join = extra.get("join", "0") == "1"
        self.bus_incarnation = int(extra["bus_incarnation"])
        self.keys = ClusterKeys.from_json(extra["bus_keys"])
        self.store_address = extra["store"]
        overrides = json.loads(extra.get("config", "{}"))
        self.config = Config.local(**overrides)
        self.faults = spec.faults
        self.step = 0
        self.masked = False
        self.leaving = False
        self.exhausted: str | None = None
        self.fenced: str | None = None
        self._active: list[tuple[P.Generate, Any]] = []
        self._rr = 0
        self.store = _connect(self.store_address)
        config = load_config(spec.model_path)
        self.max_tokens = 64
        self.ep = KernelEP(
            self.rank,
            cluster_id=self.cluster,
            max_tokens=self.max_tokens,
            hidden=config.hidden_size,
            topk=config.num_experts_per_tok,
            timeout_us=int(extra.get("kernel_timeout_us", self.config.kernel_timeout_us)),
        )
        if self.join:
            # start from the placement the cluster serves now, this rank's slots empty: the view
            # that admits it fills them from live replicas
            base_epoch, base = self._latest_placement(1 << 30)
            if base.num_ranks <= self.rank:
                base = base.with_ranks(self.rank + 1)
            phy = base.phy2log.clone()
            phy[:, list(base.slots_of_rank(self.rank))] = EMPTY
            placement = Placement(phy, base.slots_per_rank, base.num_experts)
            # the ranks that serve the base placement; no step runs before the first commit
            alive = [bool((phy[:, list(placement.slots_of_rank(r))] >= 0).any()) for r in range(placement.num_ranks)]
            self.epoch = 0
            self.model = RankModel(spec.model_path, placement, self.ep, alive=alive, rank=self.rank, epoch=-1)
            self.members: tuple[int, ...] = ()
        else:
            placement = Placement.from_dict(spec.placement)
            self.epoch = 1  # the bootstrap view
            self.model = RankModel(spec.model_path, placement, self.ep, alive=spec.alive, rank=self.rank, epoch=1)
            self.members = tuple(r for r, a in enumerate(spec.alive) if a)
        self.work = _WorkFlags(self.cluster)
        self.work.post(self.rank, 0)
        self._setup_transfer(spec.model_path, config)
        # view handoff from the control thread
        self._view_lock = threading.Condition()
        self._latest_view = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._control_ready = threading.Event()
        self._control_error: BaseException | None = None
        self._leave_future = None
        self._timeout_buffer = None
        self._timeout_cursor = 0
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, P.identity(spec.rank, spec.incarnation))
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.connect(spec.frontend)
        self._control = threading.Thread(target=self._control_main, name=f"elasticep-control-{self.rank}", daemon=True)

    # ------------------------------------------------------------------ weights and transfer

    def _setup_transfer(self, model_path: str, config) -> None:
        """Register this rank's expert buffers with the Mooncake transfer engine.

        Two sets of buffers in the transformers layout (gate, up, down per slot):

        * the *mirror* of the served weights, what peers read when one of these slots is the live
          replica of an expert they must load. It changes only at a commit, so a replica stays
          readable through a whole reconfiguration even when the plan gives its slot another
          expert (the commit barrier orders every peer's reads before it);
        * the *staging* buffers the executor writes the experts this rank receives into.
        """
        import torch

        from elasticep.transfer import DiskSource, ExpertLayout, ExpertWeights, MooncakeTransport, TransferExecutor
        from elasticep.transfer import expert_crc32

        layout = ExpertLayout.deepseek(
            num_layers=len(self.model.moe_layers),
            slots_per_rank=self.model.placement.slots_per_rank,
            hidden_size=config.hidden_size,
            moe_intermediate_size=config.moe_intermediate_size,
            dtype=torch.float32,
        )
        self.mirror = ExpertWeights.allocate(layout)
        self.staging = ExpertWeights.allocate(layout)
        self._inter = config.moe_intermediate_size
        self.disk = DiskSource(model_path, layer_offset=config.first_k_dense_replace)
        # checksums of every expert's correct bytes: a replica that is not what the plan says
        # (a peer that committed a different epoch) is refused and the next source tried
        checksums = {}
        ckpt = self.model.checkpoint
        for layer in range(len(self.model.moe_layers)):
            for e in range(config.n_routed_experts):
                t = ckpt.expert(layer, e)
                gate, up = t["w13"].chunk(2, dim=0)
                checksums[(layer, e)] = expert_crc32([gate.contiguous(), up.contiguous(), t["w2"].contiguous()])
        self.transport = MooncakeTransport("127.0.0.1", timeout_s=max(1, int(self.config.transfer_timeout_s)))
        self.executor = TransferExecutor(self.rank, self.staging, self.transport, epoch=0, disk=self.disk,
                                         checksums=checksums, max_workers=2)
        for address, nbytes in self.mirror.regions():
            self.transport.register(address, nbytes)
        self._sync_mirror()
        from elasticep.events import TransferEndpoint

        endpoint = TransferEndpoint(rank=self.rank, epoch=0, peer=self.transport.peer,
                                    buffers=self.mirror.endpoint_buffers())
        import msgspec

        self.store.set(_xfer_key(self.cluster, self.rank),
                       msgspec.json.encode({"inc": self.bus_incarnation, "ep": msgspec.to_builtins(endpoint)}))

    def _sync_mirror(self) -> None:
        """Copy the served weights of every local slot into the registered mirror."""
        for layer in range(len(self.model.moe_layers)):
            for i, slot in enumerate(self.model.local_slots):
                t = self.model.slot_tensors(layer, slot)
                m = self.mirror.expert(layer, i)
                m["gate_proj"].copy_(t["w13"][: self._inter])
                m["up_proj"].copy_(t["w13"][self._inter :])
                m["down_proj"].copy_(t["w2"])

    def _learn_endpoints(self, members) -> None:
        import msgspec

        from elasticep.events import TransferEndpoint

        for r in members:
            if r == self.rank:
                continue
            key = _xfer_key(self.cluster, r)
            if not self.store.check([key]):
                self.executor.forget(r)
                continue
            raw = json.loads(self.store.get(key))
            self.executor.forget(r)
            self.executor.learn(msgspec.convert(raw["ep"], TransferEndpoint))

    # ------------------------------------------------------------------ placement bookkeeping

    def _latest_placement(self, before: int):
        """``(epoch, Placement)`` committed most recently below epoch ``before``."""
        return latest_placement(self.store, self.cluster, before)

    def _publish_placement(self, epoch: int, placement) -> None:
        publish_placement(self.store, self.cluster, epoch, placement)

    # ------------------------------------------------------------------ control thread

    def _control_main(self) -> None:
        loop = new_event_loop()
        loop.set_debug(False)  # ranks run as in production, whatever the launcher's environment
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._control_run())
        except BaseException as exc:  # reported to the serving thread, which exits
            self._control_error = exc
            self._control_ready.set()
            with self._view_lock:
                self._view_lock.notify_all()

    async def _control_run(self) -> None:
        from elasticep.bus import EventBus, ZmqTransport
        from elasticep.events import ProcessExit, ViewInstalled
        from elasticep.groups import GlooGroups
        from elasticep.membership.service import MembershipService
        from elasticep.membership.store import TCPStoreViewStore
        from elasticep.reconfig import ReconfigPipeline, StoreBarrier

        host, _, port = self.store_address.rpartition(":")
        self.bus_store = _connect(self.store_address)
        transport = ZmqTransport(self.rank, self.keys, self.bus_store, incarnation=self.bus_incarnation,
                                 poll_interval_s=0.2)  # late registrations: joiners, a monitor
        self.bus = EventBus(transport, self.rank)
        view_store = TCPStoreViewStore(host, int(port), timeout_s=self.config.store_timeout_s,
                                       prefix=f"elasticep/{self.cluster}")
        initial = None if self.join else self.members
        self.service = MembershipService(self.rank, self.bus, view_store, self.config, initial_members=initial,
                                         join=self.join, on_install=self._on_install)
        self.groups = GlooGroups(_connect(self.store_address), self.rank, rendezvous_timeout_s=10.0,
                                 prefix=f"elasticep/{self.cluster}/groups")
        self.pipeline = ReconfigPipeline(
            self.rank,
            planner=self._plan,
            engine=_Engine(self),
            groups=self.groups,
            weights=_Weights(self),
            barrier=StoreBarrier(_connect(self.store_address), self.rank, prefix=f"elasticep/{self.cluster}/commit/"),
            publish=self.bus.publish,
            commit_timeout_s=10.0,
        )
        self.pipeline.fence.advance(self.epoch)
        self._ViewInstalled = ViewInstalled
        await self.bus.start()
        # the launcher's certain signal: a process exit, within milliseconds of the kill
        sub = exit_report_socket(
            zmq.asyncio.Context.instance(), self.spec.extra["control"], self.spec.extra["control_key"],
            self.keys, self.rank,
        )
        await self.service.start(ready_timeout=30.0)
        self._control_ready.set()
        import msgspec

        decoder = msgspec.msgpack.Decoder(ProcessExit)
        try:
            while True:
                frame = await sub.recv()
                try:
                    ev = decoder.decode(frame)
                except msgspec.DecodeError:
                    continue
                if ev.rank != self.rank or ev.incarnation != self.bus_incarnation:
                    self.service.report(ev)
        finally:
            sub.close()

    def _on_install(self, view, wall_ns: int) -> None:
        """Control thread, right after the membership service installed ``view``."""
        with self._view_lock:
            self._latest_view = view
            self._view_lock.notify_all()
        # peers outside the view are neither sent to nor waited on from now on: a serving thread
        # blocked on a dead peer returns at once and its step fails its check
        # The epoch being served is over: nobody waits on anybody in it any more. A serving
        # thread blocked on a dead peer, or on a live one that already parked at its step
        # boundary to reconfigure, returns at once; its step fails its check and is rolled back.
        buf = self.ep.buffer
        if buf is not None and view.epoch > self.epoch:
            mask = buf.active_ranks
            for r in range(mask.numel()):
                if r != self.rank and int(mask[r]) != 0:
                    mask[r] = 0
        if hasattr(self, "pipeline"):
            self.pipeline.supersede(view.epoch)
        try:
            self.bus.publish_nowait(self._ViewInstalled(epoch=view.epoch, members=tuple(view.members),
                                                        leader=view.leader, rank=self.rank, reason=view.reason))
        except BusClosed:
            pass  # shutting down: nobody is left to tell

    def _call(self, coro, timeout: float):
        """Run ``coro`` on the control loop from the serving thread; wait at most ``timeout`` s."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ------------------------------------------------------------------ the pipeline's parts

    async def _plan(self, view, current) -> _Plan:
        """Leader: ``replan`` from the last committed placement onto the view; publish it.
        Everyone: read the leader's plan and derive the moves from it (the same everywhere)."""
        import torch

        from elasticep.eplb.placement import Placement, RedundancyExhausted
        from elasticep.eplb.planner import replan

        key = plan_key(self.cluster, view.epoch)
        if view.leader == self.rank:
            base_epoch, base = await asyncio.to_thread(self._latest_placement, view.epoch)
            prev_members = set(r for r in range(base.num_ranks) if bool((base.phy2log[:, list(base.slots_of_rank(r))] >= 0).any()))
            leaving = []
            for r in sorted(prev_members - set(view.members)):
                if await asyncio.to_thread(self.store.check, [_left_key(self.cluster, r)]):
                    leaving.append(r)
            R = max(base.num_ranks, max(view.members) + 1)
            alive = torch.zeros(R, dtype=torch.bool)
            alive[list(view.members)] = True
            alive[leaving] = True
            load = torch.ones(base.num_layers, base.num_experts)
            try:
                plan = replan(base, load, alive, leaving=leaving or None)
                record = {"base_epoch": base_epoch, "placement": plan.placement.to_dict(), "leaving": leaving}
            except RedundancyExhausted as exc:
                record = {"error": str(exc), "needed": exc.needed, "live": exc.live}
            await asyncio.to_thread(self.store.set, key, json.dumps(record))
        else:
            delay = 0.002
            while not await asyncio.to_thread(self.store.check, [key]):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)
            record = json.loads(await asyncio.to_thread(self.store.get, key))
        if "error" in record:
            raise RedundancyExhausted(record["needed"], record["live"], detail=record["error"])
        base_epoch = record["base_epoch"]
        base = Placement.from_dict(json.loads(await asyncio.to_thread(self.store.get, placement_key(self.cluster, base_epoch))))
        new = Placement.from_dict(record["placement"])
        if base.num_ranks < new.num_ranks:
            base = base.with_ranks(new.num_ranks)
        sources_alive = sorted(set(view.members) | set(record["leaving"]))
        return _Plan(view.epoch, base_epoch, new, base, list(view.members), record["leaving"],
                     _moves(base, new, sources_alive))

    def _stage(self, plan: _Plan) -> "_Staged":
        """Load every slot of this rank whose expert changes into the staging buffers, then into
        the model's staging area (:meth:`RankModel.load_slot`); nothing served changes here.

        Sources, cheapest first: a slot of this rank that serves the expert now (a memory copy),
        a live replica on another member (the Mooncake transfer engine reads its served mirror),
        the safetensors checkpoint on disk."""
        import torch

        from elasticep.eplb.placement import EMPTY
        from elasticep.transfer import ExpertMove

        mine, local = [], []
        new = plan.placement.phy2log
        base = plan.base.phy2log
        spr = plan.placement.slots_per_rank
        sources_alive = set(plan.alive) | set(plan.leaving)
        served = {(layer, self.model.slot_expert(layer, s)): s for layer in range(new.shape[0])
                  for s in self.model.local_slots}
        for layer in range(new.shape[0]):
            for slot in self.model.local_slots:
                want = int(new[layer, slot])
                if want == EMPTY or want == self.model.slot_expert(layer, slot):
                    continue
                if (layer, want) in served:
                    local.append((layer, slot, want, served[(layer, want)]))
                    continue
                # replicas on other live ranks, per the placement they serve now; those that keep
                # the expert through the plan first
                src = [int(s) for s in torch.nonzero(base[layer] == want).flatten().tolist()
                       if int(s) // spr in sources_alive and int(s) // spr != self.rank]
                src.sort(key=lambda s: (int(new[layer, s]) != want, s))
                mine.append(ExpertMove(layer, slot, want, tuple(src)))
        report = None
        if mine:
            self._learn_endpoints(set(plan.alive) | set(plan.leaving))
            report = self.executor.run(mine, epoch=plan.epoch, alive=set(plan.alive) | set(plan.leaving),
                                       timeout=self.config.transfer_timeout_s)
            if report.unrecoverable:
                raise RuntimeError(f"no source worked for {len(report.unrecoverable)} experts")
        staged = []
        for m in mine:
            t = self.staging.expert(m.layer, m.slot % spr)
            staged.append((m.layer, m.slot, m.expert, {
                "w13": torch.cat([t["gate_proj"], t["up_proj"]], dim=0), "w2": t["down_proj"].clone()}))
        for layer, slot, want, src_slot in local:
            t = self.model.slot_tensors(layer, src_slot)
            staged.append((layer, slot, want, {"w13": t["w13"].clone(), "w2": t["w2"].clone()}))
        sources = report.by_source() if report is not None else {}
        if local:
            sources["local"] = sources.get("local", 0) + len(local)
        return _Staged(staged, sources)

    def _commit(self, epoch: int, plan: _Plan, staged: "_Staged") -> None:
        """Control thread, the serving thread parked at a step boundary: apply the new epoch."""
        for layer, slot, expert, tensors in staged.slots:
            self.model.load_slot(layer, slot, expert, tensors)
        alive = [r in plan.alive for r in range(plan.placement.num_ranks)]
        self.model.set_placement(plan.placement, alive, epoch=epoch)
        self._sync_mirror()  # peers read the weights served from now on
        self.epoch = epoch
        self.members = tuple(plan.alive)
        self._publish_placement(epoch, plan.placement)

    # ------------------------------------------------------------------ serving thread

    def _send(self, msg) -> None:
        self._sock.send(P.encode(msg))

    def _drain(self, timeout_ms: int) -> None:
        drain_launcher(self._sock, self.rank, self._handle, timeout_ms)

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

        from elasticep.engine.rank import msgspec_replace

        f = self.faults
        due = lambda s: s != P.NEVER and self.step >= s  # noqa: E731
        if due(f.kill_at_step):
            os.kill(os.getpid(), signal.SIGKILL)
        if due(f.hang_at_step):
            self.faults = f = msgspec_replace(f, hang_at_step=P.NEVER)
            os.kill(os.getpid(), signal.SIGSTOP)
        if due(f.mask_at_step):
            self.faults = f = msgspec_replace(f, mask_at_step=P.NEVER)
            self.masked = True
        if due(f.leave_at_step):
            self.faults = f = msgspec_replace(f, leave_at_step=P.NEVER)
            self._begin_leave("fault plan")

    def _fail_all(self, reason: str) -> None:
        for req, _ in self._active:
            self._send(P.Rejected(request_id=req.request_id, reason=reason))
        self._active.clear()
        self.work.post(self.rank, 0)

    def _reconfigure(self) -> bool:
        """At a step boundary: run the pipeline for the newest view until one commits.

        Returns False when this rank must stop (outside the view, or the control thread died).
        """
        from elasticep.eplb.placement import RedundancyExhausted

        while True:
            with self._view_lock:
                view = self._latest_view
            if view is None or view.epoch <= self.epoch:
                return True
            if not self._is_member(view):
                self.fenced = f"view {view.epoch} ({list(view.members)}) does not include rank {self.rank}"
                return False
            result = self._call(self.pipeline.run(view), timeout=60.0)
            if result.status == "committed":
                if self.exhausted is not None:
                    # A view that covers every expert again (a rank rejoined, or one was added):
                    # the plan committed, so serving resumes.
                    print(f"rank {self.rank}: serving resumed at epoch {view.epoch} "
                          f"(was: {self.exhausted})", file=sys.stderr)
                    self.exhausted = None
                continue
            if result.status == "abandoned":
                continue
            if isinstance(result.error, RedundancyExhausted):
                self.exhausted = f"cluster stopped serving: {result.error}"
                print(f"rank {self.rank}: {self.exhausted}", file=sys.stderr)
                self._fail_all(self.exhausted)
                return True
            # a member did not reach the barrier or a rendezvous failed: a newer view is coming
            print(f"rank {self.rank}: reconfiguration for view {view.epoch} failed: {result.error!r}", file=sys.stderr)
            if not self._wait_view(lambda v: v.epoch > view.epoch, _VIEW_WAIT_S):
                raise RuntimeError(f"reconfiguration for view {view.epoch} failed and no newer view came: {result.error!r}")

    def _is_member(self, view) -> bool:
        """Whether this process (not a dead predecessor of the same rank) is in ``view``."""
        return view.has(self.rank, self.bus_incarnation if self.join else 0)

    def _wait_view(self, predicate, timeout_s: float) -> bool:
        """Wait until the newest installed view satisfies ``predicate``; False on timeout.

        Raises :class:`_Fenced` when this rank learns it is outside the committed views: its
        membership service fenced it, or the view store already holds a newer view without it
        (a rank that was stopped, or stopped taking part, and was evicted meanwhile).
        """
        deadline = time.monotonic() + timeout_s
        next_store_check = time.monotonic() + 0.2
        while True:
            with self._view_lock:
                if self._control_error is not None:
                    raise RuntimeError(f"control thread failed: {self._control_error!r}")
                if self._latest_view is not None and predicate(self._latest_view):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._view_lock.wait(min(left, 0.05))
            service = getattr(self, "service", None)
            if service is not None and service.fenced is not None:
                raise _Fenced(str(service.fenced))
            if time.monotonic() >= next_store_check:
                next_store_check = time.monotonic() + 0.2
                self._check_store_views()

    def _check_store_views(self) -> None:
        """Fence if a committed view newer than ours leaves this process out."""
        from elasticep.membership.view import decode_view

        if self.epoch < 1:
            return  # a joining rank is outside every view until the one that admits it
        epoch = self.epoch
        newest = None
        while self.store.check([f"elasticep/{self.cluster}/view/{epoch + 1}"]):
            epoch += 1
            newest = decode_view(self.store.get(f"elasticep/{self.cluster}/view/{epoch}"))
        if newest is not None and not self._is_member(newest):
            raise _Fenced(f"view {newest.epoch} ({list(newest.members)}) in the store leaves rank {self.rank} out")

    def _report_timeouts(self, lost) -> None:
        """Publish the kernel's timeouts as ``PeerTimeout`` (uncertain; the membership core
        corroborates them with other observers and with heartbeat silence)."""
        from elasticep.events import PeerTimeout

        buf = self.ep.buffer
        events = []
        if buf is not None:
            if buf is not self._timeout_buffer:
                self._timeout_buffer, self._timeout_cursor = buf, 0
            records, self._timeout_cursor = buf.timeouts_since(self._timeout_cursor)
            for t in records:
                events.append(PeerTimeout(observer=self.rank, peer=t.peer, op=t.op, layer=t.layer, waited_us=t.waited_us))
        for ev in events:
            self._loop.call_soon_threadsafe(lambda ev=ev: self.service.report(ev, publish=True))

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
            if self._wait_view(lambda v: v.epoch > self.epoch, 0.0):
                return  # the epoch ended under this step: reconfigure, then replay it
            self._report_timeouts(lost.ranks)
            gone = set(lost.ranks)
            ok = self._wait_view(lambda v: v.epoch > self.epoch and not (gone & set(v.members)), _VIEW_WAIT_S)
            if not ok and not self._wait_view(lambda v: v.epoch > self.epoch, 0.0):
                raise RuntimeError(f"ranks {sorted(gone)} stopped answering and no view without them came "
                                   f"within {_VIEW_WAIT_S} s")
            return  # replayed after the reconfiguration at the next boundary
        self.step += 1
        if seq_entry is not None:
            req, seq = seq_entry
            if seq.done:
                self._active.pop(self._rr)
                self._complete(req, seq)
            else:
                self._rr += 1

    def serve(self) -> int:
        """Start membership, join the lockstep, serve until a graceful leave; returns the exit code
        (0 after a leave, 3 when fenced: evicted while alive)."""
        try:
            return self._serve()
        except _Fenced as exc:
            self.fenced = str(exc)
            return self._fence_exit()

    def _serve(self) -> int:
        self._control.start()
        if not self._control_ready.wait(60.0) or self._control_error is not None:
            raise RuntimeError(f"rank {self.rank}: membership did not start: {self._control_error!r}")
        if self.join:
            if not self._wait_view(self._is_member, self.config.join_timeout_s):
                raise RuntimeError(f"rank {self.rank} was not admitted within {self.config.join_timeout_s} s")
            if not self._reconfigure():
                return self._fence_exit()
        else:
            _store_barrier(self.store, f"elasticep/{self.cluster}/ready", len(self.members), 60.0)
        self._send(P.Hello(rank=self.rank, incarnation=self.incarnation, pid=os.getpid(),
                           local_slots=len(self.model.local_slots)))
        idle_ms = _IDLE_WAIT_MS[0]
        while True:
            if self._control_error is not None:
                raise RuntimeError(f"control thread failed: {self._control_error!r}")
            members = self.members
            idle = (not self._active or self.masked) and not self.work.any_work(members)
            idle_ms = min(idle_ms * 2, _IDLE_WAIT_MS[1]) if idle else _IDLE_WAIT_MS[0]
            self._drain(idle_ms if idle else 0)
            self.work.post(self.rank, 0 if self.masked else len(self._active))
            self._apply_faults()
            if not self._reconfigure():
                return self._fence_exit()
            if self.exhausted is not None:
                self._drain(100)
                continue
            if self.service.fenced is not None:
                raise _Fenced(str(self.service.fenced))
            if self.masked:
                # alive and connected (heartbeats go on) but no longer taking part in any step
                time.sleep(_IDLE_WAIT_MS[1] / 1000)
                self._check_store_views()
                continue
            if self.leaving and not self._active:
                return self._leave()
            if self.faults.slow_ms > 0 and self.step >= self.faults.slow_from_step:
                time.sleep(self.faults.slow_ms / 1000.0)
            self._one_step()

    def _leave(self) -> int:
        """Graceful leave: mark the leave on the store (so the leader's plan may read our
        experts), leave the membership while still stepping, linger for the copies, exit 0."""
        self.store.set(_left_key(self.cluster, self.rank), str(self.bus_incarnation))
        future = asyncio.run_coroutine_threadsafe(self.service.leave("scale-down"), self._loop)
        deadline = time.monotonic() + self.config.join_timeout_s
        while not future.done() and time.monotonic() < deadline:
            self._drain(0)
            try:
                self._one_step()
            except _Fenced:
                break  # the view without this rank is committed: that is the leave
            if self._wait_view(lambda v: v.epoch > self.epoch, 0.0):
                break  # the epoch we stepped in is over; we take no part in the next
        try:
            left_view = future.result(timeout=2.0)
        except Exception:
            left_view = None
        until = time.monotonic() + _LEAVE_LINGER_S
        while left_view is not None and time.monotonic() < until:
            if self.store.check([placement_key(self.cluster, left_view.epoch)]):
                break
            time.sleep(0.02)
        self._drain(20)
        self._send(P.Goodbye(rank=self.rank, incarnation=self.incarnation, steps=self.step))
        return 0

    def _fence_exit(self) -> int:
        print(f"rank {self.rank}: fenced: {self.fenced}", file=sys.stderr)
        return 3

    def close(self) -> None:
        self._sock.close(linger=500)


class _Fenced(RuntimeError):
    """This rank process is outside the committed view; it stops serving (exit code 3)."""


class _Engine:
    """The :class:`~elasticep.reconfig.Engine` side of the pipeline for :class:`EPRankServer`."""

    def __init__(self, server: EPRankServer):
        self.server = server

    def current_placement(self):
        return self.server.model.placement

    def commit(self, epoch: int, plan: _Plan, staged: dict, group: Any) -> None:
        self.server._commit(epoch, plan, staged)

    def resume(self, epoch: int) -> None:
        """Nothing to do here: the serving thread, parked at the step boundary, replays the
        interrupted step as soon as the pipeline returns."""


class _Weights:
    def __init__(self, server: EPRankServer):
        self.server = server

    async def stage(self, plan: _Plan, epoch: int) -> _Staged:
        return await asyncio.to_thread(self.server._stage, plan)


def _moves(base, new, alive) -> list:
    """The slots whose expert changes from ``base`` to ``new``, with live sources that keep it."""
    from elasticep.transfer import ExpertMove

    out = []
    spr = new.slots_per_rank
    b, n = base.phy2log, new.phy2log
    for layer in range(n.shape[0]):
        changed = (n[layer] != b[layer]) & (n[layer] >= 0)
        for slot in changed.nonzero().flatten().tolist():
            e = int(n[layer, slot])
            src = [s for s in ((b[layer] == e) & (n[layer] == e)).nonzero().flatten().tolist() if s // spr in alive]
            out.append(ExpertMove(layer, slot, e, tuple(src)))
    return out


def run_ep_rank(spec: P.RankSpec) -> int:
    server = EPRankServer(spec)
    try:
        return server.serve()
    finally:
        server.close()
