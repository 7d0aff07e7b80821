"""peft LoRA for the package's pipelines: one loader mixin and the default target modules of each model family.

What a LoRA adapts (peft wraps `nn.Linear` layers whose name ends with one of the targets):

* MicroDiT ([`MICRODIT_LORA_TARGET_MODULES`]): the q/k/v/out projections of every attention (self- and
  cross-attention in the patch mixer and backbone blocks, and the caption refiner) and the gate/up/down projections
  of the dense SwiGLU feed-forwards. NOT adapted: the expert-choice MoE experts (`w_in`/`w_out` are plain
  parameters, not `nn.Linear`), the MoE routers (adapting them would change which tokens each expert takes), the
  adaLN modulations, embeddings, caption projections and the output layer.
* PixArt-Σ and its KV-compressed variant ([`PIXART_LORA_TARGET_MODULES`]): q/k/v/out of self- and cross-attention
  and both feed-forward linears of every block. NOT adapted: the KV-compression convs and norms, adaLN-single,
  the caption projection, patch embedding and output layer.

Train with `transformer.add_adapter(LoraConfig(r=..., target_modules=list(MICRODIT_LORA_TARGET_MODULES)))`.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from diffusers.loaders import PeftAdapterMixin
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict
from diffusers.utils import convert_unet_state_dict_to_peft, logging

logger = logging.get_logger(__name__)

MICRODIT_LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "gate_proj", "up_proj", "down_proj")
PIXART_LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")

_HUB_DOWNLOAD_KWARGS = ("cache_dir", "proxies", "local_files_only", "token", "revision", "subfolder")


class TransformerLoraLoaderMixin(LoraBaseMixin):
    r"""LoRA loading, saving and fusing for a pipeline whose only LoRA-loadable component is `transformer`.

    The transformer must subclass diffusers' [`~loaders.PeftAdapterMixin`]. Files use diffusers' LoRA format
    (`pytorch_lora_weights.safetensors`, keys `transformer.<module>.lora_A.weight`, the peft config as
    `lora_adapter_metadata` in the header), so they load with `pipe.load_lora_weights(repo_or_folder)`.

    [`~loaders.LoraBaseMixin`] supplies the rest: `set_adapters`, `disable_lora`/`enable_lora`, `delete_adapters`,
    `get_active_adapters`, `get_list_adapters`, `unload_lora_weights`, `set_lora_device`, `enable_lora_hotswap`.
    """

    _lora_loadable_modules = ["transformer"]
    transformer_name = "transformer"

    @classmethod
    def lora_state_dict(
        cls,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        weight_name: str | None = None,
        use_safetensors: bool | None = None,
        force_download: bool = False,
        return_lora_metadata: bool = False,
        **hub_kwargs,
    ):
        r"""Read a LoRA state dict from a Hub repo id, a folder, a file or an in-memory dict.

        Args:
            pretrained_model_name_or_path_or_dict: where the weights are.
            weight_name: file name inside the repo/folder (default: the only `.safetensors` there).
            use_safetensors: `None` tries safetensors first, then a pickled `.bin` (loaded with `weights_only`).
            force_download, hub_kwargs: `cache_dir`, `proxies`, `local_files_only`, `token`, `revision`,
                `subfolder`, as in `from_pretrained`.
            return_lora_metadata: also return the peft config saved in the safetensors header (or `None`).
        """
        unknown = sorted(set(hub_kwargs) - set(_HUB_DOWNLOAD_KWARGS))
        if unknown:
            raise TypeError(f"Unexpected arguments {unknown}; accepted download arguments: {_HUB_DOWNLOAD_KWARGS}.")
        # diffusers' private helper is reused (rather than re-implemented) because it resolves every source kind,
        # guesses the weight name and reads the adapter metadata exactly as diffusers' own LoRA mixins do.
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
            weight_name=weight_name,
            use_safetensors=use_safetensors is not False,
            allow_pickle=use_safetensors is not True,
            force_download=force_download,
            user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
            **{name: hub_kwargs.get(name) for name in _HUB_DOWNLOAD_KWARGS},
        )
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        low_cpu_mem_usage: bool = False,
        **kwargs,
    ) -> None:
        r"""Load a LoRA into `self.transformer` as adapter `adapter_name` (default: `default_0`, `default_1`, ...).

        Accepts the pipeline format written by [`save_lora_weights`] (keys prefixed `transformer.`; keys of other
        components are ignored with a warning) and the un-prefixed format of `transformer.save_lora_adapter` (when
        every key names a module of this transformer). A file with nothing for the transformer loads nothing and
        logs why, as diffusers' loaders do. `kwargs` go to [`lora_state_dict`].
        """
        transformer = getattr(self, self.transformer_name)
        if not isinstance(transformer, PeftAdapterMixin):
            raise TypeError(
                f"{type(transformer).__name__} cannot take LoRA adapters: its class must subclass diffusers' "
                "PeftAdapterMixin."
            )
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            # The loader pops keys; leave the caller's dict untouched.
            pretrained_model_name_or_path_or_dict = dict(pretrained_model_name_or_path_or_dict)
        state_dict, metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        not_lora = [key for key in state_dict if "lora" not in key]
        if not_lora:
            raise ValueError(
                f"Not a LoRA checkpoint: {len(not_lora)} keys lack 'lora' (e.g. {not_lora[0]!r}). Full model weights "
                "load with `from_pretrained`, not `load_lora_weights`."
            )
        prefix = self._transformer_prefix(transformer, state_dict)
        if prefix is False:
            # diffusers' own loaders skip such files the same way: a LoRA for other components is no error.
            example = f"keys are e.g. {next(iter(state_dict))!r}" if state_dict else "the state dict is empty"
            logger.warning(
                f"No LoRA keys associated to {type(transformer).__name__} found with the "
                f"prefix={self.transformer_name!r} ({example}); nothing was loaded. This pipeline takes LoRA weights "
                "for its transformer only."
            )
            return
        if prefix is not None:
            foreign = [key for key in state_dict if not key.startswith(f"{prefix}.")]
            if foreign:
                logger.warning(
                    f"Ignoring {len(foreign)} LoRA keys not for the {prefix} (e.g. {foreign[0]!r}): this pipeline "
                    "loads LoRA weights into its transformer only."
                )
        transformer.load_lora_adapter(
            state_dict,
            prefix=prefix,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    def _transformer_prefix(self, transformer: torch.nn.Module, state_dict: dict) -> str | None | bool:
        """The `prefix` for `load_lora_adapter`: `transformer_name` for the pipeline format, `None` for un-prefixed
        keys that all name modules of `transformer` (`save_lora_adapter` files), `False` for a LoRA of something
        else. Raises for un-prefixed keys that only partly fit: that is a LoRA for another configuration."""
        if any(key.startswith(f"{self.transformer_name}.") for key in state_dict):
            return self.transformer_name
        # Old attention-processor formats (`to_q_lora.down`) are renamed the way `load_lora_adapter` will.
        module_paths = {key.split(".lora_")[0] for key in convert_unet_state_dict_to_peft(state_dict)}
        modules = dict(transformer.named_modules())
        missing = sorted(path for path in module_paths if path not in modules)
        if module_paths and not missing:
            return None
        if len(missing) == len(module_paths):  # an empty file counts as someone else's, too
            return False
        raise ValueError(
            f"{len(missing)} of the {len(module_paths)} modules this LoRA adapts are not in "
            f"{type(transformer).__name__} (e.g. {missing[0]!r}): it was made for a transformer of another "
            "configuration. Load it into that one, or prefix the keys that do fit with "
            f"'{self.transformer_name}.' to load those alone."
        )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.Tensor | torch.nn.Module],
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
    ) -> None:
        r"""Write `transformer_lora_layers` (e.g. `peft.utils.get_peft_model_state_dict(pipe.transformer)`) to
        `save_directory/pytorch_lora_weights.safetensors`.

        Pass the adapter's config as `transformer_lora_adapter_metadata` (`pipe.transformer.peft_config[name]
        .to_dict()`): without it a loader can only infer ranks from the weights and assumes `lora_alpha == r`.
        """
        if not transformer_lora_layers:
            raise ValueError(
                "`transformer_lora_layers` is empty; pass `get_peft_model_state_dict(pipe.transformer)` of a "
                "transformer that has a LoRA adapter."
            )
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers={cls.transformer_name: transformer_lora_layers},
            lora_metadata={cls.transformer_name: transformer_lora_adapter_metadata},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ) -> None:
        r"""Merge the active adapters (or `adapter_names`) into the transformer weights, scaled by `lora_scale`;
        `safe_fusing` refuses weights that would become NaN. Reverse with [`unfuse_lora`]."""
        super().fuse_lora(
            components=components or self._lora_loadable_modules,
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        r"""Subtract previously fused adapters from the transformer weights again."""
        super().unfuse_lora(components=components or self._lora_loadable_modules, **kwargs)
