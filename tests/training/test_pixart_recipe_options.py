"""PixArt-Σ's own recipe options in the PixArt-Σ-family scripts: the CAME optimizer (`--optimizer came`), two
captions per image mixed per sample (`--caption_column text,vlm_text`, `--real_caption_ratio`) and float32 attention
under mixed precision (`--fp32_attention`)."""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil

import datasets
import numpy as np
import pytest
import torch
from came_pytorch import CAME
from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel
from helpers import (
    TINY_PIXART_CONFIG,
    final_weights,
    load_example,
    randomize_,
    run_script,
    tiny_pixart_components,
    train_on_fixed_batch,
)
from PIL import Image

import diffusers_microdit  # noqa: F401
from diffusers_microdit import LiTTransformer2DModel
from diffusers_microdit.models.transformer_lit import LiTLinearAttnProcessor
from diffusers_microdit.models.transformer_pixart_kv import PixArtKVAttnProcessor2_0
from diffusers_microdit.training.args import caption_column_problems
from diffusers_microdit.training.data import caption_mixing_ratio, load_precomputed
from diffusers_microdit.training.losses import draw_pixart_training_inputs, pixart_objective
from diffusers_microdit.training.optimizers import CAME_BETAS, CAME_EPSILONS, build_optimizer
from diffusers_microdit.training.pixart import null_caption, training_noise_scheduler, use_fp32_attention
from diffusers_microdit.training.precompute import encode_captions
from diffusers_microdit.training.randomness import BatchRandomness

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread
REAL_CAPTIONS = ("a red cat", "a blue dog", "the red dog", "a cat")
VLM_CAPTIONS = ("a photo of a red cat on the moon", "a photo of a blue dog", "the red dog on the moon", "an cat")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A plain diffusers PixArt-Σ pipeline ("256 px"), 8 images with a real and a VLM caption each, and their cache
    precomputed with both captions."""
    root = tmp_path_factory.mktemp("pixart_recipe")
    components = tiny_pixart_components()
    config = {**TINY_PIXART_CONFIG, "sample_size": 32, "interpolation_scale": 0.5}
    components["transformer"] = randomize_(PixArtTransformer2DModel(**config), seed=5)
    PixArtSigmaPipeline(**components).save_pretrained(root / "base")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(8)]
    real, vlm = ([captions[i % 4] for i in range(8)] for captions in (REAL_CAPTIONS, VLM_CAPTIONS))
    datasets.Dataset.from_dict({"image": images, "text": real, "vlm_text": vlm}).save_to_disk(root / "images")
    run_script(
        "precompute_embeddings.py", "--pretrained_model_name_or_path", root / "base", "--dataset_name",
        root / "images", "--caption_column", "text,vlm_text", "--resolutions", 256, "--output_dir", root / "cache",
        "--shard_size", 4, "--batch_size", 4,
    )
    return {"root": root, "base": root / "base", "images": root / "images", "cache": root / "cache"}


def train_args(workspace, output_dir, *extra) -> list[str]:
    return list(map(str, [
        "--init_from", workspace["base"], "--precomputed_dataset", workspace["cache"], "--output_dir", output_dir,
        "--train_batch_size", 2, "--report_to", "none", "--seed", 3, "--lr_warmup_steps", 0, *extra,
    ]))


def fixed_batch_and_objective(workspace, tmp_path, *extra, real_caption_ratio=None):
    """The script's pipeline (KV compression in blocks 1, 2), 4 cached rows and PixArt-Σ's objective."""
    script = load_example("train_pixart_kv")
    args = script.parse_args(train_args(workspace, tmp_path, "--kv_compress_layers", 1, 2, *extra))
    pipeline = script.load_pipeline(args)
    rows = load_precomputed([str(workspace["cache"])], 256)
    batch = torch.utils.data.default_collate([rows[i] for i in range(4)])
    null = null_caption(pipeline, batch["prompt_embeds"].shape[1])
    compute_loss = pixart_objective(training_noise_scheduler(pipeline), *null, 0.25, real_caption_ratio)
    return args, pipeline.transformer.train(), batch, compute_loss


def under_autocast(compute_loss, dtype: torch.dtype):
    """`compute_loss` under CPU autocast to `dtype`, as Accelerate's `--mixed_precision` runs it."""

    def wrapped(model, batch, draws):
        with torch.autocast("cpu", dtype):
            return compute_loss(model, batch, draws)

    return wrapped


