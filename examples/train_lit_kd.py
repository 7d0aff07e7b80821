#!/usr/bin/env python
"""Distil LiT (linear-attention PixArt-Sigma) from a PixArt-Sigma teacher with Accelerate: LiT's hybrid KD.

The student inherits every teacher weight but the self-attention, which becomes LiT's linear attention (ReLU kernel,
depthwise 5x5 conv on V, few heads); it then learns from the data and from the frozen teacher at once:

    loss = diffusion + lambda_noise * MSE(eps_S, eps_T) + lambda_variance * MSE(v_S, v_T)

where `diffusion` is PixArt-Sigma's own objective (epsilon MSE + learned-range variational bound) and eps / v are the
epsilon and variance output channels of student (S) and teacher (T) at the same noisy latents, timestep and caption.

    # LiT from PixArt-Sigma 512 (the teacher is --init_from; the student is built from it)
    accelerate launch examples/train_lit_kd.py --init_from PixArt-alpha/PixArt-Sigma-XL-2-512-MS \\
        --precomputed_dataset cache512/ --aspect_ratio_buckets 512 --max_train_steps 45400 \\
        --mixed_precision bf16 --gradient_checkpointing --teacher_cpu_offload --output_dir lit-512
    # continue with a previous run's student at 1K (it is moved to the 1K teacher's resolution)
    accelerate launch examples/train_lit_kd.py --init_from PixArt-alpha/PixArt-Sigma-XL-2-1024-MS \\
        --student_init_from lit-512 --precomputed_dataset cache1024/ --aspect_ratio_buckets 1024 --output_dir lit-1k

Defaults: lambda_noise 1.0 and lambda_variance 0.05 (LiT's text-to-image values), 2 linear-attention heads, and
PixArt-Sigma's finetuning recipe (learning rate 2e-5, no weight decay, constant schedule after 1000 warmup steps,
gradient clipping at 0.01, guidance 4.5 for validation), with AdamW unless --optimizer came (Sigma's and LiT's
CAME). LiT reports 45,400 steps. The KD terms are logged to the trackers next to the total loss as `diffusion`,
`kd_noise` and `kd_variance`. Data: the caches of examples/precompute_embeddings.py, as for train_pixart_kv.py (same
data flags, caption dropout and Sigma's recipe options: two captions mixed by --real_caption_ratio, and
--fp32_attention, which here upcasts the teacher's attention and the student's cross-attention).
"""

import argparse
import contextlib
from pathlib import Path

import torch
from accelerate import cpu_offload_with_hook
from diffusers import DDPMScheduler, DiffusionPipeline, PixArtSigmaPipeline

import diffusers_microdit  # noqa: F401  (registers the package's classes with diffusers)
from diffusers_microdit import LiTPipeline, LiTTransformer2DModel
from diffusers_microdit.models.transformer_lit import VALUE_CONV_CHANNELS, VALUE_CONV_INITS
from diffusers_microdit.training.args import (
    add_aspect_ratio_bucket_arg,
    add_pixart_recipe_args,
    add_training_args,
    check_aspect_ratio_bucket_args,
    check_training_args,
    resolve_pipeline_path,
)
from diffusers_microdit.training.data import caption_mixing_ratio, load_training_data
from diffusers_microdit.training.losses import (
    KD_VARIANCE_TARGETS,
    LiTDistillationTerms,
    draw_pixart_training_inputs,
    lit_distillation_loss,
)
from diffusers_microdit.training.pixart import (
    move_to_resolution,
    null_caption,
    recipe_summary,
    training_noise_scheduler,
    use_fp32_attention,
)
from diffusers_microdit.training.precompute import training_caches
from diffusers_microdit.training.trainer import DiffusionTrainer

