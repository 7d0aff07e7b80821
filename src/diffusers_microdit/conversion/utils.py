"""Loading helpers shared by the checkpoint converters."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """Load a `.safetensors` file, or a pickled `.pt/.pth/.bin/.ckpt` with `torch.load(weights_only=True)` so an
    original checkpoint can never execute code while it is converted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def strip_prefixes(state_dict: dict, prefixes: tuple[str, ...]) -> dict:
    """Remove wrapper prefixes (DDP `module.`, `torch.compile` `_orig_mod.`, ...) wherever they are stacked."""
    stripped = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        stripped[key] = value
    return stripped
