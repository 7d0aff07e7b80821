#!/usr/bin/env python
"""Train the small latent space of the embedded shapes task (the autoencoder `make demo` uses).

A diffusers `AutoencoderTiny` (0.34M parameters, 32x32x3 pixels -> 8x8x8 latents) is fitted to procedural
shapes images by MSE + L1, its latent scale calibrated to EDM's sigma_data, and it is scored on held-out images:
PSNR and ShapesEval of the reconstructions, the ceiling for any diffusion model trained in this latent space.
The package ships the result in `diffusers_microdit/data/shapes_autoencoder/`; this script reproduces it
(about 4 minutes on 2 CPU cores):

    python examples/train_shapes_autoencoder.py --output_dir src/diffusers_microdit/data/shapes_autoencoder
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from diffusers.image_processor import VaeImageProcessor

from diffusers_microdit.data.shapes import build_shapes_dataset
from diffusers_microdit.data.shapes_eval import ShapesEval
from diffusers_microdit.training.autoencoder import (
    calibrate_latent_scale,
    psnr_from_mse,
    tiny_autoencoder,
    train_autoencoder,
)
from diffusers_microdit.training.sources import image_to_pixels


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--num_images", type=int, default=40000)
    parser.add_argument("--latent_channels", type=int, default=8)
    parser.add_argument("--width", type=int, default=48, help="Channels of every encoder/decoder block.")
    parser.add_argument("--downsample_blocks", type=int, default=2, help="Spatial downsampling is 2**this.")
    parser.add_argument("--max_train_steps", type=int, default=2000)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--l1_weight", type=float, default=0.5)
    parser.add_argument("--sigma_data", type=float, default=0.5, help="Latent std the scaling factor aims for.")
    parser.add_argument("--num_eval_images", type=int, default=700)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.resolution % 2**args.downsample_blocks:
        parser.error(f"--resolution {args.resolution} is not divisible by 2**--downsample_blocks.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(args.seed)
    start = time.time()
    # Seeds of the training and evaluation images differ from the demo's (0) so neither is seen twice.
    train = build_shapes_dataset(args.num_images, size=args.resolution, seed=args.seed + 1000)
    pixels = torch.stack([image_to_pixels(image, args.resolution) for image in train["image"]])
    vae = tiny_autoencoder(args.latent_channels, args.width, args.downsample_blocks)
    train_autoencoder(
        vae, pixels, args.max_train_steps, args.train_batch_size, args.learning_rate, args.l1_weight,
        seed=args.seed, log_every=max(1, args.max_train_steps // 10),
    )
    train_seconds = time.time() - start
    scale = calibrate_latent_scale(vae, pixels[:4000], args.sigma_data)

    held_out = build_shapes_dataset(args.num_eval_images, size=args.resolution, seed=args.seed + 2000)
    with torch.no_grad():
        originals = torch.stack([image_to_pixels(image, args.resolution) for image in held_out["image"]])
        reconstructions = vae.decoder(vae.encoder(originals)).clamp(-1, 1)
    mse_per_image = (reconstructions - originals).pow(2).flatten(1).mean(1)
    images = VaeImageProcessor().postprocess(reconstructions, output_type="pil")
    scores = ShapesEval().score(images, held_out["text"])
    report = {
        "parameters": sum(p.numel() for p in vae.parameters()),
        "scaling_factor": scale,
        "held_out_psnr_db": sum(psnr_from_mse(m) for m in mse_per_image.tolist()) / len(mse_per_image),
        "held_out_shapes_eval": scores["overall"],
        "held_out_shapes_eval_per_category": scores["per_category"],
        "train_seconds": round(train_seconds),
        "arguments": vars(args),
    }
    vae.save_pretrained(args.output_dir)
    Path(args.output_dir, "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
