"""Writing the training cache: `precompute_embeddings` encodes an image-caption source once into a folder of parquet
shards of VAE latents and caption embeddings (one `datasets` dataset on disk, resumable shard by shard), in the
format `data.py` reads back. Images come in through `sources.py` (decoding, resizing, VAE encoding)."""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import datasets
import numpy as np
import torch
from PIL import UnidentifiedImageError
from tqdm.auto import tqdm

from .data import (
    CACHE_INFO,
    SHARD_GLOB,
    bucket_latents_column,
    bucket_shape_column,
    latents_column,
    shard_index,
    shard_name,
)
from .randomness import seeded_generator
from .sources import (
    closest_aspect_ratio_bucket,
    decode_image,
    encode_images_by_shape,
    encode_images_to_latents,
    image_to_bucket_pixels,
    image_to_pixels,
)

logger = logging.getLogger(__name__)

ENCODER_SETTINGS = "encoder.json"  # what the cache was encoded with; a resumed run must match it
SKIP_COUNTS = ("rows", "skipped_corrupt", "skipped_no_caption")


@torch.no_grad()
def encode_captions(pipeline, captions: list[str]) -> dict[str, torch.Tensor]:
    """Caption embeddings exactly as `pipeline` computes them at sampling time (so training sees what inference
    feeds the transformer); PixArt-style pipelines also return the T5 attention mask."""
    encoded = pipeline.encode_prompt(captions, do_classifier_free_guidance=False)
    if len(encoded) == 4:  # PixArt-Sigma layout: (embeds, attention_mask, negative embeds, negative mask)
        return {"prompt_embeds": encoded[0], "prompt_attention_mask": encoded[1]}
    return {"prompt_embeds": encoded[0]}


def encoder_settings(pipeline, resolutions: Sequence[int], aspect_ratio_buckets: Sequence[int]) -> dict:
    """What decides a cache's contents: the VAE and text encoder (class and configuration, without paths or
    versions), the tokenizer's length and the encoded sizes. JSON-normalised, so it compares with a stored copy."""

    def described(component) -> dict:
        config = component.config if isinstance(component.config, dict) else component.config.to_dict()
        kept = {key: value for key, value in config.items() if not key.startswith("_") and key != "transformers_version"}
        return {"class": type(component).__name__, **kept}

    settings = {
        "vae": described(pipeline.vae),
        "text_encoder": described(pipeline.text_encoder),
        "tokenizer_max_length": pipeline.tokenizer.model_max_length,
        "resolutions": list(resolutions),
        "aspect_ratio_buckets": list(aspect_ratio_buckets),
    }
    return json.loads(json.dumps(settings, default=str))


def _check_resumable(output_dir: Path, settings: dict) -> None:
    """Record `settings` for a new cache; refuse to add to a cache encoded with other settings."""
    path = output_dir / ENCODER_SETTINGS
    if path.exists():
        stored = json.loads(path.read_text())
        if stored != settings:
            differ = sorted(key for key in settings.keys() | stored.keys() if settings.get(key) != stored.get(key))
            raise ValueError(
                f"{output_dir} holds a cache encoded with other settings ({', '.join(differ)} differ, see "
                f"{path.name}): write this one to a new output folder, or delete that one."
            )
    elif any(output_dir.glob(SHARD_GLOB + "*")):
        raise ValueError(f"{output_dir} holds cache shards of unknown origin: use a new output folder or delete it.")
    path.write_text(json.dumps(settings, indent=2) + "\n")


def encode_distinct_captions(pipeline, captions: list[str], batch_size: int) -> dict[str, list[np.ndarray]]:
    """`encode_captions` of every caption as float16 / int8 arrays by column, each distinct caption encoded once
    (captions repeat: the 40k shapes images have about 3.5k distinct captions)."""
    distinct = list(dict.fromkeys(captions))
    encoded: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for start in range(0, len(distinct), batch_size):
        chunk = distinct[start : start + batch_size]
        for column, tensor in encode_captions(pipeline, chunk).items():
            dtype = np.int8 if column == "prompt_attention_mask" else np.float16
            encoded[column].update(zip(chunk, tensor.float().cpu().numpy().astype(dtype)))
    return {column: [by_caption[caption] for caption in captions] for column, by_caption in encoded.items()}


