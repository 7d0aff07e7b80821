"""`from_single_file`: diffusers' name for loading an original (non-diffusers) checkpoint file into a model class.

diffusers' own `FromOriginalModelMixin` is not used: its `from_single_file` serves only the classes in its fixed
`SINGLE_FILE_LOADABLE_CLASSES` table (it raises for any other class, PixArt included), identifies architectures from
diffusers' table of checkpoint keys, and has no converter for MicroDiT or the KV-compression weights.
"""

from __future__ import annotations

import os

import torch


class OriginalCheckpointLoaderMixin:
    """Gives a model class with a `from_original(state_dict_or_path, original_config)` converter the diffusers-style
    `from_single_file` entry point (local files, Hub file URLs, `dtype`, `device`, download options)."""

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path: str | os.PathLike | dict,
        original_config: dict | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ):
        """Load an original checkpoint with the class's `from_original` converter.

        Args:
            pretrained_model_link_or_path: a local `.pt`/`.pth`/`.safetensors` file (pickles are read with
                `torch.load(weights_only=True)`), a Hub file URL `https://huggingface.co/<repo>/blob/<revision>/<file>`
                (downloaded with `huggingface_hub.hf_hub_download`), or an already loaded state dict.
            original_config: the original constructor's keyword arguments, as for `from_original`.
            dtype: cast the converted model to this dtype (`torch_dtype` is accepted, deprecated as in diffusers).
            kwargs: `device`, and the download options `cache_dir`, `force_download`, `local_files_only`, `token`,
                `revision`.
        """
        from ..conversion.utils import resolve_single_file

        checkpoint, dtype, device = resolve_single_file(pretrained_model_link_or_path, dtype, kwargs)
        model = cls.from_original(checkpoint, original_config)
        if dtype is not None or device is not None:
            model = model.to(device=device, dtype=dtype)
        return model
