"""Loader mixins: LoRA for the package's pipelines, original single-file checkpoints for its models."""

from .lora import MICRODIT_LORA_TARGET_MODULES, PIXART_LORA_TARGET_MODULES, TransformerLoraLoaderMixin
from .single_file import OriginalCheckpointLoaderMixin

__all__ = [
    "MICRODIT_LORA_TARGET_MODULES",
    "PIXART_LORA_TARGET_MODULES",
    "OriginalCheckpointLoaderMixin",
    "TransformerLoraLoaderMixin",
]
