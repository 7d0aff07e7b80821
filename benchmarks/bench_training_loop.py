#!/usr/bin/env python
"""How close does the trainer come to a bare training step? Quickstart's model, masked and unmasked.

For each mask ratio (0.75, then 0) the script times, in interleaved rounds (bare, trainer, lever variants, bare,
trainer, ...), in this one process:

* bare: forward + loss + backward + fused AdamW on one fixed batch, through the same objective and random draws
  as training (`microdit_objective`, `BatchRandomness`); no data loader, clipping, schedule, EMA or logging.
* trainer: `DiffusionTrainer` on the quickstart cache the way examples/train_microdit.py runs it (data from
  `load_training_data`, quickstart's stage recipe: clipping at 1.0, EMA, TensorBoard logging).
* one variant per lever, each with that lever switched off and the others on: `arrow rows` (rows formatted from
  Arrow per step instead of held as tensors), `per-step sync` (the loss read back and logged every step),
  `EMA loop` (diffusers' EMAModel without `foreach`); `before` is the loop as it was (Arrow rows, per-step sync).

A run's step time is the time (--clock: wall, or this process's CPU time) between the starts of consecutive
micro-steps (everything of a step, data loading included), averaged over the steps after --warmup_steps. Printed
per mask ratio: seconds per step (median over rounds), the rate ratio bare/variant (median of the per-round ratios:
the goal is trainer >= 0.90) and what switching each lever off costs. Last, resuming: the time to the first batch
of a resumed epoch, skipping --skip_batches batches with `accelerator.skip_first_batches` (what the trainer does)
versus reading them. Absolute times depend on the machine and on its load; the ratios come from the same rounds.

    python benchmarks/bench_training_loop.py                       # 4096 shapes images, 3 rounds x 40 steps
    python benchmarks/bench_training_loop.py --threads 1 --clock cpu   # steadier on a machine others load
    python benchmarks/bench_training_loop.py --rounds 1 --steps 8 --warmup_steps 2 --variants trainer \\
        --num_images 512 --skip_batches 10 --output_dir /tmp/loop-smoke   # wiring only
"""

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import PartialState
from diffusers import DiffusionPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # quickstart and train_microdit
from quickstart import RESOLUTION, TRANSFORMER, prepare_data  # noqa: E402
from train_microdit import build_transformer, parse_args as parse_train_args  # noqa: E402

from diffusers_microdit.training.data import load_precomputed, load_training_data  # noqa: E402
from diffusers_microdit.training.losses import microdit_objective  # noqa: E402
from diffusers_microdit.training.randomness import BatchRandomness  # noqa: E402
from diffusers_microdit.training.trainer import DiffusionTrainer  # noqa: E402

MASK_RATIOS = (0.75, 0.0)


def trainer_rows(train, pipeline, transformer, cache_dirs):
    """The training rows as examples/train_microdit.py loads them."""
    dataset, _, _ = load_training_data(train, RESOLUTION, pipeline, transformer, cache_dirs)
    return dataset


def arrow_rows(train, pipeline, transformer, cache_dirs):
    """The cache as `datasets` formats it per row (what training read before rows were held as tensors)."""
    return load_precomputed(cache_dirs, RESOLUTION)


def loss_every_step(trainer) -> None:
    """Read the loss back to the host (and log it) after every step."""
    trainer.log_every = 1


def ema_without_foreach(trainer) -> None:
    """EMAModel's per-tensor loop instead of its `torch._foreach` update."""
    trainer.ema.foreach = False


