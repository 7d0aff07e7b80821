"""Every family's `__call__` refuses bad arguments up front with an error naming the argument (never a library
traceback, a silently ignored value or a NaN image), and refuses to decode the latents of a loop that went NaN."""

import numpy as np
import pytest
import torch
from helpers import PIPELINE_FAMILIES, tiny_family_call_kwargs, tiny_family_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread
PIXART_FAMILIES = ("pixart_kv", "lit")
NAN = float("nan")


@pytest.fixture(scope="module")
def pipelines():
    """One tiny pipeline per family, built on first use; the tests here only read them."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_family_pipeline(family)
        return cache[family]

    return get


def call(pipe, family, **kwargs):
    return pipe(**{**tiny_family_call_kwargs(family), **kwargs}).images


def latent_shape(pipe, family) -> tuple:
    """The shape of `latents` for one image of `tiny_family_call_kwargs(family)`."""
    kwargs = tiny_family_call_kwargs(family)
    default = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    height, width = kwargs.get("height", default), kwargs.get("width", default)
    return (1, pipe.transformer.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)


def embeds_kwargs(pipe, family, value: float = 0.0) -> dict:
    """Precomputed caption states (one prompt, 5 tokens) filled with `value`, with the mask PixArt needs."""
    kwargs = dict(prompt=None, prompt_embeds=torch.full((1, 5, pipe.transformer.config.caption_channels), value))
    if family in PIXART_FAMILIES:
        kwargs["prompt_attention_mask"] = torch.ones(1, 5, dtype=torch.long)
    return kwargs


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(guidance_scale=NAN), ValueError, "`guidance_scale` must be a finite number"),
        (dict(guidance_scale=float("inf")), ValueError, "`guidance_scale` must be a finite number"),
        (dict(generator=42), TypeError, "must be a torch.Generator"),
        (dict(generator=[torch.Generator(), torch.Generator()]), ValueError, "Got 2 generators for 1 images"),
        (dict(generator=[torch.Generator()], num_images_per_prompt=2), ValueError, "pass one per image"),
        (dict(prompt=[3]), ValueError, "`prompt` must be a string or a non-empty list of strings"),
        (dict(prompt=[]), ValueError, "`prompt` must be a string or a non-empty list of strings"),
        (dict(negative_prompt=[3]), ValueError, "`negative_prompt` must be a string or a non-empty list"),
        (dict(negative_prompt=["a", "b"]), ValueError, "`negative_prompt` has 2 entries"),
        (dict(num_images_per_prompt=0), ValueError, "`num_images_per_prompt` must be an integer >= 1"),
        (dict(num_images_per_prompt=1.5), ValueError, "`num_images_per_prompt` must be an integer >= 1"),
        (dict(height=31.5), ValueError, "`height` must be a positive"),
        (dict(width="48"), ValueError, "`width` must be a positive"),
        (dict(num_inference_steps=-1), ValueError, "`num_inference_steps` must be an integer >= 1"),
        (dict(output_type="jpeg"), ValueError, "`output_type` must be one of"),
        (dict(timesteps=5), TypeError, "`timesteps` must be a list"),
        (dict(sigmas=["high", "low"]), TypeError, "`sigmas` must be a list"),
        (dict(timesteps=[]), ValueError, "`timesteps` needs at least one value"),
        (dict(sigmas=[0.0, NAN]), ValueError, "`sigmas` needs at least one value, all finite"),
    ],
)
def test_bad_arguments_raise_clear_errors(pipelines, family, kwargs, error, message):
    with pytest.raises(error, match=message):
        call(pipelines(family), family, **kwargs)


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_non_finite_latents_are_refused(pipelines, family):
    pipe = pipelines(family)
    with pytest.raises(ValueError, match="`latents` holds NaN or inf"):
        call(pipe, family, latents=torch.full(latent_shape(pipe, family), NAN))
    with pytest.raises(TypeError, match="`latents` must be a torch.Tensor"):
        call(pipe, family, latents=np.zeros(latent_shape(pipe, family), dtype=np.float32))


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_non_finite_prompt_embeds_are_refused(pipelines, family):
    pipe = pipelines(family)
    assert np.isfinite(call(pipe, family, **embeds_kwargs(pipe, family))).all()  # the finite ones are taken
    with pytest.raises(ValueError, match="`prompt_embeds` holds NaN or inf"):
        call(pipe, family, **embeds_kwargs(pipe, family, value=float("inf")))


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_a_transformer_with_nan_weights_raises_instead_of_returning_a_nan_image(family):
    pipe = tiny_family_pipeline(family)
    with torch.no_grad():
        for param in pipe.transformer.parameters():
            param.fill_(NAN)
    with pytest.raises(RuntimeError, match="produced NaN or inf latents.*torch.float32"):
        call(pipe, family)


# ---------------------------------------------------------------------------------------------- PixArt family only


@pytest.mark.parametrize("family", PIXART_FAMILIES)
def test_pixart_sizes_are_checked_before_binning(pipelines, family):
    with pytest.raises(ValueError, match="`height` must be a positive integer"):
        call(pipelines(family), family, height="32", use_resolution_binning=True)


@pytest.mark.parametrize("family", PIXART_FAMILIES)
def test_pixart_latents_must_fit_the_sampled_size(pipelines, family):
    pipe = pipelines(family)
    with pytest.raises(ValueError, match=r"`latents` must have shape \(1, 4, 4, 6\) for a 32x48 image"):
        call(pipe, family, latents=torch.zeros(1, 4, 4, 4))


@pytest.mark.parametrize("family", PIXART_FAMILIES)
def test_pixart_guidance_needs_an_unconditional_caption(pipelines, family):
    pipe = pipelines(family)
    with pytest.raises(ValueError, match="needs an unconditional caption"):
        call(pipe, family, negative_prompt=None)
    assert np.isfinite(call(pipe, family, negative_prompt=None, guidance_scale=1.0)).all()


@pytest.mark.parametrize("family", PIXART_FAMILIES)
def test_pixart_attention_mask_must_match_the_embeddings(pipelines, family):
    pipe = pipelines(family)
    kwargs = {**embeds_kwargs(pipe, family), "prompt_attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"attention mask of `prompt_embeds` must be a \(batch, tokens\) tensor"):
        call(pipe, family, **kwargs)


@pytest.mark.parametrize("family", PIXART_FAMILIES)
def test_pixart_max_sequence_length_must_be_a_positive_integer(pipelines, family):
    with pytest.raises(ValueError, match="`max_sequence_length` must be an integer >= 1"):
        call(pipelines(family), family, max_sequence_length=0)
