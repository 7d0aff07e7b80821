"""Training data from the precomputed cache: its format (columns, shard names), reading one or more caches back,
mixing several sources (their union, or by probability with `interleave_datasets`; the paper trains on real and
synthetic data together), and batching.

Training never runs the VAE or the text encoder: `precompute.py` writes the cache once, with a record of the encoders
(`encoder.json`) and of each shard's rows (`shard-N.parquet.json`); training checks both before its first step (a cache
of another VAE or text encoder, a missing or damaged shard are refused, naming what differs). Latents are either of square
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
import pyarrow
import pyarrow.parquet
import torch
from accelerate.data_loader import SeedableRandomSampler

CACHE_INFO = "precompute.json"
ENCODER_SETTINGS = "encoder.json"  # what the cache was encoded with; resuming and training must match it
# Config entries that do not change what an encoder computes: dtypes (a cache encoded in bf16 trains an fp32 run),
# names and versions, and what `save_pretrained` adds on the way to disk.
_IRRELEVANT_CONFIG_KEYS = {"architectures", "torch_dtype", "dtype", "transformers_version", "use_cache"}
# Shard k of a cache is `shard-0000k.parquet`; these three are the only places that spell the name.
SHARD_PREFIX, SHARD_SUFFIX = "shard-", ".parquet"
SHARD_GLOB = f"{SHARD_PREFIX}*{SHARD_SUFFIX}"


# A second caption per image (PixArt-Σ trains on the original caption or a VLM's, `real_prompt_ratio`): its cache
# columns are the first caption's with this prefix (`alt_caption`, `alt_prompt_embeds`, `alt_prompt_attention_mask`).
ALT_CAPTION_PREFIX = "alt_"
REAL_CAPTION_RATIO = 0.5  # PixArt-Σ's real_prompt_ratio: half the samples train on the real caption


def caption_column_names(value: str) -> list[str]:
    """The source columns of a `--caption_column` value: one name, or two separated by a comma (`text,vlm_text`),
    the real caption and an alternative one, both encoded into the cache."""
    names = [name.strip() for name in value.split(",")]
    if len(names) > 2 or not all(names) or len(set(names)) < len(names):
        raise ValueError(
            f"--caption_column takes one column, or two different ones separated by a comma (the real caption and "
            f"an alternative one, e.g. text,vlm_text), got {value!r}."
        )
    return names


def alt_caption_column(column: str) -> str:
    """Cache column of the second caption's `column` ("caption", "prompt_embeds", "prompt_attention_mask")."""
    return ALT_CAPTION_PREFIX + column


def has_alt_captions(dataset) -> bool:
    """Whether training rows hold a second caption's embeddings (a cache encoded from two caption columns)."""
    return alt_caption_column("prompt_embeds") in (dataset.column_names or [])


def caption_mixing_ratio(dataset, real_caption_ratio: float | None) -> float | None:
    """The probability that a sample trains on its real (first) caption: `real_caption_ratio`, by default
    `REAL_CAPTION_RATIO`, when the rows hold two captions; None (nothing to mix) when they hold one, where asking
    for a ratio is refused."""
    if has_alt_captions(dataset):
        return REAL_CAPTION_RATIO if real_caption_ratio is None else real_caption_ratio
    if real_caption_ratio is not None:
        raise SystemExit(
            "--real_caption_ratio mixes two captions per image, but the training data has one: encode it with "
            "--caption_column REAL,OTHER (e.g. text,vlm_text; precompute_embeddings.py takes the same flag), or drop "
            "--real_caption_ratio."
        )
    return None


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
    bucket of `base_size` (see `pipeline_pixart_sigma_family.ASPECT_RATIO_BINS`); their (C, H, W) shapes are in
    `bucket_shape_column`."""
    return f"bucket_latents_{base_size}"


def bucket_shape_column(base_size: int) -> str:
    return f"{bucket_latents_column(base_size)}_shape"


def encoder_settings(pipeline, resolutions: Sequence[int], aspect_ratio_buckets: Sequence[int]) -> dict:
    """What decides a cache's contents: the VAE and text encoder (class and configuration, without paths, versions or
    dtypes), the tokenizer's length and the encoded sizes. JSON-normalised, so it compares with a stored copy."""

    def described(component) -> dict:
        config = component.config if isinstance(component.config, dict) else component.config.to_dict()
        kept = {k: v for k, v in config.items() if not k.startswith("_") and k not in _IRRELEVANT_CONFIG_KEYS}
        return {"class": type(component).__name__, **kept}

    settings = {
        "vae": described(pipeline.vae),
        "text_encoder": described(pipeline.text_encoder),
        "tokenizer_max_length": pipeline.tokenizer.model_max_length,
        "resolutions": list(resolutions),
        "aspect_ratio_buckets": list(aspect_ratio_buckets),
    }
    if pipeline.config.get("mask_caption_padding"):  # recorded only when set, so older caches still match
        settings["mask_caption_padding"] = True
    return json.loads(json.dumps(settings, default=str))


