"""Training data: image-caption sources, the precomputed latent/caption-embedding cache, and batches from it.

Training never runs the VAE or the text encoder. `precompute_embeddings` encodes a source once into a cache folder
of parquet shards (one `datasets` dataset on disk, resumable shard by shard), and `load_precomputed` reads one or
more caches back, mixing several sources by probability with `interleave_datasets` (the paper trains on real and
synthetic data together).

Images are either resized and centre-cropped to square `resolutions`, or (PixArt-Σ's multi-aspect training) to the
closest of diffusers' PixArt aspect-ratio buckets of a base size; bucketed latents of different shapes are stored
flattened with their shape, and `AspectRatioBucketBatchSampler` batches rows of one bucket together.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import datasets
import numpy as np
import torch
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

CACHE_INFO = "precompute.json"
ENCODER_SETTINGS = "encoder.json"  # what the cache was encoded with; a resumed run must match it
SHARD_PATTERN = "shard-{:05d}.parquet"

# diffusers' PixArt aspect-ratio buckets by base size: {"height/width": [height, width]} in pixels.
ASPECT_RATIO_BINS = {
    256: ASPECT_RATIO_256_BIN,
    512: ASPECT_RATIO_512_BIN,
    1024: ASPECT_RATIO_1024_BIN,
    2048: ASPECT_RATIO_2048_BIN,
}


def latents_column(resolution: int) -> str:
    """Cache column holding the latents of images resized and centre-cropped to `resolution` pixels."""
    return f"latents_{resolution}"


def bucket_latents_column(base_size: int) -> str:
    """Cache column holding flattened latents of images resized and centre-cropped to their closest aspect-ratio
    bucket of `base_size` (see `ASPECT_RATIO_BINS`); their (C, H, W) shapes are in `bucket_shape_column`."""
    return f"bucket_latents_{base_size}"


def bucket_shape_column(base_size: int) -> str:
    return f"{bucket_latents_column(base_size)}_shape"


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


def resize_and_center_crop(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """(3, height, width) in [-1, 1]: resized (bicubic) to just cover height x width, then centre-cropped."""
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(size, Image.BICUBIC)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32)).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


def image_to_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """(3, resolution, resolution) in [-1, 1]: shorter side resized (bicubic) to `resolution`, then centre-cropped,
    as the original MicroDiT data preparation does."""
    return resize_and_center_crop(image, resolution, resolution)


def closest_aspect_ratio_bucket(height: int, width: int, base_size: int) -> tuple[int, int]:
    """(height, width) in pixels of the bucket of `base_size` whose aspect ratio is closest to the image's, chosen
    as diffusers' PixArt resolution binning (and the original PixArt-Σ data loader) chooses it."""
    if base_size not in ASPECT_RATIO_BINS:
        raise ValueError(
            f"No aspect-ratio buckets for base size {base_size}; choose one of {sorted(ASPECT_RATIO_BINS)}."
        )
    return PixArtImageProcessor.classify_height_width_bin(height, width, ASPECT_RATIO_BINS[base_size])