# variant -> (training rows, adjustments of the prepared trainer)
VARIANTS = {
    "trainer": (trainer_rows, ()),
    "arrow rows": (arrow_rows, ()),
    "per-step sync": (trainer_rows, (loss_every_step,)),
    "EMA loop": (trainer_rows, (ema_without_foreach,)),
    "before": (arrow_rows, (loss_every_step,)),  # the loop before this benchmark (its EMA was foreach already)
}
# wall: what a run takes. cpu: this process's CPU seconds, steadier when other processes share the cores (use with
# --threads 1, where no thread waits on another).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output_dir", default=os.path.join(tempfile.gettempdir(), "training-loop-bench"),
        help="Data cache (reused when there, whatever --num_images) and the runs' folders.",
    )
    parser.add_argument("--num_images", type=int, default=4096)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="Optimizer steps per run, warm-up included.")
    parser.add_argument("--warmup_steps", type=int, default=5, help="First steps of a run left out of its time.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--skip_batches", type=int, default=100, help="Batches a resume skips (timing at the end).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="cpu: CPU seconds of this process.")
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)),
        help="torch threads (quickstart: every core); 1 is steadier on a machine other processes load.",
    )
    args = parser.parse_args()
    if args.steps <= args.warmup_steps + 1 or args.num_images < args.batch_size * (args.skip_batches + 1):
        raise SystemExit("--steps must exceed --warmup_steps + 1, and --num_images hold --skip_batches + 1 batches.")
    return args


def train_args(mask_ratio: float, base: Path, cache: Path, config: Path, output_dir: Path, args):
    """examples/train_microdit.py's arguments for quickstart's stage recipe (its `run_stage`), one run."""
    return parse_train_args([
        "--init_from", str(base), "--precomputed_dataset", str(cache), "--transformer_config", str(config),
        "--output_dir", str(output_dir), "--mask_ratio", str(mask_ratio), "--max_train_steps", str(args.steps),
        "--learning_rate", "1e-3", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "100",
        "--train_batch_size", str(args.batch_size), "--adam_beta2", "0.99", "--adam_weight_decay", "0",
        "--max_grad_norm", "1.0", "--use_ema", "--ema_decay", "0.998", "--checkpointing_steps", "100000",
        "--seed", str(args.seed), "--report_to", "tensorboard",
    ])


def timed(compute_loss, starts: list, clock):
    """`compute_loss` that records when (by `clock`) each micro-step starts."""

    def compute(model, batch, draws):
        starts.append(clock())
        return compute_loss(model, batch, draws)

    return compute


def seconds_per_step(starts: list, warmup: int) -> float:
    """Mean time of the steps after the warm-up, from their start times."""
    return (starts[-1] - starts[warmup]) / (len(starts) - 1 - warmup)


def objective(pipeline, train: argparse.Namespace):
    """examples/train_microdit.py's `compute_loss` for the run's flags."""
    return microdit_objective(
        pipeline.scheduler, train.mask_ratio, train.masking, train.p_mean, train.p_std, train.caption_dropout
    )


def prepared_trainer(load_rows, train: argparse.Namespace, pipeline, compute_loss=None) -> DiffusionTrainer:
    """A `DiffusionTrainer` prepared as examples/train_microdit.py prepares it, on the rows `load_rows` gives."""
    trainer = DiffusionTrainer(train)  # seeds, so every run starts from the same weights
    transformer = build_transformer(train, pipeline)
    dataset = load_rows(train, pipeline, transformer, list(map(str, train.precomputed_dataset)))
    trainer.prepare(transformer, dataset, compute_loss)
    return trainer


def close(trainer: DiffusionTrainer) -> None:
    """End a run without saving its output (what `finish` does besides)."""
    trainer.accelerator.end_training()
    trainer.lock.release()


def run_trainer(variant: str, train: argparse.Namespace, pipeline, args) -> float:
    """Seconds per steady-state step of one `DiffusionTrainer` run of `variant`."""
    load_rows, adjustments = VARIANTS[variant]
    starts = []
    compute_loss = timed(objective(pipeline, train), starts, CLOCKS[args.clock])
    trainer = prepared_trainer(load_rows, train, pipeline, compute_loss)
    for adjust in adjustments:
        adjust(trainer)
    trainer.train()
    close(trainer)
    return seconds_per_step(starts, args.warmup_steps)


