"""Raw image-caption data for the precompute step: loading a source (Hub, `save_to_disk` folder, image folder),
decoding and resizing its images (square centre crops, or PixArt's aspect-ratio buckets) and encoding them with the
VAE. Training never reads these; it reads the cache `precompute.py` writes (see `data.py`)."""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from diffusers.image_processor import PixArtImageProcessor
from PIL import Image

# Training buckets are the pipelines' resolution bins, so a model samples the shapes it was trained on.
from ..pipelines.pipeline_pixart_sigma_family import ASPECT_RATIO_BINS


def load_image_caption_source(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    split: str = "train",
    streaming: bool = False,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """An image-caption dataset from the Hub (`dataset_name`), a `save_to_disk` folder (`dataset_name` as a path),
    or an image folder with a `metadata.jsonl` of captions (`train_data_dir`)."""
    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError("Give exactly one of `--dataset_name` (Hub id or local dataset) and `--train_data_dir`.")
    if train_data_dir is not None:
        if not Path(train_data_dir).is_dir():
            raise FileNotFoundError(f"--train_data_dir {train_data_dir} is not a folder.")
        return datasets.load_dataset(
            "imagefolder", data_dir=train_data_dir, split=split, streaming=streaming, cache_dir=cache_dir
        )
    if (Path(dataset_name) / datasets.config.DATASET_STATE_JSON_FILENAME).exists():
        dataset = datasets.load_from_disk(dataset_name)
        return dataset.to_iterable_dataset() if streaming else dataset
    return datasets.load_dataset(
        dataset_name, dataset_config_name, split=split, streaming=streaming, cache_dir=cache_dir
    )


def decode_image(value) -> Image.Image:
    """A PIL RGB image from a `datasets` image cell (undecoded `{"bytes", "path"}`, a path, or a PIL image).
    Raises `OSError`/`ValueError` for unreadable data, so callers can count and skip the row."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes"):
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = Image.open(value["path"])
    elif isinstance(value, str):
        image = Image.open(value)
    else:
        raise ValueError(f"not an image: {type(value).__name__}")
    image.load()  # decode now: truncated files fail here, not later inside a batch
    return image.convert("RGB")


def image_bytes(value) -> bytes:
    """The stored bytes of a `datasets` image cell (as `decode_image` takes it), for fingerprinting a source; b""
    for a file that cannot be read (`decode_image` skips that row anyway)."""
    if isinstance(value, Image.Image):
        return f"{value.mode}{value.size}".encode() + value.tobytes()
    if isinstance(value, dict) and value.get("bytes"):
        return value["bytes"]
    path = value.get("path") if isinstance(value, dict) else value
    try:
        return Path(path).read_bytes()
    except (OSError, TypeError):
        return b""


def resize_and_crop(
    image: Image.Image, height: int, width: int, offset: tuple[float, float] = (0.5, 0.5), flip: bool = False
) -> torch.Tensor:
    """(3, height, width) in [-1, 1]: resized (bicubic) to just cover height x width, then cropped at `offset`
    (the crop's place in the slack along x and y: 0.5 centres it), mirrored left-right if `flip`."""
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(size, Image.BICUBIC)
    left, top = round((resized.width - width) * offset[0]), round((resized.height - height) * offset[1])
    cropped = resized.crop((left, top, left + width, top + height))
    if flip:
        cropped = cropped.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32)).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


def image_to_pixels(image: Image.Image, resolution: int, **crop) -> torch.Tensor:
    """(3, resolution, resolution) in [-1, 1]: shorter side resized (bicubic) to `resolution`, then centre-cropped,
    as the original MicroDiT data preparation does (or as `crop`, the `resize_and_crop` options, say)."""
    return resize_and_crop(image, resolution, resolution, **crop)


@dataclass(frozen=True)
class ImagePreparation:
    """How a source image becomes training pixels, as the diffusers examples' `--center_crop` / `--random_flip`,
    plus the original's dropping of images smaller than wanted (`min_image_size`, shorter side in pixels) instead of
    upscaling them. The latents are cached, so a random crop or flip is drawn once per image (seeded by its row)."""

    center_crop: bool = True
    random_flip: bool = False
    min_image_size: int | None = None

    def keeps(self, image: Image.Image) -> bool:
        return self.min_image_size is None or min(image.size) >= self.min_image_size

    def crop_options(self, generator: torch.Generator) -> dict:
        """`resize_and_crop` options for one image: its crop offset and flip."""
        flip, x, y = torch.rand(3, generator=generator).tolist()
        return {"offset": (0.5, 0.5) if self.center_crop else (x, y), "flip": self.random_flip and flip < 0.5}


def closest_aspect_ratio_bucket(height: int, width: int, base_size: int) -> tuple[int, int]:
    """(height, width) in pixels of the bucket of `base_size` whose aspect ratio is closest to the image's, chosen
    as diffusers' PixArt resolution binning (and the original PixArt-Σ data loader) chooses it."""
    if base_size not in ASPECT_RATIO_BINS:
        raise ValueError(
            f"No aspect-ratio buckets for base size {base_size}; choose one of {sorted(ASPECT_RATIO_BINS)}."
        )
    return PixArtImageProcessor.classify_height_width_bin(height, width, ASPECT_RATIO_BINS[base_size])


def image_to_bucket_pixels(image: Image.Image, base_size: int, **crop) -> torch.Tensor:
    """(3, H, W) in [-1, 1]: the image resized and centre-cropped (or as `crop` says) to its closest aspect-ratio
    bucket."""
    return resize_and_crop(image, *closest_aspect_ratio_bucket(image.height, image.width, base_size), **crop)


@torch.no_grad()
def encode_images_to_latents(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Latents the pipelines decode with `vae.decode(latents / scaling_factor + shift_factor)`: a sample of the
    posterior for KL autoencoders (as the original), the deterministic code for `AutoencoderTiny`."""
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    encoded = vae.encode(pixels)
    if hasattr(encoded, "latent_dist"):
        latents = encoded.latent_dist.sample(generator)
    else:
        latents = encoded.latents
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def encode_images_by_shape(
    vae, images: list[torch.Tensor], generator: torch.Generator | None = None
) -> list[np.ndarray]:
    """Latents (float16, C x h x w) of (3, H, W) images of possibly different sizes, in input order; images of one
    size are encoded as one batch (sizes in sorted order, so a rerun draws the same posterior samples)."""
    by_shape = defaultdict(list)
    for index, pixels in enumerate(images):
        by_shape[tuple(pixels.shape)].append(index)
    latents = [None] * len(images)
    for shape in sorted(by_shape):
        indices = by_shape[shape]
        encoded = encode_images_to_latents(vae, torch.stack([images[i] for i in indices]), generator)
        for index, values in zip(indices, encoded.float().cpu().numpy().astype(np.float16)):
            latents[index] = values
    return latents
