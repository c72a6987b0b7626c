"""The host board: heartbeats between the ranks of one host through shared memory.

Unit tests of the slots (seqlock, first look, freshness, layout, clean-up) on a real file, and
agents with real ZeroMQ buses and a real TCPStore: on one board they send no heartbeat on the
bus; a rank that stops beating is evicted by its silence on the board; a rank without a board
is still heard, and still hears the others, over the bus.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch.distributed import TCPStore

from elasticep import Agent, Config, EngineHooks, metrics
from elasticep.bus import ClusterKeys
from elasticep.detect.board import HostBoard, open_board, sweep_stale_boards
from elasticep.eplb import initial
from elasticep.errors import InvalidArgument


def _board(tmp_path: Path, rank: int, incarnation: int = 0, name: str = "c@h:1") -> HostBoard:
    return HostBoard(name, rank, incarnation, directory=tmp_path, slots=64)


def test_a_beat_is_seen_once_with_the_writers_epoch_and_incarnation(tmp_path: Path) -> None:
    a, b = _board(tmp_path, 0, incarnation=7), _board(tmp_path, 1)
    assert a.path == b.path
    a.beat(3)
    assert b.changed([0, 1], now=1.0) == []  # the first look only records: no old beat is a heartbeat
    a.beat(4)
    (peer, slot), = b.changed([0, 1], now=2.0)
    assert (peer, slot.epoch, slot.incarnation, slot.pid) == (0, 4, 7, os.getpid())
    assert b.changed([0], now=2.01) == []  # not moved since
    assert b.fresh(0, now=2.1, within_s=0.2) and not b.fresh(0, now=2.3, within_s=0.2)
    assert not b.fresh(5, now=2.1, within_s=0.2)  # never seen
    # stale(): the watch list's peers that are not fresh, in one call
    assert b.stale([0, 5], now=2.1, within_s=0.2) == {5}
    assert b.stale([0, 5], now=2.3, within_s=0.2) == {0, 5}
    assert b.stale([], now=2.3, within_s=0.2) == set()
    a.close()
    b.close()


def test_a_slot_being_rewritten_is_skipped_and_a_new_process_reports_its_own_incarnation(tmp_path: Path) -> None:
    old, reader = _board(tmp_path, 2, incarnation=1), _board(tmp_path, 0)
    old.beat(1)
    reader.changed([2], now=0.0)
    new = _board(tmp_path, 2, incarnation=2)  # rank 2 restarted: its slot is zeroed while it is written
    assert reader.read(2) is None
    assert reader.changed([2], now=0.1) == []
    new.beat(1)
    (peer, slot), = reader.changed([2], now=0.2)
    assert (peer, slot.incarnation) == (2, 2)
    for board in (old, new, reader):
        board.close(clear=False)


def test_boards_of_other_clusters_are_other_files(tmp_path: Path) -> None:
    a, b = _board(tmp_path, 0, name="one@h:1"), _board(tmp_path, 1, name="two@h:1")
    assert a.path != b.path
    a.beat(1)
    b.changed([0], 0.0)
    a.beat(2)
    assert b.changed([0], 0.1) == []
    a.close()
    b.close()


def test_a_file_of_another_layout_or_a_rank_without_a_slot_falls_back_to_the_bus(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        _board(tmp_path, 64)
    a = _board(tmp_path, 0)
    path = a.path
    a._words[1] = 99  # another version wrote this file
    before = metrics.HOST_BOARD_UNAVAILABLE._value.get()
    with pytest.raises(OSError, match="not a board of this layout"):
        _board(tmp_path, 1)
    assert open_board("c@h:1", 1, directory=tmp_path, slots=64) is None
    assert open_board("c@h:1", 99, directory=tmp_path, slots=64) is None
    assert metrics.HOST_BOARD_UNAVAILABLE._value.get() == before + 2
    a.close()
    assert not path.exists()


def test_a_link_planted_at_the_boards_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    probe = _board(tmp_path, 0)
    name = probe.path
    probe.close()
    name.symlink_to(victim)
    with pytest.raises(OSError):
        _board(tmp_path, 0)
    assert open_board("c@h:1", 0, directory=tmp_path, slots=64) is None
    assert victim.read_bytes() == b"precious"


def _hold_a_slot_and_die(directory: str, rank: int) -> None:
    board = HostBoard("c@h:1", rank, directory=directory, slots=64)
    board.beat(1)
    os._exit(0)  # no close(): as a SIGKILL leaves it


def test_the_last_live_rank_removes_the_file_even_after_a_peer_was_killed(tmp_path: Path) -> None:
    a = _board(tmp_path, 0)
    p = mp.get_context("fork").Process(target=_hold_a_slot_and_die, args=(str(tmp_path), 1))
    p.start()
    p.join(30)
    assert a.read(1) is not None  # the dead process's slot is still written
    b = _board(tmp_path, 2)
    a.close()
    assert a.path.exists()  # rank 2 is alive
    b.close()
    assert not a.path.exists()


def test_boards_whose_every_rank_was_killed_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    p = mp.get_context("fork").Process(target=_hold_a_slot_and_die, args=(str(tmp_path), 3))
    p.start()
    p.join(30)
    dead = _board(tmp_path, 0)
    dead_path = dead.path
    dead.close(clear=False)  # rank 0 of it gone too, its slot still written: nobody will remove the file
    live = _board(tmp_path, 0, name="other@h:1")
    (tmp_path / "elasticep-board-notes").write_text("not a board")
    assert dead_path.exists()
    assert sweep_stale_boards(tmp_path) == 0  # rank 0's pid (ours) is alive: kept
    words = memoryview(bytearray(dead_path.read_bytes())).cast("Q")
    for slot in range(64):
        if words[8 + 4 * slot + 1] == os.getpid():
            words[8 + 4 * slot + 1] = 0  # as if this process had been killed
    dead_path.write_bytes(words.tobytes())
    assert sweep_stale_boards(tmp_path) == 1
    assert not dead_path.exists() and live.path.exists() and (tmp_path / "elasticep-board-notes").exists()
    live.close()


def test_host_board_is_a_config_field_with_a_typed_environment_value(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Config.local().host_board and Config.cluster().host_board
    monkeypatch.setenv("ELASTICEP_HOST_BOARD", "off")
    assert not Config.local().host_board
    monkeypatch.setenv("ELASTICEP_HOST_BOARD", "maybe")
    with pytest.raises(InvalidArgument, match="ELASTICEP_HOST_BOARD"):
        Config.local()


# --- agents -------------------------------------------------------------------------------------


class _Engine(EngineHooks):
    def __init__(self, ranks: int) -> None:
        self.served = initial(torch.ones(2, 6), num_ranks=ranks, slots_per_rank=4)

    def placement(self):
        return self.served

    def commit(self, change) -> None:
        self.served = change.placement


def _agents(n: int, configs: list[Config]) -> tuple[TCPStore, list[Agent]]:
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    store, keys, cluster = f"127.0.0.1:{server.port}", ClusterKeys.generate(n), uuid.uuid4().hex[:8]
    agents = [Agent(r, _Engine(n), store=store, cluster=cluster, members=range(n), keys=keys, config=configs[r])
              for r in range(n)]
    starts = [threading.Thread(target=a.start) for a in agents]
    for t in starts:
        t.start()
    for t in starts:
        t.join(60)
    return server, agents


def _serve(agents: list[Agent], until) -> None:
    """Each engine's step loop in a thread of its own (a view's collectives need them all)."""
    deadline = time.monotonic() + 30

    def loop(agent: Agent) -> None:
        while not until() and time.monotonic() < deadline:
            agent.boundary()
            time.sleep(0.005)

    threads = [threading.Thread(target=loop, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)


def _published(agent: Agent) -> int:
    return agent.bus.statistics().published


@pytest.mark.timeout(120)
def test_agents_on_one_host_send_no_heartbeat_on_the_bus_and_a_silent_rank_is_still_evicted() -> None:
    server, agents = _agents(3, [Config.local()] * 3)
    try:
        assert all(a.service.board is not None for a in agents)
        time.sleep(0.5)  # beats seen on the board: each rank stops heartbeating on the bus
        sent = [_published(a) for a in agents]
        spared = [a.service.bus_heartbeats_spared for a in agents]
        read = [a.service.board_heartbeats for a in agents]
        time.sleep(1.0)
        for i, a in enumerate(agents):
            assert _published(a) == sent[i], "a heartbeat went over the bus"
            assert a.service.bus_heartbeats_spared - spared[i] >= 15  # 25 a second at 40 ms
            assert a.service.board_heartbeats - read[i] >= 30  # from two peers
        assert all(a.epoch == 1 for a in agents)
        # rank 2 goes silent on its board (as a hung process would) while its bus stays open
        agents[2].service.board.beat = lambda epoch: None
        _serve(agents[:2], lambda: all(a.epoch >= 2 for a in agents[:2]))
        view = agents[0].service.current
        assert view is not None and view.members == (0, 1)
        assert view.changes[0].rank == 2 and view.changes[0].cause.value == "heartbeat"
    finally:
        for a in agents:
            a.stop()
        del server


@pytest.mark.timeout(120)
def test_a_rank_without_a_board_hears_and_is_heard_over_the_bus() -> None:
    configs = [Config.local(), Config.local(), Config.local(host_board=False)]
    server, agents = _agents(3, configs)
    try:
        assert agents[2].service.board is None
        time.sleep(0.5)
        sent = [_published(a) for a in agents]
        spared = [a.service.bus_heartbeats_spared for a in agents]
        heard = [a.bus.statistics().senders for a in agents]
        time.sleep(1.0)
        for i, a in enumerate(agents):
            # every rank is watched by rank 2, which reads no board: all of them heartbeat on the bus
            assert _published(a) - sent[i] >= 15
            assert a.service.bus_heartbeats_spared == spared[i]
        # ...but ranks 0 and 1 read each other's beats on the board, so neither subscribes to the
        # other's beats on the bus (only rank 2's), and their sockets do not send them
        assert agents[0].bus.transport.beats_left_out() == {1} and agents[1].bus.transport.beats_left_out() == {0}
        assert agents[2].bus.transport.beats_left_out() == set()
        now = [a.bus.statistics().senders for a in agents]
        assert now[0][1] == heard[0][1] and now[1][0] == heard[1][0]  # no beat of the other arrived
        assert now[0][2][1] - heard[0][2][1] >= 15 and now[2][0][1] - heard[2][0][1] >= 15
        assert all(a.epoch == 1 and a.service.current.members == (0, 1, 2) for a in agents)
    finally:
        for a in agents:
            a.stop()
        del server


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_service_ticks_once_per_interval_on_its_grid_even_with_millisecond_timers(loop: str) -> None:
    """Ticks fall on a per-process grid; a timer that fires a little early (libuv's are
    millisecond timers) must not tick twice at one grid point (twice the CPU when it did)."""
    from elasticep.bus.loop import run

    run(_ticks_once_per_interval(), kind=loop)


async def _ticks_once_per_interval() -> None:
    from elasticep.bus import EventBus, InProcessNetwork
    from elasticep.membership import InMemoryViewStore, MembershipService

    net, store = InProcessNetwork(seed=1), InMemoryViewStore()
    buses = [EventBus(net.transport(r), r) for r in (0, 1)]
    services = [MembershipService(r, buses[r], store, Config.local(), initial_members=(0, 1)) for r in (0, 1)]
    ticks = [0, 0]
    for r, s in enumerate(services):
        real = s.core._tick

        def counted(now, real=real, r=r):
            ticks[r] += 1
            return real(now)

        s.core._tick = counted
    for b in buses:
        await b.start()
    await asyncio.gather(*(s.start() for s in services))
    before = list(ticks)
    await asyncio.sleep(1.0)
    try:
        for r in (0, 1):
            assert services[r].current is not None and not services[r].core.monitor.suspected()
            # 25 grid points a second at 40 ms (a little slack for a late start of the window)
            assert 20 <= ticks[r] - before[r] <= 27, ticks
    finally:
        for s in services:
            await s.close()
        for b in buses:
            await b.close()
