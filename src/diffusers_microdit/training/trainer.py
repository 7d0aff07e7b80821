"""The training loop every `examples/train_*.py` runs, on Accelerate (DDP, FSDP, DeepSpeed, multi-node).

A script builds its model and a `compute_loss(model, batch, draws)` for its objective; `DiffusionTrainer` does the
rest the diffusers examples' way: optimizer, `get_scheduler`, `EMAModel`, gradient accumulation and clipping,
`save_state`/`load_state` checkpoints with save/load hooks, trackers, validation grids, the cost meter and the final
pipeline folder. Two additions make runs reproducible across kills and process counts:

* every random draw of a micro-batch (noise levels, noise, masks, caption dropout) comes from `BatchRandomness`
  (`randomness.py`), seeded by (seed, micro-step) and sliced by the sample's place in the global batch, so it does
  not depend on RNG state, on resuming, or on how many processes share the batch;
* checkpoints are written to `checkpoint-N.tmp` with a manifest of every file (size, CRC-32) written last, then
  renamed; `--resume_from_checkpoint latest` takes the newest checkpoint whose manifest verifies and reports (never
  deletes) damaged ones, so neither a kill mid-write nor a file damaged later stops a run from resuming.

A run's length is --max_train_steps, --num_train_epochs' worth, or a budget (--max_train_minutes,
--max_train_budget_usd; `budget.py`): a few timed steps fix the step count that ends within it, and checkpoints
record it, so a resumed budgeted run ends as the uninterrupted one.

Runs that would go wrong are stopped: a second run into the same `--output_dir` (`OutputDirLock`), a resume with
another global batch or seed, and a loss or weights turning non-finite (stopped before they are saved).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, send_to_device, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from transformers import get_cosine_with_min_lr_schedule_with_warmup
from tqdm.auto import tqdm

from ..integrity import manifest_problems, read_manifest, write_manifest
from .args import COSINE_WITH_MIN_LR
from .budget import BudgetPlan, budget_seconds, calibrate_step_seconds, is_budgeted
from .cost import CostMeter, count_parameters, flop_counter, peak_flops
from .optimizers import build_optimizer
from .randomness import BatchRandomness
from .reporting import LossHistory, image_grid, log_images
from .run_lock import OutputDirLock

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders, oldest first (`.tmp` writes in progress and `.deleting` rotations excluded)."""
    found = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()]
    return sorted(found, key=checkpoint_step)


def latest_verified_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies; damaged ones are reported with their problems and skipped
    (kept on disk for inspection). None if there is no checkpoint; `SystemExit` listing them if none verifies."""
    found = list_checkpoints(output_dir)
    damaged = []
    for path in reversed(found):
        problems = manifest_problems(path)
        if not problems:
            return path
        logger.warning(f"Skipping damaged checkpoint {path.name}: " + "; ".join(problems))
        damaged.append(f"{path.name}: " + "; ".join(problems))
    if damaged:
        raise SystemExit(
            f"No checkpoint in {output_dir} is complete, so the run cannot resume:\n  " + "\n  ".join(damaged)
            + "\nDrop --resume_from_checkpoint to start over (or use another --output_dir)."
        )
    return None


def gradient_accumulation_steps(args: argparse.Namespace, num_processes: int) -> int:
    """--gradient_accumulation_steps, or the steps that make --global_batch_size from this launch's processes (then
    also written back to `args`, so every use of the run's shape agrees)."""
    if args.global_batch_size is not None:
        per_step = args.train_batch_size * num_processes
        if args.global_batch_size % per_step:
            raise SystemExit(
                f"--global_batch_size {args.global_batch_size} is not a multiple of --train_batch_size "
                f"{args.train_batch_size} x {num_processes} processes; change one of them."
            )
        args.gradient_accumulation_steps = args.global_batch_size // per_step
    return args.gradient_accumulation_steps


