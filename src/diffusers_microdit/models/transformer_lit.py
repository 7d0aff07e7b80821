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

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor, FusedAttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (see the package docstring)
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from diffusers.utils import logging
from torch import nn

from .pixart_grid import PixArtGridTransformer2DModel, TokenGridModule, pixart_arguments

logger = logging.get_logger(__name__)

VALUE_CONV_KERNEL_SIZE = 5
VALUE_CONV_CHANNELS = ("head_dim", "inner_dim")
VALUE_CONV_INITS = ("default", "zeros")
# Tokens per float32 scratch block of the in-place linear attention (`linear_attention_`).
SCRATCH_CHUNK_TOKENS = 256


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


def _token_chunks(tokens: int):
    """Slices of `SCRATCH_CHUNK_TOKENS` consecutive tokens covering `tokens`."""
    return (slice(start, start + SCRATCH_CHUNK_TOKENS) for start in range(0, tokens, SCRATCH_CHUNK_TOKENS))


def _accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32, or the tensor's dtype when it is wider (float64)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _normalised_summaries(
    key: torch.Tensor, value: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 (float64 for float64) summaries of one head's (tokens, head_dim) φ(key) and value, scaled.

    Returns `(Σ_j φ(k_j) v_jᵀ, Σ_j φ(k_j), N·ε)` times `1 / max Σ_j φ(k_j)`: the ratio `out` is unchanged by
    the common scale, and the scaled key sum is at most 1 and `|summary| ≤ max |v|` at any token count, so the
    products with a low-precision query stay in range.
    """
    tokens, accumulate = key.shape[0], _accumulation_dtype(key)
    if key.dtype != torch.float16:  # float32's exponent range (bfloat16 too): sums over all tokens cannot overflow
        key_value, key_sum = (key.T @ value).to(accumulate), key.sum(dim=0).to(accumulate)
    else:  # float16 sums over all tokens can overflow: add float32 sums of token chunks
        key_value = key_sum = 0
        for rows in _token_chunks(tokens):
            chunk = key[rows].float()
            key_value = key_value + chunk.T @ value[rows].float()
            key_sum = key_sum + chunk.sum(dim=0)
    scale = 1 / key_sum.amax().clamp_min(tokens * eps)
    return key_value.mul_(scale), key_sum.mul_(scale), tokens * eps * scale


def _fits_float16(query: torch.Tensor, key_value: torch.Tensor) -> bool:
    """Whether no product of one head's φ(query) with its normalised summary can overflow float16 (2x margin).

    Each output entry is at most the query's row sum times the largest summary entry, and the normaliser at most
    the row sum (the scaled key sum is at most 1), whatever the token count.
    """
    row_sum = query.sum(dim=1, dtype=torch.float32).amax()
    return (row_sum * key_value.abs().amax().clamp_min(1)).item() <= torch.finfo(torch.float16).max / 2


def _attend_one_head_(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, eps: float) -> None:
    """One head of [`linear_attention_`] on (tokens, head_dim) views of φ(q), φ(k) and v: the output overwrites
    `key`. Its own function so that its summary is freed before the next head's is built."""
    key_value, key_sum, scaled_eps = _normalised_summaries(key, value, eps)
    if query.dtype == torch.float16 and not _fits_float16(query, key_value):
        logger.info("LiT linear attention: float16 activations too large for float16 products; this head is "
                    "computed in float32.")
        key.copy_(linear_attention(query[None], key[None], value[None], 1, eps)[0])
        return
    torch.mm(query, key_value.to(query.dtype), out=key)  # this head's keys are used up
    for rows in _token_chunks(key.shape[0]):
        normaliser = (query[rows].to(key_sum.dtype) @ key_sum).add_(scaled_eps).reciprocal_()
        key[rows] = key[rows] * normaliser[:, None]


def linear_attention_(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, eps: float = 1e-6
) -> torch.Tensor:
    """[`linear_attention`] for inference, in place and in the inputs' dtype: the output overwrites `key`.

    Nothing token-sized is allocated: `query` and `key` become φ(query) and the output (which is returned), one
    head's float32 `head_dim x head_dim` summary exists at a time, and the float32 scratch is at most
    `SCRATCH_CHUNK_TOKENS` tokens. Inputs are (batch, tokens, channels) tensors or views with unit channel stride
    that no autograd graph needs.

    In float16/bfloat16 the summaries are normalised (see `_normalised_summaries`), so every value stays bounded at
    any token count; the sums accumulate in float32 and the normaliser is applied in float32. Fallback: when a
    float16 product could still overflow (a query row sum times the largest normalised summary entry above half the
    float16 maximum: activations in the hundreds), that head of that sample is computed by [`linear_attention`]
    with float32 copies of its slices, and an info message is logged. bfloat16 and float32 have float32's range
    and never fall back.
    """
    query.relu_()
    key.relu_()
    batch, _, dim = query.shape
    head_dim = dim // heads
    for b in range(batch):
        for columns in (slice(h * head_dim, (h + 1) * head_dim) for h in range(heads)):
            _attend_one_head_(query[b, :, columns], key[b, :, columns], value[b, :, columns], eps)
    return key


