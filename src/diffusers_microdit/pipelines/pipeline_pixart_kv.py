"""PixArt-Σ text-to-image pipeline whose transformer is the KV-compressed [`PixArtSigmaKVTransformer2DModel`]."""

from __future__ import annotations

from diffusers.models.autoencoders import AutoencoderKL
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import PixArtSigmaPipeline
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..loaders.lora import TransformerLoraLoaderMixin
from ..models.transformer_pixart_kv import PixArtSigmaKVTransformer2DModel


class PixArtSigmaKVPipeline(PixArtSigmaPipeline, TransformerLoraLoaderMixin):
    r"""[`PixArtSigmaPipeline`] with a [`PixArtSigmaKVTransformer2DModel`] transformer.

    Sampling, classifier-free guidance, learned-sigma handling and multi-aspect-ratio resolution binning are
    diffusers' own, unchanged; the KV model also works in `PixArtSigmaPipeline` itself. This class exists so that a
    saved KV pipeline records its own name in `model_index.json` and reloads with the KV transformer class.

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
