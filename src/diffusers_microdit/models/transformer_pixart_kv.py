# Copyright 2026 The diffusers-microdit authors. Apache-2.0.
"""PixArt-Σ with KV token compression ("PixArt-Σ: Weak-to-Strong Training ...", 2024) as a diffusers model.

In the compressed self-attention layers, keys and values (after their linear projections, on all channels, before
the head split) are downsampled on the 2-D token grid: a depthwise `ratio x ratio` convolution with stride `ratio`
followed by a LayerNorm (`"conv"`, the released configuration). The parameter-free `"ave"`, `"uniform"` and
`"uniform_every"` samplings of the original code are available too. Queries are never compressed, so every layer
still returns one token per patch; only the attention cost shrinks (by about `ratio**2` in those layers).

[`PixArtSigmaKVTransformer2DModel`] subclasses diffusers' [`PixArtTransformer2DModel`]: all existing keys are
unchanged, so every diffusers PixArt-Σ checkpoint loads strictly, and the class drops into `PixArtSigmaPipeline`.
The only new parameters are `transformer_blocks.{i}.attn1.kv_compress.{conv,norm}.{weight,bias}`.
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import BasicTransformerBlock, _chunked_feed_forward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_outputs import Transformer2DModelOutput

# Must be a name in this module: diffusers' pipeline loader looks up the loadable base classes (`ModelMixin`, ...) as
# attributes of the module recorded in model_index.json to find the component's `from_pretrained`.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from diffusers.utils import apply_lora_scale, logging
from torch import nn

from ..conversion.utils import load_state_dict_file, strip_prefixes
from ..loaders.single_file import OriginalCheckpointLoaderMixin

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
_KV_MODULE_NAME = "kv_compress"


def _is_kv_compress_key(key: str) -> bool:
    return f".attn1.{_KV_MODULE_NAME}." in key


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


class PixArtKVCompression(nn.Module):
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

    A custom processor opts in to receiving `height`/`width` by setting `_supports_kv_compression = True`.
    """

    _attention_backend = None
    _parallel_config = None
    _supports_kv_compression = True

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

        kv_compress = getattr(attn, _KV_MODULE_NAME, None)
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
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            scale=scale,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _processor_supports_kv(processor: Any) -> bool:
    return bool(getattr(processor, "_supports_kv_compression", False))


class PixArtKVTransformerBlock(BasicTransformerBlock):
    """diffusers' PixArt block (`norm_type="ada_norm_single"`, same submodules and keys) whose forward also takes
    the token grid `height`/`width` and hands it to the self-attention only (cross-attention never sees it)."""

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
            raise NotImplementedError("PixArtKVTransformerBlock implements PixArt's ada_norm_single block only.")
        batch = hidden_states.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(batch, 6, -1)
        ).chunk(6, dim=1)

        attn_kwargs = dict(cross_attention_kwargs or {})
        gligen_kwargs = attn_kwargs.pop("gligen", None)
        self_attn_kwargs = dict(attn_kwargs)
        if _processor_supports_kv(self.attn1.processor):
            self_attn_kwargs.update(height=height, width=width)
        elif getattr(self.attn1, _KV_MODULE_NAME, None) is not None:
            raise RuntimeError(
                f"This block compresses keys/values, but its self-attention processor "
                f"{type(self.attn1.processor).__name__} does not support KV compression (it would silently skip it). "
                "Use PixArtKVAttnProcessor2_0 (e.g. model.set_default_attn_processor()) or a processor with "
                "`_supports_kv_compression = True`."
            )

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


def check_lora_scale_applied(cross_attention_kwargs: dict | None) -> None:
    """`apply_lora_scale` only sees keyword arguments; a positional dict would carry the LoRA scale, unapplied, to
    the processors."""
    if cross_attention_kwargs and "scale" in cross_attention_kwargs:
        raise ValueError(
            "cross_attention_kwargs['scale'] (the LoRA strength) was not applied: pass cross_attention_kwargs by "
            "keyword (cross_attention_kwargs={'scale': ...})."
        )


