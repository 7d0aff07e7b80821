#!/usr/bin/env python
"""Finetune PixArt-Sigma with Accelerate, weak to strong: KV compression, a new resolution, a new VAE.

Each weak-to-strong step of the paper is a short finetune that starts from the previous model (--init_from takes
a PixArt-Sigma pipeline folder or Hub id, or a previous run's --output_dir):

    # KV compression on the deeper half of the blocks (the released setting: 14..27 of 28, ratio 2, conv)
    accelerate launch examples/train_pixart_kv.py --init_from PixArt-alpha/PixArt-Sigma-XL-2-1024-MS \\
        --precomputed_dataset cache1024/ --aspect_ratio_buckets 1024 --kv_compress_layers deeper_half \\
        --lr_warmup_steps 500 --mixed_precision bf16 --gradient_checkpointing --output_dir sigma-kv
    # a higher resolution: sample size and position interpolation follow (interpolation_scale = resolution / 512)
    accelerate launch examples/train_pixart_kv.py --init_from sigma-512 --precomputed_dataset cache1024/ \\
        --aspect_ratio_buckets 1024 --output_dir sigma-1024
    # a new VAE: the cache must be encoded with it too (precompute_embeddings.py --vae the same VAE)
    accelerate launch examples/train_pixart_kv.py --init_from sigma-256 --vae madebyollin/sdxl-vae-fp16-fix \\
        --precomputed_dataset cache-sdxl-vae/ --output_dir sigma-256-sdxl-vae

Objective: PixArt-Sigma's IDDPM loss, epsilon MSE plus the learned-range variational bound (1000 linear betas
1e-4 -> 0.02, from the pipeline scheduler's config), with caption dropout to the pipeline's unconditional caption.
Defaults follow the Sigma configs: learning rate 2e-5, weight decay 0, constant schedule after warmup (1000 steps;
the KV config uses 500), gradient clipping at 0.01, classifier-free guidance 4.5 for validation. The optimizer is
AdamW unless --optimizer came (Sigma's CAME, betas 0.9/0.999/0.9999, eps 1e-30/1e-16; the came-pytorch package).
Sigma also scales 2e-5 by sqrt(global batch / 256); pass the scaled value with --learning_rate. The rest of Sigma's
recipe: --caption_column text,vlm_text trains each sample on its original caption with probability
--real_caption_ratio (0.5) and on the second (VLM) caption otherwise; --fp32_attention --mixed_precision fp16
computes attention in float32 as its fp32_attention=True. Data: caches of VAE latents and T5 embeddings
written by examples/precompute_embeddings.py, square (--resolution) or multi-aspect (--aspect_ratio_buckets).
"""

import argparse

from diffusers import AutoencoderKL, DiffusionPipeline, PixArtSigmaPipeline

import diffusers_microdit  # noqa: F401  (registers the package's classes with diffusers)
from diffusers_microdit import PixArtSigmaKVPipeline, PixArtSigmaKVTransformer2DModel
from diffusers_microdit.models.transformer_pixart_kv import KV_COMPRESS_SAMPLINGS, normalize_kv_compress_layers
from diffusers_microdit.pipelines.pipeline_pixart_sigma_family import ASPECT_RATIO_BINS
from diffusers_microdit.training.args import (
    add_aspect_ratio_bucket_arg,
    add_pixart_recipe_args,
    add_training_args,
    check_aspect_ratio_bucket_args,
    check_training_args,
    resolve_pipeline_path,
)
from diffusers_microdit.training.data import caption_mixing_ratio, load_training_data
from diffusers_microdit.training.losses import pixart_objective
from diffusers_microdit.training.pixart import (
    move_to_resolution,
    null_caption,
    recipe_summary,
    training_noise_scheduler,
    use_fp32_attention,
)
from diffusers_microdit.training.precompute import training_caches
from diffusers_microdit.training.trainer import DiffusionTrainer

