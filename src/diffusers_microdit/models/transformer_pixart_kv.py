# Copyright 2026 The diffusers-microdit authors. Apache-2.0.
"""PixArt-Σ with KV token compression ("PixArt-Σ: Weak-to-Strong Training ...", 2024) as a diffusers model.

In the compressed self-attention layers, keys and values (after their linear projections, on all channels, before
the head split) are downsampled on the 2-D token grid: a depthwise `ratio x ratio` convolution with stride `ratio`
followed by a LayerNorm (`"conv"`, the released configuration). The parameter-free `"ave"`, `"uniform"` and
`"uniform_every"` samplings of the original code are available too. Queries are never compressed, so every layer
still returns one token per patch; only the attention cost shrinks (by about `ratio**2` in those layers).

[`PixArtSigmaKVTransformer2DModel`] subclasses diffusers' [`PixArtTransformer2DModel`] (through
[`PixArtGridTransformer2DModel`], which passes the token grid to the self-attention): all existing keys are
unchanged, so every diffusers PixArt-Σ checkpoint loads strictly, and the class drops into `PixArtSigmaPipeline`.
The only new parameters are `transformer_blocks.{i}.attn1.kv_compress.{conv,norm}.{weight,bias}`. Original
`PixArtMS` checkpoints are converted by `diffusers_microdit.conversion.pixart_sigma`.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from typing import Iterable

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (see the package docstring)
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from diffusers.utils import logging
from torch import nn

from ..loaders.single_file import OriginalCheckpointLoaderMixin
from .pixart_grid import PixArtGridTransformer2DModel, TokenGridModule, pixart_arguments, takes_token_grid

logger = logging.get_logger(__name__)

KV_COMPRESS_SAMPLINGS = ("conv", "ave", "uniform", "uniform_every")

# Per-parameter values of the paper's "Avg Conv Init": the conv starts as ratio x ratio average pooling and the
# LayerNorm as the default affine identity.
_AVERAGE_INIT = {
    "conv.weight": lambda ratio: 1.0 / ratio**2,
    "conv.bias": lambda ratio: 0.0,
    "norm.weight": lambda ratio: 1.0,
    "norm.bias": lambda ratio: 0.0,
}
KV_MODULE_NAME = "kv_compress"


def _is_kv_compress_key(key: str) -> bool:
    return f".attn1.{KV_MODULE_NAME}." in key


def normalize_kv_compress_layers(layers: Iterable[int] | None, num_layers: int) -> list[int]:
    """Validate block indices to compress and return them sorted and de-duplicated (`None` means none)."""
    if layers is None:
        return []
    if isinstance(layers, (int, str)) or not isinstance(layers, Iterable):
        raise ValueError(f"kv_compress_layers must be a list of block indices (or None), got {layers!r}.")
    normalized = set()
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise ValueError(f"kv_compress_layers entries must be integers, got {index!r}.")
        index = int(index)
        if not 0 <= index < num_layers:
            raise ValueError(
                f"kv_compress_layers entry {index} is out of range: the model has {num_layers} blocks "
                f"(0..{num_layers - 1})."
            )
        normalized.add(index)
    return sorted(normalized)


def _check_kv_compress_settings(layers: list[int], ratio: int, sampling: str) -> None:
    if sampling not in KV_COMPRESS_SAMPLINGS:
        raise ValueError(f"Unknown kv_compress_sampling {sampling!r}; choose one of {list(KV_COMPRESS_SAMPLINGS)}.")
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"kv_compress_ratio must be a positive integer, got {ratio!r}.")
    if layers and ratio == 1:
        raise ValueError(
            "kv_compress_ratio=1 does not compress anything (the original builds no compression module for it); "
            "pass kv_compress_layers=None instead."
        )


class PixArtKVCompression(TokenGridModule):
    """Downsamples the key or value tokens of one self-attention layer on the (height, width) token grid.

    Input and output are (batch, tokens, channels); tokens are row-major (`h * width + w`), as `PatchEmbed` flattens.

    Samplings (the original `AttentionKVCompress.downsample_2d`):
        conv: depthwise `Conv2d(C, C, ratio, stride=ratio, groups=C)` then `LayerNorm(C)` over all channels (not per
            head). The same module (weights) serves keys and values. Grids that are not a multiple of `ratio` are
            floored: the last rows/columns are dropped.
        ave: `F.interpolate(mode="nearest", scale_factor=1/ratio)`; despite its name this is top-left subsampling
            (floors odd grids). No parameters, no norm.
        uniform: `x[:, :, ::ratio, ::ratio]`; needs a grid divisible by `ratio` (the original fails otherwise).
        uniform_every: every `ratio`-th token of the flattened sequence (`tokens / ratio` kept, not
            `tokens / ratio**2`); needs a token count divisible by `ratio`. Does not use the grid shape.
    """

    missing_grid_message = (
        "This block compresses keys/values, but its self-attention processor {processor} does not support KV "
        "compression (it would silently skip it). Use PixArtKVAttnProcessor2_0 (e.g. "
        "model.set_default_attn_processor()) or a processor whose __call__ takes `height` and `width`."
    )

    def __init__(self, dim: int, ratio: int = 2, sampling: str = "conv"):
        super().__init__()
        if sampling not in KV_COMPRESS_SAMPLINGS:
            raise ValueError(f"Unknown KV sampling {sampling!r}; choose one of {list(KV_COMPRESS_SAMPLINGS)}.")
        if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 2:
            raise ValueError(f"The KV compression ratio must be an integer >= 2, got {ratio!r}.")
        self.dim = dim
        self.ratio = ratio
        self.sampling = sampling
        if sampling == "conv":
            self.conv = nn.Conv2d(dim, dim, kernel_size=ratio, stride=ratio, groups=dim, bias=True)
            self.norm = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=True)
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Average init: conv weight `1/ratio**2`, bias 0; LayerNorm weight 1, bias 0. Uses in-place tensor fills,
        which diffusers' `no_init_weights` (active inside `from_pretrained`) does not disable."""
        for name, param in self.named_parameters():
            param.fill_(_AVERAGE_INIT[name](self.ratio))

    def forward(self, x: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        batch, tokens, channels = x.shape
        r = self.ratio
        if self.sampling == "uniform_every":
            if tokens % r:
                raise ValueError(f"'uniform_every' KV sampling needs a token count divisible by {r}, got {tokens}.")
            return x[:, ::r]

        if height is None or width is None:
            raise ValueError(
                "KV compression needs the token grid's height and width; none were passed to the compressed "
                "self-attention layer (the grid is never guessed from the token count)."
            )
        if height * width != tokens:
            raise ValueError(f"Token grid {height}x{width} does not match the {tokens} key/value tokens.")
        # (B, N, C) as a channels-last (B, C, H, W) image (a view unless x is a slice of fused projections).
        grid = x.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        if self.sampling == "conv":
            if height < r or width < r:
                raise ValueError(f"Token grid {height}x{width} is smaller than the KV compression ratio {r}.")
            grid = self.conv(grid)
        elif self.sampling == "ave":
            grid = F.interpolate(grid, scale_factor=1 / r, mode="nearest")
        else:  # uniform
            if height % r or width % r:
                raise ValueError(
                    f"'uniform' KV sampling needs a token grid divisible by {r}, got {height}x{width} "
                    "(use 'ave', which floors, or 'conv')."
                )
            grid = grid[:, :, ::r, ::r]
        out = grid.flatten(2).transpose(1, 2)
        if self.sampling == "conv":
            out = self.norm(out)
        return out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, ratio={self.ratio}, sampling={self.sampling!r}"


class PixArtKVAttnProcessor2_0:
    """Attention processor for PixArt-Σ self- and cross-attention with optional KV compression.

    Keys and values of a self-attention module that owns a `kv_compress` child are compressed on the token grid
    given by `height`/`width` (required there). Attention runs through diffusers' backend dispatcher (SDPA by
    default), so `set_attention_backend` / `attention_backend(...)` apply. Cross-attention masks are used as in
    diffusers' PixArt: a `(B, L)` or `(B, 1, L)` additive bias (or boolean mask) broadcast over heads and queries.
    Works with fused projections (`fuse_qkv_projections`).

    A custom processor receives `height`/`width` by declaring them as `__call__` parameters (see `pixart_grid`).

    `fp32_attention=True` is the original PixArt-Σ's `fp32_attention=True` of its fp16 recipe ("necessary for NAN
    loss"): query, key and value are cast to float32 after the projections (and KV compression) and the attention
    runs with autocast off, which would cast them back; the projections keep the autocast precision.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, fp32_attention: bool = False):
        self.fp32_attention = fp32_attention

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        batch = hidden_states.shape[0]
        fused = getattr(attn, "fused_projections", False)
        if encoder_hidden_states is None:
            if fused and hasattr(attn, "to_qkv"):
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        else:
            if attn.norm_cross is not None:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            query = attn.to_q(hidden_states)
            if fused and hasattr(attn, "to_kv"):
                key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
            else:
                key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)

        kv_compress = getattr(attn, KV_MODULE_NAME, None)
        if kv_compress is not None:
            if encoder_hidden_states is not None:
                raise ValueError("KV compression is defined for self-attention only.")
            if attention_mask is not None:
                raise ValueError("A self-attention mask cannot be combined with KV compression.")
            key = kv_compress(key, height, width)
            value = kv_compress(value, height, width)

        query = query.unflatten(-1, (attn.heads, -1))
        key = key.unflatten(-1, (attn.heads, -1))
        value = value.unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        dtype = query.dtype
        if self.fp32_attention:
            query, key, value = query.float(), key.float(), value.float()

        if attention_mask is not None:
            if attention_mask.ndim == 2:  # (B, L) -> (B, 1, 1, L)
                attention_mask = attention_mask[:, None, None, :]
            elif attention_mask.ndim == 3:  # (B, 1 or Lq, L) -> (B, 1, 1 or Lq, L)
                attention_mask = attention_mask[:, None]
            if attention_mask.shape[0] == 1 and batch > 1:
                attention_mask = attention_mask.expand(batch, *attention_mask.shape[1:])
            if attention_mask.dtype != torch.bool:
                attention_mask = attention_mask.to(query.dtype)

        scale = None if attn.scale == query.shape[-1] ** -0.5 else attn.scale
        # Autocast would cast float32 q, k, v back down for the attention kernel.
        with torch.autocast(query.device.type, enabled=False) if self.fp32_attention else contextlib.nullcontext():
            out = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                scale=scale,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
        out = out.flatten(2, 3).to(dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class PixArtSigmaKVTransformer2DModel(PixArtGridTransformer2DModel, OriginalCheckpointLoaderMixin):
    r"""PixArt-Σ transformer with optional KV token compression in selected self-attention layers.

    All [`PixArtTransformer2DModel`] arguments keep their meaning and defaults; a diffusers PixArt-Σ checkpoint
    loads into this class unchanged (`from_pretrained`), and with `kv_compress_layers=None` the model computes
    exactly what the parent does.

    Args:
        kv_compress_layers (`list[int]`, *optional*):
            Indices of the blocks whose self-attention compresses keys/values. The released configuration
            compresses the deeper half (`range(num_layers // 2, num_layers)`). `None` or `[]`: no compression.
        kv_compress_ratio (`int`, defaults to 2): Downsampling factor per grid axis (the paper's `scale_factor`).
        kv_compress_sampling (`str`, defaults to `"conv"`): `"conv"` (learned depthwise conv + LayerNorm), or the
            parameter-free `"ave"`, `"uniform"`, `"uniform_every"`; see [`PixArtKVCompression`].

    To add compression to a loaded model use [`~PixArtSigmaKVTransformer2DModel.enable_kv_compression`]. Loading a
    checkpoint without KV weights into a config with compressed layers initialises them with the paper's average
    init (with a warning).

    To convert an original PixArt-Σ (`PixArtMS`) checkpoint use `from_single_file` or `from_original` (a state dict,
    or a `.pth`/`.safetensors` path; a top-level `"state_dict"` entry is unwrapped). `original_config` takes the
    original `PixArtMS` constructor keywords (`input_size`, `hidden_size`, `depth`, `num_heads`,
    `pe_interpolation`, `micro_condition`, `kv_compress_config`, ...). Sizes readable from the weights are inferred;
    so is the KV compression when `kv_compress_config` is not given. Checkpoints without KV weights load into a KV
    configuration with the average init (and a warning).
    """

    _original_checkpoint_converter = "pixart_sigma:convert_pixart_sigma_checkpoint"
    # PixArt's own patterns, plus the KV-compression modules: a depthwise conv of a few parameters per channel on the
    # key/value path, which float8 storage would round for no memory gain (their LayerNorm is under `norm` already).
    _skip_layerwise_casting_patterns = [*PixArtTransformer2DModel._skip_layerwise_casting_patterns, KV_MODULE_NAME]

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
        kv_compress_layers: list[int] | None = None,
        kv_compress_ratio: int = 2,
        kv_compress_sampling: str = "conv",
    ):
        layers = normalize_kv_compress_layers(kv_compress_layers, num_layers)
        _check_kv_compress_settings(layers, kv_compress_ratio, kv_compress_sampling)
        super().__init__(**pixart_arguments(locals()))
        # The KV settings in normalised (sorted, JSON-friendly) form.
        self.register_to_config(
            kv_compress_layers=layers or None,
            kv_compress_ratio=kv_compress_ratio,
            kv_compress_sampling=kv_compress_sampling,
        )
        self.set_default_attn_processor()
        self._set_kv_compression(layers, kv_compress_ratio, kv_compress_sampling)

    # ------------------------------------------------------------------ KV compression management

    @property
    def kv_compressed_layers(self) -> list[int]:
        """Indices of the blocks that currently compress keys/values."""
        blocks = self.transformer_blocks
        return [i for i, block in enumerate(blocks) if getattr(block.attn1, KV_MODULE_NAME, None) is not None]

    def _set_kv_compression(self, layers: list[int], ratio: int, sampling: str) -> list[int]:
        """Give exactly `layers` a compression module; keep existing modules with the same settings (trained
        weights survive), create the others with the average init. Returns the indices given new modules."""
        created = []
        for index, block in enumerate(self.transformer_blocks):
            attn = block.attn1
            current = getattr(attn, KV_MODULE_NAME, None)
            if index not in layers:
                if current is not None:
                    delattr(attn, KV_MODULE_NAME)
                continue
            if current is not None and current.ratio == ratio and current.sampling == sampling:
                continue
            reference = attn.to_k.weight
            module = PixArtKVCompression(self.inner_dim, ratio, sampling)
            if reference.device.type != "meta":
                # `self.dtype`, not the weight's: under layerwise casting `to_k` is stored in float8, and `self.dtype`
                # is then the compute dtype in which the (never cast) compression modules must live.
                module = module.to(device=reference.device, dtype=self.dtype)
                module.reset_parameters()  # after the move: also correct if construction ran under no_init_weights
            attn.add_module(KV_MODULE_NAME, module)
            if not takes_token_grid(attn.processor):
                attn.set_processor(PixArtKVAttnProcessor2_0())
            created.append(index)
        return created

    def enable_kv_compression(
        self, layers: Iterable[int] | None = None, ratio: int = 2, sampling: str = "conv"
    ) -> "PixArtSigmaKVTransformer2DModel":
        """Compress keys/values in the self-attention of the given blocks (default: the deeper half, as released).

        New modules get the paper's average init (conv = `ratio x ratio` average pooling, identity-affine
        LayerNorm); blocks already compressed with the same ratio and sampling keep their weights; blocks not listed
        lose their compression. The config is updated, so `save_pretrained` / `from_pretrained` round-trip the
        compressed model. Returns the model.
        """
        num_layers = len(self.transformer_blocks)
        if layers is None:
            layers = range(num_layers // 2, num_layers)
        normalized = normalize_kv_compress_layers(layers, num_layers)
        _check_kv_compress_settings(normalized, ratio, sampling)
        self._set_kv_compression(normalized, ratio, sampling)
        self.register_to_config(
            kv_compress_layers=normalized or None, kv_compress_ratio=ratio, kv_compress_sampling=sampling
        )
        self._forget_config_defaults("kv_compress_layers", "kv_compress_ratio", "kv_compress_sampling")
        return self

    def _forget_config_defaults(self, *names: str) -> None:
        """A model loaded from a plain PixArt-Σ folder lists the KV settings in `_use_default_values`, and
        `from_config(model.config)` (EMAModel, pipelines) would then rebuild it without compression."""
        defaults = self.config.get("_use_default_values")
        if defaults:
            self.register_to_config(_use_default_values=[name for name in defaults if name not in names])

    def disable_kv_compression(self) -> "PixArtSigmaKVTransformer2DModel":
        """Remove every compression module (and its weights); the model becomes a plain PixArt-Σ."""
        self._set_kv_compression([], self.config.kv_compress_ratio, self.config.kv_compress_sampling)
        self.register_to_config(kv_compress_layers=None)
        self._forget_config_defaults("kv_compress_layers")
        return self

    def _initialize_missing_kv_weights(self, missing_keys: Iterable[str]) -> list[str]:
        """Give KV-compression parameters that a checkpoint lacked real storage (they are on the meta device after
        a `low_cpu_mem_usage` load) and the average init. Returns the keys handled."""
        handled = sorted(key for key in missing_keys if _is_kv_compress_key(key))
        for key in handled:
            block_path, param_name = key.split(f".{KV_MODULE_NAME}.")
            module = self.get_submodule(f"{block_path}.{KV_MODULE_NAME}")
            owner_name, leaf = param_name.rsplit(".", 1)
            owner = module.get_submodule(owner_name)
            param = getattr(owner, leaf)
            reference = self.get_submodule(block_path).to_k.weight
            device = reference.device if reference.device.type != "meta" else torch.device("cpu")
            value = torch.full(
                param.shape, _AVERAGE_INIT[param_name](module.ratio), device=device, dtype=reference.dtype
            )
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=param.requires_grad)
        if handled:
            layers = sorted({int(key.split(".")[1]) for key in handled})
            logger.warning(
                f"The checkpoint has no KV-compression weights for blocks {layers}; they were initialised with the "
                "average init (conv weight 1/ratio^2, bias 0, LayerNorm weight 1, bias 0). Fine-tune the model "
                "before relying on its outputs."
            )
        return handled

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, **kwargs):
        """[`ModelMixin.from_pretrained`], plus: KV-compression weights missing from the checkpoint (e.g. a plain
        PixArt-Σ folder loaded with `kv_compress_layers=[...]`) get the average init instead of being left on the
        meta device."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, output_loading_info=True, **kwargs
        )
        model._initialize_missing_kv_weights(loading_info["missing_keys"])
        return (model, loading_info) if output_loading_info else model

    def _load_original_state_dict(self, state_dict: dict) -> None:
        """Load a converted original checkpoint; KV-compression weights it lacks get the average init."""
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        not_kv = [key for key in missing if not _is_kv_compress_key(key)]
        if not_kv or unexpected:
            raise ValueError(f"Converted checkpoint does not fit the model: missing {not_kv}, unexpected {unexpected}.")
        self._initialize_missing_kv_weights(missing)

    # ------------------------------------------------------------------ hooks of PixArtGridTransformer2DModel

    def _default_attn_processor(self, attn: Attention) -> PixArtKVAttnProcessor2_0:
        # SDPA through diffusers' dispatcher everywhere; unlike the parent's `AttnProcessor` it keeps KV compression.
        return PixArtKVAttnProcessor2_0()

    def _fused_attn_processor(self, attn: Attention) -> PixArtKVAttnProcessor2_0:
        # Reads the fused projections and keeps KV compression (`FusedAttnProcessor2_0` would silently skip it).
        return PixArtKVAttnProcessor2_0()
