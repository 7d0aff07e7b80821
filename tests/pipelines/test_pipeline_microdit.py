"""MicroDiTPipeline: original-sampler parity, diffusers loading, arguments, callbacks, offload."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from helpers import REPO_ROOT, fixture_transformer, load_microdit_fixture, tiny_pipeline

from diffusers_microdit import MicroDiTPipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def generate(pipe, **kwargs):
    args = dict(prompt="a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    args.update(kwargs)
    return pipe(**args).images


@pytest.mark.parametrize("steps_key, scale, out_key", [("sampler_steps_cfg", "cfg", "out_cfg"), ("sampler_steps_nocfg", 1.0, "out_nocfg")])
def test_sampler_reproduces_original(steps_key, scale, out_key):
    sidecar, _, io = load_microdit_fixture()
    pipe = tiny_pipeline(transformer=fixture_transformer())
    guidance = sidecar["hyper"]["cfg_scale"] if scale == "cfg" else scale
    latents = pipe(
        prompt_embeds=io["inputs.y"].squeeze(1),
        latents=io["sampler.latents"],
        height=32,
        width=32,
        num_inference_steps=sidecar["hyper"][steps_key],
        guidance_scale=guidance,
        output_type="latent",
    ).images
    tol = sidecar["tolerances"]["sampler"][f"sampler.{out_key}"]
    diff = (latents - io[f"sampler.{out_key}"]).abs().max().item()
    print(f"sampler.{out_key}: max abs diff {diff:.3e} (atol {tol['atol']})")
    torch.testing.assert_close(latents, io[f"sampler.{out_key}"], atol=tol["atol"], rtol=tol["rtol"])


def test_generates_deterministic_images(pipe):
    first = generate(pipe)
    assert first.shape == (1, 16, 16, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, generate(pipe))
    assert not np.array_equal(first, generate(pipe, generator=torch.Generator().manual_seed(1)))
    images = pipe("a cat", num_inference_steps=1, output_type="pil", generator=torch.Generator().manual_seed(0)).images
    assert images[0].size == (16, 16)


def test_save_and_reload_in_a_fresh_process(pipe, tmp_path):
    expected = generate(pipe)
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "MicroDiTPipeline"
    assert index["transformer"] == ["diffusers_microdit.models.transformer_microdit", "MicroDiTTransformer2DModel"]
    assert index["scheduler"] == ["diffusers_microdit.schedulers.scheduling_edm_heun", "EDMHeunScheduler"]
    script = f"""
import numpy as np, torch
import diffusers_microdit
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'pipe')!r})
assert type(pipe) is diffusers_microdit.MicroDiTPipeline, type(pipe)
assert type(pipe.transformer) is diffusers_microdit.MicroDiTTransformer2DModel
pipe.set_progress_bar_config(disable=True)
images = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
np.save({str(tmp_path / 'images.npy')!r}, images)
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO_ROOT, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    reloaded = np.load(tmp_path / "images.npy")
    np.testing.assert_allclose(reloaded, expected, atol=1e-5)
    assert (np.round(reloaded * 255) == np.round(expected * 255)).all()
    # The package's own class loads the same folder too.
    assert isinstance(MicroDiTPipeline.from_pretrained(tmp_path / "pipe"), MicroDiTPipeline)


def test_swappable_edm_schedulers(pipe):
    heun = pipe.scheduler
    try:
        for scheduler_cls in (EDMEulerScheduler, EDMDPMSolverMultistepScheduler):
            pipe.scheduler = scheduler_cls.from_config(heun.config)
            assert pipe.scheduler.config.sigma_data == 0.9
            assert np.isfinite(generate(pipe, num_inference_steps=3)).all()
    finally:
        pipe.scheduler = heun


def test_guidance_negative_prompt_and_batching(pipe):
    images = generate(pipe, prompt=["a red circle", "a blue square"], num_images_per_prompt=2)
    assert images.shape == (4, 16, 16, 3)
    zero_null = generate(pipe, guidance_scale=5.0)
    negative = generate(pipe, guidance_scale=5.0, negative_prompt="a green diamond")
    unguided = generate(pipe, guidance_scale=1.0)
    assert not np.allclose(zero_null, negative) and not np.allclose(zero_null, unguided)
    embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt("a red circle", negative_prompt="a green diamond")
    assert mask is None and negative_mask is None  # the original feeds every position
    from_embeds = generate(pipe, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds)
    np.testing.assert_allclose(from_embeds, negative, atol=1e-6)
    assert torch.count_nonzero(pipe.encode_prompt("a red circle")[2]) == 0  # null caption = all zeros


