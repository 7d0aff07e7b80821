# Copyright 2026 The diffusers-microdit authors. Apache-2.0.
"""LiT ("LiT: Delving into a Simplified Linear Diffusion Transformer for Image Generation", 2025) as a diffusers model.

LiT is PixArt-Σ with the softmax self-attention of every block replaced by a simplified linear attention, per head

    out_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / (φ(q_i)ᵀ Σ_j φ(k_j) + N·ε)  +  DWC(V)_i ,    φ = ReLU,

followed by the usual output projection. `DWC` is a depthwise 5x5 convolution of the values on the 2-D token grid,
so the self-attention needs the grid's height and width. Cost and memory are linear in the number of tokens N: only
per-head `head_dim x head_dim` summaries are formed, never an N x N matrix. Cross-attention to the text stays
softmax; adaLN-single, caption projection, MLP, learned-sigma output and position-embedding interpolation are
PixArt-Σ's own.

[`LiTTransformer2DModel`] subclasses diffusers' [`PixArtTransformer2DModel`]: every key keeps its PixArt-Σ name, so
[`LiTTransformer2DModel.from_pixart`] can inherit all weights but the self-attention projections. The only new
parameters are `transformer_blocks.{i}.attn1.value_conv.{weight,bias}`.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import BasicTransformerBlock, _chunked_feed_forward
from diffusers.models.attention_processor import Attention, AttnProcessor, FusedAttnProcessor2_0
from diffusers.models.modeling_outputs import Transformer2DModelOutput

# Must be a name in this module: diffusers' pipeline loader looks up the loadable base classes (`ModelMixin`, ...) as
# attributes of the module recorded in model_index.json to find the component's `from_pretrained`.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from diffusers.utils import apply_lora_scale, logging
from torch import nn

from .transformer_pixart_kv import check_lora_scale_applied

logger = logging.get_logger(__name__)

VALUE_CONV_KERNEL_SIZE = 5
VALUE_CONV_CHANNELS = ("head_dim", "inner_dim")
VALUE_CONV_INITS = ("default", "zeros")


def _is_self_attention_key(key: str) -> bool:
    return ".attn1." in key


def linear_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, eps: float = 1e-6
) -> torch.Tensor:
    """Normalised ReLU linear attention of (batch, tokens, channels) inputs split into `heads` heads.

    Per head: `out_i = φ(q_i)ᵀ mean_j(φ(k_j) v_jᵀ) / (φ(q_i)ᵀ mean_j φ(k_j) + eps)` with `φ = ReLU`, i.e. the sum form
    with `eps` scaled by the token count. Means rather than sums keep the summaries independent of resolution.
    Computed in at least float32 (the summaries accumulate over all tokens) and returned in the query's dtype.
    """
    dtype = torch.promote_types(query.dtype, torch.float32)
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2).to(dtype) for t in (query, key, value))
    q, k = F.relu(q), F.relu(k)
    tokens = k.shape[-2]
    key_value = (k.transpose(-2, -1) @ v) / tokens  # (B, heads, d, d)
    key_mean = k.mean(dim=-2, keepdim=True)  # (B, heads, 1, d)
    out = (q @ key_value) / ((q * key_mean).sum(dim=-1, keepdim=True) + eps)
    return out.transpose(1, 2).flatten(2).to(query.dtype)


class LiTValueConv(nn.Conv2d):
    """Depthwise `5 x 5` convolution (stride 1, padding 2) of the values on the token grid: LiT's local branch.

    Input and output are (batch, tokens, channels) with row-major tokens (`h * width + w`, as `PatchEmbed`
    flattens). `channels="head_dim"` convolves every head with the same `head_dim` filters (the FLatten-Transformer
    layout); `"inner_dim"` gives every channel its own filter. `init="default"` keeps PyTorch's Conv2d
    initialisation; `"zeros"` starts the branch at zero.
    """

    def __init__(self, dim: int, heads: int, channels: str = "head_dim", init: str = "default"):
        if channels not in VALUE_CONV_CHANNELS:
            raise ValueError(f"Unknown value_conv_channels {channels!r}; choose one of {list(VALUE_CONV_CHANNELS)}.")
        if init not in VALUE_CONV_INITS:
            raise ValueError(f"Unknown value_conv_init {init!r}; choose one of {list(VALUE_CONV_INITS)}.")
        conv_channels = dim // heads if channels == "head_dim" else dim
        super().__init__(
            conv_channels,
            conv_channels,
            kernel_size=VALUE_CONV_KERNEL_SIZE,
            padding=VALUE_CONV_KERNEL_SIZE // 2,
            groups=conv_channels,
        )
        self.heads = heads
        self.channels = channels
        self.init = init
        if init == "zeros":
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, value: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, tokens, dim = value.shape
        grid = value.transpose(1, 2).reshape(batch, dim, height, width)
        if self.channels == "head_dim":  # heads become batch entries, so they share the filters
            grid = grid.reshape(batch * self.heads, dim // self.heads, height, width)
        return super().forward(grid).reshape(batch, dim, tokens).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.heads}, channels={self.channels!r}, init={self.init!r}"


class LiTLinearAttnProcessor:
    """Attention processor for LiT self-attention: [`linear_attention`] of the projected q/k/v plus the depthwise
    conv of V (`attn.value_conv`), then the output projection.

    Needs the token grid (`height`, `width`); [`LiTTransformer2DModel`] passes it. A replacement processor for
    [`LiTLinearAttention`] modules must accept `height` and `width` keyword arguments too. Reads the fused `to_qkv`
    projection when the module has one (`fuse_qkv_projections`); the value conv then sees the same V slice.
    """

    def __call__(
        self,
        attn: "LiTLinearAttention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("LiT linear attention is self-attention only; cross-attention stays softmax.")
        if attention_mask is not None:
            raise ValueError(
                "LiT's linear self-attention takes no attention mask (every latent token sees every other); "
                "pass attention_mask=None."
            )
        if height is None or width is None:
            raise ValueError(
                "LiT self-attention needs the token grid's height and width for its depthwise conv on the values; "
                "call it through LiTTransformer2DModel, or pass height= and width= (latent size // patch size)."
            )
        tokens = hidden_states.shape[1]
        if height * width != tokens:
            raise ValueError(f"Token grid {height}x{width} does not match the {tokens} tokens.")

        if attn.fused_projections and hasattr(attn, "to_qkv"):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        out = linear_attention(query, key, value, attn.heads, attn.linear_attention_eps)
        out = out + attn.value_conv(value, height, width)
        return attn.to_out[1](attn.to_out[0](out))


class LiTLinearAttention(Attention):
    """diffusers' [`Attention`] (same `to_q`, `to_k`, `to_v`, `to_out.0` keys and shapes) computing LiT's linear
    self-attention: it adds the depthwise value conv (`value_conv`) and the normaliser's `eps`, and defaults to
    [`LiTLinearAttnProcessor`].

    The projections start with PixArt's initialisation (xavier-uniform weights, zero biases), the value conv as
    chosen by `value_conv_init`.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 2,
        bias: bool = True,
        dropout: float = 0.0,
        eps: float = 1e-6,
        value_conv_channels: str = "head_dim",
        value_conv_init: str = "default",
    ):
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or dim % heads:
            raise ValueError(f"linear_attention_heads must be a positive divisor of the width {dim}, got {heads!r}.")
        if not eps > 0:
            raise ValueError(f"linear_attention_eps must be positive (it keeps the normaliser non-zero), got {eps!r}.")
        super().__init__(
            query_dim=dim,
            heads=heads,
            dim_head=dim // heads,
            dropout=dropout,
            bias=bias,
            out_bias=True,
            processor=LiTLinearAttnProcessor(),
        )
        self.linear_attention_eps = eps
        self.value_conv = LiTValueConv(dim, heads, value_conv_channels, value_conv_init)
        for linear in (self.to_q, self.to_k, self.to_v, self.to_out[0]):
            nn.init.xavier_uniform_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)


