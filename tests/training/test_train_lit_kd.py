"""LiT hybrid distillation: the loss's terms and weights (λ = 0 removes a term), the KD terms falling on a fixed batch,
and examples/train_lit_kd.py end to end (tiny PixArt-Σ teacher, CPU offload, tracker logs, continuing, bad flags)."""

from __future__ import annotations

import math
import re
import types

import pytest
import torch
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

import diffusers_microdit  # noqa: F401
from diffusers_microdit import LiTPipeline, LiTTransformer2DModel
from diffusers_microdit.data.shapes import build_shapes_dataset
from diffusers_microdit.training.data import load_precomputed
from diffusers_microdit.training.losses import lit_distillation_loss, pixart_sigma_loss
from diffusers_microdit.training.pixart import null_caption, training_noise_scheduler
from diffusers_microdit.training.precompute import precompute_embeddings

# A "256-px" PixArt-Σ (latents 32x32, 4 -> 8 channels), 2 blocks of width 16.
pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread
TEACHER_CONFIG = {**TINY_PIXART_CONFIG, "num_layers": 2, "sample_size": 32, "interpolation_scale": 0.5}
LOSS_TERMS = ("diffusion", "kd_noise", "kd_variance")  # LiTDistillationTerms, as logged to the trackers


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A tiny PixArt-Σ teacher pipeline and a 256-px cache of 8 shapes images encoded by it."""
    root = tmp_path_factory.mktemp("lit_kd")
    components = tiny_pixart_components()
    components["transformer"] = randomize_(PixArtTransformer2DModel(**TEACHER_CONFIG), seed=5).eval()
    teacher = PixArtSigmaPipeline(**components)
    teacher.save_pretrained(root / "teacher")
    precompute_embeddings(teacher, build_shapes_dataset(8, size=32), root / "cache", [256], shard_size=8, batch_size=8)
    return {"root": root, "teacher": root / "teacher", "cache": root / "cache"}


def train_args(workspace, output_dir, *extra) -> list[str]:
    args = [
        "--init_from", workspace["teacher"], "--precomputed_dataset", workspace["cache"], "--output_dir", output_dir,
        "--train_batch_size", 2, "--report_to", "none", "--seed", 3, "--lr_warmup_steps", 0, *extra,
    ]
    return list(map(str, args))


def tiny_teacher_and_student(seed: int = 0) -> tuple[PixArtTransformer2DModel, LiTTransformer2DModel]:
    teacher = randomize_(PixArtTransformer2DModel(**{**TEACHER_CONFIG, "sample_size": 8}), seed=seed).eval()
    teacher.requires_grad_(False)
    return teacher, LiTTransformer2DModel.from_pixart(teacher).train()


def tiny_batch(seed: int = 1) -> dict:
    """Inputs of `lit_distillation_loss` after the noise scheduler: latents, caption, mask, timesteps, noise."""
    generator = torch.Generator().manual_seed(seed)
    return dict(
        latents=torch.randn(3, 4, 8, 8, generator=generator),
        prompt_embeds=torch.randn(3, 5, 8, generator=generator),
        prompt_attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]),
        timesteps=torch.tensor([3, 400, 999]),
        noise=torch.randn(3, 4, 8, 8, generator=generator),
    )


class NaNVariance(torch.nn.Module):
    """A teacher whose variance channels are NaN: any use of them poisons the loss and its gradients."""

    def __init__(self, teacher: PixArtTransformer2DModel):
        super().__init__()
        self.teacher = teacher

    def forward(self, hidden_states, **kwargs):
        output = self.teacher(hidden_states, **kwargs)[0].clone()
        output[:, hidden_states.shape[1] :] = float("nan")
        return (output,)


def gradients(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, parameters = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    return dict(zip(names, torch.autograd.grad(loss, parameters, allow_unused=True)))


# ---------------------------------------------------------------------------------------------- the objective


def test_loss_is_diffusion_plus_weighted_kd_terms():
    teacher, student = tiny_teacher_and_student()
    scheduler, batch = DDPMScheduler(), tiny_batch()
    loss, terms = lit_distillation_loss(student, teacher, scheduler, **batch, lambda_noise=0.7, lambda_variance=0.3)
    assert all(term.shape == (3,) and bool(torch.all(term > 0)) for term in terms)
    expected = (terms.diffusion + 0.7 * terms.kd_noise + 0.3 * terms.kd_variance).mean()
    torch.testing.assert_close(loss, expected)

    # The diffusion term is PixArt-Σ's objective, and with both weights 0 the loss is that objective, gradients too.
    plain, _ = pixart_sigma_loss(student, scheduler, **batch)
    loss, terms = lit_distillation_loss(student, teacher, scheduler, **batch, lambda_noise=0, lambda_variance=0)
    assert loss.item() == plain.item() == terms.diffusion.mean().item()
    expected_grads, got_grads = gradients(student, plain), gradients(student, loss)
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=0, msg=name)
    assert all(p.grad is None for p in teacher.parameters())


def test_zero_weight_removes_a_term_even_when_the_teacher_is_not_finite():
    teacher, student = tiny_teacher_and_student()
    scheduler, batch = DDPMScheduler(), tiny_batch()
    broken = NaNVariance(teacher)
    loss, terms = lit_distillation_loss(student, broken, scheduler, **batch, lambda_noise=1.0, lambda_variance=0)
    assert math.isfinite(loss.item()) and terms.kd_variance.isnan().all()  # reported, not used
    assert all(torch.isfinite(g).all() for g in gradients(student, loss).values() if g is not None)
    loss, _ = lit_distillation_loss(student, broken, scheduler, **batch, lambda_noise=1.0, lambda_variance=0.05)
    assert loss.isnan()


def test_log_variance_target_discounts_all_but_the_first_timesteps():
    teacher, student = tiny_teacher_and_student()
    scheduler, batch = DDPMScheduler(), tiny_batch()
    with torch.no_grad():
        _, values = lit_distillation_loss(student, teacher, scheduler, **batch)
        _, log_variances = lit_distillation_loss(student, teacher, scheduler, **batch, variance_target="log_variance")
    ratio = log_variances.kd_variance / values.kd_variance  # timesteps 3, 400, 999
    print(f"log-variance / raw-value KD variance term per timestep: {ratio.tolist()}")
    assert ratio[0] < 0.1 and ratio[1] < 1e-4 and ratio[2] < 1e-6
    torch.testing.assert_close(log_variances.kd_noise, values.kd_noise)
    with pytest.raises(ValueError, match=re.escape("choose one of ['values', 'log_variance']")):
        lit_distillation_loss(student, teacher, scheduler, **batch, variance_target="sigma")


def test_kd_terms_decrease_on_a_fixed_batch(workspace, tmp_path):
    """The script's teacher, student and compute_loss; 20 AdamW steps on 4 cached rows, the same draws every step.

    The tiny teacher is random, far from fitting the data, so at LiT's weights the data term pulls the student away
    from it; weights of 10 make the teacher the main target, and both KD terms must then fall."""
    script = load_example("train_lit_kd")
    args = script.parse_args([*train_args(workspace, tmp_path), "--lambda_noise", "10", "--lambda_variance", "10"])
    pipeline = script.load_teacher(args)
    student = script.build_student(args, pipeline.transformer, pipeline.vae_scale_factor).train()
    rows = load_precomputed([str(workspace["cache"])], 256)
    batch = torch.utils.data.default_collate([rows[i] for i in range(4)])
    null = null_caption(pipeline, batch["prompt_embeds"].shape[1])
    recorded = []
    log = types.SimpleNamespace(add=recorded.append)
    compute_loss = script.make_compute_loss(pipeline.transformer, training_noise_scheduler(pipeline), *null, args, log=log)
    losses = train_on_fixed_batch(student, compute_loss, batch, 20)
    first, last = (dict(zip(LOSS_TERMS, (t.mean().item() for t in recorded[i]))) for i in (0, -1))
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}\nfirst terms {first}\nlast terms  {last}")
    assert last["kd_noise"] < 0.3 * first["kd_noise"] and last["kd_variance"] < 0.3 * first["kd_variance"]
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def distilled(workspace) -> dict:
    """Two distillation steps (of 2 micro-batches each) of a 4-head student with the teacher offloaded, validation
    and tensorboard logs."""
    out = workspace["root"] / "run"
    result = run_script(
        "train_lit_kd.py",
        *train_args(workspace, out, "--max_train_steps", 2, "--gradient_accumulation_steps", 2,
                    "--checkpointing_steps", 2, "--linear_attention_heads", 4, "--teacher_cpu_offload",
                    "--report_to", "tensorboard", "--validation_prompts", "a red cat", "--validation_steps", 2,
                    "--num_validation_inference_steps", 2),
    )
    return {"out": out, "stdout": result.stdout}


def test_distillation_writes_a_loadable_lit_pipeline(distilled, workspace):
    out = distilled["out"]
    assert "LiT (4 linear-attention heads) distilled from PixArt-Sigma at 256 px" in distilled["stdout"]
    assert "1.0 * kd_noise + 0.05 * kd_variance (values), teacher offloaded to the CPU" in distilled["stdout"]
    assert (out / "checkpoint-2").is_dir() and (out / "validation" / "step-000002.png").exists()

    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    assert type(pipe) is LiTPipeline and pipe.transformer.config.linear_attention_heads == 4
    # Two steps at the default learning rate leave the inherited weights next to the teacher's (seeded noise of
    # scale 0.2); the self-attention was initialised afresh.
    teacher = PixArtTransformer2DModel.from_pretrained(workspace["teacher"], subfolder="transformer").state_dict()
    student = pipe.transformer.state_dict()
    for name in ("transformer_blocks.1.ff.net.2.weight", "transformer_blocks.1.attn2.to_k.weight", "proj_out.weight"):
        torch.testing.assert_close(student[name], teacher[name], rtol=0, atol=1e-3, msg=name)
    query = "transformer_blocks.1.attn1.to_q.weight"
    assert (student[query] - teacher[query]).abs().max() > 0.1
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red cat", num_inference_steps=2, max_sequence_length=8, output_type="np").images[0]
    assert image.shape == (256, 256, 3)


def test_terms_are_logged_every_step(distilled):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(next((distilled["out"] / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    logged = {name: [event.value for event in logs.Scalars(name)] for name in ("loss", *LOSS_TERMS)}
    assert {name: [event.step for event in logs.Scalars(name)] for name in logged} == dict.fromkeys(logged, [1, 2])
    assert all(math.isfinite(value) and value > 0 for values in logged.values() for value in values)
    # The terms are the step's own: averaged over its micro-batches, they add up to the trainer's loss.
    for step in range(2):
        total = logged["diffusion"][step] + 1.0 * logged["kd_noise"][step] + 0.05 * logged["kd_variance"][step]
        assert total == pytest.approx(logged["loss"][step], rel=1e-5)


def test_student_init_from_continues_a_previous_student(distilled, workspace, tmp_path):
    script = load_example("train_lit_kd")
    args = script.parse_args([*train_args(workspace, tmp_path), "--student_init_from", str(distilled["out"])])
    teacher = PixArtTransformer2DModel.from_pretrained(workspace["teacher"], subfolder="transformer")
    student = script.build_student(args, teacher, 8)
    assert student.config.linear_attention_heads == 4  # the previous student's architecture and weights
    trained = final_weights(distilled["out"])
    assert student.state_dict().keys() == trained.keys()
    for name, value in student.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)

    # With a 512-px teacher the 256-px student moves to 512 px: sample size and position interpolation follow.
    teacher = PixArtTransformer2DModel(**{**TEACHER_CONFIG, "sample_size": 64, "interpolation_scale": 1.0})
    moved = script.build_student(args, teacher, 8)
    assert (moved.config.sample_size, moved.config.interpolation_scale) == (64, 1.0)
    assert moved.pos_embed.pos_embed.shape == teacher.pos_embed.pos_embed.shape
    torch.testing.assert_close(moved.pos_embed.pos_embed, teacher.pos_embed.pos_embed)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--lambda_noise", "-1"), "--lambda_noise must be >= 0 (0 removes the term), got -1.0"),
        (("--lambda_variance", "nan"), "--lambda_variance must be a finite number"),
        (("--caption_dropout", "1"), "--caption_dropout must be in [0, 1)"),
        (("--linear_attention_heads", "0"), "--linear_attention_heads must be >= 1"),
        (("--aspect_ratio_buckets", "300"), "--aspect_ratio_buckets must be one of [256, 512, 1024, 2048, 4096]"),
        (("--student_init_from", "/no/such/run"), "has no transformer/ folder"),
    ],
)
def test_bad_arguments_are_refused_with_a_reason(workspace, tmp_path, extra, message):
    parse_args = load_example("train_lit_kd").parse_args
    with pytest.raises(SystemExit, match=re.escape(message)):
        parse_args([*train_args(workspace, tmp_path / "x"), *extra])


def test_bad_teacher_or_student_is_refused_with_a_reason(distilled, workspace, tmp_path):
    script = load_example("train_lit_kd")
    with pytest.raises(SystemExit, match=re.escape("--linear_attention_heads cannot change a --student_init_from")):
        script.parse_args([*train_args(workspace, tmp_path), "--student_init_from", str(distilled["out"]),
                           "--linear_attention_heads", "2"])
    with pytest.raises(SystemExit, match=re.escape("continue a LiT student with --student_init_from")):
        script.load_teacher(script.parse_args(train_args({**workspace, "teacher": distilled["out"]}, tmp_path)))
    args = script.parse_args([*train_args(workspace, tmp_path), "--linear_attention_heads", "3"])
    teacher = PixArtTransformer2DModel.from_pretrained(workspace["teacher"], subfolder="transformer")
    with pytest.raises(SystemExit, match=re.escape("linear_attention_heads must be a positive divisor of the width")):
        script.build_student(args, teacher, 8)
