"""A small latent space for small images: train a diffusers `AutoencoderTiny` from scratch.

diffusers ships autoencoder classes but no routine to train one; the embedded shapes task needs a latent space
that fits a CPU (pretrained VAEs are Hub downloads and far too big for 32-px images), so this is the minimal loop:
pixel MSE (+ L1, which keeps small shapes' edges sharp), AdamW with a one-cycle schedule, then the latent scale is
calibrated so the diffusion model sees latents of a chosen standard deviation (EDM's `sigma_data`).
`examples/train_shapes_autoencoder.py` uses it to produce the autoencoder shipped in the package.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import AutoencoderTiny

# The shapes task's autoencoder, trained by examples/train_shapes_autoencoder.py (see training_report.json there).
SHAPES_AUTOENCODER_DIR = Path(__file__).resolve().parent.parent / "data" / "shapes_autoencoder"


def load_shapes_autoencoder() -> AutoencoderTiny:
    """The package's pretrained 32-px shapes autoencoder (8x8x8 latents, scaled to std 0.5)."""
    return AutoencoderTiny.from_pretrained(SHAPES_AUTOENCODER_DIR).eval()


def tiny_autoencoder(latent_channels: int = 8, width: int = 48, downsample_blocks: int = 2) -> AutoencoderTiny:
    """An `AutoencoderTiny` that downsamples by 2**downsample_blocks (0.34M parameters with the defaults).

    AutoencoderTiny downsamples between consecutive blocks; the full-resolution encoder block and the
    lowest-resolution decoder block are left empty, which costs nothing in reconstruction quality here and
    halves the encode/decode time at full resolution.
    """
    return AutoencoderTiny(
        encoder_block_out_channels=(width,) * (downsample_blocks + 1),
        decoder_block_out_channels=(width,) * (downsample_blocks + 1),
        num_encoder_blocks=(0,) + (1,) * downsample_blocks,
        num_decoder_blocks=(1,) * downsample_blocks + (0,),
        latent_channels=latent_channels,
        scaling_factor=1.0,
    )


def train_autoencoder(
    vae: AutoencoderTiny,
    pixels: torch.Tensor,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    l1_weight: float = 0.5,
    seed: int = 0,
    log_every: int = 0,
) -> list[float]:
    """Fit `vae` to `pixels` (N, 3, H, W) in [-1, 1] by MSE + `l1_weight` * L1; returns the per-step MSEs."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.05)
    vae.train()
    losses = []
    for step in range(steps):
        batch = pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator)]
        error = vae.decoder(vae.encoder(batch)) - batch
        mse = error.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        (mse + l1_weight * error.abs().mean()).backward()
        optimizer.step()
        schedule.step()
        losses.append(mse.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"autoencoder step {step + 1}/{steps}: mse {mse.item():.5f} ({psnr_from_mse(mse.item()):.1f} dB)")
    return losses


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def calibrate_latent_scale(vae: AutoencoderTiny, pixels: torch.Tensor, target_std: float) -> float:
    """Set `vae.config.scaling_factor` so that encoded latents have standard deviation `target_std`."""
    vae.eval()
    latents = torch.cat([vae.encoder(chunk) for chunk in pixels.split(256)])
    scale = target_std / latents.std().item()
    vae.register_to_config(scaling_factor=scale)
    return scale
