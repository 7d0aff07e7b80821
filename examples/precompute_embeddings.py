#!/usr/bin/env python
"""Encode an image-caption dataset once into VAE latents and caption embeddings for training.

    python examples/precompute_embeddings.py --pretrained_model_name_or_path PIPELINE \\
        --dataset_name user/data --caption_column text --resolutions 256 512 --output_dir cache/

PIPELINE is any pipeline folder of this package (MicroDiT, PixArt-Sigma KV, LiT): its VAE (or the one given with
--vae) and text encoder are used exactly as at sampling time; its transformer is not loaded. For PixArt-Sigma's
multi-aspect training, --aspect_ratio_buckets 512 encodes each image at its closest 512-px aspect-ratio bucket:

    python examples/precompute_embeddings.py --pretrained_model_name_or_path PIPELINE \\
        --dataset_name user/data --aspect_ratio_buckets 512 --output_dir cache/

For large datasets, `accelerate launch examples/precompute_embeddings.py ...` splits the shards across processes
(each writes its own; --mixed_precision bf16 runs the encoders in bf16); the result is one cache.

The cache is a folder of parquet shards (one `datasets` dataset) plus precompute.json with counts. Rerunning the
same command after an interruption continues where it stopped, and re-encodes shards that are missing, damaged or
whose source rows changed. Rows with unreadable images, no caption, or (--min_image_size) small images are skipped
and counted.
"""

import argparse
import json
import os

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DiffusionPipeline

import diffusers_microdit  # noqa: F401  (registers the package's classes with diffusers)
from diffusers_microdit.pipelines.pipeline_pixart_sigma_family import ASPECT_RATIO_BINS
from diffusers_microdit.training.args import (
    add_image_caption_source_args,
    image_preparation,
    numeric_flag_problems,
    resolve_pipeline_path,
)
from diffusers_microdit.training.precompute import precompute_embeddings, write_cache_info
from diffusers_microdit.training.sources import load_image_caption_source


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="Pipeline with the VAE and text encoder.")
    parser.add_argument("--revision", default=None)
    add_image_caption_source_args(parser)
    parser.add_argument("--streaming", action="store_true", help="Stream the source (large Hub datasets).")
    parser.add_argument(
        "--resolutions", type=int, nargs="+", default=None,
        help="Square image sizes to encode, in px (default: 256, or none when --aspect_ratio_buckets is given).",
    )
    parser.add_argument(
        "--aspect_ratio_buckets", type=int, nargs="+", default=[], choices=sorted(ASPECT_RATIO_BINS),
        help="Base sizes of diffusers' PixArt aspect-ratio buckets: each image is resized and centre-cropped to its "
        "closest bucket of that size (train with --aspect_ratio_buckets in train_pixart_kv.py).",
    )
    parser.add_argument(
        "--vae", default=None,
        help="Encode with this diffusers AutoencoderKL (folder or Hub id) instead of the pipeline's: the VAE swap of "
        "PixArt-Sigma's weak-to-strong training; train with the same --vae.",
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--shard_size", type=int, default=1000, help="Rows per parquet shard (unit of resuming).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="Seeds the VAE posterior samples, crops and flips.")
    parser.add_argument(
        "--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
        help="Run the VAE and text encoder in this precision (T5-XXL is 19 GB in fp32); the cache stores float16.",
    )
    args = parser.parse_args(argv)
    if args.resolutions is None:
        args.resolutions = [] if args.aspect_ratio_buckets else [256]
    errors = numeric_flag_problems(args)
    if (args.dataset_name is None) == (args.train_data_dir is None):
        errors.append("Give exactly one of --dataset_name and --train_data_dir.")
    for name in ("shard_size", "batch_size"):
        if getattr(args, name) < 1:
            errors.append(f"--{name} must be >= 1.")
    if any(r < 8 for r in args.resolutions):
        errors.append(f"--resolutions must be image sizes in pixels, got {args.resolutions}.")
    if errors:
        raise SystemExit("Invalid arguments:\n  " + "\n  ".join(errors))
    args.pretrained_model_name_or_path = resolve_pipeline_path(args.pretrained_model_name_or_path)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator()  # `accelerate launch` processes split the shards; one process is the plain case
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    swapped_vae = {} if args.vae is None else {"vae": AutoencoderKL.from_pretrained(args.vae)}
    pipeline = DiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, transformer=None, **swapped_vae
    )
    pipeline.vae.to(accelerator.device, dtype)
    pipeline.text_encoder.to(accelerator.device, dtype)
    factor = pipeline.vae_scale_factor
    if any(r % factor for r in args.resolutions):
        raise SystemExit(f"--resolutions must be multiples of the VAE's downsampling factor {factor}.")
    source = load_image_caption_source(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.dataset_split, args.streaming,
        args.cache_dir,
    )
    source_name = args.dataset_name or args.train_data_dir
    counts = precompute_embeddings(
        pipeline, source, args.output_dir, args.resolutions, args.image_column, args.caption_column,
        args.shard_size, args.batch_size, args.max_samples, args.seed, args.aspect_ratio_buckets,
        source_name=source_name, images=image_preparation(args),
        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
    )
    if accelerator.num_processes == 1:
        info = counts
    else:
        print(f"process {accelerator.process_index}: {json.dumps(counts)}", flush=True)
        accelerator.wait_for_everyone()
        info = write_cache_info(args.output_dir, args.resolutions, args.aspect_ratio_buckets, source_name) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(json.dumps(info, indent=2))
        print(f"Cache in {os.path.abspath(args.output_dir)}: train with --precomputed_dataset {args.output_dir}")
    return info


if __name__ == "__main__":
    main()
