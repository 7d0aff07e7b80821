"""LiT offline with an 8-bit T5: torchao int8 weight-only quantisation through diffusers'/transformers' quantisation
configs, loaded from a local folder with a tiny T5, then generation, also under `enable_model_cpu_offload`.

torchao (the `quantization` extra) is used rather than optimum-quanto: it is the PyTorch project's maintained
library, transformers' `TorchAoConfig` drives it, and its int8 weight-only layout runs on CPU and CUDA alike.

Tolerances: int8 weight-only rounds every weight to 1/254 of its output channel's largest magnitude, so the prompt
embeddings stay within 2% of their largest magnitude of the float32 ones, and the decoded images (in [0, 1])
within 2e-2.
"""

import pytest
import torch
from diffusers import PipelineQuantizationConfig
from helpers import generate, tiny_family_pipeline
from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig
from transformers import T5EncoderModel, TorchAoConfig

from diffusers_microdit import LiTPipeline

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPT = dict(prompt="a photo of a red cat", max_sequence_length=8, clean_caption=False)
SIZE = dict(height=32, width=48, use_resolution_binning=False)


def int8_text_encoder_config() -> PipelineQuantizationConfig:
    return PipelineQuantizationConfig(quant_mapping={"text_encoder": TorchAoConfig(Int8WeightOnlyConfig())})


def quantised_linears(model: torch.nn.Module) -> tuple[int, int]:
    """(int8 weight-only linears, all linears) of `model`."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(isinstance(m.weight, Int8Tensor) for m in linears), len(linears)


def prompt_embeds(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(**PROMPT, do_classifier_free_guidance=False)[0]


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    pipe = tiny_family_pipeline("lit")
    folder = tmp_path_factory.mktemp("lit_pipeline")
    pipe.save_pretrained(folder)
    return pipe, folder


def test_int8_text_encoder_pipeline_generates_offline_close_to_float32(saved_pipeline):
    reference, folder = saved_pipeline
    pipe = LiTPipeline.from_pretrained(folder, quantization_config=int8_text_encoder_config(), local_files_only=True)

    count, total = quantised_linears(pipe.text_encoder)
    assert count == total == quantised_linears(reference.text_encoder)[1] > 0  # every T5 linear is int8
    assert quantised_linears(pipe.transformer)[0] == 0  # only the text encoder is quantised
    expected, actual = prompt_embeds(reference), prompt_embeds(pipe)
    assert not torch.equal(actual, expected)
    torch.testing.assert_close(actual, expected, rtol=0, atol=2e-2 * float(expected.abs().max()))

    images = generate(pipe, **SIZE)
    assert images.shape == (1, 32, 48, 3) and bool((images >= 0).all() and (images <= 1).all())
    expected_images = generate(reference, **SIZE)
    torch.testing.assert_close(torch.from_numpy(images), torch.from_numpy(expected_images), rtol=0, atol=2e-2)

    # Model CPU offload (the laptop setting) moves components on demand and keeps the int8 weights and the outputs.
    pipe.enable_model_cpu_offload(device="cpu")
    torch.testing.assert_close(torch.from_numpy(generate(pipe, **SIZE)), torch.from_numpy(images), rtol=0, atol=1e-6)
    assert quantised_linears(pipe.text_encoder)[0] == quantised_linears(pipe.text_encoder)[1]


def test_int8_text_encoder_with_bfloat16_activations(saved_pipeline):
    """The README's laptop load: the int8 T5 alone, bfloat16 activations, passed to the pipeline."""
    reference, folder = saved_pipeline
    text_encoder = T5EncoderModel.from_pretrained(
        folder,
        subfolder="text_encoder",
        quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
        dtype=torch.bfloat16,  # `torch_dtype` before transformers 5
        local_files_only=True,
    )
    count, total = quantised_linears(text_encoder)
    assert count == total > 0 and text_encoder.dtype == torch.bfloat16
    pipe = LiTPipeline.from_pretrained(folder, text_encoder=text_encoder, local_files_only=True)
    expected = prompt_embeds(reference)
    actual = prompt_embeds(pipe).float()
    # bfloat16 adds its own 2^-8 rounding to int8's: 4% of the largest magnitude.
    torch.testing.assert_close(actual, expected, rtol=0, atol=4e-2 * float(expected.abs().max()))
