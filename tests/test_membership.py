"""Views, the view stores (in-memory twin and a real TCPStore), the pure core's edge cases, and the
async service over the in-process bus."""

from __future__ import annotations

import asyncio
import threading

import pytest

import elasticep.membership as membership
from elasticep import metrics
from elasticep.bus import EventBus, InProcessNetwork
from elasticep.config import Config
from elasticep.events import (
    SCHEMA_VERSION,
    Envelope,
    Heartbeat,
    JoinRequest,
    ProcessExit,
    Suspicion,
    ViewInstalled,
    ViewProposal,
)
from elasticep.membership import (
    CasDone,
    Committed,
    CompareAndSet,
    CorruptView,
    Fence,
    InMemoryViewStore,
    Install,
    MembershipCore,
    MembershipService,
    Publish,
    RankFenced,
    ReadView,
    Refused,
    StoreFailed,
    StoreUnavailable,
    TCPStoreViewStore,
    Tick,
    View,
    ViewRead,
    decode_view,
    encode_view,
)
from elasticep.membership.core import PUSHED_REREADS
from elasticep.testing.fixtures import free_port

CFG = Config.local()


def test_all_names_exported() -> None:
    for name in membership.__all__:
        assert hasattr(membership, name), name


# --- views ---------------------------------------------------------------------------------------


def test_view_is_validated_and_round_trips() -> None:
    v = View.of(3, [4, 1, 2], incarnations={4: 9}, proposer=1, reason="x")
    assert (v.members, v.leader, v.incarnations) == ((1, 2, 4), 1, (0, 0, 9))
    assert decode_view(encode_view(v)) == v
    assert v.has(4, 9) and not v.has(4, 0) and v.has(1)
    with pytest.raises(ValueError):
        View(epoch=1, members=(2, 1), leader=1)
    with pytest.raises(ValueError):
        View(epoch=1, members=(1, 2), leader=2)
    with pytest.raises(ValueError):
        View(epoch=0, members=(1,), leader=1)
    with pytest.raises(CorruptView):
        decode_view(b'{"epoch": 1, "members": [2, 1], "leader": 2}')
    with pytest.raises(CorruptView):
        decode_view(b"\xff garbage")


# --- stores --------------------------------------------------------------------------------------


def test_in_memory_store_one_of_two_rivals_wins() -> None:
    store = InMemoryViewStore()
    a = View.of(2, [0, 1, 2], proposer=0)
    b = View.of(2, [1, 2], proposer=1)
    assert store.compare_and_set_nowait(a) == a
    assert store.compare_and_set_nowait(b) == a  # the loser learns the winner
    assert store.read_nowait(2) == a and store.read_nowait(3) is None
    assert store.conflicts == 1 and store.head() == 2


@pytest.mark.asyncio
async def test_in_memory_store_faults() -> None:
    store = InMemoryViewStore(seed=3, timeout_s=0.05)
    store.set_down(ranks={2})
    with pytest.raises(StoreUnavailable):
        await store.read(1, rank=2)
    assert await store.read(1, rank=1) is None
    store.set_down(False, ranks={2})
    store.set_delay(0.2)
    with pytest.raises(StoreUnavailable, match="within"):
        await store.read(1)
    store.set_delay(0.0)
    store.set_failure_rate(0.5)
    outcomes = []
    for _ in range(20):
        try:
            store.read_nowait(1)
            outcomes.append(True)
        except StoreUnavailable:
            outcomes.append(False)
    replay = InMemoryViewStore(seed=3)
    replay.set_failure_rate(0.5)
    again = []
    for _ in range(20):
        try:
            replay.read_nowait(1)
            again.append(True)
        except StoreUnavailable:
            again.append(False)
    assert outcomes == again and True in outcomes and False in outcomes
    with pytest.raises(ValueError):
        store.set_failure_rate(2.0)


