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
from helpers import ENV, REPO_ROOT, final_weights, load_example, microdit_train_args, run_script
from PIL import Image

import diffusers_microdit  # noqa: F401
from diffusers_microdit.training.trainer import list_checkpoints

def test_precompute_cache_contents(microdit_workspace):
    info = json.loads((microdit_workspace["cache"] / "precompute.json").read_text())
    assert {key: info[key] for key in ("rows", "skipped_corrupt", "skipped_no_caption", "shards", "resolutions")} == {
        "rows": 48, "skipped_corrupt": 0, "skipped_no_caption": 0, "shards": 3, "resolutions": [32]
    }
    assert info["source"] == str(microdit_workspace["root"] / "shapes") and info["source_rows"] == 48


def test_precompute_skips_corrupt_and_captionless_rows_and_resumes(microdit_workspace, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(6):
        Image.fromarray(np.full((40, 48, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a red circle {i}"})
    (folder / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # corrupt
    rows[4]["text"] = ""  # caption-less
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = ["--pretrained_model_name_or_path", microdit_workspace["base"], "--train_data_dir", folder, "--resolutions", 16, 32,
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
    assert result.returncode != 0 and "encoded with other settings (resolutions: [16, 32] in the cache, [24, 32] here" in result.stderr


def test_train_writes_loadable_pipeline(microdit_workspace, tmp_path):
    out = tmp_path / "run"
    result = run_script(
        "train_microdit.py",
        *microdit_train_args(microdit_workspace, out, "--max_train_steps", 3, "--checkpointing_steps", 2, "--use_ema",
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


def test_kill_and_resume_matches_uninterrupted_run(microdit_workspace, tmp_path):
    common = ("--max_train_steps", 8, "--checkpointing_steps", 2, "--checkpoints_total_limit", 2)
    run_script("train_microdit.py", *microdit_train_args(microdit_workspace, tmp_path / "straight", *common))

    killed = tmp_path / "killed"
    command = [sys.executable, str(REPO_ROOT / "examples" / "train_microdit.py"), *map(str, microdit_train_args(microdit_workspace, killed, *common))]
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

    result = run_script("train_microdit.py", *microdit_train_args(microdit_workspace, killed, *common, "--resume_from_checkpoint", "latest"))
    assert "Resuming from checkpoint checkpoint-" in result.stdout
    assert not (killed / "checkpoint-99.tmp").exists()
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(killed)
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
    history = json.loads((killed / "loss_history.json").read_text())
    assert history["steps"] == list(range(1, 9))


def test_two_process_ddp_matches_single_process(microdit_workspace, tmp_path):
    common = ("--max_train_steps", 3, "--checkpointing_steps", 100, "--lr_scheduler", "constant")
    run_script("train_microdit.py", *microdit_train_args(microdit_workspace, tmp_path / "single", *common))
    launcher = (
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
    )
    ddp_args = microdit_train_args(microdit_workspace, tmp_path / "ddp", *common)
    ddp_args[ddp_args.index("--train_batch_size") + 1] = 2  # 2 processes x 2 = the single run's batch of 4
    run_script("train_microdit.py", *ddp_args, launcher=launcher, env={**ENV, "ACCELERATE_USE_CPU": "1"})
    single, ddp = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-6, msg=name)


def test_naive_masking_and_resolution_change(microdit_workspace, tmp_path):
    """`--masking naive` trains; `--init_from` a 32-px run at 16 px rescales the grid and positions."""
    run_script("train_microdit.py", *microdit_train_args(microdit_workspace, tmp_path / "naive", "--max_train_steps", 1, "--masking", "naive"))
    cache16 = tmp_path / "cache16"
    run_script(
        "precompute_embeddings.py", "--pretrained_model_name_or_path", microdit_workspace["base"], "--dataset_name",
        microdit_workspace["root"] / "shapes", "--resolutions", 16, "--output_dir", cache16, "--max_samples", 8,
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
def test_bad_arguments_are_refused_with_a_reason(microdit_workspace, tmp_path, extra, message):
    parse_args = load_example("train_microdit").parse_args
    with pytest.raises(SystemExit, match=re.escape(message)):
        parse_args([*map(str, microdit_train_args(microdit_workspace, tmp_path / "x")), *extra])


def test_a_compiled_run_saves_and_resumes_to_the_uncompiled_result(microdit_workspace, tmp_path):
    """Checkpoint hooks unwrap `torch.compile`'s module (loading into an `OptimizedModule` by class used to crash).
    The eager dynamo backend keeps the test fast and the numbers those of the uncompiled model."""
    steady = ("--lr_scheduler", "constant", "--checkpointing_steps", 2)
    compiled = ("--torch_compile", "--torch_compile_backend", "eager")
    run_script("train_microdit.py", *microdit_train_args(microdit_workspace, tmp_path / "plain", "--max_train_steps", 4, *steady))
    out = tmp_path / "compiled"
    run_script("train_microdit.py", *microdit_train_args(microdit_workspace, out, "--max_train_steps", 2, *steady, *compiled))
    resumed = microdit_train_args(microdit_workspace, out, "--max_train_steps", 4, *steady, *compiled, "--resume_from_checkpoint", "latest")
    assert "Resuming from checkpoint checkpoint-2" in run_script("train_microdit.py", *resumed).stdout
    plain, compiled_weights = final_weights(tmp_path / "plain"), final_weights(out)
    for key, value in plain.items():
        torch.testing.assert_close(compiled_weights[key], value, rtol=0, atol=1e-6)


def test_two_process_precompute_writes_the_one_process_cache(microdit_workspace, tmp_path):
    launcher = (
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
    )
    cache = tmp_path / "cache"
    result = run_script(
        "precompute_embeddings.py", "--pretrained_model_name_or_path", microdit_workspace["base"], "--dataset_name",
        microdit_workspace["root"] / "shapes", "--resolutions", 32, "--output_dir", cache, "--shard_size", 16,
        "--batch_size", 8, launcher=launcher, env={**ENV, "ACCELERATE_USE_CPU": "1"},
    )
    assert "process 0:" in result.stdout and "process 1:" in result.stdout  # each process's own counts
    one_process = microdit_workspace["cache"]
    shards = sorted(path.name for path in one_process.glob("shard-*"))
    assert sorted(path.name for path in cache.glob("shard-*")) == shards  # shards 0, 2 by one process, 1 by the other
    for name in shards:
        assert (cache / name).read_bytes() == (one_process / name).read_bytes(), name
    assert json.loads((cache / "precompute.json").read_text()) == json.loads((one_process / "precompute.json").read_text())