def run_bare(train: argparse.Namespace, pipeline, args) -> float:
    """Seconds per steady-state step of the bare loop on the cache's first batch."""
    device = PartialState().device  # the trainer's
    torch.manual_seed(train.seed)
    model = build_transformer(train, pipeline).to(device).train()
    rows = load_precomputed(list(map(str, train.precomputed_dataset)), RESOLUTION)
    batch = torch.utils.data.default_collate([rows[i] for i in range(args.batch_size)])
    batch = {name: values.to(device) for name, values in batch.items()}
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay, eps=train.adam_epsilon, fused=device.type in ("cpu", "cuda"),
    )
    compute_loss = timed(objective(pipeline, train), starts := [], CLOCKS[args.clock])
    for step in range(args.steps):
        loss = compute_loss(model, batch, BatchRandomness(train.seed, step, 0, 1, args.batch_size, device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return seconds_per_step(starts, args.warmup_steps)


def time_resume_skip(train: argparse.Namespace, pipeline, args) -> dict[str, float]:
    """Seconds (by --clock) to the first batch after --skip_batches, skipped (`skip_first_batches`, what the trainer
    does) or read and dropped, for each data path."""
    results, clock = {}, CLOCKS[args.clock]
    for name, load_rows in (("trainer rows", trainer_rows), ("arrow rows", arrow_rows)):
        trainer = prepared_trainer(load_rows, train, pipeline)
        loader = trainer.dataloader
        start = clock()
        next(iter(trainer.accelerator.skip_first_batches(loader, args.skip_batches)))
        results[f"{name}, skip_first_batches"] = clock() - start
        start = clock()
        next(itertools.islice(iter(loader), args.skip_batches, None))
        results[f"{name}, read and dropped"] = clock() - start
        close(trainer)
    return results


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    base, cache, config = output_dir / "base", output_dir / "cache", output_dir / "transformer.json"
    if not (cache / "precompute.json").exists():
        output_dir.mkdir(parents=True, exist_ok=True)
        prepare_data(output_dir, args.num_images, args.seed)
    config.write_text(json.dumps(TRANSFORMER))
    pipeline = DiffusionPipeline.from_pretrained(base, transformer=None)
    runs = Path(tempfile.mkdtemp(dir=output_dir, prefix="runs-"))
    seconds = {(m, v): [] for m in MASK_RATIOS for v in ["bare", *args.variants]}
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # progress bars and warnings
        for round_index, mask_ratio in itertools.product(range(args.rounds), MASK_RATIOS):
            for variant in ["bare", *args.variants]:
                folder = runs / f"{round_index}-{mask_ratio}-{variant}"
                train = train_args(mask_ratio, base, cache, config, folder, args)
                if variant == "bare":
                    seconds[mask_ratio, variant].append(run_bare(train, pipeline, args))
                else:
                    seconds[mask_ratio, variant].append(run_trainer(variant, train, pipeline, args))
                step = seconds[mask_ratio, variant][-1]
                print(f"round {round_index} mask {mask_ratio}: {variant:14s} {step:.4f} s/step", flush=True)
        resume = time_resume_skip(train_args(0.75, base, cache, config, runs / "resume", args), pipeline, args)
    report(seconds, resume, args)


def report(seconds: dict, resume: dict, args) -> None:
    """The per-variant table of each mask ratio, the levers' costs and the resume timing."""
    for mask_ratio in MASK_RATIOS:
        bare = seconds[mask_ratio, "bare"]
        timed_steps = args.steps - args.warmup_steps - 1
        print(f"\nmask ratio {mask_ratio}: {args.rounds} rounds x {timed_steps} timed steps, batch {args.batch_size}")
        print(f"  {'variant':14s} {'s/step':>8s} {'rate/bare':>10s}  vs trainer (median of per-round differences)")
        print(f"  {'bare':14s} {statistics.median(bare):8.4f} {1:10.3f}")
        lean = seconds.get((mask_ratio, "trainer"))
        for variant in args.variants:
            times = seconds[mask_ratio, variant]
            ratio = statistics.median(b / t for b, t in zip(bare, times))
            cost = ""
            if lean and variant != "trainer":
                extra = statistics.median(t - l for t, l in zip(times, lean))
                cost = f"{extra * 1e3:+.1f} ms/step ({extra / statistics.median(lean):+.1%})"
            print(f"  {variant:14s} {statistics.median(times):8.4f} {ratio:10.3f}  {cost}")
    print(f"\nresume: first batch after skipping {args.skip_batches} batches")
    for name, value in resume.items():
        print(f"  {name:32s} {value:7.3f} s")


if __name__ == "__main__":
    main()