def settings_differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """Each entry that differs between two `encoder_settings`, as "vae.latent_channels: 4 in the cache, 8 here"."""
    differences = []
    for key in sorted(stored.keys() | current.keys()):
        old, new = stored.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += settings_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            differences.append(f"{prefix}{key}: {old} in the cache, {new} here")
    return differences


def check_cache_matches(cache_dir: str | os.PathLike, pipeline) -> None:
    """Refuse a cache whose VAE, text encoder or tokenizer length (its `encoder.json`) differ from `pipeline`'s,
    naming each difference: its latents or caption embeddings are not what this pipeline would feed the model."""
    path = Path(cache_dir) / ENCODER_SETTINGS
    if not path.is_file():
        raise SystemExit(
            f"{cache_dir} has no {ENCODER_SETTINGS}, so what encoded it is unknown: encode the data with "
            "examples/precompute_embeddings.py from the pipeline you train."
        )
    stored, current = json.loads(path.read_text()), encoder_settings(pipeline, [], [])
    differences = [d for key in ("vae", "text_encoder", "tokenizer_max_length") for d in settings_differences(
        {key: stored.get(key)}, {key: current[key]}
    )]
    if differences:
        raise SystemExit(
            f"{cache_dir} was encoded with another VAE or text encoder than the pipeline being trained:\n  "
            + "\n  ".join(differences[:10]) + ("\n  ..." if len(differences) > 10 else "")
            + "\nRe-encode it with precompute_embeddings.py from this pipeline (and the same --vae), into a new folder."
        )


def check_row_fits(row: dict, transformer) -> None:
    """Refuse training rows whose latent channels or caption width are not what `transformer` takes."""
    channels = int(row["latents_shape"][0]) if "latents_shape" in row else row["latents"].shape[0]
    width = row["prompt_embeds"].shape[-1]
    config = transformer.config
    if channels != config.in_channels:
        raise SystemExit(
            f"The cached latents have {channels} channels, the transformer takes {config.in_channels}: precompute "
            "the cache with the VAE you train with (precompute_embeddings.py --vae)."
        )
    if width != config.caption_channels:
        raise SystemExit(
            f"The cached caption embeddings have width {width}, the transformer takes {config.caption_channels}: "
            "precompute the cache with this pipeline's text encoder."
        )


def shard_problem(path: Path, expected_rows: int) -> str | None:
    """Why a finished shard cannot be trained on (missing, unreadable, other row count than written), or None."""
    if not path.is_file():
        return "missing"
    try:
        rows = pyarrow.parquet.read_metadata(path).num_rows
    except (OSError, pyarrow.ArrowException) as error:
        return f"not a readable parquet file ({error})"
    return None if rows == expected_rows else f"{rows} rows, {expected_rows} when written"


def shard_records(cache_dir: Path) -> dict[int, dict]:
    """{shard index: statistics} of the shards precompute finished (their readable `shard-N.parquet.json`)."""
    records = {}
    for path in cache_dir.glob(SHARD_GLOB + ".json"):
        try:
            records[shard_index(path.name)] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # an unfinished record: the shard counts as not written
    return records


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
    caches written by `precompute_embeddings`; several caches are mixed by `mix_sources`."""
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
    return mix_sources(sources, probabilities, seed)


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
    return mix_sources(sources, probabilities, seed)


def _load_cache(cache_dir: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    """The cache's shards as one dataset, after checking each shard precompute finished is there and readable."""
    records = shard_records(Path(cache_dir))
    files = [Path(cache_dir) / shard_name(index) for index, stats in sorted(records.items()) if stats["rows"]]
    if not files:
        raise FileNotFoundError(
            f"No precomputed shards in {cache_dir}; run examples/precompute_embeddings.py --output_dir {cache_dir} first."
        )
    damaged = [
        f"{path}: {problem}" for path in files if (problem := shard_problem(path, records[shard_index(path.name)]["rows"]))
    ]
    damaged += [
        f"{path}: no {path.name}.json (its write did not finish)"
        for path in sorted(Path(cache_dir).glob(SHARD_GLOB)) if shard_index(path.name) not in records
    ]
    if damaged:
        raise SystemExit(
            f"The cache {cache_dir} has missing or damaged shards:\n  " + "\n  ".join(damaged) + "\nRerun the command "
            "that wrote it (examples/precompute_embeddings.py, or train_lora.py for its --output_dir/cache) with the "
            "same arguments: it re-encodes only the missing or damaged shards."
        )
    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=streaming)


