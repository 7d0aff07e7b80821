"""Runs that would go wrong are refused or survive: bad numeric flags, caches of another encoder or other data,
damaged cache shards, damaged checkpoints, resuming with another batch, two runs into one folder, a stale lock of a
killed run, a loss that turns non-finite, a damaged local pipeline folder, a Hub push that cannot happen."""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import subprocess
import sys

import datasets
import pytest
import torch
from fake_hub import hub_env
from helpers import ENV, final_weights, load_example, microdit_train_args, run_script, tiny_clip_text_encoder, tiny_pipeline
from PIL import Image

from diffusers_microdit.data.shapes import build_shapes_dataset
from diffusers_microdit.training.precompute import precompute_embeddings
from diffusers_microdit.training.run_lock import LOCK_NAME, OutputDirLock
from diffusers_microdit.training.sources import ImagePreparation

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread

TRAIN_SCRIPTS = ("train_microdit", "train_pixart_kv", "train_lit_kd", "train_lora")
STEADY = ("--lr_scheduler", "constant", "--checkpointing_steps", 2)  # a schedule that does not depend on the length


def refusal(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, f"the run was not refused:\n{result.stdout[-2000:]}"
    return result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------- numeric flags


def test_bad_numeric_flags_are_refused_in_one_message(microdit_workspace, tmp_path):
    bad = {
        "--learning_rate": ("inf", "--learning_rate must be a finite number"),
        "--max_grad_norm": ("-1", "--max_grad_norm must be > 0"),
        "--lr_warmup_steps": ("-5", "--lr_warmup_steps must be >= 0"),
        "--p_std": ("-1", "--p_std must be > 0"),
        "--adam_beta1": ("2", "--adam_beta1 must be in [0, 1)"),
        "--adam_epsilon": ("0", "--adam_epsilon must be > 0"),
        "--ema_decay": ("1", "--ema_decay must be in (0, 1)"),
        "--gpu_hour_cost": ("nan", "--gpu_hour_cost must be a finite number"),
        "--mask_ratio": ("1.5", "--mask_ratio must be in [0, 1)"),  # the script's own flag, in the same message
    }
    flags = [item for flag, (value, _) in bad.items() for item in (flag, value)]
    with pytest.raises(SystemExit) as refused:
        load_example("train_microdit").parse_args(list(map(str, microdit_train_args(microdit_workspace, tmp_path, *flags))))
    for _, message in bad.values():
        assert message in str(refused.value)


@pytest.mark.parametrize("script", TRAIN_SCRIPTS)
def test_every_training_script_checks_numbers(script, microdit_workspace, tmp_path):
    common = ["--init_from", str(tmp_path), "--precomputed_dataset", str(microdit_workspace["cache"]), "--output_dir", str(tmp_path)]
    parse_args = load_example(script).parse_args
    with pytest.raises(SystemExit, match=r"--learning_rate must be a finite number[\s\S]*--adam_beta2 must be in"):
        parse_args([*common, "--learning_rate", "nan", "--adam_beta2", "1"])
    assert parse_args([*common, "--max_grad_norm", "none"]).max_grad_norm is None  # clipping off, explicitly


# ------------------------------------------------------------------------------------------------ caches


def test_a_cache_of_another_text_encoder_is_refused_before_the_first_step(microdit_workspace, tmp_path):
    other = tiny_pipeline()
    other.text_encoder = tiny_clip_text_encoder(hidden_size=48, vocab_size=len(other.tokenizer))
    other.save_pretrained(tmp_path / "other")
    args = microdit_train_args(microdit_workspace, tmp_path / "run", "--max_train_steps", 1)
    args[args.index("--init_from") + 1] = tmp_path / "other"
    output = refusal(run_script("train_microdit.py", *args, check=False))
    assert "encoded with another VAE or text encoder" in output
    assert "text_encoder.hidden_size: 32 in the cache, 48 here" in output
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_damaged_and_missing_shards_are_named_and_precompute_repairs_them(microdit_workspace, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(microdit_workspace["cache"], cache)
    truncated, deleted = cache / "shard-00001.parquet", cache / "shard-00002.parquet"
    original = {path: path.read_bytes() for path in (truncated, deleted)}
    truncated.write_bytes(original[truncated][:100])
    deleted.unlink()
    args = microdit_train_args(microdit_workspace, tmp_path / "run", "--max_train_steps", 1)
    args[args.index("--precomputed_dataset") + 1] = cache
    output = refusal(run_script("train_microdit.py", *args, check=False))
    assert f"{truncated}: not a readable parquet file" in output and f"{deleted}: missing" in output
    assert "re-encodes only the missing or damaged shards" in output

    run_script(
        "precompute_embeddings.py", "--pretrained_model_name_or_path", microdit_workspace["base"], "--dataset_name",
        microdit_workspace["root"] / "shapes", "--resolutions", 32, "--output_dir", cache, "--shard_size", 16,
        "--batch_size", 8,
    )
    assert all(path.read_bytes() == data for path, data in original.items())


def test_a_rerun_on_other_data_never_keeps_the_old_rows(tmp_path):
    pipe, cache = tiny_pipeline(), tmp_path / "cache"
    first, second = build_shapes_dataset(48, size=32, seed=0), build_shapes_dataset(20, size=32, seed=1)
    precompute_embeddings(pipe, first, cache, [32], shard_size=16, batch_size=8, source_name="first")
    info = precompute_embeddings(pipe, second, cache, [32], shard_size=16, batch_size=8, source_name="second")
    cached = datasets.load_dataset("parquet", data_files=sorted(map(str, cache.glob("shard-*.parquet"))), split="train")
    assert cached["caption"] == second["text"]  # every shard re-encoded from the new rows, the third one gone
    assert (info["source"], info["source_rows"], info["shards"]) == ("second", 20, 2)


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def straight_run(microdit_workspace, tmp_path_factory):
    """Final weights of an uninterrupted 6-step run."""
    out = tmp_path_factory.mktemp("straight")
    run_script("train_microdit.py", *microdit_train_args(microdit_workspace, out, "--max_train_steps", 6, *STEADY))
    return final_weights(out)


def test_a_damaged_latest_checkpoint_is_skipped_and_the_run_resumes_exactly(microdit_workspace, straight_run, tmp_path):
    out = tmp_path / "run"
    run_script("train_microdit.py", *microdit_train_args(microdit_workspace, out, "--max_train_steps", 4, *STEADY))
    weights = out / "checkpoint-4" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    (out / "checkpoint-999").mkdir()  # a stray folder without a manifest
    resumed = microdit_train_args(microdit_workspace, out, "--max_train_steps", 6, *STEADY, "--resume_from_checkpoint", "latest")
    output = run_script("train_microdit.py", *resumed)
    log = output.stdout + output.stderr
    assert "Skipping damaged checkpoint checkpoint-999: checkpoint-999 has no manifest.json" in log
    assert re.search(r"Skipping damaged checkpoint checkpoint-4: .*diffusion_pytorch_model.safetensors: \d+ bytes", log)
    assert "Resuming from checkpoint checkpoint-2" in log
    assert len(list(out.glob("checkpoint-4.damaged-*"))) == 1  # kept for inspection, not deleted
    resumed_weights = final_weights(out)
    assert all(torch.equal(resumed_weights[key], value) for key, value in straight_run.items())

    # Every checkpoint damaged: the error says so and lists them.
    for manifest in out.glob("checkpoint-*/manifest.json"):
        manifest.write_text("{")
    output = refusal(run_script("train_microdit.py", *resumed, check=False))
    assert "No checkpoint in" in output and "checkpoint-2:" in output and "checkpoint-6:" in output


def test_resuming_with_another_batch_size_or_a_damaged_explicit_checkpoint_is_refused(microdit_workspace, tmp_path):
    out = tmp_path / "run"
    run_script("train_microdit.py", *microdit_train_args(microdit_workspace, out, "--max_train_steps", 2, *STEADY))
    resume = ("--max_train_steps", 4, *STEADY, "--resume_from_checkpoint", out / "checkpoint-2")
    output = refusal(run_script("train_microdit.py", *microdit_train_args(microdit_workspace, out, *resume, "--train_batch_size", 8), check=False))
    assert "global_batch_size 4 -> 8" in output

    optimizer = out / "checkpoint-2" / "optimizer.bin"
    optimizer.write_bytes(b"\0" * optimizer.stat().st_size)  # same size, other bytes
    output = refusal(run_script("train_microdit.py", *microdit_train_args(microdit_workspace, out, *resume), check=False))
    assert "is damaged" in output and "optimizer.bin: contents differ" in output


# ------------------------------------------------------------------------------------------------ output folder lock


def hold_lock(folder) -> subprocess.Popen:
    """Another process that holds the lock of `folder` until killed."""
    code = (
        "import sys, time; from diffusers_microdit.training.run_lock import OutputDirLock; "
        "OutputDirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_into_a_busy_output_dir_is_refused(microdit_workspace, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = hold_lock(out)
    try:
        output = refusal(run_script("train_microdit.py", *microdit_train_args(microdit_workspace, out, "--max_train_steps", 1), check=False))
    finally:
        holder.kill()
        holder.wait()
    assert f"is in use by another training run (pid {holder.pid}" in output
    assert not (out / "pipeline").exists()


def test_the_stale_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    holder = hold_lock(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    lock = OutputDirLock(tmp_path)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert f"the run that held it (pid {holder.pid}) is no longer running" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] != holder.pid
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------------ training and loading


def test_a_non_finite_loss_stops_the_run_and_keeps_the_good_checkpoints(microdit_workspace, tmp_path):
    out = tmp_path / "run"
    args = ("--max_train_steps", 6, "--checkpointing_steps", 1, "--learning_rate", 1e30, "--max_grad_norm", "none")
    output = refusal(run_script("train_microdit.py", *microdit_train_args(microdit_workspace, out, *args), check=False))
    stopped = re.search(r"Training stopped at step (\d+): (the loss is \w+|weights are non-finite)", output)
    assert stopped, output[-2000:]
    assert "Nothing of this step was saved" in output and not (out / "pipeline").exists()
    assert all(int(p.name.split("-")[1]) < int(stopped.group(1)) for p in out.glob("checkpoint-*"))


def test_a_damaged_local_pipeline_folder_names_the_file(microdit_workspace, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(microdit_workspace["base"], base)
    (base / "vae" / "config.json").write_text('{"in_channels": ')
    shutil.rmtree(base / "scheduler")
    args = microdit_train_args(microdit_workspace, tmp_path / "run")
    args[args.index("--init_from") + 1] = base
    with pytest.raises(SystemExit) as refused:
        load_example("train_microdit").parse_args(list(map(str, args)))
    message = str(refused.value)
    assert "is a local folder with damaged or missing files" in message
    assert f"{base / 'vae' / 'config.json'}: not valid JSON" in message
    assert f"{base / 'scheduler'}: missing" in message


def test_push_to_hub_fails_before_training_when_it_cannot_happen_and_pushes_at_the_end(
    microdit_workspace, tmp_path, fake_hub
):
    args = ("--max_train_steps", 1, "--push_to_hub", "--hub_model_id", "someone/tiny-run")
    offline = refusal(run_script("train_microdit.py", *microdit_train_args(microdit_workspace, tmp_path / "a", *args), check=False))
    assert "--push_to_hub: Pushing to the Hub needs a connection, but HF_HUB_OFFLINE is set" in offline
    no_token = {key: value for key, value in hub_env(fake_hub, tmp_path).items() if key != "HF_TOKEN"}
    output = refusal(run_script("train_microdit.py", *microdit_train_args(microdit_workspace, tmp_path / "b", *args), check=False, env=no_token))
    assert "--push_to_hub: No Hugging Face token" in output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything was written

    run_script("train_microdit.py", *microdit_train_args(microdit_workspace, tmp_path / "c", *args), env=hub_env(fake_hub, tmp_path))
    pushed = fake_hub.repos["someone/tiny-run"]["files"]
    assert {"model_index.json", "README.md", "transformer/diffusion_pytorch_model.safetensors"} <= set(pushed)
    assert not any(name.startswith(("checkpoint-", "logs/", ".")) for name in pushed)


def test_small_images_are_dropped_and_counted_and_crops_and_flips_are_seeded(tmp_path):
    rows = [{"image": Image.new("RGB", (size, size + 8), "red"), "text": f"a red square {size}"} for size in (16, 24, 40, 48)]
    source = datasets.Dataset.from_list(rows)
    info = precompute_embeddings(
        tiny_pipeline(), source, tmp_path / "cache", [32], batch_size=2, images=ImagePreparation(min_image_size=32)
    )
    assert (info["rows"], info["skipped_small"]) == (2, 2)

    images = ImagePreparation(center_crop=False, random_flip=True)
    draws = [images.crop_options(torch.Generator().manual_seed(seed)) for seed in range(20)]
    assert len({d["offset"] for d in draws}) == 20 and {d["flip"] for d in draws} == {True, False}
    assert draws[3] == images.crop_options(torch.Generator().manual_seed(3))  # the same when a shard is redone
    assert ImagePreparation().crop_options(torch.Generator())["offset"] == (0.5, 0.5)
