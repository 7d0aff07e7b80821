"""PixArt-Σ finetuning: the IDDPM objective against direct computations, aspect-ratio buckets, and
examples/train_pixart_kv.py end to end (KV compression, VAE swap, resolution change, resume, bad flags)."""

from __future__ import annotations

import json
import math
import re
import shutil

import datasets
import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from diffusers import DDPMScheduler, DiffusionPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
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
from diffusers_microdit import PixArtSigmaKVPipeline, PixArtSigmaKVTransformer2DModel
from diffusers_microdit.training.data import (
    AspectRatioBucketBatchSampler,
    collate_bucketed,
    latent_shape_buckets,
    load_precomputed,
    load_precomputed_buckets,
)
from diffusers_microdit.training.losses import learned_sigma_loss_terms, pixart_objective, variational_bound_bits
from diffusers_microdit.training.pixart import move_to_resolution, null_caption, training_noise_scheduler

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread
BASE_CONFIG = {**TINY_PIXART_CONFIG, "sample_size": 32, "interpolation_scale": 0.5}  # a "256-px" PixArt-Σ, 4 -> 8 channels
CAPTIONS = ("a red cat", "a blue dog", "a photo of a cat on the moon", "the red dog")


@pytest.fixture(scope="module")
def linear_ddpm() -> DDPMScheduler:
    """PixArt-Σ's training schedule: 1000 linear betas 1e-4 -> 0.02."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A plain diffusers PixArt-Σ pipeline (no KV compression), 8 images of two aspect ratios and one cache holding
    square latents at 128 and 256 px and 256-px aspect-ratio-bucketed latents."""
    root = tmp_path_factory.mktemp("pixart_train")
    components = tiny_pixart_components()
    components["transformer"] = randomize_(PixArtTransformer2DModel(**BASE_CONFIG), seed=5)
    PixArtSigmaPipeline(**components).save_pretrained(root / "base")

    rng = np.random.default_rng(0)
    sizes = [(64, 64)] * 4 + [(64, 128)] * 4  # (height, width): square, and 1:2 -> the 176x352 px bucket
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(len(images))]
    datasets.Dataset.from_dict({"image": images, "text": captions}).save_to_disk(root / "images")
    run_script(
        "precompute_embeddings.py", "--pretrained_model_name_or_path", root / "base", "--dataset_name",
        root / "images", "--resolutions", 128, 256, "--aspect_ratio_buckets", 256, "--output_dir", root / "cache",
        "--shard_size", 4, "--batch_size", 4,
    )
    return {"root": root, "base": root / "base", "cache": root / "cache"}


def train_args(workspace, output_dir, *extra) -> list:
    return [
        "--init_from", workspace["base"], "--precomputed_dataset", workspace["cache"], "--output_dir", output_dir,
        "--train_batch_size", 2, "--report_to", "none", "--seed", 3, "--lr_warmup_steps", 0, *extra,
    ]


# ---------------------------------------------------------------------------------------------- the objective


def bayes_posterior(x0: float, xt: float, beta: float, alphas_cumprod_prev: float) -> tuple[float, float]:
    """Mean and variance of q(x_{t-1} | x_t, x_0) as the product of the Gaussians q(x_t | x_{t-1}) and
    q(x_{t-1} | x_0), written independently of the closed-form coefficients used by the loss."""
    precision = (1 - beta) / beta + 1 / (1 - alphas_cumprod_prev)
    mean = (math.sqrt(1 - beta) * xt / beta + math.sqrt(alphas_cumprod_prev) * x0 / (1 - alphas_cumprod_prev))
    return mean / precision, 1 / precision


def schedule_in_float64(t: int) -> tuple[float, float, float]:
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas_cumprod = np.cumprod(1 - betas)
    return float(betas[t]), float(alphas_cumprod[t]), float(alphas_cumprod[t - 1]) if t > 0 else 1.0


