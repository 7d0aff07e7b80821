# Copyright 2026 The diffusers-microdit authors. Apache-2.0.
"""MicroDiT ("Stretching Each Dollar", Sony 2024) as a diffusers model.

A DiT whose first blocks (the *patch mixer*) see every patch; afterwards up to 75% of the patch tokens may be
dropped (*deferred masking*) so the backbone trains on a fraction of the sequence. Alternate backbone blocks use an
expert-choice mixture-of-experts feed-forward, and attention/FFN widths grow linearly with depth (layer-wise
scaling). The network is the EDM "F" function: it receives `c_in * x` and `c_noise = ln(sigma) / 4`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Type

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import Timesteps, get_2d_sincos_pos_embed_from_grid
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, apply_lora_scale
from torch import nn

from ..loaders.single_file import OriginalCheckpointLoaderMixin

# The two sizes defined by the original code (`MicroDiT_XL_2`, `MicroDiT_Tiny_2`); everything not listed uses the
# constructor defaults, which are those of MicroDiT_XL_2 at 256 px.
MICRODIT_PRESETS = {
    "MicroDiT_XL_2": dict(
        hidden_size=1024, num_layers=28, attention_head_dim=64, patch_mixer_layers=6, patch_mixer_hidden_size=768
    ),
    "MicroDiT_Tiny_2": dict(
        hidden_size=512, num_layers=16, attention_head_dim=32, patch_mixer_layers=4, patch_mixer_hidden_size=512
    ),
}


@dataclass
class MicroDiTTransformerOutput(BaseOutput):
    """Output of [`MicroDiTTransformer2DModel`].

    Args:
        sample: (B, C, H, W) network output. Patches removed by deferred masking hold the `mask_token` buffer.
        mask: (B, T) float, 1 where a patch was removed, or `None` when no masking was applied.
    """

    sample: torch.Tensor
    mask: torch.Tensor | None = None


def get_random_keep_ids(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw the patch indices kept by deferred masking, one random subset per sample.

    Same draw as the original `get_mask`: `rand(B, T)` is arg-sorted and the first `int(T * (1 - mask_ratio))`
    indices are kept, in that (random) order. Returns a (B, K) long tensor for the model's `keep_ids`.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=device)
    return torch.argsort(noise, dim=1)[:, : int(num_tokens * (1 - mask_ratio))]


def microdit_2d_sincos_pos_embed(
    embed_dim: int, height: int, width: int, interpolation_scale: float, device=None
) -> torch.Tensor:
    """Fixed 2-D sin-cos positions for a (height, width) token grid, row-major, shape (height * width, embed_dim).

    Coordinates are `arange(n) / interpolation_scale` on each axis, which is what the original computes for a
    square grid of its configured size; using each axis's own length makes any rectangle work.
    """
    rows = torch.arange(height, dtype=torch.float32, device=device) / interpolation_scale
    cols = torch.arange(width, dtype=torch.float32, device=device) / interpolation_scale
    grid = torch.stack(torch.meshgrid(cols, rows, indexing="xy"))  # (2, H, W): column coordinate first
    return get_2d_sincos_pos_embed_from_grid(embed_dim, grid).float()


def attention_inner_dim(dim: int, head_dim: int, qkv_ratio: float) -> int:
    """Layer-wise-scaled self-attention width: `dim * qkv_ratio` rounded up to a multiple of two heads."""
    if qkv_ratio == 1:
        return dim
    return 2 * head_dim * math.ceil(int(dim * qkv_ratio) / (2 * head_dim))


def swiglu_hidden_dim(hidden_dim: int, multiple_of: int) -> int:
    """SwiGLU width: two thirds of the nominal hidden size, rounded up to `multiple_of` (as in Llama)."""
    return multiple_of * math.ceil(int(2 * hidden_dim / 3) / multiple_of)


def expand_multipliers(multipliers: list[float] | None, default: tuple[float, float], num_layers: int) -> list[float]:
    """Per-block width multipliers: `None` gives the original factories' `linspace(*default, num_layers)`; a list of
    `num_layers` values is used as is; a shorter list is spread over equal groups of blocks, as the original does."""
    if multipliers is None:
        return [float(m) for m in np.linspace(default[0], default[1], num=num_layers)]
    multipliers = [float(m) for m in multipliers]
    if len(multipliers) == num_layers:
        return multipliers
    if num_layers % len(multipliers):
        raise ValueError(
            f"{len(multipliers)} width multipliers cannot be spread evenly over {num_layers} layers: give one value "
            f"per layer or a number of values that divides num_layers."
        )
    return [m for m in multipliers for _ in range(num_layers // len(multipliers))]


class MicroDiTAttnProcessor:
    """Attention with MicroDiT's QK-norm: a non-affine LayerNorm over the full query/key vector (all heads jointly)
    before the head split, then scaled dot-product attention through diffusers' backend dispatcher (SDPA by
    default, so `set_attention_backend` works).

    Reads fused projections when the module has them (`fuse_qkv_projections`): `to_qkv` for self-attention, `to_kv`
    for cross-attention. The QK-norm runs after the split, on the same full-width vectors, so fusing changes nothing.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self, attn: MicroDiTAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        fused = attn.fused_projections
        if fused and encoder_hidden_states is None and hasattr(attn, "to_qkv"):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            if fused and hasattr(attn, "to_kv"):
                key, value = attn.to_kv(context).chunk(2, dim=-1)
            else:
                key, value = attn.to_k(context), attn.to_v(context)
        query = attn.norm_q(query).unflatten(-1, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(-1, (attn.heads, -1))
        value = value.unflatten(-1, (attn.heads, -1))
        out = dispatch_attention_fn(
            query, key, value, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        return attn.to_out[0](out.flatten(2, 3).to(query.dtype))


class MicroDiTAttention(nn.Module, AttentionModuleMixin):
    """Multi-head attention with across-heads QK LayerNorm; self-attention when no context is passed.

    `is_cross_attention` marks modules that attend to a separate context (the caption), so diffusers'
    `fuse_projections` fuses their k/v into `to_kv` and leaves `to_q` alone (q/k/v into `to_qkv` otherwise).
    """

    _default_processor_cls = MicroDiTAttnProcessor
    _available_processors = [MicroDiTAttnProcessor]
    _supports_qkv_fusion = True

    def __init__(
        self,
        query_dim: int,
        inner_dim: int,
        heads: int,
        bias: bool = False,
        eps: float = 1e-6,
        is_cross_attention: bool = False,
    ):
        super().__init__()
        if inner_dim % heads:
            raise ValueError(f"Attention width {inner_dim} is not divisible by {heads} heads.")
        self.heads = heads
        # Read by `AttentionModuleMixin.fuse_projections`.
        self.is_cross_attention = is_cross_attention
        self.use_bias = bias
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=bias)])
        self.norm_q = nn.LayerNorm(inner_dim, eps=eps, elementwise_affine=False, bias=False)
        self.norm_k = nn.LayerNorm(inner_dim, eps=eps, elementwise_affine=False, bias=False)
        self.set_processor(self._default_processor_cls())

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        return self.processor(self, hidden_states, encoder_hidden_states)


