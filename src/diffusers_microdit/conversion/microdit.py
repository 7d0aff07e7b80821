"""Original micro_diffusion `DiT` checkpoints -> `MicroDiTTransformer2DModel` config and state dict."""

from __future__ import annotations

import math
import os
import re

import torch

from ..models.transformer_microdit import MICRODIT_PRESETS, microdit_2d_sincos_pos_embed
from .utils import load_state_dict_file, strip_prefixes

# Original `DiT.__init__` keyword -> diffusers config name.
ORIGINAL_CONFIG_NAMES = {
    "input_size": "sample_size",
    "patch_size": "patch_size",
    "in_channels": "in_channels",
    "dim": "hidden_size",
    "depth": "num_layers",
    "head_dim": "attention_head_dim",
    "caption_channels": "caption_channels",
    "multiple_of": "multiple_of",
    "qkv_multipliers": "qkv_multipliers",
    "ffn_multipliers": "ffn_multipliers",
    "patch_mixer_depth": "patch_mixer_layers",
    "patch_mixer_dim": "patch_mixer_hidden_size",
    "patch_mixer_qkv_ratio": "patch_mixer_qkv_ratio",
    "patch_mixer_mlp_ratio": "patch_mixer_mlp_ratio",
    "use_bias": "attention_bias",
    "num_experts": "num_experts",
    "expert_capacity": "expert_capacity",
    "experts_every_n": "experts_every_n",
    "pos_interp_scale": "pos_interp_scale",
    "norm_eps": "norm_eps",
    "depth_init": "depth_init",
}

# Renames of module paths (whole dotted components) inside a block (`patch_mixer.{i}.` / `blocks.{i}.`).
_BLOCK_RENAMES = {
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.w1": "ff.gate_proj",  # dense SwiGLU linears: `.weight`, and `.bias` with use_bias
    "mlp.w2": "ff.up_proj",
    "mlp.w3": "ff.down_proj",
    "mlp.gate": "ff.router",
    "adaLN_modulation.1": "modulation",
}
# Whole-key renames, tried before `_BLOCK_RENAMES`: the MoE expert weights are bare parameters named like the
# dense SwiGLU modules (`mlp.w1`, no `.weight`), so only the exact key tells them apart.
_BLOCK_PARAMETERS = {"mlp.w1": "ff.w_in", "mlp.w2": "ff.w_out"}
# Packed projections split row-wise into (q, k, v) or (k, v).
_BLOCK_PACKED = {"attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v")}
_REFINER_RENAMES = {
    "attn.proj": "attn.to_out.0",
    "mlp.w1": "ff.gate_proj",
    "mlp.w2": "ff.up_proj",
    "mlp.w3": "ff.down_proj",
}
_REFINER_PACKED = {"attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v")}
_TOP_RENAMES = {
    "x_embedder.proj": "patch_embed.proj",
    "t_embedder.mlp.0": "time_embedding.linear_1",
    "t_embedder.mlp.2": "time_embedding.linear_2",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.norm": "caption_projection.norm",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "pooled_y_emb_process.fc1": "pooled_caption_projection.linear_1",
    "pooled_y_emb_process.norm": "pooled_caption_projection.norm",
    "pooled_y_emb_process.fc2": "pooled_caption_projection.linear_2",
    "patch_mixer_map_xin.0": "patch_mixer_proj_in.norm",
    "patch_mixer_map_xin.1": "patch_mixer_proj_in.linear",
    "patch_mixer_map_xout.0": "patch_mixer_proj_out.norm",
    "patch_mixer_map_xout.1": "patch_mixer_proj_out.linear",
    "patch_mixer_map_y.0": "patch_mixer_proj_context.norm",
    "patch_mixer_map_y.1": "patch_mixer_proj_context.linear",
    "final_layer.linear": "proj_out",
    "final_layer.norm_final": "norm_out",
    "final_layer.adaLN_modulation.1": "norm_out_modulation",
}
# (original prefix pattern, diffusers prefix, whole-key renames, renames, packed projections), first match wins.
_GROUPS = (
    (r"patch_mixer\.(\d+)\.", "patch_mixer_blocks.{}.", _BLOCK_PARAMETERS, _BLOCK_RENAMES, _BLOCK_PACKED),
    (r"blocks\.(\d+)\.", "transformer_blocks.{}.", _BLOCK_PARAMETERS, _BLOCK_RENAMES, _BLOCK_PACKED),
    (r"y_emb_preprocess\.", "caption_refiner.", {}, _REFINER_RENAMES, _REFINER_PACKED),
    (r"", "", {}, _TOP_RENAMES, {}),
)
# `pos_interp_scale`s tried when reading it off a stored table: multiples of 1/8 up to 16. They include the original's
# 1.0 (256 px) and 2.0 (512 px) and grid ratios of other resolutions (e.g. 1.5 for a 384-px grid over 256 px).
_POS_INTERP_SCALE_CANDIDATES = tuple(k / 8 for k in range(1, 129))
# A stored table may differ from the recomputed one by this many ulps of its precision: rounding to the storage
# dtype costs at most half an ulp, the rest is margin for float32-vs-float64 recomputation.
_POS_EMBED_ULPS = 2
# Keys that are not part of the DiT in Composer / full LatentDiffusion checkpoints.
_FOREIGN_PREFIXES = ("vae.", "text_encoder.")