@pytest.mark.parametrize("t, x0, eps, eps_pred, v", [(1, 0.3, -0.8, -0.5, 0.2), (500, -1.2, 0.4, 1.1, -0.7)])
def test_variational_bound_matches_closed_form_kl(linear_ddpm, t, x0, eps, eps_pred, v):
    beta, alphas_cumprod, alphas_cumprod_prev = schedule_in_float64(t)
    xt = math.sqrt(alphas_cumprod) * x0 + math.sqrt(1 - alphas_cumprod) * eps
    x0_pred = (xt - math.sqrt(1 - alphas_cumprod) * eps_pred) / math.sqrt(alphas_cumprod)
    true_mean, true_variance = bayes_posterior(x0, xt, beta, alphas_cumprod_prev)
    model_mean, _ = bayes_posterior(x0_pred, xt, beta, alphas_cumprod_prev)
    frac = (v + 1) / 2
    model_std = math.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(true_variance)))
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(torch.tensor(true_mean, dtype=torch.float64), math.sqrt(true_variance)),
        torch.distributions.Normal(torch.tensor(model_mean, dtype=torch.float64), model_std),
    ).item() / math.log(2)

    def full(value):  # every element of a (1, 4, 2, 2) latent holds the same value: the mean over dims is it
        return torch.full((1, 4, 2, 2), value)

    timesteps = torch.tensor([t])
    torch.testing.assert_close(linear_ddpm.add_noise(full(x0), full(eps), timesteps), full(xt), rtol=1e-5, atol=1e-6)
    got = variational_bound_bits(linear_ddpm, full(x0), full(xt), timesteps, full(eps_pred), full(v))
    print(f"t={t}: vb {got.item():.6e} bits, closed form {expected:.6e}")
    assert got.shape == (1,) and expected > 1e-3
    torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float32), rtol=2e-4, atol=0)


@pytest.mark.parametrize("x0", [0.1, 1.0, -1.0])  # inside, and the open-ended top and bottom bins
def test_variational_bound_at_t0_is_the_discretized_decoder_nll(linear_ddpm, x0):
    beta, alphas_cumprod, _ = schedule_in_float64(0)
    eps, eps_pred, v = 0.3, 0.25, 0.5
    xt = math.sqrt(alphas_cumprod) * x0 + math.sqrt(1 - alphas_cumprod) * eps
    x0_pred = (xt - math.sqrt(1 - alphas_cumprod) * eps_pred) / math.sqrt(alphas_cumprod)
    model_mean = x0_pred  # the posterior mean at t = 0 is the predicted x0
    beta_1, _, alphas_cumprod_0 = schedule_in_float64(1)
    _, variance_t1 = bayes_posterior(0.0, 0.0, beta_1, alphas_cumprod_0)  # t = 0 uses t = 1's posterior variance
    frac = (v + 1) / 2
    std = math.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(variance_t1)))
    normal = torch.distributions.Normal(torch.tensor(model_mean, dtype=torch.float64), std)
    upper, lower = normal.cdf(torch.tensor(x0 + 1 / 255)), normal.cdf(torch.tensor(x0 - 1 / 255))
    mass = upper if x0 < -0.999 else 1 - lower if x0 > 0.999 else upper - lower
    expected = -math.log(mass.item()) / math.log(2)

    shape = (1, 4, 2, 2)
    timesteps = torch.tensor([0])
    got = variational_bound_bits(
        linear_ddpm, torch.full(shape, x0), torch.full(shape, xt), timesteps, torch.full(shape, eps_pred),
        torch.full(shape, v),
    )
    print(f"x0={x0}: decoder NLL {got.item():.6f} bits, exact-CDF value {expected:.6f}")
    # IDDPM's tanh approximation of the normal CDF is kept, hence not bit-exact against the exact CDF.
    torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float32), rtol=2e-3, atol=0)


def test_loss_terms_vanish_at_the_true_posterior_and_stop_gradients(linear_ddpm):
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 4, 4, generator=generator), torch.randn(3, 4, 4, 4, generator=generator)
    timesteps = torch.tensor([0, 7, 999])
    noisy = linear_ddpm.add_noise(latents, noise, timesteps)
    # Exact epsilon and v = -1 (the posterior variance): zero MSE and zero KL for t > 0.
    terms = learned_sigma_loss_terms(linear_ddpm, latents, noisy, noise, timesteps, noise, -torch.ones_like(noise))
    assert torch.equal(terms.mse, torch.zeros(3))
    torch.testing.assert_close(terms.vb[1:], torch.zeros(2), atol=1e-5, rtol=0)

    # The variational bound trains the variance channels only, the MSE the epsilon channels only.
    eps_pred = (noise + 0.3 * torch.randn(noise.shape, generator=generator)).requires_grad_()
    v = torch.zeros_like(noise, requires_grad=True)
    terms = learned_sigma_loss_terms(linear_ddpm, latents, noisy, noise, timesteps, eps_pred, v)
    assert torch.autograd.grad(terms.vb.sum(), eps_pred, allow_unused=True)[0] is None
    assert torch.autograd.grad(terms.mse.sum(), v, allow_unused=True)[0] is None
    assert torch.autograd.grad(terms.vb.sum(), v)[0].abs().sum() > 0


