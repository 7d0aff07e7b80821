"""open_clip CLIP text tower -> transformers `CLIPTextModel` (the matching tokenizer setup,
`configure_openclip_tokenizer`, lives in `diffusers_microdit.pipelines.openclip_tokenizer`).

MicroDiT (Sony micro_diffusion) encodes captions with the open_clip text tower of `apple/DFN5B-CLIP-ViT-H-14-378`
and feeds the DiT the `ln_final` output at all 77 positions, padding included. The tower runs with its causal mask
only (no padding mask) on ids padded with 0. The transformers equivalent is:

    tokenizer = configure_openclip_tokenizer(CLIPTokenizer.from_pretrained(...))
    text_encoder = convert_openclip_text_encoder("open_clip_pytorch_model.bin")
    ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
    caption_embeds = text_encoder(input_ids=ids).last_hidden_state  # no attention_mask
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ..pipelines.openclip_tokenizer import OPENCLIP_PAD_TOKEN_ID
from .utils import load_state_dict_file, strip_prefixes

__all__ = ["convert_openclip_text_encoder", "openclip_text_state_dict_to_transformers"]

# Wrappers added around the whole model by DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Parts of a full open_clip CLIP checkpoint that are not the text tower.
_NON_TEXT_PREFIXES = ("visual.",)
_NON_TEXT_KEYS = frozenset({"logit_scale"})
# open_clip's CustomTextCLIP nests the text tower under `text.`; plain CLIP keeps it at the top level.
_TEXT_TOWER_PREFIX = "text."

_TOP_LEVEL_KEYS = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_BLOCK_KEYS = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# nn.MultiheadAttention packs the q, k and v projections row-wise, in that order.
_PACKED_QKV_KEYS = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_BLOCK_PATTERN = re.compile(r"transformer\.resblocks\.(\d+)\.")
# transformers checkpoints (and CLIPTextModelWithProjection in memory) put the text tower under this prefix;
# a transformers 5 CLIPTextModel has no such submodule in memory.
_TRANSFORMERS_TEXT_PREFIX = "text_model."


def _format_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def _num_layers(tower: Mapping[str, torch.Tensor]) -> int:
    indices = [int(match.group(1)) for key in tower if (match := _BLOCK_PATTERN.match(key))]
    # At least one block is expected, so a state_dict without blocks reports them as missing.
    return max(indices, default=0) + 1


def _text_tower(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the text-tower tensors of an open_clip checkpoint under open_clip's key names, checked to be complete."""
    if isinstance(state_dict.get("state_dict"), Mapping):  # open_clip training checkpoint
        state_dict = state_dict["state_dict"]
    tower = {
        key: value
        for key, value in strip_prefixes(dict(state_dict), _WRAPPER_PREFIXES).items()
        if key not in _NON_TEXT_KEYS and not key.startswith(_NON_TEXT_PREFIXES)
    }
    if tower and all(key.startswith(_TEXT_TOWER_PREFIX) for key in tower):
        tower = {key.removeprefix(_TEXT_TOWER_PREFIX): value for key, value in tower.items()}

    expected = {*_TOP_LEVEL_KEYS, "text_projection"}
    for i in range(_num_layers(tower)):
        expected.update(f"transformer.resblocks.{i}.{name}" for name in (*_BLOCK_KEYS, *_PACKED_QKV_KEYS))
    missing, unexpected = sorted(expected - tower.keys()), sorted(tower.keys() - expected)
    if missing or unexpected:
        problems = [f"missing keys: {_format_keys(missing)}"] if missing else []
        problems += [f"unexpected keys: {_format_keys(unexpected)}"] if unexpected else []
        raise ValueError(f"Not an open_clip CLIP text tower state_dict; {'; '.join(problems)}.")
    return tower


