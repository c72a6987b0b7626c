"""Host-memory copies of expert weights, served to ranks through the transfer engine.

A :class:`HostBackup` keeps full copies of the experts of some layers in RAM, registered with its
own transfer engine, so that a rank can read a lost expert over the network instead of from
disk. Run it as its own process on a host other than the ranks whose experts it keeps (a host
failure must not take a rank and its backup together), and run two or more, each announcing
itself with a :class:`~elasticep.events.TransferEndpoint`: the executor tries them in turn.

A backup looks like a rank with one slot per logical expert (slot ``e`` holds expert ``e``). Its
endpoint carries a negative rank, ``-1 - backup_id`` (:func:`host_backup_rank`), so it never
collides with a serving rank on the bus.

Serving ranks keep backups too, of experts they do not serve: :func:`plan_backups` (pure) says
which ranks keep which experts, on hosts other than those serving them, within a memory budget
per rank (:func:`backup_slots`); each rank's :class:`BackupStore` holds its share and is re-made
by :meth:`BackupStore.sync` after every view, so the next failure is covered too. The executor
reads them as ``"host"`` sources, after every live replica and before the disk.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from elasticep.eplb.placement import Placement
from elasticep.errors import ElasticEPError, InvalidArgument
from elasticep.events import TransferEndpoint
from elasticep.transfer.layout import ExpertLayout, ExpertWeights
from elasticep.transfer.sources import DiskSource
from elasticep.transfer.transport import MooncakeTransport, Transport

__all__ = [
    "BackupOverBudget",
    "BackupPlan",
    "BackupStore",
    "BackupSync",
    "HostBackup",
    "backup_buffer_name",
    "backup_slots",
    "backup_source_buffers",
    "host_backup_rank",
    "is_host_backup",
    "parse_backup_buffer_name",
    "plan_backups",
    "run_host_backup",
]


def host_backup_rank(backup_id: int) -> int:
    """The (negative) rank a host backup announces itself under."""
    if backup_id < 0:
        raise ValueError("backup_id must be >= 0")
    return -1 - backup_id


def is_host_backup(endpoint: TransferEndpoint) -> bool:
    return endpoint.rank < 0


class HostBackup:
    """Copies of every logical expert of ``layers`` (default all) of ``layout``, in RAM.

    ``layout`` is the ranks' layout; the backup re-slots it to ``num_experts`` slots. The memory
    is registered with ``transport`` (a new :class:`MooncakeTransport` on ``host`` by default).
    Fill it with :meth:`load` (from disk) or :meth:`put`, then publish :meth:`endpoint`.
    """

    def __init__(
        self,
        layout: ExpertLayout,
        num_experts: int,
        *,
        backup_id: int = 0,
        layers: Sequence[int] | None = None,
        transport: Transport | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.backup_id = backup_id
        self.rank = host_backup_rank(backup_id)
        self.num_experts = num_experts
        self.layout = layout.with_slots(num_experts)
        self.weights = ExpertWeights.allocate(self.layout, layers)
        self.transport = transport if transport is not None else MooncakeTransport(host)
        for address, nbytes in self.weights.regions():
            self.transport.register(address, nbytes)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.weights.layers

    def put(self, layer: int, expert: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store one expert's tensors (copied)."""
        for name, t in tensors.items():
            self.weights.tensor(layer, expert, name).copy_(t)

    def load(self, disk: DiskSource) -> int:
        """Read every expert of this backup's layers from ``disk``; return the bytes read."""
        total = 0
        for layer in self.layers:
            for expert in range(self.num_experts):
                total += disk.read_into(layer, expert, self.weights.expert(layer, expert))
        return total

    def endpoint(self, epoch: int) -> TransferEndpoint:
        """The event announcing this backup's buffers, to publish on the bus."""
        return TransferEndpoint(
            rank=self.rank, epoch=epoch, peer=self.transport.peer, buffers=self.weights.endpoint_buffers()
        )