def _mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, L) keep-mask (1 keep, 0 drop) -> (B, 1, L) additive bias (0 / -10000), as diffusers' PixArt does; masks
    that already have 3 dims are taken to be biases and returned unchanged."""
    if mask is None or mask.ndim != 2:
        return mask
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


class PixArtSigmaKVTransformer2DModel(PixArtTransformer2DModel, PeftAdapterMixin, OriginalCheckpointLoaderMixin):
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

    To add compression to a loaded model use [`~PixArtSigmaKVTransformer2DModel.enable_kv_compression`]; to convert
    an original PixArt-Σ `.pth` use [`~PixArtSigmaKVTransformer2DModel.from_single_file`] (or `from_original`).
    Loading a checkpoint without KV weights into a config with compressed layers initialises them with the paper's
    average init (with a warning).
    """

    _no_split_modules = ["PixArtKVTransformerBlock", "PatchEmbed"]
    _repeated_blocks = ["PixArtKVTransformerBlock"]
    # PixArt's own patterns, plus the KV-compression modules: a depthwise conv of a few parameters per channel on the
    # key/value path, which float8 storage would round for no memory gain (their LayerNorm is under `norm` already).
    _skip_layerwise_casting_patterns = [*PixArtTransformer2DModel._skip_layerwise_casting_patterns, _KV_MODULE_NAME]

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
        # The parent builds everything but the blocks when asked for zero of them; the KV-aware blocks (same
        # submodules, hence same keys) are built below, so no full set of parent blocks is allocated and dropped.
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
        # The parent's own @register_to_config recorded num_layers=0; restore the real value and the KV settings
        # in normalised (sorted, JSON-friendly) form.
        self.register_to_config(
            num_layers=num_layers,
            kv_compress_layers=layers or None,
            kv_compress_ratio=kv_compress_ratio,
            kv_compress_sampling=kv_compress_sampling,
        )
        self.transformer_blocks = nn.ModuleList(
            PixArtKVTransformerBlock(
                self.inner_dim,
                num_attention_heads,
                attention_head_dim,
                dropout=dropout,
                cross_attention_dim=cross_attention_dim,
                activation_fn=activation_fn,
                num_embeds_ada_norm=num_embeds_ada_norm,
                attention_bias=attention_bias,
                upcast_attention=upcast_attention,
                norm_type=norm_type,
                norm_elementwise_affine=norm_elementwise_affine,
                norm_eps=norm_eps,
                attention_type=attention_type,
            )
            for _ in range(num_layers)
        )
        self.set_default_attn_processor()
        self._set_kv_compression(layers, kv_compress_ratio, kv_compress_sampling)

    # ------------------------------------------------------------------ KV compression management

    @property
    def kv_compressed_layers(self) -> list[int]:
        """Indices of the blocks that currently compress keys/values."""
        blocks = self.transformer_blocks
        return [i for i, block in enumerate(blocks) if getattr(block.attn1, _KV_MODULE_NAME, None) is not None]

    def _set_kv_compression(self, layers: list[int], ratio: int, sampling: str) -> list[int]:
        """Give exactly `layers` a compression module; keep existing modules with the same settings (trained
        weights survive), create the others with the average init. Returns the indices given new modules."""
        created = []
        for index, block in enumerate(self.transformer_blocks):
            attn = block.attn1
            current = getattr(attn, _KV_MODULE_NAME, None)
            if index not in layers:
                if current is not None:
                    delattr(attn, _KV_MODULE_NAME)
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
            attn.add_module(_KV_MODULE_NAME, module)
            if not _processor_supports_kv(attn.processor):
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
            block_path, param_name = key.split(f".{_KV_MODULE_NAME}.")
            module = self.get_submodule(f"{block_path}.{_KV_MODULE_NAME}")
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

    @classmethod
    def from_original(
        cls,
        state_dict_or_path: dict | str | os.PathLike,
        original_config: dict | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> "PixArtSigmaKVTransformer2DModel":
        """Convert an original PixArt-Σ (`PixArtMS`) checkpoint: a state dict, or a `.pth`/`.safetensors` path
        (pickles are read with `torch.load(weights_only=True)`; a top-level `"state_dict"` entry is unwrapped).

        `original_config` takes the original `PixArtMS` constructor keywords (`input_size`, `hidden_size`,
        `depth`, `num_heads`, `pe_interpolation`, `micro_condition`, `kv_compress_config`, ...). Sizes readable from
        the weights are inferred; so is the KV compression when `kv_compress_config` is not given. Checkpoints
        without KV weights load into a KV configuration with the average init (and a warning).
        """
        config, state_dict = convert_pixart_sigma_checkpoint(state_dict_or_path, original_config)
        model = cls(**config)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        not_kv = [key for key in missing if not _is_kv_compress_key(key)]
        if not_kv or unexpected:
            raise ValueError(f"Converted checkpoint does not fit the model: missing {not_kv}, unexpected {unexpected}.")
        model._initialize_missing_kv_weights(missing)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        return model.eval()

    # ------------------------------------------------------------------ attention processors

    def set_default_attn_processor(self) -> None:
        """Use [`PixArtKVAttnProcessor2_0`] (SDPA through diffusers' dispatcher) everywhere. Unlike the parent's
        `AttnProcessor`, it keeps KV compression working."""
        self.set_attn_processor(PixArtKVAttnProcessor2_0())

    def fuse_qkv_projections(self) -> None:
        """Fuse q/k/v (self-attention) and k/v (cross-attention) projections. KV compression is kept: the
        KV-aware processor reads the fused projections (the parent would switch to `FusedAttnProcessor2_0`,
        which silently skips compression)."""
        self.original_attn_processors = self.attn_processors
        for module in self.modules():
            if isinstance(module, Attention):
                module.fuse_projections(fuse=True)
        self.set_attn_processor(PixArtKVAttnProcessor2_0())

    def unfuse_qkv_projections(self) -> None:
        """Undo `fuse_qkv_projections` (drops the fused layers and restores the previous processors)."""
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
        """Same inputs and outputs as [`PixArtTransformer2DModel.forward`]; the latent's token grid
        (`H // patch_size`, `W // patch_size`) is passed to every block's self-attention.

        Args:
            hidden_states: (B, C, H, W) latents.
            encoder_hidden_states: (B, L, caption_channels) text states ((B, 1, L, C) is accepted too).
            timestep: (B,) diffusion timesteps.
            added_cond_kwargs: `{"resolution": ..., "aspect_ratio": ...}` (required with additional conditions).
            cross_attention_kwargs: extra keyword arguments for the attention processors; its `"scale"` entry (pass
                the dict by keyword) multiplies every LoRA adapter's strength for this call and is not forwarded.
            attention_mask: optional (B, N) keep-mask for self-attention (not allowed in compressed layers).
            encoder_attention_mask: (B, L) keep-mask (1 keep, 0 drop) or (B, 1, L) additive bias for the text.
            return_dict: return a `Transformer2DModelOutput` instead of a 1-tuple.
        """
        if self.use_additional_conditions and added_cond_kwargs is None:
            raise ValueError("`added_cond_kwargs` cannot be None when using additional conditions for `adaln_single`.")
        check_lora_scale_applied(cross_attention_kwargs)
        attention_mask = _mask_to_bias(attention_mask, hidden_states.dtype)
        encoder_attention_mask = _mask_to_bias(encoder_attention_mask, hidden_states.dtype)

        batch = hidden_states.shape[0]
        p = self.config.patch_size
        height, width = hidden_states.shape[-2] // p, hidden_states.shape[-1] // p
        hidden_states = self.pos_embed(hidden_states)
        timestep, embedded_timestep = self.adaln_single(
            timestep, added_cond_kwargs, batch_size=batch, hidden_dtype=hidden_states.dtype
        )
        if self.caption_projection is not None:
            encoder_hidden_states = self.caption_projection(encoder_hidden_states)
            encoder_hidden_states = encoder_hidden_states.view(batch, -1, hidden_states.shape[-1])

        for block in self.transformer_blocks:
            # Positional, in the block's signature order, so gradient checkpointing can pass them through.
            args = (
                hidden_states,
                attention_mask,
                encoder_hidden_states,
                encoder_attention_mask,
                timestep,
                cross_attention_kwargs,
                None,
                None,
                height,
                width,
            )
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, *args)
            else:
                hidden_states = block(*args)

        shift, scale = (
            self.scale_shift_table[None] + embedded_timestep[:, None].to(self.scale_shift_table.device)
        ).chunk(2, dim=1)
        hidden_states = self.norm_out(hidden_states)
        hidden_states = hidden_states * (1 + scale.to(hidden_states.device)) + shift.to(hidden_states.device)
        hidden_states = self.proj_out(hidden_states)

        # Tokens carry (p, p, C) channel-last patches; fold them back to (B, C, H, W).
        c = self.out_channels
        output = (
            hidden_states.reshape(batch, height, width, p, p, c)
            .permute(0, 5, 1, 3, 2, 4)
            .reshape(batch, c, height * p, width * p)
        )
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)


