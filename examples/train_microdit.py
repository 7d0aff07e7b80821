#!/usr/bin/env python
"""Train MicroDiT with Accelerate: deferred-masking pretraining, unmasked finetuning, progressive resolution.

The paper's recipe as chained runs (each starts from the previous run's output with --init_from):

    accelerate launch examples/train_microdit.py --init_from BASE --transformer_config MicroDiT_XL_2 \\
        --precomputed_dataset cache/ --resolution 256 --mask_ratio 0.75 --output_dir stage1
    accelerate launch examples/train_microdit.py --init_from stage1 --precomputed_dataset cache/ \\
        --resolution 256 --mask_ratio 0 --lr_scheduler constant --learning_rate 8e-5 --output_dir stage2
    accelerate launch examples/train_microdit.py --init_from stage2 --precomputed_dataset cache/ \\
        --resolution 512 --mask_ratio 0.75 --p_mean 0 --p_std 0.6 --max_grad_norm 0.5 ... --output_dir stage3

BASE is a MicroDiT pipeline folder (VAE, text encoder, tokenizer, scheduler; its transformer is replaced by a new
one when --transformer_config is given). Data: an image-caption dataset (--dataset_name: Hub id, `save_to_disk`
folder, parquet/imagefolder; or --train_data_dir: images + metadata.jsonl), encoded once into a cache under
--output_dir/cache, or caches written by examples/precompute_embeddings.py (--precomputed_dataset).
"""

import argparse
import json
from pathlib import Path

from diffusers import DiffusionPipeline

import diffusers_microdit  # noqa: F401  (registers the package's classes with diffusers)
from diffusers_microdit import MicroDiTPipeline, MicroDiTTransformer2DModel
from diffusers_microdit.models.transformer_microdit import MICRODIT_PRESETS
from diffusers_microdit.pipelines.pipeline_microdit import vae_scale_factor_of
from diffusers_microdit.training.args import add_training_args, check_training_args, resolve_pipeline_path
from diffusers_microdit.training.data import cached_resolutions, load_training_data
from diffusers_microdit.training.losses import microdit_objective
from diffusers_microdit.training.precompute import training_caches
from diffusers_microdit.training.trainer import DiffusionTrainer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, learning_rate=2.4e-4, weight_decay=0.1)  # the paper's AdamW
    microdit = parser.add_argument_group("MicroDiT")
    microdit.add_argument(
        "--transformer_config", default=None,
        help=f"Train a new transformer from scratch: a preset ({', '.join(MICRODIT_PRESETS)}) or a JSON file of "
        "MicroDiTTransformer2DModel arguments. Without it the --init_from transformer is trained further.",
    )
    microdit.add_argument("--mask_ratio", type=float, default=0.75, help="0.75 to pretrain, 0 to finetune.")
    microdit.add_argument(
        "--masking", default="deferred", choices=["deferred", "naive", "none"],
        help="deferred: drop patches after the patch mixer (the paper); naive: before it; none: no masking.",
    )
    microdit.add_argument("--p_mean", type=float, default=-0.6, help="EDM log-sigma mean (0 at 512 px).")
    microdit.add_argument("--p_std", type=float, default=1.2, help="EDM log-sigma std (0.6 at 512 px).")
    microdit.add_argument("--caption_dropout", type=float, default=0.1, help="Share of all-zero captions (CFG).")
    parser.set_defaults(lr_scheduler="cosine", max_grad_norm=0.25, validation_guidance_scale=5.0)
    args = parser.parse_args(argv)

    errors = []
    if args.pretrained_model_name_or_path is None:
        errors.append("--init_from (or --pretrained_model_name_or_path) is required: a MicroDiT pipeline folder.")
    if not 0.0 <= args.mask_ratio < 1.0:
        errors.append(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}.")
    config = args.transformer_config
    if config is not None and config not in MICRODIT_PRESETS and not Path(config).is_file():
        errors.append(f"--transformer_config {config} is neither a preset ({sorted(MICRODIT_PRESETS)}) nor a file.")
    check_training_args(args, errors)
    args.pretrained_model_name_or_path = resolve_pipeline_path(args.pretrained_model_name_or_path)
    if args.resolution is None and args.transformer_config is not None:
        # A new transformer is sized for the training resolution: the one size every cache holds.
        caches = args.precomputed_dataset or []
        resolutions = sorted(set.intersection(*(set(cached_resolutions(d)) for d in caches))) if caches else []
        if len(resolutions) != 1:
            raise SystemExit(f"Pick the training size with --resolution (the caches hold {resolutions or 'none'}).")
        args.resolution = resolutions[0]
    return args