def run_host_backup(
    layout: ExpertLayout,
    num_experts: int,
    checkpoint: Any,
    announce: Any,
    *,
    backup_id: int = 0,
    layers: Sequence[int] | None = None,
    host: str = "127.0.0.1",
    layer_offset: int = 0,
    epoch: int = 0,
    stop: threading.Event | None = None,
) -> None:
    """Process body of a host backup: load from ``checkpoint``, announce, serve until stopped.

    ``checkpoint`` is what :class:`DiskSource` takes; ``announce`` is called once with the
    :class:`~elasticep.events.TransferEndpoint` (e.g. a bus publish, or a pipe's ``send``).
    Serving needs no Python work (the engine answers reads from its own threads), so the process
    then sleeps until ``stop`` is set or it receives SIGTERM.
    """
    backup = HostBackup(layout, num_experts, backup_id=backup_id, layers=layers, host=host)
    backup.load(DiskSource(checkpoint, layer_offset=layer_offset))
    stop = stop if stop is not None else threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    announce(backup.endpoint(epoch))
    while not stop.wait(1.0):
        pass


# --------------------------------------------------------------------------- backups on ranks
#
# Besides backup processes, each serving rank can keep, in host memory, copies of experts it
# does not serve: :func:`plan_backups` decides which rank keeps which (pure), a rank's
# :class:`BackupStore` holds them and announces them in the rank's own transfer endpoint, and the
# executor reads them as ``"host"`` sources, after every live replica and before the disk.

BACKUP_BUFFER_PREFIX = "B"


def backup_buffer_name(layer: int, expert: int, tensor: str) -> str:
    """Endpoint buffer name of one backed-up expert tensor, e.g. ``"B3.17.down_proj"``.

    One entry per expert (not per layer, as a rank's slot buffers are) because a rank's backups
    are a sparse, changing subset of experts: the name says which expert the bytes are.
    """
    return f"{BACKUP_BUFFER_PREFIX}{layer}.{expert}.{tensor}"


def parse_backup_buffer_name(name: str) -> tuple[int, int, str] | None:
    """``(layer, expert, tensor)`` of a name made by :func:`backup_buffer_name`, else ``None``."""
    if not name.startswith(BACKUP_BUFFER_PREFIX):
        return None
    parts = name[len(BACKUP_BUFFER_PREFIX):].split(".", 2)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or not parts[2]:
        return None
    return int(parts[0]), int(parts[1]), parts[2]


def backup_source_buffers(
    endpoint: TransferEndpoint, layout: ExpertLayout, layer: int, expert: int
) -> dict[str, tuple[int, int]] | None:
    """The backed-up tensors of ``(layer, expert)`` that ``endpoint`` announces, keyed as the
    layer's slot buffers (:meth:`ExpertLayout.buffer_name`) and each pointing at the expert's
    own bytes (so slot 0 of them is the expert), or ``None`` if it lacks any tensor.

    What the executor needs to read a rank's backup like any replica slot.
    """
    out: dict[str, tuple[int, int]] = {}
    for t in layout.tensors:
        entry = endpoint.buffers.get(backup_buffer_name(layer, expert, t.name))
        if entry is None or entry[1] < t.nbytes:
            return None
        out[layout.buffer_name(layer, t.name)] = entry
    return out


def _count_error(kind: str) -> None:
    from elasticep import metrics

    metrics.BACKUP_ERRORS.labels(kind=kind).inc()


class BackupOverBudget(ElasticEPError, ValueError):
    """A backup plan gives ``rank`` more experts of ``layer`` than its store has slots for.

    A store's memory is fixed when it is made (``slots`` per layer, from the budget), so a plan
    made for a larger budget is refused instead of growing past it. Counted in
    ``elasticep_backup_errors_total{kind="over_budget"}``.
    """

    def __init__(self, rank: int, layer: int, wanted: int, slots: int) -> None:
        super().__init__(
            f"backup plan gives rank {rank} {wanted} experts of layer {layer}; its store has {slots} slots per layer"
        )
        self.rank, self.layer, self.wanted, self.slots = int(rank), int(layer), int(wanted), int(slots)

    def __reduce__(self):
        return (type(self), (self.rank, self.layer, self.wanted, self.slots))