def _select_training_columns(dataset, renames: dict[str, str]):
    """The latent columns (renamed) and the caption embeddings (and mask, and the second caption's, if cached)."""
    captions = ("prompt_embeds", "prompt_attention_mask")
    optional = ("prompt_attention_mask", *map(alt_caption_column, captions))
    keep = [*renames, "prompt_embeds"] + [c for c in optional if c in dataset.column_names]
    dataset = dataset.select_columns(keep)
    for old, new in renames.items():
        dataset = dataset.rename_column(old, new)
    return dataset


def mix_sources(sources: list, probabilities: list[float] | None, seed: int):
    """One training dataset from several caches. Without `probabilities`: their union, each row once per epoch (the
    trainer's sampler shuffles it; the original trains on the union of its data streams). With them: rows drawn
    from source i with probability `probabilities[i]` until every source has been seen (`interleave_datasets`,
    "all_exhausted"), so a small source is repeated as often as its probability asks."""
    if probabilities is not None and len(probabilities) != len(sources):
        raise ValueError(f"Got {len(probabilities)} probabilities for {len(sources)} datasets; give one per dataset.")
    if len({has_alt_captions(source) for source in sources}) > 1:
        raise ValueError(
            "Some of the caches hold two captions per image and some one: encode them all with the same number of "
            "--caption_column names."
        )
    if len(sources) == 1:
        mixed = sources[0]
    elif probabilities is None:
        mixed = datasets.concatenate_datasets(sources)
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


# Caches whose rows take up to this much as tensors are held in memory: formatting rows from Arrow one at a time
# costs a small model about 13 % of its step (benchmarks/bench_training_loop.py).
IN_MEMORY_ROWS_MAX_BYTES = 2 * 1024**3


class InMemoryRows(torch.utils.data.Dataset):
    """A torch-formatted `datasets.Dataset` of fixed-shape columns, formatted once into whole-column tensors: row i
    is `dataset[i]` (same values, dtypes and shapes) without per-row Arrow decoding."""

    def __init__(self, dataset: datasets.Dataset):
        self.columns = dataset[:]
        self.column_names = list(self.columns)
        self.num_rows = len(dataset)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: column[index] for name, column in self.columns.items()}


def in_memory_rows(dataset, max_bytes: int = IN_MEMORY_ROWS_MAX_BYTES):
    """`InMemoryRows` of a map-style dataset whose rows take at most `max_bytes` as tensors; a larger or streamed
    one as it is (read from its memory-mapped or streamed shards)."""
    if not isinstance(dataset, datasets.Dataset):
        return dataset
    row_bytes = sum(value.nbytes for value in dataset[0].values())
    return InMemoryRows(dataset) if row_bytes * len(dataset) <= max_bytes else dataset


def load_training_data(args, resolution: int, pipeline, transformer, cache_dirs: list[str]) -> tuple:
    """(dataset, collate_fn, batch_sampler) for `DiffusionTrainer.prepare` from a script's data flags: square
    latents of `resolution` px, or with `--aspect_ratio_buckets` bucketed latents batched one bucket at a time, read
    from `cache_dirs` (`precompute.training_caches`). Each must have been encoded by `pipeline`'s VAE and text
    encoder, in the shapes `transformer` takes: checked here, before any step. Square latents of a cache up to
    `IN_MEMORY_ROWS_MAX_BYTES` come as `InMemoryRows`."""
    for cache_dir in cache_dirs:
        check_cache_matches(cache_dir, pipeline)
    if getattr(args, "aspect_ratio_buckets", None) is None:
        dataset = load_precomputed(
            cache_dirs, resolution, args.precomputed_dataset_probabilities, args.streaming, args.seed
        )
        check_row_fits(next(iter(dataset)), transformer)
        return in_memory_rows(dataset), None, None
    dataset = load_precomputed_buckets(
        cache_dirs, args.aspect_ratio_buckets, args.precomputed_dataset_probabilities, args.seed
    )
    check_row_fits(dataset[0], transformer)
    sampler = AspectRatioBucketBatchSampler(latent_shape_buckets(dataset), args.train_batch_size, args.seed)
    if len(sampler) == 0:
        sizes = {"x".join(map(str, shape[1:])): rows for shape, rows in sampler.bucket_sizes().items()}
        raise SystemExit(
            f"No aspect-ratio bucket holds a full batch of {args.train_batch_size} rows (rows per latent size: "
            f"{sizes}); lower --train_batch_size or add data."
        )
    return dataset, collate_bucketed, sampler
