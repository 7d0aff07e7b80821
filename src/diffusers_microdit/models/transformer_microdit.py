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
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed_from_grid
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, apply_lora_scale
from torch import nn

from ..loaders.single_file import OriginalCheckpointLoaderMixin
from .microdit_layers import (
    MicroDiTBlock,
    MicroDiTCaptionRefiner,
    MicroDiTExpertChoiceMoE,
    MicroDiTNormProjection,
    MicroDiTProjection,
    MicroDiTSwiGLU,
    MicroDiTTimestepEmbedding,
    attention_inner_dim,
    init_attention,
    init_block,
    init_feed_forward,
    swiglu_hidden_dim,
)

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


class MicroDiTTransformer2DModel(
    ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin, OriginalCheckpointLoaderMixin
):
    """MicroDiT text-to-image transformer (EDM F-network) with patch mixer, deferred masking and expert-choice MoE.

    Defaults are `MicroDiT_XL_2` at 256 px (32x32 latents); `from_preset("MicroDiT_Tiny_2")` builds the other
    original size, and `from_single_file(...)` (alias `from_original`) converts the official micro_diffusion
    checkpoints: `original_config` takes the original `DiT(...)` keyword names (`input_size`, `dim`, `depth`,
    `head_dim`, ...); sizes readable from the weights are inferred, other missing keys default to MicroDiT_XL_2 (or
    MicroDiT_Tiny_2 when the width is 512).

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
        attention_bias: the original's single `use_bias` switch. It adds biases to the q/k/v/out projections of
            every attention (self- and cross-attention of the mixer and backbone blocks, and the caption refiner's),
            to the gate/up/down linears of every dense SwiGLU feed-forward (blocks and caption refiner), and to the
            linears of the patch-mixer in/context/out projections. It never affects the MoE experts and routers,
            the caption and pooled-caption projections, the timestep embedding, the adaLN modulations, the
            patch embedding or the output layer (those have the original's fixed bias settings).
        num_experts, expert_capacity, experts_every_n: expert-choice MoE in every `experts_every_n`-th block:
            patch-mixer blocks 2.. and backbone blocks ..depth-2 whose 1-based index is a multiple of
            `experts_every_n` (never the first mixer block nor the last backbone block). `num_experts=0` builds no
            MoE at all (dense SwiGLU everywhere; `expert_capacity` and `experts_every_n` are then unused).
        pos_interp_scale: positions are `index / pos_interp_scale` (2.0 for the 512-px checkpoints).
        norm_eps: LayerNorm epsilon everywhere.
        depth_init: deeper backbone blocks get smaller output-projection init (only matters when training from
            scratch).
        caption_pos_embed_max_length: when set, a learned position embedding for up to this many caption tokens is
            added to the projected caption before the refiner. The original has none (`None`, the official
            checkpoints): T5 and OpenCLIP token states already carry their context. A small encoder whose token
            states barely depend on their neighbours (MiniLM: "red" at two places of one caption differs by cosine
            0.96, whole captions with swapped colours by 0.99) hands the refiner a bag of words, in which no colour
            can be bound to its noun nor "left of" be told from "right of"; positions make the word order visible.
    """

    _original_checkpoint_converter = "microdit:convert_microdit_checkpoint"
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
        caption_pos_embed_max_length: int | None = None,
    ):
        super().__init__()
        if patch_mixer_layers < 1:
            raise ValueError("MicroDiT needs at least one patch-mixer layer (patch_mixer_layers >= 1).")
        for name, width in (("hidden_size", hidden_size), ("patch_mixer_hidden_size", patch_mixer_hidden_size)):
            if width % attention_head_dim:
                raise ValueError(f"{name}={width} must be divisible by attention_head_dim={attention_head_dim}.")
        if caption_pos_embed_max_length is not None and caption_pos_embed_max_length < 1:
            raise ValueError(
                f"caption_pos_embed_max_length must be None (no caption positions) or >= 1, got "
                f"{caption_pos_embed_max_length!r}."
            )
        if num_experts < 0:
            raise ValueError(f"num_experts must be >= 0 (0: no MoE), got {num_experts!r}.")
        if num_experts and experts_every_n < 1:
            raise ValueError(
                f"experts_every_n must be >= 1 (or pass num_experts=0 for no MoE), got {experts_every_n!r}."
            )
        qkv_ratios = expand_multipliers(qkv_multipliers, (0.5, 1.0), num_layers)
        ffn_ratios = expand_multipliers(ffn_multipliers, (0.5, 4.0), num_layers)
        dim, mixer_dim, head_dim = hidden_size, patch_mixer_hidden_size, attention_head_dim
        self.gradient_checkpointing = False

        # Conv2d patchify then flatten to row-major tokens; positions are added in `forward` (any grid size).
        self.patch_embed = PatchEmbed(
            sample_size, sample_size, patch_size, in_channels, dim, layer_norm=False, flatten=True, bias=True,
            pos_embed_type=None,
        )  # fmt: skip
        self.time_embedding = MicroDiTTimestepEmbedding(dim)
        self.caption_projection = MicroDiTProjection(caption_channels, dim, norm_eps)
        self.caption_pos_embed = (
            nn.Parameter(torch.zeros(1, caption_pos_embed_max_length, dim)) if caption_pos_embed_max_length else None
        )
        self.caption_refiner = MicroDiTCaptionRefiner(dim, head_dim, multiple_of, attention_bias, norm_eps)
        self.pooled_caption_projection = MicroDiTProjection(dim, dim, norm_eps)

        def feed_forward(width: int, ratio: float, moe: bool) -> nn.Module:
            if moe:
                moe_hidden = multiple_of * math.ceil(int(width * ratio) / multiple_of)
                return MicroDiTExpertChoiceMoE(width, moe_hidden, num_experts, expert_capacity)
            return MicroDiTSwiGLU(width, swiglu_hidden_dim(int(width * ratio), multiple_of), attention_bias)

        # MoE placement follows the original: mixer blocks 1.. and backbone blocks ..depth-2 whose 1-based index
        # is a multiple of experts_every_n.
        def has_moe(index: int) -> bool:
            return num_experts > 0 and (index + 1) % experts_every_n == 0

        self.patch_mixer_blocks = nn.ModuleList(
            MicroDiTBlock(
                mixer_dim,
                dim,
                head_dim,
                attention_inner_dim(mixer_dim, head_dim, patch_mixer_qkv_ratio),
                feed_forward(mixer_dim, patch_mixer_mlp_ratio, moe=i >= 1 and has_moe(i)),
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
                feed_forward(dim, ffn_ratios[i], moe=i < num_layers - 1 and has_moe(i)),
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
            init_block(block, 0.02 / math.sqrt(2 * (i + 1)) if self.config.depth_init else mixer_std)
        for block in self.patch_mixer_blocks:
            init_block(block, mixer_std)
        refiner = self.caption_refiner
        init_attention(refiner.attn, 0.02)
        init_feed_forward(refiner.ff, 0.02)
        # Zero-initialised residual outputs: every block starts as the identity.
        nn.init.zeros_(refiner.attn.to_out[0].weight)
        nn.init.zeros_(refiner.ff.down_proj.weight)
        nn.init.zeros_(self.norm_out_modulation.weight)
        nn.init.zeros_(self.proj_out.weight)
        if self.caption_pos_embed is not None:
            nn.init.trunc_normal_(self.caption_pos_embed, std=0.02)

    def pos_embed(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(1, height * width, hidden_size) positions for a token grid, cached per grid and device."""
        key = (height, width, str(device))
        if key not in self._pos_embed_cache:
            embed = microdit_2d_sincos_pos_embed(
                self.config.hidden_size, height, width, self.config.pos_interp_scale, device=device
            )
            self._pos_embed_cache[key] = embed.unsqueeze(0)
        return self._pos_embed_cache[key]

    def _run_block(
        self, block: MicroDiTBlock, x: torch.Tensor, context: torch.Tensor, cond: torch.Tensor, caption_mask
    ) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, x, context, cond, caption_mask)
        return block(x, context, cond, caption_mask)

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
        encoder_attention_mask: torch.Tensor | None = None,  # last: earlier positional calls keep their meaning
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
            encoder_attention_mask: optional (B, L) keep-mask of the caption tokens (1 or True: a token, 0 or False:
                padding), as the tokenizer returns it. Padded tokens are then hidden from the caption refiner and
                every cross-attention, and left out of the pooled caption. `None` (the original, and the official
                checkpoints) uses every position.
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

        x = self.patch_embed(hidden_states)
        x = x + self.pos_embed(grid_h, grid_w, x.device).to(x.dtype)

        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(batch)
        caption_mask = None
        if encoder_attention_mask is not None:
            keep = self._check_caption_mask(encoder_attention_mask, encoder_hidden_states.shape[:2], x.device)
            caption_mask = keep[:, None, None, :]  # (B, 1, 1, L): broadcast over heads and queries
        context = self.caption_projection(encoder_hidden_states)
        if self.caption_pos_embed is not None:
            if context.shape[1] > self.caption_pos_embed.shape[1]:
                raise ValueError(
                    f"The caption has {context.shape[1]} tokens, but the model has positions for "
                    f"{self.caption_pos_embed.shape[1]} (caption_pos_embed_max_length): tokenize with "
                    f"max_length={self.caption_pos_embed.shape[1]} or fewer."
                )
            context = context + self.caption_pos_embed[:, : context.shape[1]].to(context.dtype)
        context = self.caption_refiner(context, caption_mask)
        if caption_mask is None:
            pooled = context.mean(dim=1)
        else:
            weights = keep.to(context.dtype).unsqueeze(-1)
            pooled = (context * weights).sum(dim=1) / weights.sum(dim=1)
        cond = self.time_embedding(timestep, x.dtype) + self.pooled_caption_projection(pooled)

        if masking not in ("deferred", "naive"):
            raise ValueError(f"masking must be 'deferred' or 'naive', got {masking!r}.")
        if keep_ids is not None:
            keep_ids = self._check_keep_ids(keep_ids, batch, num_tokens, x.device)
        if keep_ids is not None and masking == "naive":
            x = torch.gather(x, 1, keep_ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

        x = self.patch_mixer_proj_in(x)
        mixer_context = self.patch_mixer_proj_context(context)
        for block in self.patch_mixer_blocks:
            x = self._run_block(block, x, mixer_context, cond, caption_mask)

        if keep_ids is not None and masking == "deferred":
            x = torch.gather(x, 1, keep_ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = self.patch_mixer_proj_out(x)
        for block in self.transformer_blocks:
            x = self._run_block(block, x, context, cond, caption_mask)

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
    def _check_caption_mask(mask: torch.Tensor, caption_shape: torch.Size, device) -> torch.Tensor:
        """The (B, L) caption keep-mask as booleans on `device`; every caption must keep a token."""
        if tuple(mask.shape) != tuple(caption_shape):
            raise ValueError(
                f"encoder_attention_mask must be a (batch, tokens) = {tuple(caption_shape)} keep-mask of the caption, "
                f"got shape {tuple(mask.shape)}; pass the tokenizer's attention_mask."
            )
        keep = mask.to(device=device, dtype=torch.bool)
        if not keep.any(dim=1).all():
            raise ValueError(
                "encoder_attention_mask hides every token of a caption; keep at least one (an all-ones mask for the "
                "null caption)."
            )
        return keep

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