def _takes_token_grid(processor: Any) -> bool:
    parameters = inspect.signature(processor.__call__).parameters
    return "height" in parameters and "width" in parameters


class LiTTransformerBlock(BasicTransformerBlock):
    """diffusers' PixArt block (`norm_type="ada_norm_single"`, same submodules and keys) whose self-attention is a
    [`LiTLinearAttention`]. The token grid arrives as `height`/`width` entries of `cross_attention_kwargs` and is
    given to the self-attention only."""

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        linear_attention_heads: int = 2,
        linear_attention_eps: float = 1e-6,
        value_conv_channels: str = "head_dim",
        value_conv_init: str = "default",
        **kwargs,
    ):
        super().__init__(dim, num_attention_heads, attention_head_dim, **kwargs)
        self.attn1 = LiTLinearAttention(
            dim,
            heads=linear_attention_heads,
            bias=self.attention_bias,
            dropout=self.dropout,
            eps=linear_attention_eps,
            value_conv_channels=value_conv_channels,
            value_conv_init=value_conv_init,
        )

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
    ) -> torch.Tensor:
        attn_kwargs = dict(cross_attention_kwargs or {})
        grid = {"height": attn_kwargs.pop("height", None), "width": attn_kwargs.pop("width", None)}
        if not _takes_token_grid(self.attn1.processor):
            raise RuntimeError(
                f"LiT self-attention needs a processor that takes the token grid (height, width); "
                f"{type(self.attn1.processor).__name__} does not. Use LiTLinearAttnProcessor "
                "(e.g. model.set_default_attn_processor())."
            )
        batch = hidden_states.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(batch, 6, -1)
        ).chunk(6, dim=1)

        # 1. Linear self-attention on the t2i-modulated norm1 output, gated.
        norm_hidden_states = self.norm1(hidden_states) * (1 + scale_msa) + shift_msa
        attn_output = self.attn1(norm_hidden_states, attention_mask=attention_mask, **attn_kwargs, **grid)
        hidden_states = hidden_states + gate_msa * attn_output

        # 2. Softmax cross-attention on the un-normalised stream, un-gated (PixArt applies no norm here).
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


