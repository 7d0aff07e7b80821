"""Fixtures of the training tests: a tiny MicroDiT workspace (base pipeline, raw data, precomputed cache)."""

import json

import pytest
from helpers import run_script, tiny_pipeline

from diffusers_microdit.data.shapes import build_shapes_dataset

TINY_CONFIG = dict(
    hidden_size=32, num_layers=3, attention_head_dim=8, multiple_of=16, patch_mixer_layers=2,
    patch_mixer_hidden_size=24, num_experts=4,
)


@pytest.fixture(scope="module")
def microdit_workspace(tmp_path_factory) -> dict:
    """A tiny base pipeline, a 48-image shapes dataset and its precomputed cache at 32 px (3 shards of 16 rows);
    train on it with `helpers.microdit_train_args`."""
    root = tmp_path_factory.mktemp("train")
    tiny_pipeline().save_pretrained(root / "base")
    build_shapes_dataset(48, size=32, seed=0).save_to_disk(root / "shapes")
    (root / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    run_script(
        "precompute_embeddings.py", "--pretrained_model_name_or_path", root / "base", "--dataset_name",
        root / "shapes", "--resolutions", 32, "--output_dir", root / "cache", "--shard_size", 16, "--batch_size", 8,
    )
    return {"root": root, "base": root / "base", "cache": root / "cache", "config": root / "tiny.json"}