def image_to_bucket_pixels(image: Image.Image, base_size: int) -> torch.Tensor:
    """(3, H, W) in [-1, 1]: the image resized and centre-cropped to its closest aspect-ratio bucket."""
    return resize_and_center_crop(image, *closest_aspect_ratio_bucket(image.height, image.width, base_size))


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
    elif any(output_dir.glob("shard-*.parquet*")):
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
    generator = torch.Generator(device="cpu")

    def write_shard(index: int, rows: list[dict]) -> dict:
        stats = {"rows": 0, "skipped_corrupt": 0, "skipped_no_caption": 0}
        records: dict[str, list] = defaultdict(list)
        for start in range(0, len(rows), batch_size):
            captions, pixels = [], {r: [] for r in resolutions}
            bucket_pixels = {b: [] for b in aspect_ratio_buckets}
            for row in rows[start : start + batch_size]:
                caption = row.get(caption_column)
                if not isinstance(caption, str) or not caption.strip():
                    stats["skipped_no_caption"] += 1
                    continue
                try:
                    image = decode_image(row.get(image_column))
                except (OSError, ValueError, UnidentifiedImageError) as error:
                    logger.warning("skipping an unreadable image (%s)", error)
                    stats["skipped_corrupt"] += 1
                    continue
                captions.append(caption.strip())
                for resolution in resolutions:
                    pixels[resolution].append(image_to_pixels(image, resolution))
                for base_size in aspect_ratio_buckets:
                    bucket_pixels[base_size].append(image_to_bucket_pixels(image, base_size))
            if not captions:
                continue
            generator.manual_seed(seed * 100_003 + index * 1_009 + start)  # same latents when a shard is redone
            records["caption"].extend(captions)
            for resolution in resolutions:
                latents = encode_images_to_latents(pipeline.vae, torch.stack(pixels[resolution]), generator)
                records[latents_column(resolution)].extend(latents.float().cpu().numpy().astype(np.float16))
            for base_size in aspect_ratio_buckets:
                latents = encode_images_by_shape(pipeline.vae, bucket_pixels[base_size], generator)
                records[bucket_latents_column(base_size)].extend(values.reshape(-1) for values in latents)
                records[bucket_shape_column(base_size)].extend(np.asarray(v.shape, np.int32) for v in latents)
            stats["rows"] += len(captions)
        if records:
            embeds = encode_distinct_captions(pipeline, records["caption"], batch_size)
            records.update(embeds)
            shapes = {latents_column(r): tuple(records[latents_column(r)][0].shape) for r in resolutions}
            features = _cache_features(shapes, {column: values[0] for column, values in embeds.items()}, aspect_ratio_buckets)
            tmp = output_dir / (SHARD_PATTERN.format(index) + ".tmp")
            datasets.Dataset.from_dict(dict(records), features=features).to_parquet(tmp)
            os.replace(tmp, output_dir / SHARD_PATTERN.format(index))
        (output_dir / (SHARD_PATTERN.format(index) + ".json")).write_text(json.dumps(stats))
        return stats

    done = {int(path.name[6:11]): json.loads(path.read_text()) for path in output_dir.glob("shard-*.parquet.json")}
    rows_iterator = itertools.islice(iter(source), max_samples)
    with tqdm(total=total, desc="precompute", unit="img") as progress:
        for index in itertools.count():
            rows = list(itertools.islice(rows_iterator, shard_size))
            if not rows:
                break
            if index not in done:  # shards finished by an earlier run are read past, not redone
                done[index] = write_shard(index, rows)
            progress.update(len(rows))

    totals = {key: sum(stats[key] for stats in done.values()) for key in ("rows", "skipped_corrupt", "skipped_no_caption")}
    info = {**totals, "shards": len(list(output_dir.glob("shard-*.parquet"))), "resolutions": list(resolutions)}
    if aspect_ratio_buckets:
        info["aspect_ratio_buckets"] = list(aspect_ratio_buckets)
    (output_dir / CACHE_INFO).write_text(json.dumps(info, indent=2))
    return info


def cached_resolutions(cache_dir: str | os.PathLike) -> list[int]:
    """Image sizes a cache folder holds latents for (from its precompute.json)."""
    info = Path(cache_dir) / CACHE_INFO
    return json.loads(info.read_text())["resolutions"] if info.exists() else []


def cached_aspect_ratio_buckets(cache_dir: str | os.PathLike) -> list[int]:
    """Aspect-ratio bucket base sizes a cache folder holds latents for (from its precompute.json)."""
    info = Path(cache_dir) / CACHE_INFO
    return json.loads(info.read_text()).get("aspect_ratio_buckets", []) if info.exists() else []


def load_precomputed(
    cache_dirs: list[str],
    resolution: int,
    probabilities: list[float] | None = None,
    streaming: bool = False,
    seed: int = 0,
) -> datasets.Dataset | datasets.IterableDataset:
    """Training rows `{"latents", "prompt_embeds"[, "prompt_attention_mask"]}` as torch tensors from one or more
    caches written by `precompute_embeddings`; several caches are mixed by `probabilities` (sampling until every
    source has been seen, like the paper's union of real and synthetic data)."""
    sources = []
    for cache_dir in cache_dirs:
        dataset = _load_cache(cache_dir, streaming)
        column = latents_column(resolution)
        if column not in dataset.column_names:
            available = [c for c in dataset.column_names if c.startswith("latents_")]
            raise ValueError(
                f"{cache_dir} has no latents for --resolution {resolution} (it has {available}); precompute with "
                f"--resolutions {resolution} or pick one of those."
            )
        sources.append(_select_training_columns(dataset, {column: "latents"}))
    return _mix(sources, probabilities, seed)


def load_precomputed_buckets(
    cache_dirs: list[str], base_size: int, probabilities: list[float] | None = None, seed: int = 0
) -> datasets.Dataset:
    """Like `load_precomputed`, for the aspect-ratio-bucketed latents of `base_size`: rows hold flattened
    `"latents"` and their `"latents_shape"`; batch them with `AspectRatioBucketBatchSampler` and
    `collate_bucketed`. Not streamable: the sampler needs every row's bucket up front."""
    sources = []
    for cache_dir in cache_dirs:
        dataset = _load_cache(cache_dir, streaming=False)
        column = bucket_latents_column(base_size)
        if column not in dataset.column_names:
            raise ValueError(
                f"{cache_dir} has no aspect-ratio-bucketed latents of base size {base_size} (it has buckets "
                f"{cached_aspect_ratio_buckets(cache_dir)} and square sizes {cached_resolutions(cache_dir)}); "
                f"precompute with --aspect_ratio_buckets {base_size}."
            )
        renames = {column: "latents", bucket_shape_column(base_size): "latents_shape"}
        sources.append(_select_training_columns(dataset, renames))
    return _mix(sources, probabilities, seed)