DEEPER_HALF = "deeper_half"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, learning_rate=2e-5, weight_decay=0.0)  # PixArt-Sigma's (CAME) values
    pixart = parser.add_argument_group("PixArt-Sigma")
    pixart.add_argument(
        "--kv_compress_layers", nargs="+", default=None,
        help=f'Blocks whose self-attention compresses keys and values: indices (e.g. 14 15 ... 27) or "{DEEPER_HALF}" '
        "(the released setting). New compression modules start from the paper's average init. Without this flag the "
        "model keeps the compression it was loaded with.",
    )
    pixart.add_argument("--kv_compress_ratio", type=int, default=2, help="Token-grid downsampling per axis.")
    pixart.add_argument("--kv_compress_sampling", default="conv", choices=KV_COMPRESS_SAMPLINGS)
    add_aspect_ratio_bucket_arg(pixart)
    add_pixart_recipe_args(pixart)
    pixart.add_argument(
        "--vae", default=None,
        help="Swap in this diffusers AutoencoderKL (folder or Hub id), e.g. the SDXL VAE of Sigma's weak-to-strong "
        "step. The cached latents must come from the same VAE: precompute them with precompute_embeddings.py --vae.",
    )
    pixart.add_argument(
        "--caption_dropout", type=float, default=0.1,
        help="Share of captions replaced by the pipeline's unconditional caption (T5 embedding of the empty prompt), "
        "for classifier-free guidance.",
    )
    parser.set_defaults(
        lr_scheduler="constant_with_warmup", lr_warmup_steps=1000, max_grad_norm=0.01, validation_guidance_scale=4.5
    )
    args = parser.parse_args(argv)

    errors = []
    if args.pretrained_model_name_or_path is None:
        errors.append("--init_from (or --pretrained_model_name_or_path) is required: a PixArt-Sigma pipeline.")
    if args.kv_compress_layers is not None:
        layers = args.kv_compress_layers
        if layers == [DEEPER_HALF]:
            args.kv_compress_layers = DEEPER_HALF
        elif all(value.isdigit() for value in layers):
            args.kv_compress_layers = [int(value) for value in layers]
        else:
            errors.append(f'--kv_compress_layers takes block indices or "{DEEPER_HALF}", got {" ".join(layers)}.')
        if args.kv_compress_ratio < 2:
            errors.append(f"--kv_compress_ratio must be >= 2 to compress anything, got {args.kv_compress_ratio}.")
    errors += check_aspect_ratio_bucket_args(args)
    check_training_args(args, errors)
    args.pretrained_model_name_or_path = resolve_pipeline_path(args.pretrained_model_name_or_path)
    return args


def load_pipeline(args) -> PixArtSigmaKVPipeline:
    """The --init_from pipeline as a `PixArtSigmaKVPipeline` (a plain PixArt-Sigma transformer loads into the KV
    class unchanged), with the --vae swapped in and the VAE and text encoder frozen."""
    path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    swapped_vae = {} if args.vae is None else {"vae": AutoencoderKL.from_pretrained(args.vae)}
    base = DiffusionPipeline.from_pretrained(path, revision=revision, variant=variant, transformer=None, **swapped_vae)
    if type(base) not in (PixArtSigmaPipeline, PixArtSigmaKVPipeline):
        raise SystemExit(f"--init_from must be a PixArt-Sigma pipeline, got a {type(base).__name__}.")
    transformer = PixArtSigmaKVTransformer2DModel.from_pretrained(
        path, subfolder="transformer", revision=revision, variant=variant, **kv_compression_config(args)
    )
    if base.vae.config.latent_channels != transformer.config.in_channels:
        raise SystemExit(
            f"The VAE makes {base.vae.config.latent_channels}-channel latents but the transformer takes "
            f"{transformer.config.in_channels}: --vae must be a VAE with the same latent channels."
        )
    for frozen in (base.vae, base.text_encoder):
        frozen.requires_grad_(False).eval()
    components = {name: getattr(base, name) for name in ("tokenizer", "text_encoder", "vae", "scheduler")}
    return PixArtSigmaKVPipeline(transformer=transformer, **components)