def backup_slots(budget_bytes: int, layout: ExpertLayout) -> int:
    """Backup slots per layer that ``budget_bytes`` of host memory hold on one rank.

    Each slot holds one expert of one layer, in every layer: a store costs
    ``slots * num_layers * expert_nbytes`` bytes (:attr:`BackupStore.nbytes`), never more.
    """
    if budget_bytes < 0:
        _count_error("invalid_argument")
        raise InvalidArgument(f"backup budget must be >= 0 bytes, not {budget_bytes}")
    return int(budget_bytes) // (layout.num_layers * layout.expert_nbytes)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fixed, well-spread hash of uint64 values (vectorised)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _make_room(
    e: int, layer: int, holders: np.ndarray, allowed: np.ndarray, cap: np.ndarray, used: np.ndarray, host_of: np.ndarray
) -> np.ndarray | None:
    """No allowed rank has a free slot for ``e``: move one backup ``f`` off a full rank ``r``
    that ``e`` may use, to a rank with a free slot that ``f`` may use (one augmenting step of a
    matching), and return ``[r]``; an empty array if no such pair exists for ``e``; None if no
    backup of the layer can move at all."""
    free = cap > 0
    targets = np.flatnonzero(allowed[e] & ~used[e, host_of])  # full ranks e could use
    if targets.size == 0 or not free.any():
        return np.array([], dtype=np.int64)
    # movable[f]: backup f could go to some rank with room that its rules allow
    movable = (allowed & free[None, :] & ~used[:, host_of]).any(axis=1)
    if not movable.any():
        return None  # and it stays so for this layer: room only shrinks from here on
    h = holders[layer]
    cand = movable[:, None] & np.isin(h, targets)
    hit = np.argwhere(cand)
    if hit.size == 0:
        return np.array([], dtype=np.int64)
    f, c = (int(x) for x in hit[0])
    r = int(h[f, c])
    room = np.flatnonzero(allowed[f] & free & ~used[f, host_of])
    r2 = int(room[np.argmax(cap[room])])
    holders[layer, f, c] = r2
    used[f, host_of[r]] = False
    used[f, host_of[r2]] = True
    cap[r2] -= 1
    cap[r] += 1
    return np.array([r])


@dataclass(frozen=True)
class BackupPlan:
    """Which ranks keep a host-memory copy of each expert.

    ``holders``: ``[layers, experts, copies]`` ``torch.int64``, the ranks keeping a backup of
    each expert, ``-1`` where a copy could not be placed (no eligible rank had a free slot).
    ``slots``: backup slots per rank and layer the plan was made for. ``reason``: one line.
    """

    holders: torch.Tensor
    slots: int
    reason: str = ""

    @property
    def num_layers(self) -> int:
        return int(self.holders.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.holders.shape[1])

    @property
    def copies(self) -> int:
        return int(self.holders.shape[2])

    def held_by(self, rank: int) -> list[tuple[int, int]]:
        """``(layer, expert)`` pairs ``rank`` keeps, sorted."""
        if rank < 0:
            return []
        layer, expert, _ = (self.holders == rank).nonzero(as_tuple=True)
        return sorted(zip(layer.tolist(), expert.tolist()))

    def per_rank(self, num_ranks: int) -> torch.Tensor:
        """``[num_ranks, layers]`` experts each rank keeps per layer (at most ``slots``)."""
        h = self.holders
        out = torch.zeros(num_ranks, self.num_layers, dtype=torch.int64)
        for layer in range(self.num_layers):
            row = h[layer].flatten()
            row = row[(row >= 0) & (row < num_ranks)]
            out[:, layer] = torch.bincount(row, minlength=num_ranks)[:num_ranks]
        return out

    def copies_of(self) -> torch.Tensor:
        """``[layers, experts]`` backups placed per expert (``copies`` when fully covered)."""
        return (self.holders >= 0).sum(dim=2)

    def missing(self) -> int:
        """Copies that could not be placed, over all experts."""
        return int((self.holders < 0).sum())

    def changes(self, previous: "BackupPlan | None") -> int:
        """``(layer, expert, rank)`` backups in this plan that ``previous`` did not have: the
        experts the ranks must copy to re-make their backups."""
        new = {tuple(x) for x in (self.holders >= 0).nonzero().tolist()}
        now = self.holders
        if previous is None:
            return int((now >= 0).sum())
        n = 0
        prev = previous.holders
        for layer, expert, c in new:
            r = int(now[layer, expert, c])
            if layer >= prev.shape[0] or expert >= prev.shape[1] or r not in prev[layer, expert].tolist():
                n += 1
        return n

    def to_dict(self) -> dict:
        return {"holders": self.holders.tolist(), "slots": self.slots, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict) -> "BackupPlan":
        return cls(torch.tensor(d["holders"], dtype=torch.int64), int(d["slots"]), str(d.get("reason", "")))


