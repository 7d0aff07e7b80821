"""Argument checks every pipeline family of the package shares (MicroDiT, PixArt-Σ KV, LiT), so a bad argument fails
up front with a message that says what to pass instead of deep inside torch or a scheduler, and a NaN never comes
out as an image."""

from __future__ import annotations

import math
import numbers
import reprlib

import numpy as np
import torch


def is_text(value) -> bool:
    """A prompt as the pipelines take it: a string or a non-empty list of strings."""
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, str) for v in value)
    return isinstance(value, str)


def check_sampling_inputs(
    prompt,
    negative_prompt,
    prompt_embeds,
    negative_prompt_embeds,
    latents,
    num_images_per_prompt,
    guidance_scale,
    generator,
    output_type,
    timesteps,
    sigmas,
) -> int:
    """The argument checks every pipeline family of the package shares; returns the prompt batch size. The caller
    has already made sure that exactly one of `prompt` and `prompt_embeds` is given."""
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if text is not None and not is_text(text):
            raise ValueError(f"`{name}` must be a string or a non-empty list of strings, got {reprlib.repr(text)}.")
    for name, tensor in (
        ("prompt_embeds", prompt_embeds),
        ("negative_prompt_embeds", negative_prompt_embeds),
        ("latents", latents),
    ):
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}.")
        # NaN/inf inputs run through the whole loop and come out as a NaN image.
        if tensor is not None and not torch.isfinite(tensor).all():
            raise ValueError(
                f"`{name}` holds NaN or inf values, which would give a NaN image; pass finite values (a float16 "
                "overflow where they were computed is a common cause)."
            )
    batch_size = len(prompt) if isinstance(prompt, list) else 1 if prompt is not None else prompt_embeds.shape[0]
    if isinstance(negative_prompt, list) and len(negative_prompt) != batch_size:
        raise ValueError(
            f"`negative_prompt` has {len(negative_prompt)} entries but the batch has {batch_size} prompts; pass one "
            "per prompt, or a single string for all."
        )
    # NaN fails `> 1` and would silently turn guidance off; inf gives a NaN image.
    if not isinstance(guidance_scale, numbers.Real) or not math.isfinite(guidance_scale):
        raise ValueError(
            f"`guidance_scale` must be a finite number (<= 1 turns guidance off), got {guidance_scale!r}."
        )
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"`num_images_per_prompt` must be an integer >= 1, got {num_images_per_prompt!r}.")
    generators = generator if isinstance(generator, list) else [] if generator is None else [generator]
    if not all(isinstance(g, torch.Generator) for g in generators):
        raise TypeError(
            f"`generator` must be a torch.Generator or a list of them (one per image), got {reprlib.repr(generator)}; "
            "for a seed, pass generator=torch.Generator().manual_seed(seed)."
        )
    num_images = batch_size * num_images_per_prompt
    if isinstance(generator, list) and len(generator) != num_images:
        raise ValueError(
            f"Got {len(generator)} generators for {num_images} images ({batch_size} prompts x num_images_per_prompt="
            f"{num_images_per_prompt}); pass one per image, or a single torch.Generator."
        )
    if output_type not in ("pil", "np", "pt", "latent"):
        raise ValueError(f"`output_type` must be one of 'pil', 'np', 'pt', 'latent', got {output_type!r}.")
    for name, schedule in (("timesteps", timesteps), ("sigmas", sigmas)):
        if schedule is None:
            continue
        values = schedule.tolist() if isinstance(schedule, (np.ndarray, torch.Tensor)) else schedule
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, numbers.Real) for v in values):
            raise TypeError(f"`{name}` must be a list (or 1-D array) of numbers, got {reprlib.repr(schedule)}.")
        if not values or not all(math.isfinite(v) for v in values):
            raise ValueError(f"`{name}` needs at least one value, all finite, got {reprlib.repr(schedule)}.")
    return batch_size


def check_finite_latents(latents: torch.Tensor) -> None:
    """The last guard before decoding: a NaN in the transformer spreads to every pixel."""
    if not torch.isfinite(latents).all():
        raise RuntimeError(
            "The denoising loop produced NaN or inf latents, so the image would be NaN. The transformer's weights may "
            "be corrupt (check them with torch.isfinite), or it overflowed in float16: run it in torch.float32 or "
            "torch.bfloat16."
        )


def check_latents_shape(latents, num_images: int, channels: int, height: int, width: int, vae_scale_factor: int) -> None:
    """User `latents` must be the noise of `num_images` images of `height` x `width` px."""
    expected = (num_images, channels, height // vae_scale_factor, width // vae_scale_factor)
    if latents is not None and tuple(latents.shape) != expected:
        raise ValueError(
            f"`latents` must have shape {expected} for a {height}x{width} image, got {tuple(latents.shape)}."
        )