class MicroDiTSwiGLU(nn.Module):
    """Dense SwiGLU feed-forward: `down_proj(silu(gate_proj(x)) * up_proj(x))`."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MicroDiTExpertChoiceMoE(nn.Module):
    """Expert-choice mixture-of-experts feed-forward (exact-GELU experts, no biases, no auxiliary loss).

    Each sample routes on its own: the router's softmax over experts scores every token, and each expert takes its
    `int(capacity * T / num_experts)` best tokens (T = current sequence length, so masking changes the capacity).
    A token picked by several experts gets the gate-weighted sum of their outputs; a token picked by none gets 0.
    Expert weights are plain parameters in (in, out) layout, `w_in[e]` (dim, hidden) and `w_out[e]` (hidden, dim),
    so peft's LoRA (which wraps `nn.Linear`) does not adapt them.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, capacity: float):
        super().__init__()
        self.num_experts = num_experts
        self.capacity = capacity
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        k = int(self.capacity * tokens / self.num_experts)
        # Routing in float32 keeps the expert choice stable under bf16/fp16 autocast.
        probs = self.router(x).float().softmax(dim=-1)
        gates, token_ids = torch.topk(probs.transpose(1, 2), k, dim=-1)  # (B, E, k)
        # Gather the chosen tokens instead of the original's dense one-hot matmul: O(E*k*d) instead of O(E*k*T*d).
        flat_ids = token_ids.reshape(batch, -1, 1).expand(-1, -1, dim)
        chosen = torch.gather(x, 1, flat_ids).view(batch, self.num_experts, k, dim)
        hidden = F.gelu(torch.einsum("bekd,edh->bekh", chosen, self.w_in.to(x.dtype)))
        expert_out = torch.einsum("bekh,ehd->bekd", hidden, self.w_out.to(x.dtype))
        expert_out = expert_out * gates.to(x.dtype).unsqueeze(-1)
        return torch.zeros_like(x).scatter_add_(1, flat_ids, expert_out.reshape(batch, -1, dim))


