"""The engine-neutral agent over real parts: TCPStore, CURVE ZeroMQ bus, gloo groups.

Several agents run in one process here (each on its own thread and loop, as in an engine
process); one test kills a rank process with SIGKILL.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import urllib.request
import uuid
from datetime import timedelta

import pytest
import torch

from elasticep import metrics
from elasticep.agent import (
    SERVING,
    Agent,
    AgentFenced,
    AgentStateError,
    AgentStopped,
    EngineHooks,
    ViewTimeout,
)
from elasticep.bus import ClusterKeys
from elasticep.config import Config
from elasticep.eplb import initial

pytestmark = [pytest.mark.timeout(120)]


class ToyHooks(EngineHooks):
    """A user's engine in a few lines: it serves a placement and applies commits."""

    def __init__(self, ranks: int = 4, fail_commit: str | None = None) -> None:
        self._placement = initial(torch.ones(2, 8), num_ranks=ranks, slots_per_rank=4)
        self.commits: list[tuple[int, tuple[int, ...]]] = []
        self.views: list[int] = []
        self.fail_commit = fail_commit
        self.release = threading.Event()

    def placement(self):
        return self._placement

    def on_view(self, view) -> None:
        self.views.append(view.epoch)

    def commit(self, change) -> None:
        if self.fail_commit == "raise":
            raise OSError("device lost")
        if self.fail_commit == "hang":
            self.release.wait(30)
        assert all(change.alive[r] == (r in change.view.members) for r in range(change.placement.num_ranks))
        self._placement = change.placement
        self.commits.append((change.epoch, tuple(change.view.members)))


@pytest.fixture
def cluster():
    from torch.distributed import TCPStore

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    yield {"store": f"127.0.0.1:{server.port}", "keys": ClusterKeys.generate(8), "cluster": uuid.uuid4().hex[:8],
           "server": server}


def _agents(cluster, hooks, members, **kw):
    return [Agent(r, hooks[r], store=cluster["store"], cluster=cluster["cluster"], members=members,
                  keys=cluster["keys"], config=Config.local(), **kw) for r in members]


def _start_all(agents):
    errors = []

    def start(a):
        try:
            a.start(timeout=60)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors


