"""examples/train_lora.py end to end for every pipeline family: image folder -> cache -> LoRA training (Accelerate)
-> pytorch_lora_weights.safetensors that loads into a fresh pipeline; resuming; argument checks."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import PIPELINE_FAMILIES, load_example, run_script, tiny_family_call_kwargs, tiny_family_pipeline
from PIL import Image
from safetensors.torch import load_file

import diffusers_microdit  # noqa: F401
from diffusers_microdit.training.lora import LoraTrainer, add_lora_adapter

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread

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
    (cache,) = (out / "cache").iterdir()  # one cache, named by the source and its encoding
    assert json.loads((cache / "precompute.json").read_text())["rows"] == 6
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
    assert (resumed / "checkpoint-2" / LORA_FILE).is_file()
    result = run_script(
        "train_lora.py",
        *lora_args(bases["microdit"], resumed, *common, "--max_train_steps", 4, "--resume_from_checkpoint", "latest"),
    )
    assert "Resuming from checkpoint checkpoint-2" in result.stdout
    expected, got = load_file(straight / LORA_FILE), load_file(resumed / LORA_FILE)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def loaded_lora(base: dict, folder, family: str = "microdit"):
    """(image, peft config) of the base pipeline with the LoRA in `folder` loaded by `load_lora_weights`."""
    pipe = DiffusionPipeline.from_pretrained(base["base"])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(folder)
    (adapter,) = pipe.get_list_adapters()["transformer"]
    return sample(pipe, family), pipe.transformer.peft_config[adapter]


def test_checkpoints_are_loras_at_the_trained_strength(bases, tmp_path):
    """A checkpoint loads with `load_lora_weights` like a final adapter of as many steps, lora_alpha included, and
    resuming from one is exact."""
    two, one = tmp_path / "two", tmp_path / "one"
    base = bases["microdit"]
    common = ("--lora_alpha", 16, "--checkpointing_steps", 1)  # alpha != rank: a lost config would show
    run_script("train_lora.py", *lora_args(base, two, *common, "--max_train_steps", 2))
    run_script("train_lora.py", *lora_args(base, one, *common, "--max_train_steps", 1))

    checkpoint = two / "checkpoint-1"
    # The one weight file there is the LoRA (diffusers' weight-name guess picks it); no `transformer/` subfolder
    # to load at the wrong strength.
    assert sorted(path.name for path in checkpoint.iterdir() if path.suffix == ".safetensors") == [LORA_FILE]
    assert not (checkpoint / "transformer").exists()
    image, config = loaded_lora(base, checkpoint)
    final_image, final_config = loaded_lora(base, one)
    assert config.lora_alpha == final_config.lora_alpha == 16 and config.r == 4
    np.testing.assert_allclose(image, final_image, rtol=0, atol=1e-6)
    base_pipe = DiffusionPipeline.from_pretrained(base["base"])
    base_pipe.set_progress_bar_config(disable=True)
    assert np.abs(image - sample(base_pipe, "microdit")).max() > 1e-3, "the checkpoint's LoRA changes nothing"

    # Continue the finished 1-step run to 2 steps: it resumes from its own checkpoint-1.
    result = run_script(
        "train_lora.py", *lora_args(base, one, *common, "--max_train_steps", 2, "--resume_from_checkpoint", "latest")
    )
    assert "Resuming from checkpoint checkpoint-1" in result.stdout
    expected, got = load_file(two / LORA_FILE), load_file(one / LORA_FILE)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def lora_transformer(seed: int, rank: int = 4, alpha: float = 16):
    """A tiny MicroDiT transformer with a LoRA adapter added the way train_lora.py does, its weights random."""
    transformer = tiny_family_pipeline("microdit").transformer
    args = argparse.Namespace(rank=rank, lora_alpha=alpha, lora_dropout=0.0, lora_target_modules=None)
    add_lora_adapter(transformer, args, torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return transformer


def lora_weights(transformer) -> dict:
    return {name: param.detach().clone() for name, param in transformer.named_parameters() if "lora_" in name}


def test_checkpoint_adapter_round_trip_and_mismatch(tmp_path):
    """LoraTrainer's checkpoint hooks: the adapter is written once, at the checkpoint's top level with its config;
    resuming reads it back exactly, reads checkpoints of the earlier `transformer/adapter_model.safetensors` layout,
    and refuses an adapter of another alpha with the flag to change."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    trainer = LoraTrainer.__new__(LoraTrainer)  # the hooks need no Accelerator
    trained = lora_transformer(seed=0)
    checkpoint = tmp_path / "checkpoint-3"
    trainer.save_model_weights(trained, checkpoint / "transformer")
    assert sorted(path.name for path in checkpoint.iterdir()) == [LORA_FILE]

    resumed = lora_transformer(seed=1)
    trainer.load_model_weights(resumed, checkpoint / "transformer")
    expected = lora_weights(trained)
    for name, value in lora_weights(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)

    legacy = tmp_path / "checkpoint-4"
    (legacy / "transformer").mkdir(parents=True)
    save_file(get_peft_model_state_dict(trained), legacy / "transformer" / "adapter_model.safetensors")
    from_legacy = lora_transformer(seed=2)
    trainer.load_model_weights(from_legacy, legacy / "transformer")
    for name, value in lora_weights(from_legacy).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)

    with pytest.raises(RuntimeError, match="resume with --lora_alpha 16"):
        trainer.load_model_weights(lora_transformer(seed=3, alpha=8), checkpoint / "transformer")
    with pytest.raises(FileNotFoundError, match="holds no pytorch_lora_weights.safetensors"):
        trainer.load_model_weights(lora_transformer(seed=3), tmp_path / "checkpoint-5" / "transformer")


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--rank", 0), "--rank must be >= 1"),
        (("--use_ema",), "--use_ema does not apply to LoRA"),
        (("--precomputed_dataset", "."), "Give one of --dataset_name, --train_data_dir and --precomputed_dataset"),
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
