"""Writing the training cache: `precompute_embeddings` encodes an image-caption source once into a folder of parquet
shards of VAE latents and caption embeddings (one `datasets` dataset on disk, resumable shard by shard), in the
format `data.py` reads back. Images come in through `sources.py` (decoding, resizing, VAE encoding)."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import datasets
import numpy as np
import torch
from PIL import UnidentifiedImageError
from tqdm.auto import tqdm

from .args import image_preparation
from .data import (
    ALT_CAPTION_PREFIX,
    CACHE_INFO,
    ENCODER_SETTINGS,
    SHARD_GLOB,
    bucket_latents_column,
    bucket_shape_column,
    caption_column_names,
    encoder_settings,
    latents_column,
    settings_differences,
    shard_name,
    shard_problem,
    shard_records,
)
from .randomness import seeded_generator
from .sources import (
    ImagePreparation,
    closest_aspect_ratio_bucket,
    decode_image,
    encode_images_by_shape,
    encode_images_to_latents,
    image_bytes,
    image_to_bucket_pixels,
    image_to_pixels,
    load_image_caption_source,
)

logger = logging.getLogger(__name__)

SKIP_COUNTS = ("rows", "skipped_corrupt", "skipped_no_caption", "skipped_small")


@torch.no_grad()
def encode_captions(pipeline, captions: list[str]) -> dict[str, torch.Tensor]:
    """Caption embeddings exactly as `pipeline` computes them at sampling time (so training sees what inference
    feeds the transformer), with the attention mask when the pipeline uses one (PixArt-style pipelines' T5 mask, a
    MicroDiT pipeline's with `mask_caption_padding`)."""
    embeds, mask, _, _ = pipeline.encode_prompt(captions, do_classifier_free_guidance=False)
    return {"prompt_embeds": embeds} if mask is None else {"prompt_embeds": embeds, "prompt_attention_mask": mask}


def _check_resumable(output_dir: Path, settings: dict) -> None:
    """Record `settings` for a new cache; refuse to add to a cache encoded with other settings."""
    path = output_dir / ENCODER_SETTINGS
    if path.exists():
        differences = settings_differences(json.loads(path.read_text()), settings)
        if differences:
            raise ValueError(
                f"{output_dir} holds a cache encoded with other settings ({'; '.join(differences[:5])}; see "
                f"{path.name}): write this one to a new output folder, or delete that one."
            )
        return
    if any(output_dir.glob(SHARD_GLOB + "*")):
        raise ValueError(f"{output_dir} holds cache shards of unknown origin: use a new output folder or delete it.")
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes of one launch write the same record
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    os.replace(tmp, path)


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
    caption_columns: Sequence[str], latent_shapes: dict[str, tuple], embeds: dict[str, np.ndarray],
    bucket_sizes: Sequence[int] = (),
) -> datasets.Features:
    features = {column: datasets.Value("string") for column in caption_columns}
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
    images: ImagePreparation = ImagePreparation()

    @property
    def caption_prefixes(self) -> dict[str, str]:
        """{source caption column: prefix of its cache columns}: none for the first (`caption`, `prompt_embeds`, ...),
        `ALT_CAPTION_PREFIX` for a second one."""
        return dict(zip(caption_column_names(self.caption_column), ("", ALT_CAPTION_PREFIX)))


def read_rows(
    encoding: CacheEncoding, rows: list[dict], first_row: int, stats: dict
) -> tuple[dict[str, list[str]], dict, dict]:
    """Captions (by cache column: `caption`, and `alt_caption` for a second caption column) and pixels (per square
    resolution, per bucket base size) of the usable `rows` (source rows `first_row`, `first_row + 1`, ...); rows
    without a caption (in either caption column), with an unreadable image or one smaller than `--min_image_size`
    are counted in `stats` and skipped."""
    prefixes = encoding.caption_prefixes
    captions = {prefix + "caption": [] for prefix in prefixes.values()}
    pixels, bucket_pixels = {r: [] for r in encoding.resolutions}, {b: [] for b in encoding.aspect_ratio_buckets}
    for position, row in enumerate(rows, first_row):
        texts = {prefix + "caption": row.get(column) for column, prefix in prefixes.items()}
        if not all(isinstance(text, str) and text.strip() for text in texts.values()):
            stats["skipped_no_caption"] += 1
            continue
        try:
            image = decode_image(row.get(encoding.image_column))
        except (OSError, ValueError, UnidentifiedImageError) as error:
            logger.warning("skipping an unreadable image (%s)", error)
            stats["skipped_corrupt"] += 1
            continue
        if not encoding.images.keeps(image):
            stats["skipped_small"] += 1
            continue
        crop = encoding.images.crop_options(seeded_generator(encoding.seed, position))  # the same on a redo
        for column, text in texts.items():
            captions[column].append(text.strip())
        for resolution in encoding.resolutions:
            pixels[resolution].append(image_to_pixels(image, resolution, **crop))
        for base_size in encoding.aspect_ratio_buckets:
            bucket_pixels[base_size].append(image_to_bucket_pixels(image, base_size, **crop))
    return captions, pixels, bucket_pixels


