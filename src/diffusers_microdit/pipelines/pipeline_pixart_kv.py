"""PixArt-Σ text-to-image pipeline whose transformer is the KV-compressed [`PixArtSigmaKVTransformer2DModel`]."""

from __future__ import annotations

from diffusers.models.autoencoders import AutoencoderKL
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..models.transformer_pixart_kv import PixArtSigmaKVTransformer2DModel
from .pipeline_pixart_sigma_family import PixArtSigmaFamilyPipeline


class PixArtSigmaKVPipeline(PixArtSigmaFamilyPipeline):
    r"""PixArt-Σ text-to-image sampling ([`PixArtSigmaFamilyPipeline`]) with a [`PixArtSigmaKVTransformer2DModel`].

    Sampling, classifier-free guidance, learned-sigma handling and multi-aspect-ratio resolution binning are
    PixArt-Σ's; the KV model also works in diffusers' `PixArtSigmaPipeline` itself. This class records its own name
    in `model_index.json`, so a saved KV pipeline reloads with the KV transformer class, and adds LoRA loading and
    the arguments of current diffusers pipelines (`attention_kwargs`, `callback_on_step_end`).

    Components:
        tokenizer: T5 tokenizer (any fast tokenizer with a pad token works).
        text_encoder: T5 encoder.
        vae: `AutoencoderKL` (the SDXL VAE for the released Σ models).
        transformer: the KV-compressed PixArt-Σ transformer.
        scheduler: a diffusers scheduler (`DPMSolverMultistepScheduler` for the released models).

    Example:
        ```py
        >>> import torch
        >>> from diffusers_microdit.models.transformer_pixart_kv import PixArtSigmaKVTransformer2DModel
        >>> from diffusers_microdit.pipelines.pipeline_pixart_kv import PixArtSigmaKVPipeline

        >>> # Start KV-compression fine-tuning from a released PixArt-Σ (paper init, deeper half of the blocks):
        >>> repo = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
        >>> transformer = PixArtSigmaKVTransformer2DModel.from_pretrained(repo, subfolder="transformer")
        >>> transformer.enable_kv_compression(range(14, 28), ratio=2, sampling="conv")
        >>> pipe = PixArtSigmaKVPipeline.from_pretrained(repo, transformer=transformer)
        >>> image = pipe("A small cactus with a happy face in the Sahara desert.").images[0]
        ```
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: PreTrainedModel,
        vae: AutoencoderKL,
        transformer: PixArtSigmaKVTransformer2DModel,
        scheduler: KarrasDiffusionSchedulers,
    ):
        super().__init__(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
