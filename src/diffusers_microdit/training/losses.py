"""Diffusion training objectives: EDM for MicroDiT (on top of the schedulers' preconditioning), and PixArt-Σ's
DDPM epsilon MSE plus learned-range variational bound (on top of diffusers' `DDPMScheduler`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from diffusers import DDPMScheduler, EDMEulerScheduler

from ..models.transformer_microdit import MicroDiTTransformer2DModel, get_random_keep_ids
from .data import alt_caption_column


def sample_edm_sigmas(
    batch_size: int, p_mean: float, p_std: float, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Log-normal training noise levels `exp(N(0, 1) * p_std + p_mean)`, shape (B, 1, 1, 1).

    MicroDiT uses (p_mean, p_std) = (-0.6, 1.2) for its 256-px stages and (0, 0.6) at 512 px.
    """
    return (torch.randn(batch_size, 1, 1, 1, generator=generator, device=device) * p_std + p_mean).exp()


def model_config(transformer: torch.nn.Module):
    """The config of a possibly wrapped model (DDP, FSDP, DeepSpeed, `torch.compile`)."""
    return extract_model_from_parallel(transformer, keep_torch_compile=False).config


def edm_loss(
    transformer: MicroDiTTransformer2DModel,
    scheduler: EDMEulerScheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    keep_ids: torch.Tensor | None = None,
    masking: str = "deferred",
    encoder_attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM loss `w(sigma) * (D(x0 + sigma * n, sigma) - x0)^2` with `w = (sigma^2 + sd^2) / (sigma * sd)^2`.

    `D` is the transformer preconditioned by the scheduler (any diffusers EDM scheduler; its `sigma_data` is used),
    exactly as at sampling time. With `keep_ids` (deferred or naive masking, see the model's `masking`) the
    per-pixel loss is averaged per patch (the model config's `patch_size`) and then over each sample's kept patches
    only; removed patches contribute nothing. `masking` is only read with `keep_ids`. `encoder_attention_mask` (B, L)
    hides the captions' padding from the model (see its forward); `None` uses every position. `transformer` may be
    wrapped (DDP, FSDP): only its forward and config are used. Returns the batch mean and the per-sample losses (B,).
    """
    sigma_data = scheduler.config.sigma_data
    noisy = latents + noise * sigmas
    # Only the arguments in use, so models (and test doubles) without them still fit.
    model_kwargs = {} if keep_ids is None else {"keep_ids": keep_ids, "masking": masking}
    if encoder_attention_mask is not None:
        model_kwargs["encoder_attention_mask"] = encoder_attention_mask
    output = transformer(
        scheduler.precondition_inputs(noisy, sigmas),
        scheduler.precondition_noise(sigmas.flatten()),
        encoder_hidden_states,
        **model_kwargs,
    )
    denoised = scheduler.precondition_outputs(noisy, output.sample, sigmas)
    weight = (sigmas**2 + sigma_data**2) / (sigmas * sigma_data) ** 2
    pixel_loss = weight * (denoised - latents) ** 2
    if keep_ids is None:
        per_sample = pixel_loss.flatten(1).mean(dim=1)
    else:
        patch_size = model_config(transformer).patch_size
        patch_loss = F.avg_pool2d(pixel_loss.mean(dim=1), patch_size).flatten(1)  # (B, T), row-major = token order
        kept = 1.0 - output.mask
        per_sample = (patch_loss * kept).sum(dim=1) / kept.sum(dim=1)
    return per_sample.mean(), per_sample


MASKING_MODES = ("deferred", "naive", "none")


def microdit_objective(
    scheduler: EDMEulerScheduler,
    mask_ratio: float = 0.0,
    masking: str = "deferred",
    p_mean: float = -0.6,
    p_std: float = 1.2,
    caption_dropout: float = 0.1,
):
    """MicroDiT's training objective as a `compute_loss(model, batch, draws)` for `DiffusionTrainer`.

    This objective owns masking: scripts pass the user's `masking` ("deferred" drops patches after the patch mixer,
    "naive" before it, "none" never) and `mask_ratio` untouched. Per micro-batch it derives the token count from
    the latents and the model config's `patch_size`, draws the kept patches only when `mask_ratio > 0` and
    `masking != "none"`, and hands the model its masking mode with them (without them the model masks nothing).

    Per micro-batch, in the original's order: log-normal noise levels, Gaussian noise, the kept patches (when
    masking), and caption dropout to all-zero embeddings (MicroDiT's null caption for classifier-free guidance);
    everything drawn from `draws` (a `BatchRandomness`). A cache encoded by a pipeline with `mask_caption_padding`
    holds `prompt_attention_mask`; it is then passed to the model, all ones for dropped captions, as the pipeline
    does for its null caption.
    """
    if masking not in MASKING_MODES:
        raise ValueError(f"masking must be one of {MASKING_MODES}, got {masking!r}.")
    masked = mask_ratio > 0 and masking != "none"

    def compute_loss(model, batch, draws) -> torch.Tensor:
        latents = batch["latents"].to(draws.device, torch.float32)  # the original casts to float32 for the loss
        captions = batch["prompt_embeds"].to(draws.device, torch.float32)
        n = draws.global_batch
        sigmas = draws.local(sample_edm_sigmas(n, p_mean, p_std, generator=draws.generator))
        noise = draws.local(torch.randn(n, *latents.shape[1:], generator=draws.generator))
        keep_ids = None
        if masked:
            patch_size = model_config(model).patch_size
            num_tokens = (latents.shape[-2] // patch_size) * (latents.shape[-1] // patch_size)
            keep_ids = draws.local(get_random_keep_ids(n, num_tokens, mask_ratio, generator=draws.generator))
        keep_caption = draws.local(torch.rand(n, generator=draws.generator) >= caption_dropout)
        captions = captions * keep_caption.view(-1, 1, 1)
        caption_mask = batch.get("prompt_attention_mask")
        if caption_mask is not None:
            caption_mask = caption_mask.to(draws.device, torch.bool) | ~keep_caption.view(-1, 1)
        loss, _ = edm_loss(
            model, scheduler, latents, captions, sigmas, noise, keep_ids=keep_ids, masking=masking,
            encoder_attention_mask=caption_mask,
        )
        return loss

    return compute_loss


# ---------------------------------------------------------------------------------------------------------------------
# PixArt-Σ: DDPM epsilon MSE plus the learned-range variational bound (IDDPM, "Improved DDPM", Nichol & Dhariwal 2021).
#
# diffusers has the noise schedule and `add_noise` (DDPMScheduler) and uses a learned-range variance at sampling time
# (`DDPMScheduler.step`, one timestep at a time), but no training-time variational bound: no posterior KL, no decoder
# likelihood. Only that math is written here; betas and alphas_cumprod always come from the given DDPMScheduler.
# ---------------------------------------------------------------------------------------------------------------------

# PixArt-Σ passes no micro-conditions (resolution, aspect ratio), exactly as `PixArtSigmaPipeline` does.
PIXART_NO_MICRO_CONDITIONS = {"resolution": None, "aspect_ratio": None}


class LearnedSigmaLossTerms(NamedTuple):
    """Per-sample (B,) terms of the PixArt-Σ objective; the loss is `(mse + vb).mean()`."""

    mse: torch.Tensor  # mean squared error of the epsilon prediction
    vb: torch.Tensor  # variational-bound term L_t in bits per dimension (gradient reaches the variance only)


def _mean_over_dims(values: torch.Tensor) -> torch.Tensor:
    return values.flatten(1).mean(dim=1)


def _at(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`values[timesteps]` as float32 (B, 1, 1, ...) broadcastable against `like`."""
    picked = values.to(timesteps.device)[timesteps].float()
    return picked.view(-1, *([1] * (like.ndim - 1)))


def _posterior_schedule(noise_scheduler: DDPMScheduler) -> dict[str, torch.Tensor]:
    """Per-timestep coefficients of the true posterior q(x_{t-1} | x_t, x_0), in float64 from the scheduler's
    `betas`."""
    betas = noise_scheduler.betas.double()
    # Not the scheduler's float32 `alphas_cumprod`: 1 - alphas_cumprod loses ~1e-4 of relative precision at small t
    # there, which shifts the t = 0 posterior mean by 1.6e-4 (a sizeable fraction of its 1e-2 standard deviation).
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
    return {
        "coef_x0": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
        "coef_xt": (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        # The variance is 0 at t = 0; like IDDPM, use the t = 1 value there so its log stays finite.
        "log_variance_clipped": torch.cat([variance[1:2], variance[1:]]).log(),
        "log_betas": betas.log(),
        "alphas_cumprod": alphas_cumprod,
    }


def posterior_mean_and_log_variance(
    noise_scheduler: DDPMScheduler, latents: torch.Tensor, noisy_latents: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (clipped) log-variance of the true posterior q(x_{t-1} | x_t, x_0) at `timesteps` (B,)."""
    schedule = _posterior_schedule(noise_scheduler)
    coef_x0, coef_xt = (_at(schedule[name], timesteps, latents) for name in ("coef_x0", "coef_xt"))
    mean = coef_x0 * latents + coef_xt * noisy_latents
    return mean, _at(schedule["log_variance_clipped"], timesteps, latents).expand_as(latents)


def learned_range_log_variance(
    noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, variance_values: torch.Tensor
) -> torch.Tensor:
    """The model's log-variance: `variance_values` in [-1, 1] mapped to frac in [0, 1] interpolates between the
    clipped posterior log-variance (frac 0) and log(beta_t) (frac 1), per element."""
    schedule = _posterior_schedule(noise_scheduler)
    frac = (variance_values + 1) / 2
    max_log = _at(schedule["log_betas"], timesteps, variance_values)
    min_log = _at(schedule["log_variance_clipped"], timesteps, variance_values)
    return frac * max_log + (1 - frac) * min_log


def gaussian_kl(mean1, log_variance1, mean2, log_variance2) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(log_variance1)) || N(mean2, exp(log_variance2))) in nats."""
    return 0.5 * (
        log_variance2 - log_variance1 - 1.0 + (log_variance1 - log_variance2).exp()
        + (mean1 - mean2) ** 2 * (-log_variance2).exp()
    )


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation IDDPM (hence PixArt) uses; kept so the t = 0 term matches their objective.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability (nats) of `x` in [-1, 1] discretised to 256 levels under N(mean, exp(log_scale)^2):
    the mass of the bin [x - 1/255, x + 1/255], with open-ended bins at the edges (x < -0.999 or x > 0.999)."""
    inv_std = (-log_scale).exp()
    cdf_upper = _approx_standard_normal_cdf(inv_std * (x - mean + 1.0 / 255.0))
    cdf_lower = _approx_standard_normal_cdf(inv_std * (x - mean - 1.0 / 255.0))
    log_cdf_upper = cdf_upper.clamp(min=1e-12).log()
    log_one_minus_cdf_lower = (1.0 - cdf_lower).clamp(min=1e-12).log()
    log_bin_mass = (cdf_upper - cdf_lower).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_bin_mass))


def variational_bound_bits(
    noise_scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    noise_pred: torch.Tensor,
    variance_values: torch.Tensor,
) -> torch.Tensor:
    """The variational-bound term L_t per sample (B,), in bits per dimension, of the model's Gaussian
    p(x_{t-1} | x_t) with mean from `noise_pred` and learned-range variance from `variance_values`:
    KL(q(x_{t-1} | x_t, x_0) || p) for t > 0 and the decoder's discretised negative log-likelihood of x_0 at t = 0.

    Gradients flow into both inputs; PixArt-Σ's objective passes a detached `noise_pred` (see
    `learned_sigma_loss_terms`) so that this term trains the variance only.
    """
    schedule = _posterior_schedule(noise_scheduler)
    alphas_cumprod = _at(schedule["alphas_cumprod"], timesteps, latents)
    predicted_x0 = (noisy_latents - (1 - alphas_cumprod).sqrt() * noise_pred) / alphas_cumprod.sqrt()
    model_mean, _ = posterior_mean_and_log_variance(noise_scheduler, predicted_x0, noisy_latents, timesteps)
    model_log_variance = learned_range_log_variance(noise_scheduler, timesteps, variance_values)
    true_mean, true_log_variance = posterior_mean_and_log_variance(noise_scheduler, latents, noisy_latents, timesteps)

    kl = _mean_over_dims(gaussian_kl(true_mean, true_log_variance, model_mean, model_log_variance))
    decoder_nll = -_mean_over_dims(discretized_gaussian_log_likelihood(latents, model_mean, 0.5 * model_log_variance))
    return torch.where(timesteps == 0, decoder_nll, kl) / math.log(2.0)


def learned_sigma_loss_terms(
    noise_scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noisy_latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    noise_pred: torch.Tensor,
    variance_values: torch.Tensor,
) -> LearnedSigmaLossTerms:
    """PixArt-Σ's per-sample terms: epsilon MSE, and the variational bound with a stop-gradient on the predicted
    mean (the bound trains only the variance channels, the MSE only the epsilon channels). Computed in float32."""
    noise_pred, variance_values = noise_pred.float(), variance_values.float()
    mse = _mean_over_dims((noise.float() - noise_pred) ** 2)
    vb = variational_bound_bits(
        noise_scheduler, latents.float(), noisy_latents.float(), timesteps, noise_pred.detach(), variance_values
    )
    return LearnedSigmaLossTerms(mse=mse, vb=vb)


def predict_noise_and_variance(
    transformer: torch.nn.Module,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a learned-sigma PixArt-style transformer the way `PixArtSigmaPipeline` does (T5 states and mask, no
    micro-conditions) and split its (B, 2C, H, W) output into the epsilon prediction and the variance values
    (C channels each). `transformer` may be wrapped (DDP, FSDP): only its forward is used."""
    output = transformer(
        noisy_latents,
        encoder_hidden_states=prompt_embeds,
        encoder_attention_mask=prompt_attention_mask,
        timestep=timesteps,
        added_cond_kwargs=PIXART_NO_MICRO_CONDITIONS,
        return_dict=False,
    )[0]
    channels = noisy_latents.shape[1]
    if output.shape[1] != 2 * channels:
        raise ValueError(
            f"The transformer returns {output.shape[1]} channels for {channels} latent channels; the PixArt-Σ "
            "objective needs a learned-sigma model (out_channels = 2 * in_channels)."
        )
    return output[:, :channels], output[:, channels:]


def pixart_sigma_loss(
    transformer: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor | None,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, LearnedSigmaLossTerms]:
    """PixArt-Σ's training loss for given timesteps (B,) and noise: `mean(mse + vb)`, and the per-sample terms."""
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    noise_pred, variance_values = predict_noise_and_variance(
        transformer, noisy_latents, timesteps, prompt_embeds, prompt_attention_mask
    )
    terms = learned_sigma_loss_terms(
        noise_scheduler, latents, noisy_latents, noise, timesteps, noise_pred, variance_values
    )
    return (terms.mse + terms.vb).mean(), terms


class PixArtTrainingInputs(NamedTuple):
    """One micro-batch's inputs to `pixart_sigma_loss` / `lit_distillation_loss`, in their argument order."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor


def draw_pixart_training_inputs(
    batch: dict,
    draws,
    num_timesteps: int,
    null_embeds: torch.Tensor,
    null_mask: torch.Tensor,
    caption_dropout: float,
    real_caption_ratio: float | None = None,
) -> PixArtTrainingInputs:
    """Uniform timesteps, Gaussian noise and caption dropout (to the pipeline's unconditional caption `null_embeds`,
    `null_mask`) for a batch of the cache, all drawn for the global batch from `draws` (a `BatchRandomness`).

    With `real_caption_ratio` the batch holds two captions per sample (`data.alt_caption_column`) and each sample
    trains on its real (first) one with that probability, else on the other (PixArt-Σ's `real_prompt_ratio`);
    dropout then applies to the chosen caption."""
    latents = batch["latents"].to(draws.device, torch.float32)
    embeds = batch["prompt_embeds"].to(draws.device, torch.float32)
    mask = batch["prompt_attention_mask"].to(draws.device, torch.long)
    n = draws.global_batch
    timesteps = draws.local(torch.randint(0, num_timesteps, (n,), generator=draws.generator))
    noise = draws.local(torch.randn(n, *latents.shape[1:], generator=draws.generator))
    drop = draws.local(torch.rand(n, generator=draws.generator) < caption_dropout)
    if real_caption_ratio is not None:  # drawn last, so that one-caption runs keep their draws
        real = draws.local(torch.rand(n, generator=draws.generator) < real_caption_ratio)
        alt_embeds = batch[alt_caption_column("prompt_embeds")].to(draws.device, torch.float32)
        alt_mask = batch[alt_caption_column("prompt_attention_mask")].to(draws.device, torch.long)
        embeds = torch.where(real.view(-1, 1, 1), embeds, alt_embeds)
        mask = torch.where(real.view(-1, 1), mask, alt_mask)
    embeds = torch.where(drop.view(-1, 1, 1), null_embeds.to(draws.device), embeds)
    mask = torch.where(drop.view(-1, 1), null_mask.to(draws.device), mask)
    return PixArtTrainingInputs(latents, embeds, mask, timesteps, noise)


def pixart_objective(
    noise_scheduler: DDPMScheduler,
    null_embeds: torch.Tensor,
    null_mask: torch.Tensor,
    caption_dropout: float = 0.1,
    real_caption_ratio: float | None = None,
):
    """PixArt-Σ's training objective as a `compute_loss(model, batch, draws)` for `DiffusionTrainer`: inputs from
    `draw_pixart_training_inputs` (caption mixing with `real_caption_ratio`), then `pixart_sigma_loss` (epsilon MSE
    + variational bound)."""
    num_timesteps = noise_scheduler.config.num_train_timesteps

    def compute_loss(model, batch, draws) -> torch.Tensor:
        inputs = draw_pixart_training_inputs(
            batch, draws, num_timesteps, null_embeds, null_mask, caption_dropout, real_caption_ratio
        )
        loss, _ = pixart_sigma_loss(model, noise_scheduler, *inputs)
        return loss

    return compute_loss


# ---------------------------------------------------------------------------------------------------------------------
# LiT (arXiv 2501.12976): hybrid knowledge distillation from a PixArt-Σ teacher. PixArt-Σ's own objective plus the
# MSE between the student's and the teacher's epsilon and variance outputs at the same noisy input.
# ---------------------------------------------------------------------------------------------------------------------

# What the variance term compares: the raw variance channels, or the learned-range log-variances they map to.
KD_VARIANCE_TARGETS = ("values", "log_variance")


class LiTDistillationTerms(NamedTuple):
    """Per-sample (B,) terms of LiT's hybrid distillation loss."""

    diffusion: torch.Tensor  # PixArt-Σ's objective against the data: epsilon MSE + variational bound
    kd_noise: torch.Tensor  # MSE between the student's and the teacher's epsilon predictions
    kd_variance: torch.Tensor  # MSE between their variance outputs (see `variance_target`)


def lit_distillation_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor | None,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    lambda_noise: float = 1.0,
    lambda_variance: float = 0.05,
    variance_target: str = "values",
) -> tuple[torch.Tensor, LiTDistillationTerms]:
    """LiT's loss `mean(diffusion + lambda_noise * kd_noise + lambda_variance * kd_variance)` and its per-sample terms.

    The frozen teacher sees the student's noisy latents, timesteps and caption (its conditional prediction, no
    guidance) and runs without gradients. `kd_noise` trains the student's epsilon channels, `kd_variance` its
    variance channels. `variance_target="values"` compares the raw variance channels (LiT's "variance output", the
    scale λ2 = 0.05 is stated for); `"log_variance"` compares the learned-range log-variances, i.e. the same
    difference scaled by (log beta_t - log posterior variance_t) / 2, which is close to 0 for all but the first
    timesteps. A term with a zero weight is left out of the sum (no gradient, even if not finite) but still returned.
    """
    if variance_target not in KD_VARIANCE_TARGETS:
        raise ValueError(f"Unknown variance_target {variance_target!r}; choose one of {list(KD_VARIANCE_TARGETS)}.")
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    inputs = (noisy_latents, timesteps, prompt_embeds, prompt_attention_mask)
    noise_pred, variance_values = predict_noise_and_variance(student, *inputs)
    with torch.no_grad():
        teacher_noise_pred, teacher_variance_values = predict_noise_and_variance(teacher, *inputs)
    diffusion = learned_sigma_loss_terms(
        noise_scheduler, latents, noisy_latents, noise, timesteps, noise_pred, variance_values
    )

    def variance(values: torch.Tensor) -> torch.Tensor:
        values = values.float()
        if variance_target == "values":
            return values
        return learned_range_log_variance(noise_scheduler, timesteps, values)

    terms = LiTDistillationTerms(
        diffusion=diffusion.mse + diffusion.vb,
        kd_noise=_mean_over_dims((noise_pred.float() - teacher_noise_pred.float()) ** 2),
        kd_variance=_mean_over_dims((variance(variance_values) - variance(teacher_variance_values)) ** 2),
    )
    loss = terms.diffusion.mean()
    for weight, term in ((lambda_noise, terms.kd_noise), (lambda_variance, terms.kd_variance)):
        if weight != 0:
            loss = loss + weight * term.mean()
    return loss, terms
