"""Command-line flags shared by every `examples/train_*.py`: the diffusers examples' names and meanings, plus the
precomputed-data and cost-meter flags of this package. Each script adds its own objective's flags on top."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from accelerate.utils import DynamoBackend
from diffusers.optimization import SchedulerType

from ..integrity import check_local_folder
from ..pipelines.pipeline_pixart_sigma_family import ASPECT_RATIO_BINS
from .budget import BUDGET_FLAGS
from .data import REAL_CAPTION_RATIO, caption_column_names
from .optimizers import add_optimizer_args, optimizer_problems
from .sources import ImagePreparation


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

    raw = parser.add_argument_group("raw data (encoded once into a cache under --encoded_cache_dir, then trained on)")
    add_image_caption_source_args(raw)
    raw.add_argument(
        "--encoded_cache_dir", default=None,
        help="Where raw data is encoded (default: --output_dir/cache), in a subfolder per source and encoding, so a "
        "rerun or the next stage with the same data and encoders reuses it.",
    )
    data = parser.add_argument_group("or data precomputed with examples/precompute_embeddings.py")
    data.add_argument(
        "--precomputed_dataset", nargs="+", default=None,
        help="One or more cache folders of precomputed latents and caption embeddings; several are trained on as "
        "their union (or see --precomputed_dataset_probabilities).",
    )
    data.add_argument(
        "--precomputed_dataset_probabilities", nargs="+", type=float, default=None,
        help="Draw each --precomputed_dataset with this probability (a small one is repeated as often as that asks). "
        "Default: the union of all of them, each row once per epoch.",
    )
    data.add_argument("--streaming", action="store_true", help="Stream the cache instead of loading it in memory.")
    data.add_argument("--resolution", type=int, default=None, help="Training image size in pixels (a cached one).")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", required=True, help="Checkpoints, logs, validation images and the pipeline.")
    run.add_argument("--seed", type=int, default=0, help="Seeds initialisation, data order and every noise draw.")
    run.add_argument("--train_batch_size", type=int, default=16, help="Batch size per device.")
    run.add_argument("--num_train_epochs", type=int, default=1)
    run.add_argument(
        "--max_train_steps", type=int, default=None,
        help="Optimizer steps. The run's length is set by exactly one of this, --max_train_minutes and "
        "--max_train_budget_usd (each overrides --num_train_epochs).",
    )
    run.add_argument(
        "--max_train_minutes", type=float, default=None,
        help="Wall-clock training budget instead of --max_train_steps: a few steps are timed after warm-up and the "
        "step count that ends within the budget becomes the run's --max_train_steps (LR schedule included); a resumed "
        "run keeps that count.",
    )
    run.add_argument(
        "--max_train_budget_usd", type=float, default=None,
        help="Training budget in dollars instead of --max_train_steps: --max_train_minutes of what it pays for on "
        "this launch's devices at --gpu_hour_cost per device-hour.",
    )
    run.add_argument("--gradient_accumulation_steps", type=int, default=1)
    run.add_argument(
        "--global_batch_size", type=int, default=None,
        help="Images per optimizer step over all processes (the paper's 2048): sets --gradient_accumulation_steps "
        "to global / (--train_batch_size x processes), which must divide.",
    )
    run.add_argument("--gradient_checkpointing", action="store_true")
    run.add_argument("--learning_rate", type=float, default=learning_rate)
    run.add_argument("--scale_lr", action="store_true", help="Multiply the LR by the global batch size.")
    run.add_argument(
        "--lr_scheduler", default="constant", choices=[t.value for t in SchedulerType] + [COSINE_WITH_MIN_LR],
        help=f"diffusers' schedules, or {COSINE_WITH_MIN_LR}: warm-up, then a cosine down to --lr_min_ratio x the "
        "peak (the original MicroDiT's stage-1 schedule; transformers' get_cosine_with_min_lr_schedule_with_warmup).",
    )
    run.add_argument("--lr_min_ratio", type=float, default=0.0, help=f"Floor of {COSINE_WITH_MIN_LR}, x the peak LR.")
    run.add_argument("--lr_warmup_steps", type=int, default=0)
    run.add_argument("--lr_num_cycles", type=int, default=1)
    run.add_argument("--adam_beta1", type=float, default=0.9)
    run.add_argument("--adam_beta2", type=float, default=0.999)
    run.add_argument("--adam_weight_decay", type=float, default=weight_decay)
    run.add_argument("--adam_epsilon", type=float, default=1e-8)
    add_optimizer_args(run)
    run.add_argument(
        "--max_grad_norm", type=optional_float, default=1.0, help='Gradient-norm clipping threshold; "none" turns it off.'
    )
    run.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights (diffusers EMAModel).")
    run.add_argument("--ema_decay", type=float, default=0.9999)
    run.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    run.add_argument("--allow_tf32", action="store_true")
    run.add_argument("--torch_compile", action="store_true", help="torch.compile the transformer.")
    run.add_argument(
        "--torch_compile_backend", default="inductor", choices=[b.value.lower() for b in DynamoBackend if b.value != "NO"],
        help="torch.compile backend with --torch_compile (Accelerate's dynamo backends).",
    )

    saving = parser.add_argument_group("checkpoints, logging, validation, Hub")
    saving.add_argument("--checkpointing_steps", type=int, default=500)
    saving.add_argument("--checkpoints_total_limit", type=int, default=None)
    saving.add_argument(
        "--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest" in --output_dir.'
    )
    saving.add_argument(
        "--resume_optimizer_state", action="store_true",
        help="Start from the optimizer moments of --init_from's newest checkpoint (a previous stage's --output_dir), "
        "as the original's stage 2 and 4 continue stage 1 and 3; LR, betas and weight decay are this run's.",
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


COSINE_WITH_MIN_LR = "cosine_with_min_lr"


def optional_float(value: str) -> float | None:
    """argparse type: a float, or "none" for a flag that can be switched off."""
    return None if value.lower() == "none" else float(value)


def add_image_caption_source_args(group) -> None:
    """Where raw image-caption data comes from: a `datasets` dataset (Hub id or `save_to_disk` folder) or an image
    folder with `metadata.jsonl` captions, as in the diffusers examples."""
    group.add_argument("--dataset_name", default=None, help="Hub dataset id, or a local `save_to_disk` folder.")
    group.add_argument("--dataset_config_name", default=None)
    group.add_argument("--dataset_split", default="train")
    group.add_argument("--train_data_dir", default=None, help="Image folder with metadata.jsonl captions.")
    group.add_argument("--image_column", default="image")
    group.add_argument(
        "--caption_column", default="text",
        help="Caption column; two names separated by a comma (e.g. text,vlm_text) encode both captions, the real "
        "one and an alternative one, for the scripts that mix them (--real_caption_ratio).",
    )
    group.add_argument(
        "--max_samples", "--max_train_samples", dest="max_samples", type=int, default=None,
        help="Use only the first N rows.",
    )
    group.add_argument("--cache_dir", default=None, help="Where `datasets` caches downloads.")
    group.add_argument(
        "--min_image_size", type=int, default=None,
        help="Drop (and count) images whose shorter side is smaller, in pixels, as the original does, instead of "
        "upscaling them.",
    )
    group.add_argument(
        "--center_crop", action=argparse.BooleanOptionalAction, default=True,
        help="Centre-crop images to the training size (the originals' choice); --no-center_crop crops at random.",
    )
    group.add_argument("--random_flip", action="store_true", help="Mirror half of the images left-right.")


def image_preparation(args: argparse.Namespace) -> ImagePreparation:
    """The `ImagePreparation` of the raw-data flags."""
    return ImagePreparation(args.center_crop, args.random_flip, args.min_image_size)


def add_pixart_recipe_args(group) -> None:
    """PixArt-Σ's own recipe options for the PixArt-Σ-family scripts: `--real_caption_ratio` (train on one of two
    captions per image, the original and a VLM's; the other scripts refuse two caption columns) and
    `--fp32_attention`."""
    group.add_argument(
        "--real_caption_ratio", type=float, default=None,
        help="With two captions per image (--caption_column REAL,OTHER, or a cache precomputed so): the probability "
        "that a sample trains on its real (first) caption rather than the other, drawn per sample from --seed and "
        f"the step, so a resumed run draws the same. Default {REAL_CAPTION_RATIO} (PixArt-Sigma's real_prompt_ratio).",
    )
    group.add_argument(
        "--fp32_attention", action="store_true",
        help="Compute every softmax attention (self and cross) from float32 queries, keys and values, outside "
        "autocast, while the rest trains in --mixed_precision: the original's fp32_attention=True of its fp16 "
        "recipe, against NaN losses. Without mixed precision it changes nothing.",
    )


def caption_column_problems(args: argparse.Namespace) -> list[str]:
    """A `--caption_column` of at most two names, two only in scripts that mix captions; a `--real_caption_ratio`
    given for raw data of one caption column (a cache's captions are checked when it is loaded)."""
    try:
        names = caption_column_names(args.caption_column)
    except ValueError as error:
        return [str(error)]
    mixes = hasattr(args, "real_caption_ratio")
    if len(names) == 2 and not mixes:
        return [
            f"This script trains on one caption per image: give --caption_column one column, not {args.caption_column!r}."
        ]
    raw = args.dataset_name or args.train_data_dir
    if raw and len(names) == 1 and mixes and args.real_caption_ratio is not None:
        return [
            "--real_caption_ratio mixes two captions per image: give --caption_column REAL,OTHER (e.g. text,vlm_text)."
        ]
    return []


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
    """A previous run's output dir stands for its `pipeline/` subfolder; a local folder with damaged or missing
    files is refused, naming them."""
    if path is not None and (Path(path) / "pipeline" / "model_index.json").exists():
        path = str(Path(path) / "pipeline")
    check_local_folder(path, "pipeline folder")
    return path


# Value ranges of the shared numeric flags (and of objective flags several scripts define): flag -> (test, rule).
_RANGES = {
    "learning_rate": (lambda v: v > 0, "> 0"),
    "lr_warmup_steps": (lambda v: v >= 0, ">= 0"),
    "lr_num_cycles": (lambda v: v >= 1, ">= 1"),
    "lr_min_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "num_train_epochs": (lambda v: v >= 1, ">= 1"),
    "max_grad_norm": (lambda v: v > 0, '> 0 (or "none" to turn clipping off)'),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_epsilon": (lambda v: v > 0, "> 0"),
    "adam_weight_decay": (lambda v: v >= 0, ">= 0"),
    "ema_decay": (lambda v: 0 < v < 1, "in (0, 1)"),
    "dataloader_num_workers": (lambda v: v >= 0, ">= 0"),
    "num_validation_inference_steps": (lambda v: v >= 1, ">= 1"),
    "validation_guidance_scale": (lambda v: v >= 0, ">= 0"),
    "gpu_hour_cost": (lambda v: v >= 0, ">= 0"),
    "peak_tflops": (lambda v: v > 0, "> 0"),
    "resolution": (lambda v: v >= 8, ">= 8 (pixels)"),
    "max_samples": (lambda v: v >= 1, ">= 1"),
    "min_image_size": (lambda v: v >= 1, ">= 1 (pixels)"),
    "p_std": (lambda v: v > 0, "> 0"),
    "caption_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "real_caption_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "train_batch_size": (lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "checkpointing_steps": (lambda v: v >= 1, ">= 1"),
    "validation_steps": (lambda v: v >= 1, ">= 1"),
    "max_train_steps": (lambda v: v >= 1, ">= 1"),
    "max_train_minutes": (lambda v: v > 0, "> 0"),
    "max_train_budget_usd": (lambda v: v > 0, "> 0"),
    "global_batch_size": (lambda v: v >= 1, ">= 1"),
    "checkpoints_total_limit": (lambda v: v >= 1, ">= 1 (or leave it out to keep every checkpoint)"),
}


def numeric_flag_problems(args: argparse.Namespace) -> list[str]:
    """Every float flag must be finite (inf and nan parse as floats); the flags of `_RANGES` that are set must be in
    range. A flag a script does not define, or leaves unset (None), is not checked."""
    problems = []
    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            problems.append(f"--{name} must be a finite number, got {value}.")
        elif name in _RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
            test, rule = _RANGES[name]
            if not test(value):
                problems.append(f"--{name} must be {rule}, got {value}.")
    return problems


def run_length_problems(args: argparse.Namespace) -> list[str]:
    """At most one of --max_train_steps and the budget flags sets the length; dollars need a price to be minutes."""
    given = [f"--{flag}" for flag in ("max_train_steps", *BUDGET_FLAGS) if getattr(args, flag) is not None]
    problems = []
    if len(given) > 1:
        problems.append(
            "Give one of --max_train_steps, --max_train_minutes and --max_train_budget_usd (it sets the run's "
            f"length), not {' and '.join(given)}."
        )
    if args.max_train_budget_usd is not None and not args.gpu_hour_cost > 0:
        problems.append("--max_train_budget_usd needs --gpu_hour_cost (dollars per device-hour, > 0) to be minutes.")
    return problems


def check_training_args(args: argparse.Namespace, script_problems: list[str] = ()) -> None:
    """Refuse inconsistent flags before anything is built, listing every problem (the shared flags' and the
    calling script's own `script_problems`) in one message that says what to change."""
    errors = numeric_flag_problems(args)
    raw_sources = [flag for flag in ("dataset_name", "train_data_dir") if getattr(args, flag)]
    if not args.precomputed_dataset and not raw_sources:
        errors.append(
            "Give the data: --dataset_name (Hub id or local dataset) or --train_data_dir (image folder with "
            "metadata.jsonl), or --precomputed_dataset (caches from examples/precompute_embeddings.py)."
        )
    if len(raw_sources) == 2 or (raw_sources and args.precomputed_dataset):
        errors.append("Give one of --dataset_name, --train_data_dir and --precomputed_dataset.")
    if args.train_data_dir and not Path(args.train_data_dir).is_dir():
        errors.append(f"--train_data_dir {args.train_data_dir} is not a folder.")
    probabilities = args.precomputed_dataset_probabilities
    if probabilities is not None:
        if args.precomputed_dataset and len(probabilities) != len(args.precomputed_dataset):
            errors.append("Give one --precomputed_dataset_probabilities value per --precomputed_dataset.")
        elif any(p < 0 for p in probabilities) or abs(sum(probabilities) - 1) > 1e-6:
            errors.append(f"--precomputed_dataset_probabilities must be >= 0 and sum to 1, got {probabilities}.")
    for path in args.precomputed_dataset or []:
        if not Path(path).is_dir():
            errors.append(f"--precomputed_dataset {path} is not a folder.")
    errors += run_length_problems(args)
    if args.global_batch_size is not None and args.gradient_accumulation_steps != 1:
        errors.append("Give --global_batch_size or --gradient_accumulation_steps, not both.")
    if args.resume_optimizer_state and not Path(str(args.pretrained_model_name_or_path), "pipeline").is_dir():
        errors.append("--resume_optimizer_state needs --init_from to be a previous run's --output_dir (its checkpoints).")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        errors.append(f'--resume_from_checkpoint {args.resume_from_checkpoint} is not a folder (or use "latest").')
    errors += optimizer_problems(args) + caption_column_problems(args)
    errors += script_problems
    if errors:
        raise SystemExit("Invalid arguments:\n  " + "\n  ".join(errors))
