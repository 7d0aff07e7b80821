"""End to end: precompute -> train (Accelerate) -> pipeline folder -> reload; kill/resume and 2-process DDP
equivalence; corrupt and caption-less rows in the precompute step."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import ENV, REPO_ROOT, final_weights, load_example, run_script, tiny_pipeline
from PIL import Image

import diffusers_microdit  # noqa: F401
from diffusers_microdit.data.shapes import build_shapes_dataset
from diffusers_microdit.training.trainer import list_checkpoints

TINY_CONFIG = dict(
    hidden_size=32, num_layers=3, attention_head_dim=8, multiple_of=16, patch_mixer_layers=2,
    patch_mixer_hidden_size=24, num_experts=4,
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A tiny base pipeline, a 48-image shapes dataset and its precomputed cache at 32 px."""
    root = tmp_path_factory.mktemp("train")
    tiny_pipeline().save_pretrained(root / "base")
    build_shapes_dataset(48, size=32, seed=0).save_to_disk(root / "shapes")
    (root / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    run_script(
        "precompute_embeddings.py", "--pretrained_model_name_or_path", root / "base", "--dataset_name",
        root / "shapes", "--resolutions", 32, "--output_dir", root / "cache", "--shard_size", 16, "--batch_size", 8,
    )
    return {"root": root, "base": root / "base", "cache": root / "cache", "config": root / "tiny.json"}


def train_args(workspace, output_dir, *extra) -> list:
    return [
        "--init_from", workspace["base"], "--transformer_config", workspace["config"],
        "--precomputed_dataset", workspace["cache"], "--output_dir", output_dir, "--train_batch_size", 4,
        "--report_to", "none", "--seed", 3, *extra,
    ]


def test_precompute_cache_contents(workspace):
    info = json.loads((workspace["cache"] / "precompute.json").read_text())
    assert info == {"rows": 48, "skipped_corrupt": 0, "skipped_no_caption": 0, "shards": 3, "resolutions": [32]}


def test_precompute_skips_corrupt_and_captionless_rows_and_resumes(workspace, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(6):
        Image.fromarray(np.full((40, 48, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a red circle {i}"})
    (folder / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # corrupt
    rows[4]["text"] = ""  # caption-less
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = ["--pretrained_model_name_or_path", workspace["base"], "--train_data_dir", folder, "--resolutions", 16, 32,
            "--output_dir", tmp_path / "cache", "--shard_size", 3, "--batch_size", 2]
    run_script("precompute_embeddings.py", *args)
    info = json.loads((tmp_path / "cache" / "precompute.json").read_text())
    assert (info["rows"], info["skipped_corrupt"], info["skipped_no_caption"], info["shards"]) == (4, 1, 1, 2)

    # Resuming: a finished shard is kept as is, a missing one is redone identically.
    first, second = (tmp_path / "cache" / f"shard-0000{i}.parquet" for i in (0, 1))
    first_mtime, second_bytes = first.stat().st_mtime_ns, second.read_bytes()
    second.unlink()
    (tmp_path / "cache" / "shard-00001.parquet.json").unlink()
    run_script("precompute_embeddings.py", *args)
    assert first.stat().st_mtime_ns == first_mtime
    assert second.read_bytes() == second_bytes

    # Adding to a cache encoded with other settings would mix shards that do not match: refused.
    other = [value if value != 16 else 24 for value in args]
    result = run_script("precompute_embeddings.py", *other, check=False)
    assert result.returncode != 0 and "encoded with other settings (resolutions differ" in result.stderr


def test_train_writes_loadable_pipeline(workspace, tmp_path):
    out = tmp_path / "run"
    result = run_script(
        "train_microdit.py",
        *train_args(workspace, out, "--max_train_steps", 3, "--checkpointing_steps", 2, "--use_ema",
                    "--validation_prompts", "a red circle", "two blue squares", "--validation_steps", 2,
                    "--num_validation_inference_steps", 2, "--gradient_checkpointing"),
    )
    assert "active per token" in result.stdout and "GFLOP" in result.stdout and "images/s" in result.stdout
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    assert (out / "loss.png").exists() and (out / "validation" / "step-000002.png").exists()
    assert len(json.loads((out / "loss_history.json").read_text())["losses"]) == 3

    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    assert type(pipe).__name__ == "MicroDiTPipeline"
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)  # generates at the trained resolution by default


def test_kill_and_resume_matches_uninterrupted_run(workspace, tmp_path):
    common = ("--max_train_steps", 8, "--checkpointing_steps", 2, "--checkpoints_total_limit", 2)
    run_script("train_microdit.py", *train_args(workspace, tmp_path / "straight", *common))

    killed = tmp_path / "killed"
    command = [sys.executable, str(REPO_ROOT / "examples" / "train_microdit.py"), *map(str, train_args(workspace, killed, *common))]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.time() + 300
        while not (killed / "checkpoint-4").exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "pipeline").exists()
    # A checkpoint write interrupted by a kill leaves only a `.tmp` folder, which is never picked as "latest".
    (killed / "checkpoint-99.tmp").mkdir()
    (killed / "checkpoint-99.tmp" / "optimizer.bin").write_bytes(b"truncated")

    result = run_script("train_microdit.py", *train_args(workspace, killed, *common, "--resume_from_checkpoint", "latest"))
    assert "Resuming from checkpoint checkpoint-" in result.stdout
    assert not (killed / "checkpoint-99.tmp").exists()
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(killed)
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
    history = json.loads((killed / "loss_history.json").read_text())
    assert history["steps"] == list(range(1, 9))


def test_two_process_ddp_matches_single_process(workspace, tmp_path):
    common = ("--max_train_steps", 3, "--checkpointing_steps", 100, "--lr_scheduler", "constant")
    run_script("train_microdit.py", *train_args(workspace, tmp_path / "single", *common))
    launcher = (
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
    )
    ddp_args = train_args(workspace, tmp_path / "ddp", *common)
    ddp_args[ddp_args.index("--train_batch_size") + 1] = 2  # 2 processes x 2 = the single run's batch of 4
    run_script("train_microdit.py", *ddp_args, launcher=launcher, env={**ENV, "ACCELERATE_USE_CPU": "1"})
    single, ddp = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-6, msg=name)


def test_naive_masking_and_resolution_change(workspace, tmp_path):
    """`--masking naive` trains; `--init_from` a 32-px run at 16 px rescales the grid and positions."""
    run_script("train_microdit.py", *train_args(workspace, tmp_path / "naive", "--max_train_steps", 1, "--masking", "naive"))
    cache16 = tmp_path / "cache16"
    run_script(
        "precompute_embeddings.py", "--pretrained_model_name_or_path", workspace["base"], "--dataset_name",
        workspace["root"] / "shapes", "--resolutions", 16, "--output_dir", cache16, "--max_samples", 8,
    )
    stage2 = tmp_path / "stage2"
    run_script(
        "train_microdit.py", "--init_from", tmp_path / "naive", "--precomputed_dataset", cache16, "--resolution", 16,
        "--mask_ratio", 0, "--output_dir", stage2, "--max_train_steps", 1, "--report_to", "none",
        "--train_batch_size", 4,
    )
    config = json.loads((stage2 / "pipeline" / "transformer" / "config.json").read_text())
    assert (config["sample_size"], config["pos_interp_scale"]) == (8, 0.5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--mask_ratio", "1.0"), "--mask_ratio must be in [0, 1)"),
        (("--transformer_config", "nope"), "neither a preset"),
        (("--train_batch_size", "0"), "--train_batch_size must be >= 1"),
        (("--precomputed_dataset_probabilities", "0.5", "0.2"), "one --precomputed_dataset_probabilities value"),
        (("--resume_from_checkpoint", "/no/such/checkpoint"), "is not a folder"),
    ],
)
def test_bad_arguments_are_refused_with_a_reason(workspace, tmp_path, extra, message):
    parse_args = load_example("train_microdit").parse_args
    with pytest.raises(SystemExit, match=re.escape(message)):
        parse_args([*map(str, train_args(workspace, tmp_path / "x")), *extra])
