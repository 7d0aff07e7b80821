"""A small latent space for small images: train a diffusers `AutoencoderTiny` from scratch.

diffusers ships autoencoder classes but no routine to train one; the embedded shapes task needs a latent space
that fits a CPU (pretrained VAEs are Hub downloads and far too big for 32-px images), so this is the minimal loop:
pixel MSE, AdamW with a one-cycle schedule, then the latent scale is calibrated so the diffusion model sees latents
of a chosen standard deviation (EDM's `sigma_data`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny


def tiny_autoencoder(latent_channels: int = 4, width: int = 48, downsample_blocks: int = 2) -> AutoencoderTiny:
    """An `AutoencoderTiny` that downsamples by 2**downsample_blocks with about 0.2M parameters."""
    blocks = downsample_blocks + 1  # AutoencoderTiny downsamples between consecutive blocks
    return AutoencoderTiny(
        encoder_block_out_channels=(width,) * blocks,
        decoder_block_out_channels=(width,) * blocks,
        num_encoder_blocks=(1,) * blocks,
        num_decoder_blocks=(1,) * blocks,
        latent_channels=latent_channels,
        scaling_factor=1.0,
    )


def train_autoencoder(
    vae: AutoencoderTiny,
    pixels: torch.Tensor,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    seed: int = 0,
    log_every: int = 0,
) -> list[float]:
    """Fit `vae` to `pixels` (N, 3, H, W) in [-1, 1] by reconstruction MSE; returns the per-step losses."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.05)
    vae.train()
    losses = []
    for step in range(steps):
        batch = pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator)]
        loss = F.mse_loss(vae.decoder(vae.encoder(batch)), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"autoencoder step {step + 1}/{steps}: mse {loss.item():.5f} ({psnr_from_mse(loss.item()):.1f} dB)")
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