# ---------------------------------------------------------------------------------------------- CAME


def test_came_has_pixart_sigma_settings_and_lowers_the_loss(workspace, tmp_path):
    args, transformer, batch, compute_loss = fixed_batch_and_objective(
        workspace, tmp_path, "--optimizer", "came", "--learning_rate", 1e-3
    )
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = build_optimizer(args, trainable, args.learning_rate, torch.device("cpu"))
    assert type(optimizer) is CAME
    group = optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == (CAME_BETAS, CAME_EPSILONS, 0.0)
    assert CAME_BETAS == (0.9, 0.999, 0.9999) and CAME_EPSILONS == (1e-30, 1e-16)  # PixArt-Σ's configs
    losses = train_on_fixed_batch(transformer, compute_loss, batch, 20, optimizer)
    print(f"CAME loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]
    factored = optimizer.state[transformer.transformer_blocks[0].attn1.to_q.weight]
    assert factored["exp_avg_sq_row"].ndim == 1  # CAME's factored moments, not AdamW's full ones


def test_came_without_its_package_is_refused_before_anything_is_built(workspace, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec

    def without_came(name, *rest):
        return None if name == "came_pytorch" else find_spec(name, *rest)

    monkeypatch.setattr(importlib.util, "find_spec", without_came)
    parse_args = load_example("train_pixart_kv").parse_args
    with pytest.raises(SystemExit, match=re.escape("--optimizer came needs the came-pytorch package")):
        parse_args(train_args(workspace, tmp_path, "--optimizer", "came"))


# ---------------------------------------------------------------------------------------------- caption mixing


def test_two_caption_cache_holds_both_encodings(workspace):
    rows = load_precomputed([str(workspace["cache"])], 256)
    assert {"alt_prompt_embeds", "alt_prompt_attention_mask"} <= set(rows.column_names)
    pipeline = PixArtSigmaPipeline.from_pretrained(workspace["base"])
    expected = encode_captions(pipeline, [REAL_CAPTIONS[1], VLM_CAPTIONS[1]])
    torch.testing.assert_close(rows[1]["prompt_embeds"].float(), expected["prompt_embeds"][0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(rows[1]["alt_prompt_embeds"].float(), expected["prompt_embeds"][1], atol=2e-3, rtol=2e-3)
    assert torch.equal(rows[1]["alt_prompt_attention_mask"].long(), expected["prompt_attention_mask"][1].long())
    assert json.loads((workspace["cache"] / "encoder.json").read_text())["captions_per_image"] == 2


NULL_CAPTION = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)


def two_caption_batch(size: int) -> dict:
    """A batch whose real captions' embeddings are all +1 and whose other captions' are all -1."""
    mask = torch.ones(size, 3, dtype=torch.long)
    return {
        "latents": torch.zeros(size, 4, 2, 2), "prompt_embeds": torch.ones(size, 3, 2), "prompt_attention_mask": mask,
        "alt_prompt_embeds": -torch.ones(size, 3, 2), "alt_prompt_attention_mask": mask,
    }


def real_shares(ratio: float, micro_steps: int, batch_size: int = 8, num_processes: int = 1) -> torch.Tensor:
    """Per micro-step, which samples trained on the real caption rather than the other, over all processes."""
    local = batch_size // num_processes
    batch = two_caption_batch(local)
    chosen = []
    for step in range(micro_steps):
        parts = [
            draw_pixart_training_inputs(
                batch, BatchRandomness(7, step, rank, num_processes, local, "cpu"), 1000, *NULL_CAPTION, 0.0, ratio
            ).prompt_embeds[:, 0, 0] > 0
            for rank in range(num_processes)
        ]
        chosen.append(torch.cat(parts))
    return torch.stack(chosen)


@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_real_caption_share_matches_the_ratio(ratio):
    chosen = real_shares(ratio, micro_steps=250)  # 2000 samples: one standard error is under 1.2 points
    share = chosen.float().mean().item()
    print(f"real-caption share {share:.3f} for ratio {ratio}")
    assert abs(share - ratio) < 0.05
    assert chosen.any(dim=0).all() and (~chosen).any(dim=0).all()  # every row position sees both captions
    assert torch.equal(real_shares(ratio, micro_steps=250), chosen)  # a function of (seed, micro-step): resume-exact
    assert torch.equal(real_shares(ratio, micro_steps=250, num_processes=2), chosen)  # and of the global row
    assert real_shares(1.0, 20).all() and not real_shares(0.0, 20).any()


def test_mixing_leaves_the_other_draws_as_they_were():
    batch = two_caption_batch(2)
    plain, mixed = (
        draw_pixart_training_inputs(batch, BatchRandomness(1, 5, 0, 1, 2, "cpu"), 1000, *NULL_CAPTION, 0.1, ratio)
        for ratio in (None, 0.5)
    )
    assert torch.equal(plain.timesteps, mixed.timesteps) and torch.equal(plain.noise, mixed.noise)


def test_caption_mixing_lowers_the_loss_on_a_fixed_batch(workspace, tmp_path):
    _, transformer, batch, compute_loss = fixed_batch_and_objective(workspace, tmp_path, real_caption_ratio=0.5)
    losses = train_on_fixed_batch(transformer, compute_loss, batch, 20)
    print(f"mixed captions loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]


def test_caption_mixing_ratio_needs_two_captions(workspace):
    two = load_precomputed([str(workspace["cache"])], 256)
    one = two.remove_columns(["alt_prompt_embeds", "alt_prompt_attention_mask"])
    assert caption_mixing_ratio(two, None) == 0.5 and caption_mixing_ratio(two, 0.3) == 0.3
    assert caption_mixing_ratio(one, None) is None
    with pytest.raises(SystemExit, match="the training data has one"):
        caption_mixing_ratio(one, 0.3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--caption_column", "a,b,c"), "--caption_column takes one column, or two different ones"),
        (("--caption_column", "text,text"), "--caption_column takes one column, or two different ones"),
        (("--real_caption_ratio", "1.5"), "--real_caption_ratio must be in [0, 1]"),
        (("--came_betas", "0.9", "0.999", "1"), "--came_betas must each be in [0, 1)"),
    ],
)
def test_bad_recipe_arguments_are_refused_with_a_reason(workspace, tmp_path, extra, message):
    parse_args = load_example("train_pixart_kv").parse_args
    with pytest.raises(SystemExit, match=re.escape(message)):
        parse_args([*train_args(workspace, tmp_path), "--optimizer", "came", *extra])


def test_raw_data_of_one_caption_column_or_a_script_without_mixing_refuse_mixing(workspace):
    raw = dict(dataset_name=str(workspace["images"]), train_data_dir=None)
    one = argparse.Namespace(caption_column="text", real_caption_ratio=0.4, **raw)
    assert "give --caption_column REAL,OTHER" in caption_column_problems(one)[0]
    no_mixing = argparse.Namespace(caption_column="text,vlm_text", **raw)  # e.g. train_microdit.py
    assert "This script trains on one caption per image" in caption_column_problems(no_mixing)[0]


# ---------------------------------------------------------------------------------------------- fp32 attention


class AttentionKernelSpy:
    """Records, per call of torch's SDPA kernel, the dtype of the queries and whether autocast was on."""

    def __init__(self, monkeypatch):
        self.calls = []
        kernel = torch.nn.functional.scaled_dot_product_attention

        def spy(query, key, value, *args, **kwargs):
            self.calls.append((query.dtype, key.dtype, value.dtype, torch.is_autocast_enabled("cpu")))
            return kernel(query, key, value, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_attention_computes_attention_in_float32_under_autocast(workspace, tmp_path, monkeypatch, dtype):
    _, transformer, batch, compute_loss = fixed_batch_and_objective(workspace, tmp_path, "--fp32_attention")
    mixed_loss = under_autocast(compute_loss, dtype)
    spy = AttentionKernelSpy(monkeypatch)
    mixed_loss(transformer, batch, BatchRandomness(0, 0, 0, 1, 4, "cpu"))
    assert spy.calls and {call[:3] for call in spy.calls} == {(dtype,) * 3}  # without it: low-precision kernels

    switched = use_fp32_attention(transformer)
    processors = transformer.attn_processors
    assert switched == len(processors) == 2 * TINY_PIXART_CONFIG["num_layers"]  # self- and cross-attention
    assert all(isinstance(p, PixArtKVAttnProcessor2_0) and p.fp32_attention for p in processors.values())
    assert transformer.kv_compressed_layers == [1, 2]
    spy.calls.clear()
    losses = train_on_fixed_batch(transformer, mixed_loss, batch, 20)
    assert spy.calls and set(spy.calls) == {(torch.float32, torch.float32, torch.float32, False)}
    print(f"fp32 attention under {dtype} autocast: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]


def test_fp32_attention_keeps_lit_linear_self_attention():
    torch.manual_seed(0)
    student = LiTTransformer2DModel.from_pixart(tiny_pixart_components()["transformer"])
    switched = use_fp32_attention(student)
    processors = student.attn_processors
    assert switched == TINY_PIXART_CONFIG["num_layers"]
    for name, processor in processors.items():
        expected = LiTLinearAttnProcessor if ".attn1." in name else PixArtKVAttnProcessor2_0
        assert type(processor) is expected, name


# ---------------------------------------------------------------------------------------------- the script


def test_script_trains_with_the_recipe_and_resumes_exactly(workspace, tmp_path):
    """Raw data with two caption columns (encoded into the run's cache), CAME, bf16 with fp32 attention; a run
    resumed from its step-2 checkpoint ends on the weights of the uninterrupted one."""
    common = (
        "--dataset_name", workspace["images"], "--caption_column", "text,vlm_text", "--real_caption_ratio", 0.5,
        "--optimizer", "came", "--fp32_attention", "--mixed_precision", "bf16", "--max_train_steps", 4,
        "--checkpointing_steps", 2, "--learning_rate", 1e-3,
    )

    def run(output_dir, *extra, check=True):
        args = train_args(workspace, output_dir, *common, *extra)
        at = args.index("--precomputed_dataset")
        del args[at : at + 2]  # raw data instead of the cache
        return run_script("train_pixart_kv.py", *args, "--encoded_cache_dir", tmp_path / "cache", check=check)

    straight = tmp_path / "straight"
    result = run(straight)
    summary = "Optimizer came; the real caption with probability 0.5, else the second; float32 softmax attention"
    assert summary in result.stdout
    losses = json.loads((straight / "loss_history.json").read_text())["losses"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    run(resumed, "--resume_from_checkpoint", "latest")
    expected, got = final_weights(straight), final_weights(resumed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)

    # The same checkpoint resumed with AdamW is refused: CAME's moments never load into it.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(straight / "checkpoint-2", other / "checkpoint-2")
    refused = run(other, "--optimizer", "adamw", "--resume_from_checkpoint", "latest", check=False)
    assert refused.returncode != 0 and "optimizer came -> adamw" in refused.stderr


def test_lit_distillation_mixes_captions_and_upcasts_attention(workspace, tmp_path):
    """train_lit_kd.py's loss with --real_caption_ratio 0 is its loss on the second captions; --fp32_attention
    switches the teacher's softmax attentions and the student's cross-attentions."""
    script = load_example("train_lit_kd")
    args = script.parse_args(train_args(workspace, tmp_path, "--real_caption_ratio", 0, "--fp32_attention"))
    pipeline = script.load_teacher(args)
    teacher = pipeline.transformer
    student = script.build_student(args, teacher, pipeline.vae_scale_factor)
    rows = load_precomputed([str(workspace["cache"])], 256)
    batch = torch.utils.data.default_collate([rows[i] for i in range(2)])
    null = null_caption(pipeline, batch["prompt_embeds"].shape[1])
    scheduler = training_noise_scheduler(pipeline)
    with torch.no_grad():
        mixed = script.make_compute_loss(teacher, scheduler, *null, args)(
            student, batch, BatchRandomness(0, 0, 0, 1, 2, "cpu")
        )
        args.real_caption_ratio = None
        second = {**batch, "prompt_embeds": batch["alt_prompt_embeds"],
                  "prompt_attention_mask": batch["alt_prompt_attention_mask"]}
        plain = script.make_compute_loss(teacher, scheduler, *null, args)(
            student, second, BatchRandomness(0, 0, 0, 1, 2, "cpu")
        )
    torch.testing.assert_close(mixed, plain, rtol=0, atol=0)
    layers = TINY_PIXART_CONFIG["num_layers"]
    assert (use_fp32_attention(teacher), use_fp32_attention(student)) == (2 * layers, layers)
