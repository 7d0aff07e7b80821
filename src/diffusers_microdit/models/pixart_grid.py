# Copyright 2026 The diffusers-microdit authors. Apache-2.0.
"""The PixArt-Σ network with a self-attention that sees the 2-D token grid: the shared base of the KV-compressed
PixArt-Σ and of LiT.

Both models keep every submodule and key of diffusers' [`PixArtTransformer2DModel`] and change only the
self-attention of each block, which needs the latent's token grid (height, width): to downsample keys/values on it
(KV compression) or to run a depthwise convolution on it (LiT). How the grid travels, in one protocol:

* [`PixArtGridTransformer2DModel.forward`] computes the grid (`H // patch_size`, `W // patch_size`) and runs
  diffusers' own PixArt forward with the grid added to `cross_attention_kwargs` as `height` and `width`.
* [`PixArtGridTransformerBlock`] takes `height`/`width` out of `cross_attention_kwargs` (or as keyword arguments,
  for direct calls) and gives them to the self-attention only, and only when the self-attention's processor
  declares `height` and `width` parameters ([`takes_token_grid`]); cross-attention never sees them.
* A submodule of the self-attention that cannot work without the grid subclasses [`TokenGridModule`]; a processor
  that does not take the grid is then an error (instead of silently skipping that submodule).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import BasicTransformerBlock, _chunked_feed_forward
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from diffusers.utils import apply_lora_scale
from torch import nn

# The constructor arguments of diffusers' PixArt (all but `self`), which the subclasses accept unchanged.
PIXART_ARGUMENT_NAMES = tuple(inspect.signature(PixArtTransformer2DModel.__init__).parameters)[1:]


def pixart_arguments(values: dict[str, Any]) -> dict[str, Any]:
    """The [`PixArtTransformer2DModel`] constructor arguments out of a subclass constructor's `locals()`."""
    return {name: values[name] for name in PIXART_ARGUMENT_NAMES}


def takes_token_grid(processor: Any) -> bool:
    """Whether an attention processor accepts the token grid: its `__call__` declares `height` and `width`
    (diffusers' `Attention.forward` only forwards declared keywords)."""
    parameters = inspect.signature(processor.__call__).parameters
    return "height" in parameters and "width" in parameters


def check_lora_scale_applied(cross_attention_kwargs: dict | None) -> None:
    """`apply_lora_scale` only sees keyword arguments; a positional dict would carry the LoRA scale, unapplied, to
    the processors."""
    if cross_attention_kwargs and "scale" in cross_attention_kwargs:
        raise ValueError(
            "cross_attention_kwargs['scale'] (the LoRA strength) was not applied: pass cross_attention_kwargs by "
            "keyword (cross_attention_kwargs={'scale': ...})."
        )


class TokenGridModule(nn.Module):
    """Marks a submodule of a self-attention that needs the token grid. `missing_grid_message` (formatted with
    `processor=`, the processor's class name) is raised when the attention's processor does not take the grid."""

    missing_grid_message = "{processor} does not take the token grid (height, width) that this self-attention needs."


