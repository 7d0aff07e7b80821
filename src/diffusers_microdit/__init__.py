"""diffusers-microdit: micro-budget text-to-image diffusion transformers for the Hugging Face stack.

How saved pipelines find these classes again (the one place this is explained; modules point here):

* Importing the package imports every model, scheduler and pipeline module eagerly: diffusers 0.42 loads a
  third-party component only if the module path recorded in `model_index.json` is already imported.
* diffusers picks a component's load method by looking up its loadable base classes (`ModelMixin`,
  `SchedulerMixin`, ...) as attributes of that recorded module, so every component module keeps the matching base
  importable as a module-level name, even where it subclasses it only indirectly (`# noqa: F401 (see the package
  docstring)`).
* Pipeline classes are exposed as attributes of `diffusers` itself (`_register_with_diffusers` below).
"""

import diffusers as _diffusers

from .conversion.microdit import convert_microdit_checkpoint
from .conversion.openclip import convert_openclip_text_encoder
from .models.transformer_lit import LiTLinearAttnProcessor, LiTTransformer2DModel
from .models.transformer_microdit import (
    MicroDiTTransformer2DModel,
    MicroDiTTransformerOutput,
    get_random_keep_ids,
)
from .models.transformer_pixart_kv import PixArtKVAttnProcessor2_0, PixArtSigmaKVTransformer2DModel
from .pipelines.pipeline_lit import LiTPipeline
from .pipelines.openclip_tokenizer import configure_openclip_tokenizer
from .pipelines.pipeline_microdit import MicroDiTPipeline
from .pipelines.pipeline_pixart_kv import PixArtSigmaKVPipeline
from .schedulers.scheduling_edm_heun import EDMHeunScheduler

__version__ = "0.1.0"

_DIFFUSERS_VISIBLE = (
    MicroDiTPipeline,
    MicroDiTTransformer2DModel,
    EDMHeunScheduler,
    PixArtSigmaKVPipeline,
    PixArtSigmaKVTransformer2DModel,
    LiTPipeline,
    LiTTransformer2DModel,
)


def _register_with_diffusers() -> None:
    """Make `DiffusionPipeline.from_pretrained(folder)` return our classes.

    diffusers resolves a saved pipeline's `_class_name` only as an attribute of the `diffusers` module and offers no
    registration API (custom pipelines need `trust_remote_code`), so the classes are exposed there under their own
    names. Existing diffusers names are never overwritten.
    """
    for cls in _DIFFUSERS_VISIBLE:
        if getattr(_diffusers, cls.__name__, cls) is not cls:
            raise RuntimeError(f"diffusers already defines {cls.__name__}; refusing to shadow it.")
        setattr(_diffusers, cls.__name__, cls)


_register_with_diffusers()

__all__ = [
    "EDMHeunScheduler",
    "LiTLinearAttnProcessor",
    "LiTPipeline",
    "LiTTransformer2DModel",
    "MicroDiTPipeline",
    "MicroDiTTransformer2DModel",
    "MicroDiTTransformerOutput",
    "PixArtKVAttnProcessor2_0",
    "PixArtSigmaKVPipeline",
    "PixArtSigmaKVTransformer2DModel",
    "configure_openclip_tokenizer",
    "convert_microdit_checkpoint",
    "convert_openclip_text_encoder",
    "get_random_keep_ids",
]
