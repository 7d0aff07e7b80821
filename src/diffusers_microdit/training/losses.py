"""Diffusion training objectives (EDM for MicroDiT), written on top of the schedulers' preconditioning."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import EDMEulerScheduler

from ..models.transformer_microdit import MicroDiTTransformer2DModel


def sample_edm_sigmas(
    batch_size: int, p_mean: float, p_std: float, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Log-normal training noise levels `exp(N(0, 1) * p_std + p_mean)`, shape (B, 1, 1, 1).

    MicroDiT uses (p_mean, p_std) = (-0.6, 1.2) for its 256-px stages and (0, 0.6) at 512 px.
    """
    return (torch.randn(batch_size, 1, 1, 1, generator=generator, device=device) * p_std + p_mean).exp()


def edm_loss(
    transformer: MicroDiTTransformer2DModel,
    scheduler: EDMEulerScheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    keep_ids: torch.Tensor | None = None,
    masking: str = "deferred",
) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM loss `w(sigma) * (D(x0 + sigma * n, sigma) - x0)^2` with `w = (sigma^2 + sd^2) / (sigma * sd)^2`.

    `D` is the transformer preconditioned by the scheduler (any diffusers EDM scheduler; its `sigma_data` is used),
    exactly as at sampling time. With `keep_ids` (deferred or naive masking, see the model's `masking`) the
    per-pixel loss is averaged per patch and then over each sample's kept patches only; removed patches contribute
    nothing. `transformer` may be wrapped (DDP, FSDP): only its forward is used. Returns the batch mean and the
    per-sample losses (B,).
    """
    sigma_data = scheduler.config.sigma_data
    noisy = latents + noise * sigmas
    output = transformer(
        scheduler.precondition_inputs(noisy, sigmas),
        scheduler.precondition_noise(sigmas.flatten()),
        encoder_hidden_states,
        keep_ids=keep_ids,
        masking=masking,
    )
    denoised = scheduler.precondition_outputs(noisy, output.sample, sigmas)
    weight = (sigmas**2 + sigma_data**2) / (sigmas * sigma_data) ** 2
    pixel_loss = weight * (denoised - latents) ** 2
    if keep_ids is None:
        per_sample = pixel_loss.flatten(1).mean(dim=1)
    else:
        patch_size = math.isqrt(latents.shape[-2] * latents.shape[-1] // output.mask.shape[1])
        patch_loss = F.avg_pool2d(pixel_loss.mean(dim=1), patch_size).flatten(1)  # (B, T), row-major = token order
        kept = 1.0 - output.mask
        per_sample = (patch_loss * kept).sum(dim=1) / kept.sum(dim=1)
    return per_sample.mean(), per_sample
