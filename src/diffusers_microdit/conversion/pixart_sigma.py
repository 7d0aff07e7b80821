"""Original PixArt-Σ (`PixArtMS`) checkpoints -> [`PixArtSigmaKVTransformer2DModel`] config and state dict."""

from __future__ import annotations

import os

import torch
from diffusers.utils import logging

from ..models.transformer_pixart_kv import KV_MODULE_NAME, normalize_kv_compress_layers
from .utils import load_state_dict_file, strip_prefixes

logger = logging.get_logger(__name__)

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
    "attn.sr": f"attn1.{KV_MODULE_NAME}.conv",
    "attn.norm": f"attn1.{KV_MODULE_NAME}.norm",
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