def encode_latents(
    encoding: CacheEncoding, pixels: dict, bucket_pixels: dict, generator: torch.Generator, records: dict
) -> None:
    """Append the VAE latents of one batch's pixels to `records`: square ones per resolution, bucketed ones
    flattened with their shapes."""
    vae = encoding.pipeline.vae
    for resolution in encoding.resolutions:
        latents = encode_images_to_latents(vae, torch.stack(pixels[resolution]), generator)
        records[latents_column(resolution)].extend(_finite(latents.float().cpu().numpy().astype(np.float16)))
    for base_size in encoding.aspect_ratio_buckets:
        latents = _finite(encode_images_by_shape(vae, bucket_pixels[base_size], generator))
        records[bucket_latents_column(base_size)].extend(values.reshape(-1) for values in latents)
        records[bucket_shape_column(base_size)].extend(np.asarray(v.shape, np.int32) for v in latents)


def _finite(latents):
    """Refuse NaN/inf latents (a VAE overflowing in float16 is the usual cause) instead of caching them."""
    if not all(np.isfinite(values).all() for values in latents):
        raise RuntimeError(
            "The VAE produced NaN or inf latents (or they overflow float16): encode with --mixed_precision bf16 or no."
        )
    return latents


def save_shard(encoding: CacheEncoding, output_dir: Path, index: int, records: dict) -> None:
    """Add the caption embeddings (of each caption column) to `records` and write them as shard `index`, atomically
    (`.tmp`, then rename)."""
    caption_columns = [prefix + "caption" for prefix in encoding.caption_prefixes.values()]
    first_embeds = {}
    for prefix in encoding.caption_prefixes.values():
        embeds = encode_distinct_captions(encoding.pipeline, records[prefix + "caption"], encoding.batch_size)
        for column, values in embeds.items():
            records[prefix + column], first_embeds[prefix + column] = values, values[0]
    shapes = {latents_column(r): tuple(records[latents_column(r)][0].shape) for r in encoding.resolutions}
    features = _cache_features(caption_columns, shapes, first_embeds, encoding.aspect_ratio_buckets)
    tmp = output_dir / (shard_name(index) + ".tmp")
    datasets.Dataset.from_dict(dict(records), features=features).to_parquet(tmp)
    os.replace(tmp, output_dir / shard_name(index))


def rows_digest(encoding: CacheEncoding, rows: list[dict]) -> str:
    """SHA-256 of source rows (captions and image bytes): a rerun on other data into the same folder differs here."""
    digest, caption_columns = hashlib.sha256(), list(encoding.caption_prefixes)
    for row in rows:
        for column in caption_columns:  # one column hashes as before the second was possible
            digest.update(repr(row.get(column)).encode())
        digest.update(hashlib.sha256(image_bytes(row.get(encoding.image_column))).digest())
    return digest.hexdigest()


def write_shard(
    encoding: CacheEncoding, output_dir: Path, index: int, rows: list[dict], first_row: int, digest: str
) -> dict:
    """Encode the source rows of shard `index` (rows `first_row`, ...) batch by batch, write the shard (if any row was usable) and its
    statistics file `shard-N.parquet.json` (with the rows' `digest`), whose presence marks the shard finished.
    Returns the statistics."""
    stats = {**dict.fromkeys(SKIP_COUNTS, 0), "source_sha256": digest}
    records: dict[str, list] = defaultdict(list)
    for start in range(0, len(rows), encoding.batch_size):
        batch = rows[start : start + encoding.batch_size]
        captions, pixels, bucket_pixels = read_rows(encoding, batch, first_row + start, stats)
        if not captions["caption"]:
            continue
        generator = seeded_generator(encoding.seed, index, start)  # same latents when a shard is redone
        for column, texts in captions.items():
            records[column].extend(texts)
        encode_latents(encoding, pixels, bucket_pixels, generator, records)
        stats["rows"] += len(captions["caption"])
    if records:
        save_shard(encoding, output_dir, index, records)
    (output_dir / (shard_name(index) + ".json")).write_text(json.dumps(stats))
    return stats


