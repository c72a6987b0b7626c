"""elasticep.Agent inside SGLang scheduler processes, through the plugin path, with the real sglang.

Two spawned scheduler processes (``elasticep_sglang.testing.run_scheduler_double``): each
loads SGLang's plugins (our ``sglang.srt.plugins`` entry point starts the agent from the
environment), brings up ``torch.distributed`` (gloo, ``tcp://`` init: the agent finds its store
there), SGLang's real ``ElasticEPState`` and ``ExpertLocationMetadata``, and calls SGLang's
``maybe_rebalance_after_rank_fault`` after each forward pass. A third rank, a plain agent in its
own process (``run_agent_double``), is SIGKILLed; the schedulers' agents agree on a view without
it and commit it into SGLang once, moving experts with SGLang's own expert location updater over
gloo. The model, the EPLB manager and Mooncake EP's kernel are test doubles (GPU parts).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import elasticep_sglang  # noqa: F401
except ImportError:  # an editable install made before adapters/ existed does not map it
    sys.path.insert(0, str(ROOT / "adapters"))

# found, not imported: the schedulers import SGLang in their own processes
_SGLANG_MISSING = ", ".join(m for m in ("sglang", "einops") if importlib.util.find_spec(m) is None)
if _SGLANG_MISSING:
    _SGLANG_MISSING = f"{_SGLANG_MISSING} not installed (SGLang's expert location updater needs einops); " \
                      "install the sglang extra"

pytestmark = [pytest.mark.sglang, pytest.mark.timeout(180),
              pytest.mark.skipif(bool(_SGLANG_MISSING), reason=_SGLANG_MISSING or "-")]

from elasticep import metrics  # noqa: E402
from elasticep.bus import ClusterKeys  # noqa: E402

S = 4  # slots per rank
# 2 layers x 12 slots on 3 ranks, 6 experts. Layer 0: expert 5 lives only on rank 2 (it must come
# from the checkpoint). Layer 1: without rank 2, rank 0 serves four experts alone and rank 1 two
# twice, so the planner copies some of rank 0's (also held by dead rank 2) to rank 1.
PHY2LOG = [[0, 1, 2, 3, 4, 0, 1, 2, 5, 3, 4, 5],
           [0, 1, 2, 3, 4, 5, 4, 5, 0, 1, 2, 3]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(keys: ClusterKeys, cluster: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "ELASTICEP_SGLANG_HOOKS": "1",
        "ELASTICEP_SGLANG_AGENT": "1",
        "ELASTICEP_SGLANG_CLUSTER": cluster,
        "ELASTICEP_BUS_KEYS": keys.to_json(),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "adapters"), env.get("PYTHONPATH", "")]),
        "MC_LOG_LEVEL": "WARNING",
        # detection timings that a machine shared with other work does not trip (the kill itself
        # is seen as a closed socket at once)
        "ELASTICEP_SGLANG_PROFILE": "cluster",
    })
    env.pop("ELASTICEP_SGLANG_STORE", None)  # the store comes from SGLang's torch.distributed
    env.pop("SGLANG_PLUGINS", None)
    return env


def _wait_files(paths, procs, timeout):
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        for rank, proc in procs.items():
            if proc.poll() is not None and not all(p.exists() for p in paths if p.name.endswith(f"-{rank}")
                                                   or p.name.endswith(f"-{rank}.json")):
                pytest.fail(f"scheduler {rank} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            missing = [p.name for p in paths if not p.exists()]
            pytest.fail(f"timed out waiting for {missing}")
        time.sleep(0.05)


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def test_a_killed_scheduler_is_committed_into_sglang_once_by_the_survivors_agents(tmp_path) -> None:
    keys = ClusterKeys.generate(3)
    cluster = uuid.uuid4().hex[:8]
    port = _free_port()
    env = _child_env(keys, cluster)
    procs: dict[int, subprocess.Popen] = {}
    logs = {r: tmp_path / f"scheduler-{r}.log" for r in range(3)}
    try:
        for rank in range(3):
            # ranks 0 and 1 are SGLang schedulers; rank 2, the one killed, a plain agent (it
            # spares the test one SGLang import)
            entry = "run_scheduler_double" if rank < 2 else "run_agent_double"
            extra = ", mark_dead=2" if rank == 0 else ""
            code = (f"from elasticep_sglang.testing import {entry}; "
                    f"{entry}({rank}, 3, {port}, {str(tmp_path)!r}, {PHY2LOG!r}, {S}{extra}, timeout_s=90)")
            with open(logs[rank], "wb") as log:
                procs[rank] = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log,
                                               stderr=subprocess.STDOUT)
        started = time.monotonic()
        try:
            _wait_files([tmp_path / f"ready-{r}" for r in range(3)], procs, timeout=120)
        except BaseException:
            print("\n".join(f"--- scheduler {r}\n{_tail(logs[r])}" for r in range(3)))
            raise
        print(f"spawn to three agents up: {time.monotonic() - started:.2f} s")
        assert all((tmp_path / f"ready-{r}").read_text() == "1" for r in range(3))  # bootstrap view served
        killed_at = time.monotonic()
        killed_wall = time.time()
        procs[2].send_signal(signal.SIGKILL)
        procs[2].wait(10)
        (tmp_path / "killed").write_text("2")  # rank 0's kernel double now marks rank 2
        try:
            _wait_files([tmp_path / f"result-{r}.json" for r in (0, 1)], {r: procs[r] for r in (0, 1)}, timeout=90)
        except BaseException:
            print("\n".join(f"--- scheduler {r}\n{_tail(logs[r])}" for r in (0, 1)))
            raise
        print(f"kill to both results: {time.monotonic() - killed_at:.2f} s")
        results = {r: json.loads((tmp_path / f"result-{r}.json").read_text()) for r in (0, 1)}
    finally:
        (tmp_path / "finish").write_text("")
        ending = time.monotonic()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    print(f"schedulers exited in {time.monotonic() - ending:.2f} s")
    for r in (0, 1):
        assert procs[r].returncode == 0, _tail(logs[r])
    for r in range(3):
        print("".join(line for line in logs[r].read_text(errors="replace").splitlines(True) if line.startswith("rank ")))

    for r, res in results.items():
        print(f"rank {r}: SIGKILL to epoch 2 committed into SGLang {res['committed_at'] - killed_wall:.3f} s, "
              f"phases {res['status']['phases_ms']}, experts {res['moves']}")
        assert res["plugin_installed"], r
        assert res["applied"] == [2], (r, res["applied"])  # the new epoch, committed exactly once
        assert res["refused"] == []
        assert (res["epoch"], res["members"]) == (2, [0, 1])
        assert res["status"]["status"] == "committed" and res["status"]["epoch"] == 2
        # SGLang's ElasticEPState: rank 2 out, snapshot taken, so SGLang does not rebalance again
        assert res["active_ranks"] == res["last_active_ranks"] == res["active_ranks_cpu"] == [1, 1, 0]
        assert not res["sglang_would_rebalance"]
        assert res["rerun"], "the step that committed the view must be run again"
        assert res["wrong_slots"] == [], (r, res["wrong_slots"])  # every slot holds its expert's weights
    # SGLang's ExpertLocationMetadata, the same on both survivors, covers every expert on live ranks
    assert results[0]["phy2log"] == results[1]["phy2log"]
    assert results[0]["log2phy"] == results[1]["log2phy"]
    for layer, rows in enumerate(results[0]["log2phy"]):
        for expert, slots in enumerate(rows):
            live = [s for s in slots if s >= 0]
            assert live and all(s // S != 2 for s in live), (layer, expert, slots)
    # expert 5 of layer 0 lived only on rank 2: reloaded from the checkpoint, and nothing else was
    loads = [load for r in (0, 1) for load in results[r]["disk_loads"]]
    assert loads and all(set(load) <= {"0"} and set(load["0"]) <= {5} for load in loads), loads
    new0 = results[0]["phy2log"][0]
    assert 5 in new0[: 2 * S]
    # some expert crossed between the survivors through SGLang's updater (layer 1's rebalance)
    assert sum(results[r]["moves"].get("peer", 0) for r in (0, 1)) >= 1, [results[r]["moves"] for r in (0, 1)]


def test_the_update_maps_never_name_a_dead_rank_as_a_source() -> None:
    from elasticep_sglang.agent_hooks import NO_EXPERT, plan_expert_update

    old = torch.tensor(PHY2LOG)
    new = old.clone()
    new[0, 1] = 5  # rank 0 takes expert 5 of layer 0 (only dead rank 2 held it)
    new[1, 6] = 0  # rank 1 takes expert 0 of layer 1 (held by rank 0 and dead rank 2)
    new[1, 3] = 0  # rank 0 takes a second copy of expert 0 from its own slot 0
    alive = torch.tensor([True, True, False])
    plan = plan_expert_update(old, new, alive, S, rank=1)
    assert (plan.old[:, 2 * S:] == NO_EXPERT).all() and (plan.new[:, 2 * S:] == NO_EXPERT).all()
    assert plan.missing == {}  # rank 1 loads nothing from disk
    assert plan.moves == {"local": 0, "peer": 1, "missing": 0}
    # the only holder of expert 0 of layer 1 left in the maps is rank 0: the updater can pick no other
    assert {s // S for s in range(plan.old.shape[1]) if int(plan.old[1, s]) == 0} == {0}
    mine = plan_expert_update(old, new, alive, S, rank=0)
    assert mine.missing == {0: [5]} and int(mine.new[0, 1]) == 1  # out of the exchange: kept, then reloaded
    assert mine.moves == {"local": 1, "peer": 0, "missing": 1}
    assert torch.equal(mine.old, plan.old) and torch.equal(mine.new, plan.new)  # the same maps on every rank


def test_a_commit_of_an_applied_epoch_is_refused_and_counted() -> None:
    from elasticep.eplb import Placement
    from elasticep.membership import View
    from elasticep_sglang.agent_hooks import NoWeightPath, PlacementMismatch, SGLangEngineHooks
    from elasticep_sglang.convert import to_expert_location_metadata
    from elasticep_sglang.testing import sglang_cpu_runtime

    placement = Placement(torch.tensor(PHY2LOG), S)
    with sglang_cpu_runtime(ep_size=3) as rt:
        from sglang.srt.runtime_context import get_resources

        get_resources().expert_location_metadata = to_expert_location_metadata(placement, moe_ep_rank=0, narrow=False)
        hooks = SGLangEngineHooks(0)
        assert hooks.placement() == placement
        view = View(epoch=2, members=(0, 1), leader=0, reason="test")
        change = type("C", (), {})()
        change.epoch, change.view, change.alive = 2, view, (True, True, False)
        moved = torch.tensor(PHY2LOG)
        moved[0, 5] = 5  # rank 1 takes over expert 5 of layer 0 (slot 5 held expert 0, also on rank 0)
        change.placement = Placement(moved, S).masked(torch.tensor([True, True, False]))
        hooks.commit(change)
        assert hooks.applied == [2]
        assert rt.state.active_ranks.tolist() == [1, 1, 0] and rt.state.is_active_equal_last()
        before = metrics.SGLANG_COMMITS.labels(outcome="duplicate")._value.get()
        rt.state.active_ranks[1] = 0  # anything a second application would overwrite
        hooks.commit(change)
        assert hooks.applied == [2] and hooks.refused == [2]
        assert rt.state.active_ranks.tolist() == [1, 0, 0]
        assert metrics.SGLANG_COMMITS.labels(outcome="duplicate")._value.get() == before + 1
        change.epoch = 3
        change.placement = Placement(torch.zeros(2, 16, dtype=torch.int64), 4, 6)  # 4 ranks: not SGLang's
        with pytest.raises(PlacementMismatch):
            hooks.commit(change)
        swapped = moved.clone()
        swapped[0, [0, 1]] = swapped[0, [1, 0]]  # rank 0's slots would serve other experts
        change.placement = Placement(swapped, S).masked(torch.tensor([True, True, False]))
        with pytest.raises(NoWeightPath):  # no EPLB manager: nothing could move the weights
            hooks.commit(change)
        assert hooks.applied == [2] and rt.state.active_ranks.tolist() == [1, 0, 0]  # nothing applied


def _wrapper(*args: str, timeout: float = 150, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "adapters"), env.get("PYTHONPATH", "")])
    for name in ("ELASTICEP_SGLANG_HOOKS", "ELASTICEP_SGLANG_AGENT", "ELASTICEP_SGLANG_STORE", "ELASTICEP_BUS_KEYS"):
        env.pop(name, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "elasticep_sglang.launch_server", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
def test_the_launch_wrapper_sets_up_the_agent_for_every_scheduler_with_one_command() -> None:
    result = _wrapper("--elasticep-dry-run", "--model-path", "deepseek-ai/DeepSeek-V3", "--tp-size", "8",
                      "--ep-size", "8", "--moe-a2a-backend", "mooncake", "--elastic-ep-backend", "mooncake",
                      "--enable-eplb", "--ep-num-redundant-experts", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    agent = report["agent"]
    assert agent["enabled"] and agent["store_hosted_here"] and agent["keys_generated"] and agent["ranks"] == 8
    # a spawned scheduler inherits the store the wrapper hosts and installs the agent's step boundary
    child = report["spawned_child"]
    assert child["agent_step"] and child["store"] == agent["store"]
    assert report["wrapper"]["agent_step"]  # installed there too, but never started: no step boundary


def test_the_launch_wrapper_refuses_several_nodes_without_shared_keys() -> None:
    result = _wrapper("--elasticep-dry-run", "--model-path", "dummy", "--nnodes", "2", "--tp-size", "16",
                      "--elastic-ep-backend", "mooncake", timeout=60)
    assert result.returncode == 2
    assert "ELASTICEP_BUS_KEYS" in result.stderr and "Traceback" not in result.stderr
    bad = _wrapper("--elasticep-dry-run", "--model-path", "dummy", "--elasticep-store", "no-port", timeout=60)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr and "Traceback" not in bad.stderr


def test_scheduler_agent_settings_are_refused_with_a_typed_counted_error() -> None:
    from elasticep_sglang.scheduler_agent import AgentSettingsError, SchedulerAgent

    before = metrics.AGENT_ERRORS.labels("sglang_settings")._value.get()
    with pytest.raises(AgentSettingsError, match="ELASTICEP_SGLANG_STORE"):
        SchedulerAgent({}).store_address()  # no store given and no torch.distributed
    with pytest.raises(AgentSettingsError, match="HOST:PORT"):
        SchedulerAgent({"ELASTICEP_SGLANG_STORE": "localhost"}).store_address()
    with pytest.raises(AgentSettingsError, match="number"):
        SchedulerAgent({"ELASTICEP_SGLANG_HOOK_TIMEOUT_S": "soon"})._float("ELASTICEP_SGLANG_HOOK_TIMEOUT_S", 1.0)
    with pytest.raises(AgentSettingsError, match="local or cluster"):
        SchedulerAgent({"ELASTICEP_SGLANG_PROFILE": "lan"})._config(1)
    assert metrics.AGENT_ERRORS.labels("sglang_settings")._value.get() == before + 4
    assert SchedulerAgent({"ELASTICEP_SGLANG_STORE": "tcp://10.0.0.1:29500"}).store_address() == "tcp://10.0.0.1:29500"


def test_kernel_timeouts_are_the_mooncake_marks_on_members_only() -> None:
    from elasticep.eplb import Placement
    from elasticep.events import PeerTimeout
    from elasticep.membership import View
    from elasticep_sglang.agent_hooks import SGLangEngineHooks
    from elasticep_sglang.convert import to_expert_location_metadata
    from elasticep_sglang.detect import MOONCAKE_EP_TIMEOUT_US
    from elasticep_sglang.testing import sglang_cpu_runtime

    with sglang_cpu_runtime(ep_size=3) as rt:
        from sglang.srt.runtime_context import get_resources

        get_resources().expert_location_metadata = to_expert_location_metadata(
            Placement(torch.tensor(PHY2LOG), S), moe_ep_rank=0, narrow=False)
        hooks = SGLangEngineHooks(0)
        assert hooks.kernel_timeouts() == []
        rt.state.active_ranks[1] = 0  # Mooncake EP gave up waiting on rank 1
        events = hooks.kernel_timeouts()
        assert events == [PeerTimeout(observer=0, peer=1, op="dispatch", layer=-1, waited_us=MOONCAKE_EP_TIMEOUT_US)]
        assert hooks.kernel_timeouts() == []  # reported once
        rt.state.active_ranks[1] = 1
        hooks.on_view(View(epoch=2, members=(0, 1), leader=0))  # rank 2 is out: cleared in the mask at once
        assert rt.state.active_ranks.tolist() == [1, 1, 0]
        assert hooks.kernel_timeouts() == []  # a rank the view removed is no kernel timeout
        assert hooks.placement() == Placement(torch.tensor(PHY2LOG), S)  # still the epoch served
