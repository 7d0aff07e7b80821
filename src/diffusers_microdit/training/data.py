"""Training data: image-caption sources, the precomputed latent/caption-embedding cache, and batches from it.

Training never runs the VAE or the text encoder. `precompute_embeddings` encodes a source once into a cache folder
of parquet shards (one `datasets` dataset on disk, resumable shard by shard), and `load_precomputed` reads one or
more caches back, mixing several sources by probability with `interleave_datasets` (the paper trains on real and
synthetic data together).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

CACHE_INFO = "precompute.json"
SHARD_PATTERN = "shard-{:05d}.parquet"


def latents_column(resolution: int) -> str:
    """Cache column holding the latents of images resized and centre-cropped to `resolution` pixels."""
    return f"latents_{resolution}"


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


def image_to_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """(3, resolution, resolution) in [-1, 1]: shorter side resized (bicubic) to `resolution`, then centre-cropped,
    as the original MicroDiT data preparation does."""
    width, height = image.size
    scale = resolution / min(width, height)
    resized = image.resize((max(resolution, round(width * scale)), max(resolution, round(height * scale))), Image.BICUBIC)
    left, top = (resized.width - resolution) // 2, (resized.height - resolution) // 2
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32)).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


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


@torch.no_grad()
def encode_captions(pipeline, captions: list[str]) -> dict[str, torch.Tensor]:
    """Caption embeddings exactly as `pipeline` computes them at sampling time (so training sees what inference
    feeds the transformer); PixArt-style pipelines also return the T5 attention mask."""
    encoded = pipeline.encode_prompt(captions, do_classifier_free_guidance=False)
    if len(encoded) == 4:  # PixArt-Sigma layout: (embeds, attention_mask, negative embeds, negative mask)
        return {"prompt_embeds": encoded[0], "prompt_attention_mask": encoded[1]}
    return {"prompt_embeds": encoded[0]}


def _cache_features(latent_shapes: dict[str, tuple], embeds: dict[str, torch.Tensor]) -> datasets.Features:
    features = {"caption": datasets.Value("string")}
    for column, shape in latent_shapes.items():
        features[column] = datasets.Array3D(shape, "float16")
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
) -> dict:
    """Encode `source` into parquet shards of VAE latents (one column per resolution) and caption embeddings.

    Resumable: shard k holds the source rows [k * shard_size, (k + 1) * shard_size) and is written atomically, so a
    rerun skips the finished shards and redoes at most the one that was interrupted. Rows whose image cannot be
    decoded or whose caption is missing or empty are skipped and counted, never fatal. Returns the statistics that
    are also written to `output_dir/precompute.json`.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
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
        records: dict[str, list] = {}
        features = None
        for start in range(0, len(rows), batch_size):
            captions, pixels = [], {r: [] for r in resolutions}
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
            if not captions:
                continue
            generator.manual_seed(seed * 100_003 + index * 1_009 + start)  # same latents when a shard is redone
            batch = {"caption": captions}
            for resolution in resolutions:
                latents = encode_images_to_latents(pipeline.vae, torch.stack(pixels[resolution]), generator)
                batch[latents_column(resolution)] = latents.float().cpu().numpy().astype(np.float16)
            embeds = encode_captions(pipeline, captions)
            for column, tensor in embeds.items():
                dtype = np.int8 if column == "prompt_attention_mask" else np.float16
                batch[column] = tensor.float().cpu().numpy().astype(dtype)
            if features is None:
                shapes = {latents_column(r): tuple(batch[latents_column(r)].shape[1:]) for r in resolutions}
                features = _cache_features(shapes, {k: v[0] for k, v in embeds.items()})
            for column, values in batch.items():
                records.setdefault(column, []).extend(list(values))
            stats["rows"] += len(captions)
        if features is not None:
            tmp = output_dir / (SHARD_PATTERN.format(index) + ".tmp")
            datasets.Dataset.from_dict(records, features=features).to_parquet(tmp)
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
    (output_dir / CACHE_INFO).write_text(json.dumps(info, indent=2))
    return info


def cached_resolutions(cache_dir: str | os.PathLike) -> list[int]:
    """Image sizes a cache folder holds latents for (from its precompute.json)."""
    info = Path(cache_dir) / CACHE_INFO
    return json.loads(info.read_text())["resolutions"] if info.exists() else []


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
        files = sorted(str(p) for p in Path(cache_dir).glob("shard-*.parquet"))
        if not files:
            raise FileNotFoundError(
                f"No precomputed shards in {cache_dir}; run examples/precompute_embeddings.py --output_dir {cache_dir} first."
            )
        dataset = datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming)
        column = latents_column(resolution)
        if column not in dataset.column_names:
            available = [c for c in dataset.column_names if c.startswith("latents_")]
            raise ValueError(
                f"{cache_dir} has no latents for --resolution {resolution} (it has {available}); precompute with "
                f"--resolutions {resolution} or pick one of those."
            )
        keep = [column, "prompt_embeds"] + [c for c in ("prompt_attention_mask",) if c in dataset.column_names]
        dataset = dataset.select_columns(keep).rename_column(column, "latents")
        sources.append(dataset)
    if probabilities is not None and len(probabilities) != len(sources):
        raise ValueError(f"Got {len(probabilities)} probabilities for {len(sources)} datasets; give one per dataset.")
    if len(sources) == 1:
        mixed = sources[0]
    else:
        mixed = datasets.interleave_datasets(
            sources, probabilities=probabilities, seed=seed, stopping_strategy="all_exhausted"
        )
    return mixed.with_format("torch")
