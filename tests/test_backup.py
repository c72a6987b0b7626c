"""Host-memory backups kept by serving ranks: the pure plan, the memory-bounded store, and
recovery that reads them instead of the disk (real executors over the in-process transport twin,
real safetensors on disk)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from elasticep import metrics
from elasticep.eplb import Placement, initial, replan
from elasticep.errors import InvalidArgument
from elasticep.transfer import (
    BackupOverBudget,
    BackupPlan,
    BackupStore,
    DiskSource,
    ExpertLayout,
    ExpertWeights,
    InProcessNetwork,
    TransferExecutor,
    backup_slots,
    expert_crc32,
    plan_backups,
)
from elasticep.transfer.backup import backup_buffer_name, parse_backup_buffer_name

LAYOUT = ExpertLayout.deepseek(num_layers=2, slots_per_rank=3, hidden_size=16, moe_intermediate_size=8,
                               dtype=torch.float32)
E = 8


def expert_tensors(layer: int, expert: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * layer + expert)
    return {t.name: torch.randn(t.shape, generator=g) for t in LAYOUT.tensors}


CHECKSUMS = {(l, e): expert_crc32(expert_tensors(l, e).values()) for l in range(2) for e in range(E)}


# ------------------------------------------------------------------------------- the plan


def check_plan(plan: BackupPlan, placement: Placement, alive: np.ndarray, hosts: list[int], slots: int) -> None:
    """Every rule of plan_backups, checked against a naive reading of the inputs."""
    R, S = placement.num_ranks, placement.slots_per_rank
    phy = placement.phy2log.numpy()
    for layer in range(plan.num_layers):
        counts = np.zeros(R, dtype=int)
        for e in range(plan.num_experts):
            serving_hosts = {hosts[s // S] for s in range(R * S) if phy[layer, s] == e and alive[s // S]}
            seen = set()
            for r in plan.holders[layer, e].tolist():
                if r < 0:
                    continue
                assert alive[r], (layer, e, r)
                assert hosts[r] not in serving_hosts, (layer, e, r)
                assert hosts[r] not in seen, (layer, e, r)
                seen.add(hosts[r])
                counts[r] += 1
        assert counts.max(initial=0) <= slots


@pytest.mark.parametrize("seed", range(6))
def test_plan_rules_hold_on_skewed_loads(seed: int) -> None:
    rng = np.random.default_rng(seed)
    L, E_, R, S, per_host = 6, 32, 8, 5, 2
    load = rng.zipf(1.2, size=(L, E_)).astype(float)
    placement = initial(torch.tensor(load), R, S)
    hosts = [r // per_host for r in range(R)]
    alive = rng.random(R) > 0.25
    alive[0] = True
    slots = int(rng.integers(1, 12))
    plan = plan_backups(placement, torch.tensor(alive), slots=slots, hosts=hosts)
    check_plan(plan, placement, alive, hosts, slots)
    again = plan_backups(placement, torch.tensor(alive), slots=slots, hosts=hosts)
    assert torch.equal(plan.holders, again.holders)  # every rank computes the same plan


def test_ample_slots_cover_every_expert_twice_and_balance() -> None:
    placement = initial(torch.rand(4, 64), 16, 5)
    hosts = [r // 4 for r in range(16)]
    plan = plan_backups(placement, slots=10, hosts=hosts)
    assert plan.missing() == 0 and plan.copies == 2
    per = plan.per_rank(16)
    assert int(per.max()) <= 9 and int(per.min()) >= 7  # 64 * 2 / 16 = 8 each, greedy under the host rules


def test_a_rank_death_moves_only_its_backups() -> None:
    placement = initial(torch.rand(3, 64), 16, 5)
    hosts = [r // 4 for r in range(16)]
    before = plan_backups(placement, slots=10, hosts=hosts)
    alive = torch.ones(16, dtype=torch.bool)
    alive[5] = False
    after = plan_backups(placement, alive, slots=10, hosts=hosts, previous=before)
    assert after.missing() == 0
    assert after.changes(before) == len(before.held_by(5))
    assert after.held_by(5) == []


def test_tight_slots_give_one_copy_to_every_expert_first() -> None:
    placement = initial(torch.rand(2, 32), 8, 5)
    plan = plan_backups(placement, slots=4, hosts=[r // 2 for r in range(8)])  # 32 slots per layer
    copies = plan.copies_of()
    assert int(copies.min()) >= 1 and plan.missing() == 2 * 32 * 2 - 2 * 32


def test_bad_inputs_are_typed_and_counted() -> None:
    placement = initial(torch.rand(2, 8), 4, 3)
    before = metrics.sample("elasticep_backup_errors_total", {"kind": "invalid_argument"})
    with pytest.raises(InvalidArgument):
        plan_backups(placement, [True] * 3, slots=2)
    with pytest.raises(InvalidArgument):
        plan_backups(placement, slots=-1)
    with pytest.raises(InvalidArgument):
        plan_backups(placement, slots=2, hosts=["a"])
    with pytest.raises(InvalidArgument):
        plan_backups(placement, slots=2, copies=0)
    with pytest.raises(InvalidArgument):
        plan_backups(placement, slots=2, previous=BackupPlan(torch.full((1, 8, 2), -1), 2))
    with pytest.raises(InvalidArgument):
        backup_slots(-5, LAYOUT)
    assert metrics.sample("elasticep_backup_errors_total", {"kind": "invalid_argument"}) - before == 6


def test_buffer_names_round_trip() -> None:
    assert parse_backup_buffer_name(backup_buffer_name(3, 17, "down_proj")) == (3, 17, "down_proj")
    assert parse_backup_buffer_name("L3.down_proj") is None
    assert parse_backup_buffer_name("B3.x.down_proj") is None


# ------------------------------------------------------------------------------- ranks


class CountingDisk(DiskSource):
    """The checkpoint on disk, counting each expert read from it."""

    reads = 0

    def read_into(self, layer, expert, out):
        type(self).reads += 1
        return super().read_into(layer, expert, out)


@pytest.fixture()
def disk(tmp_path):
    tensors = {}
    for l in range(2):
        for e in range(E):
            for name, t in expert_tensors(l, e).items():
                tensors[f"model.layers.{l}.mlp.experts.{e}.{name}.weight"] = t
    save_file(tensors, str(tmp_path / "model.safetensors"))
    CountingDisk.reads = 0
    return CountingDisk(tmp_path)


class Cluster:
    """``R`` ranks, each with its serving buffers, a backup store and an executor, on one network."""

    def __init__(self, placement: Placement, hosts: list[int], slots: int, disk: DiskSource):
        self.net = InProcessNetwork(seed=0)
        self.placement = placement
        self.hosts = hosts
        self.R = placement.num_ranks
        self.alive = torch.ones(self.R, dtype=torch.bool)
        self.epoch = 1
        self.ex: list[TransferExecutor] = []
        self.stores: list[BackupStore] = []
        spr = placement.slots_per_rank
        layout = LAYOUT.with_slots(spr)  # the executor maps slots to ranks by the layout
        for r in range(self.R):
            t = self.net.transport()
            w = ExpertWeights.allocate(layout)
            for l in range(2):
                for i in range(spr):
                    e = int(placement.phy2log[l, r * spr + i])
                    if e >= 0:
                        for name, x in expert_tensors(l, e).items():
                            w.tensor(l, i, name).copy_(x)
            ex = TransferExecutor(r, w, t, epoch=1, disk=disk, checksums=CHECKSUMS)
            store = BackupStore(r, layout, slots, transport=t)
            ex.attach_backups(store)
            self.ex.append(ex)
            self.stores.append(store)
        self.plan: BackupPlan | None = None

    def live(self) -> list[int]:
        return [r for r in range(self.R) if self.alive[r]]

    def publish(self) -> None:
        eps = [self.ex[r].endpoint() for r in self.live()]
        for r in self.live():
            for ep in eps:
                if ep.rank != r:
                    self.ex[r].learn(ep)

    def rebackup(self, *, ranks=None) -> dict[str, int]:
        self.plan = plan_backups(self.placement, self.alive, slots=self.stores[0].slots, hosts=self.hosts,
                                 previous=self.plan)
        kinds: dict[str, int] = {}
        for r in ranks if ranks is not None else self.live():
            sync = self.stores[r].refill(self.plan, self.ex[r], self.placement, epoch=self.epoch, alive=self.alive)
            for k, n in sync.report.bytes_by_source().items() if sync.report else ():
                kinds[k] = kinds.get(k, 0) + n
        self.publish()
        return kinds

    def kill(self, ranks) -> None:
        for r in ranks:
            self.alive[r] = False
            self.net.kill(self.ex[r].transport.peer)

    def recover(self) -> dict[str, int]:
        """Replan on the live ranks and load every move; bytes by source over all ranks."""
        self.epoch += 1
        plan = replan(self.placement, torch.ones(2, E), alive_mask=self.alive, max_moves=0)
        total = {"replica": 0, "host": 0, "disk": 0}
        for r in self.live():
            report = self.ex[r].run(plan.moves, epoch=self.epoch, alive=self.live(), timeout=10)
            for k, n in report.bytes_by_source().items():
                total[k] += n
        self.placement = plan.placement
        self.check_weights()
        return total

    def check_weights(self) -> None:
        spr = self.placement.slots_per_rank
        for r in self.live():
            for l in range(2):
                for i in range(spr):
                    e = int(self.placement.phy2log[l, r * spr + i])
                    if e >= 0:
                        assert self.ex[r].weights.checksum(l, i) == CHECKSUMS[(l, e)], (r, l, i, e)

    def close(self) -> None:
        for ex, store in zip(self.ex, self.stores):
            store.close()
            ex.close()


def single_replica_placement(R: int, spr: int) -> Placement:
    """Each expert once, ``E / R`` per rank, the other slots empty: any death loses experts."""
    phy = torch.full((2, R * spr), -1, dtype=torch.int64)
    for l in range(2):
        for e in range(E):
            r = (e + l) % R
            phy[l, r * spr + e // R] = e
    return Placement(phy, spr, E)


def test_a_dead_ranks_unreplicated_experts_come_from_backups_not_disk(disk) -> None:
    hosts = [0, 0, 1, 1]
    c = Cluster(single_replica_placement(4, 3), hosts, slots=4, disk=disk)
    try:
        c.publish()
        c.rebackup()
        # two hosts: the host serving an expert is out, so one backup each (two need three hosts)
        assert c.plan.copies_of().eq(1).all()
        assert CountingDisk.reads == 0  # backups were copied from live replicas
        lost = int((c.placement.phy2log[:, 3:6] >= 0).sum())  # rank 1's experts: their only copy
        c.kill([1])
        got = c.recover()
        assert CountingDisk.reads == 0, got
        assert got["host"] == lost * LAYOUT.expert_nbytes and got["disk"] == 0
    finally:
        c.close()


def no_copy(c: "Cluster") -> int:
    """Experts with neither a live replica nor a backup on a live rank: what must come from disk."""
    phy, spr, n = c.placement.phy2log, c.placement.slots_per_rank, 0
    live = c.live()
    for l in range(2):
        for e in range(E):
            replica = any(int(phy[l, r * spr + i]) == e for r in live for i in range(spr))
            backup = any(c.stores[r].holds(l, e) for r in live)
            n += not (replica or backup)
    return n


@pytest.mark.parametrize("slots", [2, 1])
def test_a_host_then_a_second_host_during_rebackup_reads_disk_only_for_what_has_no_copy(disk, slots) -> None:
    hosts = [0, 0, 1, 1, 2, 2]
    c = Cluster(single_replica_placement(6, 4), hosts, slots=slots, disk=disk)
    try:
        c.publish()
        c.rebackup()
        c.kill([2, 3])  # host 1
        want = no_copy(c)
        assert want == (0 if slots == 2 else 1)  # one slot per rank cannot back up every expert
        got = c.recover()
        assert CountingDisk.reads == want and got["disk"] == want * LAYOUT.expert_nbytes and got["host"] > 0
        # the re-backup reaches rank 0 only: host 2 dies before rank 1 re-makes its backups
        c.rebackup(ranks=[0])
        c.kill([4, 5])
        want2 = no_copy(c)
        got = c.recover()
        assert CountingDisk.reads - want == want2 and got["disk"] == want2 * LAYOUT.expert_nbytes
        assert got["host"] > 0
    finally:
        c.close()


def test_store_memory_stays_within_budget_through_20_view_changes(disk) -> None:
    rnd = random.Random(7)
    R, spr = 6, 4
    hosts = [r // 2 for r in range(R)]
    budget = 3 * 2 * LAYOUT.expert_nbytes + LAYOUT.expert_nbytes // 2  # 3 slots per layer and change
    slots = backup_slots(budget, LAYOUT)
    assert slots == 3
    placement = initial(torch.rand(2, E), R, spr)
    c = Cluster(placement, hosts, slots=slots, disk=disk)
    try:
        c.publish()
        c.rebackup()
        for step in range(20):
            dead = [r for r in range(R) if not c.alive[r]]
            if dead and (len(dead) >= 2 or rnd.random() < 0.4):
                r = rnd.choice(dead)  # rejoin with empty slots, filled by the view that admits it
                c.alive[r] = True
                c.net.heal(c.ex[r].transport.peer)
                c.stores[r].sync(BackupPlan(torch.full((2, E, 2), -1), slots), lambda *a: None)
                c.epoch += 1
                plan = replan(c.placement, torch.rand(2, E), alive_mask=c.alive)
                for x in c.live():
                    c.ex[x].run(plan.moves, epoch=c.epoch, alive=c.live(), timeout=10)
                c.placement = plan.placement
                c.check_weights()
            else:
                c.kill([rnd.choice(c.live()[1:])])
                c.recover()
            c.rebackup()
            for r in range(R):
                store = c.stores[r]
                assert store.nbytes <= budget
                per_layer = {}
                for (l, e), i in store.index.items():
                    per_layer[l] = per_layer.get(l, 0) + 1
                    assert store.weights.checksum(l, i) == CHECKSUMS[(l, e)]
                assert max(per_layer.values(), default=0) <= slots
    finally:
        c.close()


def test_a_plan_over_the_store_is_refused_before_anything_changes() -> None:
    store = BackupStore(0, LAYOUT, 1)
    holders = torch.full((2, E, 2), -1)
    holders[0, 0, 0] = holders[0, 1, 0] = 0
    before = metrics.sample("elasticep_backup_errors_total", {"kind": "over_budget"})
    with pytest.raises(BackupOverBudget) as err:
        store.sync(BackupPlan(holders, 2), lambda *a: None)
    assert err.value.wanted == 2 and err.value.slots == 1 and store.index == {}
    assert metrics.sample("elasticep_backup_errors_total", {"kind": "over_budget"}) - before == 1


def test_a_rank_loads_from_its_own_backup_by_memory_copy() -> None:
    from elasticep.transfer import ExpertMove

    net = InProcessNetwork()
    t = net.transport()
    ex = TransferExecutor(0, ExpertWeights.allocate(LAYOUT), t, epoch=1, checksums=CHECKSUMS)
    store = BackupStore(0, LAYOUT, 2, transport=t)
    ex.attach_backups(store)
    holders = torch.full((2, E, 2), -1)
    holders[1, 5, 0] = 0

    def load(pairs, weights, slot_of):
        for layer, e in pairs:
            for name, x in expert_tensors(layer, e).items():
                weights.tensor(layer, slot_of[(layer, e)], name).copy_(x)
        return type("R", (), {"moved": [type("M", (), {"layer": l, "expert": e})() for l, e in pairs]})()

    sync = store.sync(BackupPlan(holders, 2), load)
    assert sync.added == [(1, 5)] and store.nbytes == 2 * 2 * LAYOUT.expert_nbytes
    assert set(ex.endpoint().buffers) >= {backup_buffer_name(1, 5, n) for n in ("gate_proj", "up_proj", "down_proj")}
    net.kill(t.peer)  # no transfer can succeed: only a memory copy can load it
    report = ex.run([ExpertMove(1, 2, 5)], epoch=2)
    assert [(m.source_kind, m.source_rank) for m in report.moved] == [("host", 0)]
    assert ex.weights.checksum(1, 2) == CHECKSUMS[(1, 5)]
    store.close()
    ex.close()