def plan_backups(
    placement: Placement,
    alive: Any = None,
    *,
    slots: int | Sequence[int],
    copies: int = 2,
    hosts: Sequence[Any] | None = None,
    previous: BackupPlan | None = None,
) -> BackupPlan:
    """Plan which live ranks keep a host-memory backup of each expert. Pure.

    Args:
        placement: the placement about to serve (plan on the committed one: every expert then
            has a live replica to copy its backup from).
        alive: ``[R]`` bool live mask (default: every rank).
        slots: backup slots per rank and layer (one int, or one per rank), e.g. from
            :func:`backup_slots`; ``0`` for a rank that keeps none.
        copies: backups per expert (2: one host can die, with the ranks serving the expert, and
            a backup still survives).
        hosts: the host (any hashable) of each rank; default: each rank is its own host.
        previous: the plan in force; each backup it has that is still allowed is kept, so a view
            change re-makes only the backups it must.

    Rules, for each expert: a holder is alive, serves no replica of the expert, and is on a host
    where no live replica of it lives (a host failure takes the expert's replicas, never its
    backups with them); its holders are on distinct hosts; no rank keeps more than ``slots``
    experts of a layer. Kept backups are placed first; then, one copy per expert before any
    expert's second and the experts with the fewest allowed ranks first, each new holder is the
    allowed rank with the most free slots, ties broken by a fixed hash of ``(layer, expert,
    rank)``; when every allowed rank is full, one backup is moved aside to a rank with room if
    that frees one (so a tight budget still gives every expert its first copy). Every rank computes the same plan from the same inputs, and with ``previous`` a
    rank's death moves only the backups it held (and those a changed placement disallows). An
    expert with no allowed rank left gets ``-1`` for that copy.

    Raises :class:`~elasticep.errors.InvalidArgument` (counted in
    ``elasticep_backup_errors_total{kind="invalid_argument"}``) for inputs of the wrong shape.
    """
    phy = placement.phy2log.numpy()
    L, E, S, R = placement.num_layers, placement.num_experts, placement.slots_per_rank, placement.num_ranks
    if copies < 1:
        _count_error("invalid_argument")
        raise InvalidArgument(f"copies must be >= 1, not {copies}")
    alive_np = np.ones(R, dtype=bool) if alive is None else np.asarray(torch.as_tensor(alive), dtype=bool).reshape(-1)
    if alive_np.shape[0] != R:
        _count_error("invalid_argument")
        raise InvalidArgument(f"alive has {alive_np.shape[0]} ranks, the placement {R}")
    cap0 = np.full(R, slots, dtype=np.int64) if np.isscalar(slots) else np.asarray(list(slots), dtype=np.int64)
    if cap0.shape != (R,) or (cap0 < 0).any():
        _count_error("invalid_argument")
        raise InvalidArgument(f"slots must be >= 0, one int or one per rank ({R}), not {slots!r}")
    if hosts is None:
        host_of = np.arange(R)
    else:
        if len(hosts) != R:
            _count_error("invalid_argument")
            raise InvalidArgument(f"hosts names {len(hosts)} ranks, the placement {R}")
        ids: dict[Any, int] = {}
        host_of = np.array([ids.setdefault(h, len(ids)) for h in hosts], dtype=np.int64)
    H = int(host_of.max()) + 1 if R else 0
    if previous is not None and (previous.num_layers != L or previous.num_experts != E):
        _count_error("invalid_argument")
        raise InvalidArgument(
            f"previous backup plan is {previous.num_layers} x {previous.num_experts}, the placement {L} x {E}"
        )
    prev = None if previous is None else previous.holders.numpy()
    holders = np.full((L, E, copies), -1, dtype=np.int64)
    rank_of_slot = np.arange(R * S) // S
    rank_ids = np.arange(R, dtype=np.uint64)
    kept = 0
    for layer in range(L):
        row = phy[layer]
        live = (row >= 0) & alive_np[rank_of_slot]
        # host_serves[e, h]: a live replica of e is on host h
        host_serves = np.zeros((E + 1, H), dtype=bool)
        host_serves[row[live], host_of[rank_of_slot[live]]] = True
        host_serves = host_serves[:E]
        allowed = alive_np[None, :] & (cap0[None, :] > 0) & ~host_serves[:, host_of]  # [E, R]
        cap = cap0.copy()
        stuck = False  # no backup of this layer can make room any more
        used = np.zeros((E, H), dtype=bool)
        count = np.zeros(E, dtype=np.int64)
        if prev is not None:
            for e in range(E):
                for r in prev[layer, e]:
                    r = int(r)
                    if 0 <= r < R and allowed[e, r] and cap[r] > 0 and not used[e, host_of[r]] and count[e] < copies:
                        holders[layer, e, count[e]] = r
                        count[e] += 1
                        cap[r] -= 1
                        used[e, host_of[r]] = True
                        kept += 1
        keys = (np.uint64(layer) << np.uint64(40)) ^ (np.arange(E, dtype=np.uint64)[:, None] << np.uint64(20)) ^ rank_ids[None, :]
        score = _mix(keys)  # [E, R]
        for c in range(copies):
            todo = np.flatnonzero(count <= c)
            # experts with fewer backups first, then the most constrained (fewest allowed ranks)
            todo = todo[np.lexsort((allowed[todo].sum(axis=1), count[todo]))]
            for e in todo:
                ok = np.flatnonzero(allowed[e] & (cap > 0) & ~used[e, host_of])
                if ok.size == 0 and not stuck:
                    room = _make_room(e, layer, holders, allowed, cap, used, host_of)
                    stuck = room is None
                    ok = ok if room is None else room
                if ok.size == 0:
                    continue
                # the emptiest rank, ties broken by the hash
                r = int(ok[np.lexsort((score[e, ok], cap[ok]))[-1]])
                holders[layer, e, count[e]] = r
                count[e] += 1
                cap[r] -= 1
                used[e, host_of[r]] = True
    missing = int((holders < 0).sum())
    reason = f"{L * E * copies - missing} of {L * E * copies} backups placed ({kept} kept)"
    if missing:
        reason += f"; {missing} without an allowed rank with a free slot"
    return BackupPlan(torch.from_numpy(holders), int(cap0.max()) if R else 0, reason)


