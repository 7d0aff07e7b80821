"""What every PixArt-Σ-family training script shares (KV finetuning, LiT distillation, LoRA): the DDPM noise
scheduler, the unconditional caption for caption dropout, moving a model to a new resolution, and float32
attention for mixed-precision training."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.models.embeddings import PatchEmbed

from ..models.transformer_lit import LiTLinearAttnProcessor
from ..models.transformer_pixart_kv import PixArtKVAttnProcessor2_0

# Softmax-attention processors of the PixArt-Σ family, all replaceable by `PixArtKVAttnProcessor2_0`.
SOFTMAX_ATTENTION_PROCESSORS = (PixArtKVAttnProcessor2_0, AttnProcessor, AttnProcessor2_0)


def training_noise_scheduler(pipeline: PixArtSigmaPipeline) -> DDPMScheduler:
    """The DDPM schedule of the pipeline's scheduler config (1000 linear betas for PixArt-Σ), for training."""
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    if noise_scheduler.config.prediction_type != "epsilon":
        prediction = noise_scheduler.config.prediction_type
        raise SystemExit(f"PixArt-Sigma predicts epsilon, but the pipeline's scheduler is set to {prediction!r}.")
    return noise_scheduler


@torch.no_grad()
def null_caption(pipeline: PixArtSigmaPipeline, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (L, D), attention mask (L,)) of the unconditional caption `PixArtSigmaPipeline` feeds for
    classifier-free guidance: the T5 encoding of its default negative prompt "" padded to `length` tokens."""
    _, _, embeds, mask = pipeline.encode_prompt(
        "", do_classifier_free_guidance=True, negative_prompt="", max_sequence_length=length, device="cpu"
    )
    return embeds[0].float(), mask[0].long()


def move_to_resolution(transformer: PixArtTransformer2DModel, resolution: int, vae_scale_factor: int) -> None:
    """Set the transformer's native size to `resolution` px, as PixArt-Sigma's 256 -> 512 -> 1K -> 2K steps do: the
    latent `sample_size` follows, and `interpolation_scale = resolution / 512` keeps the sin-cos positions in the
    512-px model's coordinate range. The patch projection's weights are kept; the positions are rebuilt."""
    config = transformer.config
    sample_size, scale = resolution // vae_scale_factor, resolution / 512
    transformer.register_to_config(sample_size=sample_size, interpolation_scale=scale)
    old = transformer.pos_embed
    new = PatchEmbed(
        height=sample_size, width=sample_size, patch_size=config.patch_size, in_channels=config.in_channels,
        embed_dim=transformer.inner_dim, interpolation_scale=scale,
    )
    new.proj.load_state_dict(old.proj.state_dict())
    transformer.pos_embed = new.to(old.proj.weight.device)
    transformer.height = transformer.width = sample_size


def use_fp32_attention(transformer: PixArtTransformer2DModel) -> int:
    """The original PixArt-Σ's `fp32_attention=True` (its fp16 recipe): every softmax attention of `transformer`,
    self- and cross-attention, computes from float32 query, key and value with autocast off
    (`PixArtKVAttnProcessor2_0(fp32_attention=True)`, set with `set_attn_processor`; KV compression is kept), while
    the projections train in the mixed precision. The original upcasts its self-attention; here the cross-attention
    to the T5 tokens too. LiT's linear self-attention keeps its own processor (it has no softmax logits to
    overflow). Returns the number of attention modules switched."""
    processors = {}
    for name, processor in transformer.attn_processors.items():
        if isinstance(processor, SOFTMAX_ATTENTION_PROCESSORS):
            processor = PixArtKVAttnProcessor2_0(fp32_attention=True)
        elif not isinstance(processor, LiTLinearAttnProcessor):
            raise ValueError(f"--fp32_attention cannot upcast {name}: its processor {type(processor).__name__} is not "
                             "one of the PixArt-Sigma family's.")
        processors[name] = processor
    switched = sum(isinstance(p, PixArtKVAttnProcessor2_0) for p in processors.values())
    transformer.set_attn_processor(processors)  # empties `processors`
    return switched


def recipe_summary(args) -> str:
    """One line on a run's PixArt-Σ recipe options: optimizer, caption mixing, attention precision."""
    if args.real_caption_ratio is None:
        captions = "one caption per image"
    else:
        captions = f"the real caption with probability {args.real_caption_ratio}, else the second"
    attention = "float32 softmax attention" if args.fp32_attention else "attention in the training precision"
    return f"Optimizer {args.optimizer}; {captions}; {attention}"