def kv_compression_config(args) -> dict:
    """Transformer config overrides for --kv_compress_*, given to `from_pretrained`: compressed blocks the checkpoint
    already has keep their weights, new ones get the paper's average init, unlisted ones lose their compression.
    Empty without the flag (the checkpoint's own setting is kept)."""
    if args.kv_compress_layers is None:
        return {}
    num_layers = PixArtSigmaKVTransformer2DModel.load_config(
        args.pretrained_model_name_or_path, subfolder="transformer", revision=args.revision
    )["num_layers"]
    layers = range(num_layers // 2, num_layers) if args.kv_compress_layers == DEEPER_HALF else args.kv_compress_layers
    try:
        layers = normalize_kv_compress_layers(layers, num_layers)
    except ValueError as error:
        raise SystemExit(f"--kv_compress_layers: {error}") from None
    return {
        "kv_compress_layers": layers, "kv_compress_ratio": args.kv_compress_ratio,
        "kv_compress_sampling": args.kv_compress_sampling,
    }


def check_validation_resolution(args, resolution: int) -> None:
    """Refuse --validation_prompts at a size the validation pipeline cannot sample: its resolution binning (on by
    default) has bins only for models of the `ASPECT_RATIO_BINS` sizes."""
    if args.validation_prompts and resolution not in ASPECT_RATIO_BINS:
        raise SystemExit(
            f"Validation at {resolution} px is impossible: the pipeline's resolution binning only knows models of "
            f"{sorted(ASPECT_RATIO_BINS)} px. Drop --validation_prompts or pick one of those sizes."
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    trainer = DiffusionTrainer(args)
    pipeline = load_pipeline(args)
    transformer = pipeline.transformer
    factor = pipeline.vae_scale_factor
    native = transformer.config.sample_size * factor
    resolution = args.resolution or native  # the loaded model's size unless --resolution moves it
    if resolution % (factor * transformer.config.patch_size):
        raise SystemExit(f"--resolution must be a multiple of {factor * transformer.config.patch_size} px.")
    if resolution != native:
        move_to_resolution(transformer, resolution, factor)
    check_validation_resolution(args, resolution)
    noise_scheduler = training_noise_scheduler(pipeline)

    cache_dirs = training_caches(args, pipeline, trainer.accelerator, resolution)
    dataset, collate_fn, batch_sampler = load_training_data(args, resolution, pipeline, transformer, cache_dirs)
    args.real_caption_ratio = caption_mixing_ratio(dataset, args.real_caption_ratio)
    if args.fp32_attention:
        use_fp32_attention(transformer)
    first_row = next(iter(dataset))
    null_embeds, null_mask = null_caption(pipeline, first_row["prompt_embeds"].shape[0])
    kv = transformer.kv_compressed_layers
    trainer.accelerator.print(
        f"PixArt-Sigma at {resolution} px"
        + (f" (aspect-ratio buckets, {len(batch_sampler)} batches per epoch)" if batch_sampler else "")
        + (f", KV compression x{transformer.config.kv_compress_ratio} in blocks {kv}" if kv else ", no KV compression")
    )
    trainer.accelerator.print(recipe_summary(args))

    def build_pipeline(model) -> PixArtSigmaKVPipeline:
        if resolution >= 2048:
            pipeline.vae.enable_tiling()  # 2K/4K validation images decode in tiles (the latents are already cached)
        return PixArtSigmaKVPipeline(
            transformer=model, vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer,
            scheduler=pipeline.scheduler,
        )

    compute_loss = pixart_objective(
        noise_scheduler, null_embeds, null_mask, args.caption_dropout, args.real_caption_ratio
    )
    trainer.prepare(transformer, dataset, compute_loss, collate_fn, batch_sampler)
    trainer.train(build_pipeline)
    trainer.finish(build_pipeline)


if __name__ == "__main__":
    main()