def finished_shards(output_dir: Path) -> dict[int, dict]:
    """{shard index: statistics} of the shards an earlier run finished and that are still intact; a missing or
    damaged one is reported and left out, so it is encoded again."""
    intact = {}
    for index, stats in shard_records(output_dir).items():
        problem = stats["rows"] and shard_problem(output_dir / shard_name(index), stats["rows"])
        if problem:
            logger.warning(f"Re-encoding shard {index} of {output_dir}: {problem}.")
        else:
            intact[index] = stats
    return intact


def _remove_shard(output_dir: Path, index: int) -> None:
    for path in (output_dir / shard_name(index), output_dir / (shard_name(index) + ".json")):
        path.unlink(missing_ok=True)


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
    source_name: str | None = None,
    images: ImagePreparation = ImagePreparation(),
    process_index: int = 0,
    num_processes: int = 1,
) -> dict:
    """Encode `source` into parquet shards of VAE latents (one column per resolution) and caption embeddings.

    `caption_column` is one column, or two separated by a comma (`"text,vlm_text"`): the real caption and an
    alternative one (PixArt-Σ's VLM captions), whose embeddings go to the `alt_`-prefixed columns; rows need both.

    `aspect_ratio_buckets` (base sizes of `ASPECT_RATIO_BINS`) adds, per base size, the latents of each image resized
    and cropped to its closest bucket (`bucket_latents_column`, flattened, with `bucket_shape_column`); `images` says
    how images are cropped, flipped and which are too small. `source_name` is recorded in `precompute.json`.

    Resumable: shard k holds the source rows [k * shard_size, (k + 1) * shard_size) and is written atomically, so a
    rerun skips the finished shards and redoes the one that was interrupted and any that is missing, damaged, or
    whose source rows changed (each shard records a SHA-256 of its rows); a rerun with another VAE, text encoder,
    encoder dtype, image preparation or set of sizes is refused, since its shards would not match the finished
    ones. Rows whose image cannot be decoded, is too small, or whose caption is missing or empty are skipped and
    counted, never fatal.

    Under several processes (`accelerate launch`) process i encodes the shards k with k % num_processes == i; once
    all are done, one process calls `write_cache_info`. With one process that is done here and its result returned;
    otherwise this process's own counts are returned.
    """
    if not resolutions and not aspect_ratio_buckets:
        raise ValueError("Give at least one square resolution or aspect-ratio bucket base size to encode.")
    for base_size in aspect_ratio_buckets:
        closest_aspect_ratio_bucket(1, 1, base_size)  # fails early, naming the valid base sizes
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = encoder_settings(pipeline, resolutions, aspect_ratio_buckets)
    settings.update(encoder_dtype=str(pipeline.vae.dtype), images=asdict(images))
    caption_columns = caption_column_names(caption_column)
    if len(caption_columns) == 2:  # recorded only then, so that one-caption caches written before still resume
        settings["captions_per_image"] = 2
    _check_resumable(output_dir, settings)
    columns = set(source.column_names or [])
    if columns and not {image_column, *caption_columns} <= columns:
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
        pipeline, resolutions, aspect_ratio_buckets, image_column, caption_column, batch_size, seed, images
    )
    done = {i: stats for i, stats in finished_shards(output_dir).items() if i % num_processes == process_index}
    rows_iterator = itertools.islice(iter(source), max_samples)
    mine = {**dict.fromkeys(SKIP_COUNTS, 0), "shards": 0}
    num_shards = 0
    with tqdm(total=total, desc="precompute", unit="img", disable=process_index != 0) as progress:
        for index in itertools.count():
            rows = list(itertools.islice(rows_iterator, shard_size))
            if not rows:
                break
            num_shards += 1
            progress.update(len(rows))
            if index % num_processes != process_index:
                continue  # another process's shard
            digest, previous = rows_digest(encoding, rows), done.get(index)
            # Shards an earlier run finished from these same rows are read past, not redone; rows that changed (a
            # rerun on other data into this folder) are encoded again, never trained on as they were.
            if previous is None or previous.get("source_sha256") != digest:
                if previous is not None:
                    logger.warning(f"Re-encoding shard {index} of {output_dir}: its source rows changed.")
                done[index] = write_shard(encoding, output_dir, index, rows, index * shard_size, digest)
            mine = {key: mine[key] + done[index].get(key, 0) for key in SKIP_COUNTS} | {"shards": mine["shards"] + 1}
    for index in sorted(i for i in done if i >= num_shards):  # beyond the end of this source: not its data
        logger.warning(f"Removing shard {index} of {output_dir}: the source has no rows for it now.")
        _remove_shard(output_dir, index)
    if num_processes == 1:
        return write_cache_info(output_dir, resolutions, aspect_ratio_buckets, source_name)
    return {"process": process_index, **mine}