# ---------------------------------------------------------------------- original checkpoint conversion

# Constructor defaults of the original `PixArtMS` (PixArt-sigma `diffusion/model/nets/PixArtMS.py`).
PIXART_MS_DEFAULTS = dict(
    input_size=32,
    patch_size=2,
    in_channels=4,
    hidden_size=1152,
    depth=28,
    num_heads=16,
    mlp_ratio=4.0,
    learn_sigma=True,
    pred_sigma=True,
    caption_channels=4096,
    pe_interpolation=1.0,
    micro_condition=False,
    qk_norm=False,
    kv_compress_config=None,
)
# Original keywords that only matter for training or for buffers the diffusers model recomputes.
_IGNORED_ORIGINAL_KWARGS = {"class_dropout_prob", "drop_path", "model_max_length", "config", "learn_sigma"}
# Buffers of the original that the diffusers model recomputes (fixed sin-cos positions, null caption embedding).
_DROPPED_ORIGINAL_KEYS = ("pos_embed", "y_embedder.y_embedding")

# Original -> diffusers names of the non-block weights (1:1 copies), as in diffusers'
# scripts/convert_pixart_sigma_to_diffusers.py.
_GLOBAL_KEY_MAP = {
    "x_embedder.proj": "pos_embed.proj",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "final_layer.linear": "proj_out",
}
_MICRO_CONDITION_KEY_MAP = {
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
}
# Per-block 1:1 copies (suffixes after `blocks.{i}.` -> after `transformer_blocks.{i}.`).
_BLOCK_KEY_MAP = {
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "attn.sr": f"attn1.{_KV_MODULE_NAME}.conv",
    "attn.norm": f"attn1.{_KV_MODULE_NAME}.norm",
}