def unwrap_original_checkpoint(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Return the bare `DiT.state_dict()` from a plain, `{'state_dict': ...}` or Composer checkpoint, without
    `module.` / `_orig_mod.` / `dit.` prefixes and without VAE / text-encoder entries."""
    if "state" in checkpoint and isinstance(checkpoint["state"], dict) and "model" in checkpoint["state"]:
        checkpoint = checkpoint["state"]["model"]
    elif "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], dict):
        checkpoint = checkpoint["state_dict"]
    state_dict = strip_prefixes(checkpoint, ("module.", "_orig_mod.", "dit."))
    return {k: v for k, v in state_dict.items() if not k.startswith(_FOREIGN_PREFIXES)}


def _count_blocks(state_dict: dict, prefix: str) -> int:
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def infer_original_config(state_dict: dict, original_config: dict | None = None) -> dict:
    """Diffusers config for an original state dict: given `original_config` (original keyword names) wins, then
    sizes read from the weights, then the MicroDiT_XL_2 factory values (MicroDiT_Tiny_2's for width 512)."""
    original_config = dict(original_config or {})
    unknown = set(original_config) - set(ORIGINAL_CONFIG_NAMES) - {"use_patch_mixer"}
    if unknown:
        raise ValueError(f"Unknown original DiT arguments {sorted(unknown)}; expected some of {sorted(ORIGINAL_CONFIG_NAMES)}.")
    if not original_config.pop("use_patch_mixer", True):
        raise ValueError("use_patch_mixer=False is not a working original configuration (its init fails); not supported.")

    patch_weight = state_dict["x_embedder.proj.weight"]
    inferred = {
        "dim": patch_weight.shape[0],
        "in_channels": patch_weight.shape[1],
        "patch_size": patch_weight.shape[2],
        "caption_channels": state_dict["y_embedder.y_proj.fc1.weight"].shape[1],
        "depth": _count_blocks(state_dict, "blocks"),
        "patch_mixer_depth": _count_blocks(state_dict, "patch_mixer"),
        "patch_mixer_dim": state_dict["patch_mixer.0.norm1.weight"].shape[0],
        "use_bias": "blocks.0.attn.qkv.bias" in state_dict,
    }
    if "pos_embed" in state_dict:
        inferred["input_size"] = math.isqrt(state_dict["pos_embed"].shape[1]) * inferred["patch_size"]
    expert_weights = [v for k, v in state_dict.items() if k.endswith("mlp.w1") and v.ndim == 3]
    # No expert weights at all (e.g. experts_every_n beyond the depth): every block is a dense SwiGLU.
    inferred["num_experts"] = expert_weights[0].shape[0] if expert_weights else 0
    inferred.update(original_config)

    preset = "MicroDiT_Tiny_2" if inferred["dim"] == MICRODIT_PRESETS["MicroDiT_Tiny_2"]["hidden_size"] else "MicroDiT_XL_2"
    config = {**MICRODIT_PRESETS[preset]}
    config.update({ORIGINAL_CONFIG_NAMES[k]: v for k, v in inferred.items()})
    for name in ("qkv_multipliers", "ffn_multipliers"):
        if config.get(name) is not None:
            config[name] = [float(m) for m in config[name]]
    if "pos_interp_scale" not in original_config and "pos_embed" in state_dict:
        config["pos_interp_scale"] = _infer_pos_interp_scale(state_dict["pos_embed"])
    return config


def _value_precision(tensor: torch.Tensor) -> torch.dtype:
    """The precision the stored values carry: their dtype, or bf16/fp16 when a wider tensor holds only values of that
    format (a buffer cast down for mixed-precision training and saved back up)."""
    for narrow in (torch.bfloat16, torch.float16):
        wider = torch.finfo(tensor.dtype).bits > torch.finfo(narrow).bits
        if wider and torch.equal(tensor, tensor.to(narrow).to(tensor.dtype)):
            return narrow
    return tensor.dtype


def _pos_embed_tolerance(pos_embed: torch.Tensor) -> float:
    """Largest accepted difference between a stored and a recomputed position table: `_POS_EMBED_ULPS` ulps of the
    stored precision at magnitude 1 (sin/cos values lie in [-1, 1], where one ulp is at most `eps`). Never finer
    than float32's, the precision of the recomputed table."""
    eps = max(torch.finfo(_value_precision(pos_embed)).eps, torch.finfo(torch.float32).eps)
    return _POS_EMBED_ULPS * eps


def _pos_embed_error(tokens: torch.Tensor, height: int, width: int, scale: float) -> float:
    """Max abs difference between stored position tokens (height * width, dim) and sin-cos positions for that grid."""
    expected = microdit_2d_sincos_pos_embed(tokens.shape[-1], height, width, scale)
    return (tokens.float() - expected).abs().max().item()


def _infer_pos_interp_scale(pos_embed: torch.Tensor) -> float:
    """Read `pos_interp_scale` off the stored positions: the candidate scale whose first token row (which holds every
    column position) best matches, accepted if within the storage precision's tolerance."""
    grid = math.isqrt(pos_embed.shape[-2])
    if pos_embed.is_meta or grid < 2:
        return 1.0  # nothing to read: a lone token sits at position 0 for every scale
    first_row = pos_embed.reshape(-1, pos_embed.shape[-1])[:grid]
    errors = {scale: _pos_embed_error(first_row, 1, grid, scale) for scale in _POS_INTERP_SCALE_CANDIDATES}
    scale = min(errors, key=errors.get)
    tolerance = _pos_embed_tolerance(pos_embed)
    if errors[scale] > tolerance:
        raise ValueError(
            f"Cannot read pos_interp_scale off the checkpoint's pos_embed: no multiple of 1/8 up to 16 reproduces it "
            f"within {tolerance:.3g} (closest: {scale}, off by {errors[scale]:.3g}). Pass the scale the checkpoint "
            "was trained with as original_config['pos_interp_scale'] (1.0 for 256 px, 2.0 for the 512-px models)."
        )
    return scale


def _check_pos_embed(pos_embed: torch.Tensor, config: dict) -> None:
    """The model recomputes positions; refuse a checkpoint whose stored ones would differ beyond storage rounding."""
    if pos_embed.is_meta:
        return
    grid, scale = config["sample_size"] // config["patch_size"], config["pos_interp_scale"]
    tokens = pos_embed.reshape(-1, pos_embed.shape[-1])
    if tokens.shape[0] != grid * grid:
        raise ValueError(
            f"The checkpoint's pos_embed has {tokens.shape[0]} tokens, but input_size={config['sample_size']} means a "
            f"{grid}x{grid} grid; pass the input_size it was trained with, or leave it out to read it off the table."
        )
    error, tolerance = _pos_embed_error(tokens, grid, grid, scale), _pos_embed_tolerance(pos_embed)
    if error > tolerance:
        raise ValueError(
            f"The checkpoint's pos_embed differs from sin-cos positions with pos_interp_scale={scale} by {error:.3g} "
            f"(tolerance {tolerance:.3g} for {_value_precision(pos_embed)} values); pass the scale the checkpoint was "
            "trained with as original_config['pos_interp_scale'], or leave it out to read it off the table."
        )


def convert_microdit_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename original keys to the diffusers layout and split packed q/k/v (self-attention) and k/v
    (cross-attention) projections. `pos_embed` is dropped: the model computes positions for each grid."""
    converted = {}
    for key, value in state_dict.items():
        if key == "pos_embed":
            continue
        for pattern, new_prefix, parameters, renames, packed in _GROUPS:
            match = re.match(pattern, key)
            if match:
                break
        prefix, rest = new_prefix.format(*match.groups()), key[match.end() :]
        module, _, param = rest.rpartition(".")
        if module in packed:
            for new_module, chunk in zip(packed[module], value.chunk(len(packed[module]), dim=0)):
                converted[f"{prefix}{new_module}.{param}"] = chunk.clone()
        else:
            converted[prefix + parameters.get(rest, _rename(rest, renames))] = value
    return converted


def _rename(key: str, renames: dict[str, str]) -> str:
    """Apply the longest matching rename of whole leading path components; other keys keep their name."""
    for old in sorted(renames, key=len, reverse=True):
        if key == old or key.startswith(old + "."):
            return renames[old] + key[len(old) :]
    return key


def convert_microdit_checkpoint(
    state_dict_or_path: dict | str | os.PathLike, original_config: dict | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load (if a path), unwrap and convert an original checkpoint; returns `(diffusers_config, state_dict)`."""
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        checkpoint = load_state_dict_file(state_dict_or_path)
    else:
        checkpoint = state_dict_or_path
    state_dict = unwrap_original_checkpoint(checkpoint)
    if "x_embedder.proj.weight" not in state_dict:
        raise ValueError(
            "This does not look like a micro_diffusion DiT checkpoint: 'x_embedder.proj.weight' is missing "
            f"(first keys: {list(state_dict)[:5]})."
        )
    config = infer_original_config(state_dict, original_config)
    if "pos_embed" in state_dict:
        _check_pos_embed(state_dict["pos_embed"], config)
    return config, convert_microdit_state_dict(state_dict)
