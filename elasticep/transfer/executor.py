"""The weight-transfer executor: loads the experts a plan moves into this rank's slots.

Each rank runs one :class:`TransferExecutor` over its :class:`~elasticep.transfer.ExpertWeights`.
For every move whose destination slot is on this rank it pulls the expert's tensors from the
cheapest source that works, in order: a replica slot on a live rank (a local slot is a memory
copy), each host backup that holds the expert (a rank's :class:`~elasticep.transfer.BackupStore`
or a backup process), then the safetensors on disk. Moves that read from
the same peer go out as one batched, asynchronous read; batches to different peers run at once.
A source that fails (killed, hung past ``MC_TRANSFER_TIMEOUT``, or a checksum mismatch) yields a
:class:`~elasticep.events.TransferFailed` event and the move goes to its next source.

Transfers are epoch-tagged: the executor holds the current view epoch, refuses work for an older
one with :class:`StaleEpoch` (counted in ``elasticep_stale_epoch_refused_total{channel="transfer"}``)
and abandons a running job as soon as a newer epoch is installed, so nothing planned for an
abandoned view completes as if it were current.

Peers learn where each other's buffers are from :class:`~elasticep.events.TransferEndpoint`
events: :meth:`TransferExecutor.endpoint` makes this rank's, :meth:`TransferExecutor.learn`
takes a peer's or a host backup's. The caller carries them over the bus.

Pull, not push: the destination drives every copy, so it alone decides when to fall back, and a
host backup or a disk needs no agent of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from elasticep import metrics
from elasticep.errors import StaleEpoch
from elasticep.events import TransferEndpoint, TransferFailed
from elasticep.transfer.backup import backup_source_buffers
from elasticep.transfer.layout import ExpertLayout, ExpertWeights, expert_crc32
from elasticep.transfer.sources import SOURCE_KINDS, DiskSource
from elasticep.transfer.transport import Transport, TransportError

__all__ = [
    "ExpertMove",
    "MoveLike",
    "MoveResult",
    "SourcesExhausted",
    "StagedExperts",
    "StaleEpoch",
    "StaleTransfer",
    "TransferExecutor",
    "TransferJob",
    "TransferReport",
]


@runtime_checkable
class MoveLike(Protocol):
    """A move as the planner makes it (``elasticep.eplb.Move`` qualifies).

    ``slot`` is the destination physical slot (rank ``slot // slots_per_rank``), ``expert`` the
    logical expert to load and ``sources`` the physical slots of live replicas, best first.
    """

    layer: int
    slot: int
    expert: int
    sources: Sequence[int]


@dataclass(frozen=True)
class ExpertMove:
    """A plain move, for callers without a planner's plan; see :class:`MoveLike`."""

    layer: int
    slot: int
    expert: int
    sources: tuple[int, ...] = ()


@dataclass(frozen=True)
class MoveResult:
    """A move done: where the bytes came from (``source_kind`` and ``source_rank``; -1 for disk)."""

    layer: int
    slot: int
    expert: int
    source_kind: str
    source_rank: int
    nbytes: int


@dataclass
class TransferReport:
    """What one job did, for the pipeline's timeline and logs."""

    epoch: int
    moved: list[MoveResult] = field(default_factory=list)
    failures: list[TransferFailed] = field(default_factory=list)
    """Every failed attempt, one event each, in the order they happened; publish them."""
    unrecoverable: list[MoveLike] = field(default_factory=list)
    """Moves for which every source failed."""
    bytes: int = 0
    seconds: float = 0.0

    def by_source(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for m in self.moved:
            counts[m.source_kind] += 1
        return dict(counts)

    def bytes_by_source(self) -> dict[str, int]:
        """Bytes moved per source kind, every kind of ``SOURCE_KINDS`` present (0 if unused)."""
        counts = {kind: 0 for kind in SOURCE_KINDS}
        for m in self.moved:
            counts[m.source_kind] = counts.get(m.source_kind, 0) + m.nbytes
        return counts


class StaleTransfer(StaleEpoch):
    """A transfer for ``epoch`` was refused or abandoned because the executor is at ``current``.

    A :class:`elasticep.errors.StaleEpoch` on channel ``"transfer"``, with the partial
    ``report`` of an abandoned job.
    """

    def __init__(self, epoch: int, current: int, *, report: TransferReport | None = None) -> None:
        super().__init__(
            "transfer", epoch, current, f"transfer for epoch {epoch} refused: the executor is at epoch {current}"
        )
        self.epoch = epoch
        self.report = report


class SourcesExhausted(RuntimeError):
    """Every source of some moves failed; ``report.unrecoverable`` lists them."""

    def __init__(self, report: TransferReport) -> None:
        moves = ", ".join(f"(layer {m.layer}, expert {m.expert} -> slot {m.slot})" for m in report.unrecoverable)
        super().__init__(f"no source could provide {len(report.unrecoverable)} experts: {moves}")
        self.report = report


@dataclass(frozen=True)
class _Source:
    kind: str  # "replica" (remote or local), "host", "disk"
    rank: int  # global rank, a host backup's negative rank, or -1 for disk
    peer: str = ""  # transfer engine address; "" for local copies and disk
    local_slot: int = -1  # slot index inside the source's buffers (replica: slot % spr; host: expert)
    buffers: Mapping[str, tuple[int, int]] | None = None
    local_weights: ExpertWeights | None = None  # a local copy's source buffers (None: the serving ones)


@dataclass(frozen=True, eq=False)
class _Batch:
    """A submitted engine batch not yet waited for (waited inline or handed to a worker)."""

    id: int


class _MoveState:
    __slots__ = ("move", "candidates", "index", "dst", "dst_slot")

    def __init__(self, move: MoveLike, candidates: list[_Source], dst: ExpertWeights, dst_slot: int) -> None:
        self.move = move
        self.candidates = candidates
        self.index = 0
        self.dst = dst  # the serving buffers, or a staging area
        self.dst_slot = dst_slot

    @property
    def source(self) -> _Source | None:
        return self.candidates[self.index] if self.index < len(self.candidates) else None


class TransferJob:
    """A running transfer; :meth:`result` blocks for its :class:`TransferReport`, bounded."""

    def __init__(self, epoch: int, future: cf.Future) -> None:
        self.epoch = epoch
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float | None = None) -> TransferReport:
        """The report; raises :class:`StaleEpoch` if abandoned, :class:`SourcesExhausted` if some
        move had no working source, ``TimeoutError`` after ``timeout`` seconds."""
        return self.future.result(timeout)

    async def wait(self) -> TransferReport:
        """Await the report from an event loop (the transfer runs on the executor's threads)."""
        return await asyncio.wrap_future(self.future)


class TransferExecutor:
    """Moves expert weights into ``rank``'s ``weights``; see the module docs.

    ``transport`` is this process's started :class:`MooncakeTransport`; the executor registers
    ``weights`` with it. ``disk`` is the last-resort source. ``checksums`` maps
    ``(layer, expert)`` to the :func:`~elasticep.transfer.expert_crc32` of the expert's correct
    bytes: when given, every loaded expert is verified and a mismatch counts as a failed source.
    ``on_submit(kind, rank, phase)``, if given, is called on the job's thread just before
    (``phase="submitting"``) and just after (``"submitted"``) each batch to a remote source is
    handed to the engine: for tracing, and for tests that stop or kill a source mid-transfer.

    Thread-safety: :meth:`learn`, :meth:`forget` and :meth:`advance` may be called from any
    thread while a job runs; one job runs at a time per executor.
    """

    def __init__(
        self,
        rank: int,
        weights: ExpertWeights,
        transport: Transport,
        *,
        epoch: int = 0,
        disk: DiskSource | None = None,
        checksums: Mapping[tuple[int, int], int] | None = None,
        on_submit: Callable[[str, int, str], None] | None = None,
        max_workers: int = 8,
    ) -> None:
        self.rank = rank
        self.weights = weights
        self.layout = weights.layout
        self.transport = transport
        self.disk = disk
        self.checksums = checksums
        self.on_submit = on_submit
        self._epoch = epoch
        self._lock = threading.Lock()
        self._ranks: dict[int, TransferEndpoint] = {}
        self._hosts: dict[int, TransferEndpoint] = {}
        self._pool = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"elasticep-transfer-{rank}")
        self._job_lock = threading.Lock()
        for address, nbytes in weights.regions():
            transport.register(address, nbytes)
        # A few registered bytes that connect() reads peers' first bytes into.
        self._scratch = torch.zeros(64, dtype=torch.uint8)
        transport.register(self._scratch.data_ptr(), self._scratch.numel())
        self.backups = None  # this rank's BackupStore, once attached

    def attach_backups(self, store) -> None:
        """Serve ``store`` (this rank's :class:`~elasticep.transfer.BackupStore`, registered with
        the same transport) to peers through :meth:`endpoint`, and read it as a local source."""
        self.backups = store

    # --- epoch and endpoints -----------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    def advance(self, epoch: int) -> None:
        """Install view ``epoch``; a running job for an older epoch is abandoned. Never goes back."""
        with self._lock:
            if epoch < self._epoch:
                metrics.STALE_EPOCH_REFUSED.labels(channel="transfer").inc()
                raise StaleTransfer(epoch, self._epoch)
            self._epoch = epoch

    def endpoint(self, epoch: int | None = None) -> TransferEndpoint:
        """This rank's :class:`TransferEndpoint` (its buffers and engine address), to publish."""
        buffers = self.weights.endpoint_buffers()
        if self.backups is not None:
            buffers.update(self.backups.endpoint_buffers())
        return TransferEndpoint(
            rank=self.rank,
            epoch=self._epoch if epoch is None else epoch,
            peer=self.transport.peer,
            buffers=buffers,
        )

    def learn(self, endpoint: TransferEndpoint) -> bool:
        """Take a peer's or host backup's endpoint; an older one than already known is refused
        (returns False, counted under ``channel="endpoint"``)."""
        table = self._hosts if endpoint.rank < 0 else self._ranks
        with self._lock:
            known = table.get(endpoint.rank)
            if known is not None and endpoint.epoch < known.epoch:
                metrics.STALE_EPOCH_REFUSED.labels(channel="endpoint").inc()
                return False
            table[endpoint.rank] = endpoint
            return True

    def connect(self, rank: int) -> bool:
        """Open the engine's connection to ``rank``'s (or a backup's) endpoint now; True if it works.

        The engine handshakes with a peer on the first transfer to it, and a handshake with a
        peer that hangs blocks for about a minute, beyond ``MC_TRANSFER_TIMEOUT``. Connecting to
        every peer while the cluster is healthy (e.g. when its endpoint is learnt, off the event
        loop) leaves only the transfer itself to bound when a source fails later.
        """
        with self._lock:
            ep = self._hosts.get(rank) if rank < 0 else self._ranks.get(rank)
        if ep is None or not ep.buffers:
            return False
        address, nbytes = next(iter(ep.buffers.values()))
        n = min(nbytes, self._scratch.numel())
        try:
            batch = self.transport.submit_read(ep.peer, [self._scratch.data_ptr()], [address], [n])
        except TransportError:
            return False
        return self.transport.wait(batch)

    def forget(self, rank: int) -> None:
        """Drop a dead rank's (or retired backup's) endpoint."""
        with self._lock:
            self._ranks.pop(rank, None)
            self._hosts.pop(rank, None)

    # --- running ------------------------------------------------------------------------------

    def run(
        self,
        moves: Iterable[MoveLike],
        *,
        epoch: int,
        alive: Collection[int] | None = None,
        timeout: float | None = None,
    ) -> TransferReport:
        """Load ``moves`` (see :meth:`submit`) on the calling thread and return the report.

        Each wait is bounded by the engine's ``MC_TRANSFER_TIMEOUT`` per source; ``timeout``
        (seconds), if given, stops trying further sources once it has passed.
        """
        states = self._prepare(moves, epoch, alive)
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._drive_inner(epoch, states, deadline)

    async def run_async(
        self, moves: Iterable[MoveLike], *, epoch: int, alive: Collection[int] | None = None
    ) -> TransferReport:
        """:meth:`submit` and await the report without blocking the event loop."""
        return await self.submit(moves, epoch=epoch, alive=alive).wait()

    def submit(self, moves: Iterable[MoveLike], *, epoch: int, alive: Collection[int] | None = None) -> TransferJob:
        """Start loading every move of ``moves`` whose destination slot is on this rank.

        ``moves`` may be a whole plan's moves: those for other ranks are skipped, and a replica
        slot that some move of the plan overwrites is never read (its bytes may change under the
        read). ``alive``, if given, restricts replica sources to those ranks. An ``epoch`` older
        than the executor's raises :class:`StaleEpoch` at once; a newer one is installed.
        """
        states = self._prepare(moves, epoch, alive)
        future = self._pool.submit(self._drive_inner, epoch, states, None)
        return TransferJob(epoch, future)

    def _mine(self, moves: Iterable[MoveLike]) -> list[MoveLike]:
        spr = self.layout.slots_per_rank
        mine = [m for m in moves if m.slot // spr == self.rank]
        for m in mine:
            if m.layer not in self.weights.layers:
                raise ValueError(f"move to layer {m.layer}, which rank {self.rank} does not hold")
        return mine

    def _prepare(
        self,
        moves: Iterable[MoveLike],
        epoch: int,
        alive: Collection[int] | None,
        staging: "StagedExperts | None" = None,
    ) -> list[_MoveState]:
        self.advance(epoch)
        moves = list(moves)
        # Loading straight into serving slots, a slot the plan overwrites may change under a
        # read; loading into staging, nothing changes before the commit, so every slot is safe.
        overwritten = set() if staging is not None else {(m.layer, m.slot) for m in moves}
        spr = self.layout.slots_per_rank
        alive_set = None if alive is None else set(alive)
        states = []
        for m in self._mine(moves):
            if staging is None:
                dst, dst_slot = self.weights, m.slot % spr
            else:
                dst, dst_slot = staging.weights, staging.index[(m.layer, m.slot)]
            states.append(_MoveState(m, self._candidates(m, overwritten, alive_set), dst, dst_slot))
        return states

    def stage_moves(
        self,
        moves: Iterable[MoveLike],
        *,
        epoch: int,
        alive: Collection[int] | None = None,
        timeout: float | None = None,
    ) -> "StagedExperts":
        """Load this rank's moves into a new staging area instead of the serving slots.

        The serving buffers (and every peer's) keep serving the old placement until the commit,
        when :meth:`StagedExperts.apply` copies the staged experts into their slots. Raises as
        :meth:`run` does; the returned object's ``report`` says where each expert came from.
        """
        moves = list(moves)
        staging = StagedExperts(self.layout, self._mine(moves), self.transport)
        try:
            states = self._prepare(moves, epoch, alive, staging)
            deadline = None if timeout is None else time.monotonic() + timeout
            staging.report = self._drive_inner(epoch, states, deadline)
        except BaseException:
            staging.release()
            raise
        return staging

    async def stage(self, plan: object, epoch: int) -> "StagedExperts":
        """The reconfiguration pipeline's weights phase: stage ``plan.moves`` for ``epoch``.

        ``plan`` is the planner's :class:`~elasticep.eplb.Plan` (its ``alive`` mask restricts
        replica sources) or anything with ``moves``. Runs on a worker thread; the event loop
        stays free.
        """
        alive_mask = getattr(plan, "alive", None)
        alive = None if alive_mask is None else [int(r) for r in torch.as_tensor(alive_mask).nonzero().flatten()]
        moves = list(plan.moves)  # type: ignore[attr-defined]
        return await asyncio.to_thread(self.stage_moves, moves, epoch=epoch, alive=alive)

    def load_into(
        self,
        pairs: Sequence[tuple[int, int]],
        dst: ExpertWeights,
        slot_of: Mapping[tuple[int, int], int],
        *,
        sources: Mapping[tuple[int, int], Sequence[int]],
        epoch: int,
        alive: Collection[int] | None = None,
        timeout: float | None = None,
    ) -> TransferReport:
        """Load experts into buffers that are not serving slots (a :class:`BackupStore`'s).

        Each ``(layer, expert)`` of ``pairs`` goes to slot ``slot_of[pair]`` of ``dst``, from
        the cheapest source that works, as for a move: the physical slots ``sources[pair]`` of
        live replicas, then host backups, then disk. Raises as :meth:`run` does.
        """
        self.advance(epoch)
        alive_set = None if alive is None else set(alive)
        states = []
        for layer, expert in pairs:
            move = ExpertMove(layer, -1, expert, tuple(sources.get((layer, expert), ())))
            states.append(_MoveState(move, self._candidates(move, set(), alive_set), dst, slot_of[(layer, expert)]))
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._drive_inner(epoch, states, deadline)

    def close(self) -> None:
        """Stop the worker threads (after the last job) and unregister the weights."""
        self._pool.shutdown(wait=True)
        for address, _ in self.weights.regions():
            self.transport.unregister(address)
        self.transport.unregister(self._scratch.data_ptr())

    # --- internals ----------------------------------------------------------------------------

    def _candidates(self, move: MoveLike, overwritten: set[tuple[int, int]], alive: set[int] | None) -> list[_Source]:
        spr = self.layout.slots_per_rank
        out: list[_Source] = []
        with self._lock:
            ranks = dict(self._ranks)
            hosts = sorted(self._hosts.items(), key=lambda kv: -kv[0])  # backup 0 first
        for slot in move.sources:
            if (move.layer, slot) in overwritten:
                continue
            rank = slot // spr
            if alive is not None and rank not in alive:
                continue
            if rank == self.rank:
                out.append(_Source("replica", rank, local_slot=slot % spr))
            elif rank in ranks:
                ep = ranks[rank]
                out.append(_Source("replica", rank, ep.peer, slot % spr, ep.buffers))
        # host-memory backups kept by serving ranks: this rank's own (a memory copy) first
        store = self.backups
        local = None if store is None else store.index.get((move.layer, move.expert))  # one read: a sync may run
        if local is not None:
            out.append(_Source("host", self.rank, local_slot=local, local_weights=store.weights))
        for rank in sorted(ranks):
            if rank == self.rank or (alive is not None and rank not in alive):
                continue
            ep = ranks[rank]
            bufs = backup_source_buffers(ep, self.layout, move.layer, move.expert)
            if bufs is not None:
                out.append(_Source("host", rank, ep.peer, 0, bufs))
        names = [self.layout.buffer_name(move.layer, t.name) for t in self.layout.tensors]
        for rank, ep in hosts:
            if all(n in ep.buffers for n in names):
                out.append(_Source("host", rank, ep.peer, move.expert, ep.buffers))
        if self.disk is not None and self.disk.has(move.layer, move.expert, [t.name for t in self.layout.tensors]):
            out.append(_Source("disk", -1))
        return out

    def _remote_batch(self, states: list[_MoveState]) -> tuple[list[int], list[int], list[int]]:
        local: list[int] = []
        remote: list[int] = []
        lengths: list[int] = []
        for st in states:
            src = st.source
            assert src is not None and src.buffers is not None
            m = st.move
            for t in self.layout.tensors:
                name = self.layout.buffer_name(m.layer, t.name)
                base, size = src.buffers[name]
                if size < (src.local_slot + 1) * t.nbytes:
                    raise TransportError(f"{name} on rank {src.rank} is {size} bytes, too small for slot {src.local_slot}")
                addr, nbytes = st.dst.address(m.layer, st.dst_slot, t.name)
                local.append(addr)
                remote.append(base + src.local_slot * t.nbytes)
                lengths.append(nbytes)
        return local, remote, lengths

    def _copy_local(self, states: list[_MoveState]) -> bool:
        spr = self.layout.slots_per_rank
        for st in states:
            m = st.move
            weights = st.source.local_weights if st.source.local_weights is not None else self.weights
            src, dst = weights.expert(m.layer, st.source.local_slot), st.dst.expert(m.layer, st.dst_slot)
            for name, t in dst.items():
                t.copy_(src[name])
        return True

    def _read_disk(self, states: list[_MoveState]) -> bool:
        assert self.disk is not None
        spr = self.layout.slots_per_rank
        for st in states:
            m = st.move
            self.disk.read_into(m.layer, m.expert, st.dst.expert(m.layer, st.dst_slot))
        return True

    def _start(self, key: tuple[str, int], states: list[_MoveState]) -> "cf.Future | _Batch":
        kind, rank = key
        src = states[0].source
        assert src is not None
        if kind == "disk":
            return self._pool.submit(self._read_disk, states)
        if src.peer == "":
            return self._pool.submit(self._copy_local, states)
        local, remote, lengths = self._remote_batch(states)
        if self.on_submit is not None:
            self.on_submit(kind, rank, "submitting")
        batch = self.transport.submit_read(src.peer, local, remote, lengths)
        if self.on_submit is not None:
            self.on_submit(kind, rank, "submitted")
        return _Batch(batch)

    def _wait_inline(self, batch: "_Batch") -> cf.Future:
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(self.transport.wait(batch.id))
        except (OSError, RuntimeError) as exc:
            fut.set_exception(exc)
        return fut

    def _verify(self, st: _MoveState) -> bool:
        move = st.move
        if self.checksums is None:
            return True
        want = self.checksums.get((move.layer, move.expert))
        if want is None:
            return True
        return expert_crc32(st.dst.expert(move.layer, st.dst_slot).values()) == want

    def _drive_inner(self, epoch: int, states: list[_MoveState], deadline: float | None) -> TransferReport:
        with self._job_lock:
            started = time.monotonic()
            report = TransferReport(epoch=epoch)
            inflight: dict[cf.Future, tuple[str, list[_MoveState]]] = {}
            batches: dict[_Batch, tuple[str, list[_MoveState]]] = {}

            def fail(st: _MoveState, reason: str) -> None:
                src = st.source
                assert src is not None
                m = st.move
                metrics.TRANSFER_FAILURES.labels(source=src.kind, reason=reason).inc()
                report.failures.append(
                    TransferFailed(
                        epoch=epoch, src=src.rank, dst=self.rank, layer=m.layer, expert=m.expert,
                        reason=reason, source_kind=src.kind,
                    )
                )
                st.index += 1

            def launch(batch: list[_MoveState]) -> None:
                groups: dict[tuple[str, int], list[_MoveState]] = defaultdict(list)
                for st in batch:
                    src = st.source
                    if src is None:
                        report.unrecoverable.append(st.move)
                        continue
                    groups[(src.kind, src.rank)].append(st)
                for key, group in groups.items():
                    try:
                        fut = self._start(key, group)
                    except TransportError as exc:
                        for st in group:
                            fail(st, f"submit: {exc}"[:200])
                        launch(group)
                        continue
                    if isinstance(fut, _Batch):
                        batches[fut] = (key[0], group)
                    else:
                        inflight[fut] = (key[0], group)

            launch(states)
            abandoned = False
            while inflight or batches:
                if len(batches) == 1 and not inflight:
                    # One batch to one peer (the common case): wait for it on this thread,
                    # with no hand-off to a worker.
                    [(batch, (kind, group))] = batches.items()
                    batches.clear()
                    done_items = [(kind, group, self._wait_inline(batch))]
                else:
                    for batch, item in batches.items():
                        inflight[self._pool.submit(self.transport.wait, batch.id)] = item
                    batches.clear()
                    done, _ = cf.wait(list(inflight), return_when=cf.FIRST_COMPLETED)
                    done_items = [(*inflight.pop(fut), fut) for fut in done]
                retry: list[_MoveState] = []
                for kind, group, fut in done_items:
                    try:
                        ok = bool(fut.result())
                        reason = "transfer failed"
                    except (OSError, RuntimeError, KeyError, ValueError) as exc:
                        ok, reason = False, f"{type(exc).__name__}: {exc}"[:200]
                    for st in group:
                        if ok and not self._verify(st):
                            fail(st, "checksum mismatch")
                            retry.append(st)
                        elif ok:
                            m = st.move
                            nbytes = self.layout.expert_nbytes
                            report.moved.append(MoveResult(m.layer, m.slot, m.expert, kind, st.source.rank, nbytes))
                            report.bytes += nbytes
                            metrics.EXPERTS_MOVED.labels(source=kind).inc()
                            metrics.TRANSFER_BYTES.labels(source=kind).inc(nbytes)
                        else:
                            fail(st, reason)
                            retry.append(st)
                # Never start more work for a view that has been superseded; what is in flight
                # is still waited for, because the engine writes into our buffers until it ends.
                if self._epoch > epoch:
                    abandoned = True
                if deadline is not None and time.monotonic() > deadline and retry:
                    # Out of time: the remaining sources are not tried.
                    report.unrecoverable.extend(st.move for st in retry)
                    retry = []
                if retry and not abandoned:
                    launch(retry)
            report.seconds = time.monotonic() - started
            if abandoned or self._epoch > epoch:
                metrics.STALE_EPOCH_REFUSED.labels(channel="transfer").inc()
                raise StaleTransfer(epoch, self._epoch, report=report)
            if report.unrecoverable:
                raise SourcesExhausted(report)
            return report


class StagedExperts:
    """Experts loaded for a plan but not serving yet; :meth:`apply` puts them in place at the commit.

    One staging slot per move to this rank, in a registered :class:`ExpertWeights` of its own
    (``index`` maps ``(layer, destination slot)`` to the staging slot). ``report`` is the
    :class:`TransferReport` of the load. Call :meth:`release` once applied or abandoned.
    """

    def __init__(self, layout: "ExpertLayout", moves: Sequence[MoveLike], transport: Transport) -> None:
        per_layer: dict[int, int] = defaultdict(int)
        self.index: dict[tuple[int, int], int] = {}
        for m in moves:
            self.index[(m.layer, m.slot)] = per_layer[m.layer]
            per_layer[m.layer] += 1
        self.moves = list(moves)
        self.slots_per_rank = layout.slots_per_rank
        self.weights = ExpertWeights.allocate(
            layout.with_slots(max(per_layer.values(), default=1)), layers=sorted(per_layer) or [0]
        )
        self.transport = transport
        self.report: TransferReport | None = None
        self._released = False
        for address, nbytes in self.weights.regions():
            transport.register(address, nbytes)

    def expert(self, layer: int, slot: int) -> dict[str, "torch.Tensor"]:
        """The staged tensors for destination ``slot`` of ``layer``."""
        return self.weights.expert(layer, self.index[(layer, slot)])

    def apply(self, weights: ExpertWeights) -> int:
        """Copy every staged expert into its slot of ``weights`` (the serving buffers); return bytes.

        Called by the engine's commit at a step boundary, on every rank of the view at once.
        """
        total = 0
        for (layer, slot), staged in self.index.items():
            for name, t in self.weights.expert(layer, staged).items():
                weights.tensor(layer, slot % self.slots_per_rank, name).copy_(t)
                total += t.numel() * t.element_size()
        return total

    def release(self) -> None:
        """Unregister and drop the staging memory (idempotent)."""
        if not self._released:
            self._released = True
            for address, _ in self.weights.regions():
                self.transport.unregister(address)
