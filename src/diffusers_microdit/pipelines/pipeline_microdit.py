"""Text-to-image pipeline for MicroDiT (EDM sampling with classifier-free guidance on a zero null caption)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders import AutoencoderKL, AutoencoderTiny
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..loaders.lora import TransformerLoraLoaderMixin
from ..models.transformer_microdit import MicroDiTTransformer2DModel
from .input_checks import check_finite_latents, check_latents_shape, check_sampling_inputs
from .openclip_tokenizer import configure_openclip_tokenizer

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> import diffusers_microdit  # makes the MicroDiT classes known to diffusers
        >>> from diffusers import DiffusionPipeline

        >>> pipe = DiffusionPipeline.from_pretrained("path/to/microdit-pipeline", dtype=torch.bfloat16)
        >>> image = pipe("An astronaut riding a horse in Origami style", generator=torch.manual_seed(0)).images[0]
        ```
"""


def vae_scale_factor_of(vae) -> int:
    """Spatial downsampling of a diffusers autoencoder (AutoencoderKL: block_out_channels; AutoencoderTiny:
    encoder_block_out_channels)."""
    config = vae.config
    blocks = getattr(config, "block_out_channels", None) or getattr(config, "encoder_block_out_channels")
    return 2 ** (len(blocks) - 1)