@dataclass
class BackupSync:
    """What :meth:`BackupStore.sync` did: experts added (with the transfer report), dropped, kept."""

    added: list[tuple[int, int]] = field(default_factory=list)
    dropped: list[tuple[int, int]] = field(default_factory=list)
    kept: int = 0
    failed: list[tuple[int, int]] = field(default_factory=list)
    """Experts the plan gives this rank that no source could provide (their slot stays free)."""
    report: Any = None


class BackupStore:
    """One serving rank's host-memory backups: ``slots`` per layer, each any expert of the layer.

    The memory (``slots * num_layers * expert_nbytes`` bytes, :attr:`nbytes`) is allocated and
    registered with ``transport`` once; :meth:`sync` reuses it for whatever each plan gives this
    rank and never grows it. Announce :meth:`endpoint_buffers` in the rank's transfer endpoint
    (the executor does, once attached with :meth:`TransferExecutor.attach_backups`).
    """

    def __init__(self, rank: int, layout: ExpertLayout, slots: int, *, transport: Transport | None = None) -> None:
        if slots < 0:
            _count_error("invalid_argument")
            raise InvalidArgument(f"backup slots must be >= 0, not {slots}")
        self.rank = rank
        self.slots = int(slots)
        self.layout = layout.with_slots(max(1, self.slots))
        self.weights: ExpertWeights | None = ExpertWeights.allocate(self.layout) if self.slots else None
        self.transport = transport
        self._lock = threading.Lock()
        self.index: dict[tuple[int, int], int] = {}
        """``(layer, expert)`` -> local backup slot of the experts held now."""
        if transport is not None and self.weights is not None:
            for address, nbytes in self.weights.regions():
                transport.register(address, nbytes)

    @classmethod
    def from_budget(
        cls, rank: int, layout: ExpertLayout, budget_bytes: int, *, transport: Transport | None = None
    ) -> "BackupStore":
        """A store as large as ``budget_bytes`` allows (:func:`backup_slots`)."""
        return cls(rank, layout, backup_slots(budget_bytes, layout), transport=transport)

    @property
    def nbytes(self) -> int:
        """Host memory this store holds, bytes (fixed at construction)."""
        return 0 if self.weights is None else int(self.weights.arena.numel())

    def holds(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.index

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """The backed-up tensors of ``(layer, expert)``, by name (``KeyError`` if not held)."""
        assert self.weights is not None
        return self.weights.expert(layer, self.index[(layer, expert)])

    def endpoint_buffers(self) -> dict[str, tuple[int, int]]:
        """:func:`backup_buffer_name` -> ``(address, nbytes)`` of every tensor held now."""
        out: dict[str, tuple[int, int]] = {}
        with self._lock:
            items = list(self.index.items())
        assert self.weights is not None or not items
        for (layer, expert), local in items:
            for t in self.layout.tensors:
                out[backup_buffer_name(layer, expert, t.name)] = self.weights.address(layer, local, t.name)
        return out

    def sync(
        self,
        plan: BackupPlan,
        load: Callable[[list[tuple[int, int]], ExpertWeights, dict[tuple[int, int], int]], Any],
    ) -> BackupSync:
        """Make this store hold what ``plan`` gives this rank.

        Drops what the plan no longer gives it first (frees slots), then calls
        ``load(pairs, weights, slot_of)`` once for the new ``(layer, expert)`` pairs, which must
        fill ``weights`` slot ``slot_of[pair]`` of each pair's layer and return a report with
        ``moved`` (as :meth:`TransferExecutor.load_into` does: live replica > host copy > disk)
        or raise a :class:`~elasticep.transfer.SourcesExhausted` carrying one. Pairs left
        unloaded are in ``failed`` and their slots stay free.

        Raises :class:`BackupOverBudget` (before changing anything) if the plan gives this rank
        more experts of a layer than ``slots``.
        """
        wanted = plan.held_by(self.rank)
        per_layer: dict[int, int] = {}
        for layer, _ in wanted:
            per_layer[layer] = per_layer.get(layer, 0) + 1
        for layer, n in per_layer.items():
            if n > self.slots or layer >= self.layout.num_layers:
                _count_error("over_budget")
                raise BackupOverBudget(self.rank, layer, n, self.slots if layer < self.layout.num_layers else 0)
        out = BackupSync()
        want = set(wanted)
        with self._lock:
            for pair in [p for p in self.index if p not in want]:
                del self.index[pair]
                out.dropped.append(pair)
            taken: dict[int, set[int]] = {}
            for (layer, _), local in self.index.items():
                taken.setdefault(layer, set()).add(local)
            out.kept = len(self.index)
            new = [p for p in wanted if p not in self.index]
        if not new:
            return out
        assert self.weights is not None
        slot_of: dict[tuple[int, int], int] = {}
        for layer, expert in new:
            used = taken.setdefault(layer, set())
            free = next(i for i in range(self.slots) if i not in used)
            used.add(free)
            slot_of[(layer, expert)] = free
        try:
            report = load(new, self.weights, slot_of)
        except Exception as exc:  # SourcesExhausted and kin carry the partial report
            report = getattr(exc, "report", None)
            if report is None:
                _count_error("load_failed")
                raise
        done = {(m.layer, m.expert) for m in getattr(report, "moved", [])}
        with self._lock:
            for pair in new:
                if pair in done:
                    self.index[pair] = slot_of[pair]
                    out.added.append(pair)
                else:
                    out.failed.append(pair)
        if out.failed:
            _count_error("load_failed")
        from elasticep import metrics

        metrics.BACKUP_EXPERTS.set(len(self.index))
        out.report = report
        return out

    def refill(
        self,
        plan: BackupPlan,
        executor: Any,
        placement: Placement,
        *,
        epoch: int,
        alive: Any = None,
        timeout: float | None = None,
    ) -> BackupSync:
        """:meth:`sync` to ``plan``, copying new backups with ``executor`` (this rank's
        :class:`~elasticep.transfer.TransferExecutor`) from the live replicas ``placement`` has
        (``alive``: ``[R]`` bool mask, default every rank), then host backups, then disk.

        Called after a view's commit, on every rank, with the plan every rank computes (or reads
        from the view store): the next failure then finds its backups in place.
        """
        phy = placement.phy2log
        spr = placement.slots_per_rank
        alive_mask = torch.ones(placement.num_ranks, dtype=torch.bool) if alive is None else torch.as_tensor(alive, dtype=torch.bool)
        live_ranks = alive_mask.nonzero().flatten().tolist()
        live_slot = alive_mask[torch.arange(placement.num_slots) // spr]

        def load(pairs, weights, slot_of):
            sources = {
                (layer, expert): tuple(((phy[layer] == expert) & live_slot).nonzero().flatten().tolist())
                for layer, expert in pairs
            }
            return executor.load_into(pairs, weights, slot_of, sources=sources, epoch=epoch, alive=live_ranks,
                                      timeout=timeout)

        return self.sync(plan, load)

    def close(self) -> None:
        """Unregister the memory (the store holds nothing afterwards)."""
        with self._lock:
            self.index.clear()
        if self.transport is not None and self.weights is not None:
            for address, _ in self.weights.regions():
                self.transport.unregister(address)