def _load_cache(cache_dir: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    files = sorted(str(p) for p in Path(cache_dir).glob("shard-*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"No precomputed shards in {cache_dir}; run examples/precompute_embeddings.py --output_dir {cache_dir} first."
        )
    return datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming)


def _select_training_columns(dataset, renames: dict[str, str]):
    """The latent columns (renamed) and the caption embeddings (and mask, if cached)."""
    keep = [*renames, "prompt_embeds"] + [c for c in ("prompt_attention_mask",) if c in dataset.column_names]
    dataset = dataset.select_columns(keep)
    for old, new in renames.items():
        dataset = dataset.rename_column(old, new)
    return dataset


def _mix(sources: list, probabilities: list[float] | None, seed: int):
    if probabilities is not None and len(probabilities) != len(sources):
        raise ValueError(f"Got {len(probabilities)} probabilities for {len(sources)} datasets; give one per dataset.")
    if len(sources) == 1:
        mixed = sources[0]
    else:
        mixed = datasets.interleave_datasets(
            sources, probabilities=probabilities, seed=seed, stopping_strategy="all_exhausted"
        )
    return mixed.with_format("torch")


class EpochPermutationSampler(torch.utils.data.Sampler[int]):
    """A shuffle of `range(num_rows)` that depends only on (seed, epoch); `set_epoch` picks the epoch."""

    def __init__(self, num_rows: int, seed: int = 0):
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        yield from torch.randperm(self.num_rows, generator=generator).tolist()

    def __len__(self) -> int:
        return self.num_rows


class AspectRatioBucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of `batch_size` row indices that all share a bucket, in an order fixed by (seed, epoch).

    Rows are visited in a seeded shuffle of the epoch and collected per bucket; a batch is emitted as soon as its
    bucket holds `batch_size` rows (the grouping of PixArt's `AspectRatioBatchSampler`), and the incomplete batches
    left at the end of an epoch are dropped. Because the order is a function of (seed, epoch) only, a resumed run
    sees the batches of an uninterrupted one. Under several processes Accelerate's `prepare` wraps this sampler in
    `BatchSamplerShard` (whole batches per process) and reaches `set_epoch` through `sampler`.

    `buckets[i]` is any hashable bucket key of row i (e.g. its latent shape).
    """

    def __init__(self, buckets: Sequence, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.drop_last = True  # read by Accelerate's BatchSamplerShard
        self.sampler = EpochPermutationSampler(len(self.buckets), seed)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def bucket_sizes(self) -> dict:
        """{bucket: number of rows}."""
        sizes = defaultdict(int)
        for bucket in self.buckets:
            sizes[bucket] += 1
        return dict(sizes)

    def __iter__(self):
        pending = defaultdict(list)
        for index in self.sampler:
            batch = pending[self.buckets[index]]
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch[:]
                batch.clear()

    def __len__(self) -> int:
        return sum(size // self.batch_size for size in self.bucket_sizes().values())


def latent_shape_buckets(dataset: datasets.Dataset) -> list[tuple[int, ...]]:
    """Every row's latent shape (its bucket) of a `load_precomputed_buckets` dataset, read from the shape column
    only."""
    shapes = dataset.select_columns(["latents_shape"]).with_format("numpy")[:]["latents_shape"]
    return [tuple(int(v) for v in shape) for shape in shapes]


def collate_bucketed(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Stack rows of one bucket from `load_precomputed_buckets`: flattened latents get their stored shape back."""
    shapes = {tuple(row["latents_shape"].tolist()) for row in rows}
    if len(shapes) != 1:
        raise ValueError(
            f"A batch mixes latent shapes {sorted(shapes)}: batch bucketed data with AspectRatioBucketBatchSampler."
        )
    shape = shapes.pop()
    latents = torch.stack([row["latents"].reshape(shape) for row in rows])
    rest = [{k: v for k, v in row.items() if k not in ("latents", "latents_shape")} for row in rows]
    return {"latents": latents, **torch.utils.data.default_collate(rest)}


def load_training_data(args) -> tuple:
    """(dataset, collate_fn, batch_sampler) for `DiffusionTrainer.prepare` from a script's data flags: square
    latents of `--resolution`, or with `--aspect_ratio_buckets` bucketed latents batched one bucket at a time."""
    if getattr(args, "aspect_ratio_buckets", None) is None:
        dataset = load_precomputed(
            args.precomputed_dataset, args.resolution, args.precomputed_dataset_probabilities, args.streaming, args.seed
        )
        return dataset, None, None
    dataset = load_precomputed_buckets(
        args.precomputed_dataset, args.aspect_ratio_buckets, args.precomputed_dataset_probabilities, args.seed
    )
    sampler = AspectRatioBucketBatchSampler(latent_shape_buckets(dataset), args.train_batch_size, args.seed)
    if len(sampler) == 0:
        sizes = {"x".join(map(str, shape[1:])): rows for shape, rows in sampler.bucket_sizes().items()}
        raise SystemExit(
            f"No aspect-ratio bucket holds a full batch of {args.train_batch_size} rows (rows per latent size: "
            f"{sizes}); lower --train_batch_size or add data."
        )
    return dataset, collate_bucketed, sampler