# LiT's student architecture options: flag name -> (`from_pixart` argument, default).
STUDENT_OPTIONS = {
    "linear_attention_heads": ("num_attention_heads", 2),
    "value_conv_channels": ("value_conv_channels", "head_dim"),
    "value_conv_init": ("value_conv_init", "default"),
}
# Config entries a continued student must share with the teacher for their outputs to be comparable.
SHARED_WITH_TEACHER = ("in_channels", "out_channels", "patch_size", "caption_channels")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, learning_rate=2e-5, weight_decay=0.0)  # PixArt-Sigma's (CAME) values
    parser.set_defaults(
        lr_scheduler="constant_with_warmup", lr_warmup_steps=1000, max_grad_norm=0.01, validation_guidance_scale=4.5
    )
    kd = parser.add_argument_group("distillation (the teacher is the --init_from PixArt-Sigma pipeline)")
    kd.add_argument(
        "--lambda_noise", type=float, default=1.0,
        help="Weight of MSE(student eps, teacher eps); 0 takes the term out of the loss (it is still logged).",
    )
    kd.add_argument(
        "--lambda_variance", type=float, default=0.05,
        help="Weight of MSE(student v, teacher v); 0 takes the term out of the loss (it is still logged).",
    )
    kd.add_argument(
        "--kd_variance_target", default="values", choices=KD_VARIANCE_TARGETS,
        help='"values": the raw variance output channels (LiT\'s "variance output"); "log_variance": the '
        "learned-range log-variances they stand for, a difference that nearly vanishes after the first timesteps.",
    )
    kd.add_argument(
        "--teacher_cpu_offload", action="store_true",
        help="Keep the teacher on the CPU and move it to the device for each of its forward passes only.",
    )
    kd.add_argument(
        "--caption_dropout", type=float, default=0.1,
        help="Share of captions replaced by the pipeline's unconditional caption (T5 embedding of the empty prompt), "
        "for classifier-free guidance; the teacher sees the same caption as the student.",
    )
    add_aspect_ratio_bucket_arg(kd)
    add_pixart_recipe_args(kd)
    student = parser.add_argument_group("student (built from the teacher unless --student_init_from)")
    student.add_argument(
        "--student_init_from", default=None,
        help="Continue from this LiT student: a LiT pipeline folder or a previous run's --output_dir. A student of "
        "another resolution is moved to the teacher's (sample size and position interpolation).",
    )
    student.add_argument("--linear_attention_heads", type=int, default=None, help="Linear self-attention heads (2).")
    student.add_argument(
        "--value_conv_channels", default=None, choices=VALUE_CONV_CHANNELS,
        help='Depthwise conv on V: filters shared by the heads ("head_dim", default) or one per channel.',
    )
    student.add_argument(
        "--value_conv_init", default=None, choices=VALUE_CONV_INITS,
        help='"default" (PyTorch conv init) or "zeros" (the student starts as pure linear attention).',
    )
    args = parser.parse_args(argv)

    errors = []
    if args.pretrained_model_name_or_path is None:
        errors.append("--init_from (or --pretrained_model_name_or_path) is required: the PixArt-Sigma teacher.")
    for name in ("lambda_noise", "lambda_variance"):
        value = getattr(args, name)
        if value < 0:  # non-finite values are refused with the shared flags
            errors.append(f"--{name} must be >= 0 (0 removes the term), got {value}.")
    if args.linear_attention_heads is not None and args.linear_attention_heads < 1:
        errors.append(f"--linear_attention_heads must be >= 1, got {args.linear_attention_heads}.")
    chosen = [f"--{name}" for name in STUDENT_OPTIONS if getattr(args, name) is not None]
    if args.student_init_from is not None:
        args.student_init_from = resolve_pipeline_path(args.student_init_from)
        if chosen:
            errors.append(f"{', '.join(chosen)} cannot change a --student_init_from student; drop them.")
        if not Path(args.student_init_from, "transformer").is_dir():
            errors.append(
                f"--student_init_from {args.student_init_from} has no transformer/ folder: give a LiT pipeline "
                "folder or the --output_dir of a previous run."
            )
    errors += check_aspect_ratio_bucket_args(args)
    check_training_args(args, errors)
    args.pretrained_model_name_or_path = resolve_pipeline_path(args.pretrained_model_name_or_path)
    return args