class MicroDiTProjection(nn.Module):
    """Linear -> GELU(tanh) -> weight-only LayerNorm -> Linear (caption and pooled-caption projections)."""

    def __init__(self, in_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps, bias=False)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.norm(F.gelu(self.linear_1(x), approximate="tanh")))


class MicroDiTTimestepEmbedding(nn.Module):
    """512 cos-first sinusoidal frequencies of the EDM noise level, then Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, num_frequencies: int = 512):
        super().__init__()
        self.time_proj = Timesteps(num_frequencies, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.linear_1 = nn.Linear(num_frequencies, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, timestep: torch.Tensor, hidden_dtype: torch.dtype) -> torch.Tensor:
        # The compute dtype comes from the hidden states, never from the weights: under layerwise casting the
        # weights are stored in a storage dtype (e.g. float8) and only cast for the duration of each linear.
        freqs = self.time_proj(timestep.float()).to(hidden_dtype)
        return self.linear_2(F.gelu(self.linear_1(freqs), approximate="tanh"))


class MicroDiTNormProjection(nn.Module):
    """Weight-only LayerNorm then Linear: moves tokens between the backbone and patch-mixer widths."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=eps, bias=False)
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class MicroDiTCaptionRefiner(nn.Module):
    """Pre-LN self-attention + SwiGLU block over the caption tokens (no modulation, no mask)."""

    def __init__(self, dim: int, head_dim: int, multiple_of: int, bias: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.attn = MicroDiTAttention(dim, dim, dim // head_dim, bias=bias, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.ff = MicroDiTSwiGLU(dim, swiglu_hidden_dim(int(4 * dim), multiple_of), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class MicroDiTBlock(nn.Module):
    """adaLN-modulated DiT block: gated self-attention, un-gated un-modulated cross-attention, gated FFN.

    The modulation comes from `cond` (timestep + pooled caption, width `cond_dim`), through GELU(tanh) and one
    Linear producing shift/scale/gate for attention and FFN, in that order.
    """

    def __init__(self, dim: int, cond_dim: int, head_dim: int, attn_dim: int, ff: nn.Module, bias: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.attn1 = MicroDiTAttention(dim, attn_dim, attn_dim // head_dim, bias=bias, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.attn2 = MicroDiTAttention(dim, dim, dim // head_dim, bias=bias, eps=eps, is_cross_attention=True)
        self.norm3 = nn.LayerNorm(dim, eps=eps, bias=False)
        self.ff = ff
        self.modulation = nn.Linear(cond_dim, 6 * dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        modulation = self.modulation(F.gelu(cond, approximate="tanh")).unsqueeze(1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
        x = x + gate_msa * self.attn1(self.norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + self.attn2(self.norm2(x), context)
        return x + gate_mlp * self.ff(self.norm3(x) * (1 + scale_mlp) + shift_mlp)



def _init_attention(attn: MicroDiTAttention, out_std: float) -> None:
    for linear in (attn.to_q, attn.to_k, attn.to_v):
        nn.init.trunc_normal_(linear.weight, std=0.02)
    nn.init.trunc_normal_(attn.to_out[0].weight, std=out_std)


def _init_feed_forward(ff: nn.Module, out_std: float) -> None:
    if isinstance(ff, MicroDiTExpertChoiceMoE):
        nn.init.trunc_normal_(ff.router.weight, std=0.02)
        nn.init.trunc_normal_(ff.w_in, std=0.02)
        nn.init.trunc_normal_(ff.w_out, std=out_std)
    else:
        nn.init.trunc_normal_(ff.gate_proj.weight, std=0.02)
        nn.init.trunc_normal_(ff.up_proj.weight, std=out_std)
        nn.init.trunc_normal_(ff.down_proj.weight, std=out_std)


def _init_block(block: MicroDiTBlock, out_std: float) -> None:
    """Original init of one block: small output projections (`out_std`) and zero adaLN, so it starts as identity."""
    _init_attention(block.attn1, out_std)
    _init_attention(block.attn2, out_std)
    _init_feed_forward(block.ff, out_std)
    nn.init.zeros_(block.modulation.weight)


class MicroDiTTransformer2DModel(
    ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin, OriginalCheckpointLoaderMixin
):
    """MicroDiT text-to-image transformer (EDM F-network) with patch mixer, deferred masking and expert-choice MoE.

    Defaults are `MicroDiT_XL_2` at 256 px (32x32 latents); `from_preset("MicroDiT_Tiny_2")` builds the other
    original size, and `from_single_file(...)` (alias `from_original`) converts the official micro_diffusion
    checkpoints.

    Args:
        sample_size: latent height/width the model was trained at (default resolution of the pipeline). Any
            height/width divisible by `patch_size` is accepted at run time.
        patch_size: side of a square latent patch.
        in_channels: latent channels (4 for the SDXL VAE, 16 for the Ostris VAE); the output has the same.
        hidden_size: backbone width.
        num_layers: backbone depth.
        attention_head_dim: width of every attention head.
        caption_channels: width of the text encoder's token states.
        multiple_of: FFN widths are rounded up to a multiple of this.
        qkv_multipliers, ffn_multipliers: per-layer self-attention / FFN width ratios (layer-wise scaling); `None`
            means the original `linspace(0.5, 1.0)` / `linspace(0.5, 4.0)` over `num_layers`.
        patch_mixer_layers, patch_mixer_hidden_size, patch_mixer_qkv_ratio, patch_mixer_mlp_ratio: the patch mixer.
        attention_bias: biases on attention, FFN and mixer-projection linears.
        num_experts, expert_capacity, experts_every_n: expert-choice MoE in every n-th block (never the last
            backbone block).
        pos_interp_scale: positions are `index / pos_interp_scale` (2.0 for the 512-px checkpoints).
        norm_eps: LayerNorm epsilon everywhere.
        depth_init: deeper backbone blocks get smaller output-projection init (only matters when training from
            scratch).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["MicroDiTBlock"]
    _repeated_blocks = ["MicroDiTBlock"]
    # Kept in full precision under layerwise casting, as diffusers' PixArt keeps `adaln_single` and Flux/SD3 their
    # `norm*.linear` modulations: the timestep embedding and adaLN modulations scale every block's activations, and
    # the MoE routers make discrete expert choices that small weight errors flip. `norm` also covers
    # `norm_out_modulation` and the mixer projections' norms.
    _skip_layerwise_casting_patterns = ["patch_embed", "norm", "time_embedding", "modulation", "router"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1024,
        num_layers: int = 28,
        attention_head_dim: int = 64,
        caption_channels: int = 1024,
        multiple_of: int = 256,
        qkv_multipliers: list[float] | None = None,
        ffn_multipliers: list[float] | None = None,
        patch_mixer_layers: int = 6,
        patch_mixer_hidden_size: int = 768,
        patch_mixer_qkv_ratio: float = 1.0,
        patch_mixer_mlp_ratio: float = 4.0,
        attention_bias: bool = False,
        num_experts: int = 8,
        expert_capacity: float = 2.0,
        experts_every_n: int = 2,
        pos_interp_scale: float = 1.0,
        norm_eps: float = 1e-6,
        depth_init: bool = True,
    ):
        super().__init__()
        if patch_mixer_layers < 1:
            raise ValueError("MicroDiT needs at least one patch-mixer layer (patch_mixer_layers >= 1).")
        for name, width in (("hidden_size", hidden_size), ("patch_mixer_hidden_size", patch_mixer_hidden_size)):
            if width % attention_head_dim:
                raise ValueError(f"{name}={width} must be divisible by attention_head_dim={attention_head_dim}.")
        qkv_ratios = expand_multipliers(qkv_multipliers, (0.5, 1.0), num_layers)
        ffn_ratios = expand_multipliers(ffn_multipliers, (0.5, 4.0), num_layers)
        dim, mixer_dim, head_dim = hidden_size, patch_mixer_hidden_size, attention_head_dim
        self.gradient_checkpointing = False

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.time_embedding = MicroDiTTimestepEmbedding(dim)
        self.caption_projection = MicroDiTProjection(caption_channels, dim, norm_eps)
        self.caption_refiner = MicroDiTCaptionRefiner(dim, head_dim, multiple_of, attention_bias, norm_eps)
        self.pooled_caption_projection = MicroDiTProjection(dim, dim, norm_eps)

        def feed_forward(width: int, ratio: float, moe: bool) -> nn.Module:
            if moe:
                moe_hidden = multiple_of * math.ceil(int(width * ratio) / multiple_of)
                return MicroDiTExpertChoiceMoE(width, moe_hidden, num_experts, expert_capacity)
            return MicroDiTSwiGLU(width, swiglu_hidden_dim(int(width * ratio), multiple_of), attention_bias)

        # MoE placement follows the original: mixer blocks 1.. and backbone blocks ..depth-2 whose 1-based index
        # is a multiple of experts_every_n.
        self.patch_mixer_blocks = nn.ModuleList(
            MicroDiTBlock(
                mixer_dim,
                dim,
                head_dim,
                attention_inner_dim(mixer_dim, head_dim, patch_mixer_qkv_ratio),
                feed_forward(mixer_dim, patch_mixer_mlp_ratio, moe=i >= 1 and (i + 1) % experts_every_n == 0),
                attention_bias,
                norm_eps,
            )
            for i in range(patch_mixer_layers)
        )
        self.transformer_blocks = nn.ModuleList(
            MicroDiTBlock(
                dim,
                dim,
                head_dim,
                attention_inner_dim(dim, head_dim, qkv_ratios[i]),
                feed_forward(dim, ffn_ratios[i], moe=i < num_layers - 1 and (i + 1) % experts_every_n == 0),
                attention_bias,
                norm_eps,
            )
            for i in range(num_layers)
        )
        if mixer_dim != dim:
            self.patch_mixer_proj_in = MicroDiTNormProjection(dim, mixer_dim, attention_bias, norm_eps)
            self.patch_mixer_proj_context = MicroDiTNormProjection(dim, mixer_dim, attention_bias, norm_eps)
            self.patch_mixer_proj_out = MicroDiTNormProjection(mixer_dim, dim, attention_bias, norm_eps)
        else:
            self.patch_mixer_proj_in = self.patch_mixer_proj_context = self.patch_mixer_proj_out = nn.Identity()

        self.norm_out = nn.LayerNorm(dim, eps=norm_eps, bias=False)
        self.norm_out_modulation = nn.Linear(dim, 2 * dim)  # (shift, scale), shift first as in the original
        self.proj_out = nn.Linear(dim, patch_size * patch_size * in_channels)
        # Output of removed patches; a buffer (never trained) because the original checkpoints store it as one.
        self.register_buffer("mask_token", torch.zeros(1, 1, patch_size * patch_size * in_channels))
        self._pos_embed_cache: dict = {}
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **config_overrides) -> "MicroDiTTransformer2DModel":
        """Build one of the original sizes, `"MicroDiT_XL_2"` or `"MicroDiT_Tiny_2"`, with optional overrides
        (e.g. `sample_size=64, pos_interp_scale=2.0, in_channels=16`)."""
        if name not in MICRODIT_PRESETS:
            raise ValueError(f"Unknown MicroDiT preset {name!r}; choose one of {sorted(MICRODIT_PRESETS)}.")
        return cls(**{**MICRODIT_PRESETS[name], **config_overrides})

    @classmethod
    def from_original(
        cls, state_dict_or_path, original_config: dict | None = None, torch_dtype: torch.dtype | None = None
    ) -> "MicroDiTTransformer2DModel":
        """Convert an original micro_diffusion `DiT` state dict (or a `.pt`/`.safetensors` file of one).

        `original_config` takes the original `DiT(...)` keyword names (`input_size`, `dim`, `depth`, `head_dim`,
        ...). Sizes readable from the weights are inferred; other missing keys default to MicroDiT_XL_2 (or
        MicroDiT_Tiny_2 when the width is 512).
        """
        from ..conversion.microdit import convert_microdit_checkpoint

        config, state_dict = convert_microdit_checkpoint(state_dict_or_path, original_config)
        model = cls(**config)
        model.load_state_dict(state_dict, strict=True)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        return model.eval()

    def enable_layerwise_casting(
        self,
        storage_dtype: torch.dtype = torch.float8_e4m3fn,
        compute_dtype: torch.dtype | None = None,
        skip_modules_pattern: tuple[str, ...] | None = None,
        skip_modules_classes: tuple[Type[nn.Module], ...] | None = None,
        non_blocking: bool = False,
    ) -> None:
        """[`ModelMixin.enable_layerwise_casting`], plus the expert weights of the MoE feed-forwards.

        diffusers only hooks `nn.Linear`/`nn.Conv*`/`nn.Embedding` leaves, so the experts (plain parameters, most of
        the weights of a MicroDiT) would stay in full precision. They are stored in `storage_dtype` too, unless a
        skip pattern or class matches their module; [`MicroDiTExpertChoiceMoE`] casts them to the activations' dtype
        on every call, which is the compute dtype.
        """
        super().enable_layerwise_casting(
            storage_dtype, compute_dtype, skip_modules_pattern, skip_modules_classes, non_blocking
        )
        if skip_modules_pattern is None:
            from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

            skip_modules_pattern = DEFAULT_SKIP_MODULES_PATTERN
        # The same patterns as the parent: the given (or default) ones plus the class's own.
        patterns = (*skip_modules_pattern, *(self._keep_in_fp32_modules or ()), *self._skip_layerwise_casting_patterns)
        for name, module in self.named_modules():
            if not isinstance(module, MicroDiTExpertChoiceMoE):
                continue
            parts = name.split(".")
            prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]  # diffusers tests every ancestor
            if any(re.search(pattern, prefix) for pattern in patterns for prefix in prefixes):
                continue
            if skip_modules_classes and any(
                isinstance(self.get_submodule(prefix), skip_modules_classes) for prefix in prefixes
            ):
                continue
            for param in (module.w_in, module.w_out):
                param.data = param.data.to(storage_dtype, non_blocking=non_blocking)

    def initialize_weights(self) -> None:
        """The original's initialisation (only matters when training from scratch; loading overwrites it)."""
        depth = self.config.num_layers

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(self.patch_embed.proj.weight.shape[0], -1))
        for projection in (self.time_embedding, self.caption_projection, self.pooled_caption_projection):
            nn.init.normal_(projection.linear_1.weight, std=0.02)
            nn.init.normal_(projection.linear_2.weight, std=0.02)

        mixer_std = 0.02 / math.sqrt(2 * depth)
        for i, block in enumerate(self.transformer_blocks):
            _init_block(block, 0.02 / math.sqrt(2 * (i + 1)) if self.config.depth_init else mixer_std)
        for block in self.patch_mixer_blocks:
            _init_block(block, mixer_std)
        refiner = self.caption_refiner
        _init_attention(refiner.attn, 0.02)
        _init_feed_forward(refiner.ff, 0.02)
        # Zero-initialised residual outputs: every block starts as the identity.
        nn.init.zeros_(refiner.attn.to_out[0].weight)
        nn.init.zeros_(refiner.ff.down_proj.weight)
        nn.init.zeros_(self.norm_out_modulation.weight)
        nn.init.zeros_(self.proj_out.weight)

    def pos_embed(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(1, height * width, hidden_size) positions for a token grid, cached per grid and device."""
        key = (height, width, str(device))
        if key not in self._pos_embed_cache:
            embed = microdit_2d_sincos_pos_embed(
                self.config.hidden_size, height, width, self.config.pos_interp_scale, device=device
            )
            self._pos_embed_cache[key] = embed.unsqueeze(0)
        return self._pos_embed_cache[key]

    def _run_block(self, block: MicroDiTBlock, x: torch.Tensor, context: torch.Tensor, cond: torch.Tensor):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, x, context, cond)
        return block(x, context, cond)

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        keep_ids: torch.Tensor | None = None,
        masking: str = "deferred",
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> MicroDiTTransformerOutput | tuple:
        """Run the network.

        Args:
            hidden_states: (B, C, H, W) preconditioned latents `c_in * x`; H and W divisible by `patch_size`.
            timestep: EDM noise conditioning `ln(sigma) / 4`, shape (B,), (1,) or a scalar.
            encoder_hidden_states: (B, L, caption_channels) caption token states ((B, 1, L, C) is accepted too).
            keep_ids: optional (B, K) long patch indices (row-major) kept by masking, processed in the given
                order; see `get_random_keep_ids`.
            masking: where `keep_ids` drops patches: `"deferred"` (the paper) after the patch mixer, so the mixer
                sees every patch; `"naive"` right after patch embedding, so the mixer sees only kept patches (the
                paper's ablation baseline).
            attention_kwargs: `{"scale": s}` multiplies every LoRA adapter's strength by `s` for this call (pass it
                by keyword; `apply_lora_scale` consumes it). MicroDiT's attention takes no other arguments.
            return_dict: return a [`MicroDiTTransformerOutput`] instead of a `(sample, mask)` tuple.
        """
        if attention_kwargs is not None and not isinstance(attention_kwargs, dict):
            raise TypeError(
                f"attention_kwargs must be a dict or None, got {type(attention_kwargs).__name__}; pass return_dict "
                "by keyword (return_dict=...)."
            )
        if attention_kwargs:
            raise ValueError(
                f"MicroDiT's attention takes no extra arguments, but attention_kwargs holds "
                f"{sorted(attention_kwargs)}. Only 'scale' (the LoRA strength) is supported, and only when "
                "attention_kwargs is passed by keyword."
            )
        batch, _, height, width = hidden_states.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"Latent size {height}x{width} is not divisible by the patch size {p}.")
        if encoder_hidden_states.ndim == 4:
            encoder_hidden_states = encoder_hidden_states.squeeze(1)
        grid_h, grid_w = height // p, width // p
        num_tokens = grid_h * grid_w

        x = self.patch_embed.proj(hidden_states).flatten(2).transpose(1, 2)
        x = x + self.pos_embed(grid_h, grid_w, x.device).to(x.dtype)

        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(batch)
        context = self.caption_refiner(self.caption_projection(encoder_hidden_states))
        cond = self.time_embedding(timestep, x.dtype) + self.pooled_caption_projection(context.mean(dim=1))

        if masking not in ("deferred", "naive"):
            raise ValueError(f"masking must be 'deferred' or 'naive', got {masking!r}.")
        if keep_ids is not None:
            keep_ids = self._check_keep_ids(keep_ids, batch, num_tokens, x.device)
        if keep_ids is not None and masking == "naive":
            x = torch.gather(x, 1, keep_ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

        x = self.patch_mixer_proj_in(x)
        mixer_context = self.patch_mixer_proj_context(context)
        for block in self.patch_mixer_blocks:
            x = self._run_block(block, x, mixer_context, cond)

        if keep_ids is not None and masking == "deferred":
            x = torch.gather(x, 1, keep_ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = self.patch_mixer_proj_out(x)
        for block in self.transformer_blocks:
            x = self._run_block(block, x, context, cond)

        shift, scale = self.norm_out_modulation(F.gelu(cond, approximate="tanh")).unsqueeze(1).chunk(2, dim=-1)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)

        mask = None
        if keep_ids is not None:
            full = self.mask_token.to(x.dtype).expand(batch, num_tokens, -1).clone()
            x = full.scatter(1, keep_ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
            mask = torch.ones(batch, num_tokens, device=x.device, dtype=x.dtype).scatter(1, keep_ids, 0.0)

        # Tokens carry (p, p, C) channel-last patches; fold them back to (B, C, H, W).
        x = x.view(batch, grid_h, grid_w, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(batch, -1, height, width)
        if not return_dict:
            return (x, mask)
        return MicroDiTTransformerOutput(sample=x, mask=mask)

    @staticmethod
    def _check_keep_ids(keep_ids: torch.Tensor, batch: int, num_tokens: int, device) -> torch.Tensor:
        if keep_ids.ndim != 2 or keep_ids.shape[0] != batch or keep_ids.dtype != torch.long:
            raise ValueError(
                f"keep_ids must be a (batch={batch}, K) long tensor of kept patch indices, got shape "
                f"{tuple(keep_ids.shape)} and dtype {keep_ids.dtype}; draw it with get_random_keep_ids()."
            )
        if not 0 < keep_ids.shape[1] <= num_tokens:
            raise ValueError(f"keep_ids keeps {keep_ids.shape[1]} patches, but the input has {num_tokens}.")
        return keep_ids.to(device)
