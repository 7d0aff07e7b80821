"""PixArt-Σ KV at 2K and 4K: the 4096-px aspect-ratio bins (how they are derived), resolution binning at every
trained size, generation at a 4K-shaped latent, tiled VAE decoding, and the 4096 buckets in the training code."""

import argparse
from unittest import mock

import pytest
import torch

from diffusers_microdit import PixArtSigmaKVPipeline, PixArtSigmaKVTransformer2DModel
from diffusers_microdit.pipelines.pipeline_pixart_sigma_family import ASPECT_RATIO_BINS
from diffusers_microdit.training.args import check_aspect_ratio_bucket_args
from diffusers_microdit.training.sources import closest_aspect_ratio_bucket
from helpers import (
    GENERATE,
    TINY_PIXART_CONFIG,
    generate,
    load_example,
    randomize_,
    tiny_family_pipeline,
    tiny_pixart_components,
)

# Requested (height, width) off every table -> the 4096-px bucket nearest in aspect ratio (height / width).
OFF_TABLE_4K = [
    ((4000, 3000), (4608, 3584)),  # 1.33: bins 1.29 and 1.38 are nearest, 1.29 wins
    ((2160, 3840), (3072, 5376)),  # UHD landscape, 0.5625: bin 0.57
]


def tiny_pixart_kv_pipeline(sample_size: int, **transformer_kwargs) -> PixArtSigmaKVPipeline:
    """The tiny KV pipeline of tests/helpers.py with a transformer of the few channels of `TINY_PIXART_CONFIG` but
    the full latent grid of `sample_size` (512 -> 4096 px with the 8x VAE), positions interpolated as Σ does."""
    components = tiny_pixart_components()
    config = {**TINY_PIXART_CONFIG, "sample_size": sample_size, "interpolation_scale": sample_size * 8 / 512}
    components["transformer"] = randomize_(
        PixArtSigmaKVTransformer2DModel(**config, **transformer_kwargs), seed=3
    ).eval()
    pipe = PixArtSigmaKVPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_each_bin_table_is_the_previous_one_doubled():
    """The 4096 bins (Sana's table) are the 2048 ones doubled, as diffusers' 2048 bins are the 1024 ones doubled
    (plus ratios of their own), so every size has the same shapes scaled."""
    for base_size in (512, 1024, 2048, 4096):
        smaller, larger = ASPECT_RATIO_BINS[base_size // 2], ASPECT_RATIO_BINS[base_size]
        doubled = {ratio: [2 * side for side in sides] for ratio, sides in smaller.items()}
        assert doubled == {ratio: larger[ratio] for ratio in smaller}
    assert ASPECT_RATIO_BINS[4096].keys() == ASPECT_RATIO_BINS[2048].keys()


@pytest.mark.parametrize("base_size", sorted(ASPECT_RATIO_BINS))
def test_resolution_binning_works_at_every_trained_size(base_size):
    pipe = tiny_pixart_kv_pipeline(sample_size=base_size // 8)
    # A 4:3 portrait request at the model's size, on no table (its nearest ratio, 1.29, is the same at every size).
    height, width = pipe.binned_size(base_size, base_size * 3 // 4)
    assert [height, width] == ASPECT_RATIO_BINS[base_size]["1.29"]
    assert height % 16 == 0 and width % 16 == 0  # whole 2x2 patches of the 8x VAE's latents


@pytest.mark.parametrize("requested, bucket", OFF_TABLE_4K)
def test_binning_maps_an_off_table_size_to_the_nearest_4k_bucket(requested, bucket):
    assert tiny_pixart_kv_pipeline(sample_size=512).binned_size(*requested) == bucket


def test_binning_refuses_a_model_size_without_bins():
    pipe = tiny_pixart_kv_pipeline(sample_size=384)  # 3072 px
    with pytest.raises(ValueError, match=r"bins for models of \[256, 512, 1024, 2048, 4096\] px; .* samples 3072 px"):
        pipe.binned_size(3000, 3000)


def test_generates_a_4k_bucket_latent():
    """A 4000x3000 request through the KV pipeline: binned to the 4608x3584 bucket, a 576x448 latent, i.e. the
    transformer attends over 288x224 = 64512 tokens. Every block compresses K/V 4x per side (4032 keys), and one
    step without guidance, so that softmax attention over the full 4K grid stays within seconds on CPU."""
    pipe = tiny_pixart_kv_pipeline(sample_size=512, kv_compress_layers=[0, 1, 2], kv_compress_ratio=4)
    latents = pipe(
        "a photo of a red cat", height=4000, width=3000, guidance_scale=1.0, generator=torch.manual_seed(0),
        **{**GENERATE, "num_inference_steps": 1, "output_type": "latent"},
    ).images
    assert latents.shape == (1, 4, 4608 // 8, 3584 // 8)
    assert torch.isfinite(latents).all()


def test_vae_tiling_decodes_through_the_pipeline():
    """`pipe.vae.enable_tiling()`, as the README advises at 2K/4K, is honoured by the pipeline's decode: the latent
    is decoded in overlapping tiles of the VAE's `sample_size` (32 px for this tiny one)."""
    pipe = tiny_family_pipeline("pixart_kv")
    pipe.vae.enable_tiling()
    with mock.patch.object(pipe.vae, "tiled_decode", wraps=pipe.vae.tiled_decode) as tiled_decode:
        images = generate(pipe, height=64, width=96, use_resolution_binning=False)
    tiled_decode.assert_called_once()
    assert images.shape == (1, 64, 96, 3)
    assert ((images >= 0) & (images <= 1)).all()


@pytest.mark.parametrize("requested, bucket", OFF_TABLE_4K)
def test_training_buckets_accept_4096(requested, bucket):
    assert closest_aspect_ratio_bucket(*requested, base_size=4096) == bucket
    args = argparse.Namespace(aspect_ratio_buckets=4096, resolution=None, streaming=False)
    assert check_aspect_ratio_bucket_args(args) == [] and args.resolution == 4096


def test_train_pixart_kv_validates_at_4096_but_not_at_sizes_without_bins():
    check_validation_resolution = load_example("train_pixart_kv").check_validation_resolution
    args = argparse.Namespace(validation_prompts=["a red cat"])
    for resolution in (2048, 4096):
        check_validation_resolution(args, resolution)
    with pytest.raises(SystemExit, match=r"Validation at 3072 px is impossible.*\[256, 512, 1024, 2048, 4096\]"):
        check_validation_resolution(args, 3072)
