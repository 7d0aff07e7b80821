"""Training budgets: `--max_train_minutes` or `--max_train_budget_usd` (at `--gpu_hour_cost`, priced by the cost
meter) become a fixed number of optimizer steps before the LR schedule is built (`DiffusionTrainer.prepare`).

1. Calibrate: `CALIBRATION_WARMUP_STEPS` + `CALIBRATION_TIMED_STEPS` optimizer steps of the run itself (prepared
   model, mixed precision, compilation, DDP, accumulation, batch size) on the first batches. Five warm-up steps are
   not timed: the first allocates memory and the optimizer's moments, compiles (torch.compile, cuDNN autotuning)
   and counts the FLOPs; the next can still recompile, grow the allocator's pools and warm the caches. The median
   of the twenty timed steps ignores stray slow ones: with two warm-up and five timed steps, quickstart's stages on
   a 2-core CPU ran 84-111 % of their plans; with these, 97-108 % (on a faster 2-core CPU). The trainer puts the
   weights, optimizer and RNG states back afterwards, so a budgeted run ends with the weights of an unbudgeted run
   of its planned length.
2. Plan: the steps that fit in (1 - `MARGIN`) of the budget at that step time; the margin pays for checkpoints,
   logging and the data loader's start, which calibration does not time.
3. Keep: every checkpoint records the planned count, and a resumed run trains to it without calibrating again, so
   kill + resume ends with the weights of an uninterrupted run.

The budget is the wall-clock time of the training loop; loading, data encoding, calibration and the final save are
outside it, and validation (`--validation_prompts`) comes out of the margin: keep it rare in budgeted runs.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from .cost import CostMeter

CALIBRATION_WARMUP_STEPS = 5
CALIBRATION_TIMED_STEPS = 20
MARGIN = 0.05
BUDGET_FLAGS = ("max_train_minutes", "max_train_budget_usd")


def is_budgeted(args: argparse.Namespace) -> bool:
    """Whether a budget flag (not --max_train_steps or the epochs) sets the run's length."""
    return any(getattr(args, flag, None) is not None for flag in BUDGET_FLAGS)


def budget_seconds(args: argparse.Namespace, cost: CostMeter) -> float | None:
    """The wall-clock training budget in seconds: --max_train_minutes, or what --max_train_budget_usd pays for on
    the run's devices at --gpu_hour_cost; None without a budget."""
    if args.max_train_minutes is not None:
        return args.max_train_minutes * 60
    if args.max_train_budget_usd is not None:
        return cost.wall_seconds_for(args.max_train_budget_usd)
    return None


@contextlib.contextmanager
def preserved_rng_state(device: torch.device):
    """Put the Python, numpy and torch RNG states (CPU and `device`) back on exit: what runs inside leaves no trace
    in later draws."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device`, so that the clock read next has timed it (CPU ops are synchronous)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def calibrate_step_seconds(run_step: Callable[[], None], device: torch.device) -> float:
    """Median wall-clock seconds of one `run_step()` (one optimizer step) over `CALIBRATION_TIMED_STEPS` calls after
    `CALIBRATION_WARMUP_STEPS` untimed ones; the global RNG states are as before afterwards."""
    durations = []
    with preserved_rng_state(device):
        for _ in range(CALIBRATION_WARMUP_STEPS):
            run_step()
        for _ in range(CALIBRATION_TIMED_STEPS):
            synchronize(device)
            start = time.perf_counter()
            run_step()
            synchronize(device)
            durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def plan_steps(budget_seconds: float, step_seconds: float) -> int:
    """Optimizer steps that fit in the budget less its `MARGIN` at `step_seconds` a step (0 if not even one)."""
    return int(budget_seconds * (1 - MARGIN) // step_seconds)


@dataclass
class BudgetPlan:
    """A budgeted run's length: `steps` planned from `budget_seconds` at a calibrated `step_seconds`."""

    budget_seconds: float
    step_seconds: float
    steps: int

    @classmethod
    def for_budget(cls, budget_seconds: float, step_seconds: float) -> "BudgetPlan":
        """The plan of a budget; `SystemExit` saying what to change if it pays for no step."""
        steps = plan_steps(budget_seconds, step_seconds)
        if steps < 1:
            raise SystemExit(
                f"The training budget of {budget_seconds / 60:.3g} min pays for no step: one takes "
                f"{step_seconds:.3g} s here. Raise --max_train_minutes or --max_train_budget_usd, or make steps "
                "cheaper (--train_batch_size)."
            )
        return cls(budget_seconds, step_seconds, steps)

    def summary(self, cost: CostMeter, global_batch_size: int) -> str:
        """The plan: budget, steps, images, PFLOPs, projected minutes and dollars."""
        images = self.steps * global_batch_size
        projected = self.steps * self.step_seconds
        flops = "" if cost.flops_per_image is None else f", {images * cost.flops_per_image / 1e15:.4g} PFLOP"
        return (
            f"Budget {self.budget_seconds / 60:.3g} min -> {self.steps} steps ({images} images{flops}) at "
            f"{self.step_seconds:.4g} s/step (median of {CALIBRATION_TIMED_STEPS} steps after "
            f"{CALIBRATION_WARMUP_STEPS} warm-up steps): projected {projected / 60:.3g} min, "
            f"{price(cost, projected)}; {MARGIN:.0%} of the budget is left for checkpoints and logging."
        )

    def report(self, cost: CostMeter, first_step: int, last_step: int, seconds: float) -> dict:
        """The plan against what the training loop did: the steps after `first_step` up to `last_step`, in `seconds`."""
        trained = last_step - first_step
        planned = trained * self.step_seconds
        actual = {"started_at_step": first_step, "last_step": last_step, "seconds": round(seconds, 3)}
        if cost.gpu_hour_cost:
            actual["usd"] = round(cost.dollars_of(seconds), 4)
        summary = (
            f"Budget: planned {self.steps} steps in {self.steps * self.step_seconds / 60:.3g} min; trained steps "
            f"{first_step + 1}-{last_step} in {seconds / 60:.3g} min ({price(cost, seconds)}), "
            + (f"{seconds / planned:.0%} of their planned {planned / 60:.3g} min." if planned else "none planned.")
        )
        return {"plan": asdict(self), "actual": actual, "summary": summary}


def price(cost: CostMeter, seconds: float) -> str:
    """Dollars of `seconds` of the run at --gpu_hour_cost, or how to get them."""
    return f"${cost.dollars_of(seconds):.2f}" if cost.gpu_hour_cost else "pass --gpu_hour_cost to price it"
