"""Text-to-image pipeline for LiT, the linear-attention PixArt-Σ ([`LiTTransformer2DModel`])."""

from __future__ import annotations

from diffusers.models.autoencoders import AutoencoderKL
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import PixArtSigmaPipeline
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..loaders.lora import TransformerLoraLoaderMixin
from ..models.transformer_lit import LiTTransformer2DModel


class LiTPipeline(PixArtSigmaPipeline, TransformerLoraLoaderMixin):
    r"""[`PixArtSigmaPipeline`] with a [`LiTTransformer2DModel`] transformer.

    Prompt encoding (T5), sampling, classifier-free guidance, learned-sigma handling and aspect-ratio resolution
    binning are diffusers' PixArt-Σ code, unchanged. This class checks that the transformer is a LiT model, checks
    the requested size against the transformer's patch size (the parent only checks the VAE factor), and records
    its own name in `model_index.json` so that `DiffusionPipeline.from_pretrained` reloads it.

    Components:
        tokenizer: T5 tokenizer (any fast tokenizer with a pad token works).
        text_encoder: T5 encoder; its width must equal the transformer's `caption_channels`.
        vae: `AutoencoderKL` (the SDXL VAE for PixArt-Σ).
        transformer: the LiT transformer.
        scheduler: a diffusers scheduler (`DPMSolverMultistepScheduler` for PixArt-Σ).

    Example:
        ```py
        >>> from diffusers import PixArtSigmaPipeline
        >>> from diffusers_microdit.models.transformer_lit import LiTTransformer2DModel
        >>> from diffusers_microdit.pipelines.pipeline_lit import LiTPipeline

        >>> # LiT student of a released PixArt-Σ: everything but the self-attention is inherited. Distil it
        >>> # (e.g. with the teacher's noise and variance outputs) before expecting useful images.
        >>> teacher = PixArtSigmaPipeline.from_pretrained("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")
        >>> student = LiTTransformer2DModel.from_pixart(teacher.transformer, num_attention_heads=2)
        >>> pipe = LiTPipeline(**{**teacher.components, "transformer": student})
        >>> image = pipe("A small cactus with a happy face in the Sahara desert.").images[0]
        ```
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: PreTrainedModel,
        vae: AutoencoderKL,
        transformer: LiTTransformer2DModel | None,
        scheduler: KarrasDiffusionSchedulers,
    ):
        # None: loaded without its transformer (`from_pretrained(..., transformer=None)`) to encode data only.
        if transformer is not None and not isinstance(transformer, LiTTransformer2DModel):
            raise TypeError(
                f"LiTPipeline needs a LiTTransformer2DModel transformer, got {type(transformer).__name__}. Convert a "
                "PixArt-Σ transformer with LiTTransformer2DModel.from_pixart(...), or use PixArtSigmaPipeline for it."
            )
        super().__init__(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )

    def check_inputs(
        self,
        prompt,
        height,
        width,
        negative_prompt,
        callback_steps,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        prompt_attention_mask=None,
        negative_prompt_attention_mask=None,
    ):
        """The parent's checks, plus: the image size gives whole patches, and given text embeddings have the
        transformer's `caption_channels` features."""
        super().check_inputs(
            prompt,
            height,
            width,
            negative_prompt,
            callback_steps,
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
        caption_channels = self.transformer.config.caption_channels
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and caption_channels is not None and embeds.shape[-1] != caption_channels:
                raise ValueError(
                    f"`{name}` has {embeds.shape[-1]} features per token but the transformer expects "
                    f"caption_channels={caption_channels}; encode the prompt with the matching T5 encoder."
                )
