"""Training budgets (--max_train_minutes, --max_train_budget_usd): the planned step count, its LR schedule, kill +
resume of a budgeted run, calibration leaving no trace, and the flags in every training script. Runs are in-process
so that the measured step time can be fixed (`calibrate_step_seconds` patched) and the plans are deterministic."""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import pytest
import torch
from helpers import final_weights, load_example, microdit_train_args

from diffusers_microdit.integrity import read_manifest
from diffusers_microdit.training import trainer as trainer_module
from diffusers_microdit.training.budget import (
    CALIBRATION_TIMED_STEPS,
    CALIBRATION_WARMUP_STEPS,
    MARGIN,
    BudgetPlan,
    budget_seconds,
    calibrate_step_seconds,
    plan_steps,
)
from diffusers_microdit.training.cost import CostMeter
from diffusers_microdit.training.trainer import DiffusionTrainer

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one intra-op thread

TRAIN_SCRIPTS = ("train_microdit", "train_pixart_kv", "train_lit_kd", "train_lora")
STEP_SECONDS = 2.0  # the step time the patched calibration reports
# 0.2 min = 12 s, less the margin, at 2 s a step: 5 steps.
BUDGET = ("--max_train_minutes", 0.2, "--checkpointing_steps", 2)


class Killed(Exception):
    """Stands for a kill right after a checkpoint was written."""


def fixed_step_time(run_step, device) -> float:
    return STEP_SECONDS


def train(workspace, output_dir, *extra) -> None:
    """One in-process train_microdit.py run on the tiny workspace."""
    load_example("train_microdit").main(list(map(str, microdit_train_args(workspace, output_dir, *extra))))


def budget_report(output_dir) -> dict:
    return json.loads((output_dir / "budget.json").read_text())


@pytest.fixture(scope="module")
def budgeted_run(microdit_workspace, tmp_path_factory):
    """Output folder of an uninterrupted 0.2-minute run at a fixed 2 s per step."""
    out = tmp_path_factory.mktemp("budgeted")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "calibrate_step_seconds", fixed_step_time)
        train(microdit_workspace, out, *BUDGET)
    return out


def test_the_budget_sets_the_planned_steps_and_a_larger_budget_more(
    microdit_workspace, budgeted_run, tmp_path, monkeypatch
):
    report = budget_report(budgeted_run)
    assert report["plan"] == {"budget_seconds": 12.0, "step_seconds": STEP_SECONDS, "steps": 5}
    assert report["plan"]["steps"] * STEP_SECONDS <= 12.0 * (1 - MARGIN)  # ends within the budget, as planned
    assert (report["actual"]["started_at_step"], report["actual"]["last_step"]) == (0, 5)
    assert read_manifest(budgeted_run / "checkpoint-5")["run"]["max_train_steps"] == 5
    assert not (budgeted_run / "checkpoint-6").exists()

    monkeypatch.setattr(trainer_module, "calibrate_step_seconds", fixed_step_time)
    train(microdit_workspace, tmp_path / "double", "--max_train_minutes", 0.4, "--checkpointing_steps", 100)
    assert budget_report(tmp_path / "double")["plan"]["steps"] == 11  # 24 s less the margin: twice the steps, floored
    assert read_manifest(tmp_path / "double" / "checkpoint-11")["run"]["max_train_steps"] == 11


def test_dollars_are_minutes_on_the_run_s_devices():
    cost = CostMeter(total_params=1, active_params=1, num_devices=2, gpu_hour_cost=3.0)
    args = argparse.Namespace(max_train_minutes=None, max_train_budget_usd=1.0)
    assert budget_seconds(args, cost) == pytest.approx(600.0)  # $1 buys 1/3 device-hour: 10 min on 2 devices
    assert cost.dollars_of(600.0) == pytest.approx(1.0)
    assert plan_steps(600.0, 1.0) == 570 and plan_steps(1200.0, 1.0) == 1140
    with pytest.raises(SystemExit, match="pays for no step"):
        BudgetPlan.for_budget(1.0, 2.0)


