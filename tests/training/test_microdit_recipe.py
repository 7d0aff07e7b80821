"""The paper's four-stage MicroDiT recipe (examples/recipes/microdit_paper.json): its learning rates are the original's
at chosen steps, and the same recipe scaled down (tiny model, steps and sizes) runs end to end from raw data to a
pipeline that reloads in a fresh process."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import datasets
import pytest
import torch
from helpers import ENV, REPO_ROOT, load_example, run_script

from diffusers_microdit.training.trainer import build_lr_scheduler

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread
RECIPE = REPO_ROOT / "examples" / "recipes" / "microdit_paper.json"


def stage_args(microdit_workspace, tmp_path, index: int):
    """train_microdit.py's parsed arguments of one stage of the full-size recipe."""
    driver = load_example("train_microdit_recipe")
    args, _ = driver.parse_args(["--recipe", str(RECIPE), "--init_from", "x", "--output_dir", str(tmp_path)])
    name, _, flags = driver.recipe_stages(json.loads(RECIPE.read_text()), args)[index]
    argv = [part for flag in flags for part in flag if part != "--resume_optimizer_state"]
    common = ["--init_from", str(microdit_workspace["base"]), "--dataset_name", str(microdit_workspace["root"] / "shapes")]
    return load_example("train_microdit").parse_args([*common, "--output_dir", str(tmp_path / name), *argv])


def learning_rates(args, steps: list[int]) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = build_lr_scheduler(args, optimizer, args.max_train_steps, num_processes=1)
    return [args.learning_rate * scheduler.lr_lambdas[0](step) for step in steps]


def test_the_recipe_schedules_are_the_originals(microdit_workspace, tmp_path):
    # Stage 1: Composer's CosineAnnealingWithWarmupScheduler(t_warmup=2500ba, alpha_f=0.33) over 250K batches.
    stage1 = stage_args(microdit_workspace, tmp_path, 0)
    steps = [0, 1, 1250, 2500, 60_000, 126_250, 249_999]

    def composer(t):
        if t < 2500:
            return 2.4e-4 * t / 2500
        return 2.4e-4 * (0.33 + 0.67 * 0.5 * (1 + math.cos(math.pi * (t - 2500) / (250_000 - 2500))))

    assert learning_rates(stage1, steps) == pytest.approx([composer(t) for t in steps], rel=1e-9, abs=1e-15)
    assert learning_rates(stage1, [126_250])[0] == pytest.approx(2.4e-4 * (0.33 + 0.67 / 2))  # half-way down

    # Stage 3: ConstantWithWarmupScheduler(t_warmup=500ba) at 8e-5; stages 2 and 4 constant 8e-5.
    stage3 = stage_args(microdit_workspace, tmp_path, 2)
    assert learning_rates(stage3, [0, 250, 500, 49_999]) == pytest.approx([0, 4e-5, 8e-5, 8e-5])
    for index in (1, 3):
        assert learning_rates(stage_args(microdit_workspace, tmp_path, index), [0, 1000]) == pytest.approx([8e-5, 8e-5])
    # Global batch 2048 on 8 GPUs: 256 x 1, 64 x 4, 32 x 8, 16 x 16 (per-device batch x accumulation).
    assert [stage_args(microdit_workspace, tmp_path, i).train_batch_size for i in range(4)] == [256, 64, 32, 16]


def test_the_scaled_down_recipe_runs_from_raw_data_to_a_reloadable_pipeline(microdit_workspace, tmp_path):
    images = tmp_path / "images"  # a raw image folder with metadata.jsonl captions, as a user brings one
    images.mkdir()
    rows = datasets.load_from_disk(microdit_workspace["root"] / "shapes")
    for index, row in enumerate(rows):
        row["image"].save(images / f"{index:03d}.png")
    (images / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{index:03d}.png", "text": row["text"]}) for index, row in enumerate(rows))
    )
    out = tmp_path / "runs"
    names = ("stage1_256px_masked", "stage2_256px_unmasked", "stage3_512px_masked", "stage4_512px_unmasked")
    result = run_script(
        "train_microdit_recipe.py", "--recipe", RECIPE, "--init_from", microdit_workspace["base"], "--output_dir", out,
        "--steps_scale", 0.0002, "--resolution_scale", 0.0625,  # 50 / 6 / 10 / 1 steps at 16 px, then 32 px
        "--transformer_config", microdit_workspace["config"],
        "--train_data_dir", images,
        "--global_batch_size", 8, "--train_batch_size", 4, "--checkpointing_steps", 25, "--report_to", "none",
    )
    stages = [json.loads((out / name / "pipeline" / "transformer" / "config.json").read_text()) for name in names]
    # 16 px -> 32 px: the latent grid doubles and so does the position interpolation (the original's 1 -> 2).
    assert [c["sample_size"] for c in stages] == [stages[0]["sample_size"]] * 2 + [2 * stages[0]["sample_size"]] * 2
    assert stages[2]["pos_interp_scale"] == 2 * stages[1]["pos_interp_scale"]
    assert len(list((out / "cache").iterdir())) == 2  # one cache per resolution, shared by its two stages
    histories = [json.loads((out / name / "loss_history.json").read_text())["steps"] for name in names]
    assert [h[-1] for h in histories] == [50, 6, 10, 1]
    # Stages 2 and 4 continue the optimizer of the stage before (its last checkpoint); stage 3 starts a fresh one.
    assert f"Optimizer state from {out / names[0] / 'checkpoint-50'} (step 50)" in result.stdout
    assert f"Optimizer state from {out / names[2] / 'checkpoint-10'} (step 10)" in result.stdout
    assert result.stdout.count("Optimizer state from") == 2

    code = (
        "import sys, torch, diffusers_microdit; from diffusers import DiffusionPipeline; "
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1]); "
        "image = pipe('a red circle', num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]; "
        "print(type(pipe).__name__, image.size)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(out / "stage4_512px_unmasked" / "pipeline")],
        capture_output=True, text=True, env=ENV, check=True,
    )
    assert result.stdout.split()[-3:] == ["MicroDiTPipeline", "(32,", "32)"]