class LiTTransformer2DModel(PixArtTransformer2DModel, PeftAdapterMixin):
    r"""LiT transformer: PixArt-Σ with linear self-attention (ReLU kernel, normalised, depthwise 5x5 conv on V).

    All [`PixArtTransformer2DModel`] arguments keep their meaning and defaults (`num_attention_heads` and
    `attention_head_dim` set the width and the softmax cross-attention heads). Latent height and width may be any
    multiple of `patch_size`.

    Args:
        linear_attention_heads (`int`, defaults to 2):
            Heads of the linear self-attention (LiT uses few heads; 2 for text-to-image). Must divide the width;
            it changes no projection shape.
        linear_attention_eps (`float`, defaults to 1e-6):
            ε of the normaliser `φ(q_i)ᵀ mean_j φ(k_j) + ε` (ε·N in the sum form). The paper gives no value; 1e-6
            with the mean form is the FLatten-Transformer choice. It only matters when a query has no positive
            overlap with any key.
        value_conv_channels (`str`, defaults to `"head_dim"`):
            Layout of the depthwise conv on V: `"head_dim"` (one set of `head_dim` filters shared by all heads,
            as in the FLatten-Transformer module LiT's design follows) or `"inner_dim"` (one filter per channel).
        value_conv_init (`str`, defaults to `"default"`):
            `"default"`: PyTorch's Conv2d initialisation; `"zeros"`: the conv branch starts at zero, so a fresh
            layer begins as pure linear attention. The paper does not say.

    Start from a trained PixArt-Σ with [`~LiTTransformer2DModel.from_pixart`], which inherits everything but the
    self-attention projections.
    """

    _no_split_modules = ["LiTTransformerBlock", "PatchEmbed"]
    _repeated_blocks = ["LiTTransformerBlock"]
    # PixArt's own patterns, plus the depthwise value convs: `head_dim * 25` weights per block on the value path,
    # which float8 storage would round for no memory gain.
    _skip_layerwise_casting_patterns = [*PixArtTransformer2DModel._skip_layerwise_casting_patterns, "value_conv"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = 8,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int = 128,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: int | None = None,
        use_additional_conditions: bool | None = None,
        caption_channels: int | None = None,
        attention_type: str | None = "default",
        linear_attention_heads: int = 2,
        linear_attention_eps: float = 1e-6,
        value_conv_channels: str = "head_dim",
        value_conv_init: str = "default",
    ):
        if attention_type != "default":
            raise NotImplementedError(f"LiT blocks support attention_type='default' only, got {attention_type!r}.")
        if cross_attention_dim is None:
            raise ValueError("LiT is text-conditioned: cross_attention_dim must be set (PixArt-Σ uses the width).")
        # The parent builds everything but the blocks when asked for zero of them; the LiT blocks (same keys) are
        # built below, so no set of softmax blocks is allocated and dropped.
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=0,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            cross_attention_dim=cross_attention_dim,
            attention_bias=attention_bias,
            sample_size=sample_size,
            patch_size=patch_size,
            activation_fn=activation_fn,
            num_embeds_ada_norm=num_embeds_ada_norm,
            upcast_attention=upcast_attention,
            norm_type=norm_type,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
            interpolation_scale=interpolation_scale,
            use_additional_conditions=use_additional_conditions,
            caption_channels=caption_channels,
            attention_type=attention_type,
        )
        # The parent's own @register_to_config recorded num_layers=0.
        self.register_to_config(num_layers=num_layers)
        self.transformer_blocks = nn.ModuleList(
            LiTTransformerBlock(
                self.inner_dim,
                num_attention_heads,
                attention_head_dim,
                linear_attention_heads=linear_attention_heads,
                linear_attention_eps=linear_attention_eps,
                value_conv_channels=value_conv_channels,
                value_conv_init=value_conv_init,
                dropout=dropout,
                cross_attention_dim=cross_attention_dim,
                activation_fn=activation_fn,
                num_embeds_ada_norm=num_embeds_ada_norm,
                attention_bias=attention_bias,
                upcast_attention=upcast_attention,
                norm_type=norm_type,
                norm_elementwise_affine=norm_elementwise_affine,
                norm_eps=norm_eps,
            )
            for _ in range(num_layers)
        )

    @classmethod
    def from_pixart(
        cls,
        pixart_transformer: PixArtTransformer2DModel,
        num_attention_heads: int = 2,
        linear_attention_eps: float = 1e-6,
        value_conv_channels: str = "head_dim",
        value_conv_init: str = "default",
        output_loading_info: bool = False,
    ) -> "LiTTransformer2DModel" | tuple["LiTTransformer2DModel", dict[str, list[str]]]:
        """Build a LiT student from a PixArt-Σ transformer (LiT's weight inheritance).

        `num_attention_heads` is the number of heads of the student's linear self-attention (its config's
        `linear_attention_heads`; cross-attention keeps the teacher's heads). The student gets the teacher's
        configuration and a copy of every weight except the self-attention ones
        (`transformer_blocks.{i}.attn1.*`): the Q/K/V/output projections are freshly initialised (PixArt's xavier
        init) and the depthwise value conv is new. Self-attention extras of the teacher, such as the KV-compression
        modules of [`PixArtSigmaKVTransformer2DModel`], are not carried over. Returned on the teacher's device and
        dtype, in eval mode.

        With `output_loading_info=True` returns `(model, info)` where `info["inherited_keys"]` and
        `info["not_inherited_keys"]` are the sorted student state-dict keys copied from the teacher and initialised
        fresh; the latter are also logged (info level).
        """
        if not isinstance(pixart_transformer, PixArtTransformer2DModel) or isinstance(
            pixart_transformer, LiTTransformer2DModel
        ):
            raise TypeError(
                "from_pixart takes a PixArt-Σ transformer (PixArtTransformer2DModel, e.g. "
                "PixArtTransformer2DModel.from_pretrained(repo, subfolder='transformer')), got "
                f"{type(pixart_transformer).__name__}."
            )
        pixart_arguments = inspect.signature(PixArtTransformer2DModel.__init__).parameters
        config = {key: value for key, value in pixart_transformer.config.items() if key in pixart_arguments}
        model = cls(
            **config,
            linear_attention_heads=num_attention_heads,
            linear_attention_eps=linear_attention_eps,
            value_conv_channels=value_conv_channels,
            value_conv_init=value_conv_init,
        )
        teacher = {k: v for k, v in pixart_transformer.state_dict().items() if not _is_self_attention_key(k)}
        result = model.load_state_dict(teacher, strict=False)
        if result.unexpected_keys:
            raise ValueError(
                "The PixArt-Σ transformer has weights outside self-attention that a LiT model has no place for: "
                f"{sorted(result.unexpected_keys)}. Convert a PixArt-Σ transformer with the standard modules."
            )
        not_inherited = sorted(result.missing_keys)
        unexpected_fresh = [key for key in not_inherited if not _is_self_attention_key(key)]
        if unexpected_fresh:
            raise RuntimeError(f"from_pixart left non-attention weights uninherited: {unexpected_fresh}.")
        logger.info(
            f"LiT from PixArt-Σ: inherited {len(teacher)} tensors; {len(not_inherited)} self-attention tensors are "
            f"freshly initialised: {not_inherited}"
        )
        # The teacher's `dtype` is its compute dtype even under layerwise casting (where some weights are float8).
        model = model.to(pixart_transformer.device).eval()
        if pixart_transformer.dtype != model.dtype:  # cast only when needed: diffusers warns on every dtype cast
            model = model.to(pixart_transformer.dtype)
        if output_loading_info:
            return model, {"inherited_keys": sorted(teacher), "not_inherited_keys": not_inherited}
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, **kwargs):
        """[`ModelMixin.from_pretrained`], but a checkpoint without the linear-attention weights (e.g. a PixArt-Σ
        folder) is an error instead of a model with uninitialised layers: convert those with `from_pixart`."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, output_loading_info=True, **kwargs
        )
        missing = sorted(key for key in loading_info["missing_keys"] if _is_self_attention_key(key))
        if missing:
            raise ValueError(
                f"{pretrained_model_name_or_path} has no LiT self-attention weights (missing {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}); it is probably a PixArt-Σ checkpoint. Convert it with "
                "LiTTransformer2DModel.from_pixart(PixArtTransformer2DModel.from_pretrained(...))."
            )
        return (model, loading_info) if output_loading_info else model

    def set_default_attn_processor(self) -> None:
        """[`LiTLinearAttnProcessor`] for the self-attention and, as the parent, `AttnProcessor` for the softmax
        cross-attention (the parent's would put softmax attention into the LiT layers)."""
        for module in self.modules():
            if isinstance(module, LiTLinearAttention):
                module.set_processor(LiTLinearAttnProcessor())
            elif isinstance(module, Attention):
                module.set_processor(AttnProcessor())

    def fuse_qkv_projections(self) -> None:
        """Fuse q/k/v of every linear self-attention into `to_qkv` and k/v of every softmax cross-attention into
        `to_kv` (diffusers' `Attention.fuse_projections`). The self-attention keeps its processor
        ([`LiTLinearAttnProcessor`] reads `to_qkv`); the cross-attention gets diffusers' `FusedAttnProcessor2_0`.
        Unlike the parent's, this never puts softmax attention into the LiT layers."""
        self.original_attn_processors = self.attn_processors
        for module in self.modules():
            if isinstance(module, Attention):
                module.fuse_projections(fuse=True)
                if not isinstance(module, LiTLinearAttention):
                    module.set_processor(FusedAttnProcessor2_0())

    def unfuse_qkv_projections(self) -> None:
        """Undo `fuse_qkv_projections`: drop the fused layers and restore the previous processors."""
        for module in self.modules():
            if isinstance(module, Attention) and module.fused_projections:
                for name in ("to_qkv", "to_kv"):
                    if hasattr(module, name):
                        delattr(module, name)
                module.fused_projections = False
        if getattr(self, "original_attn_processors", None) is not None:
            self.set_attn_processor(self.original_attn_processors)
            self.original_attn_processors = None

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
        """Same inputs and outputs as [`PixArtTransformer2DModel.forward`]; the latent height and width must be
        multiples of `patch_size`. `attention_mask` (self-attention) must be `None`: linear attention has none.

        The token grid (`H // patch_size`, `W // patch_size`) rides in `cross_attention_kwargs` as `height` and
        `width`, which [`LiTTransformerBlock`] hands to the self-attention only. A `"scale"` entry (pass the dict by
        keyword) multiplies every LoRA adapter's strength for this call and is not forwarded.
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