def _original_kv_layers(state_dict: dict) -> dict[int, int]:
    """{block index: conv kernel size} for every block whose original weights include the KV conv."""
    layers = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) == 5 and parts[0] == "blocks" and parts[2:] == ["attn", "sr", "weight"]:
            layers[int(parts[1])] = int(value.shape[-1])
    return layers


def _resolve_original_config(state_dict: dict, original_config: dict | None) -> dict:
    """Original `PixArtMS` keywords: given ones, else read from the weights, else the constructor defaults."""
    given = dict(original_config or {})
    unknown = set(given) - set(PIXART_MS_DEFAULTS) - _IGNORED_ORIGINAL_KWARGS
    if unknown:
        raise ValueError(f"Unknown PixArtMS keyword(s) in original_config: {sorted(unknown)}.")

    inferred = {}
    patch = state_dict.get("x_embedder.proj.weight")
    if patch is not None:
        inferred.update(hidden_size=patch.shape[0], in_channels=patch.shape[1], patch_size=patch.shape[-1])
    blocks = {int(key.split(".")[1]) for key in state_dict if key.startswith("blocks.")}
    if blocks:
        inferred["depth"] = max(blocks) + 1
    caption = state_dict.get("y_embedder.y_proj.fc1.weight")
    if caption is not None:
        inferred["caption_channels"] = caption.shape[1]
    final = state_dict.get("final_layer.linear.weight")
    if patch is not None and final is not None:
        inferred["pred_sigma"] = final.shape[0] == 2 * patch.shape[1] * patch.shape[-1] ** 2
    inferred["micro_condition"] = any(key.startswith("csize_embedder.") for key in state_dict)
    hidden = given.get("hidden_size", inferred.get("hidden_size", PIXART_MS_DEFAULTS["hidden_size"]))
    if "num_heads" not in given and hidden != PIXART_MS_DEFAULTS["hidden_size"]:
        if hidden % 72:
            raise ValueError(f"Cannot infer num_heads for hidden_size {hidden}; pass it in original_config.")
        inferred["num_heads"] = hidden // 72  # PixArt's head width
    for name in ("input_size", "pe_interpolation"):
        if name not in given:
            logger.warning(
                f"original_config has no {name!r}; using the PixArtMS default {PIXART_MS_DEFAULTS[name]} (the "
                "released Σ models use input_size = image_size // 8 and pe_interpolation = image_size / 512)."
            )
    if "kv_compress_config" not in given:
        kv_layers = _original_kv_layers(state_dict)
        if kv_layers:
            ratios = set(kv_layers.values())
            if len(ratios) != 1:
                raise ValueError(f"KV-compression convs with different kernel sizes: {kv_layers}.")
            inferred["kv_compress_config"] = dict(
                sampling="conv", scale_factor=ratios.pop(), kv_compress_layer=sorted(kv_layers)
            )
    return {**PIXART_MS_DEFAULTS, **inferred, **given}


