"""peft LoRA through the pipelines' TransformerLoraLoaderMixin, for every pipeline family of the package."""

import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel
from helpers import PIPELINE_FAMILIES, tiny_family_call_kwargs, tiny_family_pipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from test_pixart_kv import TINY_CONFIG, single_thread, tiny_pixart_components  # noqa: F401 (autouse fixture)

from diffusers_microdit import PixArtSigmaKVPipeline
from diffusers_microdit.loaders import MICRODIT_LORA_TARGET_MODULES, PIXART_LORA_TARGET_MODULES

TARGET_MODULES = {
    "microdit": MICRODIT_LORA_TARGET_MODULES,
    "pixart_kv": PIXART_LORA_TARGET_MODULES,
    "lit": PIXART_LORA_TARGET_MODULES,
}


def generate(pipe, family) -> np.ndarray:
    return pipe(generator=torch.manual_seed(0), **tiny_family_call_kwargs(family)).images


def add_random_lora(pipe, family, adapter_name="style"):
    """A LoRA whose B matrices are random too (peft's default zero B would leave the outputs unchanged)."""
    torch.manual_seed(7)
    # lora_alpha != r: a loader that lost the saved config would scale the update differently.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGET_MODULES[family]), init_lora_weights=False)
    pipe.transformer.add_adapter(config, adapter_name=adapter_name)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.mul_(0.3)  # keep the update moderate so the decoded images do not saturate


def assert_same(actual, expected, atol=1e-5):
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=0)


def assert_different(actual, expected, min_diff=1e-3):
    diff = np.abs(actual - expected).max()
    assert diff > min_diff, f"images differ by only {diff:.2e}"


@pytest.fixture(scope="module", params=PIPELINE_FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def base_images(family):
    return generate(tiny_family_pipeline(family), family)


@pytest.fixture(scope="module")
def saved_lora(family, tmp_path_factory):
    """(folder, images) of a pipeline with a random LoRA saved in the pipeline format."""
    pipe = tiny_family_pipeline(family)
    add_random_lora(pipe, family)
    lora_images = generate(pipe, family)
    folder = tmp_path_factory.mktemp(f"{family}_lora")
    type(pipe).save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer, adapter_name="style"),
        transformer_lora_adapter_metadata=pipe.transformer.peft_config["style"].to_dict(),
    )
    return folder, lora_images


def test_lora_changes_images(base_images, saved_lora):
    assert_different(saved_lora[1], base_images)


def test_saved_lora_reloads_into_a_fresh_pipeline(family, saved_lora):
    folder, lora_images = saved_lora
    state_dict, metadata = type(tiny_family_pipeline(family)).lora_state_dict(folder, return_lora_metadata=True)
    assert state_dict and all(key.startswith("transformer.") and "lora_" in key for key in state_dict)
    assert metadata is not None and metadata["transformer.lora_alpha"] == 8

    pipe = tiny_family_pipeline(family)
    pipe.load_lora_weights(folder, adapter_name="style")
    assert pipe.get_list_adapters() == {"transformer": ["style"]}
    assert_same(generate(pipe, family), lora_images)


def test_adapter_weights_fuse_and_unload(family, base_images, saved_lora):
    folder, lora_images = saved_lora
    pipe = tiny_family_pipeline(family)
    pipe.load_lora_weights(folder, adapter_name="style")

    pipe.set_adapters("style", adapter_weights=0.0)
    assert_same(generate(pipe, family), base_images)
    pipe.set_adapters("style", adapter_weights=0.5)
    half = generate(pipe, family)
    assert_different(half, base_images)
    assert_different(half, lora_images)
    pipe.set_adapters("style", adapter_weights=1.0)
    assert_same(generate(pipe, family), lora_images)

    pipe.fuse_lora()
    assert pipe.fused_loras == {"style"}
    assert_same(generate(pipe, family), lora_images, atol=1e-4)
    pipe.unfuse_lora()
    assert pipe.fused_loras == set()
    assert_same(generate(pipe, family), lora_images, atol=1e-4)

    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {}
    assert_same(generate(pipe, family), base_images, atol=1e-4)


def test_model_level_lora_files_load_too(family, saved_lora, tmp_path):
    """`transformer.save_lora_adapter` writes un-prefixed keys; the pipeline loader accepts those as well."""
    folder, lora_images = saved_lora
    pipe = tiny_family_pipeline(family)
    pipe.load_lora_weights(folder, adapter_name="style")
    pipe.transformer.save_lora_adapter(tmp_path, adapter_name="style")

    fresh = tiny_family_pipeline(family)
    fresh.load_lora_weights(tmp_path, adapter_name="style")
    assert_same(generate(fresh, family), lora_images)


def test_loader_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="Not a LoRA checkpoint"):
        tiny_family_pipeline("microdit").load_lora_weights({"transformer.proj_out.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="transformer_lora_layers` is empty"):
        PixArtSigmaKVPipeline.save_lora_weights(tmp_path, transformer_lora_layers={})
    with pytest.raises(TypeError, match="Unexpected arguments"):
        PixArtSigmaKVPipeline.lora_state_dict(tmp_path, adapter="x")

    components = {**tiny_pixart_components(), "transformer": PixArtTransformer2DModel(**TINY_CONFIG)}
    plain = PixArtSigmaKVPipeline(**components)
    with pytest.raises(TypeError, match="PeftAdapterMixin"):
        plain.load_lora_weights({"transformer.a.lora_A.weight": torch.zeros(1, 1)})