def load_teacher(args) -> PixArtSigmaPipeline:
    """The --init_from PixArt-Sigma pipeline (plain or KV-compressed), all of it frozen."""
    pipeline = DiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant
    )
    if not isinstance(pipeline, PixArtSigmaPipeline) or isinstance(pipeline, LiTPipeline):
        hint = " (continue a LiT student with --student_init_from)" if isinstance(pipeline, LiTPipeline) else ""
        kind = type(pipeline).__name__
        raise SystemExit(f"--init_from must be the PixArt-Sigma teacher pipeline, got a {kind}{hint}.")
    config = pipeline.transformer.config
    if config.out_channels != 2 * config.in_channels:
        raise SystemExit(
            "The teacher must predict noise and variance (learned sigma: out_channels = 2 * in_channels), got "
            f"{config.out_channels} output channels for {config.in_channels} latent channels."
        )
    for frozen in (pipeline.vae, pipeline.text_encoder, pipeline.transformer):
        frozen.requires_grad_(False).eval()
    return pipeline


def build_student(args, teacher: torch.nn.Module, vae_scale_factor: int) -> LiTTransformer2DModel:
    """LiT inherited from the teacher (fresh linear self-attention), or the --student_init_from student moved to
    the teacher's resolution if it has another (LiT's 512 px -> 1K progression)."""
    if args.student_init_from is None:
        options = {arg: default if getattr(args, flag) is None else getattr(args, flag)
                   for flag, (arg, default) in STUDENT_OPTIONS.items()}
        try:
            return LiTTransformer2DModel.from_pixart(teacher, **options)
        except ValueError as error:
            raise SystemExit(f"Cannot build the LiT student from the teacher: {error}") from None
    try:
        student = LiTTransformer2DModel.from_pretrained(args.student_init_from, subfolder="transformer")
    except ValueError as error:  # e.g. a PixArt-Sigma folder: no linear-attention weights
        raise SystemExit(f"--student_init_from: {error}") from None
    differ = {key: (student.config[key], teacher.config[key]) for key in SHARED_WITH_TEACHER
              if student.config[key] != teacher.config[key]}
    if differ:
        raise SystemExit(
            f"The --student_init_from student and the teacher differ in {differ} (student, teacher): distil from a "
            "teacher with the student's latent channels, patch size and text encoder."
        )
    if student.config.sample_size != teacher.config.sample_size:
        move_to_resolution(student, teacher.config.sample_size * vae_scale_factor, vae_scale_factor)
    return student


def attach_teacher(teacher: torch.nn.Module, device: torch.device, dtype: torch.dtype, cpu_offload: bool) -> None:
    """Put the teacher on `device` in the training precision, or (cpu_offload) keep it on the CPU and move it to
    `device` for each forward only, so the device holds it only while it predicts."""
    teacher.to(dtype=dtype)
    if not cpu_offload:
        teacher.to(device)
        return
    _, hook = cpu_offload_with_hook(teacher, execution_device=device)
    teacher.register_forward_hook(lambda *_: hook.offload())


class DistillationLog:
    """Logs the loss terms (`diffusion`, `kd_noise`, `kd_variance`) to the trackers once per optimizer step, averaged
    over its micro-batches and all processes, next to the trainer's `loss`. The trainer calls the loss only for
    training steps (it counts FLOPs on the first of them), so every call is logged."""

    def __init__(self, trainer: DiffusionTrainer):
        self.trainer = trainer
        self.sums = torch.zeros(len(LiTDistillationTerms._fields))
        self.micro_batches = 0

    def add(self, terms: LiTDistillationTerms) -> None:
        accelerator = self.trainer.accelerator
        means = torch.stack([term.detach().float().mean() for term in terms])
        self.sums += accelerator.gather(means[None]).mean(dim=0).cpu()  # a collective: every process calls it
        self.micro_batches += 1
        if accelerator.sync_gradients:  # the last micro-batch of this optimizer step
            averages = (self.sums / self.micro_batches).tolist()
            accelerator.log(dict(zip(LiTDistillationTerms._fields, averages)), step=self.trainer.global_step + 1)
            self.sums.zero_()
            self.micro_batches = 0