def test_loss_decreases_on_a_fixed_batch(workspace, tmp_path):
    """The script's own loading and compute_loss, 30 AdamW steps on 4 cached rows with the same draws every step."""
    script = load_example("train_pixart_kv")
    args = script.parse_args(list(map(str, train_args(workspace, tmp_path, "--kv_compress_layers", 1, 2))))
    pipeline = script.load_pipeline(args)
    transformer = pipeline.transformer.train()
    assert transformer.kv_compressed_layers == [1, 2]
    rows = load_precomputed([str(workspace["cache"])], 256)
    batch = torch.utils.data.default_collate([rows[i] for i in range(4)])
    null = null_caption(pipeline, batch["prompt_embeds"].shape[1])
    compute_loss = pixart_objective(training_noise_scheduler(pipeline), *null, caption_dropout=0.25)
    losses = train_on_fixed_batch(transformer, compute_loss, batch, 30)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------------------------- buckets


def test_bucket_batch_sampler_is_a_function_of_seed_and_epoch():
    buckets = ["square"] * 7 + ["wide"] * 5 + ["tall"] * 1
    sampler = AspectRatioBucketBatchSampler(buckets, batch_size=2, seed=1)
    first = list(sampler)
    assert len(first) == len(sampler) == 3 + 2  # incomplete batches are dropped, the lone "tall" row too
    assert all(len(b) == 2 and len({buckets[i] for i in b}) == 1 for b in first)
    assert list(AspectRatioBucketBatchSampler(buckets, 2, seed=1)) == first  # a resumed run sees the same batches
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first

    # Under 2 processes Accelerate deals whole batches out in turn and reaches set_epoch through `.sampler`.
    shards = [BatchSamplerShard(sampler, num_processes=2, process_index=i) for i in range(2)]
    assert [list(s) for s in shards] == [first[0:4:2], first[1:4:2]]
    shards[0].batch_sampler.sampler.set_epoch(3)
    assert sampler.sampler.epoch == 3


def test_bucketed_cache_holds_each_image_at_its_bucket(workspace):
    info = json.loads((workspace["cache"] / "precompute.json").read_text())
    assert info["resolutions"] == [128, 256] and info["aspect_ratio_buckets"] == [256] and info["rows"] == 8
    dataset = load_precomputed_buckets([str(workspace["cache"])], 256)
    assert latent_shape_buckets(dataset) == [(4, 32, 32)] * 4 + [(4, 22, 44)] * 4  # 256x256 and 176x352 px
    batch = collate_bucketed([dataset[4], dataset[5]])
    assert batch["latents"].shape == (2, 4, 22, 44) and batch["prompt_attention_mask"].shape[0] == 2
    with pytest.raises(ValueError, match="mixes latent shapes"):
        collate_bucketed([dataset[0], dataset[4]])


def test_bucketed_training_resumes_exactly(workspace, tmp_path):
    common = ("--aspect_ratio_buckets", 256, "--kv_compress_layers", "deeper_half", "--max_train_steps", 6,
              "--checkpointing_steps", 2, "--learning_rate", 1e-3)
    straight = tmp_path / "straight"
    result = run_script("train_pixart_kv.py", *train_args(workspace, straight, *common))
    assert "aspect-ratio buckets, 4 batches per epoch" in result.stdout  # 2 buckets x 4 rows, batches of 2
    assert "KV compression x2 in blocks [1, 2]" in result.stdout

    # Resume from the step-2 checkpoint (mid-epoch; the run then crosses into the next epoch).
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    run_script("train_pixart_kv.py", *train_args(workspace, resumed, *common, "--resume_from_checkpoint", "latest"))
    expected, got = final_weights(straight), final_weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------- the script