class PixArtGridTransformerBlock(BasicTransformerBlock):
    """diffusers' PixArt block (`norm_type="ada_norm_single"`, same submodules and keys) whose self-attention receives
    the token grid.

    `self_attention`, if given, is called with the built block and returns the module that replaces its `attn1`, or
    `None` to keep diffusers' (called after the rest of the block is built, so the other parameters are initialised
    exactly as diffusers does).
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        self_attention: Callable[[BasicTransformerBlock], nn.Module] | None = None,
        **kwargs,
    ):
        super().__init__(dim, num_attention_heads, attention_head_dim, **kwargs)
        module = self_attention(self) if self_attention is not None else None
        if module is not None:
            self.attn1 = module

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        class_labels: torch.LongTensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        if self.norm_type != "ada_norm_single":
            raise NotImplementedError("PixArtGridTransformerBlock implements PixArt's ada_norm_single block only.")
        attn_kwargs = dict(cross_attention_kwargs or {})
        grid_height, grid_width = attn_kwargs.pop("height", None), attn_kwargs.pop("width", None)
        height = grid_height if height is None else height
        width = grid_width if width is None else width
        gligen_kwargs = attn_kwargs.pop("gligen", None)
        self_attn_kwargs = dict(attn_kwargs)
        processor = self.attn1.processor
        if takes_token_grid(processor):
            self_attn_kwargs.update(height=height, width=width)
        else:
            for module in self.attn1.children():
                if isinstance(module, TokenGridModule):
                    raise RuntimeError(module.missing_grid_message.format(processor=type(processor).__name__))

        batch = hidden_states.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(batch, 6, -1)
        ).chunk(6, dim=1)

        # 1. Self-attention on the t2i-modulated norm1 output, gated.
        norm_hidden_states = self.norm1(hidden_states) * (1 + scale_msa) + shift_msa
        attn_output = self.attn1(norm_hidden_states, attention_mask=attention_mask, **self_attn_kwargs)
        hidden_states = hidden_states + gate_msa * attn_output
        if gligen_kwargs is not None:
            hidden_states = self.fuser(hidden_states, gligen_kwargs["objs"])

        # 2. Cross-attention on the un-normalised stream, un-gated (PixArt does not apply norm2 here).
        if self.attn2 is not None:
            attn_output = self.attn2(
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                **attn_kwargs,
            )
            hidden_states = hidden_states + attn_output

        # 3. Feed-forward on the t2i-modulated norm2 output, gated.
        norm_hidden_states = self.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
        if self._chunk_size is not None:
            ff_output = _chunked_feed_forward(self.ff, norm_hidden_states, self._chunk_dim, self._chunk_size)
        else:
            ff_output = self.ff(norm_hidden_states)
        return hidden_states + gate_mlp * ff_output


class PixArtGridTransformer2DModel(PixArtTransformer2DModel, PeftAdapterMixin):
    """[`PixArtTransformer2DModel`] built from [`PixArtGridTransformerBlock`]s, whose forward hands every block the
    token grid. Subclasses decorate their own `__init__` with `@register_to_config`, pass the PixArt arguments on
    (see [`pixart_arguments`]) and supply:

    * `_make_self_attention(block)`: the block's self-attention module, or `None` to keep diffusers' `Attention`;
    * `_default_attn_processor(attn)`: the processor `set_default_attn_processor` gives an attention module;
    * `_fused_attn_processor(attn)`: the processor after `fuse_qkv_projections` (`None` keeps the current one).
    """

    _no_split_modules = ["PixArtGridTransformerBlock", "PatchEmbed"]
    _repeated_blocks = ["PixArtGridTransformerBlock"]

    def __init__(self, num_layers: int = 28, **pixart_kwargs):
        # The parent builds everything but the blocks when asked for zero of them; the grid-aware blocks (same
        # submodules, hence same keys) are built below, so no full set of parent blocks is allocated and dropped.
        super().__init__(num_layers=0, **pixart_kwargs)
        # The parent's own @register_to_config recorded num_layers=0.
        self.register_to_config(num_layers=num_layers)
        config = self.config
        self.transformer_blocks = nn.ModuleList(
            PixArtGridTransformerBlock(
                self.inner_dim,
                config.num_attention_heads,
                config.attention_head_dim,
                self_attention=self._make_self_attention,
                dropout=config.dropout,
                cross_attention_dim=config.cross_attention_dim,
                activation_fn=config.activation_fn,
                num_embeds_ada_norm=config.num_embeds_ada_norm,
                attention_bias=config.attention_bias,
                upcast_attention=config.upcast_attention,
                norm_type=config.norm_type,
                norm_elementwise_affine=config.norm_elementwise_affine,
                norm_eps=config.norm_eps,
                attention_type=config.attention_type,
            )
            for _ in range(num_layers)
        )

    # ------------------------------------------------------------------ hooks

    def _make_self_attention(self, block: BasicTransformerBlock) -> nn.Module | None:
        return None

    def _default_attn_processor(self, attn: Attention) -> Any:
        raise NotImplementedError

    def _fused_attn_processor(self, attn: Attention) -> Any | None:
        return None

    # ------------------------------------------------------------------ attention processors

    def set_default_attn_processor(self) -> None:
        """Give every attention module the model's default processor (one that takes the token grid where the
        self-attention needs it; the parent's `AttnProcessor` would not)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.set_processor(self._default_attn_processor(module))

    def fuse_qkv_projections(self) -> None:
        """Fuse q/k/v (self-attention) into `to_qkv` and k/v (cross-attention) into `to_kv` (diffusers'
        `Attention.fuse_projections`), keeping processors that read the fused layers and take the token grid (the
        parent would switch every module to `FusedAttnProcessor2_0`, which takes no grid)."""
        self.original_attn_processors = self.attn_processors
        for module in self.modules():
            if isinstance(module, Attention):
                module.fuse_projections(fuse=True)
                processor = self._fused_attn_processor(module)
                if processor is not None:
                    module.set_processor(processor)

    def unfuse_qkv_projections(self) -> None:
        """Undo `fuse_qkv_projections`: drop the fused layers and restore the previous processors (the parent only
        restores the processors)."""
        for module in self.modules():
            if isinstance(module, Attention) and module.fused_projections:
                for name in ("to_qkv", "to_kv"):
                    if hasattr(module, name):
                        delattr(module, name)
                module.fused_projections = False
        if getattr(self, "original_attn_processors", None) is not None:
            self.set_attn_processor(self.original_attn_processors)
            self.original_attn_processors = None

    # ------------------------------------------------------------------ forward

    @apply_lora_scale("cross_attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Same inputs and outputs as [`PixArtTransformer2DModel.forward`] (which runs it); the latent height and
        width must be multiples of `patch_size`.

        Args:
            hidden_states: (B, C, H, W) latents.
            encoder_hidden_states: (B, L, caption_channels) text states ((B, 1, L, C) is accepted too).
            timestep: (B,) diffusion timesteps.
            added_cond_kwargs: `{"resolution": ..., "aspect_ratio": ...}` (required with additional conditions).
            cross_attention_kwargs: extra keyword arguments for the attention processors; its `"scale"` entry (pass
                the dict by keyword) multiplies every LoRA adapter's strength for this call and is not forwarded.
                The token grid (`H // patch_size`, `W // patch_size`) is added as `height` and `width`, which
                [`PixArtGridTransformerBlock`] hands to the self-attention only.
            attention_mask: optional (B, N) keep-mask for self-attention (if the self-attention allows one).
            encoder_attention_mask: (B, L) keep-mask (1 keep, 0 drop) or (B, 1, L) additive bias for the text.
            return_dict: return a `Transformer2DModelOutput` instead of a 1-tuple.
        """
        check_lora_scale_applied(cross_attention_kwargs)
        p = self.config.patch_size
        latent_height, latent_width = hidden_states.shape[-2:]
        if latent_height % p or latent_width % p:
            raise ValueError(
                f"Latent height and width must be multiples of patch_size={p}, got {latent_height}x{latent_width} "
                f"(image sizes must be multiples of {p} x the VAE scale factor)."
            )
        grid = {"height": latent_height // p, "width": latent_width // p}
        return super().forward(
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            timestep=timestep,
            added_cond_kwargs=added_cond_kwargs,
            cross_attention_kwargs={**(cross_attention_kwargs or {}), **grid},
            attention_mask=attention_mask,
            encoder_attention_mask=encoder_attention_mask,
            return_dict=return_dict,
        )