def _cache_features(
    latent_shapes: dict[str, tuple], embeds: dict[str, np.ndarray], bucket_sizes: Sequence[int] = ()
) -> datasets.Features:
    features = {"caption": datasets.Value("string")}
    for column, shape in latent_shapes.items():
        features[column] = datasets.Array3D(shape, "float16")
    for base_size in bucket_sizes:  # variable shapes: flat values plus the (C, H, W) shape
        features[bucket_latents_column(base_size)] = datasets.Sequence(datasets.Value("float16"))
        features[bucket_shape_column(base_size)] = datasets.Sequence(datasets.Value("int32"), length=3)
    for column, tensor in embeds.items():
        if tensor.ndim == 2:  # (L, D) token states
            features[column] = datasets.Array2D(tuple(tensor.shape), "float16")
        else:  # (L,) attention mask
            features[column] = datasets.Sequence(datasets.Value("int8"), length=tensor.shape[0])
    return datasets.Features(features)


@dataclass(frozen=True)
class CacheEncoding:
    """What `precompute_embeddings` encodes each source row into, and with what."""

    pipeline: object
    resolutions: Sequence[int]
    aspect_ratio_buckets: Sequence[int]
    image_column: str
    caption_column: str
    batch_size: int
    seed: int


def read_rows(encoding: CacheEncoding, rows: list[dict], stats: dict) -> tuple[list[str], dict, dict]:
    """Captions and pixels (per square resolution, per bucket base size) of the usable `rows`; rows without a
    caption or with an unreadable image are counted in `stats` and skipped."""
    captions, pixels = [], {r: [] for r in encoding.resolutions}
    bucket_pixels = {b: [] for b in encoding.aspect_ratio_buckets}
    for row in rows:
        caption = row.get(encoding.caption_column)
        if not isinstance(caption, str) or not caption.strip():
            stats["skipped_no_caption"] += 1
            continue
        try:
            image = decode_image(row.get(encoding.image_column))
        except (OSError, ValueError, UnidentifiedImageError) as error:
            logger.warning("skipping an unreadable image (%s)", error)
            stats["skipped_corrupt"] += 1
            continue
        captions.append(caption.strip())
        for resolution in encoding.resolutions:
            pixels[resolution].append(image_to_pixels(image, resolution))
        for base_size in encoding.aspect_ratio_buckets:
            bucket_pixels[base_size].append(image_to_bucket_pixels(image, base_size))
    return captions, pixels, bucket_pixels


def encode_latents(
    encoding: CacheEncoding, pixels: dict, bucket_pixels: dict, generator: torch.Generator, records: dict
) -> None:
    """Append the VAE latents of one batch's pixels to `records`: square ones per resolution, bucketed ones
    flattened with their shapes."""
    vae = encoding.pipeline.vae
    for resolution in encoding.resolutions:
        latents = encode_images_to_latents(vae, torch.stack(pixels[resolution]), generator)
        records[latents_column(resolution)].extend(latents.float().cpu().numpy().astype(np.float16))
    for base_size in encoding.aspect_ratio_buckets:
        latents = encode_images_by_shape(vae, bucket_pixels[base_size], generator)
        records[bucket_latents_column(base_size)].extend(values.reshape(-1) for values in latents)
        records[bucket_shape_column(base_size)].extend(np.asarray(v.shape, np.int32) for v in latents)


def save_shard(encoding: CacheEncoding, output_dir: Path, index: int, records: dict) -> None:
    """Add the caption embeddings to `records` and write them as shard `index`, atomically (`.tmp`, then rename)."""
    embeds = encode_distinct_captions(encoding.pipeline, records["caption"], encoding.batch_size)
    records.update(embeds)
    shapes = {latents_column(r): tuple(records[latents_column(r)][0].shape) for r in encoding.resolutions}
    first_embeds = {column: values[0] for column, values in embeds.items()}
    features = _cache_features(shapes, first_embeds, encoding.aspect_ratio_buckets)
    tmp = output_dir / (shard_name(index) + ".tmp")
    datasets.Dataset.from_dict(dict(records), features=features).to_parquet(tmp)
    os.replace(tmp, output_dir / shard_name(index))