class LiTValueConv(nn.Conv2d, TokenGridModule):
    """Depthwise `5 x 5` convolution (stride 1, padding 2) of the values on the token grid: LiT's local branch.

    Input and output are (batch, tokens, channels) with row-major tokens (`h * width + w`, as `PatchEmbed`
    flattens). `channels="head_dim"` convolves every head with the same `head_dim` filters (the FLatten-Transformer
    layout); `"inner_dim"` gives every channel its own filter. `init="default"` keeps PyTorch's Conv2d
    initialisation; `"zeros"` starts the branch at zero.
    """

    missing_grid_message = (
        "LiT self-attention needs a processor that takes the token grid (height, width); {processor} does not. "
        "Use LiTLinearAttnProcessor (e.g. model.set_default_attn_processor())."
    )

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
        # (batch, tokens, channels) already is the channels-last layout of the (batch, channels, h, w) grid: a view.
        grid = value.unflatten(1, (height, width)).permute(0, 3, 1, 2)
        weight, bias = self.weight, self.bias
        if self.channels == "head_dim":  # every head's channels get the same filters
            weight, bias = weight.repeat(self.heads, 1, 1, 1), bias.repeat(self.heads)
        local = F.conv2d(grid, weight, bias, self.stride, self.padding, self.dilation, groups=dim)
        return local.permute(0, 2, 3, 1).reshape(batch, tokens, dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.heads}, channels={self.channels!r}, init={self.init!r}"


class LiTLinearAttnProcessor:
    """Attention processor for LiT self-attention: [`linear_attention`] of the projected q/k/v plus the depthwise
    conv of V (`attn.value_conv`), then the output projection.

    Needs the token grid (`height`, `width`); [`LiTTransformer2DModel`] passes it. A replacement processor for
    [`LiTLinearAttention`] modules must accept `height` and `width` keyword arguments too. Reads the fused `to_qkv`
    projection when the module has one (`fuse_qkv_projections`); the value conv then sees the same V slice.

    When autograd needs the projections (training) or under torch.compile it runs the differentiable
    [`linear_attention`]; otherwise
    [`linear_attention_`], which works in place in the model's dtype and frees each projection once it is used, so
    the layer's peak is about three (batch, tokens, channels) tensors (diffusers' SDPA processor holds about five).
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
        # torch.compile plans a graph's buffers itself (and cannot trace the in-place path's per-head `out=` loop).
        if torch.compiler.is_compiling() or query.requires_grad or key.requires_grad or value.requires_grad:
            out = linear_attention(query, key, value, attn.heads, attn.linear_attention_eps)
            out = out + attn.value_conv(value, height, width)
        else:  # inference: the projections are ours to overwrite, and each is freed once it is used
            out = linear_attention_(query, key, value, attn.heads, attn.linear_attention_eps)
            del query, key
            out += attn.value_conv(value, height, width)
            del value
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


class LiTTransformer2DModel(PixArtGridTransformer2DModel):
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
        super().__init__(**pixart_arguments(locals()))

    def _make_self_attention(self, block: BasicTransformerBlock) -> "LiTLinearAttention":
        config = self.config
        return LiTLinearAttention(
            block.dim,
            heads=config.linear_attention_heads,
            bias=block.attention_bias,
            dropout=block.dropout,
            eps=config.linear_attention_eps,
            value_conv_channels=config.value_conv_channels,
            value_conv_init=config.value_conv_init,
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

    def _default_attn_processor(self, attn: Attention) -> LiTLinearAttnProcessor | AttnProcessor:
        # LiTLinearAttnProcessor for the self-attention and, as the parent, `AttnProcessor` for the softmax
        # cross-attention (the parent's would put softmax attention into the LiT layers).
        return LiTLinearAttnProcessor() if isinstance(attn, LiTLinearAttention) else AttnProcessor()

    def _fused_attn_processor(self, attn: Attention) -> FusedAttnProcessor2_0 | None:
        # The linear self-attention keeps its processor (LiTLinearAttnProcessor reads `to_qkv`); the softmax
        # cross-attention gets diffusers' FusedAttnProcessor2_0. Never softmax attention in the LiT layers.
        return None if isinstance(attn, LiTLinearAttention) else FusedAttnProcessor2_0()