def test_calibration_times_the_steps_after_warm_up_and_restores_the_global_rng():
    calls = []

    def step():
        calls.append((torch.rand(1).item(), random.random(), np.random.rand()))

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = (torch.rand(1).item(), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    assert calibrate_step_seconds(step, torch.device("cpu")) >= 0
    assert len(calls) == CALIBRATION_WARMUP_STEPS + CALIBRATION_TIMED_STEPS
    assert (torch.rand(1).item(), random.random(), np.random.rand()) == expected


def test_kill_and_resume_of_a_budgeted_run_keeps_its_plan_and_is_exact(
    microdit_workspace, budgeted_run, tmp_path, monkeypatch
):
    out = tmp_path / "killed"
    monkeypatch.setattr(trainer_module, "calibrate_step_seconds", fixed_step_time)
    save_checkpoint = DiffusionTrainer.save_checkpoint

    def save_then_die(self):
        path = save_checkpoint(self)
        if self.global_step == 2:
            raise Killed
        return path

    with monkeypatch.context() as dying:
        dying.setattr(DiffusionTrainer, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            train(microdit_workspace, out, *BUDGET)
    assert not (out / "pipeline").exists()

    def no_calibration(run_step, device):
        raise AssertionError("a resumed budgeted run calibrated again instead of keeping its planned steps")

    monkeypatch.setattr(trainer_module, "calibrate_step_seconds", no_calibration)
    # Another budget on resume: the run still ends at the 5 steps planned when it started.
    resume = ("--resume_from_checkpoint", "latest")
    train(microdit_workspace, out, "--max_train_minutes", 10, "--checkpointing_steps", 2, *resume)
    report = budget_report(out)
    assert report["plan"]["steps"] == 5
    assert (report["actual"]["started_at_step"], report["actual"]["last_step"]) == (2, 5)
    straight, resumed = final_weights(budgeted_run), final_weights(out)
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def test_calibration_leaves_no_trace(microdit_workspace, tmp_path):
    """A budgeted run with the real calibration (steps trained, then undone) ends with the weights of an unbudgeted
    run of its planned length: weights, optimizer, EMA, RNG and schedule are as if calibration never ran."""
    ema = ("--use_ema", "--ema_decay", "0.9")  # the saved pipeline holds the EMA weights: their restore is checked
    train(microdit_workspace, tmp_path / "budgeted", "--max_train_minutes", 0.05, "--checkpointing_steps", 1000, *ema)
    steps = budget_report(tmp_path / "budgeted")["plan"]["steps"]
    train(microdit_workspace, tmp_path / "plain", "--max_train_steps", steps, "--checkpointing_steps", 1000, *ema)
    budgeted, plain = final_weights(tmp_path / "budgeted"), final_weights(tmp_path / "plain")
    for name in plain:
        torch.testing.assert_close(budgeted[name], plain[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("script", TRAIN_SCRIPTS)
def test_every_training_script_takes_a_budget_and_refuses_two_lengths(script, microdit_workspace, tmp_path):
    common = [
        "--init_from", str(tmp_path), "--precomputed_dataset", str(microdit_workspace["cache"]), "--output_dir",
        str(tmp_path),
    ]
    parse_args = load_example(script).parse_args
    assert parse_args([*common, "--max_train_minutes", "12"]).max_train_minutes == 12
    priced = parse_args([*common, "--max_train_budget_usd", "5", "--gpu_hour_cost", "2.5"])
    assert (priced.max_train_budget_usd, priced.gpu_hour_cost) == (5, 2.5)
    with pytest.raises(SystemExit, match="Give one of --max_train_steps, --max_train_minutes and --max_train_budget"):
        parse_args([*common, "--max_train_steps", "100", "--max_train_minutes", "12"])
    unpriced = r"--max_train_minutes must be > 0[\s\S]*--max_train_budget_usd needs --gpu_hour_cost"
    with pytest.raises(SystemExit, match=unpriced):
        parse_args([*common, "--max_train_budget_usd", "5", "--max_train_minutes", "0"])
