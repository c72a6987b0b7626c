"""RankModel with LocalEP against transformers' own DeepSeek-V3 (the oracle), single process."""

from __future__ import annotations

import hashlib

import pytest
import torch

from elasticep.engine import (
    DeadSlotRouted,
    ExpertCheckpoint,
    LocalEP,
    PlacementMismatch,
    RankModel,
    SlotNotLoaded,
    make_tiny_model,
    round_robin_placement,
)
from elasticep.eplb.placement import Placement, RedundancyExhausted

PROMPTS = [[3, 4, 5, 6], [10, 20, 30], [7], [100, 101, 102, 103, 104, 105], [255, 0, 17]]
NEW = 8


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: on a shared 2-core host, OpenMP spin-waits make more threads slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sha(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def _shuffled_placement(num_ranks: int, slots_per_rank: int, seed: int) -> Placement:
    """Every expert once, then redundant replicas, each layer in its own seeded random order."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(2):
        total = num_ranks * slots_per_rank
        base = torch.cat([torch.arange(16), torch.randint(0, 16, (total - 16,), generator=gen)])
        rows.append(base[torch.randperm(total, generator=gen)])
    return Placement(torch.stack(rows), slots_per_rank, 16)


def _assert_matches_oracle(model: RankModel, oracle, prompts=PROMPTS) -> None:
    for prompt in prompts:
        assert model.generate(prompt, NEW) == oracle.generate(prompt, NEW), f"prompt {prompt}"


def test_tiny_model_is_deterministic_and_in_transformers_layout(tiny_model, tmp_path) -> None:
    again = make_tiny_model(tmp_path / "again", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    assert _sha(again) == _sha(tiny_model)
    assert _sha(other) != _sha(tiny_model)
    ckpt = ExpertCheckpoint(tiny_model)
    keys = set(ckpt.keys())
    # routed experts one tensor per expert and projection, as DeepSeek's checkpoints store them
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in keys
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # the dense first layer
    assert not any(".mlp.experts." in k for k in ckpt.replicated_state())
    e = ckpt.expert(1, 5)
    cfg = ckpt.config
    assert e["w13"].shape == (2 * cfg.moe_intermediate_size, cfg.hidden_size)
    assert e["w2"].shape == (cfg.hidden_size, cfg.moe_intermediate_size)
    assert torch.equal(e["w13"][: cfg.moe_intermediate_size], ckpt.tensor("model.layers.2.mlp.experts.5.gate_proj.weight"))


def test_round_robin_placement_matches_oracle(tiny_model, oracle) -> None:
    model = RankModel(tiny_model, round_robin_placement(2, 16, 4, 5), LocalEP())
    _assert_matches_oracle(model, oracle)


def test_logits_equal_oracle_closely(tiny_model, oracle) -> None:
    model = RankModel(tiny_model, _shuffled_placement(4, 6, seed=3), LocalEP())
    ids = PROMPTS[3] + oracle.generate(PROMPTS[3], NEW)
    ours = model.forward(torch.tensor([ids]))[0]
    ref = oracle.logits(ids)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("seed", [0, 1])
def test_redundant_shuffled_placement_matches_oracle(tiny_model, oracle, seed: int) -> None:
    placement = _shuffled_placement(4, 6, seed)
    assert int(placement.logcnt.max()) >= 2  # really redundant
    model = RankModel(tiny_model, placement, LocalEP(), rank=seed)
    _assert_matches_oracle(model, oracle)


def test_dead_rank_remapped_to_surviving_replicas(tiny_model, oracle) -> None:
    # 4 ranks x 8 slots: every expert twice, its two replicas on different ranks
    placement = round_robin_placement(2, 16, 4, 8)
    model = RankModel(tiny_model, placement, LocalEP())
    _assert_matches_oracle(model, oracle, PROMPTS[:2])
    alive = torch.tensor([True, False, True, True])
    model.set_placement(placement.masked(alive), alive)
    # the dead rank's slots hold nothing any more: only the survivors' replicas can answer
    for slot in placement.slots_of_rank(1):
        assert model.slot_expert(0, slot) == -1
        assert float(model.slot_tensors(0, slot)["w13"].abs().sum()) == 0.0
    _assert_matches_oracle(model, oracle)


def test_lost_experts_restored_then_committed_at_once(tiny_model, oracle) -> None:
    # 3 ranks x 8 slots; rank 2 repeats experts 8..13 and 0, 1; rank 1 alone holds 14 and 15
    row = list(range(16)) + [8, 9, 10, 11, 12, 13, 0, 1]
    placement = Placement([row, row], 8, 16)
    model = RankModel(tiny_model, placement, LocalEP())
    alive = torch.tensor([True, False, True])
    with pytest.raises(RedundancyExhausted):
        model.set_placement(placement.masked(alive), alive)
    # nothing was applied: still serving the old view correctly
    assert model.placement == placement
    _assert_matches_oracle(model, oracle, PROMPTS[:1])

    # repair: rank 2's slots 22, 23 (experts 0, 1, which rank 0 also has) take the lost 14, 15
    phy2log = placement.masked(alive).phy2log.clone()
    phy2log[:, 22] = 14
    phy2log[:, 23] = 15
    repaired = Placement(phy2log, 8, 16)
    with pytest.raises(SlotNotLoaded) as err:
        model.set_placement(repaired, alive)
    assert (0, 22, 14) in err.value.missing
    host_copy = ExpertCheckpoint(tiny_model)
    for layer in range(2):
        model.load_slot(layer, 22, 14)  # from disk
        model.load_slot(layer, 23, 15, host_copy.expert(layer, 15))  # from a host copy
    # staged, not yet visible
    assert model.slot_expert(0, 22) == 0
    model.set_placement(repaired, alive)
    assert model.slot_expert(1, 22) == 14 and model.slot_expert(1, 23) == 15
    _assert_matches_oracle(model, oracle)


def test_rebalance_move_copies_a_live_replica(tiny_model, oracle) -> None:
    placement = round_robin_placement(2, 16, 4, 5)  # slots 16..19 repeat experts 0..3
    model = RankModel(tiny_model, placement, LocalEP())
    phy2log = placement.phy2log.clone()
    phy2log[:, 19] = 9  # slot 19 now replicates expert 9 instead of 3
    moved = Placement(phy2log, 5, 16)
    for layer in range(2):
        model.load_slot(layer, 19, 9, model.slot_tensors(layer, 9))
    model.set_placement(moved)
    assert torch.equal(model.slot_tensors(0, 19)["w2"], model.slot_tensors(0, 9)["w2"])
    _assert_matches_oracle(model, oracle, PROMPTS[:3])


def test_local_ep_refuses_tokens_for_dead_or_empty_slots(tiny_model) -> None:
    placement = round_robin_placement(2, 16, 4, 5)
    ep = LocalEP()
    ep.set_view(placement, torch.tensor([True, True, False, True]))
    x = torch.randn(2, 64)
    with pytest.raises(DeadSlotRouted) as err:
        ep.dispatch(x, torch.tensor([[0, 10], [1, 2]]), layer=0)  # slot 10 is on rank 2
    assert 10 in err.value.slots
    with pytest.raises(DeadSlotRouted):
        ep.dispatch(x, torch.tensor([[0, -1], [1, 2]]), layer=0)


class _FailingOnceEP(LocalEP):
    """LocalEP whose n-th dispatch raises, as a kernel call that lost a peer mid-step would."""

    def __init__(self, fail_at: int):
        super().__init__()
        self.calls = 0
        self.fail_at = fail_at

    def dispatch(self, x, slots, *, layer):
        self.calls += 1
        if self.calls == self.fail_at:
            raise DeadSlotRouted(layer, [0], "injected")
        return super().dispatch(x, slots, layer=layer)


def test_failed_step_is_replayed_without_corrupting_the_cache(tiny_model, oracle) -> None:
    # dispatch 6 is the second MoE layer of the third step: the first layer already wrote the cache
    ep = _FailingOnceEP(fail_at=6)
    model = RankModel(tiny_model, round_robin_placement(2, 16, 4, 5), ep)
    seq = model.new_sequence(PROMPTS[0], NEW)
    failures = 0
    while not seq.done:
        try:
            model.step(seq)
        except DeadSlotRouted:
            failures += 1
    assert failures == 1
    assert seq.generated == oracle.generate(PROMPTS[0], NEW)


def test_bad_inputs_are_refused(tiny_model) -> None:
    placement = round_robin_placement(2, 16, 4, 5)
    model = RankModel(tiny_model, placement, LocalEP())
    with pytest.raises(ValueError):
        model.new_sequence([], 4)
    with pytest.raises(ValueError):
        model.new_sequence([256], 4)
    with pytest.raises(ValueError):
        model.new_sequence([1], 10_000)
    with pytest.raises(PlacementMismatch):
        RankModel(tiny_model, round_robin_placement(3, 16, 4, 5), LocalEP())
    with pytest.raises(PlacementMismatch):
        model.set_placement(placement, torch.ones(3, dtype=torch.bool))
    with pytest.raises(PlacementMismatch):
        model.load_slot(0, 1, 99)


def test_failed_prefill_is_replayed(tiny_model, oracle) -> None:
    ep = _FailingOnceEP(fail_at=2)  # the second MoE layer of the prefill
    model = RankModel(tiny_model, round_robin_placement(2, 16, 4, 5), ep)
    seq = model.new_sequence(PROMPTS[3], NEW)
    with pytest.raises(DeadSlotRouted):
        model.step(seq)
    assert seq.generated == []
    while not seq.done:
        model.step(seq)
    assert seq.generated == oracle.generate(PROMPTS[3], NEW)