def make_compute_loss(
    teacher, noise_scheduler: DDPMScheduler, null_embeds, null_mask, args,
    autocast=contextlib.nullcontext, log: DistillationLog | None = None,
):
    """`compute_loss(model, batch, draws)` of the trainer: timesteps, noise and caption dropout drawn for the global
    batch from `draws`, then LiT's distillation loss against `teacher`, under `autocast()` (the prepared student gets
    Accelerate's mixed precision, the unprepared teacher only from this), its terms handed to `log`."""
    num_timesteps = noise_scheduler.config.num_train_timesteps

    def compute_loss(model, batch, draws) -> torch.Tensor:
        inputs = draw_pixart_training_inputs(
            batch, draws, num_timesteps, null_embeds, null_mask, args.caption_dropout, args.real_caption_ratio
        )
        with autocast():
            loss, terms = lit_distillation_loss(
                model, teacher, noise_scheduler, *inputs,
                lambda_noise=args.lambda_noise, lambda_variance=args.lambda_variance,
                variance_target=args.kd_variance_target,
            )
        if log is not None:
            log.add(terms)
        return loss

    return compute_loss


def main(argv=None) -> None:
    args = parse_args(argv)
    trainer = DiffusionTrainer(args)
    pipeline = load_teacher(args)
    teacher = pipeline.transformer
    student = build_student(args, teacher, pipeline.vae_scale_factor)  # before the teacher is cast: float32
    native = teacher.config.sample_size * pipeline.vae_scale_factor
    resolution = args.resolution or native
    if resolution != native:
        raise SystemExit(
            f"The teacher is a {native}-px model and --resolution is {resolution}: distil at the teacher's "
            f"resolution (move a teacher to {resolution} px first with train_pixart_kv.py --resolution)."
        )
    noise_scheduler = training_noise_scheduler(pipeline)

    cache_dirs = training_caches(args, pipeline, trainer.accelerator, resolution)
    dataset, collate_fn, batch_sampler = load_training_data(args, resolution, pipeline, teacher, cache_dirs)
    args.real_caption_ratio = caption_mixing_ratio(dataset, args.real_caption_ratio)
    if args.fp32_attention:
        for model in (student, teacher):  # a teacher's fp16 NaN would reach the student through the KD terms
            use_fp32_attention(model)
    first_row = next(iter(dataset))
    null_embeds, null_mask = null_caption(pipeline, first_row["prompt_embeds"].shape[0])
    attach_teacher(teacher, trainer.device, trainer.weight_dtype, args.teacher_cpu_offload)
    trainer.accelerator.print(
        f"LiT ({student.config.linear_attention_heads} linear-attention heads) distilled from PixArt-Sigma at "
        f"{resolution} px: loss = diffusion + {args.lambda_noise} * kd_noise + {args.lambda_variance} * "
        f"kd_variance ({args.kd_variance_target}), teacher "
        + ("offloaded to the CPU" if args.teacher_cpu_offload else "on the device")
    )
    trainer.accelerator.print(recipe_summary(args))

    def build_pipeline(model) -> LiTPipeline:
        return LiTPipeline(
            transformer=model, vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer,
            scheduler=pipeline.scheduler,
        )

    log = DistillationLog(trainer)
    compute_loss = make_compute_loss(
        teacher, noise_scheduler, null_embeds, null_mask, args, trainer.accelerator.autocast, log
    )
    trainer.prepare(student, dataset, compute_loss, collate_fn, batch_sampler)
    trainer.train(build_pipeline)
    trainer.finish(build_pipeline)


if __name__ == "__main__":
    main()
