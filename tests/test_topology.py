"""The detection topology (pure): who hears whom, the ring's bounded fan-out, the startup grace."""

from __future__ import annotations

import asyncio

import random

import pytest

from elasticep.config import Config
from elasticep.detect.monitor import HeartbeatMonitor
from elasticep.events import Heartbeat, Suspicion
from elasticep.membership.core import CasDone, MembershipCore, Publish, ReadView, Tick, ViewRead
from elasticep.membership.topology import Topology, ring_distance
from elasticep.membership.view import View


def test_ring_is_symmetric_and_bounded() -> None:
    rng = random.Random(3)
    ring = Topology("ring", 4)
    for _ in range(300):
        members = tuple(sorted(rng.sample(range(40), rng.randint(1, 20))))
        for rank in range(40):
            neighbors = ring.neighbors(members, rank)
            assert len(neighbors) <= 4
            assert neighbors == tuple(m for m in members if m != rank and ring.hears(members, rank, m))
            for peer in range(40):
                assert ring.hears(members, rank, peer) == ring.hears(members, peer, rank)


def test_ring_neighbours_and_joiner_sponsors() -> None:
    ring = Topology("ring", 4)
    members = tuple(range(0, 20, 2))  # 0, 2, ..., 18
    assert ring.neighbors(members, 0) == (2, 4, 16, 18)
    assert ring.neighbors(members, 7) == (4, 6, 8, 10)  # a joiner's sponsors: where it would sit
    assert ring_distance(members, 6, 7) == 1 and ring_distance(members, 0, 18) == 1
    assert Topology("all").neighbors(members, 0) == members[1:]
    assert ring.neighbors((1, 2, 3, 4, 5), 1) == (2, 3, 4, 5)  # a small ring is all-to-all
    assert ring.messages_per_rank_per_s(1024, 40.0) == 100.0
    assert Topology("all").messages_per_rank_per_s(1024, 40.0) == 1023 * 25.0


def test_topology_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="detection_topology"):
        Config.local(detection_topology="star")
    with pytest.raises(ValueError, match="monitors_per_rank"):
        Config.local(detection_topology="ring", monitors_per_rank=3)
    with pytest.raises(ValueError, match="monitors_per_rank"):
        Topology("ring", 2)
    assert Config.local(detection_topology="ring", monitors_per_rank=6).monitors_per_rank == 6


def test_core_with_ring_watches_only_its_neighbours() -> None:
    cfg = Config.local(detection_topology="ring")
    core = MembershipCore(5, cfg, initial_members=tuple(range(64)))
    view = View.of(1, range(64), reason="bootstrap")
    core.step(CasDone(view, view), 0.0)
    assert core.watched() == (3, 4, 6, 7)
    assert core.hears(7) and not core.hears(8) and core.hears(100) is False
    assert Config.local().detection_topology == "all"


def _suspects(actions, core: MembershipCore | None = None, now: float = 0.0) -> set[int]:
    for a in actions:
        if core is not None and isinstance(a, ReadView):  # the store holds nothing newer
            actions = actions + core.step(ViewRead(a.epoch, None), now)
    return {a.event.suspect for a in actions if isinstance(a, Publish) and isinstance(a.event, Suspicion)}


def test_a_starting_peer_is_joining_until_first_heard() -> None:
    cfg = Config.local(startup_grace_s=5.0)
    core = MembershipCore(0, cfg, initial_members=(0, 1, 2))
    view = View.of(1, (0, 1, 2), reason="bootstrap")
    _suspects(core.step(CasDone(view, view), 0.0), core)
    assert core.status == "member" and core.monitor.joining() == {1, 2}
    t, seen = 0.0, set()
    while t < 4.9:  # rank 1 heartbeats, rank 2 never started: neither is suspected yet
        t = round(t + 0.04, 3)
        core.step(Heartbeat(rank=1, incarnation=0), t) if t < 1.0 else None
        seen |= _suspects(core.step(Tick(), t), core, t)
    assert 2 not in seen and core.monitor.joining() == {2}
    assert seen == {1}, "a heard peer that goes silent is judged by the steady-state timers"
    while t < 5.2:
        t = round(t + 0.04, 3)
        seen |= _suspects(core.step(Tick(), t), core, t)
    assert 2 in seen, "past startup_grace_s the never-heard peer is suspected"