def build_transformer(args, pipeline: MicroDiTPipeline) -> MicroDiTTransformer2DModel:
    """A new transformer (--transformer_config) sized for the VAE and text encoder, or the loaded one, with its
    latent size and position interpolation moved to --resolution (if given) as the original's 256 -> 512 px stage
    does."""
    vae_factor = vae_scale_factor_of(pipeline.vae)
    if args.transformer_config is not None:
        if args.transformer_config in MICRODIT_PRESETS:
            config = dict(MICRODIT_PRESETS[args.transformer_config])
        else:
            config = json.loads(Path(args.transformer_config).read_text())
        config.setdefault("in_channels", pipeline.vae.config.latent_channels)
        config.setdefault("caption_channels", pipeline.text_encoder.config.hidden_size)
        config.setdefault("sample_size", args.resolution // vae_factor)
        return MicroDiTTransformer2DModel(**config)
    transformer = MicroDiTTransformer2DModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="transformer", revision=args.revision, variant=args.variant
    )
    if args.resolution is not None and args.resolution // vae_factor != transformer.config.sample_size:
        old, new = transformer.config.sample_size, args.resolution // vae_factor
        # Positions are index / pos_interp_scale: scaling it with the grid keeps the trained coordinate range.
        transformer.register_to_config(sample_size=new, pos_interp_scale=transformer.config.pos_interp_scale * new / old)
    return transformer


def main(argv=None) -> None:
    args = parse_args(argv)
    trainer = DiffusionTrainer(args)
    load_without_transformer = {"transformer": None} if args.transformer_config else {}
    pipeline = DiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, **load_without_transformer
    )
    if not isinstance(pipeline, MicroDiTPipeline):
        raise SystemExit(f"--init_from must be a MicroDiT pipeline, got {type(pipeline).__name__}.")
    for frozen in (pipeline.vae, pipeline.text_encoder):
        frozen.requires_grad_(False).eval()
    transformer = build_transformer(args, pipeline)
    # Without --resolution the loaded transformer's native size is trained; known only now, so kept local.
    resolution = args.resolution or transformer.config.sample_size * vae_scale_factor_of(pipeline.vae)
    scheduler = pipeline.scheduler
    num_tokens = (transformer.config.sample_size // transformer.config.patch_size) ** 2
    masking = f"{args.masking} {args.mask_ratio:.0%}" if args.mask_ratio > 0 and args.masking != "none" else "none"
    trainer.accelerator.print(f"MicroDiT at {resolution} px ({num_tokens} patches), masking: {masking}")

    cache_dirs = training_caches(args, pipeline, trainer.accelerator, resolution)
    dataset, _, _ = load_training_data(args, resolution, pipeline, transformer, cache_dirs)

    # The objective owns masking: it gets the user's --masking and --mask_ratio as given.
    compute_loss = microdit_objective(
        scheduler, args.mask_ratio, args.masking, args.p_mean, args.p_std, args.caption_dropout
    )

    def build_pipeline(model) -> MicroDiTPipeline:
        return MicroDiTPipeline(
            transformer=model, vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer,
            scheduler=scheduler, mask_caption_padding=pipeline.config.mask_caption_padding,
        )

    trainer.prepare(transformer, dataset, compute_loss)
    trainer.train(build_pipeline)
    trainer.finish(build_pipeline)


if __name__ == "__main__":
    main()
