"""`from_original` / `from_single_file`: loading an original (non-diffusers) checkpoint into a model class.

The converters live in `diffusers_microdit.conversion` (which imports the models, never the reverse); the mixin
imports a class's converter only when it is called.

diffusers' own `FromOriginalModelMixin` is not used: its `from_single_file` serves only the classes in its fixed
`SINGLE_FILE_LOADABLE_CLASSES` table (it raises for any other class, PixArt included), identifies architectures from
diffusers' table of checkpoint keys, and has no converter for MicroDiT or the KV-compression weights.
"""

from __future__ import annotations

import importlib
import os

import torch


class OriginalCheckpointLoaderMixin:
    """`from_original` and the diffusers-style `from_single_file` entry point (local files, Hub file URLs, `dtype`,
    `device`, download options) for a model class.

    The class names its converter in `_original_checkpoint_converter` as `"<module of conversion>:<function>"`; the
    function maps `(state_dict_or_path, original_config)` to `(diffusers config, diffusers state dict)`. The class
    may override `_load_original_state_dict` (default: strict `load_state_dict`).
    """

    _original_checkpoint_converter: str

    @classmethod
    def from_original(
        cls,
        state_dict_or_path: dict | str | os.PathLike,
        original_config: dict | None = None,
        torch_dtype: torch.dtype | None = None,
    ):
        """Convert an original checkpoint: a state dict, or a `.pt`/`.pth`/`.safetensors` file of one (pickles are
        read with `torch.load(weights_only=True)`).

        `original_config` takes the original constructor's keyword names; sizes readable from the weights are
        inferred (see the class docstring for the family's details). Returns the model in eval mode, cast to
        `torch_dtype` if given.
        """
        module_name, function_name = cls._original_checkpoint_converter.split(":")
        module = importlib.import_module(f"{__package__.rsplit('.', 1)[0]}.conversion.{module_name}")
        config, state_dict = getattr(module, function_name)(state_dict_or_path, original_config)
        model = cls(**config)
        model._load_original_state_dict(state_dict)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        return model.eval()

    def _load_original_state_dict(self, state_dict: dict) -> None:
        self.load_state_dict(state_dict, strict=True)

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
