"""Text-to-image pipeline for LiT, the linear-attention PixArt-Σ ([`LiTTransformer2DModel`])."""

from __future__ import annotations

from diffusers.models.autoencoders import AutoencoderKL
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..models.transformer_lit import LiTTransformer2DModel
from .pipeline_pixart_sigma_family import PixArtSigmaFamilyPipeline


class LiTPipeline(PixArtSigmaFamilyPipeline):
    r"""PixArt-Σ text-to-image sampling ([`PixArtSigmaFamilyPipeline`]) with a [`LiTTransformer2DModel`] transformer.

    Prompt encoding (T5), classifier-free guidance, learned-sigma handling and aspect-ratio resolution binning are
    PixArt-Σ's. This class checks that the transformer is a LiT model and records its own name in
    `model_index.json` so that `DiffusionPipeline.from_pretrained` reloads it.

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