def build_lr_scheduler(args: argparse.Namespace, optimizer, max_train_steps: int, num_processes: int):
    """--lr_scheduler for `max_train_steps` optimizer steps; Accelerate's prepared scheduler steps once per process
    per optimizer step, so the step counts are in those units."""
    warmup, total = args.lr_warmup_steps * num_processes, max_train_steps * num_processes
    if args.lr_scheduler == COSINE_WITH_MIN_LR:
        # The original MicroDiT's cosine decays to a floor (Composer's alpha_f), which diffusers' cosine lacks.
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, total, num_cycles=0.5 * args.lr_num_cycles, min_lr_rate=args.lr_min_ratio
        )
    return get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total,
        num_cycles=args.lr_num_cycles,
    )


class DiffusionTrainer:
    """Accelerate training of one diffusers model (`transformer`) on a `datasets` dataset of precomputed batches.

    Usage: `trainer = DiffusionTrainer(args)`; build the model (seeded); `trainer.prepare(model, dataset,
    compute_loss)`; `trainer.train(build_pipeline)`; `trainer.finish(build_pipeline)`. `compute_loss(model, batch,
    draws)` returns the scalar loss of a micro-batch, drawing all its randomness from `draws` (a `BatchRandomness`);
    `build_pipeline(model)` returns a pipeline around the unwrapped model, for validation images and the output.
    """

    model_name = "transformer"
    # Optimizer steps between reads of the losses back to the host (history, trackers, non-finite check): each read
    # waits for the device to finish, and before a checkpoint one always happens.
    log_every = 10

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.output_dir = Path(args.output_dir)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=None if args.report_to == "none" else args.report_to,
            # Accelerate compiles the model in `prepare` (as with `accelerate launch --dynamo_backend`).
            dynamo_backend=args.torch_compile_backend if args.torch_compile else None,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / args.logging_dir)
            ),
            # Data order = f(seed, epoch) on every process, so resumed and multi-process runs see the same batches.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        )
        # Known only now that the launch's processes are: --global_batch_size's accumulation.
        self.accelerator.gradient_accumulation_steps = gradient_accumulation_steps(args, self.accelerator.num_processes)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        set_seed(args.seed)
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.lock = OutputDirLock(self.output_dir)
        self.hub_repo_id = None
        if self.accelerator.is_main_process:
            if args.push_to_hub:
                self.hub_repo_id = self._create_hub_repo()
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()  # before touching anything in the folder
            for stale in itertools.chain(self.output_dir.glob("*.tmp"), self.output_dir.glob("*.deleting")):
                shutil.rmtree(stale, ignore_errors=True)  # an interrupted checkpoint write or rotation
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32
        )
        # Sharded engines keep no full copy of the weights on one process: Accelerate saves them its own way.
        self.sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if self.sharded and args.use_ema:
            raise SystemExit("--use_ema is not supported with FSDP or DeepSpeed here; use DDP or drop --use_ema.")
        if is_budgeted(args) and self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed takes the LR schedule with the model, before a step can be timed.
            raise SystemExit("A training budget is not supported with DeepSpeed here: pass --max_train_steps instead.")
        self.loss_history = LossHistory()
        self.global_step = 0
        self.max_train_steps: int | None = None  # set by `prepare`
        self.budget_plan: BudgetPlan | None = None  # set by `prepare` when a budget sets the length
        self.budget_report: dict | None = None  # the plan against the loop's time, set by `train`
        self.lr_scheduler = None
        self.ema = None
        self.cost = None

    def _create_hub_repo(self) -> str:
        """The `--push_to_hub` repo, created now so that a push that cannot happen fails before training."""
        from ..hub import create_hub_repo

        try:
            return create_hub_repo(self.args.hub_model_id or self.output_dir.name)
        except RuntimeError as error:
            raise SystemExit(f"--push_to_hub: {error}") from None

    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step over all processes."""
        args = self.args
        return args.train_batch_size * args.gradient_accumulation_steps * self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def unwrap(self, model=None) -> torch.nn.Module:
        """The plain model under Accelerate's wrappers and `torch.compile`'s (checkpoint hooks load into it by
        class, and the output pipeline must not hold a compiled module)."""
        return self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)

    # ---------------------------------------------------------------- set-up

    def prepare(
        self,
        model: torch.nn.Module,
        dataset,
        compute_loss: Callable,
        collate_fn: Callable | None = None,
        batch_sampler: torch.utils.data.Sampler | None = None,
    ):
        """Optimizer, LR schedule, EMA, dataloader and checkpoint hooks around `model`; resumes if asked. Sets
        `max_train_steps` (--max_train_steps, --num_train_epochs of the dataloader, or the budget's `_plan_length`).

        `batch_sampler` (e.g. aspect-ratio buckets) replaces the shuffled batches of `--train_batch_size` rows; it
        must yield batches of that size in an order set by (seed, epoch) alone (`set_epoch`), so resuming stays exact.
        """
        args, accelerator = self.args, self.accelerator
        self.compute_loss = compute_loss
        collate_fn = collate_fn or torch.utils.data.default_collate
        if args.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        if args.use_ema:
            self.ema = EMAModel(
                model.parameters(), decay=args.ema_decay, model_cls=type(model), model_config=model.config, foreach=True
            )
            self.ema.to(self.device)

        learning_rate = args.learning_rate * self.global_batch_size if args.scale_lr else args.learning_rate
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(args, trainable, learning_rate, self.device)

        iterable = not hasattr(dataset, "__len__")
        if iterable:
            dataset = dataset.shuffle(seed=args.seed, buffer_size=10_000)
        if batch_sampler is not None:
            batching = {"batch_sampler": batch_sampler}
        else:
            batching = {"batch_size": args.train_batch_size, "shuffle": not iterable, "drop_last": True}
        dataloader = torch.utils.data.DataLoader(
            dataset, collate_fn=collate_fn, num_workers=args.dataloader_num_workers, **batching
        )
        if iterable and args.max_train_steps is None and not is_budgeted(args):
            raise SystemExit("Streaming data has no length: pass --max_train_steps or --max_train_minutes.")
        if not iterable and len(dataloader) == 0:
            raise SystemExit(
                f"The dataset has {len(dataset)} rows, fewer than one batch of {args.train_batch_size}: lower "
                "--train_batch_size or add data."
            )
        self._start_cost_meter(model)
        resume_from = self._checkpoint_to_resume()
        # The run's length is the trainer's own (args stay as parsed): --max_train_steps, the epochs' worth, or a
        # budget's, which is timed on the prepared model: its LR schedule is built and prepared after that.
        if is_budgeted(args):
            self.model, self.optimizer, self.dataloader = accelerator.prepare(model, optimizer, dataloader)
            calibration_batches = torch.utils.data.DataLoader(
                dataset, collate_fn=collate_fn, **{**batching, "shuffle": False}  # its first batches
            )
            self.max_train_steps = self._plan_length(resume_from, calibration_batches)
            lr_scheduler = build_lr_scheduler(args, optimizer, self.max_train_steps, accelerator.num_processes)
            self.lr_scheduler = accelerator.prepare(lr_scheduler)
        else:
            self.max_train_steps = args.max_train_steps
            if self.max_train_steps is None:
                batches = math.ceil(len(dataloader) / accelerator.num_processes)
                self.max_train_steps = args.num_train_epochs * math.ceil(batches / args.gradient_accumulation_steps)
            lr_scheduler = build_lr_scheduler(args, optimizer, self.max_train_steps, accelerator.num_processes)
            self.model, self.optimizer, self.dataloader, self.lr_scheduler = accelerator.prepare(
                model, optimizer, dataloader, lr_scheduler
            )
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)
        if args.resume_optimizer_state:
            self._load_previous_stage_optimizer()
        if accelerator.is_main_process:
            config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
            config["max_train_steps"] = self.max_train_steps
            accelerator.init_trackers(args.tracker_project_name or self.output_dir.name, config)
        if resume_from is not None:
            self._load_checkpoint(resume_from)

    def _start_cost_meter(self, model: torch.nn.Module) -> None:
        """Count parameters now; the FLOPs per image are counted on the run's first training step (`train`), or on
        a budgeted run's first calibration step, which is a training step put back afterwards (`_plan_length`).

        Counting them on a real step, not on an extra call of `compute_loss` here, means the script's loss is only
        ever called for training steps (no fake micro-step, nothing for a script to switch off around it) and the
        count is of exactly what trains: the prepared model, the run's mixed precision, batch and draws."""
        total, active = count_parameters(model)
        self.cost = CostMeter(
            total_params=total,
            active_params=active,
            num_devices=self.accelerator.num_processes,
            peak_flops_per_device=peak_flops(self.device, self.args.peak_tflops),
            gpu_hour_cost=self.args.gpu_hour_cost,
        )

    # ---------------------------------------------------------------- budget

    def _plan_length(self, resume_from: Path | None, calibration_batches) -> int:
        """A budgeted run's `max_train_steps`: the count its checkpoint recorded when resuming (kill + resume ends
        as an uninterrupted run), otherwise the steps that fit the budget at the calibrated step time."""
        recorded = read_manifest(resume_from)["run"] if resume_from is not None else {}
        if "max_train_steps" in recorded:
            self.budget_plan = BudgetPlan(**recorded["budget_plan"]) if "budget_plan" in recorded else None
            self.accelerator.print(
                f"Resuming: keeping the {recorded['max_train_steps']} steps {resume_from.name} records (planned when "
                "the run started); pass --max_train_steps instead of the budget to change the length."
            )
            return recorded["max_train_steps"]
        started = time.perf_counter()
        step_seconds = self._measure_step_seconds(calibration_batches)
        self.budget_plan = BudgetPlan.for_budget(budget_seconds(self.args, self.cost), step_seconds)
        self.accelerator.print(
            f"Calibrated in {time.perf_counter() - started:.1f} s. "
            + self.budget_plan.summary(self.cost, self.global_batch_size)
        )
        return self.budget_plan.steps

    def _measure_step_seconds(self, calibration_batches) -> float:
        """Seconds of one optimizer step of this run (`calibrate_step_seconds` on its prepared model, optimizer and
        first batches), the slowest process's, so that every process plans the same count. The steps are undone."""
        args, accelerator = self.args, self.accelerator
        micro_steps = itertools.count()

        def batches():
            while True:  # a dataset of fewer batches than calibration takes is repeated
                yield from calibration_batches

        source = batches()

        def one_step() -> None:
            for _ in range(args.gradient_accumulation_steps):
                self._train_micro_batch(send_to_device(next(source), self.device), next(micro_steps))
            if self.ema is not None:  # part of every step's time (about 7% of a quickstart step on CPU)
                self.ema.step(self.unwrap().parameters())

        with self._restored_training_state():
            seconds = calibrate_step_seconds(one_step, self.device)
        return accelerator.gather(torch.tensor([seconds], device=self.device)).max().item()

    @contextlib.contextmanager
    def _restored_training_state(self):
        """Put the trained weights, the optimizer's, EMA's and gradient scaler's state and the accumulation counter
        back as they were when entered (steps taken inside leave no trace; the LR schedule is not stepped)."""
        accelerator = self.accelerator
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        weights = [p.detach().clone() for p in trainable]
        optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        ema_state = copy.deepcopy(self.ema.state_dict()) if self.ema is not None else None
        scaler_state = copy.deepcopy(accelerator.scaler.state_dict()) if accelerator.scaler is not None else None
        accumulation_step = accelerator.step
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(trainable, weights):
                    param.copy_(saved)
            self.optimizer.load_state_dict(optimizer_state)
            self.optimizer.zero_grad(set_to_none=True)
            if ema_state is not None:
                self.ema.load_state_dict(ema_state)
            if scaler_state is not None:
                accelerator.scaler.load_state_dict(scaler_state)
            accelerator.step = accumulation_step

    # ---------------------------------------------------------------- checkpoints

    def _save_hook(self, models, weights, output_dir) -> None:
        if self.accelerator.is_main_process:
            if not self.sharded:
                for model in models:
                    self.save_model_weights(self.unwrap(model), Path(output_dir) / self.model_name)
            if self.ema is not None:
                self.ema.save_pretrained(Path(output_dir) / f"{self.model_name}_ema")
            self.loss_history.save(output_dir)
        if not self.sharded:
            weights.clear()  # saved above in diffusers format; Accelerate must not save them again

    def _load_hook(self, models, input_dir) -> None:
        while models and not self.sharded:
            self.load_model_weights(self.unwrap(models.pop()), Path(input_dir) / self.model_name)
        if self.ema is not None:
            loaded = EMAModel.from_pretrained(Path(input_dir) / f"{self.model_name}_ema", model_cls=type(self.unwrap()))
            self.ema.load_state_dict(loaded.state_dict())
            self.ema.to(self.device)
        self.loss_history.load(input_dir)

    def save_model_weights(self, model: torch.nn.Module, folder: Path) -> None:
        """How a checkpoint stores the trained weights (full model here; LoRA training stores adapters)."""
        model.save_pretrained(folder)

    def load_model_weights(self, model: torch.nn.Module, folder: Path) -> None:
        loaded = type(model).from_pretrained(folder)
        model.register_to_config(**loaded.config)
        model.load_state_dict(loaded.state_dict())

    def run_shape(self) -> dict:
        """What a resumed run must share with the checkpoint for its batches, draws and optimizer state to continue
        the same run."""
        return {"global_batch_size": self.global_batch_size, "seed": self.args.seed, "optimizer": self.args.optimizer}

    def checkpoint_record(self) -> dict:
        """What a checkpoint's manifest records of the run: its shape (checked on resume) and its length, with the
        budget plan it came from (a resumed budgeted run keeps both)."""
        record = {**self.run_shape(), "max_train_steps": self.max_train_steps}
        if self.budget_plan is not None:
            record["budget_plan"] = asdict(self.budget_plan)
        return record

    def save_checkpoint(self) -> Path:
        """`save_state` into `checkpoint-N.tmp`, the manifest last, then an atomic rename; older checkpoints beyond
        the limit are removed only after the new one is complete."""
        accelerator = self.accelerator
        self.check_weights_finite("saving a checkpoint")
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{self.global_step}"
        tmp = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_manifest(tmp, self.checkpoint_record())
            if final.exists() and manifest_problems(final):
                kept = final.with_name(f"{final.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
                logger.warning(f"Keeping the damaged {final.name} as {kept.name} and writing it anew.")
                os.replace(final, kept)
            elif final.exists():  # this run's own earlier write of the same step, complete
                shutil.rmtree(final)
            os.replace(tmp, final)
            limit = self.args.checkpoints_total_limit
            if limit is not None:
                for old in list_checkpoints(self.output_dir)[:-limit]:
                    doomed = old.with_name(old.name + ".deleting")  # a half-deleted folder never looks complete
                    os.replace(old, doomed)
                    shutil.rmtree(doomed)
            logger.info(f"Saved {final}")
        accelerator.wait_for_everyone()
        return final

    def _load_previous_stage_optimizer(self) -> None:
        """The AdamW moments of the previous stage's newest complete checkpoint (stage 2 continues stage 1 in the
        original); this run's param groups (LR, betas, weight decay) are kept."""
        if self.sharded:
            raise SystemExit("--resume_optimizer_state is not supported with FSDP or DeepSpeed here.")
        previous = Path(self.args.pretrained_model_name_or_path).parent  # --init_from resolved to its pipeline/
        checkpoint = latest_verified_checkpoint(previous)
        if checkpoint is None:
            raise SystemExit(f"--resume_optimizer_state: {previous} has no checkpoint to take the optimizer state from.")
        previous_optimizer = read_manifest(checkpoint)["run"].get("optimizer", "adamw")  # older manifests: AdamW
        if previous_optimizer != self.args.optimizer:
            raise SystemExit(
                f"--resume_optimizer_state: {checkpoint} holds {previous_optimizer} moments, this run uses --optimizer "
                f"{self.args.optimizer}; use --optimizer {previous_optimizer} or drop --resume_optimizer_state."
            )
        state = torch.load(checkpoint / "optimizer.bin", map_location="cpu", weights_only=True)
        state["param_groups"] = self.optimizer.state_dict()["param_groups"]
        try:
            self.optimizer.load_state_dict(state)
        except ValueError as error:
            raise SystemExit(
                f"--resume_optimizer_state: {checkpoint} holds the optimizer of another model ({error})."
            ) from None
        self.accelerator.print(f"Optimizer state from {checkpoint} (step {checkpoint_step(checkpoint)})")

    def _checkpoint_to_resume(self) -> Path | None:
        """The verified checkpoint --resume_from_checkpoint names, its run's shape checked against this run's; None
        for a new run. Found before anything is prepared: a budgeted run keeps the length it records."""
        choice = self.args.resume_from_checkpoint
        if choice is None:
            return None
        if choice == "latest":
            path = latest_verified_checkpoint(self.output_dir)
            if path is None:
                self.accelerator.print(f"No checkpoint in {self.output_dir}; starting a new run.")
                return None
        else:
            path = Path(choice)
            problems = manifest_problems(path)
            if problems:
                raise SystemExit(f"Cannot resume from {path}, it is damaged:\n  " + "\n  ".join(problems))
        recorded, current = read_manifest(path)["run"], self.run_shape()
        changed = [f"{key} {recorded[key]} -> {current[key]}" for key in current if recorded.get(key, current[key]) != current[key]]
        if changed:
            raise SystemExit(
                f"{path.name} was trained with other settings ({', '.join(changed)}): resuming would not continue "
                "the same run. Resume with the checkpoint's --train_batch_size x --gradient_accumulation_steps x "
                "processes and --seed, or start a new run with --init_from."
            )
        return path

    def _load_checkpoint(self, path: Path) -> None:
        self.accelerator.print(f"Resuming from checkpoint {path.name}")
        self.accelerator.load_state(str(path))
        self.global_step = checkpoint_step(path)

    # ---------------------------------------------------------------- loop

    def train(self, build_pipeline: Callable | None = None) -> None:
        """Run until `max_train_steps`, validating every `--validation_steps` with `build_pipeline`."""
        args, accelerator = self.args, self.accelerator
        accumulation = args.gradient_accumulation_steps
        planned_images = self.max_train_steps * self.global_batch_size

        batches_per_epoch = len(self.dataloader) if hasattr(self.dataloader, "__len__") else None
        done_batches = self.global_step * accumulation
        first_epoch, skip = (done_batches // batches_per_epoch, done_batches % batches_per_epoch) if batches_per_epoch else (0, done_batches)
        micro_step = done_batches
        first_step = self.global_step
        progress = tqdm(
            range(self.max_train_steps), initial=self.global_step, desc="steps",
            disable=not accelerator.is_local_main_process,
        )
        running_loss = 0.0
        unlogged = []  # (step, loss on the device, lr, wall time) of the steps since the last `_log_losses`
        started = time.perf_counter()
        for epoch in itertools.count(first_epoch):
            if self.global_step >= self.max_train_steps:
                break
            self.dataloader.set_epoch(epoch)
            batches = self.dataloader
            if epoch == first_epoch and skip:
                # The batches this run trained on before it was interrupted; the skipping loader shares the
                # prepared loader's (seed, epoch)-ordered sampler, so the rest of the epoch is the same.
                batches = accelerator.skip_first_batches(self.dataloader, skip)
            for batch in batches:
                if micro_step % accumulation == 0:
                    self.cost.start_step()
                counts_flops = self.cost.flops_per_image is None
                running_loss += self._train_micro_batch(batch, micro_step) / accumulation
                if counts_flops:
                    accelerator.print(self.cost.summary(planned_images))
                micro_step += 1
                if not accelerator.sync_gradients:
                    continue
                if self.ema is not None:
                    self.ema.step(self.unwrap().parameters())
                self.global_step += 1
                if self.global_step > first_step + 1:  # a run's first step has one-off costs (warm-up, FLOP count)
                    self.cost.end_step(self.global_batch_size)
                unlogged.append((self.global_step, running_loss, self.lr_scheduler.get_last_lr()[0], time.time()))
                running_loss = 0.0
                progress.update(1)
                saving = self.global_step % args.checkpointing_steps == 0 or self.global_step == self.max_train_steps
                if saving or self.global_step % self.log_every == 0:  # a checkpoint only after its losses passed
                    self._log_losses(unlogged, progress)
                if saving:
                    self.save_checkpoint()
                if build_pipeline is not None and self.global_step % args.validation_steps == 0:
                    self.validate(build_pipeline, f"step-{self.global_step:06d}")
                if self.global_step >= self.max_train_steps:
                    break
        progress.close()
        if self.budget_plan is not None:
            self.budget_report = self.budget_plan.report(
                self.cost, first_step, self.global_step, time.perf_counter() - started
            )
            accelerator.print(self.budget_report["summary"])

    def _train_micro_batch(self, batch, micro_step: int) -> torch.Tensor:
        """Forward and backward of one micro-batch, then (on the last of an optimizer step) clipping and the
        optimizer and LR steps; returns this process's loss, detached and left on the device (`_log_losses` reads
        it back). The run's first one counts the FLOPs."""
        args, accelerator = self.args, self.accelerator
        with accelerator.accumulate(self.model):
            draws = BatchRandomness(
                args.seed, micro_step, accelerator.process_index, accelerator.num_processes, args.train_batch_size,
                self.device,
            )
            count = self.cost.flops_per_image is None
            with flop_counter() if count else contextlib.nullcontext() as counter:
                loss = self.compute_loss(self.model, batch, draws)
                accelerator.backward(loss)
            if count:
                self.cost.flops_per_image = counter.get_total_flops() / args.train_batch_size
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
            self.optimizer.step()
            if self.lr_scheduler is not None:  # None while a budget is calibrated: the schedule needs its length
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _log_losses(self, unlogged: list, progress) -> None:
        """Read the `unlogged` steps' losses back (one wait for the device and one gather for all of them), stop at
        the first non-finite one, add them to the loss history and the trackers (each at its step's wall time) and
        the last to the progress bar; empties `unlogged`."""
        steps, losses, lrs, wall_times = zip(*unlogged)
        accelerator = self.accelerator
        per_process = accelerator.gather(torch.stack(losses)).view(accelerator.num_processes, len(steps))
        for step, loss, lr, wall_time in zip(steps, per_process.mean(0).tolist(), lrs, wall_times):
            if not math.isfinite(loss):
                self.stop_non_finite(f"the loss is {loss}", step)
            self.loss_history.append(step, loss)
            accelerator.log({"loss": loss, "lr": lr}, step=step, log_kwargs={"tensorboard": {"walltime": wall_time}})
        progress.set_postfix(loss=f"{loss:.4f}", img_s=f"{self.cost.images_per_second:.1f}")
        unlogged.clear()

    def check_weights_finite(self, before: str) -> None:
        """Stop if any trained weight is NaN or infinite, so such weights are never saved."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters() if p.requires_grad):
            self.stop_non_finite(f"weights are non-finite before {before}")

    def stop_non_finite(self, what: str, step: int | None = None) -> None:
        """End the run, keeping every checkpoint as it is and naming the step (by default the one under way) and the
        last good checkpoint."""
        found = [p.name for p in list_checkpoints(self.output_dir) if not manifest_problems(p)]
        restart = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved yet"
        raise SystemExit(
            f"Training stopped at step {self.global_step + 1 if step is None else step}: {what}. Nothing of this step was saved; {restart}. "
            "Lower --learning_rate or --max_grad_norm, or use --mixed_precision bf16/no, then resume with "
            "--resume_from_checkpoint latest."
        )

    # ---------------------------------------------------------------- validation and output

    @torch.no_grad()
    def validate(self, build_pipeline: Callable, name: str) -> list | None:
        """Sample `--validation_prompts` with the EMA weights if kept; save a grid PNG and log it to the trackers."""
        args = self.args
        if not args.validation_prompts or not self.accelerator.is_main_process:
            return None
        model = self.unwrap()
        if self.ema is not None:
            self.ema.store(model.parameters())
            self.ema.copy_to(model.parameters())
        pipeline = build_pipeline(model).to(self.device)
        pipeline.set_progress_bar_config(disable=True)
        kwargs = {} if args.validation_guidance_scale is None else {"guidance_scale": args.validation_guidance_scale}
        generator = torch.Generator(device=self.device).manual_seed(args.seed)
        with self.accelerator.autocast():
            images = pipeline(
                args.validation_prompts, num_inference_steps=args.num_validation_inference_steps,
                generator=generator, **kwargs,
            ).images
        if self.ema is not None:
            self.ema.restore(model.parameters())
        model.train()
        folder = self.output_dir / "validation"
        folder.mkdir(exist_ok=True)
        image_grid(images).save(folder / f"{name}.png")
        log_images(self.accelerator, "validation", images, args.validation_prompts, self.global_step)
        return images

    def finish(
        self, build_pipeline: Callable, description: str | None = None, training_data: str | None = None
    ) -> Path | None:
        """Save the output (`save_output`: the final pipeline with EMA weights if kept and a model card whose
        `description` and `training_data` default to generic text), the loss curve and history, the cost summary and
        a budgeted run's plan against its time (`budget.json`); push the output to the Hub with `--push_to_hub`.
        Returns the output folder on the main process."""
        from ..hub import push_folder_to_hub

        args, accelerator = self.args, self.accelerator
        self.check_weights_finite("saving the trained model")
        accelerator.wait_for_everyone()
        folder = None
        state_dict = accelerator.get_state_dict(self.model) if self.sharded else None  # collective: all processes
        if accelerator.is_main_process:
            model = self.unwrap()
            if state_dict is not None:  # rebuild an unsharded copy from the gathered weights
                model = type(model).from_config(model.config)
                model.load_state_dict(state_dict)
            if self.ema is not None:
                self.ema.copy_to(model.parameters())
                self.ema = None  # the model now holds the EMA weights; validation must not swap them again
            samples = self.validate(build_pipeline, "final")
            planned = self.max_train_steps * self.global_batch_size
            folder = self.save_output(
                model,
                build_pipeline,
                repo_id=self.hub_repo_id,
                base_model=args.pretrained_model_name_or_path,  # the card keeps Hub ids only, never local paths
                training_data=training_data or self._training_data(),
                cost=self.cost.as_dict(planned),
                sample_images=samples,
                sample_prompts=args.validation_prompts if samples else None,
                description=description,
            )
            self.loss_history.save(self.output_dir)
            if self.loss_history.steps:
                self.loss_history.plot(self.output_dir / "loss.png")
            summary = self.cost.summary(planned)
            (self.output_dir / "cost.txt").write_text(summary + "\n")
            accelerator.print(summary)
            if self.budget_report is not None:
                (self.output_dir / "budget.json").write_text(json.dumps(self.budget_report, indent=2) + "\n")
            accelerator.print(f"Saved the training output to {folder}")
            if args.push_to_hub:
                accelerator.print(f"Pushed to the Hub: {push_folder_to_hub(folder, self.hub_repo_id, commit_message='End of training')}")
        accelerator.end_training()
        self.lock.release()
        return folder

    def _training_data(self) -> str:
        """What the model card says the run trained on (local paths are shortened by the card writer)."""
        args = self.args
        raw = getattr(args, "dataset_name", None) or getattr(args, "train_data_dir", None)
        if raw:
            return f"{raw} (captions from column {args.caption_column!r})"
        return "precomputed caches: " + ", ".join(map(str, args.precomputed_dataset))

    def save_output(self, model: torch.nn.Module, build_pipeline: Callable, **card) -> Path:
        """Write the trained pipeline with a model card (`hub.save_pipeline_with_card` arguments in `card`) to
        `output_dir/pipeline`; LoRA training writes its adapter instead."""
        from ..hub import save_pipeline_with_card

        return save_pipeline_with_card(build_pipeline(model), self.output_dir / "pipeline", **card)