def test_kv_finetune_writes_loadable_kv_pipeline(workspace, tmp_path):
    out = tmp_path / "run"
    result = run_script(
        "train_pixart_kv.py",
        *train_args(workspace, out, "--kv_compress_layers", 1, 2, "--vae", workspace["base"] / "vae",
                    "--max_train_steps", 2, "--checkpointing_steps", 2, "--use_ema", "--gradient_checkpointing",
                    "--validation_prompts", "a red cat", "--validation_steps", 2,
                    "--num_validation_inference_steps", 2),
    )
    assert "PixArt-Sigma at 256 px, KV compression x2 in blocks [1, 2]" in result.stdout
    assert (out / "checkpoint-2").is_dir() and (out / "validation" / "step-000002.png").exists()
    losses = json.loads((out / "loss_history.json").read_text())["losses"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)

    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    assert type(pipe) is PixArtSigmaKVPipeline and isinstance(pipe.transformer, PixArtSigmaKVTransformer2DModel)
    assert pipe.transformer.config.kv_compress_layers == [1, 2] and pipe.transformer.kv_compressed_layers == [1, 2]
    conv = pipe.transformer.transformer_blocks[1].attn1.kv_compress.conv.weight
    assert not torch.equal(conv, torch.full_like(conv, 0.25))  # trained away from the average init
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red cat", num_inference_steps=2, max_sequence_length=8, output_type="np").images[0]
    assert image.shape == (256, 256, 3)


def test_resolution_change_moves_sample_size_and_position_interpolation(workspace, tmp_path):
    out = tmp_path / "run128"
    run_script("train_pixart_kv.py", *train_args(workspace, out, "--resolution", 128, "--max_train_steps", 1))
    config = json.loads((out / "pipeline" / "transformer" / "config.json").read_text())
    assert (config["sample_size"], config["interpolation_scale"], config["kv_compress_layers"]) == (16, 0.25, None)

    # The moved model computes what a model built at that size computes.
    moved = PixArtSigmaKVTransformer2DModel.from_pretrained(workspace["base"], subfolder="transformer")
    move_to_resolution(moved, 128, 8)
    built = PixArtSigmaKVTransformer2DModel.from_config(moved.config)
    built.load_state_dict(moved.state_dict())
    inputs = dict(
        hidden_states=torch.randn(1, 4, 16, 24), encoder_hidden_states=torch.randn(1, 5, 8), timestep=torch.tensor([9]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    with torch.no_grad():
        torch.testing.assert_close(moved(**inputs).sample, built(**inputs).sample, atol=1e-5, rtol=1e-5)


def test_kv_layers_out_of_range_are_refused_when_loading(workspace, tmp_path):
    script = load_example("train_pixart_kv")
    args = script.parse_args(list(map(str, train_args(workspace, tmp_path, "--kv_compress_layers", 1, 7))))
    with pytest.raises(SystemExit, match=r"--kv_compress_layers.*entry 7 is out of range: the model has 3 blocks"):
        script.load_pipeline(args)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--kv_compress_layers", "deep"), '--kv_compress_layers takes block indices or "deeper_half"'),
        (("--kv_compress_layers", "1", "--kv_compress_ratio", "1"), "--kv_compress_ratio must be >= 2"),
        (("--caption_dropout", "1"), "--caption_dropout must be in [0, 1)"),
        (("--aspect_ratio_buckets", "300"), "--aspect_ratio_buckets must be one of [256, 512, 1024, 2048, 4096]"),
        (("--aspect_ratio_buckets", "512", "--resolution", "256"), "contradicts --aspect_ratio_buckets 512"),
        (("--aspect_ratio_buckets", "512", "--streaming"), "--aspect_ratio_buckets cannot stream"),
    ],
)
def test_bad_arguments_are_refused_with_a_reason(workspace, tmp_path, extra, message):
    parse_args = load_example("train_pixart_kv").parse_args
    with pytest.raises(SystemExit, match=re.escape(message)):
        parse_args([*map(str, train_args(workspace, tmp_path / "x")), *extra])