def write_shard(encoding: CacheEncoding, output_dir: Path, index: int, rows: list[dict]) -> dict:
    """Encode the source rows of shard `index` batch by batch, write the shard (if any row was usable) and its
    statistics file `shard-N.parquet.json`, whose presence marks the shard finished. Returns the statistics."""
    stats = dict.fromkeys(SKIP_COUNTS, 0)
    records: dict[str, list] = defaultdict(list)
    for start in range(0, len(rows), encoding.batch_size):
        captions, pixels, bucket_pixels = read_rows(encoding, rows[start : start + encoding.batch_size], stats)
        if not captions:
            continue
        generator = seeded_generator(encoding.seed, index, start)  # same latents when a shard is redone
        records["caption"].extend(captions)
        encode_latents(encoding, pixels, bucket_pixels, generator, records)
        stats["rows"] += len(captions)
    if records:
        save_shard(encoding, output_dir, index, records)
    (output_dir / (shard_name(index) + ".json")).write_text(json.dumps(stats))
    return stats


def finished_shards(output_dir: Path) -> dict[int, dict]:
    """{shard index: statistics} of the shards an earlier run finished."""
    return {shard_index(p.name): json.loads(p.read_text()) for p in output_dir.glob(SHARD_GLOB + ".json")}


def precompute_embeddings(
    pipeline,
    source: datasets.Dataset | datasets.IterableDataset,
    output_dir: str | os.PathLike,
    resolutions: list[int],
    image_column: str = "image",
    caption_column: str = "text",
    shard_size: int = 1000,
    batch_size: int = 32,
    max_samples: int | None = None,
    seed: int = 0,
    aspect_ratio_buckets: Sequence[int] = (),
) -> dict:
    """Encode `source` into parquet shards of VAE latents (one column per resolution) and caption embeddings.

    `aspect_ratio_buckets` (base sizes of `ASPECT_RATIO_BINS`) adds, per base size, the latents of each image resized
    and centre-cropped to its closest bucket (`bucket_latents_column`, flattened, with `bucket_shape_column`).

    Resumable: shard k holds the source rows [k * shard_size, (k + 1) * shard_size) and is written atomically, so a
    rerun skips the finished shards and redoes at most the one that was interrupted; a rerun with another VAE, text
    encoder or set of sizes is refused, since its shards would not match the finished ones. Rows whose image cannot be
    decoded or whose caption is missing or empty are skipped and counted, never fatal. Returns the statistics that
    are also written to `output_dir/precompute.json`.
    """
    if not resolutions and not aspect_ratio_buckets:
        raise ValueError("Give at least one square resolution or aspect-ratio bucket base size to encode.")
    for base_size in aspect_ratio_buckets:
        closest_aspect_ratio_bucket(1, 1, base_size)  # fails early, naming the valid base sizes
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _check_resumable(output_dir, encoder_settings(pipeline, resolutions, aspect_ratio_buckets))
    columns = set(source.column_names or [])
    if columns and not {image_column, caption_column} <= columns:
        raise ValueError(
            f"The dataset has columns {sorted(columns)}; pass the image and caption column names with "
            f"--image_column / --caption_column (now {image_column!r} / {caption_column!r})."
        )
    if isinstance(source.features, datasets.Features) and isinstance(source.features.get(image_column), datasets.Image):
        source = source.cast_column(image_column, datasets.Image(decode=False))  # decode ourselves, per row
    total = len(source) if isinstance(source, datasets.Dataset) else None
    if max_samples is not None:
        total = max_samples if total is None else min(total, max_samples)
    encoding = CacheEncoding(
        pipeline, resolutions, aspect_ratio_buckets, image_column, caption_column, batch_size, seed
    )
    done = finished_shards(output_dir)
    rows_iterator = itertools.islice(iter(source), max_samples)
    with tqdm(total=total, desc="precompute", unit="img") as progress:
        for index in itertools.count():
            rows = list(itertools.islice(rows_iterator, shard_size))
            if not rows:
                break
            if index not in done:  # shards finished by an earlier run are read past, not redone
                done[index] = write_shard(encoding, output_dir, index, rows)
            progress.update(len(rows))

    totals = {key: sum(stats[key] for stats in done.values()) for key in SKIP_COUNTS}
    info = {**totals, "shards": len(list(output_dir.glob(SHARD_GLOB))), "resolutions": list(resolutions)}
    if aspect_ratio_buckets:
        info["aspect_ratio_buckets"] = list(aspect_ratio_buckets)
    (output_dir / CACHE_INFO).write_text(json.dumps(info, indent=2))
    return info
