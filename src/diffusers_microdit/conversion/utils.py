"""Loading helpers shared by the checkpoint converters."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

import huggingface_hub
import torch
from diffusers.models.model_loading_utils import load_state_dict


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """Load a `.safetensors` file, or a pickled `.pt/.pth/.bin/.ckpt` with `torch.load(weights_only=True)` so an
    original checkpoint can never execute code while it is converted (diffusers' own `load_state_dict`, which does
    both, memory-maps zip pickles and explains git-lfs pointer files), onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    return load_state_dict(str(path), map_location="cpu")


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


# Hub file URLs: https://huggingface.co/<owner>/<repo>/blob/<revision>/<path> (or /resolve/), also for datasets/spaces.
_HUB_FILE_URL = re.compile(
    r"^(?:https?://)?(?:huggingface\.co|hf\.co)/(?:(?P<type>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/"
    r"(?:blob|resolve)/(?P<revision>[^/]+)/(?P<filename>.+)$"
)
SINGLE_FILE_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")


def download_hub_file(url: str, **download_kwargs) -> str:
    """Download a Hub file URL (`https://huggingface.co/<repo>/blob/<revision>/<file>`) with `hf_hub_download` and
    return the local path. A `revision` keyword must agree with the URL's."""
    match = _HUB_FILE_URL.match(url)
    if match is None:
        raise ValueError(
            f"{url!r} is neither a local file nor a Hub file URL; pass a path to a .pt/.pth/.safetensors file or a "
            "URL like https://huggingface.co/<owner>/<repo>/blob/<revision>/<file>."
        )
    revision = unquote(match["revision"])
    if download_kwargs.get("revision") not in (None, revision):
        raise ValueError(
            f"revision={download_kwargs['revision']!r} contradicts the revision {revision!r} in the URL {url!r}; "
            "drop one of them."
        )
    download_kwargs["revision"] = revision
    repo_type = {"datasets": "dataset", "spaces": "space"}.get(match["type"])
    # Looked up at call time, so tests can replace it.
    return huggingface_hub.hf_hub_download(
        match["repo"], unquote(match["filename"]), repo_type=repo_type, **download_kwargs
    )


def resolve_single_file(
    link_or_path: str | os.PathLike | dict, dtype: torch.dtype | None, kwargs: dict
) -> tuple[str | os.PathLike | dict, torch.dtype | None, torch.device | str | None]:
    """Arguments of a `from_single_file` -> `(local path or state dict, dtype, device)`.

    Reads and checks the diffusers-style options in `kwargs`: the deprecated `torch_dtype` (resolved against
    `dtype` as diffusers does), `device` and the download options of a Hub URL; any other keyword is an error.
    """
    from diffusers.utils import _resolve_dtype

    kwargs = dict(kwargs)
    dtype = _resolve_dtype(dtype, kwargs.pop("torch_dtype", None))
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.bfloat16, got {dtype!r}.")
    device = kwargs.pop("device", None)
    download_kwargs = {name: kwargs.pop(name) for name in SINGLE_FILE_DOWNLOAD_KWARGS if name in kwargs}
    if kwargs:
        raise TypeError(
            f"from_single_file got unsupported arguments {sorted(kwargs)}; it takes original_config, dtype, device "
            f"and the download options {list(SINGLE_FILE_DOWNLOAD_KWARGS)}."
        )
    if isinstance(link_or_path, dict) or Path(link_or_path).is_file():
        return link_or_path, dtype, device
    link = str(link_or_path)
    if "://" not in link and not link.startswith(("huggingface.co/", "hf.co/")):
        raise FileNotFoundError(
            f"No checkpoint file at {link}; pass a local .pt/.pth/.safetensors file or a Hub file URL like "
            "https://huggingface.co/<owner>/<repo>/blob/<revision>/<file>."
        )
    return download_hub_file(link, **download_kwargs), dtype, device