@pytest.mark.timeout(30)
def test_tcpstore_cas_race_has_exactly_one_winner(tcp_store) -> None:
    port = tcp_store.port
    stores = [TCPStoreViewStore("127.0.0.1", port, timeout_s=5) for _ in range(4)]
    proposals = [View.of(2, [0, 1, 2, 3][: 4 - i] or [0], proposer=i) for i in range(4)]
    results: list[View | None] = [None] * 4
    barrier = threading.Barrier(4)

    def propose(i: int) -> None:
        barrier.wait()
        results[i] = stores[i].compare_and_set_nowait(proposals[i])

    threads = [threading.Thread(target=propose, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len({r for r in results}) == 1, results  # everyone sees the same committed view
    winners = [i for i in range(4) if results[i] == proposals[i]]
    assert len(winners) == 1
    assert stores[0].read_nowait(2) == results[0]
    assert stores[0].read_nowait(3) is None
    assert stores[0].read_nowait(3) is None  # a read never writes


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_tcpstore_unreachable_is_a_typed_error() -> None:
    store = TCPStoreViewStore("127.0.0.1", free_port(), timeout_s=0.3, connect_timeout_s=0.5)
    with pytest.raises(StoreUnavailable, match="cannot reach"):
        await store.read(1)


@pytest.mark.timeout(30)
def test_tcpstore_refuses_a_corrupt_value(tcp_store) -> None:
    tcp_store.set("elasticep/view/1", b"not json")
    with pytest.raises(CorruptView):
        TCPStoreViewStore(store=tcp_store).read_nowait(1)


# --- the pure core -------------------------------------------------------------------------------


def _env(sender: int, event, epoch: int = 1, seq: int = 1) -> Envelope:
    return Envelope(SCHEMA_VERSION, sender, epoch, seq, 0, 0, event)


def _member(rank: int = 0, members=(0, 1, 2, 3), now: float = 0.0) -> MembershipCore:
    core = MembershipCore(rank, CFG, initial_members=members)
    (cas,) = core.start(now)
    assert isinstance(cas, CompareAndSet) and cas.view.epoch == 1
    acts = core.step(CasDone(cas.view, cas.view), now)
    assert any(isinstance(a, Install) for a in acts)
    acts = core.step(ViewRead(2, None), now)
    assert core.status == "member"
    return core


def test_core_requires_a_membership_or_join() -> None:
    with pytest.raises(ValueError):
        MembershipCore(0, CFG)
    with pytest.raises(ValueError):
        MembershipCore(5, CFG, initial_members=(0, 1))


def test_core_refuses_forged_senders() -> None:
    core = _member()
    forged = Suspicion(observer=2, suspect=3, source="heartbeat")
    (refused,) = core.step(_env(1, forged), 0.0)
    assert isinstance(refused, Refused) and refused.reason == "sender_mismatch"
    (refused,) = core.step(_env(1, Heartbeat(rank=3)), 0.0)
    assert refused.reason == "sender_mismatch"
    assert core.fusion.pending() == {}


def test_core_refuses_stale_proposals_and_never_installs_from_the_bus() -> None:
    core = _member()
    stale = ViewProposal(epoch=1, members=(0, 3), leader=0, proposer=3)
    (refused,) = core.step(_env(3, stale), 0.0)
    assert refused.reason == "stale_proposal"
    future = ViewProposal(epoch=2, members=(0, 3), leader=0, proposer=3)
    acts = core.step(_env(3, future), 0.0)
    assert not any(isinstance(a, Install) for a in acts)
    assert core.view.epoch == 1


def test_core_epoch_bumps_only_when_members_change() -> None:
    core = _member()
    # A repeated join from a current member's first process changes nothing.
    assert not any(isinstance(a, CompareAndSet) for a in core.step(_env(2, JoinRequest(rank=2)), 0.01))
    acts = core.step(ProcessExit(rank=3, signal=9), 0.02)
    (cas,) = [a for a in acts if isinstance(a, CompareAndSet)]
    assert cas.view.epoch == 2 and cas.view.members == (0, 1, 2)
    assert "exit" in cas.view.reason


def test_core_batch_of_two_exits_makes_one_proposal() -> None:
    core = _member()
    acts = core.step_many([ProcessExit(rank=2), ProcessExit(rank=3)], 0.01)
    (cas,) = [a for a in acts if isinstance(a, CompareAndSet)]
    assert cas.view.members == (0, 1)


def test_core_lost_race_adopts_the_winner_then_proposes_again() -> None:
    core = _member(rank=1)
    acts = core.step(ProcessExit(rank=0), 0.01)  # the leader died: rank 1 is next in line
    (cas,) = [a for a in acts if isinstance(a, CompareAndSet)]
    winner = View.of(2, [0, 1, 2], proposer=0, reason="-3")
    acts = core.step(CasDone(cas.view, winner), 0.02)
    (install,) = [a for a in acts if isinstance(a, Install)]
    assert install.view == winner and install.lost_race
    (again,) = [a for a in acts if isinstance(a, CompareAndSet)]
    assert again.view.epoch == 3 and again.view.members == (1, 2)


def test_core_restarted_process_is_evicted_then_admitted() -> None:
    core = _member()
    core.step(_env(2, Heartbeat(rank=2, incarnation=10)), 0.01)
    acts = core.step(_env(2, Heartbeat(rank=2, incarnation=11), seq=2), 0.02)
    (cas,) = [a for a in acts if isinstance(a, CompareAndSet)]
    assert cas.view.members == (0, 1, 3) and "restart" in cas.view.reason
    core.step(_env(2, JoinRequest(rank=2, incarnation=11), seq=3), 0.03)
    acts = core.step(CasDone(cas.view, cas.view), 0.04)
    (cas2,) = [a for a in acts if isinstance(a, CompareAndSet)]
    assert cas2.view.members == (0, 1, 2, 3) and cas2.view.incarnation_of(2) == 11


def test_core_fences_when_the_store_is_lost() -> None:
    core = _member()
    t = 0.0
    fenced = []
    while t < CFG.store_timeout_s + 0.5 and not fenced:
        t += CFG.heartbeat_interval_ms / 1e3
        for a in core.step(Tick(), t):
            if isinstance(a, ReadView):
                core.step(StoreFailed("read", a.epoch, "connection refused"), t)
            if isinstance(a, Fence):
                fenced.append(a)
    (fence,) = fenced
    assert fence.label == "store_unreachable" and "unreachable" in fence.reason
    assert core.status == "fenced" and core.step(Tick(), t + 1) == []


def test_core_outside_the_committed_view_fences_itself() -> None:
    core = _member(rank=3)
    acts = core.step(ViewRead(2, View.of(2, [0, 1, 2], proposer=0, reason="-3 (heartbeat)")), 0.5)
    (fence,) = [a for a in acts if isinstance(a, Fence)]
    assert fence.label == "evicted" and "outside committed view 2" in fence.reason
    assert any(isinstance(a, Publish) and a.event.__class__.__name__ == "Fenced" for a in acts)


def test_core_leave_when_not_a_member_is_refused() -> None:
    core = MembershipCore(5, CFG, join=True)
    core.start(0.0)
    (refused,) = core.step(membership.LeaveCommand(), 0.0)
    assert refused.reason == "not_member"


def test_core_joiner_times_out() -> None:
    cfg = Config.local(join_timeout_s=0.5)
    core = MembershipCore(5, cfg, join=True)
    (read,) = core.start(0.0)
    core.step(ViewRead(1, View.of(1, [0, 1])), 0.0)
    acts = core.step(ViewRead(2, None), 0.0)
    assert core.status == "joining"
    assert any(isinstance(a, Publish) and isinstance(a.event, JoinRequest) for a in acts)
    t = 0.0
    while core.status == "joining" and t < 2.0:
        t += 0.02
        for a in core.step(Tick(), t):
            if isinstance(a, ReadView):
                core.step(ViewRead(a.epoch, None), t)
    assert core.status == "fenced" and "join_timeout_s" in core.fence_reason


# --- the async service over the in-process bus ---------------------------------------------------


async def _cluster(n: int, store: InMemoryViewStore, net: InProcessNetwork, cfg: Config = CFG):
    buses = [EventBus(net.transport(r), r) for r in range(n)]
    services = [MembershipService(r, buses[r], store, cfg, initial_members=tuple(range(n))) for r in range(n)]
    await asyncio.wait_for(asyncio.gather(*(s.start(ready_timeout=5) for s in services)), 10)
    await asyncio.wait_for(asyncio.gather(*(s.wait_member(5) for s in services)), 10)
    return buses, services


async def _close(buses, services) -> None:
    for s in services:
        await s.close()
    for b in buses:
        await b.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_service_reports_views_in_order_and_sets_the_bus_epoch() -> None:
    net, store = InProcessNetwork(seed=1), InMemoryViewStore()
    buses, services = await _cluster(4, store, net)
    try:
        stream = services[0].views()
        first = await asyncio.wait_for(stream.__anext__(), 5)
        assert first.epoch == 1 and first.members == (0, 1, 2, 3)
        evictions_before = metrics.sample("elasticep_evictions_total", {"cause": "exit"})
        for s in services[:3]:
            s.report(ProcessExit(rank=3, signal=9))  # the launcher tells each rank
        await services[3].close()
        await buses[3].close()
        second = await asyncio.wait_for(stream.__anext__(), 5)
        assert second.epoch == 2 and second.members == (0, 1, 2)
        await asyncio.gather(*(s.wait_view(lambda v: v.epoch == 2, 5) for s in services[:3]))
        assert [b.epoch for b in buses[:3]] == [2, 2, 2]
        assert [metrics.sample("elasticep_view_epoch", {"rank": str(r)}) for r in range(3)] == [2.0, 2.0, 2.0]
        assert metrics.sample("elasticep_evictions_total", {"cause": "exit"}) >= evictions_before + 1
        assert all(s.history == services[0].history for s in services[1:3])
    finally:
        await _close(buses[:3], services[:3])


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_service_hang_is_evicted_after_grace_and_leave_and_join_work() -> None:
    net, store = InProcessNetwork(seed=2), InMemoryViewStore()
    buses, services = await _cluster(4, store, net)
    extra_bus = None
    joiner = None
    try:
        net.partition({0, 1, 2}, {3})  # rank 3 goes silent (and hears nothing)
        t0 = asyncio.get_running_loop().time()
        await asyncio.gather(*(s.wait_view(lambda v: 3 not in v.members, 5) for s in services[:3]))
        waited_ms = (asyncio.get_running_loop().time() - t0) * 1e3
        assert waited_ms >= CFG.grace_ms * 0.9  # slow is not dead: never before the grace period
        assert "heartbeat" in services[0].current.reason
        # Rank 3, partitioned, could not evict the majority; it finds itself out and fences.
        net.heal()
        with pytest.raises(RankFenced, match="outside committed view"):
            async for _ in services[3].views():
                pass
        # A new rank 4 joins through the same path.
        extra_bus = EventBus(net.transport(4), 4)
        joiner = MembershipService(4, extra_bus, store, CFG, join=True)
        await joiner.start()
        view = await joiner.wait_member(5)
        assert 4 in view.members
        # Rank 1 leaves gracefully.
        left = await services[1].leave(timeout=5)
        assert 1 not in left.members and services[1].current is None
        final = await services[0].wait_view(lambda v: v.members == (0, 2, 4), 5)
        assert final.leader == 0
    finally:
        await _close(buses, services)
        if joiner is not None:
            await joiner.close()
        if extra_bus is not None:
            await extra_bus.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_service_fences_itself_when_the_store_is_lost() -> None:
    cfg = Config.local(store_timeout_s=0.3)
    net, store = InProcessNetwork(seed=3), InMemoryViewStore(timeout_s=0.3)
    buses, services = await _cluster(3, store, net, cfg)
    try:
        before = metrics.sample("elasticep_fenced_total", {"reason": "store_unreachable"})
        store.set_down(ranks={2})
        with pytest.raises(RankFenced, match="store unreachable"):
            await services[2].wait_view(lambda v: False, 5)
        assert metrics.sample("elasticep_fenced_total", {"reason": "store_unreachable"}) == before + 1
        # The others hear its Fenced event and remove it at once.
        view = await services[0].wait_view(lambda v: 2 not in v.members, 5)
        assert "fenced" in view.reason
    finally:
        await _close(buses, services)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_service_counts_store_conflicts() -> None:
    net, store = InProcessNetwork(seed=4), InMemoryViewStore()
    buses, services = await _cluster(3, store, net)
    try:
        before = metrics.sample("elasticep_view_store_conflicts_total")
        # Ranks 0 and 1 both learn of rank 2's exit; only rank 0 proposes (lowest), so force a
        # rival by committing epoch 2 behind their backs first.
        store.compare_and_set_nowait(View.of(2, [0, 1], proposer=1, reason="rival"))
        services[0].report(ProcessExit(rank=2))
        view = await services[0].wait_view(lambda v: v.epoch == 2, 5)
        assert view.reason == "rival"
        assert metrics.sample("elasticep_view_store_conflicts_total") == before + 1
    finally:
        await _close(buses, services)


# --- the store poll's cadence ----------------------------------------------------------------------

POLL = Config.local(store_poll_ms=50.0, store_idle_poll_ms=400.0, store_timeout_s=2.0)


def _member_with(cfg: Config, rank: int = 0, members=(0, 1, 2, 3)) -> MembershipCore:
    core = MembershipCore(rank, cfg, initial_members=members)
    (cas,) = core.start(0.0)
    core.step(CasDone(cas.view, cas.view), 0.0)
    core.step(ViewRead(2, None), 0.0)
    assert core.status == "member"
    return core


def _serve(core: MembershipCore, t0: float, t1: float, peers=(1, 2, 3), fail_reads: bool = False) -> list[float]:
    """Step ``core`` from ``t0`` to ``t1`` with every peer heartbeating each interval; answer every
    read (empty, or failed); return the times of the reads."""
    reads, dt, t, seq = [], core.config.heartbeat_interval_ms / 1e3, t0, 100
    while t < t1:
        t += dt
        seq += 1
        for p in peers:
            core.step(_env(p, Heartbeat(rank=p), epoch=core.view.epoch, seq=seq), t)
        for a in core.step(Tick(), t):
            if isinstance(a, ReadView):
                reads.append(t)
                core.step(StoreFailed("read", a.epoch, "refused") if fail_reads else ViewRead(a.epoch, None), t)
    return reads


def test_config_idle_poll_is_clamped_and_validated() -> None:
    assert POLL.idle_poll_s() == pytest.approx(0.4)
    assert Config.local(store_poll_ms=100.0, store_idle_poll_ms=5000.0, store_timeout_s=2.0).idle_poll_s() == 1.0
    assert Config.local(store_poll_ms=100.0, store_idle_poll_ms=10.0).idle_poll_s() == pytest.approx(0.1)
    assert Config.cluster().idle_poll_s() == pytest.approx(2.0)
    for bad in ({"store_idle_poll_ms": 0.0}, {"store_poll_ms": -1.0}):
        with pytest.raises(ValueError, match="must be > 0"):
            Config.local(**bad)


def test_core_quiet_member_polls_at_the_idle_cadence() -> None:
    core = _member_with(POLL)
    reads = _serve(core, 0.0, 4.0)
    gaps = [b - a for a, b in zip(reads, reads[1:])]
    assert 8 <= len(reads) <= 11, reads          # 4 s / 0.4 s, not 4 s / 0.05 s = 80
    assert min(gaps) >= 0.4 - 1e-9 and max(gaps) <= 0.4 + POLL.heartbeat_interval_ms / 1e3 + 1e-9


def test_core_polls_fast_while_something_is_in_flight() -> None:
    # A failed store operation: the poll returns to store_poll_ms until a read answers.
    core = _member_with(POLL)
    reads = _serve(core, 0.0, 1.0, fail_reads=True)
    gaps = [b - a for a, b in zip(reads, reads[1:])]
    assert reads[0] <= 0.4 + 0.04 + 1e-9 and len(gaps) >= 5 and max(gaps) <= 0.05 + 0.04 + 1e-9, reads
    # A suspicion not yet corroborated.
    core = _member_with(POLL)
    _serve(core, 0.0, 0.5)
    core.step(_env(1, Suspicion(observer=1, suspect=3, source="heartbeat"), seq=1000), 0.5)
    assert core.fusion.pending()
    assert core._poll_interval_s() == pytest.approx(0.05)
    # A silent peer: the monitor suspects it, so the fast cadence applies again.
    core = _member_with(POLL)
    _serve(core, 0.0, 0.5)
    reads = _serve(core, 0.5, 1.5, peers=(1, 2))
    assert core.monitor.suspected() or core.fusion.pending()
    assert len(reads) >= 8, reads


def test_core_ring_topology_always_polls_fast() -> None:
    cfg = POLL.replace(detection_topology="ring", monitors_per_rank=4)
    core = _member_with(cfg, members=tuple(range(8)))
    reads = _serve(core, 0.0, 2.0, peers=(1, 2, 6, 7))
    assert not core.monitor.suspected() and len(reads) >= 20, reads


def test_core_ring_with_a_pushing_store_polls_at_the_idle_cadence_and_reads_on_a_push() -> None:
    cfg = POLL.replace(detection_topology="ring", monitors_per_rank=4)
    core = _member_with(cfg, members=tuple(range(8)))
    core.store_pushes = True
    reads = _serve(core, 0.0, 2.0, peers=(1, 2, 6, 7))
    assert not core.monitor.suspected() and 4 <= len(reads) <= 6, reads  # 2 s / 0.4 s, not 2 s / 0.05 s
    # The store pushes a commit at epoch 2 (made by ranks this one does not hear): read it now.
    (read,) = [a for a in core.step(Committed(2), 2.01) if isinstance(a, ReadView)]
    assert read.epoch == 2
    acts = core.step(ViewRead(2, View.of(2, [0, 1, 2, 3, 5, 6, 7], proposer=3, reason="-4 (exit)")), 2.011)
    assert any(isinstance(a, Install) for a in acts) and core.view.epoch == 2
    # the store told every rank: no announcement on the bus (a store that cannot push gets one)
    assert not [a for a in acts if isinstance(a, Publish) and isinstance(a.event, ViewInstalled)]
    quiet = _member_with(cfg, members=tuple(range(8)))
    acts = quiet.step(ViewRead(2, View.of(2, [0, 1, 2, 3, 5, 6, 7], proposer=3, reason="-4 (exit)")), 2.011)
    assert [a.event.epoch for a in acts if isinstance(a, Publish) and isinstance(a.event, ViewInstalled)] == [2]
    for a in acts:
        if isinstance(a, ReadView):
            core.step(ViewRead(a.epoch, None), 2.012)
    # A push for an epoch already installed, or while a read is in flight, reads nothing more.
    assert not [a for a in core.step(Committed(2), 2.02) if isinstance(a, ReadView)]
    assert core._read is None
    core.step(Committed(3), 2.03)
    assert not [a for a in core.step(Committed(3), 2.031) if isinstance(a, ReadView)]


def test_core_a_read_that_raced_a_pushed_commit_reads_again_at_once() -> None:
    cfg = POLL.replace(detection_topology="ring", monitors_per_rank=4)
    core = _member_with(cfg, members=tuple(range(8)))
    core.store_pushes = True
    _serve(core, 0.0, 1.0, peers=(1, 2, 6, 7))
    # A poll of epoch 2 is in flight when the store pushes epoch 2's commit: no second read yet.
    (poll,) = [a for a in core.step(Tick(), 1.5) if isinstance(a, ReadView)]
    assert poll.epoch == 2
    assert not [a for a in core.step(Committed(2), 1.501) if isinstance(a, ReadView)]
    # The poll began before the commit and found nothing: read again now, not at the next poll.
    (again,) = [a for a in core.step(ViewRead(2, None), 1.502) if isinstance(a, ReadView)]
    assert again.epoch == 2
    # Bounded: a store that keeps answering "absent" for a pushed epoch is read at the poll cadence.
    rereads = 1
    while True:
        acts = [a for a in core.step(ViewRead(2, None), 1.503) if isinstance(a, ReadView)]
        if not acts:
            break
        rereads += 1
    assert rereads == PUSHED_REREADS
    # The next poll finds the view. No read of epoch 3 follows the install: the store pushes
    # its commit when there is one.
    (poll,) = [a for a in core.step(Tick(), 3.0) if isinstance(a, ReadView)]
    acts = core.step(ViewRead(poll.epoch, View.of(2, [0, 1, 2, 3, 5, 6, 7], proposer=3, reason="-4 (exit)")), 3.001)
    assert any(isinstance(a, Install) for a in acts) and core.view.epoch == 2
    assert not [a for a in acts if isinstance(a, ReadView)]
    assert not [a for a in core.step(Tick(), 3.05) if isinstance(a, ReadView)]  # nor at the next tick
    # pushed twice ahead (3 and 4 committed while 2 was read): the walk goes on without waiting
    core.step(Committed(4), 3.1)
    acts = core.step(ViewRead(3, View.of(3, [0, 1, 2, 3, 6, 7], proposer=3, reason="-5 (exit)")), 3.101)
    (walk,) = [a for a in acts if isinstance(a, ReadView)]
    assert core.view.epoch == 3 and walk.epoch == 4


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_in_memory_store_pushes_commits_and_fails_waits_when_down() -> None:
    store = InMemoryViewStore()
    assert store.pushes
    waiting = asyncio.ensure_future(store.wait_committed(1))
    await asyncio.sleep(0.02)
    assert not waiting.done()
    store.compare_and_set_nowait(View.of(1, [0, 1], reason="bootstrap"))
    assert await asyncio.wait_for(waiting, 1.0) is True
    assert await store.wait_committed(1) is True  # already there: at once
    waiting = asyncio.ensure_future(store.wait_committed(2))
    await asyncio.sleep(0.02)
    store.set_down()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(waiting, 1.0)


def test_core_newer_epoch_on_an_envelope_reads_at_once_and_forgeries_are_bounded() -> None:
    core = _member_with(POLL)
    _serve(core, 0.0, 1.0)
    # A view 2 committed elsewhere whose announcement was lost: a peer's envelope carries epoch 2.
    acts = core.step(_env(1, Heartbeat(rank=1), epoch=2, seq=5000), 1.1)
    (read,) = [a for a in acts if isinstance(a, ReadView)]
    acts = core.step(ViewRead(read.epoch, View.of(2, [0, 1, 2], proposer=1, reason="-3 (exit)")), 1.1)
    assert any(isinstance(a, Install) for a in acts) and core.view.epoch == 2
    for a in acts:
        if isinstance(a, ReadView):
            core.step(ViewRead(a.epoch, None), 1.1)
    # A forged epoch on every envelope, 1000 per second: at most one read per store_poll_ms.
    reads, t = 0, 1.2
    for i in range(1000):
        t += 0.001
        for a in core.step(_env(1, Heartbeat(rank=1), epoch=99, seq=6000 + i), t):
            if isinstance(a, ReadView):
                reads += 1
                assert not core.step(ViewRead(a.epoch, None), t) or core.view.epoch == 2
    assert 1 <= reads <= 1.0 / 0.05 + 1
    assert core.view.epoch == 2


def test_core_bootstrap_member_heartbeats_while_its_store_reads_are_slow() -> None:
    # Many ranks starting together can queue their store reads for a while; a bootstrap member
    # still walking the chain (syncing) is alive and must keep heartbeating, or the neighbours
    # that installed the view already would evict it as silent.
    hb_s = CFG.heartbeat_interval_ms / 1e3
    core = MembershipCore(1, CFG, initial_members=(0, 1, 2))
    actions = core.start(0.0)
    assert core.status == "syncing" and any(isinstance(a, (ReadView, CompareAndSet)) for a in actions)
    beats = 0
    for i in range(1, 11):  # ten heartbeat intervals with no store answer
        out = core.step(Tick(), i * hb_s)
        beats += sum(isinstance(a, Publish) and isinstance(a.event, Heartbeat) for a in out)
    assert core.status == "syncing" and beats == 10
    # A restarted process (a joiner) that is not in any view yet does not speak for a member.
    joiner = MembershipCore(3, CFG, join=True, incarnation=7)
    joiner.start(0.0)
    out = [a for i in range(1, 4) for a in joiner.step(Tick(), i * hb_s)]
    assert not any(isinstance(a, Publish) and isinstance(a.event, Heartbeat) for a in out)