class MicroDiTPipeline(DiffusionPipeline, TransformerLoraLoaderMixin):
    r"""Text-to-image generation with [`MicroDiTTransformer2DModel`].

    Components:
        transformer: the MicroDiT EDM network.
        vae: a diffusers autoencoder (`AutoencoderKL` for the official checkpoints; `AutoencoderTiny` etc. work).
        text_encoder: any transformers encoder whose `last_hidden_state` is the caption embedding (the converted
            DFN5B CLIP text tower for the official checkpoints).
        tokenizer: pads to a fixed length (77 with id 0 for the official checkpoints).
        scheduler: an EDM scheduler whose timesteps are `ln(sigma) / 4` (`EDMHeunScheduler` reproduces the
            original sampler; diffusers' `EDMEulerScheduler` and `EDMDPMSolverMultistepScheduler` also work).
        mask_caption_padding: `False` (the original, and the official checkpoints): the text encoder runs without
            an attention mask and every padded position reaches the transformer. `True`: the text encoder gets the
            tokenizer's attention mask, as BERT-style encoders expect, and the transformer hides the padding from
            its caption refiner, pooled caption and cross-attention; for models trained that way (the
            quickstart). Saved in `model_index.json`, so a pipeline folder reloads as it was trained.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        transformer: MicroDiTTransformer2DModel,
        vae: AutoencoderKL | AutoencoderTiny,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        scheduler: KarrasDiffusionSchedulers,
        mask_caption_padding: bool = False,
    ):
        super().__init__()
        if isinstance(tokenizer, CLIPTokenizer) and tokenizer.pad_token_id == 0:
            # A saved open_clip-style tokenizer reloads with "!" (id 0) as a special token, which would turn every
            # "!" in a prompt into padding; rebuild it the way the original tokenises.
            tokenizer = configure_openclip_tokenizer(tokenizer)
        self.register_modules(
            transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
        )
        self.register_to_config(mask_caption_padding=mask_caption_padding)
        self.vae_scale_factor = vae_scale_factor_of(vae) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def default_sample_size(self) -> int:
        return self.transformer.config.sample_size * self.vae_scale_factor

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def attention_kwargs(self) -> dict | None:
        return self._attention_kwargs

    def _encode_text(self, prompt: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token states (B, L, C) of `prompt` and, with `mask_caption_padding`, the tokenizer's (B, L) mask."""
        tokens = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        input_ids = tokens.input_ids.to(device)
        if not self.config.mask_caption_padding:  # the original consumes every position, padding included
            return self.text_encoder(input_ids).last_hidden_state, None
        mask = tokens.attention_mask.to(device)
        return self.text_encoder(input_ids, attention_mask=mask).last_hidden_state, mask

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """`(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)`, in
        diffusers' PixArt order: caption token states (B * num_images_per_prompt, L, C) and, when guiding, the
        unconditional ones: the encoded negative prompt if given, else MicroDiT's null caption (all zeros).

        The (B * num_images_per_prompt, L) masks are `None` unless the pipeline has `mask_caption_padding`; then
        they are the tokenizer's (the given ones for given embeddings, where `None` keeps every position), and
        all ones for the null caption."""
        device = device or self._execution_device
        masked = self.config.mask_caption_padding
        if prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else prompt
            prompt_embeds, prompt_attention_mask = self._encode_text(prompt, device)
        prompt_embeds = prompt_embeds.to(device)
        batch_size = prompt_embeds.shape[0]

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
                negative_prompt_attention_mask = None
            else:
                negative_prompt = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else negative_prompt
                negative_prompt_embeds, negative_prompt_attention_mask = self._encode_text(negative_prompt, device)
        if not do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_attention_mask = None

        def repeated(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device).repeat_interleave(num_images_per_prompt, dim=0)

        def mask_of(embeds: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
            if not masked or embeds is None:
                return None
            return torch.ones(embeds.shape[:2], dtype=torch.long, device=device) if mask is None else mask

        return (
            repeated(prompt_embeds),
            repeated(mask_of(prompt_embeds, prompt_attention_mask)),
            repeated(negative_prompt_embeds),
            repeated(mask_of(negative_prompt_embeds, negative_prompt_attention_mask)),
        )

    def check_inputs(
        self,
        prompt,
        height,
        width,
        num_inference_steps,
        guidance_scale,
        num_images_per_prompt,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        latents=None,
        output_type="pil",
        callback_on_step_end_tensor_inputs=None,
        timesteps=None,
        sigmas=None,
        generator=None,
        prompt_attention_mask=None,
        negative_prompt_attention_mask=None,
    ):
        multiple = self.vae_scale_factor * self.transformer.config.patch_size
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, int) or size <= 0 or size % multiple:
                raise ValueError(
                    f"`{name}` must be a positive multiple of {multiple} (VAE factor {self.vae_scale_factor} x patch "
                    f"size {self.transformer.config.patch_size}), got {size!r}."
                )
        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass either `timesteps` or `sigmas` (a custom schedule), not both.")
        custom_schedule = timesteps is not None or sigmas is not None
        if not custom_schedule and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass a `prompt` (string or list of strings) or precomputed `prompt_embeds`.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
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
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and embeds.ndim != 3:
                raise ValueError(f"`{name}` must be a (batch, tokens, channels) tensor, got {tuple(embeds.shape)}.")
        if prompt_embeds is not None and prompt_embeds.shape[-1] != self.transformer.config.caption_channels:
            raise ValueError(
                f"`prompt_embeds` have {prompt_embeds.shape[-1]} channels, the transformer expects "
                f"{self.transformer.config.caption_channels}."
            )
        if negative_prompt_embeds is not None and (
            prompt_embeds is None or negative_prompt_embeds.shape != prompt_embeds.shape
        ):
            raise ValueError(
                "`negative_prompt_embeds` must come with `prompt_embeds` of the same shape, got "
                f"{tuple(negative_prompt_embeds.shape)} and "
                f"{None if prompt_embeds is None else tuple(prompt_embeds.shape)}."
            )
        for name, mask, embeds_name, embeds in (
            ("prompt_attention_mask", prompt_attention_mask, "prompt_embeds", prompt_embeds),
            ("negative_prompt_attention_mask", negative_prompt_attention_mask, "negative_prompt_embeds",
             negative_prompt_embeds),
        ):  # fmt: skip
            if mask is None:
                continue
            if not self.config.mask_caption_padding:
                raise ValueError(
                    f"`{name}` is only used by a pipeline with `mask_caption_padding=True`; this one feeds every "
                    "caption position to the transformer, as the model was trained. Drop the mask."
                )
            if embeds is None or tuple(mask.shape) != tuple(embeds.shape[:2]):
                raise ValueError(
                    f"`{name}` must come with `{embeds_name}` and be its (batch, tokens) keep-mask, got "
                    f"{tuple(mask.shape)} for {None if embeds is None else tuple(embeds.shape)}."
                )
        check_latents_shape(
            latents, batch_size * num_images_per_prompt, self.transformer.config.in_channels, height, width,
            self.vae_scale_factor,
        )
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` {unknown} are not available; choose from "
                    f"{self._callback_tensor_inputs}."
                )
        return batch_size

    def prepare_latents(self, batch_size, num_channels, height, width, dtype, device, generator, latents=None):
        """Unit-variance noise (drawn or given) scaled to the scheduler's starting noise level."""
        if latents is None:
            shape = (batch_size, num_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (the original applies no shift factor; a VAE that has one gets it)."""
        config = self.vae.config
        latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 5.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            prompt: text prompt(s).
            negative_prompt: what to steer away from; by default the unconditional branch uses MicroDiT's null
                caption (all-zero embeddings), as the original does.
            height, width: image size in pixels, multiples of `vae_scale_factor * patch_size`; default is the
                transformer's training resolution.
            num_inference_steps: solver steps (the Heun scheduler makes 2N-1 network evaluations); the progress
                bar counts steps, the callback is called after every evaluation.
            timesteps: a custom schedule in timestep units (`ln(sigma) / 4`, decreasing), one value per solver step,
                for schedulers whose `set_timesteps` takes `timesteps` (`EDMHeunScheduler` does).
            sigmas: a custom schedule as diffusers' EDM schedulers take it: positions in [0, 1] along the
                scheduler's sigma schedule (0 = sigma_max, 1 = sigma_min), one per solver step;
                `numpy.linspace(0, 1, N)` is the default N-step schedule.
            guidance_scale: classifier-free guidance; disabled at <= 1.
            num_images_per_prompt: images per prompt.
            generator: torch generator(s) for reproducible noise.
            latents: unit-variance initial noise of shape (B, C, H/8, W/8); scaled by the scheduler's
                `init_noise_sigma`.
            prompt_embeds, negative_prompt_embeds: precomputed caption states (B, L, caption_channels).
            prompt_attention_mask, negative_prompt_attention_mask: their (B, L) tokenizer masks, for a pipeline with
                `mask_caption_padding` (`None` keeps every position); see `encode_prompt`.
            output_type: "pil", "np", "pt" or "latent".
            return_dict: return an `ImagePipelineOutput` instead of a tuple.
            callback_on_step_end: called as `fn(pipe, step, timestep, callback_kwargs)` after every step; may return
                replacements for the tensors named in `callback_on_step_end_tensor_inputs`.
            callback_on_step_end_tensor_inputs: which of `latents`, `prompt_embeds`, `negative_prompt_embeds` to pass.
            attention_kwargs: passed to the transformer; `{"scale": s}` scales the loaded LoRA adapters for this call
                only (0 gives the base model).
        Examples:
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        height = self.default_sample_size if height is None else height
        width = self.default_sample_size if width is None else width
        batch_size = self.check_inputs(
            prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            num_images_per_prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            latents,
            output_type,
            callback_on_step_end_tensor_inputs,
            timesteps,
            sigmas,
            generator,
            prompt_attention_mask,
            negative_prompt_attention_mask,
        )
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        device = self._execution_device

        prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = (
            self.encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                self.do_classifier_free_guidance,
                negative_prompt,
                prompt_embeds,
                negative_prompt_embeds,
                prompt_attention_mask,
                negative_prompt_attention_mask,
            )
        )
        caption_mask = prompt_attention_mask
        if self.do_classifier_free_guidance and caption_mask is not None:
            caption_mask = torch.cat([negative_prompt_attention_mask, prompt_attention_mask])
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        self._num_timesteps = len(timesteps)
        # A second-order scheduler evaluates the network `order` times per solver step (the last step once).
        order = self.scheduler.order
        num_solver_steps = -(-len(timesteps) // order)
        # The sampler works in float32 whatever the transformer runs in.
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            self.transformer.config.in_channels,
            height,
            width,
            torch.float32,
            device,
            generator,
            latents,
        )
        model_dtype = self.transformer.dtype

        with self.progress_bar(total=num_solver_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input = self.scheduler.scale_model_input(latents, t)
                context = prompt_embeds
                if self.do_classifier_free_guidance:
                    model_input = torch.cat([model_input, model_input])
                    context = torch.cat([negative_prompt_embeds, prompt_embeds])
                model_output = self.transformer(
                    model_input.to(model_dtype),
                    t.expand(model_input.shape[0]),
                    context.to(model_dtype),
                    encoder_attention_mask=caption_mask,
                    attention_kwargs=self.attention_kwargs,
                ).sample.float()
                if self.do_classifier_free_guidance:
                    uncond, cond = model_output.chunk(2)
                    model_output = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(model_output, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                if (i + 1) % order == 0 or i == len(timesteps) - 1:
                    progress_bar.update()

        check_finite_latents(latents)
        if output_type == "latent":
            image = latents
        else:
            image = self.image_processor.postprocess(self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