def test_mask_caption_padding(pipe, tmp_path):
    """With `mask_caption_padding` the tokenizer's mask reaches the text encoder and the transformer: what the padded
    states hold changes no image, the null caption keeps every position, and the setting survives a reload."""
    masked = tiny_pipeline(mask_caption_padding=True)
    embeds, mask, null_embeds, null_mask = masked.encode_prompt("a red circle", num_images_per_prompt=2)
    tokens = masked.tokenizer("a red circle", padding="max_length", max_length=masked.tokenizer.model_max_length)
    assert mask.tolist() == [tokens.attention_mask] * 2 and 0 < mask.sum() < mask.numel()
    assert torch.count_nonzero(null_embeds) == 0 and bool(null_mask.all())
    expected = generate(masked, guidance_scale=3.0)
    junk = embeds[:1].clone()
    junk[mask[:1] == 0] = 7.0
    from_embeds = generate(masked, prompt=None, prompt_embeds=junk, prompt_attention_mask=mask[:1], guidance_scale=3.0)
    np.testing.assert_allclose(from_embeds, expected, atol=1e-6)
    assert not np.allclose(expected, generate(pipe, guidance_scale=3.0), atol=1e-4)  # same weights, padding used

    masked.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["mask_caption_padding"] is True
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.config.mask_caption_padding is True
    np.testing.assert_allclose(generate(reloaded, guidance_scale=3.0), expected, atol=1e-6)

    with pytest.raises(ValueError, match="only used by a pipeline with `mask_caption_padding=True`"):
        generate(pipe, prompt=None, prompt_embeds=embeds[:1], prompt_attention_mask=mask[:1])
    with pytest.raises(ValueError, match="keep-mask"):
        generate(masked, prompt=None, prompt_embeds=embeds[:1], prompt_attention_mask=mask[:1, :-1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=30), "multiple of 4"),
        (dict(width=0), "multiple of 4"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(prompt=None), "Pass a `prompt`"),
        (dict(prompt=3), "must be a string"),
        (dict(prompt_embeds=torch.zeros(1, 77, 32)), "either `prompt` or `prompt_embeds`"),
        (dict(prompt=["a", "b"], negative_prompt=["c"]), "negative_prompt` has 1 entries"),
        (dict(prompt=None, prompt_embeds=torch.zeros(2, 77, 32), negative_prompt_embeds=torch.zeros(1, 77, 32)), "same shape"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 8)), "channels"),
        (dict(latents=torch.zeros(1, 4, 3, 3)), "latents"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(guidance_scale="high"), "guidance_scale"),
        (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"]), "not available"),
        (dict(generator=[torch.Generator(), torch.Generator()]), "generators"),
    ],
)
def test_bad_arguments_raise_clear_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(pipe, **kwargs)


def test_callback_on_step_end(pipe):
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, sorted(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == pipeline.num_timesteps - 1 else {}

    images = generate(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert [s for s, _ in seen] == list(range(3)) and seen[0][1] == ["latents", "prompt_embeds"]
    with torch.no_grad():
        zero_decoded = pipe.image_processor.postprocess(pipe.decode_latents(torch.zeros(1, 4, 8, 8)), output_type="np")
    np.testing.assert_allclose(images, zero_decoded, atol=1e-6)


def test_cpu_offload_and_bfloat16(pipe):
    expected = generate(pipe)
    offloaded = tiny_pipeline()
    offloaded.enable_model_cpu_offload(device="cpu")
    np.testing.assert_allclose(generate(offloaded), expected, atol=1e-6)
    half = tiny_pipeline().to(torch.bfloat16)
    assert np.isfinite(generate(half)).all()


def test_diffusion_pipeline_resolves_our_name():
    import diffusers

    assert diffusers.MicroDiTPipeline is MicroDiTPipeline
