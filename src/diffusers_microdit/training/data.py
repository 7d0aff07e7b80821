"""Training data from the precomputed cache: its format (columns, shard names), reading one or more caches back,
mixing several sources by probability with `interleave_datasets` (the paper trains on real and synthetic data
together), and batching.

Training never runs the VAE or the text encoder: `precompute.py` writes the cache once. Latents are either of square
`resolutions`, or (PixArt-Σ's multi-aspect training) of the closest of diffusers' PixArt aspect-ratio buckets of a
base size; bucketed latents of different shapes are stored flattened with their shape, and
`AspectRatioBucketBatchSampler` batches rows of one bucket together.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import datasets
import torch
from accelerate.data_loader import SeedableRandomSampler

# Re-exported: scripts and tests import these from here (they live with the raw-data code in sources.py).

CACHE_INFO = "precompute.json"
# Shard k of a cache is `shard-0000k.parquet`; these three are the only places that spell the name.
SHARD_PREFIX, SHARD_SUFFIX = "shard-", ".parquet"
SHARD_GLOB = f"{SHARD_PREFIX}*{SHARD_SUFFIX}"


def shard_name(index: int) -> str:
    """File name of shard `index` (its statistics file adds `.json`, a write in progress `.tmp`)."""
    return f"{SHARD_PREFIX}{index:05d}{SHARD_SUFFIX}"


def shard_index(name: str) -> int:
    """The index of a shard file (or of its `.json` / `.tmp` companion) from its name."""
    return int(name[len(SHARD_PREFIX) :].split(".", 1)[0])


def latents_column(resolution: int) -> str:
    """Cache column holding the latents of images resized and centre-cropped to `resolution` pixels."""
    return f"latents_{resolution}"


def bucket_latents_column(base_size: int) -> str:
    """Cache column holding flattened latents of images resized and centre-cropped to their closest aspect-ratio
    bucket of `base_size` (see `sources.ASPECT_RATIO_BINS`); their (C, H, W) shapes are in `bucket_shape_column`."""
    return f"bucket_latents_{base_size}"


def bucket_shape_column(base_size: int) -> str:
    return f"{bucket_latents_column(base_size)}_shape"


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
    files = sorted(str(p) for p in Path(cache_dir).glob(SHARD_GLOB))
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
        # Accelerate's seedable sampler: a shuffle of the rows set by (seed + epoch) alone, the sampler the trainer's
        # unbucketed batches get from `use_seedable_sampler` (whose `prepare` swaps in an equal one with the run's
        # seed). The trainer sets its epoch every epoch, through this sampler or Accelerate's wrappers.
        self.sampler = SeedableRandomSampler(range(len(self.buckets)), data_seed=seed)

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
        epoch = self.sampler.epoch
        for index in self.sampler:
            batch = pending[self.buckets[index]]
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch[:]
                batch.clear()
        # SeedableRandomSampler moves itself to the next epoch after a full pass; undo that, so the batches stay a
        # function of the epoch last set (`set_epoch`) and iterating twice gives the same epoch twice.
        self.sampler.set_epoch(epoch)

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


def load_training_data(args, resolution: int, cache_dirs: list[str] | None = None) -> tuple:
    """(dataset, collate_fn, batch_sampler) for `DiffusionTrainer.prepare` from a script's data flags: square
    latents of `resolution` px, or with `--aspect_ratio_buckets` bucketed latents batched one bucket at a time.
    `cache_dirs` (default `--precomputed_dataset`) are the caches to read."""
    cache_dirs = cache_dirs if cache_dirs is not None else args.precomputed_dataset
    if getattr(args, "aspect_ratio_buckets", None) is None:
        dataset = load_precomputed(
            cache_dirs, resolution, args.precomputed_dataset_probabilities, args.streaming, args.seed
        )
        return dataset, None, None
    dataset = load_precomputed_buckets(
        cache_dirs, args.aspect_ratio_buckets, args.precomputed_dataset_probabilities, args.seed
    )
    sampler = AspectRatioBucketBatchSampler(latent_shape_buckets(dataset), args.train_batch_size, args.seed)
    if len(sampler) == 0:
        sizes = {"x".join(map(str, shape[1:])): rows for shape, rows in sampler.bucket_sizes().items()}
        raise SystemExit(
            f"No aspect-ratio bucket holds a full batch of {args.train_batch_size} rows (rows per latent size: "
            f"{sizes}); lower --train_batch_size or add data."
        )
    return dataset, collate_bucketed, sampler
