"""Loader mixins (LoRA) for the package's pipelines."""

from .lora import MICRODIT_LORA_TARGET_MODULES, PIXART_LORA_TARGET_MODULES, TransformerLoraLoaderMixin

__all__ = ["MICRODIT_LORA_TARGET_MODULES", "PIXART_LORA_TARGET_MODULES", "TransformerLoraLoaderMixin"]