def original_config_to_diffusers(original_config: dict) -> dict:
    """Map complete original `PixArtMS` keywords to a [`PixArtSigmaKVTransformer2DModel`] config."""
    oc = {**PIXART_MS_DEFAULTS, **original_config}
    if oc["qk_norm"]:
        raise NotImplementedError(
            "qk_norm=True is not supported: the original normalises q/k over all heads before the head split, which "
            "diffusers' PixArt has no slot for (no released PixArt-Σ uses it)."
        )
    if float(oc["mlp_ratio"]) != 4.0:
        raise NotImplementedError(f"mlp_ratio={oc['mlp_ratio']}: diffusers' PixArt feed-forward is fixed at 4.")
    hidden, heads = int(oc["hidden_size"]), int(oc["num_heads"])
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {heads}.")

    kv = oc["kv_compress_config"] or {}
    kv_layers = list(kv.get("kv_compress_layer") or [])
    kv_ratio = int(kv.get("scale_factor", 1) or 1)
    kv_sampling = kv.get("sampling")
    if not kv_layers or kv_ratio <= 1 or kv_sampling is None:
        kv_layers, kv_ratio, kv_sampling = [], 2, "conv"  # the original builds no compression in these cases
    depth = int(oc["depth"])
    # The original silently ignores listed indices >= depth; they can only be a configuration mistake.
    kv_layers = normalize_kv_compress_layers(kv_layers, depth)

    in_channels = int(oc["in_channels"])
    return dict(
        sample_size=int(oc["input_size"]),
        num_layers=depth,
        attention_head_dim=hidden // heads,
        in_channels=in_channels,
        out_channels=2 * in_channels if oc["pred_sigma"] else in_channels,
        patch_size=int(oc["patch_size"]),
        attention_bias=True,
        num_attention_heads=heads,
        cross_attention_dim=hidden,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=int(oc["caption_channels"]),
        interpolation_scale=float(oc["pe_interpolation"]),
        use_additional_conditions=bool(oc["micro_condition"]),
        kv_compress_layers=kv_layers or None,
        kv_compress_ratio=kv_ratio,
        kv_compress_sampling=kv_sampling,
    )


