"""LoRA finetuning on the shared training core (examples/train_lora.py): a peft adapter on the pipeline's transformer,
checkpoints that hold only the adapter (as a loadable LoRA), and `pytorch_lora_weights.safetensors` with a model card
as the output."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from ..hub import save_lora_with_card
from ..loaders.lora import MICRODIT_LORA_TARGET_MODULES, PIXART_LORA_TARGET_MODULES, TransformerLoraLoaderMixin
from ..models.transformer_microdit import MicroDiTTransformer2DModel
from .trainer import DiffusionTrainer

# Where checkpoints before the adapter moved to the checkpoint's top level kept it (read on resume only).
LEGACY_ADAPTER_CHECKPOINT_FILE = "adapter_model.safetensors"


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    """The diffusers LoRA examples' adapter flags."""
    group = parser.add_argument_group("LoRA")
    group.add_argument("--rank", type=int, default=4, help="Rank of the LoRA update matrices.")
    group.add_argument(
        "--lora_alpha", type=float, default=None,
        help="LoRA alpha; the update is scaled by alpha / rank (default: alpha = rank, a scale of 1).",
    )
    group.add_argument("--lora_dropout", type=float, default=0.0)
    group.add_argument(
        "--lora_target_modules", nargs="+", default=None,
        help="Suffixes of the nn.Linear module names to adapt (default: the family's attention and dense FFN "
        f"projections; MicroDiT: {' '.join(MICRODIT_LORA_TARGET_MODULES)}; PixArt-Sigma/LiT: "
        f"{' '.join(PIXART_LORA_TARGET_MODULES)}).",
    )


def check_lora_args(args: argparse.Namespace) -> list[str]:
    """Problems with the LoRA flags, each saying what to change."""
    errors = []
    if args.rank < 1:
        errors.append(f"--rank must be >= 1, got {args.rank}.")
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        errors.append(f"--lora_alpha must be > 0, got {args.lora_alpha}.")
    if not 0.0 <= args.lora_dropout < 1.0:
        errors.append(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}.")
    if args.use_ema:
        errors.append("--use_ema does not apply to LoRA training (the base weights are frozen); drop it.")
    return errors


def default_target_modules(transformer: torch.nn.Module) -> tuple[str, ...]:
    """The family's default LoRA targets (see `diffusers_microdit.loaders.lora` for what they cover)."""
    if isinstance(transformer, MicroDiTTransformer2DModel):
        return MICRODIT_LORA_TARGET_MODULES
    return PIXART_LORA_TARGET_MODULES


def add_lora_adapter(transformer: torch.nn.Module, args: argparse.Namespace, weight_dtype: torch.dtype) -> LoraConfig:
    """Freeze `transformer` (cast to the mixed-precision `weight_dtype`) and add a trainable float32 LoRA adapter
    with the --rank/--lora_* settings, as the diffusers LoRA examples do."""
    transformer.requires_grad_(False)
    transformer.to(dtype=weight_dtype)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha or args.rank,
        lora_dropout=args.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=list(args.lora_target_modules or default_target_modules(transformer)),
    )
    try:
        transformer.add_adapter(config)
    except ValueError as error:  # peft: no module matched the targets
        raise SystemExit(f"--lora_target_modules: {error}") from None
    cast_training_params(transformer, dtype=torch.float32)
    return config


class LoraTrainer(DiffusionTrainer):
    """`DiffusionTrainer` whose checkpoints hold only the LoRA adapter and whose output is the adapter file
    `pytorch_lora_weights.safetensors` (with a model card) in `--output_dir`, where `load_lora_weights` finds it.

    Each `checkpoint-N/` keeps the adapter as `pytorch_lora_weights.safetensors` too (pipeline format, peft config in
    the header), so `pipe.load_lora_weights("out/checkpoint-N")` loads it at the trained strength, and resuming
    reads the same file: the adapter is stored once, and there is no `transformer/` subfolder to load by mistake.
    """

    def save_model_weights(self, model: torch.nn.Module, folder: Path) -> None:
        # `folder` is `checkpoint-N/<model_name>`; the adapter goes one level up, next to Accelerate's optimizer and
        # scheduler files, whose names diffusers' weight-name guess skips, so it is the file a LoRA loader picks.
        adapter = model.active_adapters()[0]
        TransformerLoraLoaderMixin.save_lora_weights(
            folder.parent,
            transformer_lora_layers=get_peft_model_state_dict(model, adapter_name=adapter),
            # Without the config a loader assumes lora_alpha == r: a weaker (or stronger) adapter than trained.
            transformer_lora_adapter_metadata=model.peft_config[adapter].to_dict(),
        )

    def load_model_weights(self, model: torch.nn.Module, folder: Path) -> None:
        path, prefix = folder.parent / LORA_WEIGHT_NAME_SAFE, f"{TransformerLoraLoaderMixin.transformer_name}."
        if not path.is_file():  # a checkpoint written before the adapter moved to the checkpoint's top level
            path, prefix = folder / LEGACY_ADAPTER_CHECKPOINT_FILE, ""
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder.parent} holds no {LORA_WEIGHT_NAME_SAFE}: resume from a checkpoint-N folder of a "
                "train_lora.py run."
            )
        adapter = model.active_adapters()[0]
        config = model.peft_config[adapter]
        weights, metadata = TransformerLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
        saved = {key.removeprefix(prefix): value for key, value in (metadata or {}).items()}
        for name, flag in (("r", "--rank"), ("lora_alpha", "--lora_alpha")):
            if name in saved and saved[name] != getattr(config, name):
                raise RuntimeError(
                    f"{path} was trained with {name}={saved[name]}, this run has {getattr(config, name)}: resume "
                    f"with {flag} {saved[name]}."
                )
        weights = {key.removeprefix(prefix): value for key, value in weights.items()}
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter)
        if result.unexpected_keys or any("lora_" in key for key in result.missing_keys):
            raise RuntimeError(
                f"{path} does not hold the LoRA weights of this adapter: resume "
                "with the --rank and --lora_target_modules the checkpoint was trained with."
            )

    def save_output(self, model: torch.nn.Module, build_pipeline: Callable, **card) -> Path:
        return save_lora_with_card(build_pipeline(model), self.output_dir, **card)