def _serve_until(agents, predicate, timeout=20.0):
    """Each agent's engine loop on its own thread: call boundary() until ``predicate(agent)``."""
    outcome: dict[int, object] = {}
    finished: dict[int, float] = {}

    def loop(a):
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                status = a.boundary()
                if predicate(a):
                    outcome[a.rank] = status
                    return
                time.sleep(0.005)
            outcome[a.rank] = TimeoutError("predicate not reached")
        except BaseException as exc:
            outcome[a.rank] = exc
        finally:
            finished[a.rank] = time.monotonic()

    threads = [threading.Thread(target=loop, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    _serve_until.finished = finished  # type: ignore[attr-defined]
    return outcome


def test_a_stopped_rank_is_evicted_and_every_survivor_commits_the_same_view(cluster) -> None:
    hooks = [ToyHooks() for _ in range(4)]
    agents = _agents(cluster, hooks, range(4))
    _start_all(agents)
    try:
        assert [a.epoch for a in agents] == [1, 1, 1, 1]
        agents[3].stop()
        out = _serve_until(agents[:3], lambda a: a.epoch >= 2)
        assert out == {0: SERVING, 1: SERVING, 2: SERVING}
        for h in hooks[:3]:
            assert h.commits == [(2, (0, 1, 2))]
            assert 2 in h.views
            # the new placement keeps every expert on a live rank
            live = h.placement().phy2log[:, : 3 * 4]
            assert all(set(range(8)) <= set(live[layer].tolist()) for layer in range(2))
        status = agents[0].status()
        assert status["epoch"] == 2 and status["members"] == [0, 1, 2]
        assert status["last_reconfiguration"]["status"] == "committed"
        assert set(status["last_reconfiguration"]["phases_ms"]) == {"plan", "groups", "weights", "commit", "resume"}
    finally:
        for a in agents:
            a.stop()


def test_front_door_misuse_is_typed_and_counted(cluster) -> None:
    hooks = [ToyHooks(ranks=2) for _ in range(2)]
    agents = _agents(cluster, hooks, range(2), metrics_port=0)
    before = metrics.sample("elasticep_agent_errors_total", {"kind": "not_started"})
    with pytest.raises(AgentStateError, match="call start"):
        agents[0].boundary()
    assert metrics.sample("elasticep_agent_errors_total", {"kind": "not_started"}) == before + 1
    from elasticep.events import Heartbeat

    with pytest.raises(AgentStateError, match="cannot report"):
        agents[0].report(Heartbeat(rank=1, incarnation=0))
    _start_all(agents)
    try:
        twice = metrics.sample("elasticep_agent_errors_total", {"kind": "started_twice"})
        with pytest.raises(AgentStateError, match="starts once"):
            agents[0].start()
        assert metrics.sample("elasticep_agent_errors_total", {"kind": "started_twice"}) == twice + 1
        from elasticep.bus.bus import NotAnEventType

        with pytest.raises(NotAnEventType):
            agents[0].report({"rank": 1})  # type: ignore[arg-type]
        # the agent serves the Prometheus page while it runs, with the count just made
        page = urllib.request.urlopen(f"http://{agents[0].metrics_address}/metrics", timeout=10).read().decode()
        assert f'elasticep_agent_errors_total{{kind="started_twice"}} {twice + 1}' in page
        address = agents[0].metrics_address
    finally:
        for a in agents:
            a.stop()
    assert agents[0].metrics_address is None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{address}/metrics", timeout=2)
    with pytest.raises(ValueError, match="metrics_port"):
        Agent(0, ToyHooks(), store=cluster["store"], members=(0,), keys=cluster["keys"], metrics_port=70000)
    with pytest.raises(AgentStopped):
        agents[0].boundary()
    with pytest.raises(ValueError, match="bootstrap members"):
        Agent(5, ToyHooks(), store=cluster["store"], members=(0, 1), keys=cluster["keys"])
    with pytest.raises(ValueError, match="HOST:PORT"):
        Agent(0, ToyHooks(), store="nowhere", members=(0,), keys=cluster["keys"])
    with pytest.raises(TypeError, match="EngineHooks"):
        Agent(0, object(), store=cluster["store"], members=(0,), keys=cluster["keys"])  # type: ignore[arg-type]


@pytest.mark.parametrize("failure", ["raise", "hang"])
def test_a_commit_hook_that_fails_fences_its_rank_and_the_rest_go_on(cluster, failure) -> None:
    hooks = [ToyHooks(), ToyHooks(), ToyHooks(fail_commit=failure), ToyHooks()]
    agents = _agents(cluster, hooks, range(4), hook_timeout_s=1.0)
    _start_all(agents)
    kind = "error" if failure == "raise" else "timeout"
    before = metrics.sample("elasticep_hook_failures_total", {"hook": "commit", "kind": kind})
    try:
        agents[3].stop()
        t0 = time.monotonic()
        out = _serve_until(agents[:3], lambda a: a.epoch >= 3 or a.rank == 2 and a.epoch >= 2, timeout=45)
        # the failing rank's engine thread is back within the hook bound, with a typed error
        assert isinstance(out[2], AgentFenced), out
        assert "commit" in str(out[2])
        assert _serve_until.finished[2] - t0 < 15  # type: ignore[attr-defined]
        assert metrics.sample("elasticep_hook_failures_total", {"hook": "commit", "kind": kind}) == before + 1
        assert hooks[2].commits == []  # nothing of the view was applied there
        # the others evicted it and serve a view without it
        assert out[0] == SERVING and out[1] == SERVING
        assert hooks[0].commits[-1][1] == (0, 1) and hooks[1].commits[-1][1] == (0, 1)
    finally:
        hooks[2].release.set()
        for a in agents:
            a.stop()


def test_stop_during_a_reconfiguration_leaves_the_view_unapplied(cluster) -> None:
    hooks = [ToyHooks(ranks=3) for _ in range(3)]
    agents = _agents(cluster, hooks, range(3))
    _start_all(agents)
    try:
        agents[2].stop()
        # rank 1 never reaches its boundary: rank 0's commit barrier waits for it
        holder: dict[str, object] = {}

        def run() -> None:
            try:
                holder["status"] = agents[0].boundary()
                while agents[0].epoch < 2:
                    holder["status"] = agents[0].boundary()
                    time.sleep(0.005)
            except BaseException as exc:
                holder["error"] = exc

        deadline = time.monotonic() + 10
        while agents[0].status()["view"]["epoch"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        engine = threading.Thread(target=run)
        engine.start()
        time.sleep(0.5)
        counted = metrics.sample("elasticep_agent_errors_total", {"kind": "stopped_during_reconfiguration"})
        agents[0].stop()
        engine.join(15)
        assert not engine.is_alive(), "the engine thread was left blocked"
        assert isinstance(holder.get("error"), AgentStopped), holder
        assert hooks[0].commits == []
        assert metrics.sample("elasticep_agent_errors_total", {"kind": "stopped_during_reconfiguration"}) == counted + 1
    finally:
        for a in agents:
            a.stop()


class LoadedHooks(ToyHooks):
    """An engine that records its expert load (here: of the wrong shape, or a hot expert 5)."""

    def __init__(self, load) -> None:
        super().__init__(ranks=3)
        self._placement = initial(torch.ones(2, 6), num_ranks=3, slots_per_rank=4)  # 12 slots, 6 experts
        self.load = load
        self.load_calls = 0

    def expert_load(self):
        self.load_calls += 1
        return self.load


def test_the_leader_plans_with_the_engines_load_and_refuses_a_bad_one(cluster) -> None:
    hot = torch.ones(2, 6)
    hot[:, 5] = 1000.0  # expert 5 takes nearly every token
    hooks = [LoadedHooks(hot) for _ in range(3)]
    agents = _agents(cluster, hooks, range(3))
    _start_all(agents)
    try:
        agents[2].stop()
        out = _serve_until(agents[:2], lambda a: a.epoch >= 2)
        assert out == {0: SERVING, 1: SERVING}
        assert [h.load_calls for h in hooks[:2]] == [1, 0]  # the view's leader (rank 0) alone plans
        served = hooks[0].placement().phy2log[:, : 2 * 4]
        for layer in range(2):
            counts = torch.bincount(served[layer][served[layer] >= 0], minlength=6)
            assert int(counts[5]) == int(counts.max()) and int(counts[5]) > int(counts.min()), counts  # the hot one most
    finally:
        for a in agents:
            a.stop()


def test_a_bad_load_is_counted_and_the_view_still_commits(cluster) -> None:
    hooks = [LoadedHooks(torch.ones(5, 5)) for _ in range(3)]  # not [moe_layers, experts]
    agents = _agents(cluster, hooks, range(3))
    _start_all(agents)
    before = metrics.sample("elasticep_hook_failures_total", {"hook": "expert_load", "kind": "bad_value"})
    try:
        agents[2].stop()
        out = _serve_until(agents[:2], lambda a: a.epoch >= 2)
        assert out == {0: SERVING, 1: SERVING}
        assert metrics.sample("elasticep_hook_failures_total", {"hook": "expert_load", "kind": "bad_value"}) == before + 1
    finally:
        for a in agents:
            a.stop()


def test_an_engine_side_rebalance_is_what_the_next_view_plans_from(cluster) -> None:
    from elasticep.eplb.placement import Placement

    hooks = [ToyHooks(ranks=2) for _ in range(2)]
    agents = _agents(cluster, hooks, range(2))
    _start_all(agents)
    try:
        phy = hooks[0].placement().phy2log.clone()
        phy[:, [0, 4]] = phy[:, [4, 0]]  # the engine's own rebalance swaps two slots, on every rank
        for h in hooks:
            h._placement = Placement(phy.clone(), 4, 8)
        for a in agents:
            a.placement_changed()
        epoch, recorded = agents[1].committed_placement()
        assert epoch == 1 and torch.equal(recorded.phy2log, phy)
    finally:
        for a in agents:
            a.stop()


def test_lost_peers_that_no_view_removes_end_in_a_typed_timeout(cluster) -> None:
    hooks = [ToyHooks(ranks=2) for _ in range(2)]
    agents = _agents(cluster, hooks, range(2), view_wait_s=0.5)
    _start_all(agents)
    before = metrics.sample("elasticep_agent_errors_total", {"kind": "view_timeout"})
    try:
        # rank 1 is alive and heard: one step's loss is no verdict, so no view comes
        with pytest.raises(ViewTimeout, match="a view without ranks \\[1\\]") as info:
            agents[0].peers_lost([1])
        assert isinstance(info.value, TimeoutError) and info.value.timeout_s == 0.5
        assert metrics.sample("elasticep_agent_errors_total", {"kind": "view_timeout"}) == before + 1
        assert agents[0].boundary() == SERVING and agents[0].epoch == 1
    finally:
        for a in agents:
            a.stop()


def test_wait_newer_view_times_out_while_all_serve_and_returns_once_a_rank_is_gone(cluster) -> None:
    hooks = [ToyHooks(ranks=3) for _ in range(3)]
    agents = _agents(cluster, hooks, range(3))
    _start_all(agents)
    try:
        t0 = time.monotonic()
        assert agents[0].wait_newer_view(timeout_s=0.3) is False  # every rank is heard: no view comes
        assert time.monotonic() - t0 >= 0.3 and agents[0].epoch == 1
        agents[2].stop()
        assert agents[0].wait_newer_view(timeout_s=20.0) is True
        assert agents[0].epoch == 1  # installed, not yet committed: boundary() commits it
        out = _serve_until(agents[:2], lambda a: a.epoch >= 2)
        assert out == {0: SERVING, 1: SERVING} and agents[0].members == (0, 1)
    finally:
        for a in agents:
            a.stop()
    with pytest.raises(AgentStopped):
        agents[0].wait_newer_view(timeout_s=0.1)


def _rank_process(store: str, keys_json: str, cluster: str, rank: int, ready) -> None:
    keys = ClusterKeys.from_json(keys_json)
    agent = Agent(rank, ToyHooks(ranks=3), store=store, cluster=cluster, members=range(3), keys=keys)
    agent.start(timeout=60)
    ready.set()
    while True:
        agent.boundary()
        time.sleep(0.01)


@pytest.mark.multiproc
def test_a_sigkilled_rank_process_is_evicted(cluster) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_rank_process,
                        args=(cluster["store"], cluster["keys"].to_json(), cluster["cluster"], 2, ready), daemon=True)
    child.start()
    hooks = [ToyHooks(ranks=3) for _ in range(2)]
    agents = [
        Agent(r, hooks[r], store=cluster["store"], cluster=cluster["cluster"], members=range(3),
              keys=cluster["keys"]) for r in (0, 1)]
    try:
        _start_all(agents)
        assert ready.wait(60)
        os.kill(child.pid, signal.SIGKILL)
        t0 = time.monotonic()
        out = _serve_until(agents, lambda a: a.epoch >= 2)
        assert out == {0: SERVING, 1: SERVING}
        assert time.monotonic() - t0 < 5
        assert [h.commits for h in hooks] == [[(2, (0, 1))], [(2, (0, 1))]]
    finally:
        for a in agents:
            a.stop()
        child.join(10)
