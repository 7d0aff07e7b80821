#!/usr/bin/env python
"""The MicroDiT paper's masking ablation on the embedded shapes task, at equal wall-clock training budget.

Trains quickstart's MicroDiT (its TRANSFORMER) from scratch once per mode (no masking, naive 75% masking = patches
dropped before the patch mixer, deferred 75% masking = dropped after it) for as many steps as fit in
--budget_seconds of that mode's step time, then scores each pipeline with ShapesEval on held-out captions.

* Step time is measured in this run, before training: per mode, short runs of the same recipe, interleaved
  (none, naive, deferred, none, ...; --calibration_repeats rounds). The trainer logs one TensorBoard event per
  optimizer step; the intervals between them are the loop's wall time per step (data loading, clipping and EMA
  included; setup and saving not). The first 3 steps of a run (one-off warm-up) are dropped, the next
  --calibration_steps kept, and a mode's step time is the median of its intervals: robust to bursts of load
  from other processes. Printed as ratios to the no-masking step time.
* steps = --budget_seconds / step time, with quickstart's stage-1 recipe for every mode (constant LR after 100
  warm-up steps, AdamW betas (0.9, 0.99), no weight decay, clipping at 1.0, EMA 0.998). `wall/budget` is each
  training run's measured wall time over the budget: above 1 by the fixed setup and saving cost of a run, and by
  whatever the machine took from it.
* One stage per mode: the paper follows masked pretraining with a short unmasked finetune; leaving it out keeps
  the budgets equal and the comparison about masking alone. `loss` is the mean training loss of the last 10% of
  steps, over the patches each mode trains on (masked modes: the kept ones).
Absolute times depend on the machine and on how busy it is; only ratios are printed. Outputs in --output_dir:
results.json (with the raw seconds), the data cache, and one training folder per mode.

    python benchmarks/masking_ablation.py                 # 3 x 240 s of training plus data, calibration, scoring
    python benchmarks/masking_ablation.py --budget_seconds 5 --num_images 512 --calibration_steps 4 \\
        --calibration_repeats 1 --eval_per_category 2 --batch_size 8 --output_dir /tmp/ablation-smoke  # wiring only
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # quickstart and the scripts it runs
from quickstart import TRANSFORMER, prepare_data, run_stage, sample_and_score  # noqa: E402

from diffusers_microdit.data.shapes import CATEGORIES  # noqa: E402
from diffusers_microdit.training.reporting import LossHistory  # noqa: E402

MASK_RATIO = {"none": 0.0, "naive": 0.75, "deferred": 0.75}
WARMUP_STEPS = 3  # untimed first steps of a calibration run: they carry one-off costs (allocations, kernel choice)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="masking-ablation-output")
    parser.add_argument("--budget_seconds", type=float, default=240, help="Training time per mode.")
    parser.add_argument("--num_images", type=int, default=40000, help="Training images generated.")
    parser.add_argument(
        "--calibration_steps", type=int, default=30,
        help=f"Steps timed per calibration run, after {WARMUP_STEPS} warm-up steps.",
    )
    parser.add_argument("--calibration_repeats", type=int, default=2)
    parser.add_argument("--eval_per_category", type=int, default=30)
    parser.add_argument("--num_inference_steps", type=int, default=10)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", choices=list(MASK_RATIO), default=list(MASK_RATIO))
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    if "none" not in args.modes:
        raise SystemExit("--modes must include none: step times are reported as ratios to it.")
    if args.num_images < args.batch_size or args.calibration_steps < 1:
        raise SystemExit("--num_images must be at least --batch_size, and --calibration_steps positive.")
    return args


def train(name: str, mode: str, steps: int, base: Path, args) -> tuple[Path, float]:
    """A from-scratch run of `mode` with quickstart's stage-1 recipe; returns its folder and wall seconds."""
    start = time.perf_counter()
    folder = run_stage(
        name, MASK_RATIO[mode], steps, args.learning_rate, "constant_with_warmup", base, args,
        ("--transformer_config", str(Path(args.output_dir) / "transformer.json"), "--masking", mode),
    )
    return folder, time.perf_counter() - start


def measure_step_seconds(base: Path, args) -> dict[str, float]:
    """Median wall seconds per optimizer step of each mode, from the calibration runs' step events."""
    intervals = {mode: [] for mode in args.modes}
    for _ in range(args.calibration_repeats):
        for mode in args.modes:
            folder, _ = train(f"calibration/{mode}", mode, WARMUP_STEPS + args.calibration_steps, base, args)
            events = EventAccumulator(str(next(folder.rglob("events.out.tfevents.*"))))
            times = [event.wall_time for event in events.Reload().Scalars("loss") if event.step >= WARMUP_STEPS]
            intervals[mode] += [after - before for before, after in zip(times, times[1:])]
            shutil.rmtree(folder)  # every run saves a whole pipeline, text encoder included
    return {mode: statistics.median(values) for mode, values in intervals.items()}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    base = prepare_data(output_dir, args.num_images, args.seed)
    (output_dir / "transformer.json").write_text(json.dumps(TRANSFORMER, indent=2))

    step_seconds = measure_step_seconds(base, args)
    results = {}
    for mode in args.modes:
        steps = max(1, round(args.budget_seconds / step_seconds[mode]))
        folder, seconds = train(f"train-{mode}", mode, steps, base, args)
        history = LossHistory()
        history.load(folder)
        _, _, scores = sample_and_score(
            folder / "pipeline", args.eval_per_category, args.num_inference_steps, args.guidance_scale, args.seed
        )
        results[mode] = {
            "step_seconds": step_seconds[mode], "step_time_ratio": step_seconds[mode] / step_seconds["none"],
            "steps": steps, "train_seconds": seconds, "wall_over_budget": seconds / args.budget_seconds,
            "end_loss": statistics.mean(history.losses[-max(1, len(history.losses) // 10) :]),
            "overall": scores["overall"], "per_category": scores["per_category"],
        }
    (output_dir / "results.json").write_text(json.dumps({"args": vars(args), "modes": results}, indent=2))

    print(f"\nMasking ablation at {args.budget_seconds:g} s of training per mode, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads; step time as a ratio to no masking, measured in this run")
    print(f"{'mode':10s} {'step/none':>9s} {'steps':>7s} {'wall/budget':>11s} {'loss':>7s} {'ShapesEval':>10s}")
    for mode, r in results.items():
        print(f"{mode:10s} {r['step_time_ratio']:9.3f} {r['steps']:7d} {r['wall_over_budget']:11.2f} "
              f"{r['end_loss']:7.4f} {r['overall']:10.2f}")
    print("\nShapesEval per category (fraction correct, held-out captions):")
    print(f"  {'':14s}" + "".join(f"{mode:>10s}" for mode in results))
    for category in CATEGORIES:
        print(f"  {category:14s}" + "".join(f"{r['per_category'][category]:10.2f}" for r in results.values()))
    print(f"\nResults in {output_dir / 'results.json'}")


if __name__ == "__main__":
    main()
