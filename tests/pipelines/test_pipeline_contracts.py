"""What every diffusers pipeline does, checked on each family of the package: per-call LoRA strength
(`attention_kwargs`), step-end callbacks and interrupt, custom schedules, a progress bar that counts solver steps,
and the PixArt-family loop against diffusers' own PixArt-Σ pipeline."""

import contextlib

import numpy as np
import pytest
import torch
from diffusers import PixArtSigmaPipeline
from helpers import PIPELINE_FAMILIES, add_random_lora, tiny_family_call_kwargs, tiny_family_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread
PIXART_FAMILIES = ("pixart_kv", "lit")


def generate(pipe, family, **kwargs) -> np.ndarray:
    return pipe(generator=torch.manual_seed(0), **{**tiny_family_call_kwargs(family), **kwargs}).images


def count_transformer_calls(pipe) -> list:
    calls = []
    pipe.transformer.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls


@pytest.fixture(params=PIPELINE_FAMILIES)
def family(request):
    return request.param


# ---------------------------------------------------------------------------------------------- the PixArt loop


@pytest.mark.parametrize("name", PIXART_FAMILIES)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"guidance_scale": 1.0}, {"use_resolution_binning": True, "height": 40, "width": 56}],
    ids=["guided", "unguided", "binned"],
)
def test_pixart_family_loop_matches_diffusers_pixart_sigma_pipeline(name, kwargs):
    """Our loop adds arguments, never changes the numbers: same images as diffusers' PixArtSigmaPipeline."""
    pipe = tiny_family_pipeline(name)
    reference = PixArtSigmaPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(generate(pipe, name, **kwargs), generate(reference, name, **kwargs))


# ---------------------------------------------------------------------------------------------- LoRA strength


def test_lora_scale_zero_gives_the_base_images_and_the_scale_lasts_one_call(family):
    pipe = tiny_family_pipeline(family)
    base = generate(pipe, family)
    add_random_lora(pipe, family)
    full = generate(pipe, family)
    assert np.abs(full - base).max() > 1e-3, "the LoRA must change the images for this test to mean anything"

    np.testing.assert_allclose(generate(pipe, family, attention_kwargs={"scale": 0.0}), base, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(generate(pipe, family), full)  # back to full strength on the next call


def test_lora_scale_equals_fusing_at_that_scale(family):
    pipe = tiny_family_pipeline(family)
    add_random_lora(pipe, family)
    scaled = generate(pipe, family, attention_kwargs={"scale": 0.5})
    np.testing.assert_array_equal(generate(pipe, family), generate(pipe, family))  # scale restored, deterministic
    pipe.fuse_lora(lora_scale=0.5)
    # Fused weights sum W + s·BA before the matmul: float32 rounding that differs by CPU (1.04e-5 seen on one).
    np.testing.assert_allclose(generate(pipe, family), scaled, atol=5e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- callbacks


@pytest.mark.parametrize("name", PIXART_FAMILIES)
def test_step_end_callback_sees_and_replaces_tensors(name):
    pipe = tiny_family_pipeline(name)
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, sorted(tensors)))
        assert tensors["prompt_embeds"].shape == tensors["negative_prompt_embeds"].shape
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 1 else {}

    inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    zeroed = generate(pipe, name, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=inputs)
    assert seen == [(0, sorted(inputs)), (1, sorted(inputs))]
    assert not np.array_equal(zeroed, generate(pipe, name))  # the replaced latents were used


@pytest.mark.parametrize("name", PIXART_FAMILIES)
def test_interrupt_from_a_callback_stops_the_loop(name):
    pipe = tiny_family_pipeline(name)
    calls = count_transformer_calls(pipe)

    def stop(pipeline, step, timestep, tensors):
        pipeline._interrupt = True
        return {}

    generate(pipe, name, num_inference_steps=4, callback_on_step_end=stop)
    assert len(calls) == 1


@pytest.mark.parametrize("name", PIXART_FAMILIES)
def test_unknown_callback_tensor_and_bad_schedules_are_refused(name):
    pipe = tiny_family_pipeline(name)
    with pytest.raises(ValueError, match="not available; choose from"):
        generate(pipe, name, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"])
    with pytest.raises(ValueError, match="num_inference_steps` must be an integer >= 1"):
        generate(pipe, name, num_inference_steps=0)
    with pytest.raises(ValueError, match="either `timesteps` or `sigmas`"):
        generate(pipe, name, timesteps=[999, 500], sigmas=[1.0, 0.5])


# ---------------------------------------------------------------------------------------------- schedules


def record_progress_bar(pipe) -> dict:
    """Replace `pipe.progress_bar` by a recorder of its `total` and number of `update()` calls."""
    record = {"total": None, "updates": 0}

    class Bar:
        def update(self, n=1):
            record["updates"] += n

    @contextlib.contextmanager
    def progress_bar(iterable=None, total=None):
        record["total"] = total
        yield Bar()

    pipe.progress_bar = progress_bar
    return record


def test_progress_bar_counts_solver_steps_not_network_evaluations(family):
    pipe = tiny_family_pipeline(family)
    record = record_progress_bar(pipe)
    calls = count_transformer_calls(pipe)
    generate(pipe, family, num_inference_steps=3)
    assert record == {"total": 3, "updates": 3}
    # EDM Heun: 2N - 1 evaluations, each on the guided (doubled) batch; DPM-Solver: one per step.
    assert len(calls) == (5 if family == "microdit" else 3)


def test_microdit_custom_sigmas_and_timesteps_reproduce_the_default_schedule():
    pipe = tiny_family_pipeline("microdit")
    default = generate(pipe, "microdit", num_inference_steps=3)
    # diffusers' EDM convention: `sigmas` are positions along the schedule, 0 = sigma_max, 1 = sigma_min.
    from_sigmas = generate(pipe, "microdit", num_inference_steps=None, sigmas=np.linspace(0, 1, 3))
    # The noise levels are recomputed from ramp positions / log-sigmas: last-bit differences (1.01e-6 seen on one CPU).
    np.testing.assert_allclose(from_sigmas, default, atol=1e-5, rtol=0)

    pipe.scheduler.set_timesteps(3)
    solver_levels = pipe.scheduler.timesteps[::2]  # each level once: evaluations at 0, (1, 1), (2, 2)
    from_timesteps = generate(pipe, "microdit", num_inference_steps=None, timesteps=solver_levels.tolist())
    np.testing.assert_allclose(from_timesteps, default, atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="either `timesteps` or `sigmas`"):
        generate(pipe, "microdit", timesteps=solver_levels.tolist(), sigmas=[0.0, 1.0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        generate(pipe, "microdit", timesteps=[0.0, 0.5])


@pytest.mark.parametrize("name", PIXART_FAMILIES)
def test_pixart_custom_timesteps_reproduce_the_default_schedule(name):
    pipe = tiny_family_pipeline(name)
    default = generate(pipe, name)
    pipe.scheduler.set_timesteps(tiny_family_call_kwargs(name)["num_inference_steps"])
    custom = generate(pipe, name, num_inference_steps=None, timesteps=pipe.scheduler.timesteps.tolist())
    np.testing.assert_array_equal(custom, default)