def test_peers_heard_in_the_bootstrap_handshake_are_not_starting() -> None:
    # the service heard every bootstrap member before start(): a peer silent right after the
    # first view is judged by the steady-state timers, not left alone for startup_grace_s
    cfg = Config.local(startup_grace_s=60.0)
    core = MembershipCore(0, cfg, initial_members=(0, 1, 2))
    core.bootstrap_heard = True
    view = View.of(1, (0, 1, 2), reason="bootstrap")
    _suspects(core.step(CasDone(view, view), 0.0), core)
    assert core.monitor.joining() == set()
    t, seen = 0.0, set()
    while t < 1.0:
        t = round(t + 0.04, 3)
        core.step(Heartbeat(rank=1, incarnation=0), t)
        seen |= _suspects(core.step(Tick(), t), core, t)
    assert 2 in seen and 1 not in seen


def test_monitor_startup_grace_applies_to_the_first_view_only() -> None:
    cfg = Config.local(startup_grace_s=5.0)
    monitor = HeartbeatMonitor(0, cfg)
    monitor.watch([1], 0.0)
    monitor.watch([1, 2], 0.0, joining=True)
    assert monitor.joining() == {2}  # rank 1 was already watched as a running peer


def test_the_transports_peer_filter_agrees_with_the_core_on_every_rank(tcp_store) -> None:
    """The service hands its bus transport a filter built once per view (a set of neighbours);
    it must select exactly the ranks the core hears, for members, departed ranks and joiners
    alike, and follow each new view."""
    from elasticep.bus import ClusterKeys, EventBus, ZmqTransport
    from elasticep.membership.service import MembershipService
    from elasticep.membership.store import TCPStoreViewStore

    n, rank = 40, 9
    cfg = Config.local(detection_topology="ring", monitors_per_rank=6)
    keys = ClusterKeys.generate(n + 4)
    transport = ZmqTransport(rank, keys.for_rank(rank), tcp_store)
    bus = EventBus(transport, rank)
    svc = MembershipService(rank, bus, TCPStoreViewStore(store=tcp_store), cfg, initial_members=tuple(range(n)))
    assert svc._hook_topology()
    wanted = transport._wanted
    core = svc.core

    asked: list[int] = []
    hears = core.hears

    def counted(peer: int) -> bool:
        asked.append(peer)
        return hears(peer)

    def agree(label: str) -> None:
        asked.clear()
        core.hears = counted
        try:
            chosen = {p for p in range(n + 4) if wanted(p)}
        finally:
            del core.hears
        assert chosen == {p for p in range(n + 4) if core.hears(p)}, label
        assert chosen, label
        members = core.view.members if core.view is not None else core.initial
        if rank in members:  # a member's filter answers for members from its set, not peer by peer
            assert not set(asked) & set(members), label

    agree("bootstrap members, no view yet")
    views = [
        View.of(1, range(n), reason="bootstrap"),
        View.of(2, [r for r in range(n) if r not in (7, 8, 11)], reason="evict 7, 8, 11"),  # neighbours gone
        View.of(3, [r for r in range(n) if r not in (7, 8, 11, 9)], reason="this rank evicted"),
        View.of(4, [r for r in range(n + 3) if r not in (7, 8, 11)], reason="joiners beyond the ring's end"),
    ]
    for view in views:
        core.view = view  # each view as the core installs it
        agree(view.reason)

    # Applying the filter after a view change asks it about the ranks outside the member set
    # only; the members' answer comes as one set (`selected`), not a call per known rank.
    transport._started = True
    transport._known = {}
    transport._unread = set(range(n + 4)) - {rank}
    core.view = views[1]
    calls: list[int] = []
    transport._wanted = lambda peer: (calls.append(peer), wanted(peer))[1]
    transport._filter_task = asyncio.Future(loop=asyncio.new_event_loop())  # a read in flight: no new one
    try:
        transport.apply_peer_filter()
    finally:
        transport._started = False
        transport._filter_task.get_loop().close()
        transport._filter_task = None
    assert set(calls) == set(range(n + 4)) - set(views[1].members) - {rank}  # the departed and the unknown


def test_view_lookups_of_non_members() -> None:
    view = View.of(3, [2, 5, 9], incarnations={5: 4}, reason="r")
    assert view.incarnation_of(5) == 4 and view.incarnation_of(9) == 0
    assert view.has(5, 4) and not view.has(5) and view.has(2) and not view.has(3) and not view.has(10)
    with pytest.raises(ValueError):
        view.incarnation_of(3)
    assert view.incarnation_map() == {2: 0, 5: 4, 9: 0}
    assert View.of(1, [1, 4]).incarnation_map() == {1: 0, 4: 0}
