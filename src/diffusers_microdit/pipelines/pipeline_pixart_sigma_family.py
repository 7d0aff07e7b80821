"""The denoising loop shared by the package's PixArt-Σ-shaped pipelines (KV-compressed PixArt-Σ and LiT).

diffusers' [`PixArtSigmaPipeline`] supplies prompt encoding (T5 with its attention mask, caption cleaning), latent
preparation and the aspect-ratio bins. Its `__call__` predates the arguments every LoRA-capable diffusers pipeline
now has, so [`PixArtSigmaFamilyPipeline`] brings its own loop: `attention_kwargs` (per-call LoRA scale),
`callback_on_step_end` with `callback_on_step_end_tensor_inputs`, `interrupt`, and input checks that know the
transformer's patch size and caption width.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import (
    ASPECT_RATIO_2048_BIN,
    PixArtSigmaPipeline,
    retrieve_timesteps,
)
from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN

from ..loaders.lora import TransformerLoraLoaderMixin
from .input_checks import check_finite_latents, check_latents_shape, check_sampling_inputs

# The package's one table of aspect-ratio bins (pipeline binning, training buckets, script checks): base size in
# pixels -> {"height/width": [height, width]}. Each size's bins are the previous size's doubled (diffusers' 2048
# table adds 7 ratios to the 33 of 256-1024), and Sana's 4096 table is exactly the 2048 one doubled, so it is reused.
ASPECT_RATIO_BINS = {
    256: ASPECT_RATIO_256_BIN,
    512: ASPECT_RATIO_512_BIN,
    1024: ASPECT_RATIO_1024_BIN,
    2048: ASPECT_RATIO_2048_BIN,
    4096: ASPECT_RATIO_4096_BIN,
}


class PixArtSigmaFamilyPipeline(PixArtSigmaPipeline, TransformerLoraLoaderMixin):
    r"""Base of [`PixArtSigmaKVPipeline`] and [`LiTPipeline`]: PixArt-Σ text-to-image sampling (T5 prompt,
    classifier-free guidance, learned-sigma output, resolution binning) in a loop of the package's own."""

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def attention_kwargs(self) -> dict | None:
        return self._attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def check_inputs(
        self,
        prompt,
        height,
        width,
        negative_prompt,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        prompt_attention_mask=None,
        negative_prompt_attention_mask=None,
        num_inference_steps=None,
        timesteps=None,
        sigmas=None,
        callback_on_step_end_tensor_inputs=None,
        guidance_scale=4.5,
        num_images_per_prompt=1,
        generator=None,
        latents=None,
        output_type="pil",
        max_sequence_length=300,
        use_resolution_binning=False,
    ):
        """The parent's prompt and embedding checks, plus the package's shared ones (`check_sampling_inputs`) and:
        the size gives whole patches, given embeddings have the transformer's caption width and matching masks,
        given latents fit, the schedule is well-formed and the callback asks for known tensors. `height` and `width`
        are the requested size; returns the prompt batch size."""
        for name, size in (("height", height), ("width", width)):
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ValueError(f"`{name}` must be a positive integer number of pixels, got {size!r}.")
        # Binning picks the size the transformer samples at; that is the one that must fit the patches.
        height, width = self.binned_size(height, width) if use_resolution_binning else (height, width)
        # The legacy `callback` is not offered here; 1 satisfies the parent's check of its `callback_steps`.
        super().check_inputs(
            prompt,
            height,
            width,
            negative_prompt,
            1,
            prompt_embeds,
            negative_prompt_embeds,
            prompt_attention_mask,
            negative_prompt_attention_mask,
        )
        multiple = self.vae_scale_factor * self.transformer.config.patch_size
        if height % multiple or width % multiple:
            raise ValueError(
                f"`height` and `width` must be multiples of {multiple} (VAE scale factor {self.vae_scale_factor} x "
                f"patch size {self.transformer.config.patch_size}), got {height}x{width}. Round them to multiples "
                f"of {multiple}, or keep use_resolution_binning=True (it picks a valid size and resizes the result)."
            )
        batch_size = check_sampling_inputs(
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
        )
        # Without either, the parent would tokenise None for the unconditional branch.
        if guidance_scale > 1 and negative_prompt is None and negative_prompt_embeds is None:
            raise ValueError(
                f"Guidance (guidance_scale={guidance_scale}) needs an unconditional caption: pass a `negative_prompt` "
                "(the default is the empty string) or `negative_prompt_embeds`, or set guidance_scale=1."
            )
        caption_channels = self.transformer.config.caption_channels
        for name, embeds, mask in (
            ("prompt_embeds", prompt_embeds, prompt_attention_mask),
            ("negative_prompt_embeds", negative_prompt_embeds, negative_prompt_attention_mask),
        ):
            if embeds is not None and caption_channels is not None and embeds.shape[-1] != caption_channels:
                raise ValueError(
                    f"`{name}` has {embeds.shape[-1]} features per token but the transformer expects "
                    f"caption_channels={caption_channels}; encode the prompt with the matching T5 encoder."
                )
            if embeds is not None and (not isinstance(mask, torch.Tensor) or mask.shape != embeds.shape[:2]):
                raise ValueError(
                    f"The attention mask of `{name}` must be a (batch, tokens) tensor of shape "
                    f"{tuple(embeds.shape[:2])}, got {getattr(mask, 'shape', mask)!r}."
                )
        check_latents_shape(
            latents, batch_size * num_images_per_prompt, self.transformer.config.in_channels, height, width,
            self.vae_scale_factor,
        )
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"`max_sequence_length` must be an integer >= 1 (T5 tokens), got {max_sequence_length!r}.")
        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass either `timesteps` or `sigmas` (a custom schedule), not both.")
        if timesteps is None and sigmas is None and (
            isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1
        ):
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        unknown = [name for name in callback_on_step_end_tensor_inputs or [] if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` {unknown} are not available; choose from "
                f"{self._callback_tensor_inputs}."
            )
        return batch_size

    def binned_size(self, height: int, width: int) -> tuple[int, int]:
        """The trained aspect-ratio bin nearest to `height` x `width` for this transformer's resolution, its native
        size in pixels (`sample_size` x VAE scale factor: 128 -> 1024 px, 512 -> 4096 px with the SDXL VAE)."""
        sample_size = self.transformer.config.sample_size
        base_size = sample_size * self.vae_scale_factor
        if base_size not in ASPECT_RATIO_BINS:
            raise ValueError(
                f"Resolution binning has bins for models of {sorted(ASPECT_RATIO_BINS)} px; this transformer samples "
                f"{base_size} px (sample_size {sample_size} x VAE scale factor {self.vae_scale_factor}). Pass "
                f"use_resolution_binning=False and a height/width that are multiples of "
                f"{self.vae_scale_factor * self.transformer.config.patch_size}."
            )
        return self.image_processor.classify_height_width_bin(height, width, ratios=ASPECT_RATIO_BINS[base_size])

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] = "",
        num_inference_steps: int = 20,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 4.5,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clean_caption: bool = True,
        use_resolution_binning: bool = True,
        max_sequence_length: int = 300,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images; the arguments of [`PixArtSigmaPipeline.__call__`] keep their meaning, except the legacy
        `callback`/`callback_steps`, replaced by `callback_on_step_end`.

        Args:
            timesteps, sigmas: a custom schedule, for schedulers whose `set_timesteps` takes one.
            attention_kwargs: passed to the transformer's attention; `{"scale": s}` scales the loaded LoRA adapters
                for this call only (0 gives the base model).
            callback_on_step_end: called as `fn(pipe, step, timestep, callback_kwargs)` after every step; may return
                replacements for the tensors named in `callback_on_step_end_tensor_inputs` (any of `latents`,
                `prompt_embeds`, `negative_prompt_embeds`). `pipe._interrupt = True` inside it stops the loop.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        height = height or self.transformer.config.sample_size * self.vae_scale_factor
        width = width or self.transformer.config.sample_size * self.vae_scale_factor
        requested_size = (height, width)
        batch_size = self.check_inputs(
            prompt,
            height,
            width,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            prompt_attention_mask,
            negative_prompt_attention_mask,
            num_inference_steps,
            timesteps,
            sigmas,
            callback_on_step_end_tensor_inputs,
            guidance_scale,
            num_images_per_prompt,
            generator,
            latents,
            output_type,
            max_sequence_length,
            use_resolution_binning,
        )
        if use_resolution_binning:
            height, width = self.binned_size(height, width)
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        device = self._execution_device

        # 1. Text: T5 states and masks (the negative ones only when guiding).
        prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = self.encode_prompt(
            prompt,
            self.do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            device=device,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
            clean_caption=clean_caption,
            max_sequence_length=max_sequence_length,
        )

        # 2. Schedule and starting noise.
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        self._num_timesteps = len(timesteps)
        latent_channels = self.transformer.config.in_channels
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            latent_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        # PixArt-Σ has no micro-conditions; the model still takes the (empty) slots.
        added_cond_kwargs = {"resolution": None, "aspect_ratio": None}
        learned_sigma = self.transformer.config.out_channels // 2 == latent_channels
        # Multistep schedulers may run warm-up evaluations; the progress bar counts solver steps.
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)

        # 3. Denoising loop.
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                text_states, text_mask = prompt_embeds, prompt_attention_mask
                model_input = latents
                if self.do_classifier_free_guidance:
                    text_states = torch.cat([negative_prompt_embeds, prompt_embeds])
                    text_mask = torch.cat([negative_prompt_attention_mask, prompt_attention_mask])
                    model_input = torch.cat([latents, latents])
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self.transformer(
                    model_input,
                    encoder_hidden_states=text_states,
                    encoder_attention_mask=text_mask,
                    timestep=t.expand(model_input.shape[0]),
                    added_cond_kwargs=added_cond_kwargs,
                    cross_attention_kwargs=self.attention_kwargs,
                    return_dict=False,
                )[0]
                if self.do_classifier_free_guidance:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                if learned_sigma:  # the variance channels matter for training only
                    noise_pred = noise_pred.chunk(2, dim=1)[0]
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    available = dict(
                        latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds
                    )
                    callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 4. Decode (and undo the binning resize).
        check_finite_latents(latents)
        if output_type == "latent":
            image = latents
        else:
            image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
            if use_resolution_binning:
                image = self.image_processor.resize_and_crop_tensor(image, requested_size[1], requested_size[0])
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
