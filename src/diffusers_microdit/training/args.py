"""Command-line flags shared by every `examples/train_*.py`: the diffusers examples' names and meanings, plus the
precomputed-data and cost-meter flags of this package. Each script adds its own objective's flags on top."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers.optimization import SchedulerType

from .sources import ASPECT_RATIO_BINS


def add_training_args(parser: argparse.ArgumentParser, *, learning_rate: float, weight_decay: float) -> None:
    """Add the shared flags; `learning_rate`/`weight_decay` are the defaults of the calling script's recipe."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path", "--init_from", dest="pretrained_model_name_or_path", default=None,
        help="Pipeline folder or Hub id to start from (VAE, text encoder, tokenizer, scheduler and transformer). "
        "A previous run's --output_dir works too (its pipeline/ subfolder is used): this chains training stages.",
    )
    model.add_argument("--revision", default=None, help="Hub revision of --pretrained_model_name_or_path.")
    model.add_argument("--variant", default=None, help="Weight variant, e.g. fp16.")

    data = parser.add_argument_group("data (precomputed with examples/precompute_embeddings.py)")
    data.add_argument(
        "--precomputed_dataset", nargs="+", default=None,
        help="One or more cache folders of precomputed latents and caption embeddings; several are mixed.",
    )
    data.add_argument(
        "--precomputed_dataset_probabilities", nargs="+", type=float, default=None,
        help="Sampling probability of each --precomputed_dataset (default: proportional to size).",
    )
    data.add_argument("--streaming", action="store_true", help="Stream the cache instead of loading it in memory.")
    data.add_argument("--resolution", type=int, default=None, help="Training image size in pixels (a cached one).")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", required=True, help="Checkpoints, logs, validation images and the pipeline.")
    run.add_argument("--seed", type=int, default=0, help="Seeds initialisation, data order and every noise draw.")
    run.add_argument("--train_batch_size", type=int, default=16, help="Batch size per device.")
    run.add_argument("--num_train_epochs", type=int, default=1)
    run.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides epochs.")
    run.add_argument("--gradient_accumulation_steps", type=int, default=1)
    run.add_argument("--gradient_checkpointing", action="store_true")
    run.add_argument("--learning_rate", type=float, default=learning_rate)
    run.add_argument("--scale_lr", action="store_true", help="Multiply the LR by the global batch size.")
    run.add_argument("--lr_scheduler", default="constant", choices=[t.value for t in SchedulerType])
    run.add_argument("--lr_warmup_steps", type=int, default=0)
    run.add_argument("--lr_num_cycles", type=int, default=1)
    run.add_argument("--adam_beta1", type=float, default=0.9)
    run.add_argument("--adam_beta2", type=float, default=0.999)
    run.add_argument("--adam_weight_decay", type=float, default=weight_decay)
    run.add_argument("--adam_epsilon", type=float, default=1e-8)
    run.add_argument("--max_grad_norm", type=float, default=1.0)
    run.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights (diffusers EMAModel).")
    run.add_argument("--ema_decay", type=float, default=0.9999)
    run.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    run.add_argument("--allow_tf32", action="store_true")
    run.add_argument("--torch_compile", action="store_true", help="torch.compile the transformer.")

    saving = parser.add_argument_group("checkpoints, logging, validation, Hub")
    saving.add_argument("--checkpointing_steps", type=int, default=500)
    saving.add_argument("--checkpoints_total_limit", type=int, default=None)
    saving.add_argument(
        "--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest" in --output_dir.'
    )
    saving.add_argument("--report_to", default="tensorboard", help='tensorboard, wandb, all, or "none".')
    saving.add_argument("--logging_dir", default="logs")
    saving.add_argument("--tracker_project_name", default=None)
    saving.add_argument("--validation_prompts", nargs="+", default=None)
    saving.add_argument("--validation_steps", type=int, default=500)
    saving.add_argument("--num_validation_inference_steps", type=int, default=20)
    saving.add_argument("--validation_guidance_scale", type=float, default=None)
    saving.add_argument(
        "--push_to_hub", action="store_true",
        help="Push the output to the Hub; the token comes from `hf auth login` or HF_TOKEN (there is no --hub_token).",
    )
    saving.add_argument("--hub_model_id", default=None)

    cost = parser.add_argument_group("cost meter")
    cost.add_argument("--gpu_hour_cost", type=float, default=0.0, help="Price of one device-hour in dollars.")
    cost.add_argument("--peak_tflops", type=float, default=None, help="Device peak for MFU if not a known GPU.")