def _to_transformers(tower: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, value in tower.items():
        if key == "text_projection":
            # open_clip computes `x @ text_projection` ([W, E]); nn.Linear stores the transpose ([E, W]).
            converted["text_projection.weight"] = value.T.contiguous()
            continue
        if key in _TOP_LEVEL_KEYS:
            converted[_TRANSFORMERS_TEXT_PREFIX + _TOP_LEVEL_KEYS[key]] = value
            continue
        match = _BLOCK_PATTERN.match(key)
        prefix = f"{_TRANSFORMERS_TEXT_PREFIX}encoder.layers.{match.group(1)}."
        name = key[match.end() :]
        if name in _PACKED_QKV_KEYS:
            # Clones, so the three tensors do not share storage (safetensors refuses to save shared tensors).
            for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                converted[f"{prefix}self_attn.{proj}.{_PACKED_QKV_KEYS[name]}"] = chunk.clone()
        else:
            converted[prefix + _BLOCK_KEYS[name]] = value
    return converted


def openclip_text_state_dict_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip text-tower state_dict to the transformers CLIP text checkpoint layout.

    Accepts a text-tower or a full CLIP state_dict (see `convert_openclip_text_encoder`). Keys come out as
    `text_model.*` plus `text_projection.weight`, which is what `CLIPTextModelWithProjection.load_state_dict` takes
    and what `save_pretrained` writes. Raises `ValueError` naming missing or unexpected keys.
    """
    return _to_transformers(_text_tower(state_dict))


def _text_config(tower: Mapping[str, torch.Tensor], num_attention_heads: int) -> CLIPTextConfig:
    vocab_size, width = tower["token_embedding.weight"].shape
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=tower["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        projection_dim=tower["text_projection"].shape[1],
        num_hidden_layers=_num_layers(tower),
        num_attention_heads=num_attention_heads,
        max_position_embeddings=tower["positional_embedding"].shape[0],
        # The weights cannot tell the activation apart; DFN5B (ViT-H-14-378-quickgelu) uses QuickGELU.
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,  # torch.nn.LayerNorm's default, which open_clip uses
        pad_token_id=OPENCLIP_PAD_TOKEN_ID,
        # open_clip's SOT and EOT are the two last ids. transformers pools at the first EOT and open_clip at
        # argmax(ids); both pick the same position because EOT is the largest id.
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
    )


def convert_openclip_text_encoder(
    state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike,
    num_attention_heads: int = 16,
    torch_dtype: torch.dtype | None = None,
) -> CLIPTextModel:
    """Build a transformers `CLIPTextModel` (eval mode) from an open_clip CLIP text tower.

    Args:
        state_dict_or_path: a state_dict, or a `.safetensors` / `.pt` / `.pth` / `.bin` file (pickles are read with
            `weights_only=True`). A full open_clip CLIP checkpoint works too: `visual.*` and `logit_scale` are
            ignored, and `module.`, `_orig_mod.`, a `text.` tower prefix and a `{"state_dict": ...}` wrapper are
            removed.
        num_attention_heads: not recoverable from the weights; 16 for DFN5B-CLIP-ViT-H-14-378.
        torch_dtype: dtype of the returned model; `None` keeps float32.

    Sizes (vocab, width, layers, context length, MLP width) are read from the weights; QuickGELU and a LayerNorm eps
    of 1e-5 are assumed. `text_projection` only sets `config.projection_dim`: `CLIPTextModel` has no projection head
    and MicroDiT does not use one. For the projection, load `openclip_text_state_dict_to_transformers(...)` into a
    `CLIPTextModelWithProjection(model.config)`.

    Call the model without `attention_mask`, as MicroDiT does: a padding mask changes the states at pad positions,
    which MicroDiT consumes. Raises `ValueError` naming the keys when the weights do not form such a text tower.
    """
    if not isinstance(state_dict_or_path, Mapping):
        state_dict_or_path = load_state_dict_file(state_dict_or_path)
    tower = _text_tower(state_dict_or_path)
    model = CLIPTextModel(_text_config(tower, num_attention_heads))

    converted = _to_transformers(tower)
    del converted["text_projection.weight"]
    weights = {key.removeprefix(_TRANSFORMERS_TEXT_PREFIX): value for key, value in converted.items()}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:  # shape mismatches, e.g. blocks of different widths
        raise ValueError(f"The open_clip text tower does not fit the inferred CLIPTextConfig: {error}") from error
    if torch_dtype is not None:
        model.to(torch_dtype)
    return model.eval()