def convert_pixart_sigma_checkpoint(
    state_dict_or_path: dict | str | os.PathLike, original_config: dict | None = None
) -> tuple[dict, dict]:
    """Original PixArt-Σ (`PixArtMS`) weights -> (diffusers config, diffusers state dict).

    Key mapping as diffusers' `scripts/convert_pixart_sigma_to_diffusers.py` (fused `attn.qkv` split in three,
    `cross_attn.kv_linear` in two, ...), for any depth, plus the KV-compression weights
    (`blocks.{i}.attn.sr` -> `transformer_blocks.{i}.attn1.kv_compress.conv`, `attn.norm` -> `...kv_compress.norm`).
    Raises if weights are left over, or if KV weights contradict `kv_compress_config`.
    """
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state_dict = load_state_dict_file(state_dict_or_path)
    else:
        state_dict = state_dict_or_path
    if isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    state_dict = strip_prefixes(dict(state_dict), ("module.", "_orig_mod."))

    original = _resolve_original_config(state_dict, original_config)
    config = original_config_to_diffusers(original)
    kv_layers = set(config["kv_compress_layers"] or [])
    conv_layers = kv_layers if config["kv_compress_sampling"] == "conv" else set()
    present = _original_kv_layers(state_dict)
    if set(present) - conv_layers:
        raise ValueError(
            f"The weights contain KV-compression convs for blocks {sorted(set(present) - conv_layers)}, which the "
            f"configuration does not compress with 'conv' (compressed: {sorted(conv_layers)}). Pass the matching "
            "kv_compress_config, or drop the `blocks.{i}.attn.sr.*` / `attn.norm.*` keys to load without compression."
        )
    wrong_kernel = {i: k for i, k in present.items() if k != config["kv_compress_ratio"]}
    if wrong_kernel:
        raise ValueError(
            f"KV conv kernel sizes {wrong_kernel} differ from scale_factor {config['kv_compress_ratio']}."
        )

    remaining = dict(state_dict)
    converted = {}

    def take(key: str) -> torch.Tensor:
        if key not in remaining:
            raise KeyError(f"The original checkpoint has no {key!r}.")
        return remaining.pop(key)

    def copy(original_prefix: str, diffusers_prefix: str) -> None:
        for suffix in ("weight", "bias"):
            converted[f"{diffusers_prefix}.{suffix}"] = take(f"{original_prefix}.{suffix}")

    prefix_maps = dict(_GLOBAL_KEY_MAP)
    if config["use_additional_conditions"]:
        prefix_maps.update(_MICRO_CONDITION_KEY_MAP)
    for original_prefix, diffusers_prefix in prefix_maps.items():
        copy(original_prefix, diffusers_prefix)
    converted["scale_shift_table"] = take("final_layer.scale_shift_table")

    for i in range(config["num_layers"]):
        src, dst = f"blocks.{i}", f"transformer_blocks.{i}"
        converted[f"{dst}.scale_shift_table"] = take(f"{src}.scale_shift_table")
        for suffix in ("weight", "bias"):
            # Self-attention qkv is one Linear(C, 3C) whose output splits q|k|v before the head split.
            for name, tensor in zip(("to_q", "to_k", "to_v"), take(f"{src}.attn.qkv.{suffix}").chunk(3, dim=0)):
                converted[f"{dst}.attn1.{name}.{suffix}"] = tensor
            for name, tensor in zip(("to_k", "to_v"), take(f"{src}.cross_attn.kv_linear.{suffix}").chunk(2, dim=0)):
                converted[f"{dst}.attn2.{name}.{suffix}"] = tensor
        for original_suffix, diffusers_suffix in _BLOCK_KEY_MAP.items():
            if original_suffix.startswith("attn.sr") or original_suffix.startswith("attn.norm"):
                if i not in present:
                    continue  # no KV weights for this block: the model keeps the average init
            copy(f"{src}.{original_suffix}", f"{dst}.{diffusers_suffix}")

    for key in _DROPPED_ORIGINAL_KEYS:
        remaining.pop(key, None)
    if remaining:
        raise ValueError(f"Unconverted keys left in the original checkpoint: {sorted(remaining)}.")
    return config, converted