def add_image_caption_source_args(group) -> None:
    """Where raw image-caption data comes from: a `datasets` dataset (Hub id or `save_to_disk` folder) or an image
    folder with `metadata.jsonl` captions, as in the diffusers examples."""
    group.add_argument("--dataset_name", default=None, help="Hub dataset id, or a local `save_to_disk` folder.")
    group.add_argument("--dataset_config_name", default=None)
    group.add_argument("--dataset_split", default="train")
    group.add_argument("--train_data_dir", default=None, help="Image folder with metadata.jsonl captions.")
    group.add_argument("--image_column", default="image")
    group.add_argument("--caption_column", default="text")
    group.add_argument("--max_samples", type=int, default=None, help="Use only the first N rows.")
    group.add_argument("--cache_dir", default=None, help="Where `datasets` caches downloads.")


def add_aspect_ratio_bucket_arg(group) -> None:
    """`--aspect_ratio_buckets` for the PixArt-style scripts (multi-aspect latents cached by precompute)."""
    group.add_argument(
        "--aspect_ratio_buckets", type=int, default=None,
        help=f"Train on multi-aspect latents of this base size ({', '.join(map(str, ASPECT_RATIO_BINS))}), cached "
        "with precompute_embeddings.py --aspect_ratio_buckets; it is also the training resolution.",
    )


def check_aspect_ratio_bucket_args(args: argparse.Namespace) -> list[str]:
    """Problems with `--aspect_ratio_buckets`; when it is valid it also becomes `args.resolution`."""
    errors = []
    buckets = args.aspect_ratio_buckets
    if buckets is not None:
        if buckets not in ASPECT_RATIO_BINS:
            errors.append(f"--aspect_ratio_buckets must be one of {sorted(ASPECT_RATIO_BINS)}, got {buckets}.")
        if args.resolution not in (None, buckets):
            errors.append(f"--resolution {args.resolution} contradicts --aspect_ratio_buckets {buckets}; drop one.")
        if args.streaming:
            errors.append("--aspect_ratio_buckets cannot stream: batching by bucket needs every row's shape up front.")
        args.resolution = buckets
    return errors


def resolve_pipeline_path(path: str | None) -> str | None:
    """A previous run's output dir stands for its `pipeline/` subfolder."""
    if path is not None and (Path(path) / "pipeline" / "model_index.json").exists():
        return str(Path(path) / "pipeline")
    return path


def check_training_args(args: argparse.Namespace) -> None:
    """Refuse inconsistent flags before anything is built, saying what to change."""
    errors = []
    raw_source = getattr(args, "dataset_name", None) or getattr(args, "train_data_dir", None)
    if not args.precomputed_dataset and not raw_source:
        errors.append("--precomputed_dataset is required (make one with examples/precompute_embeddings.py).")
    positive = ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps")
    errors += [f"--{name} must be >= 1, got {getattr(args, name)}." for name in positive if getattr(args, name) < 1]
    if args.max_train_steps is not None and args.max_train_steps < 1:
        errors.append(f"--max_train_steps must be >= 1, got {args.max_train_steps}.")
    if args.learning_rate <= 0:
        errors.append(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        errors.append("--checkpoints_total_limit must be >= 1 (or leave it out to keep every checkpoint).")
    if not 0.0 < args.ema_decay < 1.0:
        errors.append(f"--ema_decay must be in (0, 1), got {args.ema_decay}.")
    probabilities = args.precomputed_dataset_probabilities
    if probabilities is not None:
        if args.precomputed_dataset and len(probabilities) != len(args.precomputed_dataset):
            errors.append("Give one --precomputed_dataset_probabilities value per --precomputed_dataset.")
        elif any(p < 0 for p in probabilities) or abs(sum(probabilities) - 1) > 1e-6:
            errors.append(f"--precomputed_dataset_probabilities must be >= 0 and sum to 1, got {probabilities}.")
    for path in args.precomputed_dataset or []:
        if not Path(path).is_dir():
            errors.append(f"--precomputed_dataset {path} is not a folder.")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        errors.append(f'--resume_from_checkpoint {args.resume_from_checkpoint} is not a folder (or use "latest").')
    if errors:
        raise SystemExit("Invalid arguments:\n  " + "\n  ".join(errors))
