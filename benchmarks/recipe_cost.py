#!/usr/bin/env python
"""What the paper's MicroDiT recipe costs, from the cost meter's counted FLOPs: for each stage of
examples/recipes/microdit_paper.json, the training FLOPs per image (forward + backward of MicroDiT_XL_2 through the
stage's own objective, counted by `cost.flop_counter` exactly as the trainer counts a run's first step), the images it
trains on (steps x global batch), and the projected time and dollars on 8 GPUs at an assumed MFU.

    python benchmarks/recipe_cost.py [--mfu 0.4] [--gpu_peak_tflops 989] [--gpu_hour_cost 3.79]

The model runs on the meta device (shapes only, no memory, seconds), so this works on any machine. Defaults: H100
SXM dense bf16 peak, and the GPU-hour price that makes the paper's 2.6 days on 8 H100s cost its $1,890.
"""

import argparse
import json
from pathlib import Path

import torch

from diffusers_microdit import EDMHeunScheduler, MicroDiTTransformer2DModel
from diffusers_microdit.training.cost import flop_counter
from diffusers_microdit.training.losses import microdit_objective
from diffusers_microdit.training.randomness import BatchRandomness

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "recipes" / "microdit_paper.json"
LATENT_CHANNELS, VAE_FACTOR, CAPTION_TOKENS, CAPTION_WIDTH = 4, 8, 77, 1024  # SDXL VAE, OpenCLIP ViT-H text tower


def flops_per_image(flags: dict, batch: int = 2) -> float:
    """Training FLOPs per image of one stage: its resolution, mask ratio and masking, on the meta device."""
    size = flags["--resolution"] // VAE_FACTOR
    with torch.device("meta"):
        model = MicroDiTTransformer2DModel.from_preset("MicroDiT_XL_2", sample_size=size)
    objective = microdit_objective(
        EDMHeunScheduler(), flags["--mask_ratio"], flags["--masking"], flags["--p_mean"], flags["--p_std"],
        flags["--caption_dropout"],
    )
    batch_data = {
        "latents": torch.empty(batch, LATENT_CHANNELS, size, size, device="meta"),
        "prompt_embeds": torch.empty(batch, CAPTION_TOKENS, CAPTION_WIDTH, device="meta"),
    }
    with flop_counter() as counter:
        objective(model, batch_data, BatchRandomness(0, 0, 0, 1, batch, torch.device("meta"))).backward()
    return counter.get_total_flops() / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mfu", type=float, default=0.4, help="Assumed model FLOPs utilisation.")
    parser.add_argument("--gpu_peak_tflops", type=float, default=989.0, help="Per-GPU peak (H100 SXM dense bf16).")
    parser.add_argument("--num_gpus", type=int, default=8)
    parser.add_argument("--gpu_hour_cost", type=float, default=1890 / (2.6 * 24 * 8), help="Dollars per GPU-hour.")
    args = parser.parse_args()
    recipe = json.loads(RECIPE.read_text())
    throughput = args.num_gpus * args.gpu_peak_tflops * 1e12 * args.mfu
    rows, total_seconds = [], 0.0
    for stage in recipe["stages"]:
        flags = {**recipe["common"], **stage["args"]}
        per_image = flops_per_image(flags)
        images = flags["--max_train_steps"] * flags["--global_batch_size"]
        seconds = per_image * images / throughput
        total_seconds += seconds
        rows.append((stage["name"], per_image, images, seconds))
    print(f"{args.num_gpus} GPUs x {args.gpu_peak_tflops:g} TFLOP/s at MFU {args.mfu:g}, ${args.gpu_hour_cost:.2f}/GPU-h")
    print(f"{'stage':24s} {'GFLOP/img':>10s} {'images':>12s} {'hours':>7s} {'share':>6s} {'dollars':>8s}")
    for name, per_image, images, seconds in rows:
        dollars = seconds / 3600 * args.num_gpus * args.gpu_hour_cost
        print(f"{name:24s} {per_image / 1e9:10.1f} {images:12,d} {seconds / 3600:7.1f} {seconds / total_seconds:6.1%} "
              f"{dollars:8.0f}")
    hours = total_seconds / 3600
    print(f"{'total':24s} {'':10s} {'':12s} {hours:7.1f} {'':6s} {hours * args.num_gpus * args.gpu_hour_cost:8.0f}"
          f"   ({hours / 24:.2f} days; the paper: 2.6 days, $1,890, 56 % / 44 % at 256 / 512 px)")


if __name__ == "__main__":
    main()
