"""The shared training core's small pieces: masking owned by the MicroDiT objective, the one seeding helper, the cache
shard names, mixing several caches, and the cost meter before any step was counted."""

from __future__ import annotations

import types
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from diffusers import EDMEulerScheduler

from diffusers_microdit.training.cost import CostMeter, flop_counter
from diffusers_microdit.training.data import SHARD_GLOB, mix_sources, shard_index, shard_name
from diffusers_microdit.training.losses import microdit_objective
from diffusers_microdit.training.randomness import BatchRandomness, seeded_generator


class RecordingModel(torch.nn.Module):
    """Stands in for a MicroDiT transformer: records its masking arguments, returns zeros (and the mask)."""

    def __init__(self, patch_size: int):
        super().__init__()
        self.config = types.SimpleNamespace(patch_size=patch_size)
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(
        self, sample, timestep, encoder_hidden_states, keep_ids=None, masking="deferred", encoder_attention_mask=None
    ):
        self.calls.append(
            {"keep_ids": keep_ids, "masking": masking, "captions": encoder_hidden_states,
             "caption_mask": encoder_attention_mask}
        )  # fmt: skip
        mask = None
        if keep_ids is not None:
            tokens = (sample.shape[-2] // self.config.patch_size) * (sample.shape[-1] // self.config.patch_size)
            mask = torch.ones(sample.shape[0], tokens).scatter_(1, keep_ids, 0.0)
        return types.SimpleNamespace(sample=sample * self.weight, mask=mask)


BATCH = {"latents": torch.randn(2, 4, 8, 12), "prompt_embeds": torch.randn(2, 3, 5)}


@pytest.mark.parametrize(
    "masking, mask_ratio, kept",
    [("deferred", 0.75, 6), ("naive", 0.5, 12), ("none", 0.75, None), ("deferred", 0.0, None)],
)
def test_the_objective_derives_tokens_from_latents_and_patch_size_and_passes_the_mode(masking, mask_ratio, kept):
    model = RecordingModel(patch_size=2)  # 8 x 12 latents -> 4 x 6 = 24 tokens
    compute_loss = microdit_objective(EDMEulerScheduler(), mask_ratio, masking)
    loss = compute_loss(model, BATCH, BatchRandomness(0, 0, 0, 1, 2, "cpu"))
    assert torch.isfinite(loss)
    (call,) = model.calls
    if kept is None:
        assert call["keep_ids"] is None and call["masking"] == "deferred"  # the model's default: nothing is masked
    else:
        assert call["keep_ids"].shape == (2, kept) and call["masking"] == masking


def test_the_objective_passes_the_caption_mask_with_all_ones_for_dropped_captions():
    model = RecordingModel(patch_size=2)
    caption_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    compute_loss = microdit_objective(EDMEulerScheduler(), caption_dropout=0.5)
    compute_loss(model, BATCH, BatchRandomness(0, 0, 0, 1, 2, "cpu"))
    assert model.calls[-1]["caption_mask"] is None  # a cache without masks: every position, as the original
    for seed in range(4):  # draws that drop both, one or neither caption
        compute_loss(model, {**BATCH, "prompt_attention_mask": caption_mask}, BatchRandomness(seed, 0, 0, 1, 2, "cpu"))
        call = model.calls[-1]
        dropped = call["captions"].flatten(1).abs().sum(1) == 0
        assert call["caption_mask"].tolist() == torch.where(dropped[:, None], True, caption_mask.bool()).tolist()
    drops = [tuple((c["captions"].flatten(1).abs().sum(1) == 0).tolist()) for c in model.calls[1:]]
    assert len(set(drops)) > 1


def test_unknown_masking_is_refused():
    with pytest.raises(ValueError, match="masking must be one of"):
        microdit_objective(EDMEulerScheduler(), 0.5, "random")


def test_seeded_generator_is_the_draws_scheme_of_batch_randomness():
    """The micro-batch draws are those of (seed, micro-step) through SeedSequence, as before the helper existed."""
    state = np.random.SeedSequence([3, 7]).generate_state(2, dtype=np.uint32)
    expected = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    draws = BatchRandomness(3, 7, 0, 1, 4, "cpu")
    assert torch.equal(torch.randn(5, generator=draws.generator), torch.randn(5, generator=expected))
    same, other = (torch.rand(3, generator=seeded_generator(1, 2, last)) for last in (3, 4))
    assert torch.equal(torch.rand(3, generator=seeded_generator(1, 2, 3)), same) and not torch.equal(same, other)


def test_shard_names_round_trip(tmp_path):
    for index in (0, 7, 12345):
        name = shard_name(index)
        assert shard_index(name) == shard_index(name + ".json") == shard_index(name + ".tmp") == index
        (tmp_path / name).touch()
    assert shard_name(7) == "shard-00007.parquet"
    assert len(list(tmp_path.glob(SHARD_GLOB))) == 3


def test_cost_summary_before_any_counted_step():
    meter = CostMeter(total_params=2_000_000, active_params=1_000_000)
    assert "not counted" in meter.summary(10) and "active per token" in meter.summary(10)
    assert meter.mfu is None and meter.as_dict(10)["training GFLOP per image (fwd+bwd)"] == "not counted"
    meter.flops_per_image = 3e9
    assert "3.000 GFLOP" in meter.summary(10)


@pytest.mark.parametrize("activation", [torch.nn.functional.silu, torch.nn.functional.mish])
def test_counting_flops_leaves_the_step_bit_identical(activation):
    """The trainer counts FLOPs on a real training step, so counting must not change that step's gradients."""
    x, w = torch.randn(16, 32, requires_grad=True), torch.randn(32, 32, requires_grad=True)

    def gradient():
        w.grad = None
        activation(x @ w).square().sum().backward()
        return w.grad.clone()

    plain = gradient()
    with flop_counter() as counter:
        counted = gradient()
    assert torch.equal(plain, counted)
    assert counter.get_total_flops() == 3 * 2 * 16 * 32 * 32  # the forward matmul and its two backward ones


def source_rows(name: str, rows: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"source": [name] * rows})


def test_several_caches_are_their_union_by_default_and_drawn_by_probability_when_asked():
    union = mix_sources([source_rows("big", 100), source_rows("small", 10)], None, seed=0)
    assert Counter(union["source"]) == {"big": 100, "small": 10}  # each row once per epoch

    drawn = mix_sources([source_rows("a", 7000), source_rows("b", 1000)], [0.7, 0.3], seed=0)["source"][:10_000]
    shares = {name: count / len(drawn) for name, count in Counter(drawn).items()}
    assert len(drawn) == 10_000 and abs(shares["a"] - 0.7) <= 0.02 and abs(shares["b"] - 0.3) <= 0.02