def write_cache_info(
    output_dir: str | os.PathLike, resolutions: Sequence[int], aspect_ratio_buckets: Sequence[int], source_name: str | None
) -> dict:
    """Write `precompute.json` from the finished shards' records (counts, the source's name, row count and SHA-256 of
    its shards' digests) and return it. Call it once all processes have finished their shards."""
    output_dir = Path(output_dir)
    records = [stats for _, stats in sorted(shard_records(output_dir).items())]
    totals = {key: sum(stats.get(key, 0) for stats in records) for key in SKIP_COUNTS}
    info = {
        **totals,
        "shards": len(list(output_dir.glob(SHARD_GLOB))),
        "resolutions": list(resolutions),
        "source": source_name,
        "source_rows": sum(totals.values()),
        "source_sha256": hashlib.sha256("".join(stats["source_sha256"] for stats in records).encode()).hexdigest(),
    }
    if aspect_ratio_buckets:
        info["aspect_ratio_buckets"] = list(aspect_ratio_buckets)
    (output_dir / CACHE_INFO).write_text(json.dumps(info, indent=2))
    return info


def training_caches(args, pipeline, accelerator, resolution: int) -> list[str]:
    """The caches a training script trains on: `--precomputed_dataset`, or its `--dataset_name` / `--train_data_dir`
    encoded here first with the pipeline's own VAE and text encoder (square latents of `resolution` px, or its
    `--aspect_ratio_buckets`). The cache folder is named by a hash of the source and of everything that decides the
    encoding, under `--encoded_cache_dir` (default `--output_dir/cache`), so a rerun, a resumed run or a later stage
    with the same data and encoders reuses it; the processes of a launch split its shards."""
    if args.precomputed_dataset:
        return args.precomputed_dataset
    buckets = [args.aspect_ratio_buckets] if getattr(args, "aspect_ratio_buckets", None) else []
    resolutions = [] if buckets else [resolution]
    images = image_preparation(args)
    source = {
        "dataset": args.dataset_name or str(Path(args.train_data_dir).resolve()),
        "config": args.dataset_config_name,
        "split": args.dataset_split,
        "columns": [args.image_column, args.caption_column],
        "max_samples": args.max_samples,
    }
    key = {"source": source, "images": asdict(images), "seed": args.seed, **encoder_settings(pipeline, resolutions, buckets)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    cache = Path(args.encoded_cache_dir or Path(args.output_dir) / "cache") / digest
    raw = load_image_caption_source(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.dataset_split, False, args.cache_dir
    )
    source_name = args.dataset_name or args.train_data_dir
    components = (pipeline.vae, pipeline.text_encoder)
    for component in components:
        component.to(accelerator.device)
    precompute_embeddings(
        pipeline, raw, cache, resolutions, args.image_column, args.caption_column, max_samples=args.max_samples,
        seed=args.seed, aspect_ratio_buckets=buckets, source_name=source_name, images=images,
        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
    )
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1 and accelerator.is_main_process:
        write_cache_info(cache, resolutions, buckets, source_name)
    accelerator.wait_for_everyone()
    for component in components:
        component.to("cpu")  # the trainer moves what validation needs
    accelerator.print(f"Training on the cache {cache} of {source_name}")
    return [str(cache)]
