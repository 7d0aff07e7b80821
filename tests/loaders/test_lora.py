"""peft LoRA through the pipelines' TransformerLoraLoaderMixin, for every pipeline family of the package."""

import logging

import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel
from helpers import (
    PIPELINE_FAMILIES,
    TINY_PIXART_CONFIG,
    add_random_lora,
    tiny_family_call_kwargs,
    tiny_family_pipeline,
    tiny_pixart_components,
)
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from diffusers_microdit import PixArtSigmaKVPipeline

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread


def generate(pipe, family) -> np.ndarray:
    return pipe(generator=torch.manual_seed(0), **tiny_family_call_kwargs(family)).images


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
    assert fresh.transformer.peft_config["style"].lora_alpha == 8
    assert_same(generate(fresh, family), lora_images)


@pytest.fixture(scope="module")
def model_level_state_dict(family, saved_lora):
    """The saved LoRA with un-prefixed keys, as `transformer.save_lora_adapter` writes them."""
    state_dict = type(tiny_family_pipeline(family)).lora_state_dict(saved_lora[0])
    return {key.removeprefix("transformer."): value for key, value in state_dict.items()}


NO_TRANSFORMER_KEYS = "No LoRA keys associated to"


def test_loras_of_other_components_load_nothing(family, base_images, model_level_state_dict, caplog):
    """Keys of other components (diffusers' `text_encoder.`/`unet.` files) or of modules this transformer lacks are
    skipped with diffusers' log line, not an IndexError from peft."""
    foreign_files = {
        "text_encoder": {
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(32, 4),
        },
        "unet": {
            "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(4, 8),
            "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.ones(8, 4),
        },
        "unknown modules": {f"ghost.{key}": value for key, value in model_level_state_dict.items()},
    }
    pipe = tiny_family_pipeline(family)
    class_name = type(pipe.transformer).__name__
    for name, state_dict in foreign_files.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            pipe.load_lora_weights(state_dict)
        assert f"{NO_TRANSFORMER_KEYS} {class_name} found with the prefix='transformer'" in caplog.text, name
        assert pipe.get_list_adapters() == {}, name
        assert not getattr(pipe.transformer, "peft_config", None), name
    assert_same(generate(pipe, family), base_images, atol=0)


def test_transformer_part_of_a_mixed_file_loads(family, saved_lora, tmp_path, caplog):
    folder, lora_images = saved_lora
    with safe_open(folder / "pytorch_lora_weights.safetensors", "pt") as saved:
        mixed = {key: saved.get_tensor(key) for key in saved.keys()}
        header = saved.metadata()  # keeps the adapter config, so the strength matches
    mixed["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.ones(4, 32)
    save_file(mixed, tmp_path / "pytorch_lora_weights.safetensors", metadata=header)

    pipe = tiny_family_pipeline(family)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(tmp_path, adapter_name="style")
    assert "Ignoring 1 LoRA keys not for the transformer" in caplog.text
    assert NO_TRANSFORMER_KEYS not in caplog.text
    assert pipe.get_list_adapters() == {"transformer": ["style"]}
    assert_same(generate(pipe, family), lora_images)


def test_unprefixed_keys_that_only_partly_fit_are_refused(family, model_level_state_dict):
    """Half a LoRA for a transformer of another configuration must not load silently."""
    first_module = next(iter(model_level_state_dict)).split(".lora_")[0]
    partial = {
        (f"ghost.{key}" if key.startswith(f"{first_module}.") else key): value
        for key, value in model_level_state_dict.items()
    }
    pipe = tiny_family_pipeline(family)
    with pytest.raises(ValueError, match=r"1 of the \d+ modules this LoRA adapts are not in"):
        pipe.load_lora_weights(partial)
    assert pipe.get_list_adapters() == {}


def test_loader_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="Not a LoRA checkpoint"):
        tiny_family_pipeline("microdit").load_lora_weights({"transformer.proj_out.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="transformer_lora_layers` is empty"):
        PixArtSigmaKVPipeline.save_lora_weights(tmp_path, transformer_lora_layers={})
    with pytest.raises(TypeError, match="Unexpected arguments"):
        PixArtSigmaKVPipeline.lora_state_dict(tmp_path, adapter="x")

    components = {**tiny_pixart_components(), "transformer": PixArtTransformer2DModel(**TINY_PIXART_CONFIG)}
    plain = PixArtSigmaKVPipeline(**components)
    with pytest.raises(TypeError, match="PeftAdapterMixin"):
        plain.load_lora_weights({"transformer.a.lora_A.weight": torch.zeros(1, 1)})
