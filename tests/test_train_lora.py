"""examples/train_lora.py end to end for every pipeline family: image folder -> cache -> LoRA training (Accelerate)
-> pytorch_lora_weights.safetensors that loads into a fresh pipeline; resuming; argument checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import PIPELINE_FAMILIES, tiny_family_call_kwargs, tiny_family_pipeline
from PIL import Image
from safetensors.torch import load_file
from test_train_microdit import load_example, run_script

import diffusers_microdit  # noqa: F401

LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    """Per family: a saved tiny pipeline and an image folder (metadata.jsonl captions) at its native size."""
    root = tmp_path_factory.mktemp("lora")
    found = {}
    for family in PIPELINE_FAMILIES:
        pipe = tiny_family_pipeline(family)
        pipe.save_pretrained(root / family)
        size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        images = root / f"{family}-images"
        images.mkdir()
        rng = np.random.default_rng(0)
        rows = []
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(images / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "text": f"an origami crane number {i}"})
        (images / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
        found[family] = {"base": root / family, "images": images}
    return found


def lora_args(base: dict, output_dir, *extra) -> list:
    return [
        "--init_from", base["base"], "--train_data_dir", base["images"], "--output_dir", output_dir,
        "--train_batch_size", 2, "--rank", 4, "--learning_rate", 5e-2, "--report_to", "none", "--seed", 1, *extra,
    ]


def sample(pipe, family: str) -> np.ndarray:
    kwargs = {**tiny_family_call_kwargs(family), "generator": torch.Generator().manual_seed(0)}
    return pipe(**kwargs).images[0]


@pytest.mark.parametrize("family", PIPELINE_FAMILIES)
def test_lora_training_changes_outputs_and_reloads(family, bases, tmp_path):
    out = tmp_path / "lora"
    result = run_script("train_lora.py", *lora_args(bases[family], out, "--max_train_steps", 3))
    assert "LoRA rank 4" in result.stdout
    assert json.loads((out / "cache" / "precompute.json").read_text())["rows"] == 6
    weights = load_file(out / LORA_FILE)
    assert weights and all(key.startswith("transformer.") and "lora" in key for key in weights)
    card = (out / "README.md").read_text()
    assert "lora" in card and "license:" in card and "load_lora_weights" in card

    pipe = DiffusionPipeline.from_pretrained(bases[family]["base"])
    pipe.set_progress_bar_config(disable=True)
    base_image = sample(pipe, family)
    pipe.load_lora_weights(out)
    adapted = sample(pipe, family)
    assert np.abs(adapted - base_image).max() > 1e-3, "the trained LoRA changes nothing"

    fresh = DiffusionPipeline.from_pretrained(bases[family]["base"])
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(out)
    np.testing.assert_array_equal(sample(fresh, family), adapted)


def test_resumed_lora_run_matches_uninterrupted_run(bases, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--checkpointing_steps", 2)
    run_script("train_lora.py", *lora_args(bases["microdit"], straight, *common, "--max_train_steps", 4))
    run_script("train_lora.py", *lora_args(bases["microdit"], resumed, *common, "--max_train_steps", 2))
    assert (resumed / "checkpoint-2" / "transformer" / "adapter_model.safetensors").is_file()
    result = run_script(
        "train_lora.py",
        *lora_args(bases["microdit"], resumed, *common, "--max_train_steps", 4, "--resume_from_checkpoint", "latest"),
    )
    assert "Resuming from checkpoint checkpoint-2" in result.stdout
    expected, got = load_file(straight / LORA_FILE), load_file(resumed / LORA_FILE)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--rank", 0), "--rank must be >= 1"),
        (("--use_ema",), "--use_ema does not apply to LoRA"),
        (("--precomputed_dataset", "."), "not both"),
        (("--caption_dropout", 1.5), "--caption_dropout must be in [0, 1)"),
    ],
)
def test_bad_arguments_are_refused_with_a_reason(bases, tmp_path, extra, message):
    script = load_example("train_lora")
    with pytest.raises(SystemExit) as error:
        script.parse_args(list(map(str, lora_args(bases["microdit"], tmp_path / "out", *extra))))
    assert message in str(error.value)


def test_unknown_target_modules_fail_before_training(bases, tmp_path):
    result = run_script(
        "train_lora.py", *lora_args(bases["microdit"], tmp_path / "out", "--lora_target_modules", "no_such_layer"),
        check=False,
    )
    assert result.returncode != 0 and "--lora_target_modules" in result.stderr
